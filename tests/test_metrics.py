"""Image-quality metrics: SSIM against scikit-image, per-image PSNR against the pooled formula, and both in the
validation records."""
import math

import numpy as np
import pytest
import torch

import perceptual
import vqvae

skimage_metrics = pytest.importorskip("skimage.metrics")


def _pair(seed=0, B=6, noise=0.3):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, 3, 32, 32, generator=g) * 2 - 1
    # a smooth image plus noise of a different strength per image, pushed past [-1, 1] to exercise the clamp
    x_hat = x + noise * torch.linspace(0.2, 1.5, B)[:, None, None, None] * torch.randn(B, 3, 32, 32, generator=g)
    return x, x_hat


def test_ssim_matches_scikit_image():
    x, x_hat = _pair()
    ours = perceptual.ssim(x, x_hat)
    a = ((x + 1) / 2).double().numpy()
    b = ((x_hat.clamp(-1, 1) + 1) / 2).double().numpy()
    ref = [skimage_metrics.structural_similarity(a[i], b[i], channel_axis=0, data_range=1.0, gaussian_weights=True,
                                                 sigma=1.5, use_sample_covariance=False) for i in range(len(x))]
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-4)
    assert len(set(np.round(ref, 3))) == len(ref)  # the images really differ, so the comparison is not vacuous


def test_ssim_of_an_image_with_itself_is_one_and_falls_with_noise():
    x, x_hat = _pair()
    np.testing.assert_allclose(perceptual.ssim(x, x).numpy(), 1.0, atol=1e-5)
    s = perceptual.ssim(x, x_hat)
    assert (s[1:] < s[:-1]).all()  # noise grows along the batch


def test_per_image_psnr_agrees_with_the_pooled_psnr_of_each_image():
    x, x_hat = _pair()
    per_image = vqvae.psnr_per_image(x, x_hat)
    for i in range(len(x)):
        assert per_image[i].item() == pytest.approx(vqvae.psnr(x[i:i + 1], x_hat[i:i + 1]), abs=1e-4)
    # the mean of per-image PSNRs is at least the PSNR of the pooled MSE (Jensen: -log is convex)
    assert per_image.mean().item() >= vqvae.psnr(x, x_hat) - 1e-6
    assert vqvae.psnr_per_image(x, x).max().item() == pytest.approx(100.0)


def test_validation_reports_ssim_and_per_image_psnr_of_the_hard_code_model():
    torch.manual_seed(0)
    cfg = vqvae.Config(arch="compact", codebook_size=16, latent_dim=8, quantizer="vq_ema", wandb=False)
    model = vqvae.VQVAE(cfg)
    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    batches = vqvae.Batches(images, batch_size=8, device="cpu", shuffle=False)
    result = vqvae.validate(model, batches)
    x = torch.cat(list(batches.epoch(0)))
    x_hat = model.eval().reconstruct(x)
    assert result["ssim"] == pytest.approx(perceptual.ssim(x, x_hat).mean().item(), abs=1e-5)
    assert result["psnr_per_image"] == pytest.approx(vqvae.psnr_per_image(x, x_hat).mean().item(), abs=1e-4)
    assert math.isfinite(result["psnr"]) and result["psnr_per_image"] >= result["psnr"] - 1e-6


# -- dimension metrics: numpy's eigenvalues of synthetic latents of known spectrum -----------------------------------

def _np_spectrum(v: np.ndarray) -> np.ndarray:
    """Eigenvalues of the centred covariance (denominator N - 1), descending, by numpy alone."""
    return np.linalg.eigvalsh(np.cov(v, rowvar=False))[::-1]


def _np_dim99(lam: np.ndarray) -> int:
    return int(np.searchsorted(np.cumsum(lam) / lam.sum(), 0.99) + 1)


def _np_water_filling(lam: np.ndarray, bits: float) -> tuple[float, int, float]:
    """Bisection on the rate, as the paper's eval_vqgan_waterfilling.py solves it."""
    lo, hi = 1e-30, 2 * lam.max()
    for _ in range(300):
        theta = np.sqrt(lo * hi)  # geometric bisection: theta spans many decades
        rate = np.maximum(0, 0.5 * np.log2(np.maximum(lam, 1e-300) / theta)).sum()
        lo, hi = (theta, hi) if rate > bits else (lo, theta)
    return theta, int((lam > theta).sum()), float(np.minimum(lam, theta).sum())


def test_a_rank_5_gaussian_in_64_dimensions_has_dimension_5():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.standard_normal((64, 5)))[0]  # 5 orthonormal directions of R^64
    scales = np.array([3.0, 2.0, 1.5, 1.0, 0.5])
    v = (rng.standard_normal((4000, 5)) * scales) @ basis.T + rng.standard_normal(64)  # off-centre
    lam = _np_spectrum(v)
    ours = vqvae.spectrum(vqvae.moment_matrix(torch.from_numpy(v)))
    np.testing.assert_allclose(ours.numpy(), lam, atol=1e-10)
    assert vqvae.effective_dim(ours) == _np_dim99(lam) == 5
    assert vqvae.participation_ratio(ours) == pytest.approx(lam.sum() ** 2 / (lam ** 2).sum(), rel=1e-9)
    assert 2 < vqvae.participation_ratio(ours) < 5  # unequal scales: fewer than 5 "equal" directions
    # 99 % needs fewer directions when the smallest holds under 1 %
    assert vqvae.effective_dim(torch.tensor([100.0, 50.0, 1.0, 0.0])) == 2
    assert vqvae.effective_dim(torch.zeros(8)) == 0 and vqvae.participation_ratio(torch.zeros(8)) == 0
    # one vector repeated (a single code in use): no dimension, not the float64 sums' rounding
    one = vqvae.spectrum(vqvae.moment_matrix(torch.from_numpy(v[:1]).repeat(1000, 1) * 1e3))
    assert (one == 0).all()


