"""Sweeps: a shared base config plus named experiments, run in order into <out_dir>/<sweep>/<experiment>.

    python train.py --sweep sweeps/seed_ablation.yaml                       # full size (train.py parses the flags)
    python train.py --sweep sweeps/seed_ablation.yaml --epochs 2 --dataset cifar10-sample --no_wandb
    python train.py --sweep sweeps/leaderboard.yaml sweeps/leaderboard_d8.yaml --jobs 2   # one queue, two tables

Sweep file:
    name: seed_ablation            # folder under out_dir (default: the file's stem)
    base: {arch: compact, ...}     # config keys shared by every experiment
    seeds: [1337, 1, 2]            # optional: every experiment once per seed, as <name>_s<seed>
    experiments:
      - {name: baseline, key_change: Standard VQ, quantizer: vq_ema}
      - ...

`--table_only` trains nothing and writes results.csv and results.md from the run folders there are (a fresh clone's
committed records rebuild a table this way). Each row carries the commit its run trained at and whether tracked files
differed from it (`commit`, `dirty`, from the run's provenance.json; empty for runs from before it existed).

Precedence: defaults < --config file < base < experiment < command-line flags. A finished experiment
(final_metrics.json present) is skipped; an interrupted one (last.pt present) is resumed. At the end
results.csv and results.md summarise every experiment, best PSNR first.

`--jobs N` runs N experiments at a time, each in its own process (`python train.py --config <its config>`), on the
same device; each one's output goes to <out_dir>/<sweep>/logs/<experiment>.log. On the CPU each process takes
(cores / N) threads unless OMP_NUM_THREADS says otherwise. A run's result does not depend on what runs beside it.
"""
from __future__ import annotations

import csv
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import yaml

import runs
import vqvae
from vqvae import UserError

SETTING_COLUMNS = ["experiment", "key_change", "quantizer", "codebook_size", "seed"]
HEADLINE_COLUMNS = ["psnr", "perplexity", "usage_rate", "dead_codes", "wall_time_s", "commit", "dirty"]


def read_sweep(path: str | Path) -> dict:
    spec = vqvae.read_yaml(path)
    unknown = set(spec) - {"name", "base", "seeds", "experiments"}
    if unknown:
        raise UserError(f"{path}: unknown sweep keys {sorted(unknown)} (expected name, base, seeds, experiments)")
    experiments = spec.get("experiments") or []
    if not experiments or not all(isinstance(e, dict) and e.get("name") for e in experiments):
        raise UserError(f"{path}: 'experiments' must be a list of mappings, each with a name")
    seeds = spec.get("seeds")
    if seeds is not None:
        if not (isinstance(seeds, list) and seeds and all(type(s) is int for s in seeds)):
            raise UserError(f"{path}: 'seeds' must be a non-empty list of integers")
        if any("seed" in e for e in experiments):
            raise UserError(f"{path}: give seeds either in 'seeds' or per experiment, not both")
        # seed-major order: a sweep stopped early has every experiment at the first seeds
        experiments = [{**e, "name": f"{e['name']}_s{s}", "seed": s} for s in seeds for e in experiments]
    names = [e["name"] for e in experiments]
    if len(set(names)) != len(names):
        raise UserError(f"{path}: experiment names must be unique")
    return {"name": spec.get("name") or Path(path).stem, "base": spec.get("base") or {}, "experiments": experiments}


def experiment_configs(spec: dict, config_file: Optional[str], flags: dict) -> list[tuple[str, vqvae.Config]]:
    """(key_change, Config) for every experiment, validated up front so a typo fails before hours of training."""
    file_values = vqvae.read_yaml(config_file) if config_file else {}
    out_dir = Path(flags.get("out_dir", file_values.get("out_dir", vqvae.Config.out_dir))) / spec["name"]
    configs = []
    for exp in spec["experiments"]:
        overrides = {k: v for k, v in exp.items() if k != "key_change"}
        values = {**file_values, **spec["base"], **overrides, **flags, "out_dir": str(out_dir), "name": exp["name"]}
        configs.append((exp.get("key_change", ""), vqvae.make_config(values)))
    return configs


def run_sweep(paths: str | Path | list, config_file: Optional[str] = None, flags: Optional[dict] = None,
              jobs: int = 1, table_only: bool = False) -> list[dict]:
    """Train the unfinished experiments of one sweep file or several (unless table_only), then write each sweep's
    results.csv and results.md from every run folder there is. Several files share one queue, in file order, so
    with --jobs no slot idles at the end of one sweep while the next has runs. Returns the last sweep's rows."""
    if jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {jobs}")
    sweeps = [_sweep_configs(p, config_file, flags or {}, table_only)
              for p in (paths if isinstance(paths, (list, tuple)) else [paths])]
    queue = [cfg for _, configs in sweeps for _, cfg in configs]
    todo = []
    for i, cfg in enumerate([] if table_only else queue, 1):
        run_dir = Path(cfg.out_dir) / cfg.name
        label = cfg.name if len(sweeps) == 1 else f"{Path(cfg.out_dir).name}/{cfg.name}"
        if (run_dir / "final_metrics.json").exists():
            print(f"[{i}/{len(queue)}] {label}: finished, skipping")
            continue
        resume = (run_dir / "last.pt").exists()
        print(f"[{i}/{len(queue)}] {label}: {'resuming' if resume else 'starting'}", flush=True)
        todo.append(dataclasses.replace(cfg, resume=resume, overwrite=not resume))
        if jobs == 1:
            vqvae.train(todo[-1])
    if jobs > 1:
        run_in_parallel(todo, jobs)
    rows = []
    for folder, configs in sweeps:
        rows = collect_results(configs)
        write_results(rows, folder)
    return rows


