"""End to end through the real CLI on the bundled sample: files written, checkpoints, resume, config precedence.
Bad input, crashes and interrupts: tests/test_reliability.py."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import runs
import vqvae

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "cifar10-sample", "--arch", "compact", "--codebook_size", "32", "--batch_size", "64",
        "--no_wandb", "--log_every", "3", "--kmeans_iters", "2", "--device", "cpu"]  # CPU: exact resume


def run_cli(*args, cwd=ROOT, check=True):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def ba_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    run_cli(*TINY, "--quantizer", "ba_vq", "--epochs", "2", "--checkpoint_every", "1", "--name", "ba",
            "--out_dir", out)
    return out / "ba"


def test_end_to_end_writes_every_file(ba_run):
    for name in ["final_model.pt", "final_metrics.json", "metrics.jsonl", "config.yaml", "checkpoint_epoch1.pt",
                 "checkpoint_epoch2.pt", "last.pt", "reconstructions.png", "spectrum.json", "provenance.json"]:
        assert (ba_run / name).is_file(), name
    final = json.loads((ba_run / "final_metrics.json").read_text())
    for key in ["loss", "recon_loss", "psnr", "perplexity", "usage_rate", "dead_codes", "commitment_loss",
                "mutual_info_loss", "beta", "soft_psnr", "max_p", "mutual_info"]:
        assert key in final, key
    assert final["beta"] == pytest.approx(vqvae.Config.beta_end)  # schedule reached beta_end at the last step
    records = runs.read_jsonl(ba_run / "metrics.jsonl")
    steps = [r for r in records if "train/perplexity" in r]
    epochs = [r for r in records if "val/psnr" in r]
    assert len(epochs) == 2 and steps and all("train/beta" in r for r in steps)
    assert epochs[-1]["val/psnr"] == pytest.approx(final["psnr"])
    saved = yaml.safe_load((ba_run / "config.yaml").read_text())
    assert saved["quantizer"] == "ba_vq" and saved["codebook_size"] == 32 and saved["epochs"] == 2


def test_validation_covers_whole_set_and_psnr_agrees(ba_run):
    """Recompute validation metrics independently from the saved model: whole test split, [0,1] PSNR."""
    model, state = vqvae.load_checkpoint(ba_run / "final_model.pt")
    _, test = vqvae.load_cifar10(vqvae.make_config(state["config"]))
    x = test.float() / 127.5 - 1
    with torch.no_grad():
        x_hat = torch.cat([model(x[i:i + 50])[0] for i in range(0, len(x), 50)])
        idx = torch.cat([model(x[i:i + 50])[3]["code_indices"].reshape(-1) for i in range(0, len(x), 50)])
    mse01 = ((x_hat.clamp(-1, 1) - x) / 2).square().mean().item()  # PSNR of the output clamped to the image range
    final = json.loads((ba_run / "final_metrics.json").read_text())
    assert final["psnr"] == pytest.approx(10 * torch.log10(torch.tensor(1 / mse01)).item(), abs=1e-3)
    assert final["usage_rate"] == pytest.approx(idx.unique().numel() / 32)


def test_train_usage_and_spectrum_are_over_the_training_split(ba_run):
    """train_usage / train_perplexity and spectrum.json's eigenvalues, recomputed from the saved model over every
    training image (eval mode, the run's batches)."""
    model, state = vqvae.load_checkpoint(ba_run / "final_model.pt")
    train_u8, _ = vqvae.load_cifar10(vqvae.make_config(state["config"]))
    counts = runs.code_histogram(model, train_u8, batch=state["config"]["batch_size"])
    final = json.loads((ba_run / "final_metrics.json").read_text())
    assert final["train_usage"] == pytest.approx((counts > 0).float().mean().item())
    p = counts[counts > 0].double() / counts.sum()
    assert final["train_perplexity"] == pytest.approx((-(p * p.log()).sum()).exp().item(), rel=1e-5)
    with torch.no_grad():
        e = torch.cat([vqvae.Quantizer._flatten(model.encoder(x))
                       for x in vqvae.Batches(train_u8, 64, "cpu", shuffle=False).epoch(0)])
    spectrum = json.loads((ba_run / "spectrum.json").read_text())
    lam = np.linalg.eigvalsh(np.cov(e.double().numpy(), rowvar=False))[::-1]
    assert spectrum["split"] == "train" and spectrum["latents"] == len(e) == 64 * len(train_u8)
    np.testing.assert_allclose(spectrum["latent_eigvals"], lam, rtol=1e-4, atol=1e-9 * lam[0])
    assert len(spectrum["zq_eigvals"]) == len(spectrum["codebook_eigvals"]) == e.shape[1]


def test_provenance_is_recorded_beside_a_config_that_still_loads(ba_run):
    provenance = json.loads((ba_run / "provenance.json").read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert provenance["commit"] == (head.stdout.strip() if head.returncode == 0 else "unknown")
    assert provenance["torch"] == torch.__version__ and provenance["device"] == "cpu"
    assert provenance["precision"] == "fp32" and provenance["processes"] == 1
    assert provenance["dirty"] in (True, False, None)
    # config.yaml holds Config fields only: a resume reads it, and the records' loader tables it
    vqvae.make_config(yaml.safe_load((ba_run / "config.yaml").read_text()))
    assert runs.runs_table([runs.load_run(ba_run)])[0]["commit"] == runs.commit_label(provenance)


def test_git_state_outside_a_checkout_is_unknown(tmp_path):
    assert vqvae.plumbing.git_state(tmp_path) == {"commit": "unknown", "dirty": None}


def test_load_checkpoint_round_trip(ba_run):
    model, state = vqvae.load_checkpoint(ba_run / "checkpoint_epoch2.pt")
    assert isinstance(model.quantizer, vqvae.BAQuantizer) and model.quantizer.K == 32
    assert state["epoch"] == 2 and "optimizer" in state and "rng" in state
    final_model, _ = vqvae.load_checkpoint(ba_run / "final_model.pt")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], final_model(x)[0])
    assert model.quantizer.beta.item() == pytest.approx(vqvae.Config.beta_end)  # the beta buffer is in the checkpoint


def test_resume_continues_to_the_same_result(tmp_path):
    common = [*TINY, "--quantizer", "vq_ema", "--out_dir", tmp_path]
    run_cli(*common, "--epochs", "3", "--name", "straight")
    run_cli(*common, "--epochs", "2", "--name", "split")
    run_cli("--name", "split", "--out_dir", tmp_path, "--epochs", "3", "--resume", "--no_wandb")
    a = json.loads((tmp_path / "straight" / "final_metrics.json").read_text())
    b = json.loads((tmp_path / "split" / "final_metrics.json").read_text())
    assert a == b
    sa = torch.load(tmp_path / "straight" / "final_model.pt")["model"]
    sb = torch.load(tmp_path / "split" / "final_model.pt")["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_flag_overrides_yaml_overrides_default(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("codebook_size: 64\nlr: 1e-3\nquantizer: ba_vq\n")
    cfg = vqvae.resolve_config(str(cfg_file), {"codebook_size": 128})
    assert (cfg.codebook_size, cfg.lr, cfg.quantizer, cfg.epochs) == (128, 1e-3, "ba_vq", vqvae.Config().epochs)
