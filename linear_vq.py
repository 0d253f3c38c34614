"""Vector quantization with a linear Stiefel encoder on synthetic low-rank data (seed 003).

A self-contained companion to `vqvae.py`: the smallest model in which the VQ-VAE questions of seed 003 can be
asked exactly. Data x in R^D lie near a rank-r subspace; the encoder is a matrix W in R^{D x m} with orthonormal
columns, z = W^T x, q = the nearest row of the codebook E in R^{K x m}, and the decoder is x_hat = W q.

    L = |x - W q~|^2 + alpha |sg(z) - q|^2 + beta |z - sg(q)|^2        (per-sample mean over the batch)

is the VQ-VAE loss (van den Oord et al. 2017, "Neural Discrete Representation Learning"), where q~ equals q in
the forward pass and carries a gradient estimator backwards:
  - straight-through (STE, Bengio et al. 2013; van den Oord et al. 2017): dL/dz = dL/dq;
  - rotation estimator as seed 003 defines it: dL/dz = (dL/dq . u) u with u = (q - z)/|q - z|, i.e. only the
    component of the gradient along the quantization displacement passes. (Fifty et al. 2024, "Restructuring
    Vector Quantization with the Rotation Trick", rotate and rescale instead; that estimator is not studied here.)
    With W^T W = I the reconstruction gradient dL/dq~ = (2/B)(W^T x_hat - z) = (2/B)(q - z) is already along u, so
    on the Stiefel manifold this estimator equals STE up to rounding (tested).
W moves by Riemannian SGD on the Stiefel manifold (Edelman, Arias & Smith 1998; Absil, Mahony & Sepulchre 2008):
the Euclidean gradient is projected to the tangent space and the step is retracted by the polar factor.

Four methods are compared: PCA + Lloyd-Max (two-stage baseline), autograd STE (PyTorch), manual STE (NumPy with
hand-derived gradients) and the rotation estimator. Five CLI commands write a CSV, a Markdown table and, where
there are curves, a PNG under --out:

    python linear_vq.py verify | convergence | scaling | ablation | timing | all  [--flags]
"""

import argparse
import csv
import ctypes
import math
import multiprocessing
import os
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

if __name__ in ("__main__", "__mp_main__"):  # CLI runs and their timing workers only, never on import
    # Matrices here are at most 512 x 64: threads cost more than they save, and on a shared 2-core machine they
    # fight. OpenBLAS and OpenMP read these once, so they must be set before numpy and torch are imported.
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import numpy as np
import torch

#### Config ############################################################################################################


