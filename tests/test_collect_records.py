"""tools/collect_records.py: a sweep's finished runs' small records copied for committing, unfinished runs and
checkpoints left behind, config.yaml's out_dir rewritten, and the copies rebuilding the sweep's table."""
import json
from pathlib import Path

import yaml

import sweep
import vqvae
from helpers import load_tool

ROOT = Path(__file__).resolve().parents[1]
collect_records = load_tool("collect_records")


def write_run(folder: Path, name: str, psnr=None):
    """A run folder as train() leaves it: config.yaml (out_dir = the sweep folder) and last.pt, and when finished
    final_metrics.json, metrics.jsonl, provenance.json and final_model.pt."""
    run = folder / name
    run.mkdir(parents=True)
    cfg = vqvae.Config(name=name, out_dir=str(folder), quantizer="vq_ema", codebook_size=16)
    (run / "config.yaml").write_text(yaml.safe_dump(vqvae.config_to_dict(cfg), sort_keys=False))
    (run / "last.pt").write_bytes(b"checkpoint")
    if psnr is not None:
        (run / "final_metrics.json").write_text(json.dumps({"psnr": psnr}))
        (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "val/psnr": psnr}) + "\n")
        (run / "provenance.json").write_text(json.dumps({"commit": "abc1234", "dirty": False}))
        (run / "final_model.pt").write_bytes(b"model")


def test_copies_finished_runs_records_only_and_rewrites_out_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = Path("runs/tiny")
    write_run(src, "a", psnr=20.0)
    write_run(src, "b")  # unfinished: last.pt only
    outcome = collect_records.collect(src, Path("results/tiny"))
    assert outcome == {"copied": ["a"], "updated": [], "unchanged": [], "unfinished": ["b"]}
    copied = Path("results/tiny/a")
    assert sorted(p.name for p in copied.iterdir()) == ["config.yaml", "final_metrics.json", "metrics.jsonl",
                                                          "provenance.json"]
    assert not Path("results/tiny/b").exists()
    assert yaml.safe_load((copied / "config.yaml").read_text())["out_dir"] == "results/tiny"
    assert (copied / "metrics.jsonl").read_text() == (src / "a" / "metrics.jsonl").read_text()


def test_copies_again_only_what_changed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src, dst = Path("runs/tiny"), Path("results/tiny")
    write_run(src, "a", psnr=20.0)
    collect_records.collect(src, dst)
    assert collect_records.collect(src, dst)["unchanged"] == ["a"]
    (src / "a" / "final_metrics.json").write_text(json.dumps({"psnr": 20.0, "rfid": 90.0}))  # scored afterwards
    assert collect_records.collect(src, dst)["updated"] == ["a"]
    assert json.loads((dst / "a" / "final_metrics.json").read_text())["rfid"] == 90.0


def test_the_copies_rebuild_the_sweep_table(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = {"name": "tiny", "base": {"quantizer": "vq_ema", "codebook_size": 16},
            "experiments": [{"name": "a", "key_change": "A"}, {"name": "b", "key_change": "B"}]}
    Path("tiny.yaml").write_text(yaml.safe_dump(spec))
    write_run(Path("runs/tiny"), "a", psnr=20.0)
    write_run(Path("runs/tiny"), "b", psnr=21.0)
    collect_records.collect(Path("runs/tiny"), Path("results/tiny"))
    sweep.run_sweep("tiny.yaml", flags={"out_dir": "results"}, table_only=True)
    table = Path("results/tiny/results.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in table[1:]] == ["b", "a"]  # best PSNR first
    assert all("abc1234" in line for line in table[1:])  # each row's commit, from its provenance.json