@pytest.mark.parametrize("bits", [0.5, 5.0, 14.0])
def test_water_filling_on_equal_eigenvalues_is_the_closed_form(bits):
    D, lam = 64, 0.3
    theta, dim, distortion = vqvae.water_filling(torch.full((D,), lam, dtype=torch.float64), bits)
    assert theta == pytest.approx(lam * 2 ** (-2 * bits / D), rel=1e-12)  # every direction water-filled
    assert dim == D and distortion == pytest.approx(D * theta, rel=1e-12)


@pytest.mark.parametrize("bits", [0.0, 1.0, 9.0, 14.0, 200.0])
def test_water_filling_agrees_with_bisection(bits):
    lam = np.sort(np.random.default_rng(1).lognormal(-3, 2, size=64))[::-1]
    lam[-3:] = 0  # directions without variance never get bits
    theta, dim, distortion = vqvae.water_filling(torch.from_numpy(lam.copy()), bits)
    ref_theta, ref_dim, ref_distortion = _np_water_filling(lam, bits)
    assert theta == pytest.approx(ref_theta, rel=1e-9) and dim == ref_dim
    assert distortion == pytest.approx(ref_distortion, rel=1e-9)
    rate = np.maximum(0, 0.5 * np.log2(np.maximum(lam, 1e-300) / theta)).sum()
    assert rate == pytest.approx(bits, abs=1e-9)
    assert 0 < dim < 61 or bits in (0.0, 200.0)  # the middle rates water-fill some directions, not all


def _direct_latents(model, x):
    """e, z_q (N, D) of every image, the model's parts called here in eval mode, and the code vectors."""
    model.eval()
    with torch.no_grad():
        e = model.encoder(x)
        z_q = model.quantizer(e)[0]
    return [vqvae.Quantizer._flatten(t).double().numpy() for t in (e, z_q)]


@pytest.mark.parametrize("quantizer", ["vq_ema", "fsq"])
def test_validation_dimension_metrics_equal_numpy_on_all_latents(quantizer):
    """Batches of 8 and a ragged last one, summed: the same covariance as numpy's over every latent at once."""
    torch.manual_seed(0)
    cfg = vqvae.Config(arch="compact", codebook_size=64, latent_dim=8, quantizer=quantizer, wandb=False)
    model = vqvae.VQVAE(cfg)
    if quantizer == "fsq":  # an untrained projection leaves every latent on one grid point: spread them
        model.quantizer.project_in.weight.data *= 30
    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    batches = vqvae.Batches(images, batch_size=8, device="cpu", shuffle=False)
    result = vqvae.validate(model, batches)
    assert result["zq_dim99"] > 1 and result["usage_rate"] > 2 / model.quantizer.K
    e, z_q = _direct_latents(model, torch.cat(list(batches.epoch(0))))
    sums = sum(vqvae.moment_matrix(torch.from_numpy(e[i:i + 500])) for i in range(0, len(e), 500))
    np.testing.assert_allclose(vqvae.covariance(sums).numpy(), np.cov(e, rowvar=False), rtol=1e-9, atol=1e-12)
    with torch.no_grad():  # FSQ: the grid, projected
        codes = model.quantizer.codes(torch.arange(model.quantizer.K)).double().numpy()
    for name, v in [("latent", e), ("zq", z_q), ("codebook", codes)]:
        lam = _np_spectrum(v)
        assert result[f"{name}_dim99"] == _np_dim99(lam), name
        assert result[f"{name}_pr"] == pytest.approx(lam.sum() ** 2 / (lam ** 2).sum(), rel=1e-6), name
    theta, dim, distortion = _np_water_filling(_np_spectrum(e), np.log2(model.quantizer.K))
    assert (result["wf_dim"], result["wf_theta"]) == (dim, pytest.approx(theta, rel=1e-6))
    assert result["wf_distortion"] == pytest.approx(distortion, rel=1e-6)
    assert result["quant_distortion"] == pytest.approx(((e - z_q) ** 2).sum(1).mean(), rel=1e-5)


def test_ba_soft_psnr_is_the_decoder_on_its_soft_mixture():
    """BA's diagnostic from its own hook: the decoder on sum_k p(k|e) c_k of the whole batch, clamped, pooled."""
    torch.manual_seed(0)
    model = vqvae.VQVAE(arch="compact", codebook_size=16, latent_dim=8, quantizer="ba_vq", wandb=False).eval()
    q = model.quantizer
    model.decoder[0].weight.data *= 30  # an untrained decoder's output hardly depends on its input: make it
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    x = images.float() / 127.5 - 1
    with torch.no_grad():  # dbar: the mean squared code distance, so that at beta 1 p(k|e) is spread, not one-hot
        q.d_mean.fill_(torch.cdist(q._flatten(model.encoder(x)), q.codebook).square().mean().item())
    result = vqvae.validate(model, vqvae.Batches(images, 16, "cpu", shuffle=False))
    with torch.no_grad():
        e = q._flatten(model.encoder(x))
        log_Q0 = torch.full((16,), -math.log(16))
        beta = q.beta / q.d_mean.clamp_min(1e-30)
        p = torch.softmax(log_Q0 - beta * torch.cdist(e, q.codebook).square(), 1)  # (N, K), one E-step
        x_soft = model.decoder(q._unflatten(p @ q.codebook, model.encoder(x)))
    assert result["soft_psnr"] == pytest.approx(vqvae.psnr(x, x_soft), abs=1e-4)
    assert result["soft_psnr"] != pytest.approx(result["psnr"], abs=0.1)  # not the hard codes' PSNR
