"""A user's quantizer in a file of its own (examples/my_quantizer.py, README's example), through the real CLI: it
trains with its option, across a resume that names no import, and in a sweep of parallel jobs."""
import json
import subprocess
import sys
from pathlib import Path

import yaml

import runs
from helpers import as_if_killed_after_epoch_1

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "my_quantizer.py"
TINY = {"dataset": "cifar10-sample", "arch": "compact", "latent_dim": 16, "codebook_size": 16, "batch_size": 64,
        "kmeans_iters": 2, "device": "cpu"}  # CPU: exact resume
FLAGS = [f"--{k}={v}" for k, v in TINY.items()] + ["--no_wandb"]


def train_cli(*args):
    """train.py run as the README says: from the folder that holds the user's file."""
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=EXAMPLE.parent,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_readme_shows_the_example_file():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## How to add a quantizer"):]
    start = section.index("```python\n") + len("```python\n")
    assert section[start:section.index("```", start)] == EXAMPLE.read_text()


def test_the_example_trains_from_the_cli_and_resumes_without_naming_the_import(tmp_path):
    train_cli("--import", "my_quantizer", "--quantizer", "mine", "--mine_alpha", "0.3", *FLAGS, "--epochs", 2,
              "--checkpoint_every", 1, "--out_dir", tmp_path, "--name", "mine")
    run_dir = tmp_path / "mine"
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (config["imports"], config["quantizer"], config["mine_alpha"]) == ("baselines,my_quantizer", "mine", 0.3)
    steps = [r for r in runs.read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]
    assert steps and all(r["train/mine_loss"] > 0 for r in steps)
    straight = json.loads((run_dir / "final_metrics.json").read_text())
    as_if_killed_after_epoch_1(run_dir)
    train_cli("--name", "mine", "--out_dir", tmp_path, "--resume", "--no_wandb")  # config.yaml names the import
    assert json.loads((run_dir / "final_metrics.json").read_text()) == straight  # bit-exact


def test_the_example_runs_in_a_sweep_of_parallel_jobs(tmp_path):
    spec = {"name": "mine", "base": {**TINY, "epochs": 1, "quantizer": "mine"},
            "experiments": [{"name": "off", "mine_alpha": 0.0}, {"name": "on", "mine_alpha": 0.3}]}
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(spec))
    # each experiment in a process of its own, which reads its config and imports the module from it
    train_cli("--import", "my_quantizer", "--sweep", tmp_path / "mine.yaml", "--jobs", 2, "--no_wandb",
              "--out_dir", tmp_path)
    finals = {name: runs.load_run(tmp_path / "mine" / name) for name in ("off", "on")}
    assert all(run["config"]["imports"] == "baselines,my_quantizer" for run in finals.values())
    assert finals["off"]["final"]["mine_loss"] == 0 < finals["on"]["final"]["mine_loss"]


def test_without_the_import_the_error_says_what_to_do():
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--quantizer", "mine"], cwd=EXAMPLE.parent,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "invalid choice: 'mine'" in proc.stderr and "--import MODULE" in proc.stderr
