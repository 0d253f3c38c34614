"""The baselines of baselines.py (SimVQ, FSQ, Wasserstein VQ, CVQ): contract properties, each against its official
code's formulas written independently here, their optimizer group, older checkpoints, and real training runs that
resume bit-exactly. (Two ranks against one process: tests/test_ddp.py, which runs wasserstein_vq and cvq too.)"""
import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import baselines
import vqvae
from helpers import as_if_killed_after_epoch_1
from vqvae import Config

NEW = ["simvq", "fsq", "wasserstein_vq", "cvq"]
LOSSES = {"simvq": {"commitment_loss", "codebook_loss"}, "fsq": set(),
          "wasserstein_vq": {"commitment_loss", "codebook_loss", "wasserstein_loss"},
          "cvq": {"commitment_loss", "codebook_loss"}}


def make_q(kind, K=16, D=8, **overrides):
    cfg = Config(quantizer=kind, codebook_size=K, kmeans_iters=3, **overrides)
    return vqvae.make_quantizer(cfg, D)


def latents(B=4, D=8, H=3, W=3, seed=0, scale=1.0):
    return scale * torch.randn(B, D, H, W, generator=torch.Generator().manual_seed(seed))


def as_bdhw(codes):
    return codes.permute(0, 3, 1, 2)  # (B, H, W, D) -> (B, D, H, W)


# (the contract's properties, for every registered quantizer: tests/test_contract.py)


def assert_vq_terms(q, z, commitment, codebook):
    """commitment_loss = commitment ||e - sg(z_q)||^2 moves the encoder output only, codebook_loss =
    codebook ||z_q - sg(e)||^2 the quantizer's parameters only: each term's value and gradient to z, from one
    backward of that term alone (means over the N x D entries)."""
    expected = {"commitment_loss": commitment, "codebook_loss": codebook}
    for term, weight in expected.items():
        q.zero_grad(set_to_none=True)
        z = z.detach().clone().requires_grad_()
        z_q, losses, _ = q(z)
        diff = z.detach() - z_q.detach()  # e - z_q, (B, D, H, W)
        assert losses[term].item() == pytest.approx(weight * diff.square().mean().item(), rel=1e-5)
        losses[term].backward()
        moved = [p for p in q.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
        if term == "commitment_loss":
            torch.testing.assert_close(z.grad, weight * 2 * diff / diff.numel())
            assert moved == []
        else:
            assert z.grad is None or not z.grad.any()
            assert moved


# -- SimVQ ----------------------------------------------------------------------------------------------------------

def test_simvq_codes_are_frozen_basis_under_a_learned_affine_map():
    torch.manual_seed(0)
    q = make_q("simvq")
    assert "basis" in dict(q.named_buffers()) and [n for n, _ in q.named_parameters()] == ["linear.weight",
                                                                                           "linear.bias"]
    torch.testing.assert_close(q.codebook, q.basis @ q.linear.weight.t() + q.linear.bias)  # C W + b, as theirs
    basis = q.basis.clone()
    opt = torch.optim.SGD(q.parameters(), lr=0.1)
    z = latents()
    z_q, losses, metrics = q.train()(z)
    # the decoder's value is the nearest row of C W + b; only codebook_loss trains W and b
    C = q.codebook.detach()
    expected = ((z.permute(0, 2, 3, 1).reshape(-1, 8)[:, None] - C) ** 2).sum(-1).argmin(1)
    assert torch.equal(metrics["code_indices"].reshape(-1), expected)
    losses["codebook_loss"].backward()
    assert q.linear.weight.grad.abs().sum() > 0 and q.linear.bias.grad.abs().sum() > 0
    opt.step()
    assert torch.equal(q.basis, basis) and not torch.allclose(q.codebook, C)


def test_simvq_basis_scale_and_loss_weights_follow_the_official_code():
    """C ~ N(0, 1/D) (nn.init.normal_(std=e_dim**-0.5)); legacy: false puts beta 0.25 on the commitment term."""
    torch.manual_seed(0)
    q = make_q("simvq", K=256, D=16)
    assert abs(q.basis.std().item() * math.sqrt(16) - 1) < 0.1 and abs(q.basis.mean().item()) < 0.02
    assert_vq_terms(make_q("simvq").train(), latents(), commitment=0.25, codebook=1.0)


def test_simvq_checkpoint_from_before_the_bias_loads_as_a_zero_bias():
    torch.manual_seed(0)
    q = make_q("simvq")
    old = {k: v for k, v in q.state_dict().items() if k != "linear.bias"}
    fresh = make_q("simvq")
    fresh.load_state_dict(old)  # strict: the hook supplies the bias
    assert torch.equal(fresh.linear.bias, torch.zeros(8))
    torch.testing.assert_close(fresh.codebook, q.basis @ q.linear.weight.t())


# -- FSQ ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("K, levels", [(256, [8, 6, 5]), (512, [8, 8, 8]), (1024, [8, 5, 5, 5]),
                                       (4096, [7, 5, 5, 5, 5]), (16384, [8, 8, 8, 6, 5]),
                                       (65536, [8, 8, 8, 5, 5, 5]), (300, [8, 6, 5]), (2048, [8, 5, 5, 5]),
                                       (16, [4, 4]), (32, [6, 5]), (128, [5, 5, 5]), (2, [2]), (2 ** 18, [8] * 6)])
