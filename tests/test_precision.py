"""Mixed precision (bf16, fp16 + GradScaler) and torch.compile on CPU: training stays finite, the quantizer
computes in float32 under autocast, the compiled model agrees with the eager one, and compile falls back with a
warning."""
import copy
import functools
from pathlib import Path

import pytest
import torch

import vqvae

TINY = {"dataset": "cifar10-sample", "arch": "compact", "latent_dim": 16, "codebook_size": 32, "batch_size": 16,
        "kmeans_iters": 2, "wandb": False}
CPU = torch.device("cpu")


def train_a_little(tmp_path: Path, steps: int = 2, **overrides) -> tuple[vqvae.Trainer, dict]:
    trainer = vqvae.Trainer(vqvae.make_config({**TINY, **overrides}), tmp_path, CPU)
    batches = trainer.train_batches.epoch(0)
    for _ in range(steps):
        out = trainer.train_step(next(batches))
        trainer.step += 1
    trainer.check_finite()  # raises on a non-finite loss term
    assert all(torch.isfinite(v).all() for v in out.values())
    assert all(torch.isfinite(t).all() for t in trainer.model.state_dict().values() if t.is_floating_point())
    val = vqvae.Batches(trainer.val_batches.images[:32], 16, CPU, shuffle=False)
    return trainer, vqvae.validate(trainer.model, val, trainer.autocast())


def test_auto_precision_is_bf16_on_cuda_only():
    cfg = vqvae.Config()
    assert vqvae.autocast_dtype(cfg.precision, torch.device("cuda")) is torch.bfloat16
    assert vqvae.autocast_dtype(cfg.precision, CPU) is None
    assert vqvae.autocast_dtype("fp16", CPU) is torch.float16


@pytest.mark.parametrize("quantizer", ["vq_ema", "ba_vq"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_stays_finite(tmp_path, precision, quantizer):
    trainer, val = train_a_little(tmp_path, steps=1, precision=precision, quantizer=quantizer)
    assert trainer.amp_dtype is {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert trainer.scaler.is_enabled() == (precision == "fp16")  # bf16 has fp32's range: no loss scaling
    q = trainer.model.quantizer
    assert q.codebook.dtype == q.ema_count.dtype == q.ema_sum.dtype == torch.float32
    assert all(map(lambda v: v == v and abs(v) != float("inf"), val.values())), val


@pytest.mark.parametrize("quantizer", ["vq_ema", "ba_vq"])
def test_quantizer_is_float32_under_autocast(quantizer):
    """The same bf16 encoder output gives bit-identical quantizer losses with and without autocast around it:
    distances and softmax statistics never run in bf16."""
    torch.manual_seed(0)
    q = vqvae.VQVAE(vqvae.make_config({**TINY, "quantizer": quantizer, "kmeans_init": False})).quantizer.eval()
    q.codebook.data.normal_()
    z = torch.randn(4, 16, 8, 8).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_q, losses, metrics = q(z)
    z_q_ref, losses_ref, metrics_ref = q(z.float())
    assert z_q.dtype == torch.bfloat16
    assert torch.equal(z_q, z_q_ref.to(torch.bfloat16))
    assert torch.equal(metrics["code_indices"], metrics_ref["code_indices"])
    for k, v in losses.items():
        assert v.dtype == torch.float32 and torch.equal(v, losses_ref[k]), k


@pytest.mark.parametrize("quantizer", ["vq_ema", "ba_vq"])
def test_compiled_model_matches_eager(quantizer):
    """The whole model compiled in place by inductor, quantizer included: three training steps give the outputs,
    losses, gradients and quantizer state of the eager model, within float32 rounding (BA's losses differ by up to
    5e-5 relative: reductions in another order). No k-means and no restarts: a compiled model's random draws come
    from inductor's own generator, so they differ from eager ones (the same method, other random rows)."""
    torch.manual_seed(0)
    eager = vqvae.VQVAE(vqvae.make_config({**TINY, "quantizer": quantizer, "kmeans_init": False,
                                           "dead_code_threshold": 0.0}))
    compiled = copy.deepcopy(eager)
    assert vqvae.compile_model(compiled, CPU, backend="inductor")
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    results = []
    for model in (eager, compiled):
        out = []
        for step in range(3):
            x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(step)) * 2 - 1
            x_hat, recon, losses, _ = model(x)
            (recon + sum(losses.values())).backward()
            out.append((x_hat.detach(), recon.detach(), *[v.detach() for v in losses.values()]))
        results.append((out, {n: p.grad for n, p in model.named_parameters()}, model.quantizer.state_dict()))
    (out_e, grad_e, state_e), (out_c, grad_c, state_c) = results
    for a, b in zip(out_c, out_e):
        for u, v in zip(a, b):
            torch.testing.assert_close(u, v, rtol=2e-4, atol=1e-6)
    for name, g in grad_e.items():
        torch.testing.assert_close(grad_c[name], g, rtol=1e-4, atol=1e-6, msg=name)
    for name, s in state_e.items():
        torch.testing.assert_close(state_c[name], s, rtol=1e-4, atol=1e-6, msg=name)


def test_compile_flag_trains_finite(tmp_path, monkeypatch):
    monkeypatch.setattr(vqvae, "compile_model", functools.partial(vqvae.compile_model, backend="aot_eager"))
    trainer, _ = train_a_little(tmp_path, compile=True, quantizer="ba_vq", steps=1)
    assert trainer.model._compiled_call_impl is not None  # the flag did compile the model


def test_compile_falls_back_with_a_warning(tmp_path, monkeypatch):
    def unsupported(*args, **kwargs):
        raise RuntimeError("no backend here")

    monkeypatch.setattr(torch, "compile", unsupported)
    with pytest.warns(UserWarning, match="torch.compile unavailable.*running eagerly"):
        trainer, _ = train_a_little(tmp_path, compile=True, steps=1)
    assert trainer.model._compiled_call_impl is None
