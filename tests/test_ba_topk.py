"""BA's top-k truncation (ba_topk): exact when it keeps every code, its dropped mass measured, exact beyond a bound."""
import math

import pytest
import torch

import ba_kernels
import plumbing
import vqvae


def problem(seed=0, N=200, K=40, D=5):
    g = torch.Generator().manual_seed(seed)
    e, C = torch.randn(N, D, generator=g, dtype=torch.float64), torch.randn(K, D, generator=g, dtype=torch.float64)
    log_Q0 = torch.log_softmax(torch.randn(K, generator=g, dtype=torch.float64), 0)
    w_z, w_q = torch.randn(N, D, generator=g, dtype=torch.float64), torch.randn(K, generator=g, dtype=torch.float64)
    return e, C, log_Q0, w_z, w_q


def outputs_and_grads(assign, e0, C0, w_z, w_q):
    """Every output of an assignment and the gradients of a loss that reads z, log Q and H_p."""
    e, C = e0.clone().requires_grad_(), C0.clone().requires_grad_()
    z, log_Q, idx, counts, sums, H_p, max_p = assign(e, C)[:7]
    ((z * w_z).sum() + (log_Q * w_q).sum() + vqvae.entropy_from_log(log_Q) - 0.7 * H_p).backward()
    return [z, log_Q, idx, counts, sums, H_p, max_p, e.grad, C.grad]


@pytest.mark.parametrize("beta", [0.3, 2.0])
def test_keeping_every_code_equals_the_exact_assignment(beta):
    e, C, log_Q0, w_z, w_q = problem()
    exact = outputs_and_grads(lambda e, C: vqvae.ba_assign(e, C, log_Q0, beta, 1, 64, want_sums=True), e, C, w_z, w_q)
    topk = outputs_and_grads(lambda e, C: vqvae.ba_assign_topk(e, C, log_Q0, beta, len(C), 64, want_sums=True),
                             e, C, w_z, w_q)
    names = ["z", "log_Q", "idx", "counts", "sums", "H_p", "max_p", "grad_e", "grad_C"]
    for name, a, b in zip(names, exact, topk):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("beta,k", [(0.5, 5), (3.0, 3), (3.0, 10)])
def test_dropped_mass_is_the_exact_mass_outside_the_top_k(beta, k):
    e, C, log_Q0 = problem(1)[:3]
    dropped = vqvae.topk_dropped_mass(e, C, log_Q0, beta, k, 64)
    p = torch.softmax(log_Q0 - beta * torch.cdist(e, C).square(), 1)  # the direct formula
    torch.testing.assert_close(dropped, (1 - p.topk(k, 1).values.sum(1)).mean(), rtol=1e-9, atol=1e-12)
    assert dropped > 0


def test_truncation_error_follows_the_dropped_mass():
    """With sharp assignments (little mass outside the top 4) the truncated outputs and gradients are close."""
    e, C, log_Q0, w_z, w_q = problem(2)
    beta = 8.0
    dropped = vqvae.topk_dropped_mass(e, C, log_Q0, beta, 4, 64)
    assert dropped < 1e-3
    exact = outputs_and_grads(lambda e, C: vqvae.ba_assign(e, C, log_Q0, beta, 1, 64), e, C, w_z, w_q)
    topk = outputs_and_grads(lambda e, C: vqvae.ba_assign_topk(e, C, log_Q0, beta, 4, 64), e, C, w_z, w_q)
    for i in (0, 5, 7):  # z, H_p, grad_e
        assert (exact[i] - topk[i]).norm() <= 50 * dropped.sqrt() * exact[i].norm()
    assert torch.equal(exact[2], topk[2])  # the hard codes


def make_q(**overrides):
    cfg = vqvae.Config(quantizer="ba_vq", codebook_size=32, kmeans_iters=3, dead_code_threshold=0.0, **overrides)
    return vqvae.make_quantizer(cfg, 6)


def test_quantizer_uses_top_k_within_the_bound_and_falls_back_to_exact_beyond_it():
    z = torch.randn(4, 6, 5, 5, generator=torch.Generator().manual_seed(3))
    runs = {}
    for name, overrides in {"exact": {}, "topk": {"ba_topk": 6, "ba_topk_max_drop": 1.0},
                            "fallback": {"ba_topk": 6, "ba_topk_max_drop": 0.0}}.items():
        torch.manual_seed(0)
        q = make_q(beta_start=2.0, **overrides).train()
        q(z)  # k-means initialisation
        leaf = z.clone().requires_grad_()
        z_q, losses, metrics = q(leaf)
        (z_q.square().sum() + sum(losses.values())).backward()
        runs[name] = (z_q, sum(losses.values()), leaf.grad, q.codebook.clone(), metrics)
    assert runs["topk"][4]["topk_exact"] == 0 and runs["fallback"][4]["topk_exact"] == 1
    assert 0 < runs["topk"][4]["topk_dropped"] < 1
    for a, b in zip(runs["exact"][:4], runs["fallback"][:4]):  # beyond the bound: the exact step, bit for bit
        assert torch.equal(a, b)
    assert not torch.equal(runs["exact"][1], runs["topk"][1])  # within it: the truncated one
    q = make_q(ba_topk=6).eval()
    q.codebook.copy_(torch.randn(32, 6))
    metrics = q(z)[2]
    assert 0 <= metrics["topk_dropped"] <= 1  # evaluation reports the exact mass the truncation would drop


