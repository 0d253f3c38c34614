"""Sweeps through the real CLI: run, skip finished experiments, resume an interrupted one, summarise."""
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import sweep
import runs

ROOT = Path(__file__).resolve().parents[1]
TINY_SWEEP = {"name": "tiny",
              "base": {"arch": "compact", "codebook_size": 32, "batch_size": 64, "epochs": 1, "log_every": 5,
                       "kmeans_iters": 2},
              "experiments": [{"name": "vq", "key_change": "Standard VQ", "quantizer": "vq_ema"},
                              {"name": "ba", "key_change": "BA, 1 iter", "quantizer": "ba_vq", "ba_iters": 1}]}


def run_sweep_cli(path, out_dir, *flags, env=None):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--sweep", str(path), "--dataset", "cifar10-sample",
                           "--no_wandb", "--out_dir", str(out_dir), *flags], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def read_results(folder):
    with open(folder / "results.csv") as fh:
        return {row["experiment"]: row for row in csv.DictReader(fh)}


@pytest.mark.parametrize("path", sorted((ROOT / "sweeps").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_sweep_files_are_valid(path):
    spec = sweep.read_sweep(path)
    configs = sweep.experiment_configs(spec, None, {"epochs": 1})
    assert len(configs) == len(spec["experiments"]) and all(cfg.epochs == 1 for _, cfg in configs)
    assert all(Path(cfg.out_dir).name == spec["name"] for _, cfg in configs)


def test_sweep_runs_skips_and_resumes(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_SWEEP))
    out = tmp_path / "out"
    sweep_dir = out / "tiny"

    stdout = run_sweep_cli(path, out)
    assert "[1/2] vq: starting" in stdout and "[2/2] ba: starting" in stdout
    results = read_results(sweep_dir)
    assert set(results) == {"vq", "ba"} and results["ba"]["key_change"] == "BA, 1 iter"
    for name in results:
        final = runs.load_run(sweep_dir / name)["final"]
        assert float(results[name]["psnr"]) == pytest.approx(final["psnr"])
    assert runs.load_run(sweep_dir / "ba")["config"]["ba_iters"] == 1  # experiment overrides base
    assert (sweep_dir / "results.md").read_text().count("\n") == 2 + 2  # header, rule, two rows

    # a second invocation skips both finished experiments and leaves their files alone
    watched = [sweep_dir / n / f for n in ("vq", "ba") for f in ("final_model.pt", "metrics.jsonl")]
    mtimes = [p.stat().st_mtime_ns for p in watched]
    stdout = run_sweep_cli(path, out)
    assert "vq: finished, skipping" in stdout and "ba: finished, skipping" in stdout
    assert [p.stat().st_mtime_ns for p in watched] == mtimes

    # interrupted after epoch 1 (last.pt kept, no final metrics) and asked for 2 epochs: resumed, not restarted
    (sweep_dir / "ba" / "final_metrics.json").unlink()
    first_epoch = [r for r in runs.read_jsonl(sweep_dir / "ba" / "metrics.jsonl") if "val/psnr" in r]
    stdout = run_sweep_cli(path, out, "--epochs", "2")
    assert "vq: finished, skipping" in stdout and "ba: resuming" in stdout
    run = runs.load_run(sweep_dir / "ba")
    epochs = [r for r in run["records"] if "val/psnr" in r]
    assert [r["epoch"] for r in epochs] == [1, 2] and epochs[0] == first_epoch[0]
    assert run["final"] is not None and run["final"]["psnr"] == pytest.approx(epochs[1]["val/psnr"])
    results = read_results(sweep_dir)
    assert set(results) == {"vq", "ba"} and float(results["ba"]["psnr"]) == pytest.approx(run["final"]["psnr"])
    assert [p.stat().st_mtime_ns for p in watched[:2]] == mtimes[:2]  # vq still untouched


def test_seeds_key_runs_every_experiment_once_per_seed(tmp_path):
    path = tmp_path / "seeded.yaml"
    path.write_text(yaml.safe_dump({**TINY_SWEEP, "seeds": [3, 4]}))
    configs = sweep.experiment_configs(sweep.read_sweep(path), None, {})
    assert [(cfg.name, cfg.seed) for _, cfg in configs] == [("vq_s3", 3), ("ba_s3", 3), ("vq_s4", 4), ("ba_s4", 4)]
    assert [k for k, _ in configs] == ["Standard VQ", "BA, 1 iter"] * 2
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**TINY_SWEEP, "seeds": [3], "experiments": [
        {"name": "vq", "quantizer": "vq_ema", "seed": 5}]}))
    with pytest.raises(sweep.UserError, match="not both"):
        sweep.read_sweep(bad)


