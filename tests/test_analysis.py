"""Run-loading and analysis helpers behind analyze.ipynb: known inputs, known outputs; two ways agree."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import runs
import vqvae


# -- spike detection ----------------------------------------------------------------------------------------------

def test_find_spike_on_a_synthetic_curve():
    steps = np.arange(10, 410, 10)
    beta = steps / 200  # 0.95 at step 190, 1.0 at step 200
    ppl = np.where(steps < 250, 50.0, 120.0)  # jumps between step 240 and 250
    assert runs.find_spike(steps, ppl, beta) == (200, 250)
    assert runs.find_spike(steps, ppl, beta, window=4) == (200, 250)


def test_find_spike_window_prefers_a_sustained_rise_over_noise():
    steps = np.arange(0, 100)
    ppl = np.full(100, 50.0)
    ppl[20] = 90.0  # one noisy batch: +40 and back
    ppl[60:] = 85.0  # sustained rise of 35
    assert runs.find_spike(steps, ppl, np.full(100, 2.0)) == (None, 20)
    assert runs.find_spike(steps, ppl, np.full(100, 2.0), window=10) == (None, 60)


@pytest.mark.parametrize("beta", [np.full(20, math.nan), np.linspace(1.0, 10.0, 20), np.linspace(0.1, 0.9, 20)])
def test_find_spike_without_a_crossing(beta):
    """VQ-EMA (no beta), a schedule starting at 1 (seed's exp4) or staying below it: no crossing."""
    cross, rise = runs.find_spike(np.arange(20), np.arange(20.0) ** 2, beta)
    assert cross is None and rise == 19


def test_find_spike_too_few_records():
    assert runs.find_spike([10], [5.0], [0.5]) == (None, None)
    assert runs.find_spike([10, 20], [5.0, 6.0], [0.5, 1.5], window=2) == (20, None)


# -- fake run folders ---------------------------------------------------------------------------------------------

def write_run(folder, config, records, final=None):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if final is not None:
        (folder / "final_metrics.json").write_text(json.dumps(final))


@pytest.fixture
def fake_runs(tmp_path):
    ba_cfg = {**vqvae.config_to_dict(vqvae.Config()), "quantizer": "ba_vq", "entropy_weight": 0.01, "ba_iters": 1}
    vq_cfg = {**ba_cfg, "quantizer": "vq_ema"}
    ba_records = [{"step": 10, "epoch": 1, "train/perplexity": 5.0, "train/beta": 0.8},
                  {"step": 20, "epoch": 1, "train/perplexity": 9.0, "train/beta": 1.2},
                  {"step": 20, "epoch": 1, "epoch_time": 3.5, "val/psnr": 14.0, "val/perplexity": 7.0,
                   "val/usage_rate": 0.25},
                  {"step": 30, "epoch": 2, "train/perplexity": 11.0, "train/beta": 2.0},
                  {"step": 40, "epoch": 2, "epoch_time": 4.0, "val/psnr": 15.5, "val/perplexity": 8.0,
                   "val/usage_rate": 0.5}]
    write_run(tmp_path / "sweep" / "ba", ba_cfg, ba_records,
              {"psnr": 15.5, "perplexity": 8.0, "usage_rate": 0.5, "dead_codes": 3})
    vq_records = [{"step": 10, "epoch": 1, "train/perplexity": 4.0},
                  {"step": 20, "epoch": 1, "epoch_time": 2.0, "val/psnr": 16.0, "val/perplexity": 3.0,
                   "val/usage_rate": 0.1}]
    write_run(tmp_path / "sweep" / "vq", vq_cfg, vq_records)  # unfinished: no final_metrics.json
    (tmp_path / "sweep" / "results.md").write_text("not a run\n")
    return [runs.load_run(p) for p in runs.find_runs(tmp_path)]


def test_runs_table_from_fake_folders(fake_runs):
    rows = runs.runs_table(fake_runs)
    assert [r["run"] for r in rows] == ["ba", "vq"]
    ba, vq = rows
    assert ba["quantizer"] == "ba_vq" and ba["entropy_weight"] == 0.01 and ba["ba_iters"] == 1
    assert (ba["psnr"], ba["perplexity"], ba["usage_rate"], ba["dead_codes"]) == (15.5, 8.0, 0.5, 3)
    assert ba["wall_time_s"] == pytest.approx(7.5)
    assert vq["quantizer"] == "vq_ema" and vq["codebook_size"] == vqvae.Config.codebook_size
    # the table shows the hyperparameters the run's quantizer reads (its Params): beta etc. do not apply to VQ-EMA
    assert all(vq[k] is None for k in ("beta_start", "beta_end", "ba_iters", "entropy_weight"))
    assert "dead_code_threshold" in runs.quantizer_keys("vq_ema") and runs.quantizer_keys("no_such") is None
    assert all(vq[k] is None for k in runs.TABLE_METRICS)  # unfinished run
    assert vq["wall_time_s"] == pytest.approx(2.0)


def test_epoch_and_step_curves(fake_runs):
    ba, vq = fake_runs
    curves = runs.epoch_curves(ba)
    np.testing.assert_array_equal(curves["epoch"], [1, 2])
    np.testing.assert_allclose(curves["psnr"], [14.0, 15.5])
    np.testing.assert_allclose(curves["usage_rate"], [0.25, 0.5])
    steps = runs.step_curves(ba)  # epoch records carry no batch perplexity and are left out
    np.testing.assert_array_equal(steps["step"], [10, 20, 30])
    np.testing.assert_allclose(steps["perplexity"], [5.0, 9.0, 11.0])
    assert runs.find_spike(steps["step"], steps["perplexity"], steps["beta"]) == (20, 20)
    vq_steps = runs.step_curves(vq)
    assert vq_steps["step"].tolist() == [10] and np.isnan(vq_steps["beta"]).all()


# -- codes and latents of a model ---------------------------------------------------------------------------------

@pytest.fixture(params=["vq_ema", "ba_vq"])
def model_and_images(request):
    torch.manual_seed(0)
    model = vqvae.VQVAE(quantizer=request.param, arch="compact", codebook_size=16, kmeans_init=False).eval()
    images = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():  # spread the codebook over the encoder's outputs so that several codes are used
        e = vqvae.Quantizer._flatten(model.encoder(images.float() / 127.5 - 1))
        model.quantizer.codebook.copy_(e[torch.randperm(len(e))[:16]])
    return model, images


def test_code_histogram_agrees_with_validate(model_and_images):
    model, images = model_and_images
    counts = runs.code_histogram(model, images, batch=10)
    assert counts.shape == (16,) and counts.sum().item() == len(images) * 64
    val = vqvae.validate(model, vqvae.Batches(images, 10, "cpu", shuffle=False))
    stats = vqvae.codebook_stats(counts)
    assert stats["perplexity"].item() == pytest.approx(val["perplexity"], rel=1e-5)
    assert stats["usage_rate"].item() == pytest.approx(val["usage_rate"])
    assert (counts > 0).sum().item() > 1


def test_latents_are_encoder_outputs_with_the_models_codes(model_and_images):
    model, images = model_and_images
    e, idx = runs.latents(model, images, n=300, seed=1, batch=10)
    assert e.shape == (300, model.cfg.code_dim) and idx.shape == (300,)
    all_e = vqvae.Quantizer._flatten(model.encoder(images.float() / 127.5 - 1).detach())
    # every sampled latent is one of the encoder's outputs, drawn without replacement
    match = torch.cdist(e, all_e).argmin(1)
    assert torch.allclose(all_e[match], e, atol=1e-5) and len(set(match.tolist())) == 300
    if model.cfg.quantizer == "vq_ema":  # hard VQ: the code is the nearest codeword
        C = model.quantizer.codebook
        assert torch.equal(idx, torch.cdist(e, C).argmin(1))
    rate, distortion = runs.operating_point(e, model.quantizer.codebook, idx)
    counts = torch.bincount(idx, minlength=16).double()
    assert rate == pytest.approx(math.log2(vqvae.codebook_stats(counts)["perplexity"].item()), rel=1e-5)
    assert distortion == pytest.approx(((e - model.quantizer.codebook[idx]) ** 2).sum(1).mean().item(), rel=1e-5)


def test_operating_point_lies_above_the_rd_curve(model_and_images):
    """A deterministic code is one test channel: rate H(idx) >= I, so BA's minimum of R + beta D (in nats) over
    all channels is at most the operating point's, at every beta."""
    model, images = model_and_images
    e, idx = runs.latents(model, images, n=200, batch=10)
    C = model.quantizer.codebook
    rate, distortion = runs.operating_point(e, C, idx)
    betas = np.geomspace(0.1, 100, 6) / distortion
    curve = runs.rd_curve(e, C, betas, iters=3000)
    assert curve.shape == (6, 2)
    for b, (r, d) in zip(betas, curve):
        assert r * math.log(2) + b * d <= rate * math.log(2) + b * distortion + 1e-6
    assert np.all(np.diff(curve[:, 0]) >= -1e-6) and np.all(np.diff(curve[:, 1]) <= 1e-6)  # R up, D down in beta


def test_method_labels_name_the_remedies_that_apply():
    assert runs.method_label({"quantizer": "vq_ema", "dead_code_threshold": 0.0}) == "vq_ema"
    assert runs.method_label({"quantizer": "vq_ema", "dead_code_threshold": 1.0}) == "vq_ema + restarts"
    assert runs.method_label({"quantizer": "vq_ema", "dead_code_threshold": 1.0, "estimator": "rotation"}) == \
        "vq_ema + rotation + restarts"
    assert runs.method_label({"quantizer": "ba_seed", "dead_code_threshold": 1.0}) == "ba_seed"  # never restarts
    assert runs.method_label({"quantizer": "fsq", "dead_code_threshold": 1.0}) == "fsq"  # no codebook to restart
    assert runs.method_label({"quantizer": "fsq", "ae_warmup_frac": 0.25}) == "fsq + AE warm-up"
    assert runs.method_label({"quantizer": "vq_ema", "dead_code_threshold": 1.0, "ae_warmup_steps": 100,
                              "ae_warmup_frac": 0.0}) == "vq_ema + restarts + AE warm-up"
    assert runs.method_label({"quantizer": "vq_ema", "ae_warmup_steps": 0, "ae_warmup_frac": 0.0}) == "vq_ema"


def test_method_labels_name_a_quantizers_own_options_that_differ_from_their_defaults():
    """A saved config lists every registered option; only the run's own quantizer's changed options enter the label,
    so CVQ with main.py's scaling is not pooled with CVQ, and other quantizers' settings do not split a method."""
    cvq = {"quantizer": "cvq", "cvq_distance": "cos", "cvq_data_variance": 1.0, "wvq_codebook_lr": 0.5}
    assert runs.method_label(cvq) == "cvq"
    assert runs.method_label({**cvq, "cvq_data_variance": 0.0637}) == "cvq (cvq_data_variance=0.0637)"
    assert runs.method_label({**cvq, "cvq_distance": "l2", "cvq_data_variance": 0.5}) == \
        "cvq (cvq_distance=l2, cvq_data_variance=0.5)"
    assert runs.method_label({"quantizer": "vq_ema", "cvq_data_variance": 0.0637, "dead_code_threshold": 1.0}) == \
        "vq_ema + restarts"
    records = Path(__file__).resolve().parent.parent / "results" / "leaderboard_60ep"
    labels = {name: runs.method_label(yaml.safe_load((records / name / "config.yaml").read_text()))
              for name in ("cvq_s1", "cvq_official_s1", "fsq_s1", "wasserstein_vq_s1")}
    assert labels == {"cvq_s1": "cvq", "cvq_official_s1": "cvq (cvq_data_variance=0.0637)", "fsq_s1": "fsq",
                      "wasserstein_vq_s1": "wasserstein_vq"}


# -- rank correlation ---------------------------------------------------------------------------------------------

def test_ranks_and_spearman_agree_with_scipy_on_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(3)
    x = rng.integers(0, 6, size=25).astype(float)  # many ties, as dimension counts have
    y = x + rng.normal(0, 2, size=25)
    np.testing.assert_array_equal(runs.ranks(x), stats.rankdata(x))
    assert runs.spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert runs.spearman(x, -y) == pytest.approx(-runs.spearman(x, y), abs=1e-12)
    assert math.isnan(runs.spearman(np.ones(5), np.arange(5.0)))


def test_spearman_of_a_monotone_map_is_one_whatever_the_scale():
    x = np.array([3.0, 1.0, 4.0, 1.5, 9.0, 2.6])
    assert runs.spearman(x, np.exp(x)) == pytest.approx(1.0)
    assert runs.spearman(x, -x ** 3) == pytest.approx(-1.0)


def test_spearman_permutation_p_agrees_with_the_t_approximation_at_moderate_n():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x = rng.normal(size=30)
    y = 0.4 * x + rng.normal(size=30)
    rho, p = runs.spearman_test(x, y, permutations=4000)
    assert rho == pytest.approx(stats.spearmanr(x, y).statistic)
    assert p == pytest.approx(stats.spearmanr(x, y).pvalue, abs=0.02)
    _, p_perfect = runs.spearman_test(np.arange(8.0), np.arange(8.0) ** 2, permutations=999)
    assert p_perfect == pytest.approx(1 / 1000)  # 2 of 8! pairings reach |rho| = 1; seed 0 draws neither


def test_by_method_and_k_groups_seeds_and_uses_the_k_a_quantizer_reports():
    def run(q, K, usage, **extra):
        return {"config": {"quantizer": q, "codebook_size": K, "dead_code_threshold": 0.0},
                "final": {"usage_rate": usage, **extra}}
    grouped = runs.by_method_and_k([run("vq_ema", 512, 0.1), run("vq_ema", 512, 0.2), run("vq_ema", 16384, 0.05),
                                    run("fsq", 500, 0.9, codebook_size_used=512.0),
                                    {"config": {"quantizer": "vq_ema", "codebook_size": 64}, "final": None}],
                                   "usage_rate")
    assert grouped == {"vq_ema": {512: [0.1, 0.2], 16384: [0.05]}, "fsq": {512: [0.9]}}
