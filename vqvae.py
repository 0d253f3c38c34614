"""BA-VQ: VQ-VAEs on CIFAR-10 with interchangeable quantizers, for studying codebook utilization.

One research module, read top to bottom in its banner sections: Config (and the options quantizers register) ->
Data -> Encoder / Decoder -> Quantizers (the contract and registry, VQ-EMA, Blahut-Arimoto) -> Model (and
load_checkpoint) -> Metrics -> Train / Validate (the trainer, validation, the run and how it stops). Around it:
`ba_kernels.py` (the blocked BA pass and its backward, below the method), `checkpoint.py` (the checkpoint written,
read and resumed from; the run folder), `perceptual.py` (rFID, LPIPS), `plumbing.py` (devices, processes and
signals, collectives, fast kernels, YAML and dataclass checks, imports by name or path, file writes and figures, the
CIFAR-10 download, the metrics log), `baselines.py` (SimVQ, FSQ, Wasserstein VQ, CVQ, registered through the
quantizer contract with their options), `examples/my_quantizer.py` (a user's quantizer in one file), `train.py` (a
thin CLI over `train(cfg)`), `runs.py` (finished runs for analyze.ipynb and the sweeps). Nothing runs at import time.

Papers:
- VQ-VAE, EMA codebook: van den Oord et al. 2017, "Neural Discrete Representation Learning" (arXiv:1711.00937).
- Blahut-Arimoto: Blahut 1972, "Computation of channel capacity and rate-distortion functions";
  Arimoto 1972. The BA quantizer runs its E-M iterations on a minibatch of encoder outputs.
- Rotation trick: Fifty et al. 2024, "Restructuring Vector Quantization with the Rotation Trick" (ICLR 2025).
- The baselines' papers and official code: baselines.py.

Symbols: x image, e encoder output (N, D) after flattening, C codebook (K, D), p = p(k|e) soft assignment,
Q the marginal over codes, z_q quantized latents, x_hat reconstruction, beta the inverse temperature.
"""
from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import math
import pickle
import random
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Literal, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
import perceptual
import plumbing
from ba_kernels import BAResult, ba_assign, ba_assign_topk, topk_dropped_mass
from plumbing import (Logger, StopFlag, UserError, atomic_write, autocast_dtype, broadcast, check_field_types,
                      compile_model, ddp_device, ddp_wrap, dist_rank_world, dist_sum_, download_cifar10,
                      extend_dataclass, gather_rows, import_modules, nearest_code, pick_device, random_rows,
                      rank_local, read_yaml, save_image_rows, scatter_sum, set_deterministic, with_ones, world_size)

REPO_DIR = Path(__file__).resolve().parent
SAMPLE_PATH = REPO_DIR / "assets" / "cifar10_sample.npz"


# ################################################################################################################
# Config
# ################################################################################################################

def option(default, help: str, check: Optional[tuple[Callable[[typing.Any], bool], str]] = None, **metadata):
    """A Config field, or a quantizer's own option in its Params: the default, one line of help (--help), and an
    optional range check (predicate, what it asks): check=(lambda w: w >= 0, ">= 0") fails as 'w must be >= 0'."""
    return field(default=default, metadata={"help": help, **({"check": check} if check else {}), **metadata})


_f = option  # the short name Config's own fields use


@dataclass
class Config:
    """Every hyperparameter and switch. Fields = YAML keys = --flags; defaults < YAML < flags. A registered
    quantizer's own options join these fields when it registers (add_options)."""
    # run
    name: str = _f("", "run name; the run lives in <out_dir>/<name> (empty: <quantizer>_k<K>_<time>)")
    out_dir: str = _f("experiments", "folder that holds the run folders")
    seed: int = _f(1337, "seed for torch, numpy, python and the data order")
    device: str = _f("auto", "auto (MPS > CUDA > CPU), cpu, cuda, cuda:1, mps")
    resume: bool = _f(False, "continue the run <out_dir>/<name> from its last checkpoint")
    overwrite: bool = _f(False, "replace an existing run folder of the same name")
    imports: str = _f("baselines", "modules whose quantizers (and their options) the run needs, comma-separated: "
                                   "module names or .py files, relative to the working directory; imported before "
                                   "the rest of a config is read")
    # data
    dataset: Literal["cifar10", "cifar10-sample"] = _f("cifar10", "cifar10 (torchvision) or the bundled sample")
    data_dir: str = _f("./data", "folder with (or to download) cifar-10-batches-py")
    # model
    arch: Literal["residual", "compact"] = _f("residual", "residual (seed 004) or compact (seed 000)")
    latent_dim: Optional[int] = _f(None, "code dimension D (default: 256 residual, 64 compact)")
    quantizer: str = _f("vq_ema", "a registered quantizer (QUANTIZERS in vqvae.py)",
                        choices=lambda: sorted(QUANTIZERS))
    codebook_size: int = _f(512, "number of codes K")
    commitment_weight: float = _f(0.25, "weight of ||e - sg(z_q)||^2 (Wasserstein VQ: wvq_commitment_weight)")
    codebook_weight: float = _f(1.0, "weight of ||z_q - sg(e)||^2 where the loss trains the codes (ba_vq with "
                                     "codebook_update grad, simvq, wasserstein_vq, cvq)")
    entropy_weight: float = _f(0.01, "BA: weight of the usage term (usage_term), in nats")
    beta_start: float = _f(1.0, "BA: inverse temperature at the first step (in beta_units)")
    beta_end: float = _f(100.0, "BA: inverse temperature at the last step (cosine schedule)")
    ba_iters: int = _f(1, "BA: E-M iterations per forward pass")
    ba_topk: int = _f(0, "BA: in training, keep each latent's ba_topk most likely codes (0: all K, exact); a step "
                         "whose dropped probability mass exceeds ba_topk_max_drop runs exact")
    ba_memory_mib: int = _f(1024, "BA: memory its E-M pass may hold for (rows, K) blocks and, where they fit beside "
                                  "them, the logits kept for the backward (else formed again: one more GEMM)")
    ba_topk_max_drop: float = _f(1e-3, "BA: largest mean probability mass a top-k step may drop (measured every step "
                                       "on every 8th latent, logged as topk_dropped)")
    ba_forward: Literal["hard", "soft"] = _f("hard", "BA: decoder sees the hard code (straight-through to e, p "
                                             "drives the statistics) or the soft mixture sum_k p c_k (seeds)")
    usage_term: Literal["mutual_info", "entropy"] = _f("mutual_info", "BA: -(H(Q) - E H(p(.|e))) or -H(Q) (seeds)")
    beta_units: Literal["relative", "absolute"] = _f("relative", "BA: beta per running mean nearest-code "
                                                     "distance, or per squared latent unit (seeds)")
    eval_codes: Literal["auto", "running", "nearest", "batch"] = _f(
        "auto", "BA: evaluation code: the training rule with a fixed prior (auto: nearest when training's prior is "
        "uniform, i.e. marginal batch and ba_iters 1, else running), MAP under the running Q, the nearest code, or "
        "MAP under the evaluated batch's Q (seeds)")
    codebook_update: Literal["ema", "grad"] = _f("ema", "BA: soft-weighted EMA codebook, or learned by the loss")
    marginal: Literal["batch", "running"] = _f("batch", "BA: Q starts uniform each forward, or an EMA across steps")
    decay: float = _f(0.99, "EMA decay of codebook statistics (and of BA's running marginal, CVQ's code usage)")
    epsilon: float = _f(1e-5, "Laplace smoothing of EMA cluster sizes")
    kmeans_init: bool = _f(True, "initialise codes by k-means++ and Lloyd on the first training batch (vq_ema, "
                                 "ba_vq; the baselines initialise as their code does)")
    kmeans_iters: int = _f(10, "Lloyd iterations of the k-means initialisation")
    dead_code_threshold: float = _f(1.0, "restart codes that are the hard code of fewer vectors per step (EMA) "
                                         "than this (0: off, the seeds); vq_ema and ba_vq")
    estimator: Literal["ste", "rotation"] = _f("ste", "gradient to the encoder: straight-through or rotation trick")
    chunk_size: int = _f(4096, "encoder vectors per chunk in distance and soft-assignment passes")
    # optimisation
    epochs: int = _f(10, "training epochs")
    batch_size: int = _f(128, "images per optimizer step (global, across ranks)")
    lr: float = _f(3e-4, "AdamW learning rate")
    weight_decay: float = _f(1e-4, "AdamW weight decay")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = _f("auto", "autocast dtype (auto: bf16 on CUDA, else fp32)")
    compile: bool = _f(False, "torch.compile the whole model, quantizer included")
    # AE warm-up (Zhao et al. 2026): the first steps train a plain autoencoder, the quantizer bypassed
    ae_warmup_steps: int = _f(0, "steps at the start that train the encoder and decoder alone, the decoder "
                                 "seeing the encoder's output (0: none); then the quantizer joins, initialised as "
                                 "at a run's first step, with a fresh optimizer")
    ae_warmup_frac: float = _f(0.0, "the warm-up as a fraction of the run's total steps, rounded (instead of "
                                    "ae_warmup_steps)")
    ae_warmup_keep_optimizer: bool = _f(False, "keep the optimizer's state at the end of the warm-up (default: "
                                               "a fresh one, as Zhao et al.)")
    # perceptual metrics of the test split (perceptual.py; weights: tools/get_metric_weights.py)
    rfid: Literal["auto", "on", "off"] = _f("auto", "rFID of the reconstructions in the final metrics (auto: on "
                                                   "CUDA; on a 2-core CPU an evaluation takes minutes)")
    rfid_every: int = _f(0, "also compute rFID every N epochs (0: at the end only)")
    lpips: bool = _f(True, "LPIPS (AlexNet) at every validation, where its weights are at hand")
    deterministic: bool = _f(False, "repeatable CUDA runs, bit for bit (deterministic algorithms, cuDNN without "
                                    "autotuning, a fixed cuBLAS workspace; slower); CPU fp32 runs are without it")
    # logging
    log_every: int = _f(0, "steps between train records (0: auto, total steps / 100 within [1, 50])")
    checkpoint_every: int = _f(10, "epochs between checkpoint_epoch{N}.pt files")
    wandb: bool = _f(True, "log to Weights & Biases (offline mode when not logged in)")
    wandb_project: str = _f("vq-codebook", "W&B project")

    def __post_init__(self):
        self.check()

    def check(self):
        check_field_types(self)
        if self.quantizer not in QUANTIZERS:
            near = difflib.get_close_matches(self.quantizer, QUANTIZERS, n=1)
            raise UserError(f"quantizer must be one of {', '.join(sorted(QUANTIZERS))}, got {self.quantizer!r}"
                            + (f" (did you mean '{near[0]}'?)" if near else
                               " (a quantizer defined outside vqvae.py registers when its module is imported: "
                               "--import MODULE, or the config key imports)"))
        checks = [
            (self.codebook_size >= 2, "codebook_size must be >= 2"),
            (self.ba_iters >= 1, "ba_iters must be >= 1"),
            (0 <= self.ba_topk < self.codebook_size, "ba_topk must be >= 0 (0: exact) and below codebook_size"),
            (self.ba_topk == 0 or self.ba_iters == 1, "ba_topk needs ba_iters 1 (the top codes are those of the "
                                                      "one E-step's logits)"),
            (0 <= self.ba_topk_max_drop <= 1, "ba_topk_max_drop must be in [0, 1]"),
            (self.ba_memory_mib >= 1, "ba_memory_mib must be >= 1"),
            (0 < self.decay < 1, "decay must be in (0, 1)"),
            (self.epsilon > 0, "epsilon must be > 0"),
            (self.beta_start > 0, "beta_start must be > 0"),
            (self.beta_end > 0, "beta_end must be > 0"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.kmeans_iters >= 0, "kmeans_iters must be >= 0"),
            (self.chunk_size >= 1, "chunk_size must be >= 1"),
            (self.log_every >= 0, "log_every must be >= 0 (0: auto)"),
            (self.checkpoint_every >= 1, "checkpoint_every must be >= 1"),
            (self.latent_dim is None or self.latent_dim >= 1, "latent_dim must be >= 1"),
            (self.rfid_every >= 0, "rfid_every must be >= 0 (0: at the end only)"),
            (self.ae_warmup_steps >= 0, "ae_warmup_steps must be >= 0 (0: no warm-up)"),
            (0 <= self.ae_warmup_frac < 1, "ae_warmup_frac must be in [0, 1)"),
            (not (self.ae_warmup_steps and self.ae_warmup_frac), "give ae_warmup_steps or ae_warmup_frac, not both"),
        ]
        for name in ("commitment_weight", "codebook_weight", "entropy_weight", "weight_decay",
                     "dead_code_threshold"):
            checks.append((getattr(self, name) >= 0, f"{name} must be >= 0"))
        for f in dataclasses.fields(self):  # the range checks the quantizers' options declare
            if "check" in f.metadata:
                ok, requirement = f.metadata["check"]
                checks.append((ok(getattr(self, f.name)), f"{f.name} must be {requirement}"))
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)
        QUANTIZERS[self.quantizer].check_config(self)

    @property
    def code_dim(self) -> int:
        return self.latent_dim or {"residual": 256, "compact": 64}[self.arch]