def arg(default, doc):
    """A Config field whose one-line doc is also its --flag help."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass
class Config:
    """Every hyperparameter of the study; each field is a --flag. Experiment presets override the defaults."""

    D: int = arg(64, "ambient dimension of x")
    r: int = arg(6, "rank of the signal subspace")
    m: int = arg(4, "encoder width: columns of W, dimension of z and of the codes")
    K: int = arg(16, "codebook size")
    signal_top: float = arg(4.0, "variance of x along the first signal direction")
    signal_decay: float = arg(0.7, "ratio of consecutive signal variances: lambda_i = signal_top * decay^i")
    noise_std: float = arg(0.1, "std of the isotropic noise added in every ambient coordinate")
    n_train: int = arg(10_000, "training samples")
    n_eval: int = arg(2_000, "evaluation samples (all metrics are on this set)")
    data_seed: int = arg(0, "seed of the data (subspace, samples)")
    seed: int = arg(0, "seed of W's init, k-means++ and the minibatch order")
    steps: int = arg(200, "SGD steps for the gradient methods")
    batch: int = arg(512, "minibatch size")
    alpha: float = arg(1.0, "codebook loss weight")
    beta: float = arg(0.25, "commitment loss weight")
    lr_W: float = arg(0.08, "learning rate of the Riemannian SGD on W")
    lr_E: float = arg(0.2, "learning rate of the SGD on the codebook E")
    log_every: int = arg(25, "evaluate every this many steps")
    init_W: str = arg("random", "initial W of the gradient methods: 'random' (Haar on Stiefel) or 'pca'")
    lloyd_iters: int = arg(100, "max Lloyd iterations of the baseline (stops early when assignments settle)")
    Ks: list = arg([8, 16, 32, 64], "codebook sizes of the scaling experiment")
    betas: list = arg([0.0, 0.1, 0.25, 0.5, 1.0], "commitment weights of the ablation")
    timing_steps: int = arg(200, "steps timed per method in the timing experiment")
    out: str = arg("experiments/linear_vq", "output folder")


# Each experiment's sizes as the issue fixes them; command-line flags override these.
PRESETS = {
    "verify": dict(K=16, n_train=10_000, n_eval=2_000, steps=200),
    "convergence": dict(K=32, n_train=20_000, n_eval=4_000, steps=500),
    "scaling": dict(n_train=20_000, n_eval=4_000, steps=500),
    "ablation": dict(K=32, n_train=20_000, n_eval=4_000, steps=500),
    "timing": dict(K=32, n_train=20_000, n_eval=4_000),
}

#### Data ##############################################################################################################


@dataclass
class Data:
    x_train: np.ndarray  # (N_train, D)
    x_eval: np.ndarray  # (N_eval, D)
    U: np.ndarray  # (D, r) orthonormal basis of the signal subspace
    lam: np.ndarray  # (r,) signal variances along U's columns


def random_stiefel(D, m, rng):
    """Haar-random D x m matrix with orthonormal columns (QR with the sign fix)."""
    Q, R = np.linalg.qr(rng.standard_normal((D, m)))
    return Q * np.sign(np.diag(R))


def signal_variances(cfg):
    return cfg.signal_top * cfg.signal_decay ** np.arange(cfg.r)


def make_data(cfg):
    """x = U diag(sqrt(lam)) g + noise_std * n with g, n standard normal: a rank-r Gaussian plus isotropic noise."""
    rng = np.random.default_rng(cfg.data_seed)
    U, lam = random_stiefel(cfg.D, cfg.r, rng), signal_variances(cfg)

    def sample(n):
        g = rng.standard_normal((n, cfg.r))
        return (g * np.sqrt(lam)) @ U.T + cfg.noise_std * rng.standard_normal((n, cfg.D))

    return Data(sample(cfg.n_train), sample(cfg.n_eval), U, lam)


#### Codebook fitting: nearest code, k-means++, Lloyd ##################################################################


def nearest(z, E):
    """Index of the nearest code for each row of z; works on NumPy arrays and torch tensors alike."""
    # The difference form (not |z|^2 - 2 z.E + |E|^2) so both backends compute bit-comparable distances.
    return ((z[:, None, :] - E[None, :, :]) ** 2).sum(-1).argmin(1)  # (B,)


def nearest_expanded(z, E):
    """nearest() via |z|^2 - 2 z.E + |E|^2: ten times faster on large sets, for the NumPy-only Lloyd baseline."""
    return ((z * z).sum(1)[:, None] - 2 * z @ E.T + (E * E).sum(1)).argmin(1)  # (N,)


def kmeanspp(z, K, rng):
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each new code drawn with probability ~ squared distance."""
    E = [z[rng.integers(len(z))]]
    d2 = ((z - E[0]) ** 2).sum(1)
    for _ in range(1, K):
        # All points may coincide with the codes (tiny data): fall back to a uniform draw.
        p = d2 / d2.sum() if d2.sum() > 0 else None
        E.append(z[rng.choice(len(z), p=p)])
        d2 = np.minimum(d2, ((z - E[-1]) ** 2).sum(1))
    return np.array(E)  # (K, m)


def lloyd(z, E, iters):
    """Lloyd-Max iterations from E; returns the codebook and the distortion before each update."""
    E, distortions, k_prev = E.copy(), [], None
    for _ in range(iters):
        k = nearest_expanded(z, E)
        distortions.append(in_subspace_distortion(z, E[k]))
        if k_prev is not None and np.array_equal(k, k_prev):
            break  # assignments settled: further updates are no-ops
        counts = np.bincount(k, minlength=len(E))
        sums = np.stack([np.bincount(k, weights=zj, minlength=len(E)) for zj in z.T], 1)  # (K, m)
        live = counts > 0  # an empty cell keeps its code
        E[live] = sums[live] / counts[live, None]
        k_prev = k
    return E, distortions


