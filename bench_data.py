"""Training images/s with the old data path (a torchvision-style Dataset with ToTensor + Normalize, through a
DataLoader) against the new one (`vqvae.Batches`: uint8 images resident on the device, cut and normalised there).

    python bench_data.py --data_dir ../shared/data/cifar10-subset             # prints a Markdown table
    python bench_data.py --data_dir ../shared/data/cifar10-subset --append    # ... and appends it to BENCHMARKS.md

Every variant drives the same `Trainer.train_step` (forward, backward, AdamW) of one model, so only the data path
differs. Each timed pass is one epoch of full batches (drop_last), after warm-up steps that also run the k-means
initialisation; the variants are timed in turn, `--repeats` times, and the fastest pass is reported (on a shared
machine the slower passes measure the other load). "data only" times the same epochs with the training step left
out.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

import torch

import vqvae
from bench import append_report, cpu_model


class SeedCIFAR10(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR10 does per item (HWC uint8 -> PIL image -> transform), on images already
    in memory: its own constructor verifies the official archive's md5, which copies and subsets fail."""

    def __init__(self, images: torch.Tensor):
        from torchvision import transforms
        self.data = images.permute(0, 2, 3, 1).numpy()  # (N, 32, 32, 3), as torchvision stores it
        self.transform = transforms.Compose([transforms.ToTensor(),  # the seeds' transform, to [-1, 1]
                                             transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        from PIL import Image
        return self.transform(Image.fromarray(self.data[i])), 0


def old_batches(images: torch.Tensor, batch_size: int, workers: int, device: torch.device):
    loader = torch.utils.data.DataLoader(SeedCIFAR10(images), batch_size=batch_size, shuffle=True, drop_last=True,
                                         num_workers=workers, pin_memory=device.type == "cuda",
                                         persistent_workers=False)
    return lambda: (x.to(device, non_blocking=True) for x, _ in loader)


def new_batches(images: torch.Tensor, batch_size: int, device: torch.device):
    batches = vqvae.Batches(images, batch_size, device, shuffle=True, seed=0)
    epoch = iter(range(1_000_000))
    return lambda: batches.epoch(next(epoch))


def time_epoch(make_epoch, step, device) -> tuple[float, int]:
    """Seconds and images of one epoch; step(x) is the training step, or nothing for "data only"."""
    n = 0
    t0 = time.perf_counter()
    for x in make_epoch():
        step(x)
        n += len(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, n


def run(args) -> list[dict]:
    device = vqvae.pick_device(args.device)
    cfg = vqvae.make_config({"data_dir": args.data_dir, "arch": args.arch, "quantizer": args.quantizer,
                             "codebook_size": args.codebook_size, "batch_size": args.batch_size, "wandb": False,
                             "device": str(device)})
    trainer = vqvae.Trainer(cfg, Path(tempfile.mkdtemp()), device)
    train_u8 = vqvae.load_cifar10(cfg)[0]
    variants = {"old: DataLoader, num_workers=0": old_batches(train_u8, cfg.batch_size, 0, device),
                "old: DataLoader, num_workers=2": old_batches(train_u8, cfg.batch_size, 2, device),
                "new: Batches (uint8 on device)": new_batches(train_u8, cfg.batch_size, device)}
    warm = new_batches(train_u8, cfg.batch_size, device)()
    for _ in range(args.warmup):  # k-means init and allocator warm-up
        trainer.train_step(next(warm))
    times = {(name, mode): [] for name in variants for mode in ("train", "data")}
    for _ in range(args.repeats):
        for name, make_epoch in variants.items():
            times[name, "train"].append(time_epoch(make_epoch, trainer.train_step, device))
            times[name, "data"].append(time_epoch(make_epoch, lambda x: None, device))
    rows = []
    for name in variants:
        row = {"data path": name}
        for mode in ("train", "data"):
            sec = min(t for t, _ in times[name, mode])
            row[mode] = times[name, mode][0][1] / sec
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    base = rows[0]["train"]
    lines = ["| data path | training images/s | vs num_workers=0 | data only, images/s |", "|---|---:|---:|---:|"]
    lines += [f"| {r['data path']} | {r['train']:.0f} | {r['train'] / base:.2f}x | {r['data']:.0f} |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="./data")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arch", default="compact")
    parser.add_argument("--quantizer", default="vq_ema")
    parser.add_argument("--codebook_size", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3, help="training steps before timing")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per variant (fastest reported)")
    parser.add_argument("--append", action="store_true", help="append the table to BENCHMARKS.md")
    args = parser.parse_args(argv)
    rows = run(args)
    text = table(rows)
    print(text)
    if args.append:
        cmd = "python bench_data.py " + " ".join(sys.argv[1:])
        n_threads = torch.get_num_threads()
        section = (f"\n## Data path: DataLoader vs uint8 batches on the device ({datetime.date.today()})\n\n"
                   f"{cpu_model()}, {n_threads} torch threads, torch {torch.__version__}, device {args.device}. "
                   f"`{args.arch}` arch, `{args.quantizer}` K={args.codebook_size}, batch {args.batch_size}, "
                   f"one epoch of full batches per pass, fastest of {args.repeats} passes.\n"
                   f"Command: `{cmd}`\n\n{text}\n")
        append_report(Path(__file__).resolve().parent / "BENCHMARKS.md", section.lstrip("\n"))


if __name__ == "__main__":
    main()
