"""Quantizer properties, the BA math two ways, EMA by hand, metrics and the R-D solver."""
import math

import pytest
import torch

import runs
import vqvae
from vqvae import Config

QUANTIZERS = ["vq_ema", "ba_vq"]


def make_q(kind, K=16, D=8, **overrides):
    cfg = Config(quantizer=kind, codebook_size=K, kmeans_iters=3, **overrides)
    return vqvae.make_quantizer(cfg, D)


def latents(B=4, D=8, H=3, W=3, seed=0):
    return torch.randn(B, D, H, W, generator=torch.Generator().manual_seed(seed))


# -- k-means initialisation (the contract's properties, for every registered quantizer: tests/test_contract.py) --

@pytest.mark.parametrize("kind", QUANTIZERS)
def test_kmeans_init_uses_first_training_batch_only(kind):
    torch.manual_seed(0)
    q = make_q(kind).eval()
    before = q.codebook.detach().clone()
    q(latents())  # evaluation data must never initialise the codebook
    assert not bool(q.initialized) and torch.equal(before, q.codebook.detach())
    q.train()(latents(seed=3))
    assert bool(q.initialized) and not torch.equal(before, q.codebook.detach())


@pytest.mark.parametrize("kind", QUANTIZERS)
def test_loaded_state_decides_whether_kmeans_runs(kind):
    """The quantizer keeps a host copy of its `initialized` flag; loading a state must replace it."""
    torch.manual_seed(0)
    done = make_q(kind, dead_code_threshold=0.0).train()  # no restarts: only k-means could move codes far
    done(latents(seed=3))
    fresh = make_q(kind, dead_code_threshold=0.0).train()
    assert fresh.needs_init() and not done.needs_init()
    fresh.load_state_dict(done.state_dict())
    before = fresh.codebook.detach().clone()
    fresh(latents(seed=4))
    assert not fresh.needs_init()
    if kind == "vq_ema":  # no k-means on the new batch: the codebook moved by one EMA step only
        assert torch.allclose(before, fresh.codebook, atol=0.05)
    done.load_state_dict(make_q(kind).state_dict())
    assert done.needs_init()


# -- VQ-EMA ---------------------------------------------------------------------------------------------------------

def test_vq_ema_update_matches_hand_computation():
    K, D, decay, eps = 4, 3, 0.9, 1e-5
    q = vqvae.make_quantizer(Config(codebook_size=K, decay=decay, epsilon=eps, kmeans_init=False), D).train()
    C0 = torch.tensor([[0., 0, 0], [1, 1, 1], [5, 5, 5], [-3, 0, 2]])
    q.codebook.copy_(C0)
    q.ema_count.copy_(torch.tensor([1., 2, 3, 4]))
    q.ema_sum.copy_(C0 * 2)
    e = torch.tensor([[0.1, 0, 0], [0.9, 1, 1.2], [1.1, 0.8, 1], [-2.5, 0.2, 2.1]])
    q(e.reshape(4, 1, 1, D).permute(0, 3, 1, 2))
    # by hand: assignments 0, 1, 1, 3; code 2 unused
    counts = torch.tensor([1., 2, 0, 1])
    sums = torch.stack([e[0], e[1] + e[2], torch.zeros(3), e[3]])
    n_ema = decay * torch.tensor([1., 2, 3, 4]) + (1 - decay) * counts
    s_ema = decay * C0 * 2 + (1 - decay) * sums
    n = n_ema.sum()
    smoothed = (n_ema + eps) / (n + K * eps) * n
    torch.testing.assert_close(q.ema_count, n_ema)
    torch.testing.assert_close(q.codebook, s_ema / smoothed[:, None])


def test_vq_ema_forward_is_nearest_code_and_straight_through():
    q = make_q("vq_ema", kmeans_init=False).eval()
    z = latents().requires_grad_()
    z_q, _, m = q(z)
    e = z.detach().permute(0, 2, 3, 1).reshape(-1, 8)
    expected = torch.cdist(e, q.codebook).argmin(1)
    assert torch.equal(m["code_indices"].reshape(-1), expected)
    z_q.sum().backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))  # straight-through: identity gradient


