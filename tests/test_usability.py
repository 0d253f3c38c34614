"""What a new user trips over: record names, short runs, --help, failed downloads, resume schedule, small defects."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import runs
import train as train_cli
import vqvae

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = {"dataset": "cifar10-sample", "arch": "compact", "latent_dim": 16, "codebook_size": 16, "batch_size": 64,
          "kmeans_iters": 2, "wandb": False}


def test_step_and_epoch_records_never_share_a_key_at_one_step(tmp_path):
    """W&B keeps one value per (key, step): epoch means are train_epoch/*, batch values train/*. A 10-step run
    with the default log_every still writes a record every step."""
    vqvae.train(vqvae.make_config({**SAMPLE, "quantizer": "ba_vq", "epochs": 1, "out_dir": str(tmp_path),
                                   "name": "r"}))
    records = runs.read_jsonl(tmp_path / "r" / "metrics.jsonl")
    steps = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 11))
    by_step: dict[int, list[str]] = {}
    for r in records:
        by_step.setdefault(r["step"], []).extend(k for k in r if k not in ("step", "epoch"))
    assert all(len(keys) == len(set(keys)) for keys in by_step.values())
    epoch = next(r for r in records if "val/psnr" in r)
    assert {"train_epoch/loss", "train_epoch/mutual_info_loss", "train_epoch/max_p", "train_epoch/perplexity"} <= set(epoch)
    assert not any(k.startswith("train/") for k in epoch)


@pytest.mark.parametrize("total, expected", [(10, 1), (390, 3), (39_000, 50)])
def test_auto_log_every(total, expected):
    assert vqvae.auto_log_every(total) == expected


def test_help_shows_the_flags_that_do_something():
    text = train_cli.build_parser().format_help()
    assert "--no_wandb" in text and "--no_kmeans_init" in text
    assert "--wandb " not in text.replace("--wandb_project", "") and "--kmeans_init " not in text
    assert "(default: )" not in text and "(default: None)" not in text
    options = text[text.index("options:"):]
    latent = options[options.index("--latent_dim"):options.index("--quantizer")]
    assert latent.count("default") == 1
    assert train_cli.main(["--no_wandb", "--epochs", "0"]) == 2  # the hidden spelling still parses


def test_failed_download_leaves_nothing_behind(tmp_path, monkeypatch):
    import torchvision

    def fail(root, **kwargs):  # as torchvision does: folders and a partial archive, then the network error
        Path(root).mkdir(parents=True, exist_ok=True)
        (Path(root) / "cifar-10-python.tar.gz").write_bytes(b"partial")
        raise OSError("network unreachable")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fail)
    new = tmp_path / "a" / "b" / "data"
    with pytest.raises(vqvae.UserError, match="no CIFAR-10 batches in"):
        vqvae.load_cifar10(vqvae.make_config({"data_dir": str(new)}))
    assert not (tmp_path / "a").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(vqvae.UserError, match="no CIFAR-10 batches in"):
        vqvae.load_cifar10(vqvae.make_config({"data_dir": str(empty)}))
    assert empty.is_dir() and not any(empty.iterdir())


def test_resume_with_more_epochs_keeps_beta_continuous_and_monotone(tmp_path):
    cfg = {**SAMPLE, "quantizer": "ba_vq", "out_dir": str(tmp_path), "name": "r", "beta_start": 0.5, "beta_end": 3.0}
    vqvae.train(vqvae.make_config({**cfg, "epochs": 2}))
    vqvae.train(vqvae.make_config({**cfg, "epochs": 4, "resume": True}))
    beta = [r["train/beta"] for r in runs.read_jsonl(tmp_path / "r" / "metrics.jsonl") if "train/beta" in r]
    assert len(beta) == 40 and beta[19] == pytest.approx(3.0)
    assert all(b >= a for a, b in zip(beta, beta[1:])) and beta[-1] == pytest.approx(3.0)


def test_schedule_progress_reanchors_without_a_jump():
    assert vqvae.schedule_progress(30, (0, 0.0), 61) == 0.5
    p = vqvae.schedule_progress(30, (0, 0.0), 41)  # 3/4 done, then the run is extended to 81 steps
    assert vqvae.schedule_progress(30, (30, p), 81) == p and vqvae.schedule_progress(80, (30, p), 81) == 1.0


def test_ba_statistics_carry_no_gradient():
    e = torch.randn(50, 4, requires_grad=True)
    C = torch.randn(8, 4, requires_grad=True)
    z, log_Q, idx, counts, sums, H_p, max_p, _ = vqvae.ba_assign(e, C, torch.full((8,), -2.0794), 1.0, 2, 16,
                                                                 want_sums=True)
    assert z.requires_grad and log_Q.requires_grad
    assert H_p.requires_grad and not max_p.requires_grad
    assert not counts.requires_grad and not sums.requires_grad and not idx.requires_grad


def test_codebook_and_ema_statistics_agree_from_the_start_without_kmeans():
    q = vqvae.make_quantizer(vqvae.Config(codebook_size=16, kmeans_init=False, dead_code_threshold=0.0), 4).train()
    torch.testing.assert_close(q.codebook, q.ema_sum / q._smoothed(q.ema_count)[:, None])
    before = q.codebook.clone()
    q(torch.randn(2, 4, 1, 1) * 0.01)  # two latents: at least 14 codes unused
    unused = torch.ones(16, dtype=torch.bool)
    unused[q.ema_count.argsort(descending=True)[:2]] = False
    assert not (q.codebook[unused] == 0).all(1).any()
    torch.testing.assert_close(q.codebook[unused], before[unused], rtol=0.05, atol=1e-6)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_validate_restores_the_mode_it_found(mode):
    model = vqvae.VQVAE(vqvae.make_config(SAMPLE))
    model.train(mode == "train")
    batches = vqvae.Batches(torch.randint(0, 255, (8, 3, 32, 32), dtype=torch.uint8), 4, "cpu", shuffle=False)
    vqvae.validate(model, batches)
    assert model.training == (mode == "train") and model.quantizer.training == (mode == "train")


def test_psnr_is_of_the_clamped_output():
    x = torch.zeros(2, 3, 4, 4)
    assert vqvae.psnr(x, torch.full_like(x, 5.0)) == pytest.approx(vqvae.psnr(x, torch.ones_like(x)))


def test_reconstructions_png_is_readable(tmp_path):
    from PIL import Image
    model = vqvae.VQVAE(vqvae.make_config(SAMPLE))
    batches = vqvae.Batches(torch.randint(0, 255, (8, 3, 32, 32), dtype=torch.uint8), 8, "cpu", shuffle=False)
    vqvae.save_reconstructions(model, batches, tmp_path / "r.png", title="run: PSNR 20.00 dB")
    width, height = Image.open(tmp_path / "r.png").size
    assert width >= 800 and height >= 250


@pytest.mark.parametrize("first", ["checkpoint", "vqvae", "runs"])
def test_checkpoint_and_vqvae_import_in_either_order(first):
    """vqvae.py and checkpoint.py import each other by module name: whichever comes first, both load whole."""
    code = (f"import {first}\nimport checkpoint, vqvae\n"
            "assert checkpoint.vqvae is vqvae and vqvae.checkpoint is checkpoint\n"
            "assert callable(vqvae.train) and callable(checkpoint.read_checkpoint)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_train_flushes_subnormals_in_every_cpu_thread(tmp_path):
    """train() sets the mode before the process's first parallel op, so torch's whole thread pool inherits it: a
    product over a tensor of subnormals, split across two threads, reads zero everywhere; provenance records it."""
    code = ("import json, torch, plumbing, vqvae\n"
            "torch.set_num_threads(2)\n"
            "assert not plumbing.denormals_flushed()\n"
            f"cfg = {{**{SAMPLE!r}, 'quantizer': 'ba_vq', 'epochs': 1, 'out_dir': {str(tmp_path)!r}, 'name': 'run'}}\n"
            "vqvae.train(vqvae.make_config(cfg))\n"
            "assert plumbing.denormals_flushed()\n"
            "y = torch.full((1 << 22,), 1e-39) * 1.0\n"
            "assert torch.count_nonzero(y).item() == 0, torch.count_nonzero(y).item()\n"
            f"assert json.load(open({str(tmp_path / 'run' / 'provenance.json')!r}))['denormals_flushed'] is True\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
