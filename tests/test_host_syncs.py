"""Host syncs per training step, counted on the CPU with the profiler as a proxy for the GPU: every read of a tensor's
value by the host (.item(), bool(), float(): aten::_local_scalar_dense) in the steps between log steps. On a GPU each
one waits for the device to finish what it was given, so the step should have none; the few that remain are pinned
here by number, so a new one fails the test."""
from pathlib import Path

import pytest
import torch

import vqvae
from helpers import load_tool

ROOT = Path(__file__).resolve().parents[1]
host_reads_tool = load_tool("host_reads")

REGISTERED = sorted(n for n, c in vqvae.QUANTIZERS.items() if not c.__module__.startswith(("test", "tests")))
# reads that remain, per training step: BA's check for columns of Q that underflow (the shapes that follow depend on
# it, once per E-M iteration); Wasserstein VQ's two eigendecompositions, which check their convergence on the host
KNOWN = {"ba_vq": 1, "ba_seed": 1, "wasserstein_vq": 2}


@pytest.mark.parametrize("name", REGISTERED)
def test_a_training_step_reads_nothing_back_but_the_known_few(tmp_path, name):
    per_step = host_reads_tool.reads_per_step({"quantizer": name}, steps=3, tmp=str(tmp_path))
    assert per_step == KNOWN.get(name, 0)


def test_restarts_and_relative_beta_run_without_reads(tmp_path):
    """Dead-code restarts (every step, many codes dead) and dbar stay on the device."""
    cfg = vqvae.make_config({**host_reads_tool.TINY, "quantizer": "vq_ema", "codebook_size": 256,
                             "dead_code_threshold": 4.0})
    trainer = vqvae.Trainer(cfg, Path(tmp_path), torch.device("cpu"))
    batches = trainer.train_batches.epoch(0)
    host_reads_tool.host_reads(trainer, batches, 2)
    assert host_reads_tool.host_reads(trainer, batches, 3) == 0
    assert trainer.epoch_sums["restarts"] > 0  # codes did restart in those steps
