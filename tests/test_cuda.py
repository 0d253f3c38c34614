"""CUDA: every registered quantizer in float32 on the GPU against float64 on the CPU, a bf16 training run, resume in
--deterministic mode bit for bit, and a quantizer that reports CPU scalars. Skipped without a GPU.

BAVQ_TEST_DEVICE=cpu runs the same checks with the CPU in float32 as the device under test, to check the tests
themselves on a machine without a GPU (bf16 then runs under CPU autocast)."""
import dataclasses
import json
import os

import pytest
import torch

import vqvae
from helpers import as_if_killed_after_epoch_1

DEVICE = torch.device(os.environ.get("BAVQ_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(
    DEVICE.type == "cuda" and not torch.cuda.is_available(),
    reason="no CUDA device here: these tests run on a GPU machine (python tools/gpu_check.py runs them first)")
SAMPLE = {"dataset": "cifar10-sample", "arch": "compact", "latent_dim": 16, "codebook_size": 32, "batch_size": 64,
          "kmeans_iters": 2, "wandb": False, "device": str(DEVICE), "epochs": 2, "checkpoint_every": 1}
# float32 on the device against float64 on the CPU, relative to each tensor's largest entry: the H200 measurement
# (BA kernels, K = 16,384, sharp assignments) gave 1.8e-4 on gradients; these smaller cases leave headroom
RTOL = {"vq_ema": 1e-4, "ba_vq": 1e-3, "ba_seed": 1e-3, "simvq": 1e-4, "fsq": 1e-4, "wasserstein_vq": 1e-4,
        "cvq": 1e-4}
OPTIONS = {"ba_vq": {"beta_start": 20.0}, "ba_seed": {"beta_start": 2.0}}  # sharp enough to matter, not degenerate


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def one_step(q: vqvae.Quantizer, e: torch.Tensor, w: torch.Tensor):
    """quantize + decoder_input, then backward of a fixed linear read-out plus the loss terms."""
    e = e.clone().requires_grad_()
    out = q.quantize(e)
    y = q.decoder_input(e, out.z_q)
    ((y * w).sum() + sum(out.losses.values(), torch.zeros((), dtype=e.dtype, device=e.device))).backward()
    grads = {n: p.grad for n, p in q.named_parameters() if p.grad is not None}
    return out, e.grad, grads


@pytest.mark.parametrize("name", sorted(n for n, c in vqvae.QUANTIZERS.items() if c.__module__ in ("vqvae",
                                                                                                    "baselines")))
def test_quantizer_in_float32_on_the_device_matches_float64_on_the_cpu(name):
    torch.manual_seed(0)
    # no k-means and no restarts: both draw random rows, from the CPU's generator here and the device's there
    cfg = vqvae.Config(quantizer=name, codebook_size=64, kmeans_init=False, dead_code_threshold=0.0,
                       **OPTIONS.get(name, {}))
    reference = vqvae.make_quantizer(cfg, 16).double().train()
    under_test = vqvae.make_quantizer(cfg, 16).train()
    under_test.load_state_dict(reference.state_dict())
    under_test.to(DEVICE)
    gen = torch.Generator().manual_seed(1)
    e = torch.randn(512, 16, generator=gen, dtype=torch.float64)
    w = torch.randn(512, 16, generator=gen, dtype=torch.float64)
    ref, ref_ge, ref_g = one_step(reference, e, w)
    out, ge, g = one_step(under_test, e.float().to(DEVICE), w.float().to(DEVICE))
    assert torch.equal(out.idx.cpu(), ref.idx)  # no code changes (random data: no near ties)
    assert relative_error(out.z_q, ref.z_q) < RTOL[name]
    assert out.losses.keys() == ref.losses.keys()
    for k in ref.losses:
        assert relative_error(out.losses[k], ref.losses[k]) < RTOL[name], k
    assert relative_error(ge, ref_ge) < RTOL[name]
    assert g.keys() == ref_g.keys()
    for k in ref_g:
        assert relative_error(g[k], ref_g[k]) < RTOL[name], k
    for k, v in reference.state_dict().items():  # the training-mode updates (EMA, queue, anchors) agree too
        if v.is_floating_point():
            assert relative_error(under_test.state_dict()[k], v) < RTOL[name], k


@pytest.mark.parametrize("quantizer", ["vq_ema", "ba_vq"])
def test_bf16_training_on_the_sample_is_finite(tmp_path, quantizer):
    final = vqvae.train(vqvae.make_config({**SAMPLE, "quantizer": quantizer, "precision": "bf16",
                                           "out_dir": str(tmp_path), "name": "r"}))
    assert all(v == v and abs(v) != float("inf") for v in final.values()) and final["psnr"] > 10


def test_deterministic_resume_is_bit_exact(tmp_path):
    cfg = vqvae.make_config({**SAMPLE, "quantizer": "ba_vq", "deterministic": True, "out_dir": str(tmp_path),
                             "name": "run"})
    try:
        straight = vqvae.train(cfg)
        run_dir = tmp_path / "run"
        as_if_killed_after_epoch_1(run_dir)
        resumed = vqvae.train(dataclasses.replace(cfg, resume=True))
        again = vqvae.train(dataclasses.replace(cfg, name="again"))
    finally:
        vqvae.set_deterministic(False)
    assert resumed == straight and again == straight
    assert json.loads((tmp_path / "again" / "final_metrics.json").read_text()) == straight


def test_a_quantizer_reporting_cpu_scalars_trains_and_validates(tmp_path):
    @vqvae.register_quantizer("vq_ema_cpu_scalars")
    class CPUScalars(vqvae.VQEMAQuantizer):
        def quantize(self, e):
            q = super().quantize(e)
            return q._replace(metrics={**q.metrics, "on_the_cpu": torch.tensor(0.5), "a_number": 2})

    try:
        final = vqvae.train(vqvae.make_config({**SAMPLE, "quantizer": "vq_ema_cpu_scalars",
                                               "out_dir": str(tmp_path), "name": "r"}))
    finally:
        del vqvae.QUANTIZERS["vq_ema_cpu_scalars"]
    assert final["on_the_cpu"] == 0.5 and final["a_number"] == 2