def pca_basis(x, m):
    """Top-m principal directions of the (zero-mean) data: the second-moment matrix's leading eigenvectors."""
    # No centring: the model x_hat = W q has no bias and the data are zero-mean by construction.
    _, V = np.linalg.eigh(x.T @ x / len(x))
    return V[:, ::-1][:, :m].copy()  # (D, m)


#### Gradient estimators and the loss ##################################################################################


def ste_torch(z, q):
    """Straight-through: forward value exactly q, gradient copied to z."""
    return q.detach() + (z - z.detach())  # straight-through estimator


def rotation_torch(z, q):
    """Rotation estimator (seed 003): forward value exactly q, dL/dz = (dL/dq . u) u with u = (q - z)/|q - z|."""
    u = unit_rows_torch((q - z).detach())
    return q.detach() + ((z - z.detach()) * u).sum(1, keepdim=True) * u


def unit_rows_torch(d):
    n = d.norm(dim=1, keepdim=True)
    return torch.where(n > 0, d / torch.where(n > 0, n, 1.0), 0.0)  # q == z: no direction, no gradient


def ste_backward(g_q, z, q):
    return g_q


def rotation_backward(g_q, z, q):
    d = q - z
    n = np.linalg.norm(d, axis=1, keepdims=True)
    u = np.divide(d, n, out=np.zeros_like(d), where=n > 0)  # q == z: no direction, no gradient
    return (g_q * u).sum(1, keepdims=True) * u


ESTIMATORS = {"ste": (ste_torch, ste_backward), "rotation": (rotation_torch, rotation_backward)}


def vq_loss_torch(W, E, x, alpha, beta, estimator):
    """The VQ-VAE loss on a batch, differentiable in W and E through the chosen estimator."""
    z = x @ W  # (B, m)
    q = E[nearest(z.detach(), E.detach())]  # (B, m)
    x_hat = ESTIMATORS[estimator][0](z, q) @ W.T  # (B, D)
    recon = ((x - x_hat) ** 2).sum(1).mean()
    codebook = ((z.detach() - q) ** 2).sum(1).mean()
    commit = ((z - q.detach()) ** 2).sum(1).mean()
    return recon + alpha * codebook + beta * commit


def autograd_loss_and_grads(W, E, x, alpha, beta, estimator):
    """Loss and Euclidean gradients (dL/dW, dL/dE) by torch autograd."""
    W, E = W.detach().requires_grad_(), E.detach().requires_grad_()
    loss = vq_loss_torch(W, E, x, alpha, beta, estimator)
    g_W, g_E = torch.autograd.grad(loss, (W, E))
    return loss.detach(), g_W, g_E


def manual_loss_and_grads(W, E, x, alpha, beta, estimator):
    """Loss and Euclidean gradients (dL/dW, dL/dE) of the same loss, derived by hand, NumPy only."""
    B = len(x)
    z = x @ W  # (B, m)
    k = nearest(z, E)
    q = E[k]  # (B, m)
    r = q @ W.T - x  # (B, D) residual x_hat - x
    loss = (r**2).sum(1).mean() + (alpha + beta) * ((z - q) ** 2).sum(1).mean()  # both VQ terms equal |z - q|^2
    g_q = (2 / B) * r @ W  # (B, m) dL/dq~ of the reconstruction term
    g_z = ESTIMATORS[estimator][1](g_q, z, q) + (2 * beta / B) * (z - q)  # estimator + commitment
    g_W = (2 / B) * r.T @ q + x.T @ g_z  # decoder path (x_hat = W q~) + encoder path (z = W^T x)
    g_E = np.zeros_like(E)
    np.add.at(g_E, k, (2 * alpha / B) * (q - z))  # only the codebook term reaches E
    return loss, g_W, g_E


#### Riemannian step and the two backends ##############################################################################


