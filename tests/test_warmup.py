"""The AE warm-up (Config.ae_warmup_steps): the quantizer bypassed, then initialised from the warm encoder at the
switch with a fresh optimizer, for every quantizer and one defined outside vqvae.py; resume across the switch."""
import json
import os
import signal

import pytest
import torch

import runs
import checkpoint
import vqvae
from test_contract import ShrinkVQ  # a quantizer registered from outside vqvae.py, with a schedule and a loss

WARMUP = 3
REGISTERED = sorted(n for n, c in vqvae.QUANTIZERS.items() if not c.__module__.startswith(("test", "tests")))


def tiny_cfg(tmp_path, **overrides):
    return vqvae.make_config({"dataset": "cifar10-sample", "arch": "compact", "latent_dim": 16, "codebook_size": 16,
                              "batch_size": 64, "kmeans_iters": 2, "wvq_queue_size": 256, "wandb": False,
                              "lpips": False, "device": "cpu", "out_dir": str(tmp_path), "name": "run", "epochs": 1,
                              "ae_warmup_steps": WARMUP, **overrides})


def steps(trainer, batches, n):
    outs = []
    for _ in range(n):
        outs.append(trainer.train_step(next(batches)))
        trainer.step += 1
    return outs


@pytest.mark.parametrize("name", REGISTERED)
def test_warmup_bypasses_the_quantizer(name, tmp_path):
    """The decoder sees e itself, the loss is the reconstruction's, and the quantizer is untouched: no EMA, k-means,
    restarts, queue, optimizer step or schedule (BA's beta is a buffer). Validation scores the AE as ae_*."""
    trainer = vqvae.Trainer(tiny_cfg(tmp_path, quantizer=name), tmp_path, torch.device("cpu"))
    model = trainer.model
    before = {k: v.clone() for k, v in model.quantizer.state_dict().items()}
    seen = {}
    model.encoder.register_forward_hook(lambda module, args, out: seen.update(e=out))
    model.decoder.register_forward_pre_hook(lambda module, args: seen.update(z=args[0]))
    for out in steps(trainer, trainer.train_batches.epoch(0), WARMUP):
        assert seen["z"] is seen["e"]
        assert set(out) == {"loss", "recon_loss", "grad_norm"} and torch.equal(out["loss"], out["recon_loss"])
    after = model.quantizer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), [k for k in before if not torch.equal(before[k],
                                                                                                        after[k])]
    assert not any(trainer.optimizer.state.get(p) for p in model.quantizer.parameters())
    val = vqvae.validate(model, trainer.val_batches)
    assert "ae_psnr" in val and "ae_ssim" in val and not {"psnr", "ssim", "perplexity", "usage_rate"} & set(val)
    x = trainer.val_batches.images.float() / 127.5 - 1
    with torch.no_grad():
        assert val["ae_psnr"] == pytest.approx(vqvae.psnr(x, model.decoder(model.encoder(x))), abs=1e-4)


@pytest.mark.parametrize("name, keep", [("vq_ema", False), ("ba_vq", False), ("ba_vq", True)])
def test_switch_runs_kmeans_on_the_warm_encoder_with_a_fresh_optimizer(name, keep, tmp_path, monkeypatch):
    """The first VQ step: k-means on that batch's warm encoder outputs, a fresh optimizer (ae_warmup_keep_optimizer:
    the warm one), the schedule (BA's beta) starting from progress 0."""
    trainer = vqvae.Trainer(tiny_cfg(tmp_path, quantizer=name, ae_warmup_keep_optimizer=keep), tmp_path,
                            torch.device("cpu"))
    model, batches = trainer.model, trainer.train_batches.epoch(0)
    steps(trainer, batches, WARMUP)
    warm_optimizer, encoder_weight = trainer.optimizer, model.encoder[0].weight
    assert model.quantizer.needs_init()
    kmeans_inputs, encoder_outputs, kmeans = [], [], vqvae.kmeans
    monkeypatch.setattr(vqvae, "kmeans", lambda e, *args: kmeans_inputs.append(e.clone()) or kmeans(e, *args))
    model.encoder.register_forward_hook(lambda module, args, out: encoder_outputs.append(out.detach().clone()))
    first, second = steps(trainer, batches, 2)
    assert len(kmeans_inputs) == 1 and torch.equal(kmeans_inputs[0], vqvae.Quantizer._flatten(encoder_outputs[0]))
    assert not model.quantizer.needs_init()
    assert (trainer.optimizer is warm_optimizer) == keep
    assert trainer.optimizer.state[encoder_weight]["step"].item() == (WARMUP + 2 if keep else 2)
    if name == "ba_vq":
        assert first["beta"].item() == pytest.approx(trainer.cfg.beta_start)
        assert second["beta"].item() > trainer.cfg.beta_start


def test_warmup_length_is_checked(tmp_path):
    with pytest.raises(vqvae.UserError, match="not both"):
        tiny_cfg(tmp_path, ae_warmup_frac=0.25)
    with pytest.raises(vqvae.UserError, match="ae_warmup_frac must be in"):
        tiny_cfg(tmp_path, ae_warmup_steps=0, ae_warmup_frac=1.0)
    trainer = vqvae.Trainer(tiny_cfg(tmp_path, ae_warmup_steps=0, ae_warmup_frac=0.25), tmp_path, torch.device("cpu"))
    assert (trainer.total_steps, trainer.warmup_steps, trainer.model.phase) == (10, 2, "ae")  # round(2.5): 2
    with pytest.raises(vqvae.UserError, match="must end before"):
        vqvae.Trainer(tiny_cfg(tmp_path, ae_warmup_steps=10), tmp_path, torch.device("cpu"))


