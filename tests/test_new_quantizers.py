"""SimVQ, FSQ, Wasserstein VQ and CVQ: contract properties, their math checked two ways, and real training runs that
resume bit-exactly. (Two ranks against one process: tests/test_ddp.py, which runs wasserstein_vq and cvq too.)"""
import dataclasses
import math

import pytest
import torch

import vqvae
from vqvae import Config

NEW = ["simvq", "fsq", "wasserstein_vq", "cvq"]
CODEBOOK = ["simvq", "wasserstein_vq", "cvq"]  # nearest code in a codebook: straight-through or rotation to e
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


# -- the contract, for every new quantizer ------------------------------------------------------------------------

@pytest.mark.parametrize("kind, estimator", [(k, "ste") for k in NEW] + [(k, "rotation") for k in CODEBOOK])
def test_shapes_indices_losses_and_gradient(kind, estimator):
    torch.manual_seed(0)
    q = make_q(kind, estimator=estimator).train()
    z = latents().requires_grad_()
    z_q, losses, metrics = q(z)
    assert z_q.shape == z.shape
    idx = metrics["code_indices"]
    assert idx.shape == (4, 3, 3) and idx.dtype == torch.long and idx.min() >= 0 and idx.max() < q.K
    assert set(losses) == LOSSES[kind] and all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    (z_q.square().sum() + sum(losses.values(), torch.zeros(()))).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    trained = [p for p in q.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert trained  # the loss reaches what the quantizer learns (W, projections, codebook)


@pytest.mark.parametrize("kind", NEW)
def test_eval_output_is_codes_of_indices(kind):
    torch.manual_seed(0)
    q = make_q(kind)
    q.train()(latents(seed=1))  # initialisation and one update on a training batch
    q.eval()
    z_q, losses, metrics = q(latents(seed=2))
    lookup = as_bdhw(q.codes(metrics["code_indices"]))
    if kind == "fsq":  # rounding is straight-through inside the quantizer: z_q is the grid point itself
        assert torch.equal(z_q, lookup)
    else:  # e + sg(z_q - e) differs from z_q by a rounding error
        torch.testing.assert_close(z_q, lookup, rtol=0, atol=1e-6)
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("kind", NEW)
def test_eval_code_depends_on_the_latent_alone(kind):
    torch.manual_seed(0)
    q = make_q(kind)
    q.train()(latents(seed=1))
    q.eval()
    z = latents(seed=2)
    whole = q(z)[2]["code_indices"]
    alone = torch.cat([q(z[i:i + 1])[2]["code_indices"] for i in range(len(z))])
    assert torch.equal(whole, alone)


@pytest.mark.parametrize("kind", NEW)
def test_eval_changes_no_state(kind):
    torch.manual_seed(0)
    q = make_q(kind)
    q.train()(latents(seed=1))
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q.eval()(latents(seed=2))
    assert all(torch.equal(v, q.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("kind", ["wasserstein_vq", "cvq"])
def test_learned_codebooks_restart_dead_codes_from_encoder_outputs(kind):
    torch.manual_seed(0)
    q = make_q(kind, K=8, kmeans_init=False, dead_code_threshold=0.5, decay=0.1).train()
    q.codebook.data[0] = 100.0  # nobody's code: its EMA count falls from 1 to 0.1 < 0.5 at the first step
    z = latents()
    _, _, metrics = q(z)
    e = z.permute(0, 2, 3, 1).reshape(-1, 8)
    assert metrics["restarts"] >= 1 and q.ema_count[0] == 0.5
    assert ((e - q.codebook.detach()[0]).abs().amax(1) == 0).any()  # now one of the batch's outputs


# -- SimVQ ----------------------------------------------------------------------------------------------------------

def test_simvq_codes_are_frozen_basis_times_learned_map():
    torch.manual_seed(0)
    q = make_q("simvq")
    assert "basis" in dict(q.named_buffers()) and [n for n, _ in q.named_parameters()] == ["linear.weight"]
    torch.testing.assert_close(q.codebook, q.basis @ q.linear.weight.t())
    basis = q.basis.clone()
    opt = torch.optim.SGD(q.parameters(), lr=0.1)
    z = latents()
    z_q, losses, metrics = q.train()(z)
    # the decoder's value is the nearest row of C W; only codebook_loss trains W
    C = q.codebook.detach()
    expected = ((z.permute(0, 2, 3, 1).reshape(-1, 8)[:, None] - C) ** 2).sum(-1).argmin(1)
    assert torch.equal(metrics["code_indices"].reshape(-1), expected)
    losses["codebook_loss"].backward()
    assert q.linear.weight.grad.abs().sum() > 0
    opt.step()
    assert torch.equal(q.basis, basis) and not torch.allclose(q.codebook, C)


# -- FSQ ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("K, levels", [(256, [8, 6, 5]), (512, [8, 8, 8]), (1024, [8, 5, 5, 5]),
                                       (4096, [7, 5, 5, 5, 5]), (16384, [8, 8, 8, 6, 5]),
                                       (65536, [8, 8, 8, 5, 5, 5]), (300, [8, 6, 5]), (2048, [8, 5, 5, 5]),
                                       (16, [4, 4]), (32, [6, 5]), (128, [5, 5, 5]), (2, [2]), (2 ** 18, [8] * 6)])
def test_fsq_automatic_levels(K, levels):
    assert vqvae.fsq_levels("", K) == levels


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
    # the levels the forward pass rounded to, recovered from the projection, give the index in mixed radix
    e = z.permute(0, 2, 3, 1).reshape(-1, 4)
    bounded = torch.tanh(q.project_in(e) + q.bound_shift) * q.bound_half - q.bound_offset
    level = bounded.round()
    L = torch.tensor([3, 4, 2])
    assert (level >= -(L // 2)).all() and (level <= (L - 1) // 2).all()
    digits = (level + L // 2).long()
    assert torch.equal(idx, digits[:, 0] + 3 * digits[:, 1] + 12 * digits[:, 2])
    # and codes() inverts it: distinct grid points for distinct indices
    all_codes = q.codes(torch.arange(q.K))
    assert len(torch.unique(all_codes, dim=0)) == q.K


def test_fsq_bound_maps_zero_to_level_zero():
    """Even L: the levels -(L/2) .. L/2 - 1 are asymmetric; the shift still maps h = 0 to level 0."""
    q = make_q("fsq", fsq_levels="8,5")
    at_zero = torch.tanh(q.bound_shift) * q.bound_half - q.bound_offset
    torch.testing.assert_close(at_zero, torch.tensor([0.0, 0.0]), atol=1e-6, rtol=0)


# -- Wasserstein VQ ---------------------------------------------------------------------------------------------------

def random_spd(D, seed, rank=None):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(D, rank or D, generator=g, dtype=torch.float64)
    return A @ A.t() / (rank or D) + (0 if rank else 0.1) * torch.eye(D, dtype=torch.float64)


def test_w2_of_diagonal_gaussians_is_closed_form():
    g = torch.Generator().manual_seed(0)
    mu_e, mu_c = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    a, b = torch.rand(6, generator=g, dtype=torch.float64) + 0.1, torch.rand(6, generator=g, dtype=torch.float64)
    w2 = vqvae.gaussian_w2_sq(mu_e, torch.diag(a), mu_c, torch.diag(b))
    expected = (mu_e - mu_c).square().sum() + (a.sqrt() - b.sqrt()).square().sum()
    torch.testing.assert_close(w2, expected, rtol=1e-10, atol=1e-12)
    same = vqvae.gaussian_w2_sq(mu_e, torch.diag(a), mu_e, torch.diag(a))
    assert abs(same.item()) < 1e-12


@pytest.mark.parametrize("rank_c", [None, 3])  # a full-rank codebook covariance, and one of K - 1 = 3 < D
def test_w2_equals_scipy_sqrtm(rank_c):
    scipy_linalg = pytest.importorskip("scipy.linalg")
    D = 7
    S_e, S_c = random_spd(D, 1), random_spd(D, 2, rank_c)
    mu_e, mu_c = torch.full((D,), 0.3, dtype=torch.float64), torch.zeros(D, dtype=torch.float64)
    R = scipy_linalg.sqrtm(S_e.numpy())
    cross = scipy_linalg.sqrtm(R @ S_c.numpy() @ R).real
    expected = 0.09 * D + float(torch.trace(S_e + S_c)) - 2 * float(cross.trace())
    assert vqvae.gaussian_w2_sq(mu_e, S_e, mu_c, S_c).item() == pytest.approx(expected, rel=1e-6, abs=1e-8)


def test_w2_gradient_in_the_codebook_moments_matches_finite_differences():
    D = 5
    S_e = random_spd(D, 3)
    mu_e = torch.linspace(-1, 1, D, dtype=torch.float64)
    A = torch.randn(D, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    mu_c = torch.zeros(D, dtype=torch.float64, requires_grad=True)
    # through a factor, so every perturbation keeps S_c symmetric positive definite
    A = A.requires_grad_()
    assert torch.autograd.gradcheck(lambda m, a: vqvae.gaussian_w2_sq(mu_e, S_e, m, a @ a.t() / D + 0.1 * torch.eye(
        D, dtype=torch.float64)), (mu_c, A))


def test_w2_loss_gradient_reaches_the_codebook_only_and_is_finite_for_a_rank_deficient_codebook():
    torch.manual_seed(0)
    q = make_q("wasserstein_vq", K=4, D=8, wasserstein_weight=1.0).train()  # K < D: S_c is singular
    z = latents(B=8).requires_grad_()
    _, losses, _ = q(z)
    losses["wasserstein_loss"].backward()
    assert z.grad is None or z.grad.abs().sum() == 0  # the queue is detached: the features stay free
    assert torch.isfinite(q.codebook.grad).all() and q.codebook.grad.abs().sum() > 0


def test_w2_loss_equals_fit_of_queue_and_codebook():
    torch.manual_seed(0)
    q = make_q("wasserstein_vq", wasserstein_weight=2.0, wvq_queue_size=100).train()
    z = latents(B=4)  # 36 rows: the queue is partly filled
    _, losses, _ = q(z)
    e = z.permute(0, 2, 3, 1).reshape(-1, 8).double()
    C = q.codebook.detach().double()
    mu_e, mu_c = e.mean(0), C.mean(0)
    S_e, S_c = (e - mu_e).t() @ (e - mu_e) / len(e), (C - mu_c).t() @ (C - mu_c) / len(C)
    expected = 2.0 * vqvae.gaussian_w2_sq(mu_e, S_e, mu_c, S_c)
    assert losses["wasserstein_loss"].item() == pytest.approx(expected.item(), rel=1e-4)


def test_wvq_queue_is_fifo_filled_in_training_only():
    torch.manual_seed(0)
    q = make_q("wasserstein_vq", wvq_queue_size=50)
    batches = [latents(B=2, seed=s) for s in range(4)]  # 18 rows each
    rows = torch.cat([b.permute(0, 2, 3, 1).reshape(-1, 8) for b in batches])
    q.eval()(batches[0])
    assert int(q.queue_len) == 0
    for b in batches:
        q.train()(b)
    assert int(q.queue_len) == 50 and int(q.queue_ptr) == 72 % 50
    held = torch.cat([q.queue[22:], q.queue[:22]])  # oldest first: ring order from the write pointer
    torch.testing.assert_close(held, rows[-50:], rtol=0, atol=0)
    assert {"queue", "queue_ptr", "queue_len"} <= set(q.state_dict())  # saved: resume continues the same queue
    big = make_q("wasserstein_vq", wvq_queue_size=10).train()
    big(batches[0])  # more rows than the queue holds: the last ten
    assert torch.equal(big.queue, rows[8:18]) and int(big.queue_ptr) == 0


# -- CVQ ------------------------------------------------------------------------------------------------------------

def test_cvq_anchor_update_matches_hand_computation():
    torch.manual_seed(0)
    q = make_q("cvq", K=6, D=3, kmeans_init=False, decay=0.9, dead_code_threshold=0.0).train()
    q.usage.copy_(torch.tensor([0.0, 1e-4, 1e-3, 0.01, 0.2, 0.5]))
    q.codebook.data[0] = 100.0  # far from every output: code 0 stays unused
    C0, P0 = q.codebook.detach().clone(), q.usage.clone()
    z = latents(B=2, D=3, seed=5)
    _, _, metrics = q(z)
    e = z.permute(0, 2, 3, 1).reshape(-1, 3)
    idx = metrics["code_indices"].reshape(-1)
    P = 0.9 * P0 + 0.1 * torch.bincount(idx, minlength=6).float() / len(e)
    a = torch.exp(-10 * 6 * P / 0.1 - 1e-3)
    anchor = e[((C0[:, None] - e[None]) ** 2).sum(-1).argmin(1)]  # the output nearest each code
    torch.testing.assert_close(q.usage, P)
    torch.testing.assert_close(q.codebook.detach(), (1 - a[:, None]) * C0 + a[:, None] * anchor)
    assert idx.min() > 0 and a[0] > 0.99 and a[-1] < 1e-6  # an unused code jumps onto a feature, used ones stay


def test_cvq_backward_after_in_place_update_gives_the_lookups_gradient():
    torch.manual_seed(0)
    q = make_q("cvq", kmeans_init=False).train()
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


# -- real runs: train(cfg) end to end, and resume bit-exact ----------------------------------------------------------

def tiny_cfg(tmp_path, quantizer, **overrides):
    return vqvae.make_config({"dataset": "cifar10-sample", "arch": "compact", "latent_dim": 16, "codebook_size": 16,
                              "batch_size": 64, "kmeans_iters": 2, "wandb": False, "quantizer": quantizer,
                              "wvq_queue_size": 6000, "out_dir": str(tmp_path), "name": "run", "epochs": 2,
                              "checkpoint_every": 1, **overrides})


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
    # as if killed after epoch 1: its checkpoint becomes last.pt and the final files are gone
    (run_dir / "checkpoint_epoch1.pt").replace(run_dir / "last.pt")
    for name in ("final_metrics.json", "final_model.pt"):
        (run_dir / name).unlink()
    resumed = vqvae.train(dataclasses.replace(cfg, resume=True))
    assert resumed == straight  # bit-exact: queue, usage, codebook, optimizer and RNG all in the checkpoint
    assert all(math.isfinite(v) for v in straight.values()) and LOSSES[kind] <= set(straight)
    model, _ = vqvae.load_checkpoint(run_dir / "final_model.pt")
    assert type(model.quantizer) is vqvae.QUANTIZERS[kind]
    if kind == "fsq":  # validation's usage and perplexity are over the K actually used, which is reported
        K = straight["codebook_size_used"]
        assert K == model.quantizer.K == 30
        assert straight["usage_rate"] == pytest.approx((K - straight["dead_codes"]) / K)
