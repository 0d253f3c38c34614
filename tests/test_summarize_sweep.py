"""tools/summarize_sweep.py on a small sweep folder written here: mean ± std cells, s/step, group order."""
import csv
import json
import statistics
from pathlib import Path

import pytest

from helpers import load_tool

ROOT = Path(__file__).resolve().parents[1]
summarize_sweep = load_tool("summarize_sweep")

# "low" comes first in the file but has the lower PSNR, so the two orders differ
RUNS = {  # experiment: (key_change, psnr, ssim, usage_rate, [(steps in the epoch, epoch_time), ...])
    "low_s1": ("low", 20.0, 0.70, 0.50, [(10, 1.0), (12, 1.3), (8, 9.0)]),  # one paused epoch
    "low_s2": ("low", 20.5, 0.72, 0.55, [(10, 1.1), (10, 1.0), (10, 1.6)]),
    "high_s1": ("high", 22.0, 0.80, 0.90, [(5, 2.0), (5, 30.0), (5, 2.2), (5, 2.1)]),  # one paused epoch
    "high_s2": ("high", 22.6, 0.83, 0.95, [(6, 2.4), (6, 2.5), (4, 1.7)]),
}


def write_metrics(run_dir: Path, epochs):
    """Per-epoch records as training writes them, among train/* records (with and without "epoch") that must
    be ignored, and ending in a line cut short by a kill."""
    run_dir.mkdir(parents=True)
    lines, step = [json.dumps({"step": 5, "train/loss": 1.0})], 0
    for epoch, (steps, seconds) in enumerate(epochs, start=1):
        step += steps
        lines.append(json.dumps({"step": step - 1, "epoch": epoch, "train/loss": 0.5}))
        lines.append(json.dumps({"step": step, "epoch": epoch, "epoch_time": seconds, "val/psnr": 20.0}))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 99, "epo')


@pytest.fixture
def sweep_csv(tmp_path):
    path = tmp_path / "results.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["experiment", "key_change", "seed", "psnr", "ssim", "usage_rate"])
        for name, (key_change, psnr, ssim, usage, epochs) in RUNS.items():
            writer.writerow([name, key_change, name[-1], psnr, ssim, usage])
            write_metrics(tmp_path / name, epochs)
    return path


def table_rows(markdown: str) -> list[dict]:
    """The Markdown table as {header: cell} rows."""
    split = [[c.strip() for c in line.strip().strip("|").split("|")] for line in markdown.splitlines()]
    header, body = split[0], split[2:]
    return [dict(zip(header, cells)) for cells in body]


def mean_std(values, spec):
    return f"{format(statistics.mean(values), spec)} ± {format(statistics.stdev(values), spec)}"


def median_rate(epochs):
    return statistics.median(seconds / steps for steps, seconds in epochs)


def test_seconds_per_step_is_the_median_over_epochs(sweep_csv):
    for name, (*_, epochs) in RUNS.items():
        got = summarize_sweep.seconds_per_step(sweep_csv.parent / name)
        assert got == pytest.approx(median_rate(epochs))
        # slow epochs pull the mean, not the median
        assert got != pytest.approx(statistics.mean(s / n for n, s in epochs))


def test_table_cells_are_mean_and_std_over_seeds(sweep_csv):
    rows = {r["method"]: r for r in table_rows(summarize_sweep.summarize(str(sweep_csv)))}
    assert set(rows) == {"low", "high"}
    for group in rows:
        runs = [v for v in RUNS.values() if v[0] == group]
        row = rows[group]
        assert row["seeds"] == str(len(runs))
        assert row["hard-code PSNR (dB)"] == mean_std([r[1] for r in runs], ".2f")
        assert row["SSIM"] == mean_std([r[2] for r in runs], ".3f")
        assert row["usage (%)"] == mean_std([100 * r[3] for r in runs], ".1f")
        assert "perplexity" not in row and "rFID" not in row  # not in this results.csv: no column of dashes
        assert row["s/step"] == mean_std([median_rate(r[4]) for r in runs], ".3f")
    assert list(table_rows(summarize_sweep.summarize(str(sweep_csv)))[0])[-1] == "s/step"


def test_missing_metrics_give_a_dash(sweep_csv):
    for name in ("low_s1", "low_s2"):
        (sweep_csv.parent / name / "metrics.jsonl").unlink()
    (sweep_csv.parent / "high_s2" / "metrics.jsonl").write_text(json.dumps({"step": 5, "train/loss": 1.0}) + "\n")
    rows = {r["method"]: r for r in table_rows(summarize_sweep.summarize(str(sweep_csv)))}
    assert rows["low"]["s/step"] == "—"
    assert rows["high"]["s/step"] == format(median_rate(RUNS["high_s1"][4]), ".3f")  # the one run with epochs


def test_group_order(sweep_csv, capsys):
    by_psnr = sorted({v[0] for v in RUNS.values()},
                     key=lambda g: -statistics.mean(v[1] for v in RUNS.values() if v[0] == g))
    in_file = list(dict.fromkeys(v[0] for v in RUNS.values()))
    assert by_psnr != in_file  # otherwise this test could not tell the orders apart
    assert [r["method"] for r in table_rows(summarize_sweep.summarize(str(sweep_csv)))] == by_psnr
    assert [r["method"] for r in table_rows(summarize_sweep.summarize(str(sweep_csv), order="file"))] == in_file

    summarize_sweep.main([str(sweep_csv)])
    assert [r["method"] for r in table_rows(capsys.readouterr().out)] == by_psnr
    summarize_sweep.main([str(sweep_csv), "--order", "file"])
    assert [r["method"] for r in table_rows(capsys.readouterr().out)] == in_file


