"""Host syncs per training step, counted on the CPU with the profiler as a proxy for the GPU: every read of a tensor's
value by the host (.item(), bool(), float(): aten::_local_scalar_dense) in the steps between log steps. On a GPU each
one waits for the device to finish what it was given, so the step should have none; the few that remain are pinned
here by number, so a new one fails the test."""
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import vqvae

REGISTERED = sorted(n for n, c in vqvae.QUANTIZERS.items() if not c.__module__.startswith(("test", "tests")))
# reads that remain, per training step: BA's check for columns of Q that underflow (the shapes that follow depend on
# it, once per E-M iteration); Wasserstein VQ's two eigendecompositions, which check their convergence on the host
KNOWN = {"ba_vq": 1, "ba_seed": 1, "wasserstein_vq": 2}
# not on a GPU's path: the optimizer's step counter (a CPU tensor whatever the device), the CPU-only segment sum
NOT_DEVICE = ("Optimizer.step", "aten::segment_reduce")


def host_reads(trainer: vqvae.Trainer, steps: int) -> int:
    batches = trainer.train_batches.epoch(0, start=trainer.step)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):  # what Trainer.train_epoch does between log steps
            out = trainer.train_step(next(batches))
            trainer.step += 1
            for k, v in out.items():
                trainer.epoch_sums[k] = trainer.epoch_sums.get(k, 0) + vqvae.as_scalar(v, trainer.device)
    reads = 0
    for event in prof.events():
        if event.name == "aten::_local_scalar_dense":
            parents, p = [], event.cpu_parent
            while p is not None:
                parents.append(p.name)
                p = p.cpu_parent
            reads += not any(name.startswith(NOT_DEVICE) for name in parents)
    return reads


@pytest.mark.parametrize("name", REGISTERED)
def test_a_training_step_reads_nothing_back_but_the_known_few(tmp_path, name):
    cfg = vqvae.make_config({"dataset": "cifar10-sample", "arch": "compact", "latent_dim": 16, "quantizer": name,
                             "codebook_size": 64, "batch_size": 32, "kmeans_iters": 2, "wvq_queue_size": 256,
                             "wandb": False, "device": "cpu"})
    trainer = vqvae.Trainer(cfg, Path(tmp_path), torch.device("cpu"))
    host_reads(trainer, 2)  # the first step's initialisation (k-means) may read; later steps may not
    assert host_reads(trainer, 3) == 3 * KNOWN.get(name, 0)


def test_restarts_and_relative_beta_run_without_reads(tmp_path):
    """Dead-code restarts (every step, many codes dead) and dbar stay on the device."""
    cfg = vqvae.make_config({"dataset": "cifar10-sample", "arch": "compact", "latent_dim": 16, "quantizer": "vq_ema",
                             "codebook_size": 256, "batch_size": 32, "kmeans_iters": 2, "dead_code_threshold": 4.0,
                             "wandb": False, "device": "cpu"})
    trainer = vqvae.Trainer(cfg, Path(tmp_path), torch.device("cpu"))
    host_reads(trainer, 2)
    assert host_reads(trainer, 3) == 0
    assert trainer.epoch_sums["restarts"] > 0  # codes did restart in those steps