def stiefel_step(W, G, lr, xp):
    """One Riemannian SGD step on the Stiefel manifold; xp is numpy or torch (same linalg.svd signature)."""
    WtG = W.T @ G
    xi = G - W @ ((WtG + WtG.T) / 2)  # Riemannian gradient: projection onto the tangent space at W
    U, _, Vt = xp.linalg.svd(W - lr * xi, full_matrices=False)
    return U @ Vt  # polar retraction: the orthonormal matrix nearest to W - lr xi


class ManualVQ:
    """NumPy backend: hand-derived gradients, Riemannian SGD on W, plain SGD on E."""

    def __init__(self, W, E, cfg, estimator):
        self.W, self.E, self.cfg, self.estimator = W.copy(), E.copy(), cfg, estimator

    def step(self, x):
        c = self.cfg
        loss, g_W, g_E = manual_loss_and_grads(self.W, self.E, x, c.alpha, c.beta, self.estimator)
        self.W = stiefel_step(self.W, g_W, c.lr_W, np)
        self.E = self.E - c.lr_E * g_E
        return float(loss)

    def params(self):
        return self.W, self.E


class AutogradVQ:
    """PyTorch backend (float64): autograd gradients, the same Riemannian SGD on W and plain SGD on E."""

    def __init__(self, W, E, cfg, estimator):
        self.W, self.E = torch.tensor(W, dtype=torch.float64), torch.tensor(E, dtype=torch.float64)
        self.cfg, self.estimator = cfg, estimator

    def step(self, x):
        c = self.cfg
        loss, g_W, g_E = autograd_loss_and_grads(self.W, self.E, torch.from_numpy(x), c.alpha, c.beta, self.estimator)
        with torch.no_grad():
            self.W = stiefel_step(self.W, g_W, c.lr_W, torch)
            self.E = self.E - c.lr_E * g_E
        return float(loss)

    def params(self):
        return self.W.numpy(), self.E.numpy()


BACKENDS = {"manual": ManualVQ, "autograd": AutogradVQ}

# method -> (label, backend, estimator); backend None is the two-stage baseline.
METHODS = {
    "pca_lloyd": ("PCA + Lloyd", None, None),
    "autograd_ste": ("Autograd STE", "autograd", "ste"),
    "manual_ste": ("Manual STE", "manual", "ste"),
    "rotation": ("Rotation", "autograd", "rotation"),
}

#### Metrics ###########################################################################################################


def recon_mse(x, x_hat):
    """Reconstruction error |x - x_hat|^2, summed over dimensions, mean over samples."""
    return float(((x - x_hat) ** 2).sum(1).mean())


def in_subspace_distortion(z, q):
    """Quantization error |z - q|^2 inside span(W)."""
    return float(((z - q) ** 2).sum(1).mean())


def out_of_span_energy(x, W):
    """Energy of x outside span(W): |x - W W^T x|^2. Equals recon_mse - in_subspace_distortion (Pythagoras)."""
    return float(((x - (x @ W) @ W.T) ** 2).sum(1).mean())


def usage_stats(k, K):
    """Code-usage entropy (nats), its fraction of log K, and the fraction of codes never used."""
    p = np.bincount(k, minlength=K) / len(k)
    H = float(-(p[p > 0] * np.log(p[p > 0])).sum())
    return {"usage_entropy": H, "entropy_frac": H / math.log(K), "dead_frac": float((p == 0).mean())}


def orthonormality_error(W):
    """|W^T W - I|_F: zero on the Stiefel manifold."""
    return float(np.linalg.norm(W.T @ W - np.eye(W.shape[1])))


def evaluate(W, E, x):
    """All metrics of (W, E) on the samples x."""
    z = x @ W
    k = nearest(z, E)
    q = E[k]
    return {
        "recon_mse": recon_mse(x, q @ W.T),
        "in_sub_dist": in_subspace_distortion(z, q),
        "out_of_span": out_of_span_energy(x, W),
        **usage_stats(k, len(E)),
        "orth_err": orthonormality_error(W),
    }


METRICS = ["recon_mse", "in_sub_dist", "out_of_span", "usage_entropy", "entropy_frac", "dead_frac", "orth_err"]

#### Training ##########################################################################################################


INIT_W = {
    "random": lambda cfg, x, rng: random_stiefel(cfg.D, cfg.m, rng),
    "pca": lambda cfg, x, rng: pca_basis(x, cfg.m),
}


