"""Devices, checked on any machine: a device that is not there stops the run with one line before anything is
written, torchrun with more processes than GPUs names the fix, metrics may live on any device, and --deterministic
sets its switches (CPU fp32 runs are exact with or without it). The CUDA checks themselves: tests/test_cuda.py."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoint
import train as train_cli
import vqvae

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = {"dataset": "cifar10-sample", "arch": "compact", "latent_dim": 16, "codebook_size": 16, "batch_size": 64,
          "kmeans_iters": 2, "wandb": False, "epochs": 1, "device": "cpu"}
ABSENT = [("cuda", "CUDA is not available")] if not torch.cuda.is_available() else \
    [(f"cuda:{torch.cuda.device_count()}", f"has {torch.cuda.device_count()} GPU(s)")]
if not torch.backends.mps.is_available():
    ABSENT.append(("mps", "MPS is not available"))
ABSENT.append(("tpu", "device must be auto, cpu, cuda, cuda:N or mps"))


@pytest.mark.parametrize("device, message", ABSENT)
def test_a_device_not_on_this_machine_stops_with_one_line_before_writing(device, message, tmp_path, capsys):
    rc = train_cli.main(["--dataset", "cifar10-sample", "--no_wandb", "--out_dir", str(tmp_path), "--name", "run",
                         "--device", device])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not any(tmp_path.iterdir())


def test_more_processes_than_gpus_names_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")  # every process stops, not only those without a GPU of their own
    for device in ("cuda", "auto"):
        with pytest.raises(vqvae.UserError, match=r"2 processes .* 1 GPU\(s\): use --nproc_per_node=1 or fewer .* "
                                                  r"--device cpu"):
            vqvae.ddp_device(device, rank=0)


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this machine has a GPU for each of the two processes")
def test_torchrun_on_cuda_without_a_gpu_per_process_stops_every_rank_before_writing(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           "--dataset", "cifar10-sample", "--no_wandb", "--device", "cuda", "--out_dir", str(tmp_path), "--name", "r"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    expected = "CUDA is not available" if not torch.cuda.is_available() else "--nproc_per_node=1 or fewer"
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert proc.returncode != 0 and lines and all(expected in ln for ln in lines), proc.stderr[-3000:]
    assert str(ROOT / "vqvae.py") not in proc.stderr  # no traceback through the project's code
    assert not any(tmp_path.iterdir())


def test_metrics_as_numbers_or_scalars_on_another_device_are_logged_and_averaged(tmp_path):
    """A quantizer may report a Python number or a CPU scalar whatever the device (on CUDA both used to crash
    validation); the loops move them to the run's device."""
    assert vqvae.is_scalar(0.5) and vqvae.is_scalar(torch.tensor(1.0)) and not vqvae.is_scalar(torch.zeros(3))
    v = vqvae.as_scalar(torch.tensor(2, dtype=torch.int64), torch.device("cpu"))
    assert v.dtype == torch.float32 and v.dim() == 0 and v.item() == 2.0

    @vqvae.register_quantizer("vq_ema_reporting")
    class Reporting(vqvae.VQEMAQuantizer):
        def quantize(self, e):
            q = super().quantize(e)
            return q._replace(metrics={**q.metrics, "a_number": 0.25, "a_cpu_scalar": torch.tensor(0.5)})

    try:
        final = vqvae.train(vqvae.make_config({**SAMPLE, "quantizer": "vq_ema_reporting", "out_dir": str(tmp_path),
                                               "name": "r"}))
    finally:
        del vqvae.QUANTIZERS["vq_ema_reporting"]
    assert final["a_number"] == 0.25 and final["a_cpu_scalar"] == 0.5


def test_deterministic_sets_its_switches_and_leaves_a_cpu_run_unchanged(tmp_path):
    had_workspace = "CUBLAS_WORKSPACE_CONFIG" in os.environ
    try:
        plain = vqvae.train(vqvae.make_config({**SAMPLE, "out_dir": str(tmp_path), "name": "plain"}))
        assert not torch.are_deterministic_algorithms_enabled()
        exact = vqvae.train(vqvae.make_config({**SAMPLE, "out_dir": str(tmp_path), "name": "exact",
                                               "deterministic": True}))
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] in (":4096:8", ":16:8")  # a value cuBLAS accepts
    finally:
        vqvae.set_deterministic(False)
        if not had_workspace:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    assert exact == plain  # CPU fp32 is exact either way: the mode only matters on CUDA
    assert "deterministic" in checkpoint.RESUMABLE_CHANGES  # a run may be continued with or without it


def test_importing_the_project_puts_the_cublas_setting_in_force_before_any_gemm():
    """cuBLAS reads CUBLAS_WORKSPACE_CONFIG once, at a process's first GEMM, and --deterministic may be turned on
    after GEMMs ran (a notebook, the suite, a sweep): the entry points set it when they import the project."""
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    code = "import os, train; print(os.environ.get('CUBLAS_WORKSPACE_CONFIG'))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == ":4096:8", proc.stderr[-2000:]


def test_deterministic_after_a_gemm_holds_or_refuses_when_cublas_may_hold_another_setting(monkeypatch):
    a = torch.randn(64, 64)
    a @ a
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # as if that GEMM had started cuBLAS
    try:
        vqvae.set_deterministic(True)  # the setting the import put in place: in force from the first GEMM
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        vqvae.set_deterministic(False)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")  # cuBLAS started without it: setting it now would change nothing
    with pytest.raises(vqvae.UserError, match="CUBLAS_WORKSPACE_CONFIG=:4096:8"):
        vqvae.set_deterministic(True)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    monkeypatch.setattr(vqvae.plumbing, "_CUBLAS_AT_START", None)  # CUDA at work before the project's import
    with pytest.raises(vqvae.UserError, match="may have started without it"):
        vqvae.set_deterministic(True)
    assert not torch.are_deterministic_algorithms_enabled()
