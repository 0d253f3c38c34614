"""The quantizer contract: a quantizer defined and registered outside vqvae.py trains, logs and resumes."""
import dataclasses
import json

import pytest
import torch

import runs
import sweep
import train as train_cli
import vqvae


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
    # as if killed after epoch 1: its checkpoint becomes last.pt and the final files are gone
    run_dir = tmp_path / "straight"
    (run_dir / "checkpoint_epoch1.pt").replace(run_dir / "last.pt")
    for name in ("final_metrics.json", "final_model.pt"):
        (run_dir / name).unlink()
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