def init_params(cfg, x, rng):
    """Initial W (cfg.init_W) and a k-means++ codebook on z = W^T x."""
    W = INIT_W[cfg.init_W](cfg, x, rng)
    return W, kmeanspp(x @ W, cfg.K, rng)


def fit_pca_lloyd(cfg, data, rng):
    W = pca_basis(data.x_train, cfg.m)
    z = data.x_train @ W
    E, _ = lloyd(z, kmeanspp(z, cfg.K, rng), cfg.lloyd_iters)
    return W, E


def log_steps(cfg):
    return sorted(set(range(0, cfg.steps + 1, cfg.log_every)) | {cfg.steps})


def train(cfg, data, backend, estimator):
    """SGD on the VQ loss; returns the eval-metric history and the final (W, E).

    One seeded Generator draws the init and every minibatch, so two backends with the same cfg see the same
    batches in the same order and their trajectories can be compared step by step.
    """
    rng = np.random.default_rng(cfg.seed)
    model = BACKENDS[backend](*init_params(cfg, data.x_train, rng), cfg, estimator)
    logged, history = set(log_steps(cfg)), [{"step": 0, **evaluate(*model.params(), data.x_eval)}]
    batch = min(cfg.batch, len(data.x_train))
    for t in range(1, cfg.steps + 1):
        model.step(data.x_train[rng.choice(len(data.x_train), batch, replace=False)])
        if t in logged:
            history.append({"step": t, **evaluate(*model.params(), data.x_eval)})
    return history, model.params()


def run_method(cfg, data, method):
    """History and final (W, E) of one of METHODS; the single-shot baseline is logged as a flat line."""
    _, backend, estimator = METHODS[method]
    if backend is not None:
        return train(cfg, data, backend, estimator)
    W, E = fit_pca_lloyd(cfg, data, np.random.default_rng(cfg.seed))
    final = evaluate(W, E, data.x_eval)
    return [{"step": t, **final} for t in log_steps(cfg)], (W, E)


#### Output: CSV, Markdown, PNG ########################################################################################


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def md_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def write_md(path, title, body):
    text = f"## {title}\n\n{body}\n"
    Path(path).write_text(text)
    print(text)
    return text


def plot(path, panels):
    """panels: list of (title, xlabel, ylabel, {label: (xs, ys)}, logx, logy)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (title, xlabel, ylabel, curves, logx, logy) in zip(axes[0], panels):
        for i, (label, (xs, ys)) in enumerate(curves.items()):
            # Distinct dash styles: identical trajectories (manual = autograd = rotation) stay visible.
            ax.plot(xs, ys, marker="o", ms=3, ls=["-", "--", ":", "-."][i % 4], label=label)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        if logx:
            ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def step_curves(histories, key):
    """{method label: (steps, values of key)} for plot()."""
    return {METHODS[m][0]: ([r["step"] for r in h], [r[key] for r in h]) for m, h in histories.items()}


def f4(v):
    return f"{v:.4f}"


def setup_run(cfg):
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    return out, make_data(cfg)


#### Experiment 1: verification (autograd vs manual STE) ###############################################################


def run_verify(cfg):
    out, data = setup_run(cfg)
    runs = {m: run_method(cfg, data, m) for m in ("autograd_ste", "manual_ste")}
    (ha, (Wa, Ea)), (hm, (Wm, Em)) = runs["autograd_ste"], runs["manual_ste"]
    write_csv(out / "verify.csv", [{"method": m, **row} for m, (h, _) in runs.items() for row in h])
    rows = []
    for key in METRICS:
        a, b = ha[-1][key], hm[-1][key]
        traj = max(abs(ra[key] - rm[key]) for ra, rm in zip(ha, hm))  # worst over every logged step
        rel = "-" if key == "orth_err" or a == 0 else f"{abs(a - b) / abs(a):.2e}"  # orth_err is ~0 by design
        rows.append([key, f"{a:.10g}", f"{b:.10g}", f"{abs(a - b):.2e}", rel, f"{traj:.2e}"])
    rows.append(["W (max abs entry)", "", "", f"{np.abs(Wa - Wm).max():.2e}", "", ""])
    rows.append(["E (max abs entry)", "", "", f"{np.abs(Ea - Em).max():.2e}", "", ""])
    header = ["Metric", "Autograd STE", "Manual STE", "Abs diff", "Rel diff", "Max abs diff over trajectory"]
    note = f"D={cfg.D}, m={cfg.m}, K={cfg.K}, r={cfg.r}, N={cfg.n_train}/{cfg.n_eval}, {cfg.steps} steps, float64."
    text = write_md(out / "verify.md", "Verification: autograd vs manual STE", note + "\n\n" + md_table(header, rows))
    gap = [max(max(abs(ra[k] - rm[k]) for k in METRICS), 1e-18) for ra, rm in zip(ha, hm)]  # log axis: 0 -> 1e-18
    plot(out / "verify.png", [
        ("Eval reconstruction MSE", "step", "recon MSE", step_curves({m: h for m, (h, _) in runs.items()},
                                                                      "recon_mse"), False, False),
        ("Largest metric difference (0 drawn at 1e-18)", "step", "max |autograd - manual|",
         {"all metrics": ([r["step"] for r in ha], gap)}, False, True),
    ])
    return text


#### Experiment 2: convergence of the four methods #####################################################################


def final_rows(results, K, base):
    """Table rows of final eval metrics, with the relative recon change against the baseline's."""
    rows = []
    for m, h in results.items():
        f = h[-1]
        vs = "-" if m == "pca_lloyd" else f"{100 * (f['recon_mse'] / base - 1):+.2f}%"
        rows.append([METHODS[m][0], f4(f["recon_mse"]), f4(f["in_sub_dist"]), f4(f["out_of_span"]),
                     f"{f['usage_entropy']:.3f}", f"{100 * f['entropy_frac']:.1f}%", round(f["dead_frac"] * K), vs])
    return rows


