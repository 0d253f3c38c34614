"""Crash safety, bit-exact resume, one-line errors on bad input, and the NaN guard.

Every run is tiny: 256 train / 64 test images (a slice of the bundled sample, written as a CIFAR-10 pickle
folder), batch 32 -> 8 steps per epoch, 3 epochs, ba_vq with K=32, so the beta schedule, the EMA codebook and
the k-means flag all have to survive a restart. Interrupted runs are compared bit for bit (CPU, fp32) with one
uninterrupted reference run.
"""
import hashlib
import json
import math
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import train
import runs
import plumbing
import checkpoint
import vqvae

ROOT = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH, EPOCHS = 8, 3
TOTAL_STEPS = STEPS_PER_EPOCH * EPOCHS
# kill points after epoch 1's last.pt exists and early enough that the run cannot finish first
KILL_STEPS = sorted(random.Random(0).sample(range(STEPS_PER_EPOCH + 1, TOTAL_STEPS - 2), 3))
# one thread in every run, in this process and in the ones it starts: the same arithmetic everywhere, and no
# threads spinning while they wait for a busy core
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# -- helpers --------------------------------------------------------------------------------------------------------

def write_cifar_folder(folder: Path, train_u8: np.ndarray, test_u8: np.ndarray) -> Path:
    """The official cifar-10-batches-py layout: pickled dicts with data (N, 3072) uint8."""
    folder.mkdir(parents=True)
    for name, images in (("data_batch_1", train_u8), ("test_batch", test_u8)):
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": images.reshape(len(images), -1), "labels": [0] * len(images)}, fh)
    return folder


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    with np.load(vqvae.SAMPLE_PATH) as sample:
        train_u8, test_u8 = sample["train"][:STEPS_PER_EPOCH * 32], sample["test"][:64]
    return write_cifar_folder(tmp_path_factory.mktemp("data") / "cifar-10-batches-py", train_u8, test_u8).parent


@pytest.fixture(scope="module")
def small_data_dir(tmp_path_factory):
    """64 train / 32 test images: enough for 4 steps of 16 where a run is slow (bf16 autocast on a CPU)."""
    with np.load(vqvae.SAMPLE_PATH) as sample:
        train_u8, test_u8 = sample["train"][:64], sample["test"][:32]
    return write_cifar_folder(tmp_path_factory.mktemp("small") / "cifar-10-batches-py", train_u8, test_u8).parent


def tiny(data_dir, out_dir, name="run"):
    return ["--data_dir", data_dir, "--out_dir", out_dir, "--name", name, "--arch", "compact", "--quantizer",
            "ba_vq", "--codebook_size", "32", "--batch_size", "32", "--epochs", EPOCHS, "--log_every", "1",
            "--kmeans_iters", "2", "--device", "cpu", "--no_wandb"]


def cli(args):
    return [sys.executable, str(ROOT / "train.py"), *map(str, args)]


def main(args) -> int:
    """The CLI in this process (train.py's main; sys.exit(main()) is all the script adds)."""
    return train.main([str(a) for a in args])


def last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [0]
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line).get("step", 0))
        except json.JSONDecodeError:  # a line being written right now
            pass
    return max(steps)


def launch(args, log: Path) -> subprocess.Popen:
    with open(log, "w") as fh:  # the child keeps its own handle
        return subprocess.Popen(cli(args), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=fh)


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 300):
    """Block until metrics.jsonl records a step >= `step`; fail if the run ends first."""
    deadline = time.monotonic() + timeout
    while last_step(run_dir) < step:
        assert proc.poll() is None, f"run ended (rc {proc.returncode}) before step {step}"
        assert time.monotonic() < deadline, f"step {step} not reached in {timeout}s"
        time.sleep(0.01)


def records_without_times(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "epoch_time"} for r in runs.read_jsonl(run_dir / "metrics.jsonl")]