def test_jobs_run_experiments_side_by_side_with_the_results_of_one_by_one(tmp_path):
    """Bit for bit: on the CPU in fp32 (a GPU's autotuning, atomic adds and bf16 are not; tools/gpu_check.py checks
    --jobs there under --deterministic)."""
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_SWEEP))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads per run both ways: the same arithmetic
    exact = ["--device", "cpu"]
    run_sweep_cli(path, tmp_path / "one", *exact, env=env)
    stdout = run_sweep_cli(path, tmp_path / "two", "--jobs", "2", *exact, env=env)
    assert "vq: done" in stdout and "ba: done" in stdout
    for name in ("vq", "ba"):
        one, two = (tmp_path / d / "tiny" / name for d in ("one", "two"))
        assert (two / "final_metrics.json").read_text() == (one / "final_metrics.json").read_text()
        assert "Training complete" in (tmp_path / "two" / "tiny" / "logs" / f"{name}.log").read_text()
    assert read_results(tmp_path / "two" / "tiny").keys() == {"vq", "ba"}
    stdout = run_sweep_cli(path, tmp_path / "two", "--jobs", "2", *exact, env=env)  # the skip rule holds with jobs
    assert "vq: finished, skipping" in stdout and "ba: finished, skipping" in stdout and "done" not in stdout


def test_several_sweeps_share_one_queue_and_write_a_table_each(tmp_path):
    """Two sweep files whose experiments share a name, in one command with --jobs 2: each run in its own sweep's
    folder (config, log), each sweep its own results.csv; --table_only then rebuilds both."""
    paths = []
    for name, K in (("tiny_a", 16), ("tiny_b", 32)):
        spec = {**TINY_SWEEP, "name": name, "base": {**TINY_SWEEP["base"], "codebook_size": K},
                "experiments": TINY_SWEEP["experiments"][:1]}
        paths.append(tmp_path / f"{name}.yaml")
        paths[-1].write_text(yaml.safe_dump(spec))
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--sweep", *map(str, paths), "--jobs", "2",
                           "--dataset", "cifar10-sample", "--no_wandb", "--out_dir", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[1/2] tiny_a/vq: starting" in proc.stdout and "[2/2] tiny_b/vq: starting" in proc.stdout
    for name, K in (("tiny_a", 16), ("tiny_b", 32)):
        assert runs.load_run(tmp_path / name / "vq")["config"]["codebook_size"] == K
        assert "Training complete" in (tmp_path / name / "logs" / "vq.log").read_text()
        assert read_results(tmp_path / name)["vq"]["psnr"]
        (tmp_path / name / "results.csv").unlink()
    run_sweep_cli(paths[0], tmp_path, "--table_only")  # one file, as before
    assert (tmp_path / "tiny_a" / "results.csv").exists() and not (tmp_path / "tiny_b" / "results.csv").exists()
    sweep.run_sweep(paths, flags={"out_dir": str(tmp_path)}, table_only=True)
    assert all(read_results(tmp_path / name)["vq"]["psnr"] for name in ("tiny_a", "tiny_b"))


def test_table_only_rebuilds_the_table_from_the_runs_there_are_and_trains_nothing(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_SWEEP))
    run_sweep_cli(path, tmp_path, "--epochs", "1")
    sweep_dir = tmp_path / "tiny"
    (sweep_dir / "results.csv").unlink()
    for name in ("final_model.pt", "last.pt", "checkpoint_epoch1.pt"):  # a fresh clone holds the small records only
        (sweep_dir / "vq" / name).unlink(missing_ok=True)
    import shutil
    shutil.rmtree(sweep_dir / "ba")  # an experiment never run
    provenance = json.loads((sweep_dir / "vq" / "provenance.json").read_text())
    assert provenance["commit"]  # the commit it ran at (or "unknown" outside a git checkout)
    provenance.update(commit="0123456789abcdef", dirty=True)  # the table's commit comes from the record
    (sweep_dir / "vq" / "provenance.json").write_text(json.dumps(provenance))
    stdout = run_sweep_cli(path, tmp_path, "--table_only")
    assert "starting" not in stdout and not (sweep_dir / "ba").exists()
    results = read_results(sweep_dir)
    assert results["vq"]["psnr"] and not results["ba"]["psnr"]  # the missing run is a row without metrics
    vq, ba = results["vq"], results["ba"]
    assert (vq["commit"], vq["dirty"], ba["commit"]) == ("0123456789abcdef", "True", "")


def test_table_only_without_runs_says_where_it_looked(tmp_path):
    where = re.escape(str(tmp_path / "leaderboard"))
    with pytest.raises(sweep.UserError, match=f"no runs of this sweep in {where} .*--out_dir results"):
        sweep.run_sweep(ROOT / "sweeps" / "leaderboard.yaml", flags={"out_dir": str(tmp_path)}, table_only=True)
    assert not (tmp_path / "leaderboard").exists()