def run_convergence(cfg):
    out, data = setup_run(cfg)
    results = {m: run_method(cfg, data, m)[0] for m in METHODS}
    write_csv(out / "convergence.csv", [{"method": m, **row} for m, h in results.items() for row in h])
    header = ["Method", "Recon MSE", "In-sub dist", "Out-of-span", "Usage entropy", "Entropy / log K", "Dead codes",
              "vs PCA+Lloyd"]
    note = (f"D={cfg.D}, m={cfg.m}, K={cfg.K} (log K = {math.log(cfg.K):.3f}), N={cfg.n_train}/{cfg.n_eval}, "
            f"{cfg.steps} steps; final eval metrics.")
    base = results["pca_lloyd"][-1]["recon_mse"]
    text = write_md(out / "convergence.md", "Convergence (all four methods)",
                    note + "\n\n" + md_table(header, final_rows(results, cfg.K, base)))
    plot(out / "convergence.png", [
        ("Eval reconstruction MSE", "step", "recon MSE", step_curves(results, "recon_mse"), False, True),
        ("Eval in-subspace distortion", "step", "|z - q|^2", step_curves(results, "in_sub_dist"), False, True),
    ])
    return text


#### Experiment 3: codebook size scaling ###############################################################################

SCALING_METHODS = ["pca_lloyd", "manual_ste", "rotation"]