def test_commit_and_train_usage_columns_come_from_the_csv(sweep_csv):
    """results.csv's commit/dirty (from each run's provenance.json) and train_usage reach the table."""
    with open(sweep_csv) as fh:
        rows = list(csv.DictReader(fh))
    commits = {"low_s1": ("a" * 40, "False"), "low_s2": ("b" * 40, "True"), "high_s1": ("c" * 40, "False"),
               "high_s2": ("c" * 40, "False")}
    with open(sweep_csv, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*rows[0], "commit", "dirty", "train_usage"])
        writer.writeheader()
        for r in rows:
            commit, dirty = commits[r["experiment"]]
            writer.writerow({**r, "commit": commit, "dirty": dirty, "train_usage": float(r["usage_rate"]) / 2})
    table = {r["method"]: r for r in table_rows(summarize_sweep.summarize(str(sweep_csv)))}
    assert table["low"]["commit"] == "aaaaaaa, bbbbbbb+dirty" and table["high"]["commit"] == "ccccccc"
    assert table["low"]["train usage (%)"] == mean_std([50 * RUNS[n][3] for n in ("low_s1", "low_s2")], ".1f")
    assert list(table["low"])[-2:] == ["s/step", "commit"]


def test_a_metric_some_seeds_lack_says_over_how_many(sweep_csv):
    """rFID of one seed of two, train usage of both: the first cell names its one seed, the second is plain."""
    with open(sweep_csv) as fh:
        rows = list(csv.DictReader(fh))
    with open(sweep_csv, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*rows[0], "rfid", "train_usage"])
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "rfid": 80.0 if r["experiment"] == "high_s1" else "", "train_usage": 0.5})
    table = {r["method"]: r for r in table_rows(summarize_sweep.summarize(str(sweep_csv)))}
    assert table["high"]["rFID"] == "80.0 (1 seed)"
    assert table["low"]["rFID"] == "—"
    assert table["high"]["train usage (%)"] == "50.0 ± 0.0"


def test_separation_marks_only_rows_apart_on_every_seed_pair(sweep_csv, capsys):
    """high (22.0, 22.6) is above low (20.0, 20.5) on every seed pair; mid (20.4, 21.0) overlaps low but not high;
    one (a single seed) is never compared; another column reads the same way (">" is higher, whichever is better)."""
    with open(sweep_csv) as fh:
        rows = list(csv.DictReader(fh))
    with open(sweep_csv, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        for name, psnr in (("mid_s1", 20.4), ("mid_s2", 21.0), ("one_s1", 30.0)):
            writer.writerow({"experiment": name, "key_change": name[:-3], "seed": name[-1], "psnr": psnr,
                             "ssim": 0.7, "usage_rate": 0.5})
    matrix = {r["method"]: r for r in table_rows(summarize_sweep.separation(str(sweep_csv)))}
    assert list(matrix) == ["one", "high", "mid", "low"]  # the table's order: best mean PSNR first
    assert [matrix["high"][c] for c in "1234"] == ["?", "·", ">", ">"]
    assert [matrix["mid"][c] for c in "1234"] == ["?", "<", "·", "≈"]
    assert [matrix["low"][c] for c in "1234"] == ["?", "<", "≈", "·"]
    assert [matrix["one"][c] for c in "1234"] == ["·", "?", "?", "?"]
    by_ssim = {r["method"]: r for r in table_rows(summarize_sweep.separation(str(sweep_csv), "ssim"))}
    assert by_ssim["high"]["4"] == ">" and by_ssim["mid"]["4"] == "≈"  # ssim 0.80/0.83 vs 0.70/0.72; 0.7 ties

    summarize_sweep.main([str(sweep_csv), "--separation", "psnr"])
    out = capsys.readouterr().out
    assert out.endswith(summarize_sweep.separation(str(sweep_csv))) and "| psnr | method |" in out
    with pytest.raises(SystemExit, match="no column rfid"):  # a typo is an error, not a matrix of "?"
        summarize_sweep.main([str(sweep_csv), "--separation", "rfid"])


def test_where_keeps_only_the_matching_runs_in_table_and_separation(sweep_csv, capsys):
    """--where seed=1 leaves one run per group (a plain cell, "?" in the matrix); an unknown column is an error
    that names it."""
    table = {r["method"]: r for r in table_rows(summarize_sweep.summarize(str(sweep_csv), where={"seed": "1"}))}
    assert table["low"]["seeds"] == "1" and table["low"]["hard-code PSNR (dB)"] == "20.00"
    assert table["high"]["hard-code PSNR (dB)"] == "22.00"
    matrix = table_rows(summarize_sweep.separation(str(sweep_csv), where={"seed": "1"}))
    assert [r["method"] for r in matrix] == ["high", "low"] and matrix[0]["2"] == "?"

    summarize_sweep.main([str(sweep_csv), "--where", "seed=2"])
    assert {r["method"]: r["hard-code PSNR (dB)"] for r in table_rows(capsys.readouterr().out)} == \
        {"high": "22.60", "low": "20.50"}
    with pytest.raises(SystemExit, match="no column K"):
        summarize_sweep.main([str(sweep_csv), "--where", "K=512"])