def config_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(Config)}


def add_options(quantizer: str, params: type) -> None:
    """Config gains the options a quantizer's Params declares (its fields made with `option`): each becomes a field,
    so a YAML key, a --flag (grouped under the quantizer in --help), a checked value and a checkpoint entry.
    Config is rebuilt in place, so every `from vqvae import Config` sees them. An option another quantizer declared
    the same way (type and default) is shared; any other Params field must name a Config field."""
    hints, known, new = typing.get_type_hints(params), config_fields(), {}
    for f in dataclasses.fields(params):
        old = known.get(f.name)
        if "help" not in f.metadata:
            if old is None:
                raise TypeError(f"{params.__qualname__}.{f.name}: Params fields must be Config fields or options "
                                f"declared with vqvae.option(default, help)")
        elif old is None:
            new[f.name] = field(default=f.default, metadata={**f.metadata, "quantizer": quantizer})
        elif "quantizer" not in old.metadata or (typing.get_type_hints(Config)[f.name], old.default) != (
                hints[f.name], f.default):
            raise TypeError(f"{params.__qualname__}.{f.name}: already a Config field, declared otherwise")
    if new:
        extend_dataclass(Config, new, hints)


def make_config(overrides: dict) -> Config:
    """Config from a dict of overrides, with unknown keys reported by their nearest valid name. The modules named
    by `imports` are imported first, so the quantizers and options they register are known."""
    import_modules(overrides.get("imports", Config.imports))
    known = config_fields()
    for key in overrides:
        if key not in known:
            near = difflib.get_close_matches(key, known, n=1)
            raise UserError(f"unknown config key '{key}'" + (f" (did you mean '{near[0]}'?)" if near else ""))
    return Config(**overrides)


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def resolve_config(config_file: Optional[str], flags: dict) -> Config:
    """Defaults < YAML file < flags. With resume, the run's saved config takes the place of the defaults."""
    values = read_yaml(config_file) if config_file else {}
    values = {**values, **flags}
    cfg = make_config(values)
    if cfg.resume and cfg.name:
        saved_path = Path(cfg.out_dir) / cfg.name / "config.yaml"
        if saved_path.exists():
            cfg = make_config({**read_yaml(saved_path), **values})
    return cfg


# ################################################################################################################
# Data
# ################################################################################################################