def test_resume_with_other_epochs_keeps_the_switch(tmp_path):
    """ae_warmup_frac is of the total at the run's start: a run resumed with more epochs switches where it would
    have, and its schedule starts there from 0."""
    trainer = vqvae.Trainer(tiny_cfg(tmp_path, ae_warmup_steps=0, ae_warmup_frac=0.5), tmp_path, torch.device("cpu"))
    steps(trainer, trainer.train_batches.epoch(0), 2)
    checkpoint.save_checkpoint(trainer, "last.pt")
    longer = vqvae.Trainer(tiny_cfg(tmp_path, ae_warmup_steps=0, ae_warmup_frac=0.5, epochs=2), tmp_path,
                           torch.device("cpu"))
    assert longer.warmup_steps == 10
    checkpoint.restore_trainer(longer, checkpoint.read_checkpoint(tmp_path / "last.pt"))
    assert (longer.warmup_steps, longer.schedule_anchor, longer.model.phase) == (5, (5, 0.0), "ae")


# -- end to end: a quantizer from outside vqvae.py, logged, checkpointed and resumed across the switch ------------------

SWITCH = 13  # 10 steps an epoch: the quantizer joins in the middle of epoch 2


def outside_cfg(tmp_path, **overrides):
    return tiny_cfg(tmp_path, quantizer="shrink_vq", epochs=2, ae_warmup_steps=SWITCH, log_every=1,
                    checkpoint_every=1, **overrides)


def records(run_dir):
    return [{k: v for k, v in r.items() if k != "epoch_time"} for r in runs.read_jsonl(run_dir / "metrics.jsonl")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("warmup")
    vqvae.train(outside_cfg(out))
    return out / "run"


def test_outside_quantizer_gets_the_warmup(reference):
    recs = records(reference)
    step_recs = [r for r in recs if "train/loss" in r]
    epoch_recs = [r for r in recs if "epoch_time" in r or "train_epoch/loss" in r]
    warm, vq = step_recs[:SWITCH], step_recs[SWITCH:]
    assert all(r["phase"] == "ae" and r["train/loss"] == r["train/recon_loss"] and "train/shrink_loss" not in r
               for r in warm)
    assert all(r["phase"] == "vq" and "train/shrink_loss" in r for r in vq)
    assert vq[0]["train/shrink_weight"] == 0 and vq[1]["train/shrink_weight"] > 0  # the schedule starts at the switch
    assert [r["phase"] for r in epoch_recs] == ["ae", "vq"]
    assert "val/ae_psnr" in epoch_recs[0] and "val/psnr" not in epoch_recs[0] and "val/shrink_loss" not in epoch_recs[0]
    assert "val/psnr" in epoch_recs[1] and "val/ae_psnr" not in epoch_recs[1]
    # the epoch of the switch: each value's mean over the steps that had it
    shrink = [r["train/shrink_loss"] for r in vq]
    assert epoch_recs[1]["train_epoch/shrink_loss"] == pytest.approx(sum(shrink) / len(shrink), rel=1e-6)
    final = json.loads((reference / "final_metrics.json").read_text())
    assert final["shrink_weight"] == pytest.approx(0.01) and "psnr" in final  # the schedule reached 1 at the end
    model, state = vqvae.load_checkpoint(reference / "checkpoint_epoch1.pt")
    assert state["phase"] == model.phase == "ae" and not model.quantizer.initialized
    model, state = vqvae.load_checkpoint(reference / "final_model.pt")
    assert state["phase"] == model.phase == "vq" and model.quantizer.initialized


@pytest.mark.parametrize("kill_step", [SWITCH, SWITCH + 3])  # after the last warm-up step; after the switch
def test_resume_across_the_switch_is_bit_exact(kill_step, reference, tmp_path, monkeypatch):
    calls, train_step = [], vqvae.Trainer.train_step

    def interrupted(self, x):
        calls.append(1)
        if len(calls) == kill_step:
            os.kill(os.getpid(), signal.SIGINT)  # the stop flag: this step finishes, then last.pt
        return train_step(self, x)

    monkeypatch.setattr(vqvae.Trainer, "train_step", interrupted)
    with pytest.raises(checkpoint.Interrupted):
        vqvae.train(outside_cfg(tmp_path))
    monkeypatch.undo()
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert state["step"] == kill_step and state["phase"] == ("ae" if kill_step <= SWITCH else "vq")
    vqvae.train(outside_cfg(tmp_path, resume=True))
    run_dir = tmp_path / "run"
    assert (run_dir / "final_metrics.json").read_bytes() == (reference / "final_metrics.json").read_bytes()
    assert records(run_dir) == records(reference)
    a, b = (torch.load(d / "final_model.pt", weights_only=False)["model"] for d in (run_dir, reference))
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_checkpoint_without_a_phase_loads_as_the_vq_model(reference, tmp_path):
    state = torch.load(reference / "final_model.pt", weights_only=False)
    del state["phase"]
    torch.save(state, tmp_path / "old.pt")
    assert vqvae.load_checkpoint(tmp_path / "old.pt")[0].phase == "vq"
