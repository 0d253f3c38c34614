"""Data-parallel training (torch.distributed, 2 CPU processes, gloo) against one process on the same global batches:
both ranks hold the same codebook, and parameters, averaged gradients and metrics match the single process."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runs import read_jsonl
import vqvae

ROOT = Path(__file__).resolve().parents[1]
BASE = {"dataset": "cifar10-sample", "arch": "compact", "latent_dim": 16, "codebook_size": 32, "batch_size": 32,
        "kmeans_iters": 2, "wandb": False, "device": "cpu"}  # gloo on the CPU, with or without a GPU
CONFIGS = {
    # EMA cluster sizes and sums, k-means on the gathered batch, dead-code restarts drawn from the global batch
    "vq_ema_restarts": {"quantizer": "vq_ema", "dead_code_threshold": 40.0},
    # the global marginal Q and its adjoint in backward (entropy loss, 2 BA iterations), a DDP-averaged codebook
    "ba_grad_codebook": {"quantizer": "ba_vq", "ba_iters": 2, "codebook_update": "grad", "entropy_weight": 1.0},
    # BA soft counts and sums into the EMA codebook, 3 BA iterations
    "ba_ema_codebook": {"quantizer": "ba_vq", "ba_iters": 3, "entropy_weight": 1.0, "beta_start": 2.0},
    # the feature queue filled from all ranks (part-filled, then wrapped), the W2 term's codebook gradient
    "wasserstein_vq": {"quantizer": "wasserstein_vq", "wvq_queue_size": 3000, "wasserstein_weight": 1.0},
    # usage summed over ranks, anchors chosen among all ranks' outputs (K = 128 leaves some codes unused, which
    # move far), codes moved in place
    "cvq": {"quantizer": "cvq", "codebook_size": 128},
    # BA's top-k path: the global marginal from kept entries, its adjoint, the probe's dropped mass averaged so that
    # every rank takes the same branch (max drop 1: always truncated)
    "ba_topk": {"quantizer": "ba_vq", "ba_topk": 4, "ba_topk_max_drop": 1.0, "entropy_weight": 1.0},
    # an AE warm-up of one step: the codebook parameter without a gradient in it (DDP told to expect that), then
    # k-means on the gathered warm encoder outputs and a fresh optimizer at the switch
    "ae_warmup": {"quantizer": "ba_vq", "codebook_update": "grad", "ae_warmup_steps": 1},
}
STEPS = 2
BASE_LR = vqvae.Config().lr
# CVQ's first step moves every code onto the output most similar to it, so codes that chose the same output are equal
# up to float noise, and which of them a latent picks follows that noise: the code histogram's metrics may differ by
# a code or two (seen: 0.6 % in perplexity, 1 of 128 codes in usage), while the vectors, and so every metric of the
# reconstructions, agree as tightly as every other config's
NOISY_CODES = {"cvq": 2}  # codes whose use may move between near-equal duplicates


def torchrun(script: str, *args, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --standalone: a rendezvous on localhost at a free port that torchrun picks itself
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script,
           *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def load_worker():
    spec = importlib.util.spec_from_file_location("ddp_worker", ROOT / "tests" / "ddp_worker.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{config name: (rank 0, rank 1, single process)} after STEPS steps of global batch 32."""
    configs = [{**BASE, **c} for c in CONFIGS.values()]
    ddp, one = tmp_path_factory.mktemp("ddp"), tmp_path_factory.mktemp("one")
    torchrun("tests/ddp_worker.py", ddp, json.dumps(configs), STEPS)
    load_worker().main(str(one), json.dumps(configs), str(STEPS))
    load = lambda path: torch.load(path, weights_only=False)  # noqa: E731
    return {name: (load(ddp / f"rank0_{i}.pt"), load(ddp / f"rank1_{i}.pt"), load(one / f"rank0_{i}.pt"))
            for i, name in enumerate(CONFIGS)}


def assert_close(a, b, what, rtol):
    """Equal up to rtol relative to the largest entry of b (float sums run in another order on two ranks)."""
    scale = max(b.abs().max().item(), 1e-12) if b.numel() else 1.0
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name", CONFIGS)
def test_ranks_hold_identical_state(runs, name):
    r0, r1, _ = runs[name]
    assert r0["world"] == r1["world"] == 2
    for key, value in r0["state"].items():  # codebook, EMA statistics, running marginal, weights: bit for bit
        assert torch.equal(value, r1["state"][key]), key
    assert r0["val"] == r1["val"]