def test_nearest_code_chunked_equals_direct():
    g = torch.Generator().manual_seed(0)
    e, C = torch.randn(1000, 16, generator=g), torch.randn(300, 16, generator=g)
    assert torch.equal(vqvae.nearest_code(e, C, chunk=7), torch.cdist(e, C).argmin(1))


def test_dead_code_restart_revives_code_with_consistent_buffers():
    torch.manual_seed(0)
    q = make_q("vq_ema", K=8, dead_code_threshold=0.5).train()
    q(latents(seed=0))
    q.ema_count[3] = 0.0  # force code 3 dead
    q.codebook[3] = 1e6  # so far away that no vector picks it
    _, _, m = q(latents(seed=1))
    assert m["restarts"] >= 1
    assert q.codebook[3].abs().max() < 100  # re-seeded from an encoder vector
    assert q.ema_count[3] >= 0.5
    smoothed = q._smoothed(q.ema_count)
    torch.testing.assert_close(q.ema_sum / smoothed[:, None], q.codebook)


# -- Blahut-Arimoto ---------------------------------------------------------------------------------------------------

def ba_reference_p(e, C, beta, iters):
    """p(k|e) straight from the formula, in float64 with plain exp/normalise."""
    e, C = e.double(), C.double()
    d = ((e[:, None, :] - C[None, :, :]) ** 2).sum(-1)
    Q = torch.full((len(C),), 1.0 / len(C), dtype=torch.float64)
    for _ in range(iters):
        w = Q * torch.exp(-beta * d)
        p = w / w.sum(1, keepdim=True)
        Q = p.mean(0)
    return p, Q


