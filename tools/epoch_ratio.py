"""Seconds per training epoch (with its validation) of each quantizer, timed alternately in one run, and their
ratio to the first: BA's cost against VQ-EMA's where a study pays it. Each round trains every variant for --epochs
epochs, one process each, in turn; the figure is the last epoch's `epoch_time` from metrics.jsonl (the first
holds the k-means initialisation), median over rounds. A variant may run another checkout (--checkout NAME=DIR)
to put before and after side by side.

    python tools/epoch_ratio.py --codebook_size 16384 --rounds 3          # vq_ema, ba_vq on the CIFAR-10 subset
    python tools/epoch_ratio.py --variants vq_ema ba_vq old:ba_vq --checkout old=../before
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_epoch(checkout: Path, quantizer: str, args, out: Path) -> float:
    name = f"{checkout.name}_{quantizer}"
    cmd = [sys.executable, "train.py", "--quantizer", quantizer, "--codebook_size", str(args.codebook_size),
           "--arch", "compact", "--epochs", str(args.epochs), "--data_dir", str(Path(args.data_dir).resolve()),
           "--no_wandb", "--device", "cpu", "--rfid", "off", "--no_lpips", "--out_dir", str(out),
           "--name", name, "--overwrite", "--checkpoint_every", "1000"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    subprocess.run(cmd, cwd=checkout, env=env, check=True, capture_output=True)
    records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    return [r["epoch_time"] for r in records if "epoch_time" in r][-1]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["vq_ema", "ba_vq"], help="[CHECKOUT:]QUANTIZER; the first is 1x")
    p.add_argument("--checkout", nargs="*", default=[], help="NAME=DIR: another checkout's train.py for NAME:...")
    p.add_argument("--codebook_size", type=int, default=16384)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data" / "cifar10-subset"))
    args = p.parse_args(argv)
    checkouts = {"": ROOT, **{k: Path(v).resolve() for k, v in (c.split("=", 1) for c in args.checkout)}}
    times = {v: [] for v in args.variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for v in args.variants:
                where, _, quantizer = v.rpartition(":")
                times[v].append(run_epoch(checkouts[where], quantizer, args, Path(tmp) / v.replace(":", "_")))
                print(f"round {r + 1}: {v} {times[v][-1]:.1f} s", flush=True)
    base = statistics.median(times[args.variants[0]])
    result = {v: {"s_per_epoch": statistics.median(t), "all": t, "ratio": statistics.median(t) / base}
              for v, t in times.items()}
    print(json.dumps({"codebook_size": args.codebook_size, "threads": args.threads, **result}, indent=1))
    return result


if __name__ == "__main__":
    main()
