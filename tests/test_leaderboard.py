"""LEADERBOARD.md is its records: each committed results.csv is what `--table_only` writes from the run folders
beside it, and each table on the page is `tools/summarize_sweep.py`'s output of that csv. A record changed without
its table, or a table edited by hand, fails here."""
from pathlib import Path

import pytest

import sweep
from helpers import load_tool

ROOT = Path(__file__).resolve().parents[1]
summarize_sweep = load_tool("summarize_sweep")

SWEEPS = ["leaderboard", "leaderboard_60ep", "leaderboard_d8", "leaderboard_65k"]
TABLES = [  # (the page's heading, the sweep whose results.csv it shows, summarize_sweep's --where)
    ("## K = 512, 390 steps", "leaderboard", {"codebook_size": "512"}),
    ("## K = 16,384, 390 steps", "leaderboard", {"codebook_size": "16384"}),
    ("## K = 512, 2,340 steps (60 epochs)", "leaderboard_60ep", None),
    ("## K = 16,384, D = 8, 390 steps", "leaderboard_d8", None),
    ("## K = 65,536, 390 steps", "leaderboard_65k", None),
]


def table_after(page: str, heading: str) -> str:
    """The first Markdown table after the heading, up to its blank line."""
    start = page.index("\n| method |", page.index("\n" + heading + "\n")) + 1
    return page[start:page.index("\n\n", start) + 1]


@pytest.mark.parametrize("name", SWEEPS)
def test_results_csv_is_what_table_only_writes_from_the_records(name, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the sweep's out_dir, results/<name>, is relative to the checkout
    configs = sweep.experiment_configs(sweep.read_sweep(f"sweeps/{name}.yaml"), None, {"out_dir": "results"})
    assert Path(configs[0][1].out_dir) == Path("results") / name
    sweep.write_results(sweep.collect_results(configs), tmp_path)
    for file in ("results.csv", "results.md"):
        assert (tmp_path / file).read_text() == (ROOT / "results" / name / file).read_text(), file


@pytest.mark.parametrize("heading, name, where", TABLES, ids=[t[0] for t in TABLES])
def test_each_leaderboard_table_is_summarize_sweeps_output(heading, name, where):
    page = (ROOT / "LEADERBOARD.md").read_text()
    expected = summarize_sweep.summarize(str(ROOT / "results" / name / "results.csv"), where=where)
    assert table_after(page, heading) == expected
