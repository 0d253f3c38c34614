"""rFID and LPIPS over a test split, timed: of a checkpoint's reconstructions, and of fixed degradations of the
real images (a sanity scale: other real images, a 2x blur, Gaussian noise).

    python tools/perceptual_eval.py --data_dir ../shared/data/cifar10-subset
    python tools/perceptual_eval.py --data_dir ../shared/data/cifar10-subset --checkpoint experiments/x/final_model.pt
    python tools/perceptual_eval.py --dataset cifar10-sample --fresh_stats --no_train_ref   # time the real stats

The real images' statistics come from the cache folder ($BAVQ_CACHE, default ~/.cache/ba-vq), computed on first use;
--fresh_stats computes them into a temporary folder instead, to time that. Weights: tools/get_metric_weights.py.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import perceptual  # noqa: E402
import vqvae  # noqa: E402


def timed(fn, *args, **kwargs):
    """(fn's result, seconds it took)."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def degradations(x: torch.Tensor, seed: int = 0) -> dict:
    """Fixed degradations of images x (N, 3, 32, 32) in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    return {"blur 2x (avg-pool, bilinear up)": F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="bilinear"),
            "noise sigma 0.1": x + 0.1 * torch.randn(x.shape, generator=g),
            "noise sigma 0.3": x + 0.3 * torch.randn(x.shape, generator=g)}


@torch.no_grad()
def reconstructions(checkpoint: str, x: torch.Tensor, batch: int) -> torch.Tensor:
    model, _ = vqvae.load_checkpoint(checkpoint)
    model.eval()
    return torch.cat([model.reconstruct(x[i:i + batch]).float() for i in range(0, len(x), batch)])


def score(name: str, fid_net, real, lpips_net, x, x_hat, batch: int):
    print(f"{name}:")
    if fid_net is not None:
        value, seconds = timed(perceptual.rfid, fid_net, real, x_hat, batch)
        print(f"  rFID {value:.2f} over {len(x_hat)} images ({seconds:.1f} s)", flush=True)
    if lpips_net is not None:
        d, seconds = timed(lambda: torch.cat([perceptual.lpips_per_image(lpips_net, x[i:i + batch], x_hat[i:i + batch])
                                              for i in range(0, len(x), batch)]))
        print(f"  LPIPS {d.mean():.4f} ({seconds:.1f} s)", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", help="a folder holding cifar-10-batches-py")
    parser.add_argument("--dataset", default="cifar10", choices=["cifar10", "cifar10-sample"])
    parser.add_argument("--checkpoint", help="a run's checkpoint: score its reconstructions of the test split")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--fresh_stats", action="store_true", help="compute the real stats in a temporary folder")
    parser.add_argument("--no_train_ref", action="store_true", help="skip the FID of the train split (slow on CPU)")
    args = parser.parse_args(argv)
    if args.dataset == "cifar10" and not args.data_dir:
        print("error: --data_dir is needed for --dataset cifar10 (or use --dataset cifar10-sample)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    try:
        train, test = vqvae.load_cifar10(vqvae.Config(dataset=args.dataset, data_dir=args.data_dir or "data"))
    except vqvae.UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    fid_net, fid_line = perceptual.load_fid_inception()
    lpips_net, lpips_line = perceptual.load_lpips()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"{len(test)} test, {len(train)} train images\n{fid_line}\n{lpips_line}")
    x = test.float() / 127.5 - 1
    real = None
    if fid_net is not None:
        with tempfile.TemporaryDirectory() as tmp:
            real, seconds = timed(perceptual.real_stats, fid_net, test, args.dataset, "test", args.batch,
                                  folder=Path(tmp) if args.fresh_stats else None)
        print(f"real stats of the {len(test)} test images: {seconds:.1f} s", flush=True)
        if not args.no_train_ref:
            value, seconds = timed(perceptual.rfid, fid_net, real, train, args.batch)
            print(f"FID of the {len(train)} train images against them: {value:.2f} ({seconds:.1f} s)", flush=True)
    if args.checkpoint:
        score(f"reconstructions of {args.checkpoint}", fid_net, real, lpips_net, x,
              reconstructions(args.checkpoint, x, args.batch), args.batch)
    for name, x_hat in degradations(x).items():
        score(name, fid_net, real, lpips_net, x, x_hat, args.batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
