"""The dimension study's tables and figure (LEADERBOARD.md, "Dimension"; sweeps/dimension.yaml), from the run folders.

    python tools/dimension_study.py results/dimension                 # Markdown on stdout
    python tools/dimension_study.py results/dimension --figure figures/dimension_psnr.png

Three tables over the finished runs, each K (codebook size) apart, since PSNR moves with K:
- Spearman's rank correlation of PSNR with each dimension column and with usage, and its two-sided permutation
  p-value (runs.spearman_test): does dimension or usage order the runs' PSNR better;
- what an AE warm-up of 25 % buys each method: the mean ± std over seeds with and without it, the difference, and
  whether it exceeds the seed spread (every seed of one above every seed of the other; a single seed per side
  shows, it does not conclude);
- the warm-up-length curve: every warm-up fraction a method ran at, one row each (mean over its seeds).
The figure: PSNR against the latents' 99 % dimension and against usage, one row per K; one marker per method,
filled without warm-up and hollow with it. The spectra figure (--spectra): each run's eigenvalues of the latents'
covariance (spectrum.json), one panel per K and method, a colour per warm-up length and a line style per seed, with
each run's water-filling level θ at log2 K bits dotted in its colour: the directions above θ get bits.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import runs  # noqa: E402
from summarize_sweep import fmt  # noqa: E402  (mean ± std cells, as the sweep tables write them)

PREDICTORS = [("latent_dim99", "dim99 e"), ("zq_dim99", "dim99 z_q"), ("codebook_dim99", "dim99 codes"),
              ("latent_pr", "PR e"), ("usage_rate", "usage"), ("perplexity", "perplexity"),
              ("train_usage", "train usage")]
WARMUP_COLUMNS = [("psnr", "PSNR (dB)", 1, ".2f"), ("rfid", "rFID", 1, ".1f"), ("latent_dim99", "dim99 e", 1, ".1f"),
                  ("codebook_dim99", "dim99 codes", 1, ".1f"), ("usage_rate", "usage (%)", 100, ".1f")]


def base_method(config: dict) -> str:
    """The run's method without its warm-up: the rows a warm-up is compared within."""
    return runs.method_label({**config, "ae_warmup_steps": 0, "ae_warmup_frac": 0.0}) + (
        " + top-16" if config.get("ba_topk") else "")


def warmup(run: dict) -> float:
    """The share of the run's steps spent in an AE warm-up: ae_warmup_frac, or ae_warmup_steps over the run's last
    recorded step (its total), rounded to a percent so that runs of one fraction group together."""
    config = run["config"]
    if config.get("ae_warmup_steps"):
        total = max((r["step"] for r in run["records"] if "step" in r), default=0)
        return round(config["ae_warmup_steps"] / total, 2) if total else math.nan
    return float(config.get("ae_warmup_frac") or 0.0)


def finished_runs(folder: Path) -> list[dict]:
    return [r for r in map(runs.load_run, runs.find_runs(folder)) if r["final"]]


