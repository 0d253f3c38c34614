"""Image-quality metrics: SSIM against scikit-image, per-image PSNR against the pooled formula, and both in the
validation records."""
import math

import numpy as np
import pytest
import torch

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
    ours = vqvae.ssim(x, x_hat)
    a = ((x + 1) / 2).double().numpy()
    b = ((x_hat.clamp(-1, 1) + 1) / 2).double().numpy()
    ref = [skimage_metrics.structural_similarity(a[i], b[i], channel_axis=0, data_range=1.0, gaussian_weights=True,
                                                 sigma=1.5, use_sample_covariance=False) for i in range(len(x))]
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-4)
    assert len(set(np.round(ref, 3))) == len(ref)  # the images really differ, so the comparison is not vacuous


def test_ssim_of_an_image_with_itself_is_one_and_falls_with_noise():
    x, x_hat = _pair()
    np.testing.assert_allclose(vqvae.ssim(x, x).numpy(), 1.0, atol=1e-5)
    s = vqvae.ssim(x, x_hat)
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
    assert result["ssim"] == pytest.approx(vqvae.ssim(x, x_hat).mean().item(), abs=1e-5)
    assert result["psnr_per_image"] == pytest.approx(vqvae.psnr_per_image(x, x_hat).mean().item(), abs=1e-4)
    assert math.isfinite(result["psnr"]) and result["psnr_per_image"] >= result["psnr"] - 1e-6