def run_scaling(cfg):
    out, data = setup_run(cfg)
    rows = [{"K": K, "method": m, **run_method(replace(cfg, K=K), data, m)[0][-1]}
            for K in cfg.Ks for m in SCALING_METHODS]
    write_csv(out / "scaling.csv", rows)
    main = [[r["K"], METHODS[r["method"]][0], f4(r["recon_mse"]), f4(r["in_sub_dist"]), f"{r['usage_entropy']:.3f}",
             f"{math.log(r['K']):.3f}", f"{100 * r['entropy_frac']:.1f}%", round(r["dead_frac"] * r["K"])]
            for r in rows]
    by = {(r["K"], r["method"]): r for r in rows}
    ratio = [[K] + [f"{by[K, m]['recon_mse'] / by[K, m]['in_sub_dist']:.3f}" for m in SCALING_METHODS]
             + [f4(by[K, m]["out_of_span"]) for m in SCALING_METHODS] for K in cfg.Ks]
    labels = [METHODS[m][0] for m in SCALING_METHODS]
    body = (f"{cfg.steps} steps per gradient run, N={cfg.n_train}/{cfg.n_eval}; final eval metrics.\n\n"
            + md_table(["K", "Method", "Recon MSE", "In-sub dist", "Usage entropy", "log K", "Utilization", "Dead"],
                       main)
            + "\n\nRecon / in-subspace ratio, and the out-of-span energy (= recon - in-sub) behind it:\n\n"
            + md_table(["K"] + [f"{l} ratio" for l in labels] + [f"{l} out-of-span" for l in labels], ratio))
    text = write_md(out / "scaling.md", "Codebook size scaling", body)
    curves = lambda key: {METHODS[m][0]: (cfg.Ks, [by[K, m][key] for K in cfg.Ks]) for m in SCALING_METHODS}
    plot(out / "scaling.png", [("Eval reconstruction MSE vs K", "K", "recon MSE", curves("recon_mse"), True, True),
                               ("Usage entropy / log K", "K", "fraction", curves("entropy_frac"), True, False)])
    return text


#### Experiment 4: commitment ablation #################################################################################

ABLATION_METHODS = ["manual_ste", "rotation"]


def run_ablation(cfg):
    out, data = setup_run(cfg)
    rows = [{"beta": b, "method": m, **run_method(replace(cfg, beta=b), data, m)[0][-1]}
            for b in cfg.betas for m in ABLATION_METHODS]
    write_csv(out / "ablation.csv", rows)
    by = {(r["beta"], r["method"]): r for r in rows}
    table = [[b] + [f4(by[b, m]["recon_mse"]) for m in ABLATION_METHODS]
             + [f"{by[b, m]['usage_entropy']:.3f}" for m in ABLATION_METHODS]
             + [round(by[b, m]["dead_frac"] * cfg.K) for m in ABLATION_METHODS] for b in cfg.betas]
    labels = [METHODS[m][0] for m in ABLATION_METHODS]
    header = ["beta"] + [f"{l} MSE" for l in labels] + [f"{l} entropy" for l in labels] + [f"{l} dead" for l in labels]
    body = f"K={cfg.K}, {cfg.steps} steps, N={cfg.n_train}/{cfg.n_eval}; final eval metrics.\n\n" + md_table(header,
                                                                                                              table)
    text = write_md(out / "ablation.md", "Commitment ablation", body)
    curves = {METHODS[m][0]: (cfg.betas, [by[b, m]["recon_mse"] for b in cfg.betas]) for m in ABLATION_METHODS}
    plot(out / "ablation.png", [("Eval reconstruction MSE vs beta", "beta", "recon MSE", curves, False, False)])
    return text


#### Timing: time per step and peak memory per method ##################################################################


def _proc_kib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])
    raise KeyError(key)


