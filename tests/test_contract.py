"""The quantizer contract: a quantizer defined and registered outside vqvae.py trains, logs and resumes."""
import dataclasses
import json

import pytest
import torch

import runs
import sweep
import train as train_cli
import vqvae
from helpers import as_if_killed_after_epoch_1


class ShrinkVQ(vqvae.VQEMAQuantizer):
    """VQ-EMA plus an extra named loss term and an annealed weight: exercises every part of the contract."""

    def __init__(self, params, dim):
        super().__init__(params, dim)
        self.weight = 0.0

    def schedule(self, progress):
        self.weight = 0.01 * progress

    def report(self):
        return {"shrink_weight": self.weight}

    def quantize(self, e):
        q = super().quantize(e)
        losses = {**q.losses, "shrink_loss": self.weight * e.square().mean()}
        # a CPU scalar, whatever the device: what a user's method would write
        return q._replace(losses=losses, metrics={**q.metrics, "shrink_weight": torch.tensor(self.weight)})


vqvae.register_quantizer("shrink_vq")(ShrinkVQ)  # the one line a new method needs


def tiny_cfg(tmp_path, **overrides):
    return vqvae.make_config({"dataset": "cifar10-sample", "arch": "compact", "latent_dim": 16, "codebook_size": 16,
                              "batch_size": 64, "kmeans_iters": 2, "wandb": False, "quantizer": "shrink_vq",
                              "out_dir": str(tmp_path), "name": "toy", "epochs": 2, "device": "cpu",  # exact resume
                              **overrides})


def test_registered_quantizer_trains_logs_and_resumes(tmp_path):
    straight = vqvae.train(tiny_cfg(tmp_path, name="straight", checkpoint_every=1))
    run_dir = tmp_path / "straight"
    as_if_killed_after_epoch_1(run_dir)
    resumed = vqvae.train(tiny_cfg(tmp_path, name="straight", checkpoint_every=1, resume=True))
    assert resumed == straight  # bit-exact resume, extra term and all
    records = runs.read_jsonl(run_dir / "metrics.jsonl")
    steps = [r for r in records if "train/loss" in r]
    epochs = [r for r in records if "val/psnr" in r]
    assert len(epochs) == 2 and all("train/shrink_loss" in r and "train/shrink_weight" in r for r in steps)
    assert all("train_epoch/shrink_loss" in r and "val/shrink_loss" in r for r in epochs)
    assert epochs[1]["train_epoch/shrink_loss"] > epochs[0]["train_epoch/shrink_loss"] > 0  # annealed weight
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["shrink_loss"] > 0 and final["shrink_weight"] == pytest.approx(0.01)  # report() at the end
    model, state = vqvae.load_checkpoint(run_dir / "final_model.pt")
    assert type(model.quantizer) is ShrinkVQ and "optimizer" not in state and state["format"] == vqvae.CHECKPOINT_FORMAT
    rows = sweep.collect_results([("toy", tiny_cfg(tmp_path, name="straight"))])
    assert rows[0]["shrink_loss"] == final["shrink_loss"]  # every final metric reaches the sweep table


def test_registry_is_the_one_source_of_names():
    assert set(vqvae.QUANTIZERS) >= {"vq_ema", "ba_vq", "shrink_vq"}
    quantizer_flag = next(a for a in train_cli.build_parser()._actions if a.dest == "quantizer")
    assert sorted(quantizer_flag.choices) == sorted(vqvae.QUANTIZERS)
    with pytest.raises(vqvae.UserError, match="did you mean 'shrink_vq'"):
        vqvae.make_config({"quantizer": "shrnk_vq"})


def test_params_name_only_config_fields_and_each_quantizer_gets_its_own():
    for name, cls in vqvae.QUANTIZERS.items():
        fields = {f.name for f in dataclasses.fields(cls.Params)}
        assert fields <= set(vqvae.config_fields()), name
        cfg = vqvae.Config(quantizer=name, codebook_size=8)
        expected = {k: getattr(cfg, k) for k in fields}
        expected.update(getattr(cls, "SEED_OPTIONS", {}))  # ba_seed: the seeds' method, whatever the options say
        assert dataclasses.asdict(vqvae.make_quantizer(cfg, 4).hp) == expected
    assert "beta_start" not in {f.name for f in dataclasses.fields(vqvae.VQEMAQuantizer.Params)}
    with pytest.raises(TypeError, match="Config fields"):
        @dataclasses.dataclass
        class Bad(vqvae.Quantizer.Params):
            not_a_config_field: int = 0

        vqvae.register_quantizer("bad")(type("BadQ", (vqvae.Quantizer,), {"Params": Bad}))
    assert "bad" not in vqvae.QUANTIZERS


# -- every registered quantizer (vqvae.py's and baselines.py's; not those tests define), properties of the contract --

REGISTERED = sorted(n for n, c in vqvae.QUANTIZERS.items() if not c.__module__.startswith(("test", "tests")))
ESTIMATED = [(n, est) for n in REGISTERED for est in ("ste", "rotation")
             if est == "ste" or "estimator" in {f.name for f in dataclasses.fields(vqvae.QUANTIZERS[n].Params)}]
BATCH_CODES = {"ba_seed"}  # the seeds' evaluation rule: a code under the evaluated batch's own marginal


def make_q(name, **overrides):
    cfg = vqvae.Config(quantizer=name, codebook_size=16, kmeans_iters=3, wvq_queue_size=64, **overrides)
    return vqvae.make_quantizer(cfg, 8)


def latents(seed, B=4):
    return torch.randn(B, 8, 3, 3, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name, estimator", ESTIMATED)
def test_training_forward_shapes_indices_losses_and_gradients(name, estimator):
    torch.manual_seed(0)
    q = make_q(name, estimator=estimator).train()
    z = latents(0).requires_grad_()
    z_q, losses, metrics = q(z)
    assert z_q.shape == z.shape and z_q.dtype == z.dtype
    idx = metrics["code_indices"]
    assert idx.shape == (4, 3, 3) and idx.dtype == torch.long and 0 <= idx.min() and idx.max() < q.K
    assert all(torch.is_tensor(v) and v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    assert all(vqvae.is_scalar(v) for k, v in metrics.items() if k != "code_indices")
    (z_q.square().sum() + sum(losses.values(), torch.zeros(()))).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    learned = [p for p in q.parameters() if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in learned)  # the loss reaches them


@pytest.mark.parametrize("name", REGISTERED)
def test_eval_output_is_the_codes_of_its_indices_and_changes_no_state(name):
    torch.manual_seed(0)
    q = make_q(name)
    q.train()(latents(1))  # initialisation and one update on a training batch
    q.eval()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    z_q, losses, metrics = q(latents(2))
    lookup = q.codes(metrics["code_indices"]).permute(0, 3, 1, 2)
    torch.testing.assert_close(z_q, lookup, rtol=0, atol=1e-6)  # the deployed model: a lookup
    assert all(torch.equal(v, q.state_dict()[k]) for k, v in before.items())
    assert all(isinstance(v, float) for v in q.report().values())


@pytest.mark.parametrize("name", [n for n in REGISTERED if n not in BATCH_CODES])
def test_eval_code_of_a_latent_does_not_depend_on_its_batch(name):
    torch.manual_seed(0)
    q = make_q(name)
    q.train()(latents(1))
    q.eval()
    z = latents(2, B=6)
    whole = q(z)[2]["code_indices"]
    alone = torch.cat([q(z[i:i + 1])[2]["code_indices"] for i in range(len(z))])
    assert torch.equal(whole, alone)
