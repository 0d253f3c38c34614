"""The published baselines, each under the quantizer contract of vqvae.py and registered from outside it, as a
user's own method would be: SimVQ, FSQ, Wasserstein VQ and CVQ (`--quantizer simvq | fsq | wasserstein_vq | cvq`).

Each runs as its authors' official code runs it: the method's own codebook parameterisation, update, losses, weights
and initialisation, read from that code (repository and file cited in each class). What every leaderboard row
shares instead: the encoder and decoder, the autoencoder's optimizer (AdamW, lr, weight decay, no gradient clipping),
the data, steps and seeds. Deviations from the official code are named in each class's docstring.

Importing this module registers the four names and their options (fsq_levels, wasserstein_weight, wvq_*, cvq_*,
declared in each class's Params), which become Config fields, YAML keys and --flags like every other. A config's
`imports` names it by default, so reading a config or checkpoint imports it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from vqvae import (Quantized, Quantizer, code_counts, dist_sum_, drop_state_keys, gather_rows, nearest_code, option,
                   register_quantizer, vq_losses)


# ################################################################################################################
# SimVQ
# ################################################################################################################

@register_quantizer("simvq")
class SimVQQuantizer(Quantizer):
    """SimVQ (Zhu et al. 2024, "Addressing Representation Collapse in Vector Quantized Models with One Linear
    Layer", arXiv:2411.02038; official code youngsheen/SimVQ, taming/modules/vqvae/quantize.py, class SimVQ): the
    codes are the rows of C W + b, a frozen random basis C (K, D) under one learned affine map (nn.Linear(D, D) with
    its bias, so the code cloud can move to the features' mean), so each gradient step moves the whole codebook, not
    only the codes that were picked.

    Nearest code among the rows of C W + b; losses commitment_weight ||e - sg(z_q)||^2 (trains the encoder) and
    codebook_weight ||z_q - sg(e)||^2 (trains W and b; C is a buffer), as their configs run it (legacy: false, beta
    0.25); straight-through (or rotation) to e. C ~ N(0, 1/D) as theirs. No k-means, no EMA, no restarts.
    Deviations, all in how the shared autoencoder trains (configs/imagenet_simvq_128_B.yaml, taming/models/vq.py,
    taming/modules/losses/vqperceptual.py): W and b train in the shared AdamW at 3e-4 with an MSE reconstruction;
    theirs train in the generator's Adam (betas 0.5, 0.9) at lr 1e-4, no schedule, on L1 + LPIPS + 0.1 x a
    non-saturating GAN loss from step 0, in fp16 mixed precision, and validate on an EMA of the weights (decay 0.999)
    where ours validates the weights themselves.
    """

    @dataclass
    class Params(Quantizer.Params):
        commitment_weight: float
        codebook_weight: float
        estimator: str
        chunk_size: int

    def __init__(self, params: "SimVQQuantizer.Params", dim: int):
        super().__init__(params, dim)
        self.register_buffer("basis", torch.randn(self.K, dim) / math.sqrt(dim))  # C, never trained
        self.linear = nn.Linear(dim, dim)  # x -> x W + b, W = linear.weight^T
        self._register_load_state_dict_pre_hook(self._zero_bias_if_missing)

    @staticmethod
    def _zero_bias_if_missing(state, prefix, *args):
        """Checkpoints from before the bias trained a bias-free map, which a zero bias reproduces exactly."""
        weight = state.get(prefix + "linear.weight")
        if weight is not None and prefix + "linear.bias" not in state:
            state[prefix + "linear.bias"] = weight.new_zeros(len(weight))

    @property
    def codebook(self) -> torch.Tensor:
        return self.linear(self.basis)  # (K, D) = C W + b

    def quantize(self, e: torch.Tensor) -> Quantized:
        C = self.codebook  # (K, D), differentiable in W and b
        with torch.no_grad():
            idx = nearest_code(e, C.detach(), self.hp.chunk_size)  # (N,)
        z_q = C.index_select(0, idx)  # (N, D); backward by index_add_, deterministic on CPU (C[idx]'s is not)
        return Quantized(z_q, idx, vq_losses(e, z_q, self.hp.commitment_weight, self.hp.codebook_weight), {})


# ################################################################################################################
# FSQ
# ################################################################################################################

# The paper's recommended levels (Mentzer et al. 2023, Table 1), keyed by log2 of the target codebook size. The
# 2^9 = 512 entry (this project's default K) is not in the table: [8, 8, 8] is ours, exactly 512 codes.
FSQ_LEVELS = {8: [8, 6, 5], 9: [8, 8, 8], 10: [8, 5, 5, 5], 12: [7, 5, 5, 5, 5], 14: [8, 8, 8, 6, 5],
              16: [8, 8, 8, 5, 5, 5]}
FSQ_MAX_LEVEL = 8  # no channel of the table has more levels; the rule for other K keeps to that too


def parse_fsq_levels(text: str) -> list[int]:
    """'8,5,5,5' -> [8, 5, 5, 5]; '' -> []. ValueError unless every level is an integer >= 2."""
    levels = [int(s) for s in text.split(",")] if text.strip() else []
    if any(L < 2 for L in levels):
        raise ValueError(f"FSQ levels must be >= 2, got {text!r}")
    return levels


def fsq_levels_valid(text: str) -> bool:
    try:
        parse_fsq_levels(text)
        return True
    except ValueError:
        return False


def fsq_levels(text: str, K: int) -> list[int]:
    """Levels per channel: those given in `text`, else the table entry whose 2^k is nearest K in log scale (for
    2^8 <= K <= 2^16; a tie goes to the smaller), else `fsq_levels_rule(K)`."""
    if text.strip():
        return parse_fsq_levels(text)
    if 2 ** 8 <= K <= 2 ** 16:
        return FSQ_LEVELS[min(FSQ_LEVELS, key=lambda k: (abs(k - math.log2(K)), k))]
    return fsq_levels_rule(K)


def fsq_levels_rule(K: int) -> list[int]:
    """Levels for a K outside the table: the fewest channels d with 8^d >= K, each with floor or ceil of K^(1/d)
    levels (at least 2), in the mix whose product is nearest K in log scale (a tie goes to the smaller product),
    largest first. E.g. 16 -> [4, 4], 32 -> [6, 5], 128 -> [5, 5, 5], 2^18 -> [8] * 6."""
    d = 1
    while FSQ_MAX_LEVEL ** d < K:
        d += 1
    root = K ** (1 / d)
    lo, hi = max(2, math.floor(root)), max(2, math.ceil(root))
    mixes = [[hi] * j + [lo] * (d - j) for j in range(d + 1)]
    return min(mixes, key=lambda L: (abs(math.log(math.prod(L) / K)), math.prod(L)))


class _RoundSTE(torch.autograd.Function):
    """round(x) forward, identity backward: the straight-through estimator with an exact value (the usual
    x + sg(round(x) - x) can miss the integer by a rounding error, and codes(idx) must reproduce z_q exactly)."""

    @staticmethod
    def forward(ctx, x):
        return x.round()

    @staticmethod
    def backward(ctx, g):
        return g


@register_quantizer("fsq")
class FSQQuantizer(Quantizer):
    """Finite Scalar Quantization (Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made Simple",
    arXiv:2309.15505; official code google-research/google-research, fsq/fsq.ipynb, class FSQ, the paper's appendix
    A.1 code): no codebook. e is projected to d = len(levels) channels, each bounded to L_i integer values and
    rounded (straight-through), so the codes are a fixed grid of prod_i L_i points; projected back to D for the
    decoder.

        h = project_in(e)                                       (N, d)
        bound(h)_i = tanh(h_i + shift_i) half_i - offset_i,     half_i = (L_i - 1)/2 (1 - 1e-3),
                     offset_i = 1/2 if L_i is even else 0,      shift_i = tan(offset_i / half_i)
        level = round(bound(h))                                 integers -(L_i//2) .. (L_i-1)//2
        z_q = project_out(level / (L_i//2))                     (N, D)
        index = sum_i (level_i + L_i//2) prod_{j<i} L_j         (mixed radix)

    The bound is their FSQ.bound, shift included: tan(offset / half) puts h = 0 within 4.3e-4 of level 0 for L >= 3;
    for L = 2 (offset / half > 1) the shift is 1.56 and the step between levels -1 and 0 sits at h = -1.56.
    lucidrains/vector-quantize-pytorch (vector_quantize_pytorch/finite_scalar_quantization.py, the version read)
    shifts by atanh(offset / half) with half = (L - 1)/2 (1 + 1e-3); this class shifted by atanh with (1 - 1e-3)
    (0 for L = 2) when the leaderboard's FSQ rows ran: for their levels (8, 6, 5) the two shifts differ by at most
    2.3e-5, for L = 4 by 3.2e-4.
    K = prod_i L_i replaces codebook_size (validation's usage and perplexity are over these K; report() gives it as
    codebook_size_used). Levels: `fsq_levels`, or when empty the paper's recommendation (Table 1) for the
    codebook_size nearest in log2 among 2^8 [8,6,5], 2^10 [8,5,5,5], 2^12 [7,5,5,5,5], 2^14 [8,8,8,6,5],
    2^16 [8,8,8,5,5,5], and 2^9 [8,8,8], which is ours, not the paper's; below 2^8 or above 2^16 `fsq_levels_rule`.
    No loss terms: every grid point is reachable, nothing to pull.
    """

    @dataclass
    class Params(Quantizer.Params):
        fsq_levels: str = option("", "FSQ: levels per latent channel, e.g. '8,5,5,5' (K is their product and "
                                     "codebook_size is unused); empty: the paper's recommended levels for "
                                     "codebook_size",
                                 check=(fsq_levels_valid, "empty or integers >= 2 separated by commas, e.g. '8,5,5,5'"))

    BOUND_EPS = 1e-3  # keeps tanh's range inside (-half, half), so rounding never reaches a level beyond L

    def __init__(self, params: "FSQQuantizer.Params", dim: int):
        super().__init__(params, dim)
        levels = fsq_levels(params.fsq_levels, params.codebook_size)
        self.K, self.levels = math.prod(levels), levels
        L = torch.tensor(levels, dtype=torch.float)
        half = (L - 1) / 2 * (1 - self.BOUND_EPS)
        offset = torch.where(L % 2 == 0, 0.5, 0.0)
        shift = torch.tan(offset / half)  # the official shift (fsq.ipynb); about atanh(offset / half) for L > 2
        # derived from the config, so rebuilt rather than saved (persistent=False)
        for name, value in {"bound_half": half, "bound_offset": offset, "bound_shift": shift,
                            "width": torch.floor(L / 2), "n_levels": L.long(),
                            "radix": torch.cumprod(torch.tensor([1] + levels[:-1]), 0)}.items():
            self.register_buffer(name, value, persistent=False)
        self.project_in = nn.Linear(dim, len(levels))
        self.project_out = nn.Linear(len(levels), dim)

    def report(self) -> dict[str, float]:
        return {"codebook_size_used": float(self.K)}

    def codes(self, idx: torch.Tensor) -> torch.Tensor:
        digits = idx[..., None] // self.radix % self.n_levels  # (..., d)
        level = (digits - self.width.long()).float()
        return self._decode(level.reshape(-1, len(self.levels))).reshape(*idx.shape, self.dim)

    def _decode(self, level: torch.Tensor) -> torch.Tensor:
        return self.project_out(level / self.width)  # (N, d) integer levels -> (N, D)

    def bound(self, h: torch.Tensor) -> torch.Tensor:
        """(N, d) -> (N, d) in (-L_i/2, L_i/2) per channel, before rounding."""
        return torch.tanh(h + self.bound_shift) * self.bound_half - self.bound_offset

    def quantize(self, e: torch.Tensor) -> Quantized:
        level = _RoundSTE.apply(self.bound(self.project_in(e)))  # (N, d) integers
        idx = ((level.detach() + self.width).long() * self.radix).sum(1)  # (N,) mixed radix
        return Quantized(self._decode(level), idx, {}, {})

    def decoder_input(self, e: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
        return z_q  # the rounding is straight-through inside quantize: z_q already carries the gradient to e


# ################################################################################################################
# Wasserstein VQ
# ################################################################################################################

W2_EIG_EPS = 1e-8  # added to every eigenvalue under its square root, as in the official code
W2_EPS = 1e-10  # under the final square root, as there


def mean_cov(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and unbiased covariance (D, D) (denominator n - 1) of the rows of x (n, D)."""
    mu = x.mean(0)
    xc = x - mu
    return mu, xc.t() @ xc / (len(x) - 1)


def gaussian_w2(features: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Fang et al.'s Wasserstein loss between Gaussian fits of the features (n, D) and of the codes (K, D), as their
    `calc_wasserstein_loss` computes it (VQ-Research/Wasserstein-VQ, code/VQVAE/model/wasserstein_quantizer.py):

        s = max_d std(features[:, d]) + 1e-8 (detached),   z = features / s,   c = codes / s
        W = sqrt(||mu_z - mu_c||^2 + relu(tr(S_z + S_c) - 2 sum_i sqrt(lambda_i(S_z^1/2 S_c S_z^1/2))) + 1e-10)

    the 2-Wasserstein distance (not squared) between N(mu_z, S_z) and N(mu_c, S_c) (Dowson & Landau 1982), with
    unbiased covariances, the features' moments detached (only the codes move), and every eigenvalue taken as
    relu(lambda) + 1e-8 under its square root, which keeps the gradient finite where S_c is singular (K <= D).
    Computed in float64 (theirs: float32); differentiable in `codes`."""
    out = dict(dtype=codes.dtype, device=codes.device)
    work = dict(dtype=torch.float64, device="cpu" if codes.device.type == "mps" else codes.device)  # MPS: no float64
    z, c = features.detach().to(**work), codes.to(**work)
    s = z.std(0).amax() + 1e-8
    (mu_z, S_z), (mu_c, S_c) = mean_cov(z / s), mean_cov(c / s)
    lam, U = torch.linalg.eigh(S_z)
    R = (U * (lam.clamp_min(0) + W2_EIG_EPS).sqrt()) @ U.t()  # S_z^1/2 (D, D)
    M = R @ S_c @ R
    ev = torch.linalg.eigvalsh((M + M.t()) / 2)  # (D,), symmetrised against rounding
    cross = (ev.clamp_min(0) + W2_EIG_EPS).sqrt().sum()  # tr (S_z^1/2 S_c S_z^1/2)^1/2
    # diagonal().sum(), not trace(): trace's backward reads a value back to the host
    trace_part = F.relu(S_z.diagonal().sum() + S_c.diagonal().sum() - 2 * cross)
    return ((mu_z - mu_c).square().sum() + trace_part + W2_EPS).sqrt().to(**out)


@register_quantizer("wasserstein_vq")
class WassersteinVQQuantizer(Quantizer):
    """Wasserstein VQ (Fang et al. 2025, "Enhancing Vector Quantization with Distributional Matching: A Theoretical
    and Empirical Study", arXiv:2506.15078; official code VQ-Research/Wasserstein-VQ, code/VQVAE/model/
    wasserstein_quantizer.py and code/VQVAE/train_vqvae.py): nearest code in a learned codebook, plus the
    2-Wasserstein distance between Gaussian fits of recent encoder outputs and of the codes (`gaussian_w2`), which
    moves the codebook's distribution onto the features' so that codes sit where features are (and get used).

    loss = codebook_weight ||z_q - sg(e)||^2 + wvq_commitment_weight ||e - sg(z_q)||^2 + wasserstein_weight W
    (theirs: alpha 1.0, beta 0.1, gamma 0.5, the scripts' values), straight-through to e. The features' fit is over a
    FIFO queue of the last wvq_queue_size outputs (65,536 theirs), this batch's included (enqueued first; every rank
    enqueues all ranks' rows, so all hold the same queue), which starts filled with N(0, 0.01^2) noise as theirs.
    The codebook starts N(0, 0.01^2) and is its own Adam parameter group (`param_groups`): lr wvq_codebook_lr (0.02),
    betas (0.9, 0.95), no weight decay, its gradient clipped to norm 1.
    Deviations: the autoencoder's optimizer is the shared one, AdamW at 3e-4 (theirs: Adam, betas 0.9, 0.95, at lr
    5e-5, code/VQVAE/config.py's --lr default, which their scripts keep; on ImageNet warmed up over 5,000 steps and
    cosine-decayed to 1e-5 by step 50,000; the autoencoder's gradient clipped to norm 1 as well), so the codebook's
    lr is 400x the autoencoder's there and 67x here; W in float64; no dead-code restarts (they have none); at
    evaluation the loss is taken over the queue (theirs: over the evaluated batch), which changes only the logged
    val/wasserstein_loss.
    """
    CODEBOOK_BETAS = (0.9, 0.95)  # the codebook group of their optimizer (train_vqvae.py)
    CODEBOOK_MAX_GRAD_NORM = 1.0
    INIT_STD = 0.01  # codebook and the queue's first contents ~ N(0, 0.01^2)

    @dataclass
    class Params(Quantizer.Params):
        codebook_weight: float
        estimator: str
        chunk_size: int
        wvq_commitment_weight: float = option(0.1, "Wasserstein VQ: weight of ||e - sg(z_q)||^2 (its codebook term "
                                                   "takes codebook_weight)", check=(lambda w: w >= 0, ">= 0"))
        wasserstein_weight: float = option(0.5, "Wasserstein VQ: weight of W2 (not squared) between Gaussian fits of "
                                                "recent encoder outputs and of the codebook, both scaled by the "
                                                "outputs' largest std", check=(lambda w: w >= 0, ">= 0"))
        wvq_codebook_lr: float = option(0.02, "Wasserstein VQ: learning rate of the codebook's own Adam group "
                                              "(betas 0.9, 0.95; gradient clipped to norm 1)",
                                        check=(lambda lr: lr > 0, "> 0"))
        wvq_queue_size: int = option(65536, "Wasserstein VQ: how many recent encoder outputs (of all ranks) the "
                                            "Gaussian fit of the features is taken over",
                                     check=(lambda n: n >= 2, ">= 2"))

    def __init__(self, params: "WassersteinVQQuantizer.Params", dim: int):
        super().__init__(params, dim)
        self.codebook = nn.Parameter(self.INIT_STD * torch.randn(self.K, dim))
        self.register_buffer("queue", self.INIT_STD * torch.randn(params.wvq_queue_size, dim))  # (S, D) ring
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))  # the next row to overwrite
        # checkpoints from when it shared VQ-EMA's codebook machinery and counted its queue's rows
        self._register_load_state_dict_pre_hook(drop_state_keys("ema_count", "ema_sum", "initialized", "queue_len"))

    def param_groups(self) -> list[dict]:
        return [{"params": [self.codebook], "lr": self.hp.wvq_codebook_lr, "betas": self.CODEBOOK_BETAS,
                 "weight_decay": 0.0, "max_grad_norm": self.CODEBOOK_MAX_GRAD_NORM}]

    def quantize(self, e: torch.Tensor) -> Quantized:
        hp = self.hp
        if self.training:
            self._enqueue(gather_rows(e.detach()))
        with torch.no_grad():
            idx = nearest_code(e, self.codebook, hp.chunk_size)  # (N,)
        z_q = self.codebook.index_select(0, idx)  # (N, D); index_select's backward is deterministic on CPU
        losses = vq_losses(e, z_q, hp.wvq_commitment_weight, hp.codebook_weight)
        losses["wasserstein_loss"] = hp.wasserstein_weight * gaussian_w2(self.queue, self.codebook)
        return Quantized(z_q, idx, losses, {})

    @torch.no_grad()
    def _enqueue(self, rows: torch.Tensor):
        """Write rows (n, D) over the oldest ones; with more rows than the queue holds, the last S."""
        S = len(self.queue)
        rows = rows[-S:]
        pos = (self.queue_ptr + torch.arange(len(rows), device=rows.device)) % S  # distinct positions
        self.queue[pos] = rows
        self.queue_ptr.copy_((self.queue_ptr + len(rows)) % S)


# ################################################################################################################
# CVQ
# ################################################################################################################

@register_quantizer("cvq")
class CVQQuantizer(Quantizer):
    """CVQ-VAE's online clustered codebook (Zheng & Vedaldi 2023, "Online Clustered Codebook", ICCV,
    arXiv:2307.15139; official code lyndonzheng/CVQ-VAE, quantise.py (VectorQuantiser) and main.py): a learned
    codebook whose rarely used codes are pulled, every training step, onto the encoder output closest to them (their
    anchor), so codes that die come back where the features are. As main.py runs it (--distance cos --anchor
    closest), "closest" means by cosine similarity, for the lookup and the anchors alike:

        k(e)  = argmax_k cos(e, c_k)                      the code of e; z_q = c_k itself (not its direction)
        P_k  <- decay P_k + (1 - decay) n_k / N            EMA of the share of latents coded k (P starts at 0)
        a_k   = exp(-10 K P_k / (1 - decay) - 1e-3)        ~1 for an unused code, ~0 for one used about 1/K or more
        c_k  <- (1 - a_k) c_k + a_k anchor_k,              anchor_k = argmax_{e in batch} cos(e, c_k)

    after the lookup (the optimizer step then applies this step's gradient to the moved codes, as their code does);
    losses commitment_weight ||e - sg(z_q)||^2 + codebook_weight ||z_q - sg(e)||^2 (0.25 and 1), straight-through.
    The codebook starts uniform in (-1/K, 1/K) as theirs. A code in average use (P_k = 1/K) that falls out of use
    has P_k = 0.99^t / K after t steps, so its a_k reaches 1/2 only at 0.99^t = ln(2) / 1000, t ~ 720 steps: a
    shorter run revives no code that was once in average use.
    `cvq_distance l2` looks codes and anchors up by Euclidean distance instead (this project's earlier CVQ).
    Under DDP n_k and N are summed over ranks and anchors are chosen among all ranks' outputs, so every rank applies
    the same update.
    Their main.py divides the reconstruction MSE (of [-1, 1] images) by data_variance = np.var(train_images / 255),
    the pixel variance of the training set on the [0, 1] scale (0.0637 on the subset, about 0.0633 on all of
    CIFAR-10): reconstruction weighs 15.7x as much against the quantizer's terms as it does here. `cvq_data_variance`
    v applies it from inside the quantizer, as its terms times v: recon + v L_q = v (recon / v + L_q), their loss
    times the constant v. Gradients are v times theirs, which Adam(W) undoes (m / sqrt(s) is unchanged) except that
    its eps (1e-8) acts as eps / v on their scale; decoupled weight decay and the anchor update are unaffected; the
    logged commitment_loss and codebook_loss read v times theirs. The default v = 1 (main.py's data_variance=1
    default) leaves reconstruction unscaled, because the official scaling does not help CVQ here: at K = 512 and
    2,340 steps (LEADERBOARD.md, seeds 1337 / 1 / 2) v = 0.0637 lowers it from 21.85 / 21.57 / 22.06 dB to
    18.84 / 18.15 / 19.67, test usage from 79-90 % to 44-59 %, rFID from 126-164 to 236-275.
    Deviations: the codebook trains in the shared AdamW (theirs: Adam, no weight decay); the reconstruction is not
    divided by the data variance unless `cvq_data_variance` says so; the optional contrastive loss is not included
    (off in their defaults).
    """
    ANCHOR_SCALE, ANCHOR_EPS = 10.0, 1e-3  # the constants of a_k in their code

    @dataclass
    class Params(Quantizer.Params):
        commitment_weight: float
        codebook_weight: float
        decay: float
        estimator: str
        chunk_size: int
        cvq_distance: Literal["cos", "l2"] = option("cos", "CVQ: nearest code and anchors by cosine similarity (its "
                                                           "code's default) or by Euclidean distance")
        cvq_data_variance: float = option(1.0, "CVQ: its main.py divides the reconstruction MSE by the training "
                                                "images' pixel variance on the [0, 1] scale (0.0637 on the subset); "
                                                "1: not divided", (lambda v: v > 0, "> 0"))

    def __init__(self, params: "CVQQuantizer.Params", dim: int):
        super().__init__(params, dim)
        self.codebook = nn.Parameter(torch.empty(self.K, dim).uniform_(-1.0 / self.K, 1.0 / self.K))
        self.register_buffer("usage", torch.zeros(self.K))  # P (K,)
        # checkpoints from when it shared VQ-EMA's codebook machinery
        self._register_load_state_dict_pre_hook(drop_state_keys("ema_count", "ema_sum", "initialized"))

    @classmethod
    def upgrade_config(cls, config: dict) -> dict:
        config.setdefault("cvq_distance", "l2")  # saved before the option existed: CVQ then looked up by L2
        return config

    def closest(self, x: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
        """For each row of x, the index of the row of C closest to it (cosine similarity or Euclidean distance)."""
        if self.hp.cvq_distance == "cos":  # on unit vectors, ||x - c||^2 = 2 - 2 cos(x, c)
            x, C = F.normalize(x, dim=1), F.normalize(C, dim=1)
        return nearest_code(x, C, self.hp.chunk_size)

    def quantize(self, e: torch.Tensor) -> Quantized:
        with torch.no_grad():
            idx = self.closest(e, self.codebook)  # (N,)
        # index_select saves only idx, so the anchor update may move the codebook in place after this line
        z_q = self.codebook.index_select(0, idx)  # (N, D)
        metrics = {"anchor_weight": self._pull_to_anchors(e.detach(), idx)} if self.training else {}
        v = self.hp.cvq_data_variance  # main.py's recon / v, as v times these terms (class docstring)
        return Quantized(z_q, idx, vq_losses(e, z_q, v * self.hp.commitment_weight, v * self.hp.codebook_weight),
                         metrics)

    @torch.no_grad()
    def _pull_to_anchors(self, e: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The usage EMA and the anchor update above; returns the mean a_k."""
        d = self.hp.decay
        counts = dist_sum_(code_counts(idx, self.K, e.dtype))  # (K,) over all ranks
        self.usage.mul_(d).add_(counts / counts.sum(), alpha=1 - d)
        a = torch.exp(-self.ANCHOR_SCALE * self.K * self.usage / (1 - d) - self.ANCHOR_EPS)  # (K,)
        rows = gather_rows(e)  # (N_global, D): the same candidates, in the same order, on every rank
        anchors = rows[self.closest(self.codebook, rows)]  # (K, D)
        self.codebook.lerp_(anchors, a[:, None])  # c + a (anchor - c)
        return a.mean()
