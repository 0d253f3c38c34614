"""Host reads per training step, counted on the CPU with the profiler: every read of a tensor's value by the host
(.item(), bool(), float(), an index by a tensor: aten::_local_scalar_dense) in the steps between log steps, where on
a GPU each one waits for the device. A proxy for the GPU's syncs, and a lower bound: ops that sync only on CUDA
(bincount's size, a boolean mask's length) read nothing on the CPU. tests/test_host_syncs.py pins the figures.

    python tools/host_reads.py                 # every registered quantizer (VQ-EMA and BA with and without restarts)
    python tools/host_reads.py --steps 10 ba_vq

A tiny model on the bundled sample (compact, D = 16, K = 64, batch 32); the first two steps (k-means) are not counted.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import baselines  # noqa: E402,F401  (registers simvq, fsq, wasserstein_vq, cvq)
import vqvae  # noqa: E402

# not on a GPU's path: the optimizer's step counter (a CPU tensor whatever the device), the CPU-only segment sum
NOT_DEVICE = ("Optimizer.step", "aten::segment_reduce")
TINY = {"dataset": "cifar10-sample", "arch": "compact", "latent_dim": 16, "codebook_size": 64, "batch_size": 32,
        "kmeans_iters": 2, "wvq_queue_size": 256, "wandb": False, "device": "cpu"}


def host_reads(trainer: vqvae.Trainer, batches, steps: int) -> int:
    """Reads by the host in `steps` training steps taken as Trainer.train_epoch takes them between log steps."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            out = trainer.train_step(next(batches))
            trainer.step += 1
            for k, v in out.items():
                trainer.epoch_sums[k] = trainer.epoch_sums.get(k, 0) + torch.as_tensor(v).detach().float()
    reads = 0
    for event in prof.events():
        if event.name == "aten::_local_scalar_dense":
            parents, p = [], event.cpu_parent
            while p is not None:
                parents.append(p.name)
                p = p.cpu_parent
            reads += not any(name.startswith(NOT_DEVICE) for name in parents)
    return reads


def reads_per_step(overrides: dict, steps: int = 5, tmp: str | None = None) -> float:
    cfg = vqvae.make_config({**TINY, **overrides})
    trainer = vqvae.Trainer(cfg, Path(tmp or tempfile.mkdtemp()), torch.device("cpu"))
    batches = trainer.train_batches.epoch(0)
    host_reads(trainer, batches, 2)  # the first step's initialisation (k-means) may read; later steps may not
    return host_reads(trainer, batches, steps) / steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("quantizers", nargs="*", help="default: every registered one")
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args(argv)
    for name in args.quantizers or sorted(vqvae.QUANTIZERS):
        variants = [{"dead_code_threshold": 0.0}, {"dead_code_threshold": 1.0}] if name in ("vq_ema", "ba_vq") else [{}]
        for extra in variants:
            label = name + "".join(f" {k} {v:g}" for k, v in extra.items())
            print(f"{label:<36} {reads_per_step({'quantizer': name, **extra}, args.steps):.1f} host reads per step",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
