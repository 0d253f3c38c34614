"""tools/dimension_study.py on run folders written here with known metrics: correlations, warm-up verdicts, the
warm-up-length rows and the figure."""
import json
from pathlib import Path

import pytest
import yaml

import runs
import vqvae
from helpers import load_tool

ROOT = Path(__file__).resolve().parents[1]
dimension_study = load_tool("dimension_study")

BASE = vqvae.config_to_dict(vqvae.Config())


def write_run(folder: Path, final: dict, **config):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({**BASE, **config}))
    (folder / "final_metrics.json").write_text(json.dumps(final))


@pytest.fixture
def study(tmp_path):
    """K = 16,384: VQ-EMA + restarts at warm-up 0 / 10 / 25 / 50 % (seeds 1 and 2 at 0 and 25 %), where PSNR rises
    with dimension and falls with usage; BA at 0 and 25 %, its warm-up within the seed spread. K = 512: one unpaired
    run, and one unfinished."""
    d = tmp_path / "dimension"
    vq = dict(quantizer="vq_ema", dead_code_threshold=0.03125, codebook_size=16384)
    points = [(0.0, 1, 22.0, 5, 0.9), (0.0, 2, 22.2, 6, 0.8), (0.1, 1, 22.5, 8, 0.7), (0.25, 1, 23.0, 10, 0.6),
              (0.25, 2, 23.1, 11, 0.5), (0.5, 1, 23.4, 12, 0.4)]
    for frac, seed, psnr, dim, usage in points:
        write_run(d / f"vq_{frac}_{seed}", {"psnr": psnr, "latent_dim99": dim, "usage_rate": usage, "rfid": 100 - dim},
                  **vq, ae_warmup_frac=frac, seed=seed)
    ba = dict(quantizer="ba_vq", codebook_size=16384, ba_topk=16)
    for frac, seed, psnr in [(0.0, 1, 22.1), (0.0, 2, 22.6), (0.25, 1, 22.3), (0.25, 2, 22.5)]:
        write_run(d / f"ba_{frac}_{seed}", {"psnr": psnr, "latent_dim99": 7, "usage_rate": 0.95},
                  **ba, ae_warmup_frac=frac, seed=seed)
    write_run(d / "small", {"psnr": 25.0, "latent_dim99": 20, "usage_rate": 1.0}, quantizer="vq_ema",
              codebook_size=512)
    (d / "unfinished").mkdir()
    (d / "unfinished" / "config.yaml").write_text(yaml.safe_dump({**BASE, "codebook_size": 512}))
    return d


def test_groups_by_k_and_skips_unfinished_runs(study):
    groups = dimension_study.by_k(dimension_study.finished_runs(study))
    assert list(groups) == [16384, 512] and [len(g) for g in groups.values()] == [10, 1]


def test_correlations_are_spearman_over_the_runs_of_one_k(study):
    group = dimension_study.by_k(dimension_study.finished_runs(study))[16384]
    psnr = [r["final"]["psnr"] for r in group]
    dims = [r["final"]["latent_dim99"] for r in group]
    expected = runs.spearman(dims, psnr)
    row = next(line for line in dimension_study.report(study).splitlines() if line.startswith("| 16,384 | 10 |"))
    assert row.split(" | ")[2].startswith(f"{expected:+.2f} (p ")
    assert row.split(" | ")[7].startswith("—")  # perplexity: no run reported it
    assert "| 512 | 1 | — |" in dimension_study.report(study)  # too few runs to rank


def test_warmup_rows_say_whether_the_difference_exceeds_the_seed_spread(study):
    text = dimension_study.report(study)
    vq_row = next(line for line in text.splitlines() if "| vq_ema + restarts | 2 / 2 |" in line)
    assert "22.10 ± 0.14 → 23.05 ± 0.07" in vq_row and "| +0.95 | ahead |" in vq_row
    assert "5.5 ± 0.7 → 10.5 ± 0.7" in vq_row  # dim99 e
    ba_row = next(line for line in text.splitlines() if "| ba_vq + restarts + top-16 | 2 / 2 |" in line)
    assert ba_row.endswith("| +0.05 | within the seed spread |")
    assert dimension_study.verdict([22.0], [22.5]) == "ahead (one seed a side: shows, does not conclude)"
    assert dimension_study.verdict([22.0, 22.1], [21.0, 21.5]) == "behind"


def test_the_length_curve_lists_every_fraction_of_a_method_with_three_or_more(study):
    text = dimension_study.report(study).split("Warm-up length:")[1]
    rows = [line for line in text.splitlines() if line.startswith("| 16,384 |")]
    assert [r.split(" | ")[2] for r in rows] == ["0 %", "10 %", "25 %", "50 %"]
    assert all("vq_ema + restarts" in r for r in rows)  # BA ran two fractions only


def test_figure_is_written(study, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "fig" / "dimension_psnr.png"
    dimension_study.main([str(study), "--figure", str(out)])
    assert out.stat().st_size > 10_000


def test_the_length_table_says_when_no_method_ran_three_lengths(study):
    groups = dimension_study.by_k(dimension_study.finished_runs(study))
    only_ba = {16384: [r for r in groups[16384] if r["config"]["quantizer"] == "ba_vq"]}
    assert dimension_study.curve_table(only_ba) == "(no method has run three warm-up lengths yet)"


def test_a_warmup_given_in_steps_counts_as_its_share_of_the_run(tmp_path):
    run_dir = tmp_path / "run"
    write_run(run_dir, {"psnr": 20.0}, ae_warmup_steps=25, ae_warmup_frac=0.0)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (10, 50, 100)))
    run = runs.load_run(run_dir)
    assert dimension_study.warmup(run) == 0.25
    assert dimension_study.base_method(run["config"]) == dimension_study.base_method({**run["config"],
                                                                                      "ae_warmup_steps": 0})


def test_a_cell_over_fewer_seeds_than_its_runs_says_how_many(study):
    """rFID scored for one of the two no-warm-up seeds: that cell names its one seed; the PSNR cells do not."""
    final = study / "vq_0.0_2" / "final_metrics.json"
    final.write_text(json.dumps({k: v for k, v in json.loads(final.read_text()).items() if k != "rfid"}))
    text = dimension_study.report(study)
    vq_row = next(line for line in text.splitlines() if "| vq_ema + restarts | 2 / 2 |" in line)
    assert "| 95.0 (1 seed) → 89.5 ± 0.7 |" in vq_row
    assert "22.10 ± 0.14 → 23.05 ± 0.07" in vq_row


def test_spectra_figure_draws_a_panel_per_method_with_spectra(study, tmp_path):
    pytest.importorskip("matplotlib")
    lam = [4.0 / (i + 1) ** 2 for i in range(16)]
    for name in ("vq_0.0_1", "vq_0.25_1", "ba_0.0_1"):
        (study / name / "spectrum.json").write_text(json.dumps({"bits": 14.0, "latent_eigvals": lam}))
    out = tmp_path / "spectra.png"
    panels = dimension_study.spectra_figure(dimension_study.by_k(dimension_study.finished_runs(study)), out)
    assert panels == [(16384, "ba_vq + restarts + top-16", 1), (16384, "vq_ema + restarts", 2)]
    assert out.stat().st_size > 10_000


def test_the_figure_title_says_when_a_correlation_is_undefined():
    assert dimension_study.rho_text([1.0, 1.0, 1.0], [20.0, 21.0, 22.0]) == "Spearman ρ undefined (no spread)"
    assert dimension_study.rho_text([1.0, 2.0, 3.0], [20.0, 21.0, 22.0]).startswith("Spearman ρ +1.00 (p ")