@pytest.mark.parametrize("name", CONFIGS)
def test_two_ranks_match_one_process(runs, name):
    r0, _, one = runs[name]
    assert one["world"] == 1
    assert set(r0["grads_first"]) == set(one["grads_first"]) and r0["grads_first"]
    for key, g in one["grads_first"].items():  # same weights, same global batch: DDP's mean = one process's
        assert_close(r0["grads_first"][key], g, f"first-step grad {key}", rtol=1e-5)
    for key, g in one["grads_last"].items():  # after Adam steps, which magnify float noise in tiny gradients
        assert_close(r0["grads_last"][key], g, f"last-step grad {key}", rtol=1e-2)
    for key, value in one["state"].items():  # weights move by up to lr per Adam step: 5% of that as tolerance
        if value.is_floating_point():
            torch.testing.assert_close(r0["state"][key], value, rtol=1e-4, atol=0.05 * BASE_LR * STEPS, msg=key)
        else:
            assert torch.equal(r0["state"][key], value), key
    assert r0["val"].keys() == one["val"].keys()
    for key, v in one["val"].items():
        n, K = NOISY_CODES.get(name, 0), CONFIGS[name].get("codebook_size", BASE["codebook_size"])
        tolerance = {"dead_codes": n, "usage_rate": n / K, "perplexity": 0.02 * n * v}.get(key, 0)
        assert r0["val"][key] == pytest.approx(v, rel=1e-3, abs=max(tolerance, 1e-6)), key
    for key in ("loss", "recon_loss", "commitment_loss"):  # train epoch means: rank means = global batch's
        assert r0["train_means"][key] == pytest.approx(one["train_means"][key], rel=1e-4), key


def test_batch_size_must_split_evenly_over_ranks(tmp_path):
    cfg = vqvae.make_config({**BASE, "batch_size": 33})
    with pytest.raises(vqvae.UserError, match="divisible"):
        vqvae.Trainer(cfg, tmp_path, torch.device("cpu"), rank=0, world=2)


def test_torchrun_cli_matches_one_process(tmp_path):
    """The real CLI under torchrun: one set of run files, written by rank 0, with one process's metrics."""
    flags = ["--dataset", "cifar10-sample", "--arch", "compact", "--latent_dim", "16", "--quantizer", "ba_vq",
             "--ba_iters", "2", "--codebook_size", "32", "--batch_size", "64", "--epochs", "1", "--kmeans_iters",
             "2", "--log_every", "5", "--no_wandb", "--device", "cpu", "--out_dir", tmp_path,
             # beta 30, not the default 100: at beta 100 relative p is so sharp that a last-digit difference from
             # the order of DDP's gradient sums moves E H(p) by ~10 % within 10 steps (at 30 the runs agree to 1e-3)
             "--beta_end", "30"]
    proc = torchrun("train.py", *flags, "--name", "ddp")
    assert "x 2 processes (torchrun" in proc.stdout  # the run header says how many processes share the batch
    proc = subprocess.run([sys.executable, "train.py", *map(str, flags), "--name", "one"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp, one = tmp_path / "ddp", tmp_path / "one"
    assert sorted(p.name for p in ddp.iterdir()) == sorted(p.name for p in one.iterdir())
    final_ddp, final_one = (json.loads((d / "final_metrics.json").read_text()) for d in (ddp, one))
    assert final_ddp.keys() == final_one.keys()
    for key, v in final_one.items():
        assert final_ddp[key] == pytest.approx(v, rel=1e-3, abs=1e-5), key
    provenance = [json.loads((d / "provenance.json").read_text()) for d in (ddp, one)]
    assert provenance[0] == {**provenance[1], "processes": 2}
    spectra = [json.loads((d / "spectrum.json").read_text()) for d in (ddp, one)]  # over both ranks' latents
    assert spectra[0]["latents"] == spectra[1]["latents"]
    assert spectra[0]["latent_eigvals"] == pytest.approx(spectra[1]["latent_eigvals"], rel=1e-3, abs=1e-7)
    records = [read_jsonl(d / "metrics.jsonl") for d in (ddp, one)]
    assert [r["step"] for r in records[0]] == [r["step"] for r in records[1]]
    for a, b in zip(*records):  # loss terms are rank means, i.e. the global batch's
        key = "train/loss" if "train/loss" in b else "train_epoch/loss"  # step record or epoch record
        assert a[key] == pytest.approx(b[key], rel=1e-3)
    codebooks = [vqvae.load_checkpoint(d / "final_model.pt")[0].quantizer.codebook for d in (ddp, one)]
    assert_close(codebooks[0], codebooks[1], "codebook", rtol=1e-3)
