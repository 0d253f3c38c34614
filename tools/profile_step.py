"""Where a training step's time goes: one quantizer in the compact nets at batch 128 (8,192 latents), a random batch,
AdamW, on the CPU. Prints ms per step (the median of --steps timed steps after a k-means step and two warm-up steps)
and torch.profiler's table of operators by their own CPU time for one more step.

    python tools/profile_step.py --quantizer ba_vq --codebook_size 16384 --beta 90 --threads 2
    python tools/profile_step.py --quantizer vq_ema --codebook_size 16384 --dead_code_threshold 0.03125

--beta sets BA's inverse temperature (relative units) for every step after the first, as at that point of the
schedule; where the logits underflow (large beta) is where an exact pass is slowest on a CPU.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import vqvae  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quantizer", default="ba_vq")
    p.add_argument("--codebook_size", type=int, default=16384)
    p.add_argument("--beta", type=float, default=None, help="BA: beta after the first step (default: beta_start)")
    p.add_argument("--dead_code_threshold", type=float, default=0.03125)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rows", type=int, default=25, help="operators in the table")
    args = p.parse_args(argv)
    torch.set_flush_denormal(True)  # as train() runs; before the thread pool starts (it inherits the mode)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = vqvae.make_config({"quantizer": args.quantizer, "codebook_size": args.codebook_size, "arch": "compact",
                             "dead_code_threshold": args.dead_code_threshold})
    model = vqvae.VQVAE(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    x = torch.rand(128, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1

    def step():
        _, recon, losses, _ = model(x)
        opt.zero_grad(set_to_none=True)
        (recon + sum(losses.values())).backward()
        opt.step()

    step()  # k-means initialisation
    if args.beta is not None and hasattr(model.quantizer, "set_beta"):
        model.quantizer.set_beta(args.beta)
    step(), step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(f"{args.quantizer} K={args.codebook_size} beta={args.beta} threads={args.threads}: "
          f"{1e3 * statistics.median(times):.0f} ms/step (median of {args.steps}: "
          f"{', '.join(f'{1e3 * t:.0f}' for t in times)})")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