def assert_same_run(run_dir: Path, reference: Path):
    """Bit for bit: final metrics, final weights (and buffers), and every logged record but the wall times."""
    assert (run_dir / "final_metrics.json").read_bytes() == (reference / "final_metrics.json").read_bytes()
    a = torch.load(run_dir / "final_model.pt")["model"]
    b = torch.load(reference / "final_model.pt")["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert records_without_times(run_dir) == records_without_times(reference)
    assert not list(run_dir.glob(".*.tmp"))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(root: Path) -> dict:
    """Every path below root with its content hash and mtime (folders: just their presence)."""
    return {p.relative_to(root).as_posix(): (digest(p), p.stat().st_mtime_ns) if p.is_file() else "folder"
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """One uninterrupted run through the real CLI: what every interrupted run must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    proc = subprocess.run(cli(tiny(data_dir, out)), cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "run"


# -- crash and resume -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kill_step", KILL_STEPS)
def test_sigkill_then_resume_is_bit_exact(kill_step, reference, data_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    proc = launch(tiny(data_dir, tmp_path), tmp_path / "stderr.txt")
    try:
        wait_for_step(proc, run_dir, kill_step)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "final_metrics.json").exists()
    # the kill may land mid-epoch, in validation or in a checkpoint write: resume from the last whole last.pt
    assert main([*tiny(data_dir, tmp_path), "--resume"]) == 0, capsys.readouterr().err
    assert_same_run(run_dir, reference)


def test_sigterm_mid_epoch_checkpoints_then_resumes_bit_exact(reference, data_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    proc = launch(tiny(data_dir, tmp_path), tmp_path / "stderr.txt")
    try:
        wait_for_step(proc, run_dir, STEPS_PER_EPOCH + 2)  # two steps into epoch 2
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM
    err = (tmp_path / "stderr.txt").read_text().strip().splitlines()
    state = torch.load(run_dir / "last.pt", weights_only=False)
    assert state["epoch"] == 1 and 0 < state["step_in_epoch"] < STEPS_PER_EPOCH  # a mid-epoch checkpoint
    assert err[-1].startswith(f"stopped by SIGTERM after step {state['step']}; checkpoint ") and "--resume" in err[-1]
    assert last_step(run_dir) == state["step"]  # the step under way was finished, nothing after it
    assert main([*tiny(data_dir, tmp_path), "--resume"]) == 0, capsys.readouterr().err
    assert_same_run(run_dir, reference)


@pytest.mark.parametrize("during", ["step", "last_validation"])
def test_sigint_checkpoints_exits_130_and_resumes(during, reference, data_dir, tmp_path, monkeypatch, capsys):
    """SIGINT in the middle of step 4, or while the last epoch is validated: then last.pt is that epoch's, and
    the resumed run has nothing left to train but must still write the same final files."""
    run_dir, calls = tmp_path / "run", []
    target = (vqvae.Trainer, "train_step") if during == "step" else (vqvae, "validate")
    original = getattr(*target)

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == (4 if during == "step" else EPOCHS):
            os.kill(os.getpid(), signal.SIGINT)  # lands mid-call; the handler only sets the stop flag
        return original(*args, **kwargs)

    monkeypatch.setattr(*target, interrupted)
    assert main(tiny(data_dir, tmp_path)) == 128 + signal.SIGINT
    err = capsys.readouterr().err.strip().splitlines()
    state = torch.load(run_dir / "last.pt", weights_only=False)
    assert err[-1].startswith(f"stopped by SIGINT after step {state['step']}; checkpoint ")
    if during == "step":  # step 4 finished, then the checkpoint
        assert (state["epoch"], state["step"], state["step_in_epoch"], state["val_metrics"]) == (0, 4, 4, None)
    else:
        assert (state["epoch"], state["step"], state["step_in_epoch"]) == (EPOCHS, TOTAL_STEPS, 0)
        assert not (run_dir / "final_metrics.json").exists()
    monkeypatch.undo()
    assert main([*tiny(data_dir, tmp_path), "--resume"]) == 0
    assert_same_run(run_dir, reference)


def test_same_seed_gives_identical_final_metrics(reference, data_dir, tmp_path):
    assert main(tiny(data_dir, tmp_path)) == 0  # in this process; the reference ran in its own
    assert (tmp_path / "run" / "final_metrics.json").read_text() == (reference / "final_metrics.json").read_text()
    assert_same_run(tmp_path / "run", reference)


def test_checkpoint_restores_every_rng_state(data_dir, tmp_path):
    """The run's RNG streams (k-means seeding, dead-code restarts draw from them) continue where they were."""
    cfg = vqvae.make_config({"data_dir": str(data_dir), "arch": "compact", "codebook_size": 32, "batch_size": 32,
                             "device": "cpu", "wandb": False})
    trainer = vqvae.Trainer(cfg, tmp_path, torch.device("cpu"))
    trainer.step, trainer.epoch, trainer.step_in_epoch = 11, 1, 3
    checkpoint.save_checkpoint(trainer, "last.pt")

    def draws():
        return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]

    expected = draws()
    vqvae.set_seed(12345)
    trainer.step = trainer.epoch = trainer.step_in_epoch = 0
    checkpoint.restore_trainer(trainer, checkpoint.read_checkpoint(tmp_path / "last.pt"))
    assert draws() == expected
    assert (trainer.step, trainer.epoch, trainer.step_in_epoch) == (11, 1, 3)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_kill_during_a_write_leaves_the_old_file_and_resume_clears_the_rest(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"the previous checkpoint")
    pid = os.fork()
    if pid == 0:  # child: killed half way through writing the new version
        def write(fh):
            fh.write(b"half of the new")
            fh.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            plumbing.atomic_write(path, write)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert path.read_bytes() == b"the previous checkpoint"
    assert len(list(tmp_path.glob(".last.pt.*.tmp"))) == 1  # the partial file, under a temporary name
    checkpoint.prepare_run_dir(vqvae.Config(resume=True), tmp_path, resume=True)
    assert not list(tmp_path.glob(".*.tmp")) and path.read_bytes() == b"the previous checkpoint"


def test_resume_drops_records_after_the_checkpoint_and_a_cut_line(tmp_path):
    log = plumbing.Logger(tmp_path)
    for step in (1, 2, 3):
        log.log({"step": step, "train/loss": 0.5})
    with open(log.path, "a") as fh:
        fh.write('{"step": 4, "train/lo')  # killed mid-line
    log.truncate_after(2)
    assert runs.read_jsonl(log.path) == [{"step": 1, "train/loss": 0.5}, {"step": 2, "train/loss": 0.5}]


# -- numerical safety -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("term, log_every", [("recon_loss", 1), ("mutual_info_loss", 100), ("grad_norm", 1)])
def test_nan_stops_naming_step_and_term_and_keeps_last_checkpoint(term, log_every, data_dir, tmp_path,
                                                                  monkeypatch, capsys):
    """NaN injected into one loss term (or only into the gradients) at one step of epoch 2. With log_every=100
    it is found at the epoch-end check, which must come before that epoch's checkpoint is written."""
    run_dir, bad_step, seen = tmp_path / "run", STEPS_PER_EPOCH + 3, {"steps": 0}
    forward = vqvae.VQVAE.forward

    def poisoned(self, x):
        x_hat, recon_loss, quant_losses, metrics = forward(self, x)
        if self.training:
            seen["steps"] += 1
            if seen["steps"] == bad_step:
                seen["last.pt"] = digest(run_dir / "last.pt")
                if term == "recon_loss":
                    recon_loss = recon_loss * math.nan
                elif term == "grad_norm":  # the loss stays finite, its gradient does not
                    recon_loss.register_hook(lambda g: g * math.nan)
                else:
                    quant_losses = {**quant_losses, term: quant_losses[term] * math.nan}
        return x_hat, recon_loss, quant_losses, metrics

    monkeypatch.setattr(vqvae.VQVAE, "forward", poisoned)
    assert main([*tiny(data_dir, tmp_path), "--log_every", log_every, "--checkpoint_every", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: non-finite {term} at step {bad_step} (epoch 2)")
    assert digest(run_dir / "last.pt") == seen["last.pt"]
    assert torch.load(run_dir / "last.pt", weights_only=False)["epoch"] == 1
    assert {p.name for p in run_dir.glob("*.pt")} == {"last.pt", "checkpoint_epoch1.pt"}
    assert not (run_dir / "final_metrics.json").exists()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_ba_training_at_beta_1e4_stays_finite(precision, small_data_dir, tmp_path, capsys):
    """beta runs 0.5, 2500, 7500, 1e4 over the 4 steps; validation is at 1e4."""
    args = [*tiny(small_data_dir, tmp_path), "--epochs", "1", "--batch_size", "16", "--beta_end", "1e4",
            "--precision", precision]
    assert main(args) == 0, capsys.readouterr().err  # the NaN guard would have stopped it with exit code 1
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert final["beta"] == pytest.approx(1e4)
    records = runs.read_jsonl(tmp_path / "run" / "metrics.jsonl")
    values = [v for r in records for v in r.values()] + list(final.values())
    assert records and all(math.isfinite(v) for v in values)


# -- bad input: one line, exit code 2, nothing created or changed -----------------------------------------------------

def _set(path: str, content: bytes):
    return lambda run_dir: (run_dir / path).write_bytes(content)


def _truncate(run_dir):
    data = (run_dir / "last.pt").read_bytes()
    (run_dir / "last.pt").write_bytes(data[:len(data) // 2])


def _final_as_last(run_dir):
    shutil.copyfile(run_dir / "final_model.pt", run_dir / "last.pt")


RUN = ["--out_dir", "{out}", "--name", "run"]
NEW = ["--out_dir", "{out}", "--name", "new", "--no_wandb"]
BAD_INPUT = {  # id: (args, setup of the existing run, expected message)
    "unknown_flag": ([*RUN, "--codebook_sise", "4"], None,
                     "unknown flag --codebook_sise (did you mean --codebook_size?)"),
    "unknown_yaml_key": ([*RUN, "--config", "{tmp}/typo.yaml"], None,
                         "unknown config key 'beta_strat' (did you mean 'beta_start'?)"),
    "wrong_type_flag": ([*RUN, "--epochs", "two"], None, "invalid int value: 'two'"),
    "wrong_type_yaml": ([*RUN, "--config", "{tmp}/type.yaml"], None, "codebook_size must be int, got 'lots'"),
    "bad_choice": ([*RUN, "--quantizer", "vq"], None, "invalid choice: 'vq'"),
    "codebook_size_1": ([*RUN, "--codebook_size", "1"], None, "codebook_size must be >= 2"),
    "ba_iters_0": ([*RUN, "--ba_iters", "0"], None, "ba_iters must be >= 1"),
    "decay_1": ([*RUN, "--decay", "1.0"], None, "decay must be in (0, 1)"),
    "decay_0": ([*RUN, "--decay", "0"], None, "decay must be in (0, 1)"),
    "commitment_weight_negative": ([*RUN, "--commitment_weight", "-1"], None, "commitment_weight must be >= 0"),
    "codebook_weight_negative": ([*RUN, "--codebook_weight", "-0.5"], None, "codebook_weight must be >= 0"),
    "entropy_weight_negative": ([*RUN, "--entropy_weight", "-0.1"], None, "entropy_weight must be >= 0"),
    "beta_start_0": ([*RUN, "--beta_start", "0"], None, "beta_start must be > 0"),
    "beta_start_negative": ([*RUN, "--beta_start", "-1"], None, "beta_start must be > 0"),
    "batch_size_0": ([*RUN, "--batch_size", "0"], None, "batch_size must be >= 1"),
    "epochs_0": ([*RUN, "--epochs", "0"], None, "epochs must be >= 1"),
    "missing_config_file": ([*RUN, "--config", "{tmp}/absent.yaml"], None, "config file not found"),
    "malformed_yaml": ([*RUN, "--config", "{tmp}/broken.yaml"], None, "malformed YAML in"),
    "resume_unknown_run": ([*NEW, "--resume"], None, "--resume: no checkpoint at"),
    "resume_no_checkpoint": ([*RUN, "--resume"], lambda d: (d / "last.pt").unlink(), "--resume: no checkpoint at"),
    "resume_without_name": (["--out_dir", "{out}", "--resume"], None, "--resume needs --name"),
    "resume_corrupt_checkpoint": ([*RUN, "--resume"], _set("last.pt", b"\x00garbage" * 100),
                                  "corrupt or truncated checkpoint"),
    "resume_truncated_checkpoint": ([*RUN, "--resume"], _truncate, "corrupt or truncated checkpoint"),
    "resume_final_model_as_checkpoint": ([*RUN, "--resume"], _final_as_last, "is not a resumable checkpoint"),
    "resume_changes_the_model": ([*RUN, "--resume", "--codebook_size", "64"], None, "'codebook_size' differs"),
    "resume_data_dir_without_batches": ([*RUN, "--resume", "--data_dir", "{tmp}/junk"], None,
                                        "holds no CIFAR-10 batches"),
    "data_dir_without_batches": ([*NEW, "--data_dir", "{tmp}/junk"], None, "holds no CIFAR-10 batches"),
    "data_dir_broken_batches": ([*NEW, "--data_dir", "{tmp}/broken"], None, "holds no valid CIFAR-10 batches"),
    "existing_run_without_resume": ([*RUN, "--data_dir", "{data}", "--arch", "compact"], None,
                                    "exists; pass --resume to continue it or --overwrite"),
}


@pytest.fixture
def bad_input_env(reference, data_dir, tmp_path):
    """An existing finished run (a copy of the reference) plus the bad files the cases point at."""
    out = tmp_path / "runs"
    shutil.copytree(reference, out / "run")
    (tmp_path / "typo.yaml").write_text("beta_strat: 0.3\n")
    (tmp_path / "type.yaml").write_text("codebook_size: lots\n")
    (tmp_path / "broken.yaml").write_text("codebook_size: [1, 2\nlr: 3\n")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("not CIFAR\n")
    (tmp_path / "broken").mkdir()
    for name in ("data_batch_1", "test_batch"):
        (tmp_path / "broken" / name).write_bytes(b"not a pickle")
    return {"out": out, "tmp": tmp_path, "data": data_dir}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_one_line_exit_2_nothing_changed(case, bad_input_env, capsys):
    args, setup, message = BAD_INPUT[case]
    out = bad_input_env["out"]
    if setup:
        setup(out / "run")
    before = snapshot(bad_input_env["tmp"])
    rc = main([a.format(**bad_input_env) for a in args])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err
    assert snapshot(bad_input_env["tmp"]) == before  # no file changed, created or removed (e.g. no run "new")


def test_bad_input_through_the_script(bad_input_env):
    """The same contract from a separate process: exit code 2, a single stderr line, no traceback."""
    args = [*RUN, "--resume", "--codebook_size", "64"]
    before = snapshot(bad_input_env["tmp"])
    proc = subprocess.run(cli([a.format(**bad_input_env) for a in args]), cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "'codebook_size' differs" in proc.stderr
    assert snapshot(bad_input_env["tmp"]) == before