def peak_rss_growth(fn):
    """MiB the resident set grows above its level before fn() at fn's peak (Linux; NaN elsewhere).

    glibc is told to serve every allocation of 64 KiB or more by mmap and to return it at free, so the
    high-water mark follows live buffers (NumPy's and torch's alike) rather than the allocator's cache.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 0)  # M_TRIM_THRESHOLD
        libc.malloc_trim(0)  # give back what is already free, so the baseline is not inflated
        before = _proc_kib("VmRSS:")
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark VmHWM
        fn()
        return (_proc_kib("VmHWM:") - before) / 1024
    except (OSError, KeyError):
        fn()
        return float("nan")


def time_method(cfg, method):
    """Runs in a fresh process: ms per step (median), ms to fit/initialise, and peak memory growth in MiB."""
    data, rng = make_data(cfg), np.random.default_rng(cfg.seed)
    _, backend, estimator = METHODS[method]
    t0 = time.perf_counter()
    params = fit_pca_lloyd(cfg, data, rng) if backend is None else init_params(cfg, data.x_train, rng)
    fit_ms = 1e3 * (time.perf_counter() - t0)
    if backend is None:  # single shot: the memory of the fit is what it costs
        mem = peak_rss_growth(lambda: fit_pca_lloyd(cfg, data, np.random.default_rng(cfg.seed)))
        return {"method": method, "step_ms": float("nan"), "fit_ms": fit_ms, "peak_mib": mem}
    model = BACKENDS[backend](*params, cfg, estimator)
    batches = [data.x_train[rng.choice(len(data.x_train), min(cfg.batch, cfg.n_train), replace=False)]
               for _ in range(cfg.timing_steps)]
    for x in batches[:10]:  # warm-up: first calls pay for lazy initialisation
        model.step(x)
    times = []
    for x in batches:
        t0 = time.perf_counter()
        model.step(x)
        times.append(time.perf_counter() - t0)
    mem = peak_rss_growth(lambda: [model.step(x) for x in batches[:20]])  # after timing: mallopt slows malloc
    return {"method": method, "step_ms": 1e3 * float(np.median(times)), "fit_ms": fit_ms, "peak_mib": mem}


def run_timing(cfg):
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")
    rows = []
    for m in METHODS:  # a fresh process per method so no allocator state or memory peak carries over
        with ctx.Pool(1) as pool:
            rows.append(pool.apply(time_method, (cfg, m)))
    write_csv(out / "timing.csv", rows)
    ref = next(r["step_ms"] for r in rows if r["method"] == "autograd_ste")
    kind = {None: "none (eigh + Lloyd)", "autograd": "automatic (PyTorch)", "manual": "analytical (NumPy)"}
    table = [[METHODS[r["method"]][0],
              "single shot" if math.isnan(r["step_ms"]) else f"{r['step_ms']:.3f}",
              "-" if math.isnan(r["step_ms"]) else f"{r['step_ms'] / ref:.2f}x",
              f"{r['fit_ms']:.1f}", f"{r['peak_mib']:.2f}", kind[METHODS[r["method"]][1]]] for r in rows]
    header = ["Method", "Time per step (ms, median)", "vs Autograd STE", "Fit / init (ms)", "Peak memory growth (MiB)",
              "Gradient computation"]
    blas = os.environ.get("OPENBLAS_NUM_THREADS", "default")
    body = (f"K={cfg.K}, batch={cfg.batch}, D={cfg.D}, m={cfg.m}, float64, {cfg.timing_steps} timed steps; "
            f"threads: torch {torch.get_num_threads()}, OpenBLAS {blas}. Fit/init = PCA + k-means++ + Lloyd for the "
            "baseline, k-means++ for the others. Peak memory = resident-set growth during 20 steps (the whole fit "
            "for the baseline), in a fresh process per method.\n\n" + md_table(header, table))
    return write_md(out / "timing.md", "Computational cost", body)


#### CLI ###############################################################################################################

EXPERIMENTS = {"verify": run_verify, "convergence": run_convergence, "scaling": run_scaling,
               "ablation": run_ablation, "timing": run_timing}


def make_config(experiment, overrides):
    """Defaults, then the experiment's preset, then the command-line flags."""
    return replace(Config(), **{**PRESETS.get(experiment, {}), **overrides})


def parse_args(argv=None):
    common = argparse.ArgumentParser(add_help=False)
    for f in fields(Config):
        d = Config().__getattribute__(f.name)
        kw = dict(nargs="+", type=type(d[0])) if isinstance(d, list) else dict(type=type(d))
        # SUPPRESS: only flags actually given override the experiment presets.
        common.add_argument(f"--{f.name}", default=argparse.SUPPRESS, help=f.metadata["doc"], **kw)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in [*EXPERIMENTS, "all"]:
        sub.add_parser(name, parents=[common])
    args = vars(p.parse_args(argv))
    return args.pop("command"), args


def main(argv=None):
    command, overrides = parse_args(argv)
    t0 = time.perf_counter()
    names = list(EXPERIMENTS) if command == "all" else [command]
    texts = [EXPERIMENTS[n](make_config(n, overrides)) for n in names]
    if command == "all":
        out = Path(make_config("all", overrides).out)
        (out / "summary.md").write_text("\n".join(texts))
    print(f"{command}: {time.perf_counter() - t0:.1f} s, outputs in {make_config(command, overrides).out}")


if __name__ == "__main__":
    main()
