"""Score finished runs with the perceptual metrics they were trained without: LPIPS and rFID of each run's final
model on its test split, by `vqvae.validate` as a run computes them when the weights are at hand, added to the run's
final_metrics.json (with "perceptual_scored_by": this tool). A sweep's results.csv picks them up when the sweep
command runs again (it skips finished runs and rewrites the table).

    python tools/score_runs.py results/leaderboard_60ep/ba_vq_s1337 ... --data_dir ../shared/data/cifar10-subset
    python tools/score_runs.py RUN... --no_rfid          # LPIPS only (seconds; rFID takes minutes a run on a CPU)

Weights: tools/get_metric_weights.py. Runs already scored are skipped unless --again.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import baselines  # noqa: E402,F401  (registers simvq, fsq, wasserstein_vq, cvq)
import perceptual  # noqa: E402
import vqvae  # noqa: E402


def score_run(run_dir: Path, data_dir: str | None, rfid: bool, device: torch.device) -> dict:
    """{"lpips", "rfid"} of the run's final model (those whose weights are at hand), as validate computes them."""
    model, state = vqvae.load_checkpoint(run_dir / "final_model.pt", device)
    cfg = vqvae.make_config({**state["config"], **({"data_dir": data_dir} if data_dir else {}),
                             "rfid": "on" if rfid else "off"})
    test_u8 = vqvae.load_cifar10(cfg)[1]
    scorer = perceptual.PerceptualMetrics.load(cfg, device, test_u8)
    batches = vqvae.Batches(test_u8, cfg.batch_size, device, shuffle=False)  # the run's batches, as validation's
    result = vqvae.validate(model, batches, None, scorer, rfid=rfid)
    return {k: result[k] for k in ("lpips", "rfid") if k in result}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run folders holding final_model.pt and final_metrics.json")
    p.add_argument("--data_dir", help="the runs' data folder, where it moved since they ran")
    p.add_argument("--no_rfid", action="store_true", help="LPIPS only")
    p.add_argument("--again", action="store_true", help="score runs that were scored before")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for run in map(Path, args.runs):
        path = run / "final_metrics.json"
        if not (run / "final_model.pt").is_file() or not path.is_file():
            print(f"{run}: no final_model.pt and final_metrics.json, skipped")
            continue
        final = json.loads(path.read_text())
        if "perceptual_scored_by" in final and not args.again:
            print(f"{run}: scored before, skipped")
            continue
        t0 = time.time()
        scores = score_run(run, args.data_dir, not args.no_rfid, torch.device(args.device))
        if not scores:
            print(f"{run}: no metric weights at hand (tools/get_metric_weights.py), nothing written")
            continue
        final.update(scores, perceptual_scored_by="tools/score_runs.py")
        vqvae.atomic_write(path, lambda fh: fh.write(json.dumps(final, indent=2).encode()))
        print(f"{run}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()) + f" ({time.time() - t0:.0f} s)",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
