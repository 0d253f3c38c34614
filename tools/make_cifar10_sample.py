"""Build assets/cifar10_sample.npz: a small real CIFAR-10 sample for offline runs and tests.

    python tools/make_cifar10_sample.py --src ../shared/data/cifar10-subset

Takes the first images of each training batch (128 each, 640 in all) and the first 160 test images.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vqvae import SAMPLE_PATH, find_batches_dir, read_cifar_pickles  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="folder holding cifar-10-batches-py")
    parser.add_argument("--per_batch", type=int, default=128)
    parser.add_argument("--test", type=int, default=160)
    args = parser.parse_args()
    folder = find_batches_dir(Path(args.src))
    train, test = read_cifar_pickles(folder)
    per_file = len(train) // 5
    train = np.concatenate([train[i * per_file:i * per_file + args.per_batch] for i in range(5)])
    SAMPLE_PATH.parent.mkdir(exist_ok=True)
    np.savez_compressed(SAMPLE_PATH, train=train, test=test[:args.test])
    print(f"{SAMPLE_PATH}: {len(train)} train, {args.test} test, {SAMPLE_PATH.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
