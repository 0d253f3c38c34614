"""Loading finished runs for analyze.ipynb and the sweeps: records, tables, curves, codes and R(D) points.

A run folder holds config.yaml, metrics.jsonl (train/* records every log_every steps, train_epoch/* means and
val/* metrics every epoch), final_metrics.json, spectrum.json, provenance.json and final_model.pt (see README, "What a
run writes").
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch

import baselines  # noqa: F401  (registers simvq, fsq, wasserstein_vq, cvq)
import vqvae
from vqvae import Batches, Quantizer, VQVAE, load_cifar10, make_config, read_yaml


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # the cut last line of a killed run
            continue
    return records


def find_runs(root: str | Path) -> list[Path]:
    """Every run folder (one holding config.yaml) below root, sorted."""
    return sorted(p.parent for p in Path(root).rglob("config.yaml"))


def read_json(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.exists() else None


def load_run(run_dir: str | Path) -> dict:
    """Config, final metrics, logged records, spectra and provenance (None where the run has not written them: an
    unfinished run, or one from before the file existed) of one run folder."""
    run_dir = Path(run_dir)
    return {"dir": run_dir, "name": run_dir.name,
            "config": read_yaml(run_dir / "config.yaml"),
            "final": read_json(run_dir / "final_metrics.json"),
            "records": read_jsonl(run_dir / "metrics.jsonl"),
            "spectrum": read_json(run_dir / "spectrum.json"),
            "provenance": read_json(run_dir / "provenance.json")}


TABLE_SETTINGS = ("quantizer", "codebook_size", "epochs", "commitment_weight")
TABLE_QUANTIZER_SETTINGS = ("beta_start", "beta_end", "ba_iters", "entropy_weight", "dead_code_threshold")
TABLE_METRICS = ("psnr", "ssim", "lpips", "rfid", "perplexity", "usage_rate", "dead_codes", "train_usage",
                 "train_perplexity", "latent_dim99", "latent_pr", "zq_dim99", "zq_pr", "codebook_dim99", "codebook_pr",
                 "wf_dim", "wf_distortion", "quant_distortion")


def quantizer_keys(name: str) -> Optional[set[str]]:
    """The Config keys the registered quantizer `name` reads (its Params fields); None if it is not registered in
    this process (a run of a quantizer defined elsewhere)."""
    cls = vqvae.QUANTIZERS.get(name)
    return None if cls is None else {f.name for f in dataclasses.fields(cls.Params)}


def quantizer_option_defaults(name: str) -> dict:
    """{option: default} for the options the registered quantizer `name` declares (`vqvae.option` fields of its
    Params); {} if it declares none or is not registered in this process."""
    cls = vqvae.QUANTIZERS.get(name)
    return {} if cls is None else {f.name: f.default for f in dataclasses.fields(cls.Params) if "help" in f.metadata}


def method_label(config: dict) -> str:
    """A run's method for plots and tables: its quantizer, with its options that differ from their defaults in
    parentheses (so CVQ with main.py's data-variance scaling is not pooled with CVQ), plus '+ rotation',
    '+ restarts' and '+ AE warm-up' where they apply (restarts only for quantizers that read dead_code_threshold and
    do not fix it, as ba_seed does)."""
    q = config.get("quantizer", "?")
    changed = [f"{k}={config[k]}" for k, default in quantizer_option_defaults(q).items()
               if k in config and config[k] != default]
    parts = [f"{q} ({', '.join(changed)})" if changed else q]
    if config.get("estimator") == "rotation":
        parts.append("rotation")
    cls = vqvae.QUANTIZERS.get(q)
    forced = getattr(cls, "SEED_OPTIONS", {})
    threshold = forced.get("dead_code_threshold", config.get("dead_code_threshold", 0))
    if "dead_code_threshold" in (quantizer_keys(q) or ()) and threshold and threshold > 0:
        parts.append("restarts")
    if config.get("ae_warmup_steps") or config.get("ae_warmup_frac"):
        parts.append("AE warm-up")
    return " + ".join(parts)


def by_method_and_k(runs: list[dict], metric: str) -> dict[str, dict[int, list[float]]]:
    """{method: {K: [final metric of each finished run (one per seed)]}}, K as the quantizer used it (FSQ's grid
    size when the run reported codebook_size_used)."""
    out: dict[str, dict[int, list[float]]] = {}
    for run in runs:
        final = run["final"]
        if not final or final.get(metric) is None:
            continue
        K = int(final.get("codebook_size_used") or run["config"].get("codebook_size"))
        out.setdefault(method_label(run["config"]), {}).setdefault(K, []).append(final[metric])
    return out


def runs_table(runs: list[dict]) -> list[dict]:
    """One row per loaded run: the settings the seeds varied (None where the run's quantizer has no such
    hyperparameter), final validation metrics (None while unfinished) and wall time (sum of the epoch times)."""
    rows = []
    for run in runs:
        cfg, final = run["config"], run["final"] or {}
        keys = quantizer_keys(cfg.get("quantizer", ""))
        rows.append({"run": run["name"], **{k: cfg.get(k) for k in TABLE_SETTINGS},
                     **{k: cfg.get(k) if keys is None or k in keys else None for k in TABLE_QUANTIZER_SETTINGS},
                     **{k: final.get(k) for k in TABLE_METRICS},
                     "wall_time_s": sum(r.get("epoch_time", 0.0) for r in run["records"]),
                     "commit": commit_label(run.get("provenance"))})
    return rows


def commit_label(provenance: Optional[dict]) -> Optional[str]:
    """A run's commit as tables show it: the short hash, '+dirty' when tracked files differed from it; None for a
    run without provenance.json."""
    if not provenance:
        return None
    commit = provenance.get("commit") or "unknown"
    return (commit[:7] if commit != "unknown" else commit) + ("+dirty" if provenance.get("dirty") else "")


def ranks(x) -> np.ndarray:
    """1-based ranks of x, ties sharing the mean of the ranks they span (as scipy.stats.rankdata's 'average')."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tied = x == v
        r[tied] = r[tied].mean()
    return r


def spearman(x, y) -> float:
    """Spearman's rank correlation: Pearson's r of the ranks. NaN when either side is constant."""
    rx, ry = ranks(x) - (len(x) + 1) / 2, ranks(y) - (len(y) + 1) / 2
    denom = math.sqrt(float((rx ** 2).sum() * (ry ** 2).sum()))
    return float((rx * ry).sum() / denom) if denom else math.nan


def spearman_test(x, y, permutations: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """(rho, two-sided permutation p-value): the share of random pairings of x with y whose |rho| reaches the
    observed one, counting the observed pairing (so p >= 1 / (permutations + 1)). It assumes no distribution of
    the metrics, which suits the few runs (often tied, often skewed) that a study has."""
    rho = spearman(x, y)
    if math.isnan(rho):
        return rho, math.nan
    rng = np.random.default_rng(seed)
    y = np.asarray(y, dtype=float)
    hits = sum(abs(spearman(x, rng.permutation(y))) >= abs(rho) - 1e-12 for _ in range(permutations))
    return rho, (hits + 1) / (permutations + 1)


CURVE_METRICS = ("psnr", "perplexity", "usage_rate", "latent_dim99", "zq_dim99", "codebook_dim99", "wf_dim")


def epoch_curves(run: dict) -> dict[str, np.ndarray]:
    """Validation metrics per epoch: epoch, step and CURVE_METRICS (arrays of one length; NaN where a record has
    no such key, as the dimension columns in runs from before they existed)."""
    recs = [r for r in run["records"] if "val/psnr" in r]
    return {"epoch": np.array([r["epoch"] for r in recs], dtype=int),
            "step": np.array([r["step"] for r in recs], dtype=int),
            **{k: np.array([r.get(f"val/{k}", math.nan) for r in recs], dtype=float) for k in CURVE_METRICS}}


def step_curves(run: dict) -> dict[str, np.ndarray]:
    """Records logged every log_every steps: step, batch perplexity and beta (NaN for quantizers without one)."""
    recs = [r for r in run["records"] if "train/perplexity" in r]
    return {"step": np.array([r["step"] for r in recs], dtype=int),
            "perplexity": np.array([r["train/perplexity"] for r in recs], dtype=float),
            "beta": np.array([r.get("train/beta", math.nan) for r in recs], dtype=float)}


def find_spike(steps, perplexity, beta, window: int = 1) -> tuple[Optional[int], Optional[int]]:
    """(first step where beta reaches 1 from below, or None; first step of the largest rise of the batch
    perplexity, or None): the rise at record i is the mean of records i..i+window-1 minus the mean of the
    `window` records before, so a wider window favours a sustained rise over a single noisy batch.

    Seed 000 reports a perplexity 'spike' when beta crosses 1; this finds both steps to compare them.
    """
    steps, ppl, beta = np.asarray(steps), np.asarray(perplexity, dtype=float), np.asarray(beta, dtype=float)
    crossings = np.nonzero((beta[:-1] < 1) & (beta[1:] >= 1))[0]  # NaN compares False: no beta, no crossing
    cross = int(steps[crossings[0] + 1]) if len(crossings) else None
    if len(ppl) < 2 * window:
        return cross, None
    c = np.concatenate([[0.0], np.cumsum(ppl)])
    i = np.arange(window, len(ppl) - window + 1)
    rise = (c[i + window] - c[i]) - (c[i] - c[i - window])  # window x (mean after - mean before)
    return cross, int(steps[i[np.argmax(rise)]])


def val_images(config: dict) -> torch.Tensor:
    """The uint8 validation images (N, 3, 32, 32) a run with this saved config was validated on."""
    return load_cifar10(make_config(config))[1]


@torch.no_grad()
def code_histogram(model: VQVAE, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Histogram (K,) of the hard codes the model (eval mode, as in validate) gives the uint8 images.
    BA codes depend on the batch (its marginal Q): pass the run's batch_size to reproduce its validation."""
    model.eval()
    device = next(model.parameters()).device
    counts = torch.zeros(model.quantizer.K, dtype=torch.long)
    for x in Batches(images, batch, device, shuffle=False).epoch(0):
        counts += vqvae.code_counts(model(x)[3]["code_indices"], model.quantizer.K, torch.long).cpu()
    return counts


@torch.no_grad()
def latents(model: VQVAE, images: torch.Tensor, n: int, seed: int = 0, batch: int = 256):
    """(e (n, D), idx (n,)): n encoder outputs drawn without replacement from the latents of the uint8 images,
    with the hard codes the model gives them in eval mode (BA: computed on whole batches, as in validate)."""
    model.eval()
    device = next(model.parameters()).device
    es, idxs = [], []
    for x in Batches(images, batch, device, shuffle=False).epoch(0):
        e = model.encoder(x)  # (B, D, 8, 8)
        idxs.append(model.quantizer(e)[2]["code_indices"].reshape(-1).cpu())  # (B*8*8,) in _flatten's order
        es.append(Quantizer._flatten(e).cpu())
    e, idx = torch.cat(es), torch.cat(idxs)
    pick = torch.randperm(len(e), generator=torch.Generator().manual_seed(seed))[:n]
    return e[pick], idx[pick]


def blahut_arimoto_rd(x: torch.Tensor, y: torch.Tensor, beta: float, distortion=None, iters: int = 10_000,
                      tol: float = 1e-12, weights: Optional[torch.Tensor] = None) -> tuple[float, float]:
    """Rate-distortion point of the source samples x against reproductions y at slope -beta, by Blahut-Arimoto
    run to convergence (float64). Returns (rate in bits, expected distortion).

    distortion(x, y) -> (N, M) matrix; default squared Euclidean. weights: source probabilities (default uniform).
    """
    x, y = x.double(), y.double()
    d = distortion(x, y).double() if distortion else torch.cdist(x.reshape(len(x), -1), y.reshape(len(y), -1)) ** 2
    w = (weights.double() / weights.sum()) if weights is not None else torch.full((len(x),), 1.0 / len(x),
                                                                                      dtype=torch.float64)
    log_Q = torch.full((len(y),), -math.log(len(y)), dtype=torch.float64)
    for _ in range(iters):
        log_p = torch.log_softmax(log_Q - beta * d, dim=1)  # (N, M) p(y|x)
        new = torch.logsumexp(log_p + w.log()[:, None], dim=0)
        done = (new.exp() - log_Q.exp()).abs().max() < tol
        log_Q = new
        if done:
            break
    log_p = torch.log_softmax(log_Q - beta * d, dim=1)
    p = log_p.exp()
    rate = (w[:, None] * p * (log_p - log_Q)).nansum().item() / math.log(2)
    return rate, (w[:, None] * p * d).sum().item()


def operating_point(e: torch.Tensor, codebook: torch.Tensor, idx: torch.Tensor) -> tuple[float, float]:
    """(rate in bits, distortion) of the hard codes idx for latents e (N, D): the entropy of their histogram and
    the mean ||e - c_idx||^2, the two quantities blahut_arimoto_rd trades off."""
    probs = vqvae.code_counts(idx, len(codebook), torch.float64) / len(idx)
    probs = probs[probs > 0]
    rate = -(probs * probs.log2()).sum().item()
    return rate, (e.double() - codebook[idx].double()).square().sum(1).mean().item()


def rd_curve(e: torch.Tensor, codebook: torch.Tensor, betas, iters: int = 1000, tol: float = 1e-9) -> np.ndarray:
    """(len(betas), 2) array of (rate in bits, distortion): R(D) of the latents e against the codebook's points.
    tol (on the marginal Q) well above blahut_arimoto_rd's default keeps a plot's dozen points quick."""
    return np.array([blahut_arimoto_rd(e, codebook, float(b), iters=iters, tol=tol) for b in betas])