def read_cifar_pickles(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Official cifar-10-batches-py layout, read directly (md5 is not checked, so copies and subsets work)."""
    def read(name):
        with open(folder / name, "rb") as fh:
            batch = pickle.load(fh, encoding="latin1")
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise ValueError(f"{name}: data has shape {data.shape}, expected (N, 3072)")
        return data.reshape(-1, 3, 32, 32)

    train_files = sorted(folder.glob("data_batch_*"))
    if not train_files or not (folder / "test_batch").is_file():
        raise UserError(f"{folder} holds no CIFAR-10 batches (data_batch_1..5 and test_batch)")
    try:
        train = np.concatenate([read(f.name) for f in train_files])
        test = read("test_batch")
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as err:
        raise UserError(f"{folder} holds no valid CIFAR-10 batches: {err}") from None
    return train, test


def find_batches_dir(data_dir: Path) -> Optional[Path]:
    for candidate in (data_dir / "cifar-10-batches-py", data_dir):
        if (candidate / "test_batch").exists() or any(candidate.glob("data_batch_*")):
            return candidate
    return None


def load_cifar10(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) uint8 image tensors (N, 3, 32, 32), decoded once."""
    if cfg.dataset == "cifar10-sample":
        with np.load(SAMPLE_PATH) as sample:
            return torch.from_numpy(sample["train"]), torch.from_numpy(sample["test"])
    data_dir = Path(cfg.data_dir)
    folder = find_batches_dir(data_dir)
    if folder is None:
        if data_dir.is_dir() and any(data_dir.iterdir()) and not (data_dir / "cifar-10-python.tar.gz").exists():
            raise UserError(f"{data_dir} exists but holds no CIFAR-10 batches (expected cifar-10-batches-py)")
        folder = download_cifar10(data_dir)
    train, test = read_cifar_pickles(folder)
    return torch.from_numpy(train), torch.from_numpy(test)


class Batches:
    """Cuts batches from a uint8 image tensor kept on the device; normalises there to [-1, 1].

    The order of epoch `i` is a permutation drawn from (seed, i) alone, so a resumed run sees the same batches.
    With `world` ranks, each rank takes its contiguous slice of every global batch.
    """

    def __init__(self, images: torch.Tensor, batch_size: int, device, shuffle: bool, seed: int = 0,
                 rank: int = 0, world: int = 1):
        self.images = images.to(device)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world = rank, world
        n = len(images)
        # training drops the ragged last batch (steady statistics for EMA and the BA marginal); validation keeps it
        self.num_batches = max(n // batch_size, 1) if shuffle else math.ceil(n / batch_size)

    def __len__(self):
        return self.num_batches

    def epoch(self, epoch: int, start: int = 0):
        n = len(self.images)
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(n, generator=gen).to(self.images.device)
        else:
            order = torch.arange(n, device=self.images.device)
        for i in range(start, self.num_batches):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            per_rank = math.ceil(len(idx) / self.world)
            idx = idx[self.rank * per_rank:(self.rank + 1) * per_rank]
            yield self.images[idx].float().div_(127.5).sub_(1.0)


# ################################################################################################################
# Encoder / Decoder
# ################################################################################################################

class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return F.relu(x + self.conv2(F.relu(self.conv1(x))))


def make_encoder(arch: str, dim: int) -> nn.Module:
    """(B, 3, 32, 32) -> (B, dim, 8, 8)."""
    if arch == "residual":  # seed 004
        return nn.Sequential(
            nn.Conv2d(3, 128, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(128, 256, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(256, dim, 3, 1, 1), nn.ReLU(),
            ResidualBlock(dim), ResidualBlock(dim))
    return nn.Sequential(  # compact, seed 000 appendix; the last 1x1 conv is the pre-quant projection
        nn.Conv2d(3, 64, 4, 2, 1), nn.ReLU(),
        nn.Conv2d(64, 128, 4, 2, 1), nn.ReLU(),
        nn.Conv2d(128, dim, 1))


def make_decoder(arch: str, dim: int) -> nn.Module:
    """(B, dim, 8, 8) -> (B, 3, 32, 32), no output activation."""
    if arch == "residual":
        return nn.Sequential(
            ResidualBlock(dim), ResidualBlock(dim),
            nn.Conv2d(dim, 256, 3, 1, 1), nn.ReLU(),
            nn.ConvTranspose2d(256, 128, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(128, 3, 4, 2, 1))
    return nn.Sequential(
        nn.Conv2d(dim, 64, 1),  # post-quant projection
        nn.ConvTranspose2d(64, 64, 4, 2, 1), nn.ReLU(),
        nn.ConvTranspose2d(64, 3, 4, 2, 1))


# ################################################################################################################
# Quantizers
# ################################################################################################################
# The contract. A quantizer is an nn.Module that maps encoder features to quantized features:
#
#   forward(z (B, D, H, W)) -> (z_q (B, D, H, W), losses, metrics)
#     losses   {name: scalar tensor}, already weighted. The trainer adds every term to the reconstruction loss and
#              logs each under its own name: train/<name> (steps), train_epoch/<name> (epoch means), val/<name>.
#     metrics  {"code_indices": (B, H, W) long, the code of every latent, plus any scalar tensors} logged per step
#              as train/<name> (batch perplexity, usage, beta ...). In eval mode a latent's code depends on that
#              latent alone (never on the batch around it), and z_q is codes(code_indices): the deployed model.
#   schedule(progress)  called before every training step with progress in [0, 1] over the run (annealing).
#   report()            {name: float} that validation adds to its record (e.g. the current beta).
#   codes(idx)          the vectors (..., D) that code indices stand for.
#   code_vectors()      all K of them (K, D), whose spectrum validation reports (codebook_dim99); codes(arange(K))
#                       by default, None for a method whose codes are not K vectors.
#   diagnostic_inputs(e)  {name: (N, D)} other decoder inputs for the eval-mode latents e that validation scores
#                       as val/<name>_psnr beside the hard codes' (BA: its soft mixture, val/soft_psnr). {} by
#                       default.
#   param_groups()      optimizer groups of the quantizer's own parameters, e.g. a codebook with its own learning
#                       rate: [{"params": [...], "lr": ..., "betas": ..., "weight_decay": ..., "max_grad_norm": ...}]
#                       (AdamW's keys, plus the norm its gradient is clipped to). Every other parameter trains with
#                       the autoencoder's AdamW settings. None by default.
#   K                   the number of codes.
#
# `forward` is written once, here: flatten to e (N, D) in float32, `quantize(e)` (each method's own part: its codes,
# loss terms, statistics and updates), then `decoder_input(e, z_q)`, the gradient's way back to e (straight-through
# or the rotation trick by default). A method writes `quantize` and, if it needs them, the hooks above.
#
# First-batch initialisation (k-means, dbar, ...) happens in a quantizer's first training forward, not at
# construction. An AE warm-up (Config.ae_warmup_steps) relies on that: while it lasts, VQVAE bypasses the quantizer
# (never called, scheduled or stepped), so at the switch the quantizer is as constructed and its first training
# forward, on the warm encoder's outputs, initialises it as it would at step 0. A method needs no code for it.
#
# Hyperparameters: each class names those it reads in a `Params` dataclass: Config fields it shares (no default), and
# options of its own, declared with `option(default, help, check)`, which registering adds to the Config (flags,
# YAML keys, checks, checkpoints); make_quantizer(cfg, dim) fills them, so a quantizer never sees the rest of the
# Config. A new method: subclass Quantizer, then `@register_quantizer("name")`. The name becomes a valid
# `--quantizer`. baselines.py registers the published baselines (SimVQ, FSQ, Wasserstein VQ, CVQ) this way, from
# outside, options included; a user's module does the same (`--import MODULE`; README, "How to add a quantizer").

QUANTIZERS: dict[str, type["Quantizer"]] = {}


def register_quantizer(name: str) -> Callable[[type], type]:
    """Class decorator: adds the quantizer to QUANTIZERS under `name` (the --quantizer value), and the options its
    Params declares to the Config."""
    def add(cls):
        add_options(name, cls.Params)
        QUANTIZERS[name] = cls
        cls.name = name
        return cls
    return add


def make_quantizer(cfg: Config, dim: int) -> "Quantizer":
    """The registered quantizer cfg.quantizer, built with the Config values its Params name."""
    cls = QUANTIZERS[cfg.quantizer]
    return cls(cls.Params(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls.Params)}), dim)


class Quantized(typing.NamedTuple):
    """What `Quantizer.quantize(e)` returns for N latents."""
    z_q: torch.Tensor  # (N, D) the quantized vectors, before decoder_input gives them a gradient path to e
    idx: torch.Tensor  # (N,) long, the code of every latent
    losses: dict  # {name: weighted scalar loss term}
    metrics: dict  # {name: scalar tensor}


class Quantizer(nn.Module):
    """Base of every quantizer: see the contract above."""

    @dataclass
    class Params:
        codebook_size: int

    name: ClassVar[str] = ""

    def __init__(self, params: "Quantizer.Params", dim: int):
        super().__init__()
        self.hp, self.K, self.dim = params, params.codebook_size, dim

    def forward(self, z: torch.Tensor):
        # distances and statistics in float32, whatever the nets run in
        with torch.autocast(z.device.type, enabled=False):
            e = self._flatten(z)  # (N, D)
            q = self.quantize(e)
            out = self.decoder_input(e, q.z_q)
            stats = codebook_stats(code_counts(q.idx, self.K))  # the batch's perplexity and usage
            metrics = {"code_indices": q.idx.reshape(z.shape[0], z.shape[2], z.shape[3]),
                       "perplexity": stats["perplexity"], "usage_rate": stats["usage_rate"], **q.metrics}
        return self._unflatten(out, z).to(z.dtype), q.losses, metrics

    def quantize(self, e: torch.Tensor) -> Quantized:
        """The method: codes, loss terms and metrics of the latents e (N, D); in training, its updates too."""
        raise NotImplementedError

    def decoder_input(self, e: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
        """What the decoder sees: z_q's value with a gradient to e (Params.estimator, straight-through if none)."""
        return straight_through(e, z_q, getattr(self.hp, "estimator", "ste"))

    def schedule(self, progress: float) -> None:
        """Set annealed hyperparameters for a training step at `progress` in [0, 1]; none by default."""

    def report(self) -> dict[str, float]:
        return {}

    def codes(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows of the quantizer's (K, D) `codebook` (a parameter, buffer or property); a method without one
        overrides this."""
        return self.codebook[idx]

    def code_vectors(self) -> Optional[torch.Tensor]:
        """All K code vectors (K, D): the codebook, or the points a codebook-free method's codes stand for."""
        device = next(itertools.chain(self.parameters(), self.buffers())).device
        return self.codes(torch.arange(self.K, device=device))

    def diagnostic_inputs(self, e: torch.Tensor) -> dict[str, torch.Tensor]:
        """{name: (N, D)}: decoder inputs other than the hard codes that validation scores for the latents e (N, D),
        in eval mode, as val/<name>_psnr. None ({}) by default."""
        return {}

    def param_groups(self) -> list[dict]:
        return []

    @classmethod
    def check_config(cls, cfg: "Config") -> None:
        """Raise UserError for values of this quantizer's Params that the Config's own checks cannot judge."""

    @classmethod
    def upgrade_config(cls, config: dict) -> dict:
        """A checkpoint's saved config, written before some Params field existed, made to mean what it meant then."""
        return config

    # -- shapes -------------------------------------------------------------------------------------------------
    @staticmethod
    def _flatten(z: torch.Tensor) -> torch.Tensor:
        return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float()  # (B, D, H, W) -> (N, D), float32

    @staticmethod
    def _unflatten(v: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        B, D, H, W = z.shape
        return v.reshape(B, H, W, D).permute(0, 3, 1, 2)


def vq_losses(e: torch.Tensor, z_q: torch.Tensor, commitment_weight: float,
              codebook_weight: Optional[float] = None) -> dict:
    """The VQ-VAE loss terms (van den Oord et al. 2017, eq. 3): commitment_weight ||e - sg(z_q)||^2 pulls the encoder
    to its codes; codebook_weight ||z_q - sg(e)||^2 pulls the codes to the encoder (left out when None: an EMA
    codebook moves by its statistics instead). Means over the N x D entries."""
    losses = {"commitment_loss": commitment_weight * F.mse_loss(e, z_q.detach())}
    if codebook_weight is not None:
        losses["codebook_loss"] = codebook_weight * F.mse_loss(z_q, e.detach())
    return losses


# -- estimators: how the encoder's gradient crosses the discrete choice ------------------------------------------

def straight_through(e: torch.Tensor, z_q: torch.Tensor, estimator: str) -> torch.Tensor:
    """Decoder input whose value is z_q and whose gradient reaches the encoder output e."""
    if estimator == "rotation":
        return rotate_to(e, z_q)
    return e + (z_q - e).detach()  # straight-through estimator


def rotate_to(e: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
    """Rotation trick (Fifty et al. 2024): returns z_q in the forward pass, while the gradient reaching e is
    the incoming gradient rotated and scaled by the map taking e to z_q, held fixed (stop-gradient).

    R = I - 2 r r^T + 2 q_hat e_hat^T with r = (e_hat + q_hat)/||e_hat + q_hat||; lambda = ||z_q|| / ||e||.
    Applied as vector operations, so no (D, D) matrix is formed.
    """
    tiny = torch.finfo(e.dtype).tiny ** 0.5
    e_norm = e.norm(dim=1, keepdim=True).clamp_min(tiny)
    q_norm = z_q.norm(dim=1, keepdim=True).clamp_min(tiny)
    e_hat, q_hat = (e / e_norm).detach(), (z_q / q_norm).detach()
    r = e_hat + q_hat
    r = r / r.norm(dim=1, keepdim=True).clamp_min(tiny)
    rotated = e - 2 * (e * r).sum(1, keepdim=True) * r + 2 * (e * e_hat).sum(1, keepdim=True) * q_hat
    return (q_norm / e_norm).detach() * rotated


# -- codebooks: storage, k-means initialisation, EMA statistics, dead-code restarts ------------------------------

class CodebookQuantizer(Quantizer):
    """Shared machinery of quantizers with a (K, D) codebook: k-means init on the first training batch, EMA
    statistics, dead-code restarts.

    Names: ema_count is the EMA cluster size N_k of van den Oord et al. (soft for BA), ema_sum the EMA of the sums
    of the vectors assigned to each code (EMA codebooks only); a code's hard count, the EMA of how many vectors
    had it as their code per step, by which a code is judged dead, is ema_count itself for VQ-EMA (BA keeps its
    own, use_count), and each quantizer hands it to _restart_dead. Invariant kept by every update:
    codebook == ema_sum / smoothed(ema_count) for EMA codebooks. The EMA starts from one pseudo-count per code at the
    initial codebook, so it holds from the first step even without k-means (an unused code then keeps its place
    instead of collapsing to the origin).
    """

    @dataclass
    class Params(Quantizer.Params):
        decay: float
        epsilon: float
        kmeans_init: bool
        kmeans_iters: int
        dead_code_threshold: float
        chunk_size: int

    def __init__(self, params: "CodebookQuantizer.Params", dim: int, learnable: bool):
        super().__init__(params, dim)
        init = torch.empty(self.K, dim).uniform_(-1.0 / self.K, 1.0 / self.K)
        self.ema_codebook = not learnable
        if learnable:
            self.codebook = nn.Parameter(init)
        else:
            self.register_buffer("codebook", init)
        self.register_buffer("ema_count", torch.ones(self.K))
        if self.ema_codebook:
            self.register_buffer("ema_sum", torch.zeros_like(init))
            self._resync_sums()
        else:  # older versions saved ema_sum for learned codebooks too, which never read it
            self._register_load_state_dict_pre_hook(drop_state_keys("ema_sum"))
        # the first training batch's initialisation (k-means, ...) is done; a host copy spares a step the sync
        self.register_buffer("initialized", torch.tensor(False))
        self._initialized = None
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "_initialized", None))

    def needs_init(self) -> bool:
        if self._initialized is None:
            self._initialized = bool(self.initialized)
        return self.training and not self._initialized

    @torch.no_grad()
    def first_step(self, e: torch.Tensor):
        """What the first training batch initialises: the codes by k-means (kmeans_init)."""
        if self.hp.kmeans_init:
            self._kmeans_init(e)
        self.initialized.fill_(True)
        self._initialized = True

    def _smoothed(self, count: torch.Tensor) -> torch.Tensor:
        n = count.sum()
        return (count + self.hp.epsilon) / (n + self.K * self.hp.epsilon) * n

    @torch.no_grad()
    def _resync_sums(self):
        if self.ema_codebook:
            self.ema_sum.copy_(self.codebook * self._smoothed(self.ema_count)[:, None])

    @torch.no_grad()
    def _ema_update(self, counts: torch.Tensor, sums: Optional[torch.Tensor]):
        """EMA of cluster sizes and (EMA codebooks) sums, summed over ranks first; codes <- sums / smoothed sizes."""
        decay = self.hp.decay
        self.ema_count.mul_(decay).add_(dist_sum_(counts), alpha=1 - decay)
        if self.ema_codebook:
            self.ema_sum.mul_(decay).add_(dist_sum_(sums), alpha=1 - decay)
            self.codebook.copy_(self.ema_sum / self._smoothed(self.ema_count)[:, None])

    @torch.no_grad()
    def _kmeans_init(self, e: torch.Tensor):
        """Codes from k-means on this (training) batch, gathered from all ranks; EMA buffers made consistent."""
        e = gather_rows(e)
        gen = torch.Generator().manual_seed(int(torch.randint(2 ** 31 - 1, (1,)).item()))
        C, counts = kmeans(e, self.K, self.hp.kmeans_iters, self.hp.chunk_size, gen)
        self.codebook.data.copy_(broadcast(C))
        self.ema_count.copy_(broadcast(counts))  # of the gathered batch: the scale of rank-summed EMA counts
        self._resync_sums()

    @torch.no_grad()
    def _restart_dead(self, e: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
        """Re-seed codes whose hard count (`hard`, (K,), a buffer) fell below dead_code_threshold from random encoder
        vectors of this batch, their counts set to the threshold (alive until they decay unused). A random row is
        drawn for every code and kept for the dead ones, so the step needs no host sync to count them. Returns how
        many restarted."""
        threshold = self.hp.dead_code_threshold
        dead = hard < threshold  # (K,)
        self.codebook.data.copy_(torch.where(dead[:, None], random_rows(e, self.K), self.codebook))
        self.ema_count.masked_fill_(dead, threshold)
        hard.masked_fill_(dead, threshold)
        if self.ema_codebook:  # every code's smoothed size moved with the total: all sums, when any code restarted
            resynced = self.codebook * self._smoothed(self.ema_count)[:, None]
            self.ema_sum.copy_(torch.where(dead.any(), resynced, self.ema_sum))
        return dead.sum()


def drop_state_keys(*names: str):
    """A load_state_dict pre-hook dropping buffers older checkpoints hold and a module no longer has."""
    def hook(state, prefix, *args):
        for name in names:
            state.pop(prefix + name, None)
    return hook


def kmeans(e: torch.Tensor, K: int, iters: int, chunk: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means++ seeding then Lloyd iterations. Returns (centroids (K, D), cluster sizes (K,))."""
    C = _kmeanspp_seed(e, K, gen)
    for _ in range(iters):
        idx = nearest_code(e, C, chunk)
        counts = code_counts(idx, K, e.dtype)
        sums = scatter_sum(idx, e, K)
        filled = counts > 0  # an empty cluster keeps its centre
        C = torch.where(filled[:, None], sums / counts.clamp_min(1)[:, None], C)
    return C, code_counts(nearest_code(e, C, chunk), K, e.dtype)


KMEANSPP_MAX_K = 4096  # sequential seeding costs K passes over N; beyond this, seed from distinct random samples


def _kmeanspp_seed(e: torch.Tensor, K: int, gen: torch.Generator) -> torch.Tensor:
    N = len(e)
    if K > N or K > KMEANSPP_MAX_K:
        idx = torch.randperm(N, generator=gen)[:K] if K <= N else torch.randint(N, (K,), generator=gen)
        C = e[idx.to(e.device)].clone()
        if K > N:  # more codes than vectors: jitter the repeats so codes are distinct
            C += 1e-3 * e.std() * torch.randn(C.shape, generator=gen).to(e.device)
        return C
    first = torch.randint(N, (1,), generator=gen).item()
    C = [e[first]]
    d_min = ((e - e[first]) ** 2).sum(1)
    for _ in range(1, K):
        probs = (d_min / d_min.sum()).cpu() if d_min.sum() > 0 else torch.full((N,), 1.0 / N)
        nxt = torch.multinomial(probs, 1, generator=gen).item()
        C.append(e[nxt])
        d_min = torch.minimum(d_min, ((e - e[nxt]) ** 2).sum(1))
    return torch.stack(C)


# -- VQ-EMA ------------------------------------------------------------------------------------------------------

@register_quantizer("vq_ema")
class VQEMAQuantizer(CodebookQuantizer):
    """Hard nearest-code quantizer with an EMA codebook (van den Oord et al. 2017, appendix A.1).

    Gradient to the encoder by the straight-through estimator (or the rotation trick when estimator='rotation');
    loss = commitment_weight * ||e - sg(z_q)||^2.
    """

    @dataclass
    class Params(CodebookQuantizer.Params):
        commitment_weight: float
        estimator: str

    def __init__(self, params: "VQEMAQuantizer.Params", dim: int):
        super().__init__(params, dim, learnable=False)

    def quantize(self, e: torch.Tensor) -> Quantized:
        hp = self.hp
        if self.needs_init():
            self.first_step(e.detach())
        with torch.no_grad():
            idx = nearest_code(e, self.codebook, hp.chunk_size)  # (N,)
            z_q = self.codebook[idx]  # (N, D), looked up before this step's EMA update
            metrics = {}
            if self.training:
                self._ema_update(code_counts(idx, self.K, e.dtype), scatter_sum(idx, e, self.K))
                if hp.dead_code_threshold > 0:
                    metrics["restarts"] = self._restart_dead(e, self.ema_count)  # its cluster sizes are hard counts
        return Quantized(z_q, idx, vq_losses(e, z_q, hp.commitment_weight), metrics)


# -- Blahut-Arimoto ----------------------------------------------------------------------------------------------
# The method: `ba_assign_direct`, the E-M pass written plainly, is its specification. One training step of `ba_vq`:
# BAQuantizer.quantize sets beta, runs that pass as `ba_assign` (ba_kernels.py: the same pass in blocks of rows
# within a memory budget, with a hand-written backward, tested against the specification), then forms the losses
# and updates the EMA codebook, dbar and the running marginal.

def ba_assign_direct(e, C, log_Q0, beta, iters: int, chunk=None, want_sums: bool = False, want_z: bool = True,
                     memory=None) -> BAResult:
    """The E-M pass written plainly with an (N, K) distance matrix; autograd does the backward. The specification
    of `ba_assign` (same arguments, chunk and memory unused) and its reference in tests and bench.py:

        p_t(k|e_n) = softmax_k(log Q_{t-1}(k) - beta ||e_n - c_k||^2),   log Q_t = log mean_n p_t(.|e_n),  t = 1..T
    """
    d = (e * e).sum(1, keepdim=True) - 2 * e @ C.t() + (C * C).sum(1)  # (N, K)
    log_Q = log_Q0
    for _ in range(iters):
        log_p = torch.log_softmax(log_Q - beta * d, dim=1)  # (N, K)
        log_Q = torch.logsumexp(log_p, dim=0) - math.log(len(e))  # (K,)
    p = log_p.exp()
    return BAResult(p @ C if want_z else e.new_empty(0, C.shape[1]), log_Q, log_p.argmax(1), log_Q.exp() * len(e),
                    p.t() @ e if want_sums else None, -(p * log_p).sum(1).mean(), p.amax(1).mean(), p)


def entropy_from_log(log_Q: torch.Tensor) -> torch.Tensor:
    """H(Q) in nats from log Q; finite even where Q underflows to 0."""
    return -(log_Q.exp() * log_Q).sum()


@register_quantizer("ba_vq")
class BAQuantizer(CodebookQuantizer):
    """Blahut-Arimoto quantizer (rate-distortion view of VQ; Blahut 1972, Arimoto 1972).

    E-step p(k|e) ∝ Q(k) exp(-beta d(e, c_k)), M-step Q(k) = mean_n p(k|e_n), `ba_iters` times per forward, Q
    starting uniform (marginal='batch') or from a running EMA of batch marginals (marginal='running'). The soft
    p drives the EMA codebook (soft counts and sums) and the usage term; four options decide the rest:

    ba_forward   'hard': the decoder sees the code argmax_k p(k|e), the encoder's gradient crossing it by the
                 straight-through estimator (or rotation): a discrete bottleneck in training as at evaluation.
                 'soft' (seeds): z_q = sum_k p(k|e) c_k, a smooth function of e; evaluation then scores hard
                 codes the decoder never saw in training.
    usage_term   'mutual_info': -(H(Q) - E_n H(p(.|e_n))) = -I(code; e) under the batch: a diverse marginal AND
                 confident assignments. 'entropy' (seeds): -H(Q), which a blurred p satisfies as well as a
                 sharp one (uniform p over all codes gives the maximum).
    beta_units   'relative': d = ||e - c||^2 / dbar, dbar a stop-gradient running mean of the squared distance to
                 the assigned code. beta is then unit-free (a latent's nearest code sits at d ~ 1, and beta = 20
                 means a code twice as far as typical is e^-20 less likely), so one schedule means the same for
                 every arch, D, K and moment of training, and scaling latents and codes by a constant leaves p
                 unchanged. (The alternative, beta in multiples of the critical beta_c = 1/(2 lambda_max) of
                 deterministic annealing (Rose 1998), fixes only the first phase transition, not the sharpness at
                 the end, and needs the latents' top eigenvalue every step.) 'absolute' (seeds): d = ||e - c||^2.
    eval_codes   the code of a latent at evaluation, from that latent alone: 'running' = argmax_k log Q_run(k)
                 - beta d(e, c_k), the MAP code under the running marginal (the training rule with the batch Q
                 replaced by its running mean); 'nearest' = argmin_k ||e - c_k||^2; 'auto' = the rule that equals
                 training's: with marginal='batch' and ba_iters=1 the training prior is uniform, so training's
                 code IS the nearest code, and MAP under Q_run (which favours frequent codes by log Q / beta)
                 would score codes training did not pick; otherwise 'running'. 'batch' (seeds) =
                 argmax of p under the evaluated batch's own Q, so a code depends on the images around it.
    Losses: commitment_weight ||e - sg(z_q)||^2 + codebook_weight ||z_q - sg(e)||^2 + entropy_weight * usage term.
    beta follows a cosine schedule from beta_start to beta_end over the run (`schedule`); it stays on the device,
    as does dbar, so a step reads nothing back from it but whether some Q underflowed (`ba_kernels._log_colsum`).
    The seeds' method is registered as `ba_seed` (soft, entropy, absolute, batch), whatever these options say.
    """
    TOPK_PROBE_STRIDE = 8  # training measures the top-k dropped mass on every 8th latent: 1/8 of a GEMM
    assign = staticmethod(ba_assign)  # the E-M pass; bench.py swaps in ba_assign_direct on an instance

    @dataclass
    class Params(CodebookQuantizer.Params):
        commitment_weight: float
        codebook_weight: float
        entropy_weight: float
        beta_start: float
        beta_end: float
        ba_iters: int
        ba_topk: int
        ba_topk_max_drop: float
        ba_memory_mib: int
        codebook_update: str
        marginal: str
        estimator: str
        ba_forward: str
        usage_term: str
        beta_units: str
        eval_codes: str

    def __init__(self, params: "BAQuantizer.Params", dim: int):
        super().__init__(params, dim, learnable=params.codebook_update == "grad")
        self.register_buffer("beta", torch.tensor(params.beta_start))
        self.register_buffer("log_Q_running", torch.full((self.K,), -math.log(self.K)))
        self.register_buffer("d_mean", torch.zeros(()))  # dbar, running mean ||e - c_code||^2 (relative beta)
        # EMA of HARD code counts: the soft counts in ema_count keep a code that is never anyone's code alive on
        # the mass it gets as a runner-up (all codes, while beta is small), so restarts judge by these instead
        self.register_buffer("use_count", torch.ones(self.K))
        self._register_load_state_dict_pre_hook(self._fill_use_count)
        hp = params
        # eval_codes 'auto' resolved: the nearest code when training's prior is uniform, else MAP under Q_run
        self.eval_rule = (hp.eval_codes if hp.eval_codes != "auto" else
                          "nearest" if hp.marginal == "batch" and hp.ba_iters == 1 else "running")
        self._dropped_seen = plumbing.LatestOnHost()  # the top-k decision reads the dropped mass without waiting

    @staticmethod
    def _fill_use_count(state, prefix, *args):
        """Checkpoints from before use_count existed: start it from the (soft) EMA cluster sizes."""
        if prefix + "use_count" not in state and prefix + "ema_count" in state:
            state[prefix + "use_count"] = state[prefix + "ema_count"].clone()

    def schedule(self, progress: float):
        """Cosine schedule from beta_start (progress 0) to beta_end (progress 1); a device fill, no host sync."""
        hp = self.hp
        self.beta.fill_(hp.beta_start + (hp.beta_end - hp.beta_start) * (1 - math.cos(math.pi * progress)) / 2)

    def set_beta(self, beta: float):
        self.beta.fill_(beta)

    def report(self) -> dict[str, float]:
        return {"beta": float(self.beta)}

    @torch.no_grad()
    def first_step(self, e: torch.Tensor):
        """k-means (as every codebook), the hard counts from its cluster sizes, and dbar's first value."""
        super().first_step(e)
        if self.hp.kmeans_init:
            self.use_count.copy_(self.ema_count)  # k-means cluster sizes are hard counts
        if self.hp.beta_units == "relative":  # dbar from this batch's nearest codes
            codes, rows = self.codebook, e
            if self.K >= len(e) * world_size() and len(e) >= 2:
                # k-means put a code on (next to) every latent of this batch, so its distances are ~0 and beta / dbar
                # would overflow the gradients; half the batch's latents stand in as codes for the other half
                codes, rows = e[1::2], e[::2]
            idx = nearest_code(rows, codes, self.hp.chunk_size)
            self.d_mean.copy_(dist_sum_((rows - codes[idx]).square().sum(1).mean()) / world_size())

    def _prior_and_beta(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(log Q0 (K,), beta in units of squared latent distance) for a forward, on the device: Q0 uniform or the
        running marginal; beta (absolute) or beta / dbar (relative)."""
        hp = self.hp
        beta = self.beta if hp.beta_units == "absolute" else self.beta / self.d_mean.clamp_min(1e-30)
        # a copy: the running marginal is updated in place after this forward, backward needs what it saw
        log_Q0 = (self.log_Q_running.clone() if hp.marginal == "running"
                  else torch.full_like(self.log_Q_running, -math.log(self.K)))
        return log_Q0, beta

    def quantize(self, e: torch.Tensor) -> Quantized:
        hp = self.hp
        if self.needs_init():
            self.first_step(e.detach())
        log_Q0, beta = self._prior_and_beta()
        ema = self.training and self.ema_codebook
        # an EMA codebook is updated in place after this forward; backward needs the values it saw
        C = self.codebook.clone() if ema else self.codebook
        hard = hp.ba_forward == "hard" or not self.training  # evaluation reports the discrete model
        ba, topk_metrics = self._assign(e, C, log_Q0, beta, ema, hard)
        idx = ba.idx if self.training else self._eval_codes(e.detach(), ba.idx, beta)
        z_q = self.codebook[idx] if hard else ba.z_soft  # (N, D)
        H_Q = entropy_from_log(ba.log_Q)
        losses = vq_losses(e, z_q, hp.commitment_weight, hp.codebook_weight)
        if hp.usage_term == "entropy":
            losses["entropy_loss"] = -hp.entropy_weight * H_Q
        else:
            losses["mutual_info_loss"] = -hp.entropy_weight * (H_Q - ba.H_p)
        metrics = {"beta": self.beta.clone(), "max_p": ba.max_p, "H_p": ba.H_p.detach(), "H_Q": H_Q.detach(),
                   "mutual_info": (H_Q - ba.H_p).detach(), **topk_metrics}
        if self.training:
            self._update(ba, e.detach())
            if hp.dead_code_threshold > 0:
                metrics["restarts"] = self._restart_dead(e.detach(), self.use_count)
        return Quantized(z_q, idx, losses, metrics)

    def _assign(self, e, C, log_Q0, beta, ema: bool, hard: bool) -> tuple[BAResult, dict]:
        """The E-M pass and the top-k metrics. With ba_topk, training first measures the mass the truncation would
        drop, exactly, on every TOPK_PROBE_STRIDE-th latent (`topk_dropped`); the step then runs truncated when
        that is within ba_topk_max_drop, else exact (`topk_exact` = 1). Evaluation always runs exact and measures
        the dropped mass on every latent."""
        hp = self.hp
        want_z = not hard  # the soft mixture z_soft: what a soft decoder sees
        metrics = {}
        if hp.ba_topk:
            rows = e.detach()[::self.TOPK_PROBE_STRIDE] if self.training else e.detach()
            dropped = topk_dropped_mass(rows, C.detach(), log_Q0, beta, hp.ba_topk, hp.chunk_size)
            if world_size() > 1:  # the mean over all ranks' rows (a ragged validation batch splits unevenly)
                n = dist_sum_(torch.full((), float(len(rows)), device=e.device))
                dropped = dist_sum_(dropped * len(rows)) / n.clamp_min(1)  # every rank then takes one branch
            metrics["topk_dropped"] = dropped
            if self.training:
                truncate = self._dropped_seen(dropped) <= hp.ba_topk_max_drop  # a step or so old on one GPU
                # fills, not torch.tensor(..., device), whose copy to a GPU waits for it
                metrics["topk_exact"] = torch.full((), 0.0 if truncate else 1.0, device=e.device)
                if truncate:
                    return ba_assign_topk(e, C, log_Q0, beta, hp.ba_topk, hp.chunk_size, want_sums=ema,
                                          want_z=want_z), metrics
        return self.assign(e, C, log_Q0, beta, hp.ba_iters, hp.chunk_size, want_sums=ema, want_z=want_z,
                           memory=hp.ba_memory_mib << 20), metrics

    @torch.no_grad()
    def diagnostic_inputs(self, e: torch.Tensor) -> dict[str, torch.Tensor]:
        """The soft mixture sum_k p(k|e) c_k of the exact E-M pass, scored as val/soft_psnr: what a soft decoder
        (ba_forward 'soft') sees in training, a diagnostic beside the hard codes that evaluation reports."""
        log_Q0, beta = self._prior_and_beta()
        return {"soft": self.assign(e, self.codebook, log_Q0, beta, self.hp.ba_iters, self.hp.chunk_size,
                                       memory=self.hp.ba_memory_mib << 20).z_soft}

    @torch.no_grad()
    def _eval_codes(self, e: torch.Tensor, batch_map: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        if self.eval_rule == "batch":
            return batch_map
        if self.eval_rule == "nearest":
            return nearest_code(e, self.codebook, self.hp.chunk_size)
        # argmax_k log Q_run,k - beta ||e - c_k||^2 = argmax_k 2 e.c_k - ||c_k||^2 + log Q_run,k / beta
        return nearest_code(e, self.codebook, self.hp.chunk_size, bias=self.log_Q_running / beta)

    @torch.no_grad()
    def _update(self, ba: BAResult, e: torch.Tensor):
        """dbar and Q_run from the codebook this forward used (before the EMA step moves it), the EMA statistics
        from the soft counts and sums, and the hard counts."""
        hp, decay = self.hp, self.hp.decay
        if hp.beta_units == "relative":
            d_batch = dist_sum_((e - self.codebook[ba.idx]).square().sum(1).mean()) / world_size()
            self.d_mean.mul_(decay).add_(d_batch, alpha=1 - decay)
        self._ema_update(ba.counts, ba.sums)
        self.use_count.mul_(decay).add_(dist_sum_(code_counts(ba.idx, self.K, e.dtype)), alpha=1 - decay)
        if hp.marginal == "running" or self.eval_rule == "running":  # Q_run <- d Q_run + (1 - d) Q_batch, in logs
            self.log_Q_running.copy_(torch.logaddexp(self.log_Q_running + math.log(decay),
                                                     ba.log_Q.detach() + math.log(1 - decay)))


@register_quantizer("ba_seed")
class BASeedQuantizer(BAQuantizer):
    """The seeds' Blahut-Arimoto method, kept exactly: soft forward, -H(Q), beta in squared latent units,
    evaluation codes from the evaluated batch's own Q, and no dead-code restarts (tests/test_ba_modes.py holds its
    outputs from before the options existed). Only these differ from `ba_vq`; every other hyperparameter (beta
    schedule, ba_iters, weights) is shared, so the seeds' runs give theirs (sweeps/seed_ablation.yaml)."""
    SEED_OPTIONS = {"ba_forward": "soft", "usage_term": "entropy", "beta_units": "absolute", "eval_codes": "batch",
                    "dead_code_threshold": 0.0, "ba_topk": 0}

    def __init__(self, params: "BAQuantizer.Params", dim: int):
        super().__init__(dataclasses.replace(params, **self.SEED_OPTIONS), dim)


# ################################################################################################################
# Model
# ################################################################################################################

class VQVAE(nn.Module):
    """Encoder -> quantizer -> decoder. forward(x) -> (x_hat, recon_loss, quant_loss_dict, metrics).

    Build from a Config, or with Config fields as keywords: VQVAE(quantizer='ba_vq', codebook_size=512).
    `phase` "ae" makes it the continuous autoencoder of an AE warm-up (Zhao et al. 2026, "Continuous First,
    Discrete Later", arXiv:2605.06870): the decoder sees e itself, the quantizer is not called (no losses, no
    metrics, no updates). The Trainer sets it from the step; a checkpoint records it.
    """

    def __init__(self, cfg: Optional[Config] = None, **overrides):
        super().__init__()
        cfg = cfg or Config()
        if overrides:  # checked once, as a Config
            cfg = make_config({**config_to_dict(cfg), **overrides})
        self.cfg = cfg
        self.encoder = make_encoder(cfg.arch, cfg.code_dim)
        self.quantizer = make_quantizer(cfg, cfg.code_dim)
        self.decoder = make_decoder(cfg.arch, cfg.code_dim)
        self.phase: Literal["ae", "vq"] = "vq"

    def forward(self, x: torch.Tensor):
        e = self.encoder(x)  # (B, D, 8, 8)
        z_q, quant_losses, metrics = self.quantize(e)
        x_hat = self.decoder(z_q)  # (B, 3, 32, 32)
        recon_loss = F.mse_loss(x_hat.float(), x.float())
        return x_hat, recon_loss, quant_losses, metrics

    def quantize(self, e: torch.Tensor):
        """The quantizer's (z_q, losses, metrics) of encoder outputs e; in an AE warm-up (e, {}, {}): bypassed."""
        return (e, {}, {}) if self.phase == "ae" else self.quantizer(e)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)[0]


def load_checkpoint(path: str | Path, device="cpu") -> tuple[VQVAE, dict]:
    """Rebuild the model from a checkpoint alone (final_model.pt, last.pt or checkpoint_epoch{N}.pt)."""
    state = checkpoint.read_checkpoint(path)
    model = VQVAE(make_config(state["config"]))
    model.load_state_dict(state["model"])
    model.phase = state.get("phase", "vq")  # a checkpoint from an AE warm-up is the autoencoder
    return model.to(device).eval(), state


# ################################################################################################################
# Metrics (pure functions of tensors)
# ################################################################################################################

def psnr_from_mse(mse: float, data_range: float = 2.0) -> float:
    """PSNR in dB for images whose values span `data_range` (2 for [-1, 1], 1 for [0, 1]).

    An MSE on [-1, 1] images equals 4x the MSE on the [0, 1] pixel scale; with data_range=2 the result is the
    PSNR on the [0, 1] scale. The seed's formula (peak 1 on [-1, 1]) reads 20 log10(2) = 6.02 dB lower.
    """
    return 10.0 * math.log10(data_range ** 2 / mse) if mse > 0 else math.inf


def clamped_mse(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """MSE of x_hat clamped to the image range [-1, 1], as a deployed model's output would be displayed."""
    return F.mse_loss(x_hat.float().clamp(-1, 1), x.float())


def psnr(x: torch.Tensor, x_hat: torch.Tensor, data_range: float = 2.0) -> float:
    """PSNR of x_hat clamped to the image range [-1, 1]."""
    return psnr_from_mse(clamped_mse(x, x_hat).item(), data_range)


def psnr_per_image(x: torch.Tensor, x_hat: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """PSNR of each image (B,) in dB, output clamped to [-1, 1]; an exact copy reads 100 dB (MSE floored at 1e-10
    of the range squared). Its mean weights every image alike, where `psnr` pools the squared error first."""
    mse = (x_hat.float().clamp(-1, 1) - x.float()).square().flatten(1).mean(1)
    return 10.0 * torch.log10(data_range ** 2 / mse.clamp_min(1e-10 * data_range ** 2))


def image_scores(x: torch.Tensor, x_hat: torch.Tensor) -> dict[str, torch.Tensor]:
    """A batch's means that validation pools over the set: clamped_mse (-> psnr), psnr_per_image and ssim."""
    return {"clamped_mse": clamped_mse(x, x_hat), "psnr_per_image": psnr_per_image(x, x_hat).mean(),
            "ssim": perceptual.ssim(x, x_hat).mean()}


def quant_distortion(e: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
    """Mean squared distance ||e - z_q||^2 per latent vector (summed over D) of latents e (N, D) and what the decoder
    receives z_q (N, D): the distortion of the quantizer's output, on the scale of water_filling's."""
    return (e.float() - z_q.float()).square().sum(1).mean()


def moment_matrix(v: torch.Tensor) -> torch.Tensor:
    """[v 1]^T [v 1] (D+1, D+1) of rows v (N, D) in float64: sum v v^T, sum v and N in one matrix, which adds over
    batches and ranks. float64 because the covariance subtracts N mu mu^T from sum v v^T; on the CPU for MPS, which
    has no float64."""
    v = v.detach()
    v1 = with_ones((v.cpu() if v.device.type == "mps" else v).double())  # (N, D+1)
    return v1.T @ v1


def covariance(moments: torch.Tensor) -> torch.Tensor:
    """Centred covariance (D, D), denominator N - 1, of the rows summed into moment_matrix; zeros below 2 rows."""
    n, s, ss = moments[-1, -1], moments[:-1, -1], moments[:-1, :-1]
    return (ss - torch.outer(s, s) / n.clamp_min(1)) / (n - 1).clamp_min(1)


def spectrum(moments: torch.Tensor) -> torch.Tensor:
    """Eigenvalues (D,) of the covariance of the rows summed into moment_matrix, descending, float64 on the CPU.
    Those within rounding of zero (1e-12 of the rows' mean squared norm, which the float64 sums' cancellation
    reaches) are 0, so rows that are all one vector have no dimension."""
    moments = moments.detach().double().cpu()
    lam = torch.linalg.eigvalsh(covariance(moments)).flip(0)
    floor = 1e-12 * moments[:-1, :-1].trace() / moments[-1, -1].clamp_min(1)
    return torch.where(lam > floor, lam, torch.zeros_like(lam))


def effective_dim(eigvals: torch.Tensor, fraction: float = 0.99) -> int:
    """The smallest k whose k largest eigenvalues hold `fraction` of the variance (0 without variance): the 99 %
    effective dimension of Zhao et al. 2026 ("Continuous First, Discrete Later", their train_small2.py)."""
    lam = eigvals.double().sort(descending=True).values
    total = lam.sum()
    if total <= 0:
        return 0
    return min(int((lam.cumsum(0) / total < fraction).sum()) + 1, len(lam))


def participation_ratio(eigvals: torch.Tensor) -> float:
    """(sum lambda)^2 / sum lambda^2: between 1 (one direction) and D (isotropic); 0 without variance."""
    lam = eigvals.double()
    sq = lam.square().sum()
    return float(lam.sum().square() / sq) if sq > 0 else 0.0


def water_filling(eigvals: torch.Tensor, bits: float) -> tuple[float, int, float]:
    """Gaussian reverse water-filling (Cover & Thomas, Elements of Information Theory, Thm 10.3.3) on a spectrum:
    the level theta with sum_i max(0, 1/2 log2(lambda_i / theta)) = bits. Returns (theta, d_WF = #{lambda_i > theta},
    distortion sum_i min(theta, lambda_i)): the least distortion of a Gaussian source with these variances at that
    rate, and the directions it spends bits on.

    Exact: with the m largest lambda water-filled, log2 theta = (sum_{i<=m} log2 lambda_i - 2 bits) / m; the answer
    is the first m whose theta reaches lambda_{m+1} (0 past the last), as the rate falls monotonically in theta.
    """
    lam = eigvals.double().sort(descending=True).values
    lam = lam[lam > 0]
    if len(lam) == 0:
        return 0.0, 0, 0.0
    log_lam = lam.log2()
    for m in range(1, len(lam) + 1):
        theta = float(2.0 ** ((log_lam[:m].sum() - 2 * bits) / m))
        if m == len(lam) or theta >= lam[m]:
            break
    return theta, int((lam > theta).sum()), float(lam.clamp(max=theta).sum())


def dimension_metrics(latent: torch.Tensor, zq: torch.Tensor, codebook: Optional[torch.Tensor], K: int) -> dict:
    """The dimension columns from the eigenvalues of the latents e, of the decoder's inputs z_q and of the K code
    vectors (None: no such metrics), and the water-filling bound at log2 K bits per latent vector."""
    theta, wf_dim, wf_distortion = water_filling(latent, math.log2(K))
    spectra = {"latent": latent, "zq": zq, **({"codebook": codebook} if codebook is not None else {})}
    out = {}
    for name, lam in spectra.items():
        out.update({f"{name}_dim99": effective_dim(lam), f"{name}_pr": participation_ratio(lam)})
    return {**out, "wf_dim": wf_dim, "wf_distortion": wf_distortion, "wf_theta": theta}


def codebook_stats(counts: torch.Tensor) -> dict:
    """Perplexity exp(H), usage rate and dead codes from a histogram of code counts (K,). Tensors, no sync."""
    counts = counts.float()
    probs = counts / counts.sum().clamp_min(1)
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum()
    used = (counts > 0).sum()
    return {"perplexity": entropy.exp(), "usage_rate": used / len(counts), "dead_codes": len(counts) - used}


def code_counts(indices: torch.Tensor, K: int, dtype=torch.float32) -> torch.Tensor:
    """How many of the indices (any shape) are each code, (K,). A scatter-add of ones, not torch.bincount, which on
    CUDA reads the largest index back to the host; sums of ones are exact in any order."""
    flat = indices.reshape(-1)
    return torch.zeros(K, dtype=dtype, device=flat.device).index_add_(0, flat, torch.ones_like(flat, dtype=dtype))


# ################################################################################################################
# Train / Validate
# ################################################################################################################

def make_optimizer(model: VQVAE, cfg: Config) -> tuple[torch.optim.Optimizer, list[tuple[list, float]]]:
    """AdamW over the autoencoder's parameters (lr, weight_decay), and the quantizer's own param_groups beside them.
    Returns the optimizer and (parameters, max norm) of each group whose gradient is clipped."""
    groups, clipped = [], []
    for group in model.quantizer.param_groups():
        group = dict(group)
        if "max_grad_norm" in group:
            clipped.append((list(group["params"]), group.pop("max_grad_norm")))
        groups.append(group)
    own = {id(p) for g in groups for p in g["params"]}
    shared = [p for p in model.parameters() if id(p) not in own]
    return torch.optim.AdamW([{"params": shared}, *groups], lr=cfg.lr, weight_decay=cfg.weight_decay), clipped


def auto_log_every(total_steps: int) -> int:
    """Steps between train records when log_every is 0: about 100 records a run, at most 50 steps apart, and a
    record every step in runs shorter than 100 steps (a 10-step smoke test still draws a curve)."""
    return min(max(total_steps // 100, 1), 50)


def schedule_progress(step: int, anchor: tuple[int, float], total_steps: int) -> float:
    """Progress in [0, 1] of the quantizer's schedule at `step`: linear from anchor = (step, progress) to 1 at the
    last step. A fresh run's anchor is (0, 0), giving step / (total_steps - 1); a run resumed with another number
    of epochs is re-anchored where it stood, so its schedule stays continuous and monotone."""
    s0, p0 = anchor
    return min(p0 + (1.0 - p0) * (step - s0) / max(total_steps - 1 - s0, 1), 1.0)


def set_seed(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def is_scalar(v) -> bool:
    """A metric the loops average and log: a number or a 0-d tensor (code_indices is neither)."""
    return isinstance(v, (int, float)) or (torch.is_tensor(v) and v.dim() == 0)


def as_scalar(v, device) -> torch.Tensor:
    """A metric as a float32 0-d tensor on `device`, wherever the quantizer put it (a CPU scalar on a CUDA run)."""
    return torch.as_tensor(v).detach().float().to(device)


class NonFiniteError(RuntimeError):
    """Loss or gradients became NaN/Inf."""


class Trainer:
    """One run: model, optimizer, data, schedule, run folder and its files. `train(cfg)` drives it.

    Step records go to train/<name>, epoch means to train_epoch/<name>, validation to val/<name>: every loss term
    and metric the quantizer returns is logged under its own name, whatever the quantizer.
    """

    def __init__(self, cfg: Config, run_dir: Path, device: torch.device, rank: int = 0, world: int = 1):
        self.cfg, self.run_dir, self.device, self.rank, self.world = cfg, run_dir, device, rank, world
        if cfg.batch_size % world:  # equal shards: DDP's mean of rank gradients is then the global batch's
            raise UserError(f"batch_size {cfg.batch_size} must be divisible by the number of processes ({world})")
        set_deterministic(cfg.deterministic)
        set_seed(cfg.seed)
        train_u8, test_u8 = load_cifar10(cfg)
        self.train_batches = Batches(train_u8, cfg.batch_size, device, True, cfg.seed, rank, world)
        self.val_batches = Batches(test_u8, cfg.batch_size, device, False, rank=rank, world=world)
        self.perceptual: Optional[perceptual.PerceptualMetrics] = None  # loaded at the first validation
        self.total_steps = cfg.epochs * len(self.train_batches)
        # the AE warm-up: steps 1..warmup_steps train the autoencoder alone (VQVAE.phase "ae")
        self.warmup_steps = cfg.ae_warmup_steps or round(cfg.ae_warmup_frac * self.total_steps)
        self._check_warmup()
        self.model = VQVAE(cfg).to(device)
        self.model.phase = self.phase_after(0)
        if device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = not cfg.deterministic  # autotuning picks algorithms by timing
        self.ddp_model = self._wrap(self.model)  # the same model; forward runs through it
        self.optimizer, self.clipped = make_optimizer(self.model, cfg)
        self.amp_dtype = autocast_dtype(cfg.precision, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.log_every = cfg.log_every or auto_log_every(self.total_steps)
        self.step, self.epoch, self.step_in_epoch = 0, 0, 0
        # the schedule's progress runs linearly from (step, progress) = anchor to (total_steps - 1, 1), from the
        # first step after the warm-up; a resume with another number of epochs moves the anchor to where the run
        # stood, so it stays continuous
        self.schedule_anchor = (self.warmup_steps, 0.0)
        self.epoch_sums: dict[str, torch.Tensor] = {}
        self.epoch_counts: dict[str, int] = {}  # steps of this epoch that had each key (the switch adds keys)
        self.pending: list[tuple[int, torch.Tensor]] = []  # (step, stacked loss terms) not yet checked for NaN
        self.term_names: list[str] = []  # names of the stacked loss terms
        self.val_metrics: Optional[dict] = None  # of the last finished epoch; the final metrics once training ends

    def _wrap(self, model: VQVAE) -> nn.Module:
        if self.cfg.compile:
            compile_model(model, self.device)
        if self.world == 1:
            return model
        # a warm-up leaves the quantizer's parameters without gradients, which DDP must be told to expect
        return ddp_wrap(model, self.device, find_unused_parameters=self.warmup_steps > 0)

    # -- the AE warm-up -----------------------------------------------------------------------------------------
    def _check_warmup(self):
        if self.warmup_steps >= self.total_steps:
            raise UserError(f"the AE warm-up ({self.warmup_steps} steps) must end before the run's last step "
                            f"({self.total_steps} steps in all)")

    def phase_after(self, steps: int) -> str:
        """The model's phase once `steps` steps are done: "ae" up to and including the last warm-up step (the
        validation and checkpoint after it see the autoencoder); the quantizer joins at the next step."""
        return "ae" if self.warmup_steps and steps <= self.warmup_steps else "vq"

    def end_warmup(self):
        """The switch, as Zhao et al. make it: the quantizer joins the model as constructed, so this step's forward
        initialises it from the warm encoder's outputs as a run's first step would (k-means on this batch for
        VQ-EMA and BA; the baselines keep their construction-time init), and the optimizer starts afresh (unless
        ae_warmup_keep_optimizer)."""
        self.check_finite()  # the pending rows hold the warm-up's loss terms, fewer than a VQ step's
        self.model.phase = "vq"
        if not self.cfg.ae_warmup_keep_optimizer:
            self.optimizer, self.clipped = make_optimizer(self.model, self.cfg)

    # -- one step -----------------------------------------------------------------------------------------------
    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def train_step(self, x: torch.Tensor) -> dict:
        if self.warmup_steps and self.step == self.warmup_steps:
            self.end_warmup()
        if self.model.phase == "vq":  # the schedule (BA's beta) waits out the warm-up
            self.model.quantizer.schedule(schedule_progress(self.step, self.schedule_anchor, self.total_steps))
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            _, recon_loss, quant_losses, metrics = self.ddp_model(x)
        loss = recon_loss + sum(quant_losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), float("inf"))  # logged, not clipped
        for params, max_norm in self.clipped:  # a quantizer's own groups may ask for clipping
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        terms = {"loss": loss.detach(), "recon_loss": recon_loss.detach(),
                 **{k: v.detach() for k, v in quant_losses.items()}, "grad_norm": grad_norm.detach()}
        # numbered like metrics.jsonl: step N is the N-th optimizer step
        self.pending.append((self.step + 1, torch.stack(list(terms.values()))))
        self.term_names = list(terms)
        return {**terms, **{k: v for k, v in metrics.items() if is_scalar(v)}}

    def check_finite(self):
        """Raise NonFiniteError naming the first step and term that went NaN/Inf since the last check."""
        if not self.pending:
            return
        stacked = torch.stack([t for _, t in self.pending])
        bad = ~torch.isfinite(stacked)
        if self.scaler.is_enabled():  # fp16: inf gradients are the scaler's business (it skips the step)
            bad[:, self.term_names.index("grad_norm")] = False
        if bad.any():
            row = int(bad.any(1).nonzero()[0])
            # name the term that broke rather than the total "loss" it propagates into
            names = [n for n, b in zip(self.term_names, bad[row].tolist()) if b]
            term = next((n for n in names if n != "loss"), names[0])
            raise NonFiniteError(f"non-finite {term} at step {self.pending[row][0]} (epoch {self.epoch + 1}); "
                                 f"stopping, last good checkpoint kept")
        self.pending.clear()

    # -- epochs -------------------------------------------------------------------------------------------------
    def train_epoch(self, logger: "Logger", stop: "StopFlag", bar) -> bool:
        """Runs the rest of the current epoch; returns False if a stop signal interrupted it."""
        self.model.train()
        for x in self.train_batches.epoch(self.epoch, start=self.step_in_epoch):
            out = self.train_step(x)
            for k, v in out.items():
                self.epoch_sums[k] = self.epoch_sums.get(k, 0) + as_scalar(v, self.device)
                self.epoch_counts[k] = self.epoch_counts.get(k, 0) + 1
            self.step += 1
            self.step_in_epoch += 1
            bar.update(1)
            if self.step % self.log_every == 0:
                self.check_finite()
                record = {f"train/{k}": float(v) for k, v in self._rank_mean(out, self.term_names).items()}
                logger.log({"step": self.step, "epoch": self.epoch + 1, **self._phase_field(), **record})
                bar.set_postfix(loss=f"{record['train/loss']:.4f}",
                                **({"ppl": f"{record['train/perplexity']:.1f}"} if "train/perplexity" in record
                                   else {"phase": "ae"}))
            if self.stop_agreed(stop):
                return False
        return True

    def end_epoch(self, logger: "Logger", t0: float) -> dict:
        """Validate, log the epoch record, print its line, write the checkpoints. Returns the validation metrics."""
        train_means = self.epoch_means()
        if self.perceptual is None:
            say = print if self.rank == 0 else (lambda line: None)
            self.perceptual = perceptual.PerceptualMetrics.load(self.cfg, self.device, self.val_batches.images, say)
        n = self.epoch + 1
        rfid = n == self.cfg.epochs or bool(self.cfg.rfid_every and n % self.cfg.rfid_every == 0)
        val = validate(self.model, self.val_batches, self.autocast(), self.perceptual, rfid)
        bad = [k for k, v in val.items() if not math.isfinite(v)]
        if bad:
            raise NonFiniteError(f"non-finite val/{bad[0]} after epoch {self.epoch + 1} (step {self.step}); "
                                 f"stopping, last good checkpoint kept")
        seconds = time.time() - t0  # training and validation of this epoch
        self.epoch += 1
        self.val_metrics = val
        self.step_in_epoch, self.epoch_sums, self.epoch_counts = 0, {}, {}
        logger.log({"step": self.step, "epoch": self.epoch, "epoch_time": seconds, **self._phase_field(),
                    **{f"train_epoch/{k}": v for k, v in train_means.items()},
                    **{f"val/{k}": v for k, v in val.items()}})
        if self.rank == 0:
            report = self.model.quantizer.report() if self.model.phase == "vq" else {}
            print(epoch_line(self.epoch, self.cfg.epochs, train_means, val, report, seconds))
            # last.pt after the periodic file: a run killed in between redoes the epoch and writes both
            if self.epoch % self.cfg.checkpoint_every == 0:
                checkpoint.save_checkpoint(self, f"checkpoint_epoch{self.epoch}.pt")
            checkpoint.save_checkpoint(self, "last.pt")
        return val

    def stop_agreed(self, stop: "StopFlag", anytime: bool = False) -> bool:
        """Whether to stop on a signal. With several ranks they decide together (a rank that left alone would
        leave the others waiting in a collective), within a step at log steps only, to spare a sync per step."""
        if self.world == 1:
            return stop.requested
        if not anytime and self.step % self.log_every:
            return False
        return bool(dist_sum_(torch.tensor(float(stop.requested), device=self.device)) > 0)

    def _rank_mean(self, values: dict, names: list[str]) -> dict:
        """values[name] averaged over ranks for each name (loss terms: the global batch's, as shards are equal);
        the other entries (batch perplexity, usage) stay this rank's."""
        if self.world == 1 or not names:
            return values
        means = dist_sum_(torch.stack([values[k].float() for k in names])) / self.world
        return {**values, **dict(zip(names, means))}

    def epoch_means(self) -> dict:
        """Each value's mean over the epoch's steps that had it (all of them, but in the epoch of the switch)."""
        sums = self._rank_mean(self.epoch_sums, list(self.epoch_sums))
        return {k: (v / max(self.epoch_counts.get(k, self.step_in_epoch), 1)).item() for k, v in sums.items()}

    def _phase_field(self) -> dict:
        """The records' "phase" ("ae" / "vq"), in runs with a warm-up; a record without one is of the VQ model."""
        return {"phase": self.model.phase} if self.warmup_steps else {}

    def write_final(self, metrics: dict, records: dict[str, dict]):
        """final_model.pt (the checkpoint format minus the optimizer), reconstructions.png, the other `records`
        ({file name: JSON-able dict}), final_metrics.json."""
        checkpoint.save_checkpoint(self, "final_model.pt", resumable=False)
        save_reconstructions(self.model, self.val_batches, self.run_dir / "reconstructions.png",
                             title=f"{self.cfg.name}: validation PSNR {metrics.get('psnr', math.nan):.2f} dB")
        for name, record in records.items():
            atomic_write(self.run_dir / name, lambda fh: fh.write(json.dumps(record, indent=2).encode()))
        # written last: sweeps take final_metrics.json as the sign of a finished run
        atomic_write(self.run_dir / "final_metrics.json", lambda fh: fh.write(json.dumps(metrics, indent=2).encode()))
        print(f"Training complete. Results in {self.run_dir}")


def epoch_line(epoch: int, epochs: int, train_means: dict, val: dict, report: dict, seconds: float) -> str:
    """The printed line of an epoch; `report` is the quantizer's own (e.g. its beta)."""
    scores = (f"PSNR: {val['psnr']:.2f} | Perplexity: {val['perplexity']:.1f} | Usage: {val['usage_rate'] * 100:.1f}%"
              if "psnr" in val else f"AE warm-up, AE PSNR: {val['ae_psnr']:.2f}")
    return (f"Epoch {epoch}/{epochs} | Train Loss: {train_means['loss']:.4f} | Val Loss: {val['loss']:.4f} | "
            f"{scores}" + "".join(f" | {k}: {v:.4g}" for k, v in report.items()) + f" | {seconds:.1f}s")


AE_SCORES = ("psnr", "psnr_per_image", "ssim", "lpips", "rfid")  # validate's names for them during an AE warm-up: ae_*


@torch.no_grad()
def validate(model: VQVAE, batches: Batches, autocast=None, scorer: Optional[perceptual.PerceptualMetrics] = None,
             rfid: bool = False) -> dict:
    """Metrics over the WHOLE validation set, with the discrete (hard-code) model in eval mode; the model's
    train/eval mode is restored afterwards. recon_loss is the MSE of the raw output (the training objective);
    psnr that of the output clamped to the image range [-1, 1], on the [0, 1] scale, from the set's pooled MSE;
    psnr_per_image the mean of each image's PSNR; ssim the mean SSIM (all of the clamped output); <name>_psnr the
    same as psnr for each of the quantizer's diagnostic_inputs; with a scorer, lpips the mean LPIPS and (rfid) rfid
    the FID of all reconstructions against the real images. Over all latents: code usage and perplexity, and the
    dimension columns of the latents e, of what the decoder receives (z_q) and of the code vectors
    (dimension_metrics), with quant_distortion, the mean ||e - z_q||^2. During an AE warm-up (model.phase "ae") the
    image scores are the continuous autoencoder's, named ae_psnr, ae_ssim, ... (AE_SCORES), so that psnr always
    scores discrete codes; there are no codes to count then, and z_q is e."""
    was_training = model.training
    model.eval()
    q = model.quantizer
    sums: dict[str, torch.Tensor] = {}  # image-weighted sums of every batch's means
    counts = torch.zeros(q.K, device=batches.images.device)
    moments = 0  # (2, D+1, D+1) moment matrices of e and z_q
    n_images = 0
    lpips_net = scorer.lpips_net if scorer else None
    fid = scorer.feature_moments(batches.images.device) if rfid and scorer and scorer.fid_net else None
    for x in batches.epoch(0):
        # every rank runs every batch, even an empty slice of the ragged last one: quantizers may reduce over ranks
        with autocast or torch.autocast(x.device.type, enabled=False):
            e = model.encoder(x)  # (B, D, 8, 8)
            z_q, quant_losses, metrics = model.quantize(e)  # z_q: what the decoder receives
            x_hat = model.decoder(z_q)  # (B, 3, 32, 32)
            recon_loss = F.mse_loss(x_hat.float(), x.float())
            with torch.autocast(x.device.type, enabled=False):  # float32, as the quantizer's forward
                z_other = q.diagnostic_inputs(q._flatten(e)) if model.phase == "vq" else {}  # e.g. BA's soft mix
            x_other = {name: model.decoder(q._unflatten(z, e)) for name, z in z_other.items()}  # (B, 3, 32, 32)
        e, z_q = q._flatten(e), q._flatten(z_q)  # (N, D) float32
        terms = {"recon_loss": recon_loss, **quant_losses}
        terms["loss"] = sum(terms.values())
        terms.update(image_scores(x, x_hat))
        terms.update({f"{name}_clamped_mse": clamped_mse(x, x_o) for name, x_o in x_other.items()})
        terms["quant_distortion"] = quant_distortion(e, z_q)
        if lpips_net is not None:
            terms["lpips"] = perceptual.lpips_per_image(lpips_net, x, x_hat).mean()
        if fid is not None and len(x):
            fid.update(scorer.fid_net(x_hat))
        # every scalar the quantizer reports; perplexity and usage are recomputed below from the whole set's
        # histogram, and report() has the last word on its own keys
        terms.update({k: v for k, v in metrics.items() if is_scalar(v)})
        for k, v in terms.items():  # image-weighted; an empty slice's means are NaN and add nothing
            v = as_scalar(v, x.device)
            sums[k] = sums.get(k, 0) + (v * len(x) if len(x) else torch.zeros((), device=x.device))
        if "code_indices" in metrics:  # not during an AE warm-up
            counts += code_counts(metrics["code_indices"], q.K)
        moments = moments + torch.stack([moment_matrix(e), moment_matrix(z_q)])
        n_images += len(x)
    names = list(sums)
    totals = dist_sum_(torch.stack([*(sums[k] for k in names), counts.new_tensor(n_images, dtype=torch.float)]))
    dist_sum_(counts)
    dist_sum_(moments)
    result = dict(zip(names, (totals[:-1] / totals[-1]).tolist()))
    for k in [k for k in result if k.endswith("clamped_mse")]:  # clamped_mse -> psnr, soft_clamped_mse -> soft_psnr
        result[k.replace("clamped_mse", "psnr")] = psnr_from_mse(result.pop(k))
    if model.phase == "vq":
        result.update({k: float(v) for k, v in codebook_stats(counts).items()})
        result["dead_codes"] = int(result["dead_codes"])
    codebook = code_spectrum(q) if model.phase == "vq" else None
    result.update(dimension_metrics(*map(spectrum, moments), codebook, q.K))
    if fid is not None:
        result["rfid"] = scorer.rfid(fid)
    if model.phase == "vq":
        result.update(q.report())
    else:  # the continuous autoencoder's scores, under names of their own
        result = {f"ae_{k}" if k in AE_SCORES else k: v for k, v in result.items()}
    model.train(was_training)
    return result


@torch.no_grad()
def code_spectrum(q: "Quantizer") -> Optional[torch.Tensor]:
    """Eigenvalues (D,) of the covariance of the quantizer's K code vectors, or None if it has none."""
    C = q.code_vectors()
    return None if C is None else spectrum(moment_matrix(C.float()))


@torch.no_grad()
def split_sums(model: VQVAE, batches: Batches, autocast=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Over every image of `batches` (in order, no augmentation), in eval mode so that a code depends on its image
    alone, summed over ranks: the code counts (K,) and the moment matrices (2, D+1, D+1) of e and z_q."""
    was_training = model.training
    model.eval()
    q = model.quantizer
    counts, moments = torch.zeros(q.K, device=batches.images.device), 0
    for x in batches.epoch(0):  # every rank runs every batch, as in validate
        with autocast or torch.autocast(x.device.type, enabled=False):
            e = model.encoder(x)
            z_q, _, metrics = q(e)
        counts += code_counts(metrics["code_indices"], q.K)
        moments = moments + torch.stack([moment_matrix(q._flatten(e)), moment_matrix(q._flatten(z_q))])
    model.train(was_training)
    return dist_sum_(counts), dist_sum_(moments)


def train_split_metrics(trainer: "Trainer") -> tuple[dict, dict]:
    """The final model over the training split's latents: ({train_usage, train_perplexity}, for final_metrics.json;
    the eigenvalues of e, z_q and the code vectors, for spectrum.json). At large K the test split has too few
    latents to tell a code nobody uses from one its images happen to miss."""
    images = trainer.train_batches.images
    batches = Batches(images, trainer.cfg.batch_size, images.device, False, rank=trainer.rank, world=trainer.world)
    counts, moments = split_sums(trainer.model, batches, trainer.autocast())
    stats = codebook_stats(counts)
    latent, zq = map(spectrum, moments)
    codebook = code_spectrum(trainer.model.quantizer)
    spectra = {"split": "train", "latents": int(moments[0, -1, -1]), "bits": math.log2(trainer.model.quantizer.K),
               "latent_eigvals": latent.tolist(), "zq_eigvals": zq.tolist(),
               "codebook_eigvals": None if codebook is None else codebook.tolist()}
    return {"train_usage": float(stats["usage_rate"]), "train_perplexity": float(stats["perplexity"])}, spectra


def train(cfg: Config) -> dict:
    """Train one run end to end; returns the final metrics (final_metrics.json): the last validation's, and
    train_usage and train_perplexity over the training split."""
    if cfg.resume and not cfg.name:
        raise UserError("--resume needs --name (the run to continue)")
    # Subnormal floats (below 1.2e-38) read as 0 on the CPU: BA's soft assignments hold many, and every GEMM that
    # reads them takes a slow microcode path (BA's K = 16,384 training step was 1.5x slower at beta 100, 2.4x at 40;
    # BENCHMARKS.md). No quantity here resolves them. The mode is per thread, and threads inherit it when they start:
    # set here, before this process's first parallel op, it holds in torch's whole CPU thread pool.
    torch.set_flush_denormal(True)
    own_group = not (dist.is_available() and dist.is_initialized())
    rank, world = dist_rank_world()
    device = pick_device(cfg.device) if world == 1 else ddp_device(cfg.device, rank)
    cfg = _name_run(cfg)
    run_dir = Path(cfg.out_dir) / cfg.name
    # every check (run folder, checkpoint, data) passes before anything on disk is created or changed
    ckpt = checkpoint.check_run_dir(cfg, run_dir)
    trainer = Trainer(cfg, run_dir, device, rank, world)
    # of the code that runs
    provenance = plumbing.provenance(REPO_DIR, device, trainer.amp_dtype, world) if rank == 0 else {}
    if ckpt is not None:
        checkpoint.restore_trainer(trainer, ckpt)
    if rank == 0:
        checkpoint.prepare_run_dir(cfg, run_dir, resume=ckpt is not None)
    wandb = {"project": cfg.wandb_project, "name": cfg.name, "config": config_to_dict(cfg)} if cfg.wandb else None
    logger = Logger(run_dir, enabled=rank == 0, wandb=wandb)
    if ckpt is not None:
        logger.truncate_after(trainer.step)
    _print_header(cfg, trainer, device, rank)
    try:
        with StopFlag() as stop:
            metrics = _train_loop(trainer, logger, stop)
    finally:
        logger.finish()
    train_metrics, spectrum = train_split_metrics(trainer)  # every rank: it sums over them
    metrics = {**metrics, **train_metrics}
    if rank == 0:
        with rank_local():  # rank 0 alone: its reconstruction forward must not wait for the other ranks
            trainer.write_final(metrics, {"spectrum.json": spectrum, "provenance.json": provenance})
    if world > 1 and own_group:
        # together: a rank that tore its group down while rank 0 still wrote the final files aborted at exit, now and
        # then ("terminate called without an active exception")
        dist.barrier()
        dist.destroy_process_group()
    return metrics


def _train_loop(trainer: Trainer, logger: "Logger", stop: "StopFlag") -> dict:
    from tqdm.auto import tqdm
    cfg = trainer.cfg
    with tqdm(total=trainer.total_steps, initial=trainer.step, desc=cfg.name,
              disable=None if trainer.rank == 0 else True, dynamic_ncols=True, leave=False) as bar:
        while trainer.epoch < cfg.epochs:
            t0 = time.time()
            finished = trainer.train_epoch(logger, stop, bar)
            trainer.check_finite()
            if not finished:
                if trainer.rank == 0:
                    checkpoint.save_checkpoint(trainer, "last.pt")
                raise checkpoint.Interrupted(stop.signum, trainer)
            trainer.end_epoch(logger, t0)
            if trainer.stop_agreed(stop, anytime=True):  # signalled during validation: last.pt was just written
                raise checkpoint.Interrupted(stop.signum, trainer)
    # a run resumed after its last epoch (killed before the final files) reports that epoch's metrics
    return trainer.val_metrics or {}


@torch.no_grad()
def save_reconstructions(model: VQVAE, batches: Batches, path: Path, n: int = 8, title: str = ""):
    """The first n validation images (top row, "input") over the model's reconstructions (bottom row)."""
    was_training = model.training
    model.eval()
    x = next(iter(batches.epoch(0)))[:n]
    x_hat = model(x)[0].float().clamp(-1, 1)
    model.train(was_training)
    save_image_rows([(x, "input"), (x_hat, "reconstruction")], path, title)


def _name_run(cfg: Config) -> Config:
    if cfg.name:
        return cfg
    name = [f"{cfg.quantizer}_k{cfg.codebook_size}_{time.strftime('%Y%m%d-%H%M%S')}"]
    if world_size() > 1:  # the clock may tick between ranks: rank 0's name everywhere
        dist.broadcast_object_list(name, 0)
    return dataclasses.replace(cfg, name=name[0])


def _print_header(cfg: Config, trainer: Trainer, device, rank: int):
    if rank != 0:
        return
    n_params = sum(p.numel() for p in trainer.model.parameters())
    procs = f" x {trainer.world} processes (torchrun; batch {cfg.batch_size} split across them)" \
        if trainer.world > 1 else ""
    # K of the quantizer itself: FSQ's grid size is the product of its levels, not codebook_size
    K = trainer.model.quantizer.K
    print(f"{cfg.name}: {cfg.quantizer} K={K} D={cfg.code_dim} arch={cfg.arch} on {device}{procs} "
          f"({trainer.amp_dtype or 'fp32'}) | {len(trainer.train_batches.images)} train / "
          f"{len(trainer.val_batches.images)} val images | {n_params / 1e6:.2f}M params | "
          f"{trainer.total_steps} steps, a record every {trainer.log_every}"
          + (f" | AE warm-up: {trainer.warmup_steps} steps" if trainer.warmup_steps else "")
          + (f" | resuming at step {trainer.step}" if trainer.step else ""))