@pytest.mark.parametrize("iters", [1, 2, 5])
def test_ba_assignments_equal_direct_formula(iters):
    g = torch.Generator().manual_seed(iters)
    e, C = torch.randn(50, 4, generator=g), torch.randn(10, 4, generator=g)
    beta = 0.7
    p, Q = ba_reference_p(e, C, beta, iters)
    z, log_Q, idx, counts = vqvae.ba_assign(e, C, torch.full((10,), -math.log(10)), beta, iters, chunk=16)[:4]
    torch.testing.assert_close(z.double(), p @ C.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(log_Q.exp().double(), Q, rtol=1e-5, atol=1e-6)
    assert torch.equal(idx, p.argmax(1))
    torch.testing.assert_close(counts.double(), Q * 50, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("iters", [1, 2, 3])
@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ba_chunked_equals_direct_values_and_gradients(iters, cache, dtype):
    g = torch.Generator().manual_seed(10 + iters)
    e0, C0 = torch.randn(300, 6, generator=g, dtype=dtype), torch.randn(40, 6, generator=g, dtype=dtype)
    log_Q0 = torch.log_softmax(torch.randn(40, generator=g, dtype=dtype), 0)
    w_z, w_q = torch.randn(300, 6, generator=g, dtype=dtype), torch.randn(40, generator=g, dtype=dtype)

    def run(fn):
        e, C = e0.clone().requires_grad_(), C0.clone().requires_grad_()
        z, log_Q, idx = fn(e, C)[:3]
        ((z * w_z).sum() + (log_Q * w_q).sum() + vqvae.entropy_from_log(log_Q)).backward()
        return z, log_Q, idx, e.grad, C.grad

    chunked = run(lambda e, C: vqvae.ba_assign(e, C, log_Q0, 0.8, iters, chunk=64,
                                               memory=1 << 30 if cache else 0))
    direct = run(lambda e, C: vqvae.ba_assign_direct(e, C, log_Q0, 0.8, iters))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for name, a, b in zip(["z", "log_Q", "idx", "grad_e", "grad_C"], chunked, direct):
        if a.dtype == torch.long:
            assert torch.equal(a, b)
        else:  # relative error of the whole tensor: float32 rounding differs elementwise
            assert ((a - b).norm() / b.norm()).item() <= tol, name


def test_ba_every_loss_term_changes_gradients():
    """In the seeds' mode, commitment, codebook and entropy terms each carry gradient (the seed detached them)."""
    names = ["commitment_loss", "codebook_loss", "entropy_loss"]

    def grads(drop):
        torch.manual_seed(0)
        q = make_q("ba_seed", codebook_update="grad", beta_start=0.5).train()
        z = latents().requires_grad_()
        z_q, losses, _ = q(z)
        total = (z_q * torch.linspace(-1, 1, z_q.numel()).reshape(z_q.shape)).sum()
        total = total + sum(v for k, v in losses.items() if k != drop)
        total.backward()
        return torch.cat([z.grad.reshape(-1), q.codebook.grad.reshape(-1)])

    full = grads(None)
    for name in names:
        assert not torch.allclose(grads(name), full, rtol=1e-4, atol=1e-7), f"{name} carries no gradient"


def test_ba_codebook_ema_mode_and_running_marginal_only_in_training():
    torch.manual_seed(0)
    q = make_q("ba_vq", marginal="running").train()
    q(latents(seed=0))
    z = latents(seed=3).requires_grad_()
    z_q, losses, _ = q(z)  # a second step: backward must not see the in-place update of the running marginal
    (z_q.square().sum() + sum(losses.values())).backward()
    assert torch.isfinite(z.grad).all()
    after_train = q.log_Q_running.clone()
    assert not torch.allclose(after_train, torch.full_like(after_train, -math.log(16)))
    codebook = q.codebook.clone()
    q.eval()
    q(latents(seed=1))
    assert torch.equal(q.log_Q_running, after_train) and torch.equal(q.codebook, codebook)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_ba_finite_at_huge_beta(dtype):
    torch.manual_seed(0)
    q = make_q("ba_vq", codebook_update="grad").train()
    q.set_beta(1e4)
    z = (latents() * 3).requires_grad_()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        z_q, losses, _ = q(z)
        total = z_q.float().square().sum() + sum(losses.values())
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(z.grad).all() and torch.isfinite(q.codebook.grad).all()


@pytest.mark.parametrize("cache", [True, False])
def test_ba_gradient_exact_where_q_underflows_in_float32(cache):
    """Codes ~14 units from every latent (8 per coordinate) get Q ~ e^-200: 0 in float32, not in float64. Their
    log Q still carries gradient (a loss weighting log Q directly), which the backward forms in log space; float32
    chunked must match the float64 direct formula."""
    g = torch.Generator().manual_seed(5)
    e0 = torch.randn(90, 3, generator=g, dtype=torch.float64)
    C0 = torch.cat([torch.randn(8, 3, generator=g, dtype=torch.float64),
                    8.0 + torch.randn(4, 3, generator=g, dtype=torch.float64)])
    log_Q0 = torch.full((12,), -math.log(12), dtype=torch.float64)
    w_q = torch.randn(12, generator=g, dtype=torch.float64)

    def grads(fn, dtype):
        e, C = e0.to(dtype).clone().requires_grad_(), C0.to(dtype).clone().requires_grad_()
        log_Q, H_p = fn(e, C, log_Q0.to(dtype))
        ((log_Q * w_q.to(dtype)).sum() + 0.5 * H_p).backward()
        return log_Q.detach().double(), e.grad.double(), C.grad.double()

    def chunked(e, C, lq):
        out = vqvae.ba_assign(e, C, lq, 1.0, 2, chunk=32, memory=1 << 30 if cache else 0)
        return out[1], out[5]

    def direct(e, C, lq):
        out = vqvae.ba_assign_direct(e, C, lq, 1.0, 2)
        return out.log_Q, out.H_p

    got, want = grads(chunked, torch.float32), grads(direct, torch.float64)
    assert want[0][8:].max() < -100  # the far codes' Q is below float32's range ...
    for a, b in zip(got, want):  # ... and their log Q and gradients are still right
        assert ((a - b).norm() / b.norm()).item() <= 1e-4


def test_beta_schedule_endpoints_and_midpoint():
    q = make_q("ba_vq", beta_start=0.5, beta_end=3.0)

    def beta(step, total):
        q.schedule(vqvae.schedule_progress(step, (0, 0.0), total))
        return q.beta.item()
    assert beta(0, 100) == pytest.approx(0.5)
    assert beta(99, 100) == pytest.approx(3.0)
    assert beta(33, 67) == pytest.approx(1.75)  # cosine midpoint is the mean


# -- rotation trick -------------------------------------------------------------------------------------------------

def test_rotation_trick_matches_explicit_matrix():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(5, 6, generator=g, dtype=torch.float64).requires_grad_()
    q = torch.randn(5, 6, generator=g, dtype=torch.float64)
    grad_out = torch.randn(5, 6, generator=g, dtype=torch.float64)
    out = vqvae.rotate_to(e, q)
    torch.testing.assert_close(out, q)  # forward value is the code
    out.backward(grad_out)
    for n in range(5):
        u, v = e[n].detach() / e[n].detach().norm(), q[n] / q[n].norm()
        r = (u + v) / (u + v).norm()
        R = torch.eye(6, dtype=torch.float64) - 2 * torch.outer(r, r) + 2 * torch.outer(v, u)
        lam = q[n].norm() / e[n].detach().norm()
        torch.testing.assert_close(R @ e[n].detach() * lam, q[n])  # R maps e onto q's direction
        torch.testing.assert_close(e.grad[n], lam * R.t() @ grad_out[n])


# -- metrics ----------------------------------------------------------------------------------------------------------

def test_psnr_of_known_mse():
    x = torch.zeros(2, 3, 4, 4)
    x_hat = x + 0.2  # MSE 0.04 on [-1, 1] = 0.01 on [0, 1] -> 20 dB
    assert vqvae.psnr(x, x_hat) == pytest.approx(20.0, abs=1e-4)
    # the seed's convention (peak 1 on [-1, 1]) reads 6.02 dB lower
    assert vqvae.psnr(x, x_hat, data_range=1.0) == pytest.approx(20.0 - 20 * math.log10(2), abs=1e-4)


def test_perplexity_usage_dead_codes():
    uniform = vqvae.codebook_stats(torch.full((8,), 5))
    assert float(uniform["perplexity"]) == pytest.approx(8.0) and float(uniform["usage_rate"]) == 1.0
    one_hot = vqvae.codebook_stats(torch.tensor([0, 0, 7, 0]))
    assert float(one_hot["perplexity"]) == pytest.approx(1.0)
    assert float(one_hot["usage_rate"]) == 0.25 and int(one_hot["dead_codes"]) == 3
    idx = torch.tensor([0, 1, 1, 3])
    stats = vqvae.codebook_stats(vqvae.code_counts(idx, 4))
    p = torch.tensor([0.25, 0.5, 0.25])
    assert float(stats["perplexity"]) == pytest.approx(math.exp(-(p * p.log()).sum().item()))


# -- rate-distortion ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0, 3.0, 5.0])
def test_blahut_arimoto_binary_source_hamming(beta):
    x = torch.tensor([[0.0], [1.0]])
    hamming = lambda a, b: (a[:, None, 0] != b[None, :, 0]).double()  # noqa: E731
    rate, D = runs.blahut_arimoto_rd(x, x.clone(), beta, distortion=hamming)
    h_b = -(D * math.log2(D) + (1 - D) * math.log2(1 - D))
    assert 0 < D < 0.5
    assert rate == pytest.approx(1 - h_b, abs=1e-3)


def test_scatter_sum_equals_index_add_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    e, idx = torch.randn(5000, 7, generator=g), torch.randint(40, (5000,), generator=g)
    idx[idx == 3] = 4  # an empty code
    sums = vqvae.scatter_sum(idx, e, 40)
    torch.testing.assert_close(sums, torch.zeros(40, 7).index_add_(0, idx, e), rtol=1e-5, atol=1e-5)
    assert sums[3].abs().max() == 0
    assert all(torch.equal(sums, vqvae.scatter_sum(idx, e, 40)) for _ in range(5))