def _sweep_configs(path, config_file, flags, table_only) -> tuple[Path, list[tuple[str, vqvae.Config]]]:
    """(the sweep's folder, its (key_change, config) pairs); with table_only, an error when it has no run there."""
    spec = read_sweep(path)
    configs = experiment_configs(spec, config_file, flags)
    folder = Path(configs[0][1].out_dir)
    if table_only and not any((folder / cfg.name / "config.yaml").exists() for _, cfg in configs):
        raise UserError(f"--table_only: no runs of this sweep in {folder} (--out_dir names the folder holding "
                        f"{spec['name']}/, e.g. --out_dir results for the committed records)")
    return folder, configs


def run_in_parallel(configs: list[vqvae.Config], jobs: int):
    """Each config in a process of its own, `jobs` at a time; raises UserError naming the runs that failed."""
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // jobs))
    pending, running, failed = list(configs), [], []
    with tempfile.TemporaryDirectory() as tmp:
        while pending or running:
            while pending and len(running) < jobs:
                cfg = pending.pop(0)
                running.append((cfg, _launch(cfg, Path(tmp), threads)))
            time.sleep(0.2)
            for cfg, proc in [r for r in running if r[1].poll() is not None]:
                running.remove((cfg, proc))
                print(f"{cfg.name}: {'done' if proc.returncode == 0 else f'failed (exit {proc.returncode})'}",
                      flush=True)
                if proc.returncode != 0:
                    failed.append(cfg.name)
    if failed:
        log_dirs = ", ".join(dict.fromkeys(str(Path(cfg.out_dir) / "logs") for cfg in configs))
        raise UserError(f"{len(failed)} of {len(configs)} experiments failed: {', '.join(failed)} (see {log_dirs})")


def _launch(cfg: vqvae.Config, tmp: Path, threads: str) -> subprocess.Popen:
    """`python train.py --config <cfg>` with its output in <out_dir>/logs/<name>.log."""
    config = tmp / Path(cfg.out_dir).name / f"{cfg.name}.yaml"  # sweeps sharing a queue may share names
    config.parent.mkdir(exist_ok=True)
    config.write_text(yaml.safe_dump(vqvae.config_to_dict(cfg), sort_keys=False))
    log = Path(cfg.out_dir) / "logs" / f"{cfg.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:  # the child keeps its own handle
        return subprocess.Popen([sys.executable, str(Path(__file__).resolve().parent / "train.py"), "--config",
                                 str(config)], stdout=fh, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": threads})


def collect_results(configs: list[tuple[str, vqvae.Config]]) -> list[dict]:
    """One row per experiment: its settings, wall time, every key of its final_metrics.json and its commit (None
    while unfinished), best PSNR first."""
    rows = []
    for key_change, cfg in configs:
        run_dir = Path(cfg.out_dir) / cfg.name
        run = runs.load_run(run_dir) if (run_dir / "config.yaml").exists() else {"final": None, "records": []}
        provenance = run.get("provenance") or {}
        rows.append({"experiment": cfg.name, "key_change": key_change, "quantizer": cfg.quantizer,
                     "codebook_size": cfg.codebook_size, "seed": cfg.seed, **{k: None for k in HEADLINE_COLUMNS},
                     **(run["final"] or {}), "wall_time_s": sum(r.get("epoch_time", 0) for r in run["records"]),
                     "commit": provenance.get("commit"), "dirty": provenance.get("dirty")})
    return sorted(rows, key=lambda r: -(r["psnr"] if r["psnr"] is not None else -1e9))


def write_results(rows: list[dict], folder: Path):
    columns = list(dict.fromkeys(SETTING_COLUMNS + HEADLINE_COLUMNS + [k for r in rows for k in r]))
    with open(folder / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    (folder / "results.md").write_text(results_markdown(rows))
    print(f"results: {folder / 'results.md'}")


def results_markdown(rows: list[dict]) -> str:
    def fmt(v, spec):
        return "—" if v is None else format(v, spec)
    lines = ["| Experiment | Key change | PSNR (dB) | Perplexity | Usage | Dead codes | Wall time |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        usage = "—" if r["usage_rate"] is None else f"{100 * r['usage_rate']:.1f}%"
        lines.append(f"| {r['experiment']} | {r['key_change']} | {fmt(r['psnr'], '.2f')} | "
                     f"{fmt(r['perplexity'], '.1f')} | {usage} | {fmt(r['dead_codes'], 'd')} | "
                     f"{time.strftime('%H:%M:%S', time.gmtime(r['wall_time_s']))} |")
    return "\n".join(lines) + "\n"
