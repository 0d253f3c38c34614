"""The quantizer contract: a quantizer defined and registered outside vqvae.py trains, logs and resumes, and its
options join the Config, the flags, --help and the checks; today's records load with every value."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import runs
import sweep
import train as train_cli
import checkpoint
import vqvae
from helpers import as_if_killed_after_epoch_1


ROOT = Path(__file__).resolve().parents[1]


class ShrinkVQ(vqvae.VQEMAQuantizer):
    """VQ-EMA plus an extra named loss term and an annealed weight, whose end value is an option of its own:
    exercises every part of the contract."""

    @dataclasses.dataclass
    class Params(vqvae.VQEMAQuantizer.Params):
        shrink_max: float = vqvae.option(0.01, "shrink_vq: the shrink term's weight at the end of the run",
                                         check=(lambda w: w >= 0, ">= 0"))

    def __init__(self, params, dim):
        super().__init__(params, dim)
        self.weight = 0.0

    def schedule(self, progress):
        self.weight = self.hp.shrink_max * progress

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
    assert type(model.quantizer) is ShrinkVQ and "optimizer" not in state and state["format"] == checkpoint.CHECKPOINT_FORMAT
    assert state["config"]["shrink_max"] == 0.01 and yaml.safe_load((run_dir / "config.yaml").read_text())[
        "shrink_max"] == 0.01  # the option is saved with the run
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
            not_a_config_field: int = 0  # neither a Config field nor declared with option()

        vqvae.register_quantizer("bad")(type("BadQ", (vqvae.Quantizer,), {"Params": Bad}))
    assert "bad" not in vqvae.QUANTIZERS


def test_options_join_the_flags_help_yaml_keys_and_checks():
    assert vqvae.Config().shrink_max == 0.01 and vqvae.make_config({"shrink_max": 0.5}).shrink_max == 0.5
    parser = train_cli.build_parser()
    text = parser.format_help()
    main, group = text.split("options of --quantizer shrink_vq:")
    assert "--shrink_max" not in main[main.index("options:"):]  # in its quantizer's group, not with Config's own
    assert group.index("--shrink_max") < group.index("the shrink term's weight") < group.index("default: 0.01")
    _, flags = train_cli.parse(["--quantizer", "shrink_vq", "--shrink_max", "0.02"])
    assert vqvae.make_config(flags).shrink_max == 0.02
    with pytest.raises(vqvae.UserError, match="shrink_max must be >= 0"):
        vqvae.make_config({"shrink_max": -1.0})
    with pytest.raises(vqvae.UserError, match="shrink_max must be float"):
        vqvae.make_config({"shrink_max": "big"})
    with pytest.raises(vqvae.UserError, match="did you mean 'shrink_max'"):
        vqvae.make_config({"shrnk_max": 0.1})
    with pytest.raises(vqvae.UserError, match="did you mean --shrink_max"):
        train_cli.parse(["--shrink_mx", "0.1"])


def test_an_option_is_declared_once():
    vqvae.add_options("shrink_again", ShrinkVQ.Params)  # the same declaration: shared, nothing changes
    for name, default in [("shrink_max", 0.5), ("lr", 0.1)]:  # another quantizer's option, a Config field
        Other = dataclasses.make_dataclass("Other", [(name, float, vqvae.option(default, "another"))],
                                           bases=(vqvae.Quantizer.Params,))
        with pytest.raises(TypeError, match="already a Config field"):
            vqvae.add_options("other", Other)
    assert vqvae.Config().shrink_max == 0.01 and vqvae.Config().lr == 3e-4


def test_imports_read_before_the_flags():
    assert train_cli.run_imports(["--quantizer", "mine", "--import", "a.py", "--import", "b"]) == "baselines,a.py,b"


def test_an_import_that_is_not_there_is_one_error_line():
    with pytest.raises(vqvae.UserError, match="no module no_such_quantizer_module"):
        vqvae.make_config({"imports": "baselines,no_such_quantizer_module"})
    with pytest.raises(vqvae.UserError, match="no file nowhere/mine.py"):
        vqvae.make_config({"imports": "nowhere/mine.py"})


RECORDS = sorted(ROOT.glob("results/*/*/config.yaml"))


def test_todays_records_load_with_every_value():
    """The config.yaml of every committed run, written when the baselines' options were vqvae.Config fields."""
    assert len(RECORDS) > 100
    for path in RECORDS:
        record = vqvae.read_yaml(path)
        loaded = vqvae.config_to_dict(vqvae.make_config(record))
        assert {k: loaded[k] for k in record} == record, path


def test_a_checkpoint_of_todays_format_loads_with_vqvae_alone(tmp_path):
    """A checkpoint whose config is a committed record's (every baseline's option in it, Wasserstein VQ's from
    before its defaults changed), rebuilt in a process that imported vqvae only: `imports` defaults to baselines."""
    record = vqvae.read_yaml(ROOT / "results" / "ba_16k_options" / "beta_10_to_100_s1337" / "config.yaml")
    assert record["wasserstein_weight"] == 0.1 and "imports" not in record
    config = {**record, "quantizer": "wasserstein_vq", "arch": "compact", "latent_dim": 4, "codebook_size": 8,
              "wvq_queue_size": 32}
    model = vqvae.VQVAE(vqvae.make_config(config))
    torch.save({"config": config, "model": model.state_dict()}, tmp_path / "old.pt")  # format 1: no number
    code = ("import vqvae\n"
            "assert not {'fsq_levels', 'wvq_queue_size', 'cvq_distance'} & set(vqvae.config_fields())\n"
            "model, _ = vqvae.load_checkpoint('old.pt')\n"
            "print(type(model.quantizer).__name__, model.quantizer.hp.wasserstein_weight, len(model.quantizer.queue))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["WassersteinVQQuantizer", "0.1", "32"]


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