def test_fsq_automatic_levels(K, levels):
    assert baselines.fsq_levels("", K) == levels


def test_fsq_levels_given_replace_codebook_size_and_are_validated():
    q = make_q("fsq", K=512, fsq_levels="3,4,5")
    assert q.levels == [3, 4, 5] and q.K == 60 and q.report() == {"codebook_size_used": 60.0}
    assert make_q("fsq", K=1024).K == 1000  # automatic: [8, 5, 5, 5]
    for bad in ("8,x", "8,1", "8,,5", "0"):
        with pytest.raises(vqvae.UserError, match="fsq_levels"):
            Config(quantizer="fsq", fsq_levels=bad)


def test_fsq_grid_every_code_reachable_and_indices_mixed_radix():
    torch.manual_seed(0)
    q = make_q("fsq", D=4, fsq_levels="3,4,2")
    with torch.no_grad():  # h = the first three channels of e, spread over tanh's range: every grid point occurs
        q.project_in.weight.copy_(torch.eye(3, 4))
        q.project_in.bias.zero_()
    z = 8 * torch.rand(64, 4, 8, 8, generator=torch.Generator().manual_seed(0)) - 4
    z_q, _, metrics = q.eval()(z)
    idx = metrics["code_indices"].reshape(-1)
    assert torch.bincount(idx, minlength=q.K).min() > 0 and idx.max() < q.K == 24
    # the levels of the official bound, rounded, give the forward pass's index in mixed radix
    e = z.permute(0, 2, 3, 1).reshape(-1, 4)
    level = torch.from_numpy(np.round(official_fsq_bound(e[:, :3].double().numpy(), [3, 4, 2])))
    L = torch.tensor([3, 4, 2])
    assert (level >= -(L // 2)).all() and (level <= (L - 1) // 2).all()
    digits = (level + L // 2).long()
    assert torch.equal(idx, digits[:, 0] + 3 * digits[:, 1] + 12 * digits[:, 2])
    # and codes() inverts it: distinct grid points for distinct indices
    all_codes = q.codes(torch.arange(q.K))
    assert len(torch.unique(all_codes, dim=0)) == q.K


def official_fsq_bound(h, levels, eps=1e-3):
    """FSQ.bound of google-research/google-research fsq/fsq.ipynb, in numpy float64."""
    L = np.asarray(levels, dtype=np.float64)
    half_l = (L - 1) * (1 - eps) / 2
    offset = np.where(L % 2 == 1, 0.0, 0.5)
    shift = np.tan(offset / half_l)
    return np.tanh(h + shift) * half_l - offset


def test_fsq_bound_is_the_official_formula():
    levels = [8, 6, 5, 4, 2]
    q = make_q("fsq", fsq_levels=",".join(map(str, levels)))
    h = torch.cat([torch.zeros(1, 5), torch.linspace(-3, 3, 61)[:, None].expand(-1, 5)])
    expected = torch.from_numpy(official_fsq_bound(h.double().numpy(), levels)).float()
    torch.testing.assert_close(q.bound(h), expected, rtol=0, atol=1e-6)  # atanh's shift: 1.4e-5 off at L = 8
    assert not q.bound(h[:1]).round().any()  # h = 0 rounds to level 0 in every channel, L = 2's included


# -- Wasserstein VQ ---------------------------------------------------------------------------------------------------

def official_w2(features, codes):
    """Their calc_wasserstein_loss in numpy float64, with scipy's matrix square roots in place of their eigh route:
    both fits scaled by the features' largest per-dimension std, unbiased covariances, W2 not squared."""
    sqrtm = pytest.importorskip("scipy.linalg").sqrtm
    z, c = np.asarray(features, dtype=np.float64), np.asarray(codes, dtype=np.float64)
    s = z.std(0, ddof=1).max() + 1e-8
    z, c = z / s, c / s
    S_z, S_c = np.cov(z, rowvar=False), np.cov(c, rowvar=False)
    R = sqrtm(S_z).real
    cross = sqrtm(R @ S_c @ R).real.trace()
    return math.sqrt(((z.mean(0) - c.mean(0)) ** 2).sum() + max(np.trace(S_z + S_c) - 2 * cross, 0.0))


def spread_rows(n, D, seed, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(D, D, generator=g, dtype=torch.float64)
    return scale * torch.randn(n, D, generator=g, dtype=torch.float64) @ A + shift


def test_w2_equals_the_official_formula_by_scipy_sqrtm():
    features, codes = spread_rows(500, 6, 0, scale=3.0), spread_rows(40, 6, 1, shift=0.5)
    expected = official_w2(features, codes)
    assert baselines.gaussian_w2(features, codes).item() == pytest.approx(expected, rel=1e-6)
    # the scale s: multiplying features and codes together leaves W unchanged (it is measured in units of s)
    assert baselines.gaussian_w2(7 * features, 7 * codes).item() == pytest.approx(expected, rel=1e-6)
    same = baselines.gaussian_w2(features, features).item()
    assert same < 1e-3 * expected  # identical fits: only the 1e-8 / 1e-10 regularisers remain


def test_w2_gradient_reaches_the_codes_only_matches_finite_differences_and_is_finite_when_singular():
    features = spread_rows(300, 5, 2)
    codes = spread_rows(12, 5, 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda c: baselines.gaussian_w2(features, c), (codes,))
    features.requires_grad_()
    few = spread_rows(3, 5, 4).requires_grad_()  # K = 3 < D = 5: the codes' covariance is singular
    baselines.gaussian_w2(features, few).backward()
    assert features.grad is None  # the features' moments are detached: the loss moves the codes only
    assert torch.isfinite(few.grad).all() and few.grad.abs().sum() > 0


def test_wvq_loss_terms_weights_and_init_follow_the_official_code():
    torch.manual_seed(0)
    cfg = Config(quantizer="wasserstein_vq")
    assert (cfg.codebook_weight, cfg.wvq_commitment_weight, cfg.wasserstein_weight) == (1.0, 0.1, 0.5)
    assert (cfg.wvq_codebook_lr, cfg.wvq_queue_size) == (0.02, 65536)
    q = make_q("wasserstein_vq", K=64, wvq_queue_size=200).train()
    assert 0.005 < q.codebook.std().item() < 0.015 and 0.005 < q.queue.std().item() < 0.015  # N(0, 0.01^2) both
    z = latents(B=2)  # 18 rows enqueued over the noise the queue starts with
    queue_before = q.queue.clone()
    _, losses, metrics = q(z)
    e = z.permute(0, 2, 3, 1).reshape(-1, 8)
    torch.testing.assert_close(q.queue[:18], e)  # this batch is in the fit it is scored against
    assert torch.equal(q.queue[18:], queue_before[18:])
    C = q.codebook.detach()
    z_q = C[metrics["code_indices"].reshape(-1)]
    assert losses["wasserstein_loss"].item() == pytest.approx(0.5 * official_w2(q.queue, C), rel=1e-5)
    assert_vq_terms(q, z, commitment=0.1, codebook=1.0)  # beta 0.1 on the encoder's side, alpha 1.0 on the codes'


def test_wvq_codebook_is_its_own_adam_group_clipped_to_norm_one():
    torch.manual_seed(0)
    model = vqvae.VQVAE(Config(quantizer="wasserstein_vq", arch="compact", latent_dim=8, codebook_size=16,
                               wvq_queue_size=1024, wasserstein_weight=50.0))
    opt, clipped = vqvae.make_optimizer(model, model.cfg)
    shared, own = opt.param_groups
    assert own["params"] == [model.quantizer.codebook] and own["lr"] == 0.02 and own["betas"] == (0.9, 0.95)
    assert own["weight_decay"] == 0.0 and "max_grad_norm" not in own
    assert shared["lr"] == model.cfg.lr and shared["weight_decay"] == model.cfg.weight_decay
    assert len(shared["params"]) == len(list(model.parameters())) - 1  # everything else trains with the autoencoder
    assert clipped == [([model.quantizer.codebook], 1.0)]
    assert vqvae.make_optimizer(vqvae.VQVAE(Config(quantizer="vq_ema")), Config())[1] == []  # no groups: as before


def test_wvq_train_step_clips_the_codebook_gradient_only(tmp_path, small_sample):
    # weights that push both gradients' norms above 1, so clipping either one to 1 would show
    cfg = tiny_cfg(tmp_path, "wasserstein_vq", wasserstein_weight=100.0, wvq_commitment_weight=100.0)
    trainer = vqvae.Trainer(cfg, tmp_path / "run", torch.device("cpu"))
    x = next(iter(trainer.train_batches.epoch(0)))
    reference = copy.deepcopy(trainer.model)  # the same step's gradients, unclipped
    _, recon_loss, quant_losses, _ = reference(x)
    (recon_loss + sum(quant_losses.values())).backward()
    out = trainer.train_step(x)
    codebook, ref_codebook = trainer.model.quantizer.codebook, reference.quantizer.codebook
    grads = [p.grad for p in trainer.model.parameters() if p is not codebook]
    ref_grads = [p.grad for p in reference.parameters() if p is not ref_codebook]
    autoencoder_norm = torch.cat([g.double().flatten() for g in ref_grads]).norm().item()
    assert ref_codebook.grad.norm() > 1 and autoencoder_norm > 1
    torch.testing.assert_close(codebook.grad, ref_codebook.grad / ref_codebook.grad.norm())  # clipped to norm 1
    for g, ref in zip(grads, ref_grads):  # the autoencoder's gradient as it was
        torch.testing.assert_close(g, ref)
    total = math.hypot(ref_codebook.grad.double().norm().item(), autoencoder_norm)
    assert out["grad_norm"].item() == pytest.approx(total, rel=1e-5)  # the logged norm is the unclipped total


def test_wvq_queue_is_fifo_and_filled_in_training_only():
    torch.manual_seed(0)
    q = make_q("wasserstein_vq", wvq_queue_size=50)
    batches = [latents(B=2, seed=s) for s in range(4)]  # 18 rows each
    rows = torch.cat([b.permute(0, 2, 3, 1).reshape(-1, 8) for b in batches])
    start = q.queue.clone()
    q.eval()(batches[0])
    assert torch.equal(q.queue, start) and int(q.queue_ptr) == 0
    for b in batches:
        q.train()(b)
    assert int(q.queue_ptr) == 72 % 50
    held = torch.cat([q.queue[22:], q.queue[:22]])  # oldest first: ring order from the write pointer
    torch.testing.assert_close(held, rows[-50:], rtol=0, atol=0)
    assert {"queue", "queue_ptr"} <= set(q.state_dict())  # saved: resume continues the same queue
    big = make_q("wasserstein_vq", wvq_queue_size=10).train()
    big(batches[0])  # more rows than the queue holds: the last ten
    assert torch.equal(big.queue, rows[8:18]) and int(big.queue_ptr) == 0


# -- CVQ ------------------------------------------------------------------------------------------------------------

def cosine_closest(x, C):
    """For each row of x, the row of C with the largest cosine similarity, from the explicit similarity matrix."""
    return (F.normalize(x, dim=1) @ F.normalize(C, dim=1).t()).argmax(1)


@pytest.mark.parametrize("distance", ["cos", "l2"])
def test_cvq_lookup_and_anchor_update_match_the_official_formulas(distance):
    torch.manual_seed(0)
    q = make_q("cvq", K=6, D=3, decay=0.9, cvq_distance=distance).train()
    q.usage.copy_(torch.tensor([0.0, 1e-4, 1e-3, 0.01, 0.2, 0.5]))
    C0, P0 = q.codebook.detach().clone(), q.usage.clone()
    z = latents(B=2, D=3, seed=5)
    _, _, metrics = q(z)
    e = z.permute(0, 2, 3, 1).reshape(-1, 3)
    idx = metrics["code_indices"].reshape(-1)
    if distance == "cos":
        assert torch.equal(idx, cosine_closest(e, C0))
        anchor = e[cosine_closest(C0, e)]  # the output most similar to each code
    else:
        assert torch.equal(idx, torch.cdist(e, C0).argmin(1))
        anchor = e[torch.cdist(C0, e).argmin(1)]  # the output nearest each code
    P = 0.9 * P0 + 0.1 * torch.bincount(idx, minlength=6).float() / len(e)
    a = torch.exp(-10 * 6 * P / 0.1 - 1e-3)
    torch.testing.assert_close(q.usage, P)
    torch.testing.assert_close(q.codebook.detach(), (1 - a[:, None]) * C0 + a[:, None] * anchor)
    assert metrics["anchor_weight"].item() == pytest.approx(a.mean().item())


def test_cvq_defaults_and_init_follow_the_official_code():
    cfg = Config(quantizer="cvq")
    assert (cfg.cvq_distance, cfg.commitment_weight, cfg.codebook_weight, cfg.decay) == ("cos", 0.25, 1.0, 0.99)
    q = make_q("cvq", K=64)
    assert q.codebook.abs().max() <= 1 / 64 and q.codebook.abs().max() > 0.9 / 64  # uniform(-1/K, 1/K)
    assert torch.equal(q.usage, torch.zeros(64)) and q.param_groups() == []
    # the eval code is the raw code of the most similar direction, not the direction itself
    q.eval()
    z = latents(seed=3)
    z_q, _, metrics = q(z)
    torch.testing.assert_close(z_q, as_bdhw(q.codebook.detach()[metrics["code_indices"]]), rtol=0, atol=1e-6)


def test_cvq_anchor_reaches_half_after_about_720_steps_of_disuse():
    """The budget effect LEADERBOARD.md reports: a code in average use (P = 1/K) that falls out of use waits ~720
    steps before a training forward pulls it at least halfway to its anchor."""
    K, d = 512, 0.99
    steps = next(t for t in range(5000) if math.exp(-10 * K * (d ** t / K) / (1 - d) - 1e-3) >= 0.5)
    assert 700 < steps < 740
    z = latents(B=1, D=4, H=2, W=2)  # 4 latents: at most 4 codes in use this step
    e = z.permute(0, 2, 3, 1).reshape(-1, 4)
    for t in (steps - 1, steps):
        torch.manual_seed(0)
        q = make_q("cvq", K=K, D=4, decay=d).train()
        q.usage.fill_(d ** (t - 1) / K)  # unused for t - 1 steps; this forward is the t-th
        C0 = q.codebook.detach().clone()
        _, _, metrics = q(z)
        unused = torch.bincount(metrics["code_indices"].reshape(-1), minlength=K) == 0
        pull = e[cosine_closest(C0, e)] - C0  # (K, D) towards each code's anchor
        a = ((q.codebook.detach() - C0) * pull).sum(1) / pull.square().sum(1)  # c <- c + a (anchor - c)
        assert ((a[unused] >= 0.5).all() if t == steps else (a[unused] < 0.5).all())


def test_cvq_backward_after_in_place_update_gives_the_lookups_gradient():
    torch.manual_seed(0)
    q = make_q("cvq").train()
    C0 = q.codebook.detach().clone()
    z = latents().requires_grad_()
    z_q, losses, metrics = q(z)
    assert not torch.equal(q.codebook.detach(), C0)  # moved in place during the forward
    (z_q.square().sum() + sum(losses.values())).backward()  # and autograd has no complaint
    # the gradient is that of codebook_loss at the codes the lookup used: 2 (c_k - e_n) / (N D) summed over n -> k
    e = z.detach().permute(0, 2, 3, 1).reshape(-1, 8)
    idx = metrics["code_indices"].reshape(-1)
    expected = torch.zeros_like(C0).index_add_(0, idx, 2 * (C0[idx] - e) / e.numel())
    torch.testing.assert_close(q.codebook.grad, expected)


def test_cvq_data_variance_gives_main_py_gradients_times_v():
    """cvq_data_variance v: recon + v L_q is v times main.py's recon / v + L_q, so every gradient is v times theirs
    (a constant factor, which Adam's m / sqrt(s) undoes up to its eps)."""
    v = 0.0637
    assert Config(quantizer="cvq").cvq_data_variance == 1.0  # default: the reconstruction unscaled
    with pytest.raises(vqvae.UserError, match="cvq_data_variance"):
        Config(quantizer="cvq", cvq_data_variance=0.0)
    torch.manual_seed(0)
    settings = dict(quantizer="cvq", arch="compact", latent_dim=8, codebook_size=16)
    ours, theirs = vqvae.VQVAE(Config(**settings, cvq_data_variance=v)), vqvae.VQVAE(Config(**settings))
    theirs.load_state_dict(ours.state_dict())
    x = 2 * torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) - 1
    _, recon_loss, our_losses, _ = ours(x)
    (recon_loss + sum(our_losses.values())).backward()
    _, recon_loss, their_losses, _ = theirs(x)
    (recon_loss / v + sum(their_losses.values())).backward()  # main.py's loss
    for term in ("commitment_loss", "codebook_loss"):
        assert our_losses[term].item() == pytest.approx(v * their_losses[term].item(), rel=1e-5)
    for p, p_theirs in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad, v * p_theirs.grad, rtol=1e-4, atol=1e-9)


def test_older_checkpoints_of_the_baselines_load_and_keep_their_meaning(tmp_path):
    """CVQ saved before cvq_distance existed looked codes up by L2, and before cvq_data_variance did left the
    reconstruction unscaled; the EMA buffers the learned codebooks once had are dropped."""
    torch.manual_seed(0)
    model = vqvae.VQVAE(Config(quantizer="cvq", arch="compact", latent_dim=8, codebook_size=16))
    config = vqvae.config_to_dict(model.cfg)
    del config["cvq_distance"], config["cvq_data_variance"]
    state = {**model.state_dict(), "quantizer.ema_count": torch.ones(16), "quantizer.ema_sum": torch.zeros(16, 8),
             "quantizer.initialized": torch.tensor(True)}
    torch.save({"format": 2, "config": config, "model": state}, tmp_path / "old.pt")
    loaded, _ = vqvae.load_checkpoint(tmp_path / "old.pt")
    assert loaded.cfg.cvq_distance == "l2" and loaded.cfg.cvq_data_variance == 1.0
    assert torch.equal(loaded.quantizer.codebook, model.quantizer.codebook)
    torch.save({"format": 99, "config": config, "model": state}, tmp_path / "new.pt")
    with pytest.raises(vqvae.UserError, match="format 99"):
        vqvae.load_checkpoint(tmp_path / "new.pt")


# -- real runs: train(cfg) end to end, and resume bit-exact ----------------------------------------------------------

def tiny_cfg(tmp_path, quantizer, **overrides):
    return vqvae.make_config({"dataset": "cifar10-sample", "arch": "compact", "latent_dim": 16, "codebook_size": 16,
                              "batch_size": 64, "kmeans_iters": 2, "wandb": False, "quantizer": quantizer,
                              "wvq_queue_size": 6000, "out_dir": str(tmp_path), "name": "run", "epochs": 2,
                              "checkpoint_every": 1, "device": "cpu", **overrides})  # CPU: exact resume


@pytest.fixture
def small_sample(monkeypatch):
    """The bundled sample cut to 256 training and 64 test images: 4 steps an epoch, a run in seconds."""
    load = vqvae.load_cifar10
    monkeypatch.setattr(vqvae, "load_cifar10", lambda cfg: tuple(x[:n] for x, n in zip(load(cfg), (256, 64))))


RUN_OVERRIDES = {"fsq": {"codebook_size": 32}}  # automatic levels [6, 5]: 30 codes, not 32


@pytest.mark.parametrize("kind", NEW)
def test_trains_and_resumes_bit_exactly(tmp_path, small_sample, kind):
    cfg = tiny_cfg(tmp_path, kind, **RUN_OVERRIDES.get(kind, {}))
    straight = vqvae.train(cfg)
    run_dir = tmp_path / "run"
    as_if_killed_after_epoch_1(run_dir)
    resumed = vqvae.train(dataclasses.replace(cfg, resume=True))
    assert resumed == straight  # bit-exact: queue, usage, codebook, optimizer and RNG all in the checkpoint
    assert all(math.isfinite(v) for v in straight.values()) and LOSSES[kind] <= set(straight)
    model, _ = vqvae.load_checkpoint(run_dir / "final_model.pt")
    assert type(model.quantizer) is vqvae.QUANTIZERS[kind]
    assert model.quantizer.__module__ == "baselines"  # registered from outside vqvae.py
    if kind == "fsq":  # validation's usage and perplexity are over the K actually used, which is reported
        K = straight["codebook_size_used"]
        assert K == model.quantizer.K == 30
        assert straight["usage_rate"] == pytest.approx((K - straight["dead_codes"]) / K)