def by_k(done: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for r in done:
        out.setdefault(int(r["config"]["codebook_size"]), []).append(r)
    return dict(sorted(out.items(), reverse=True))


def values(group: list[dict], key: str, scale: float = 1) -> list[float]:
    return [scale * r["final"][key] for r in group if r["final"].get(key) is not None]


def mean_std(v: list[float], spec: str, of: int = 0) -> str:
    """Mean ± std; "(1 seed)" etc. when fewer values than `of`, the runs of the cell (summarize_sweep.fmt)."""
    return fmt(v, 1, spec, of=of or None)


def verdict(without: list[float], with_: list[float]) -> str:
    """'ahead' / 'behind' when every seed of the warm-up runs is above / below every seed without it; a single seed
    a side can only show."""
    if not without or not with_:
        return "—"
    if min(with_) > max(without):
        word = "ahead"
    elif max(with_) < min(without):
        word = "behind"
    else:
        return "within the seed spread"
    return word + (" (one seed a side: shows, does not conclude)" if min(len(without), len(with_)) < 2 else "")


def p_text(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p {p:.3f}"


def rho_text(x: list[float], y: list[float]) -> str:
    """"Spearman ρ +0.80 (p < 0.001)"; a constant x or y (every code in use, say) has no rank order to correlate."""
    rho, p = runs.spearman_test(x, y)
    return "Spearman ρ undefined (no spread)" if math.isnan(rho) else f"Spearman ρ {rho:+.2f} ({p_text(p)})"


def correlation_table(groups: dict[int, list[dict]]) -> str:
    lines = ["| K | runs | " + " | ".join(name for _, name in PREDICTORS) + " |",
             "|---|---|" + "---|" * len(PREDICTORS)]
    for K, group in groups.items():
        cells = []
        for key, _ in PREDICTORS:
            pairs = [(r["final"][key], r["final"]["psnr"]) for r in group if r["final"].get(key) is not None]
            if len(pairs) < 3:
                cells.append("—")
                continue
            rho, p = runs.spearman_test(*zip(*pairs))
            cells.append("—" if math.isnan(rho) else f"{rho:+.2f} ({p_text(p)})")
        lines.append(f"| {K:,} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def warmup_table(groups: dict[int, list[dict]], fraction: float = 0.25) -> str:
    head = " | ".join(f"{name} 0 → {100 * fraction:.0f} %" for _, name, _, _ in WARMUP_COLUMNS)
    lines = [f"| K | method | seeds | {head} | Δ PSNR (dB) | warm-up's PSNR |",
             "|---|---|---|" + "---|" * (len(WARMUP_COLUMNS) + 2)]
    for K, group in groups.items():
        for method in sorted({base_method(r["config"]) for r in group}):
            rows = [r for r in group if base_method(r["config"]) == method]
            off = [r for r in rows if warmup(r) == 0]
            on = [r for r in rows if warmup(r) == fraction]
            if not off or not on:
                continue
            cells = [f"{mean_std(values(off, k, s), spec, len(off))} → {mean_std(values(on, k, s), spec, len(on))}"
                     for k, _, s, spec in WARMUP_COLUMNS]
            a, b = values(off, "psnr"), values(on, "psnr")
            lines.append(f"| {K:,} | {method} | {len(off)} / {len(on)} | " + " | ".join(cells) +
                         f" | {statistics.mean(b) - statistics.mean(a):+.2f} | {verdict(a, b)} |")
    return "\n".join(lines)


def curve_table(groups: dict[int, list[dict]]) -> str:
    lines = ["| K | method | warm-up | seeds | PSNR (dB) | rFID | dim99 e | dim99 codes | usage (%) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for K, group in groups.items():
        for method in sorted({base_method(r["config"]) for r in group}):
            fractions = sorted({warmup(r) for r in group if base_method(r["config"]) == method})
            if len(fractions) < 3:  # the curve rows only: two fractions are the table above
                continue
            for f in fractions:
                rows = [r for r in group if base_method(r["config"]) == method and warmup(r) == f]
                cells = [mean_std(values(rows, k, s), spec, len(rows)) for k, _, s, spec in WARMUP_COLUMNS]
                lines.append(f"| {K:,} | {method} | {100 * f:.0f} % | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else "(no method has run three warm-up lengths yet)"


def figure(groups: dict[int, list[dict]], path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    methods = sorted({base_method(r["config"]) for g in groups.values() for r in g})
    style = {m: {"color": f"C{i % 10}", "marker": "os^Dv<>pP*"[i % 10]} for i, m in enumerate(methods)}
    fig, axes = plt.subplots(len(groups), 2, figsize=(12, 4.2 * len(groups)), squeeze=False)
    for row, (K, group) in zip(axes, groups.items()):
        for ax, key, label, scale in [(row[0], "latent_dim99", "99 % dimension of the latents e", 1),
                                      (row[1], "usage_rate", "usage (% of codes used on validation)", 100)]:
            for r in group:
                st = style[base_method(r["config"])]
                ax.scatter(scale * r["final"][key], r["final"]["psnr"], s=45, marker=st["marker"],
                           edgecolors=st["color"], facecolors="none" if warmup(r) else st["color"])
            rho = rho_text(values(group, key), values(group, "psnr"))
            ax.set(xlabel=label, ylabel="PSNR (dB)", title=f"K = {K:,}: {rho}, {len(group)} runs")
            ax.grid(alpha=0.3)
    handles = [Line2D([], [], ls="", color=s["color"], marker=s["marker"], label=m) for m, s in style.items()]
    handles += [Line2D([], [], ls="", color="k", marker="o", label="no warm-up"),
                Line2D([], [], ls="", color="k", marker="o", markerfacecolor="none", label="AE warm-up")]
    axes[0][1].legend(handles=handles, fontsize=8, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")


def spectra_figure(groups: dict[int, list[dict]], path: Path) -> list[tuple[int, str, int]]:
    """Draws the figure; returns its panels as (K, method, runs drawn)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    import vqvae

    panels = [(K, m, [r for r in g if base_method(r["config"]) == m and r.get("spectrum")])
              for K, g in groups.items() for m in sorted({base_method(r["config"]) for r in g})]
    panels = [p for p in panels if p[2]]
    fractions = sorted({warmup(r) for _, _, rs in panels for r in rs})
    seeds = sorted({r["config"]["seed"] for _, _, rs in panels for r in rs})
    cols = min(3, len(panels))
    fig, axes = plt.subplots(-(-len(panels) // cols), cols, figsize=(5.2 * cols, 3.6 * -(-len(panels) // cols)),
                             squeeze=False, sharey=True)
    for ax, (K, method, rs) in zip(axes.flat, panels):
        for r in sorted(rs, key=lambda r: (warmup(r), r["config"]["seed"])):
            lam = torch.tensor(r["spectrum"]["latent_eigvals"], dtype=torch.float64)
            theta, d_wf, _ = vqvae.water_filling(lam, r["spectrum"]["bits"])
            color = f"C{fractions.index(warmup(r))}"
            ls = ["-", "--", ":", "-."][seeds.index(r["config"]["seed"]) % 4]
            ax.semilogy(range(1, len(lam) + 1), lam.numpy(), color=color, ls=ls, lw=1.2,
                        label=f"warm-up {100 * warmup(r):.0f} %, seed {r['config']['seed']} (d_WF {d_wf})")
            ax.axhline(theta, color=color, ls=(0, (1, 3)), lw=0.9)
        ax.set(title=f"{method}, K = {K:,}", xlabel="rank")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("eigenvalue of e's covariance")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    return [(K, method, len(rs)) for K, method, rs in panels]


def report(folder: Path) -> str:
    groups = by_k(finished_runs(folder))
    if not groups:
        raise SystemExit(f"no finished runs (holding final_metrics.json) under {folder}")
    return "\n\n".join([
        "Rank correlation with PSNR (Spearman ρ, permutation p):\n\n" + correlation_table(groups),
        "AE warm-up of 25 % against none (mean ± std over seeds):\n\n" + warmup_table(groups),
        "Warm-up length:\n\n" + curve_table(groups)]) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path, help="the sweep's folder, e.g. results/dimension")
    parser.add_argument("--figure", type=Path, help="also draw PSNR against dimension and usage into this PNG")
    parser.add_argument("--spectra", type=Path, help="also draw the latents' spectra, by method, into this PNG")
    args = parser.parse_args(argv)
    print(report(args.folder), end="")
    if args.figure:
        figure(by_k(finished_runs(args.folder)), args.figure)
        print(f"figure: {args.figure}")
    if args.spectra:
        spectra_figure(by_k(finished_runs(args.folder)), args.spectra)
        print(f"figure: {args.spectra}")


if __name__ == "__main__":
    main()
