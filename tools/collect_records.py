"""Copy a sweep's finished runs' small records into the folder that is committed, so a fresh clone rebuilds the
tables (`python train.py --sweep ... --out_dir results --table_only`) without the checkpoints.

    python tools/collect_records.py runs/dimension results/dimension     # then: git add results/dimension

A run is finished when it has final_metrics.json; unfinished runs (last.pt only) are listed and left. For each
finished run it copies RECORD_FILES (never a checkpoint), with config.yaml's `out_dir` rewritten to the destination,
so the copied config names where its records now live. A run copied before is copied again only when a record
changed (e.g. `tools/score_runs.py` added rFID to final_metrics.json).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

RECORD_FILES = ("config.yaml", "metrics.jsonl", "final_metrics.json", "provenance.json", "spectrum.json")


def record_texts(run: Path, out_dir: str) -> dict[str, str]:
    """{file name: text to write} for the run's records there are; config.yaml's out_dir line made `out_dir`."""
    texts = {name: (run / name).read_text() for name in RECORD_FILES if (run / name).is_file()}
    texts["config.yaml"], n = re.subn(r"(?m)^out_dir: .*$", f"out_dir: {out_dir}", texts["config.yaml"])
    if n != 1:
        raise ValueError(f"{run / 'config.yaml'}: expected one 'out_dir:' line, found {n}")
    return texts


def collect(src: Path, dst: Path) -> dict[str, list[str]]:
    """Copy every finished run under src into dst. Returns the run names by outcome: copied, updated, unchanged,
    unfinished."""
    outcome = {"copied": [], "updated": [], "unchanged": [], "unfinished": []}
    for run in sorted(p for p in src.iterdir() if (p / "config.yaml").is_file()):
        if not (run / "final_metrics.json").is_file():
            outcome["unfinished"].append(run.name)
            continue
        texts = record_texts(run, dst.as_posix())
        target = dst / run.name
        before = {name: (target / name).read_text() for name in RECORD_FILES if (target / name).is_file()}
        if before == texts:
            outcome["unchanged"].append(run.name)
            continue
        target.mkdir(parents=True, exist_ok=True)
        for name, text in texts.items():
            (target / name).write_text(text)
        outcome["updated" if before else "copied"].append(run.name)
    return outcome


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("src", type=Path, help="the sweep's folder where it ran (<out_dir>/<sweep name>)")
    p.add_argument("dst", type=Path, help="the committed folder (e.g. results/<sweep name>), as the repo names it")
    args = p.parse_args(argv)
    if not args.src.is_dir():
        print(f"{args.src}: no such folder", file=sys.stderr)
        return 2
    outcome = collect(args.src, args.dst)
    for what, names in outcome.items():
        print(f"{what} ({len(names)}): {' '.join(names) if names else '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