class _Event:
    """Stands in for torch.cuda.Event: its copy has finished when the test says so."""
    done = False

    def record(self):
        pass

    def query(self):
        return _Event.done

    def synchronize(self):
        pass


@pytest.fixture
def lagging(monkeypatch):
    """LatestOnHost on the CPU as on one GPU: copies to the host in flight until the test finishes them."""
    monkeypatch.setattr(plumbing.LatestOnHost, "LAGGED_DEVICES", ("cpu",))
    monkeypatch.setattr(plumbing.LatestOnHost, "Event", _Event)
    monkeypatch.setattr(_Event, "done", False)
    return _Event


def test_latest_on_host_returns_the_newest_value_whose_copy_has_finished(lagging):
    seen = plumbing.LatestOnHost()
    values = [seen(torch.tensor(v)) for v in (1.0, 2.0, 3.0)]
    assert values == [1.0, 1.0, 1.0]  # the first call waits for its own; 2's copy is then in flight, and no other
    lagging.done = True
    assert [seen(torch.tensor(v)) for v in (4.0, 5.0)] == [2.0, 4.0]  # 2 arrived (4 sent), then 4 (5 sent)
    torch.use_deterministic_algorithms(True)
    try:
        lagging.done = False
        assert [seen(torch.tensor(v)) for v in (6.0, 7.0)] == [6.0, 7.0]  # deterministic: this call's value
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("deterministic", [False, True])
def test_top_k_decides_from_its_own_step_in_deterministic_mode(lagging, deterministic):
    """On one GPU the truncate-or-exact choice reads the latest dropped mass that has reached the host, a step or so
    old, so it depends on timing; under --deterministic (torch's deterministic algorithms on) each step decides from
    its own, so a run and its resume repeat. The lag stands in on the CPU: copies that never finish."""
    z = torch.randn(4, 6, 5, 5, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    q = make_q(ba_topk=6).train()  # ba_topk_max_drop 1e-3
    exact = []
    torch.use_deterministic_algorithms(deterministic)
    try:
        for beta in (10.0, 10.0, 0.5):  # sharp (k-means, then a step): within the bound; blurred: far beyond it
            q.set_beta(beta)
            metrics = q(z)[2]
            exact.append(float(metrics["topk_exact"]))
    finally:
        torch.use_deterministic_algorithms(False)
    assert metrics["topk_dropped"] > 0.1
    assert exact == ([0.0, 0.0, 1.0] if deterministic else [0.0, 0.0, 0.0])  # lagging: the first step's mass


@pytest.mark.parametrize("overrides,message", [({"ba_topk": 4, "ba_iters": 2}, "ba_iters 1"),
                                               ({"ba_topk": 32}, "below codebook_size"),
                                               ({"ba_topk": 4, "ba_topk_max_drop": 2.0}, "ba_topk_max_drop")])
def test_top_k_settings_are_checked(overrides, message):
    with pytest.raises(vqvae.UserError, match=message):
        vqvae.Config(quantizer="ba_vq", codebook_size=32, **overrides)


def test_seed_mode_stays_exact():
    cfg = vqvae.Config(quantizer="ba_seed", codebook_size=32, ba_topk=4)
    assert vqvae.make_quantizer(cfg, 6).hp.ba_topk == 0
    assert math.isfinite(ba_kernels.LOG_Q_FLOOR) and math.exp(ba_kernels.LOG_Q_FLOOR) == 0.0


def test_dropped_mass_keeps_float32_precision_far_from_the_origin():
    """Latents ~20 units from 0 put the logits ~1e3 from 0; the float32 mass still matches float64's to 1e-6."""
    g = torch.Generator().manual_seed(0)
    e = 20 + torch.randn(2000, 8, generator=g, dtype=torch.float64)
    C = e[:256] + 0.05 * torch.randn(256, 8, generator=g, dtype=torch.float64)
    log_Q0 = torch.full((256,), -math.log(256), dtype=torch.float64)
    want = vqvae.topk_dropped_mass(e, C, log_Q0, 2.0, 16, 4096)
    got = vqvae.topk_dropped_mass(e.float(), C.float(), log_Q0.float(), 2.0, 16, 4096)
    assert 1e-3 < want < 1e-1 and abs(got.double() - want) < 1e-6
