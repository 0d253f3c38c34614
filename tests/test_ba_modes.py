"""BA's options: the seeds' mode kept exactly, codes that depend on the image alone, unit-free beta, the MI term."""
import copy
import dataclasses
import math
from pathlib import Path

import pytest
import torch

import vqvae
from helpers import load_tool

REFERENCE = Path(__file__).parent / "data" / "ba_seed_reference.pt"


def make_q(kind="ba_vq", K=24, D=6, **overrides):
    return vqvae.make_quantizer(vqvae.Config(quantizer=kind, codebook_size=K, kmeans_iters=3, **overrides), D)


def test_seed_mode_reproduces_the_outputs_recorded_before_the_options():
    """tests/data/ba_seed_reference.pt holds the seeds' BA (then `ba_vq`) on a fixed input, made at the commit
    before these options by tools/make_ba_seed_reference.py; `ba_seed` must still give it."""
    ref_module = load_tool("make_ba_seed_reference")
    for expected, settings in zip(torch.load(REFERENCE), ref_module.SETTINGS):
        got = ref_module.outputs("ba_seed", settings)
        for part in ("step0", "step1", "eval"):
            torch.testing.assert_close(got[part]["z_q"], expected[part]["z_q"], rtol=1e-6, atol=1e-6)
            assert torch.equal(got[part]["codes"], expected[part]["codes"])
            assert got[part]["losses"].keys() == expected[part]["losses"].keys()
            for k, v in expected[part]["losses"].items():
                torch.testing.assert_close(got[part]["losses"][k], v, rtol=1e-6, atol=1e-7)
            if "z_grad" in expected[part]:
                torch.testing.assert_close(got[part]["z_grad"], expected[part]["z_grad"], rtol=1e-5, atol=1e-7)
        for k, v in expected["state"].items():
            if k == "ema_sum" and settings.get("codebook_update") == "grad":
                assert k not in got["state"]  # a learned codebook no longer keeps the ema_sum it never read
                continue
            torch.testing.assert_close(got["state"][k], v, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("eval_codes", ["running", "nearest"])
@pytest.mark.parametrize("ba_iters", [1, 3])
def test_evaluation_code_of_an_image_does_not_depend_on_its_batch(eval_codes, ba_iters):
    torch.manual_seed(0)
    q = make_q(eval_codes=eval_codes, ba_iters=ba_iters).train()
    q.schedule(0.5)
    for seed in range(3):  # k-means, then a running marginal and dbar that are not uniform / trivial
        q(torch.randn(16, 6, 4, 4, generator=torch.Generator().manual_seed(seed)))
    q.eval()
    z = torch.randn(128, 6, 2, 2, generator=torch.Generator().manual_seed(9))
    whole = q(z)[2]["code_indices"]
    in_16s = torch.cat([q(z[i:i + 16])[2]["code_indices"] for i in range(0, 128, 16)])
    alone = torch.cat([q(z[i:i + 1])[2]["code_indices"] for i in range(0, 8)])
    assert torch.equal(whole, in_16s) and torch.equal(whole[:8], alone)
    seed_q = make_q("ba_seed", ba_iters=ba_iters)
    seed_q.load_state_dict(q.state_dict())
    seed_q.eval()
    batch_codes = [seed_q(z[i:i + 16])[2]["code_indices"] for i in range(0, 128, 16)]
    if ba_iters > 1:  # the seeds' rule is the one that depends on the batch
        assert not torch.equal(seed_q(z)[2]["code_indices"], torch.cat(batch_codes))


def test_running_map_code_is_the_argmax_of_log_q_minus_beta_d():
    torch.manual_seed(0)
    q = make_q(eval_codes="running").train()
    q.schedule(0.3)
    q(torch.randn(16, 6, 4, 4))
    q.log_Q_running.copy_(torch.log_softmax(torch.randn(24), 0))  # a clearly non-uniform prior
    q.eval()
    z = torch.randn(8, 6, 2, 2)
    e = vqvae.Quantizer._flatten(z)
    beta = q.beta.item() / q.d_mean.item()
    expected = (q.log_Q_running - beta * torch.cdist(e, q.codebook) ** 2).argmax(1)
    assert torch.equal(q(z)[2]["code_indices"].reshape(-1), expected)


def test_relative_beta_gives_the_same_p_when_latents_and_codes_are_scaled():
    def soft(scale):
        torch.manual_seed(0)
        q = make_q(ba_forward="soft", ba_iters=2).train()
        q.schedule(0.7)
        z = scale * torch.randn(8, 6, 4, 4, generator=torch.Generator().manual_seed(1))
        z_q, losses, m = q(z)  # k-means on z: the codebook scales with it
        return z_q / scale, m["max_p"], m["H_p"], losses["mutual_info_loss"]
    for a, b in zip(soft(1.0), soft(37.0)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("iters", [1, 2])
def test_mutual_information_gradient_equals_autograd_of_the_direct_formula(iters, cache):
    g = torch.Generator().manual_seed(iters)
    e0, C0 = torch.randn(120, 5, generator=g, dtype=torch.float64), torch.randn(16, 5, generator=g, dtype=torch.float64)
    log_Q0 = torch.full((16,), -math.log(16), dtype=torch.float64)

    def mi_grads(assign):
        e, C = e0.clone().requires_grad_(), C0.clone().requires_grad_()
        log_Q, H_p = assign(e, C)
        (-(vqvae.entropy_from_log(log_Q) - H_p)).backward()
        return H_p.detach(), e.grad, C.grad

    def chunked(e, C):
        out = vqvae.ba_assign(e, C, log_Q0, 1.3, iters, chunk=32, memory=1 << 30 if cache else 0)
        return out.log_Q, out.H_p

    def direct(e, C):
        out = vqvae.ba_assign_direct(e, C, log_Q0, 1.3, iters)
        return out.log_Q, -torch.special.xlogy(out.p, out.p).sum(1).mean()

    for a, b in zip(mi_grads(chunked), mi_grads(direct)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_max_p_and_row_entropy_statistics():
    g = torch.Generator().manual_seed(0)
    e, C = torch.randn(200, 4, generator=g), torch.randn(10, 4, generator=g)
    log_Q0 = torch.full((10,), -math.log(10))
    out = vqvae.ba_assign(e, C, log_Q0, 2.0, 2, chunk=64)
    direct = vqvae.ba_assign_direct(e, C, log_Q0, 2.0, 2)
    p = direct.p
    torch.testing.assert_close(out.max_p, p.amax(1).mean())
    torch.testing.assert_close(out.H_p, -torch.special.xlogy(p, p).sum(1).mean(), rtol=1e-5, atol=1e-6)
    for name in ("max_p", "H_p", "counts", "log_Q"):  # the plain formula's own statistics are the same
        torch.testing.assert_close(getattr(direct, name), getattr(out, name), rtol=1e-5, atol=1e-5)


def test_hard_forward_gives_the_decoder_codebook_vectors_in_training():
    torch.manual_seed(0)
    q = make_q().train()
    z = torch.randn(4, 6, 3, 3, requires_grad=True)
    C_before = q.codebook.clone()
    z_q, losses, m = q(z)
    q(z)  # k-means ran in the first call: compare with the codebook a second forward used
    C = q.codebook.clone()
    z_q, _, m = q(z)
    torch.testing.assert_close(z_q, C[m["code_indices"]].permute(0, 3, 1, 2))
    assert not torch.equal(C_before, C)
    z_q.sum().backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))  # straight-through to e


def test_restarts_judge_a_ba_code_by_its_hard_use_not_its_soft_mass():
    """A code that is every latent's runner-up holds soft mass but is nobody's code: restarts must see it dead."""
    q = make_q(K=2, D=2, kmeans_init=False, dead_code_threshold=0.5, decay=0.1, beta_start=1.0, beta_end=1.0)
    e = -(torch.randn(64, 2) * 0.01).abs()  # latents near the origin, on code 0's side
    q.codebook.copy_(torch.tensor([[0.0, 0.0], [0.05, 0.0]]))  # code 1: close (much soft mass), never nearest
    q.ema_count.fill_(32.0)
    q._resync_sums()
    q.train()
    no_restarts = copy.deepcopy(q)
    no_restarts.hp = dataclasses.replace(q.hp, dead_code_threshold=0.0)
    no_restarts(e[:, :, None, None])
    assert no_restarts.ema_count[1] > 0.5  # alive by its soft mass ...
    _, _, metrics = q(e[:, :, None, None])
    assert int(metrics["restarts"]) == 1  # ... but restarted: it was nobody's hard code
    assert q.use_count[1] == pytest.approx(0.5) and not torch.equal(q.codebook[1], torch.tensor([0.05, 0.0]))


def test_seed_mode_has_no_restarts_whatever_the_config_says():
    assert vqvae.Config().dead_code_threshold > 0  # restarts are on by default ...
    assert make_q("ba_seed").hp.dead_code_threshold == 0  # ... and off in the seeds' method
    assert make_q("ba_vq").hp.dead_code_threshold == vqvae.Config().dead_code_threshold


@pytest.mark.parametrize("marginal,ba_iters,rule", [("batch", 1, "nearest"), ("batch", 2, "running"),
                                                     ("running", 1, "running")])
def test_auto_evaluation_codes_follow_the_training_rule(marginal, ba_iters, rule):
    q = make_q(marginal=marginal, ba_iters=ba_iters)
    assert q.hp.eval_codes == "auto" and q.eval_rule == rule
    if rule == "nearest":  # a uniform prior: training's hard code is the nearest code, and so is evaluation's
        q.train()
        e = torch.randn(64, 6)
        q(e[:, :, None, None])  # k-means init, then a step of statistics
        q.log_Q_running.copy_(torch.log_softmax(torch.randn(q.K) * 3, 0))  # a skewed running marginal: unused
        with torch.no_grad():
            C = q.codebook.clone()  # the codebook training's lookup sees (its EMA step comes after)
            train_codes = q(e[:, :, None, None])[2]["code_indices"].flatten()
            q.eval()
            eval_codes = q(e[:, :, None, None])[2]["code_indices"].flatten()
        assert torch.equal(train_codes, vqvae.nearest_code(e, C, 4096))
        assert torch.equal(eval_codes, vqvae.nearest_code(e, q.codebook, 4096))


@pytest.mark.parametrize("cache", [True, False])
def test_skipping_the_soft_mixture_changes_no_other_output_or_gradient(cache):
    """Hard codes never read z_soft: ba_assign(want_z=False) must give the same statistics and the same gradient
    of a loss on log Q and H_p as the full computation whose z is left unused."""
    g = torch.Generator().manual_seed(3)
    e0, C0 = torch.randn(96, 5, generator=g, dtype=torch.float64), torch.randn(20, 5, generator=g, dtype=torch.float64)
    log_Q0 = torch.log_softmax(torch.randn(20, generator=g, dtype=torch.float64), 0)
    grads = []
    for want_z in (True, False):
        e, C = e0.clone().requires_grad_(), C0.clone().requires_grad_()
        out = vqvae.ba_assign(e, C, log_Q0, 1.7, 2, chunk=32, want_sums=True, want_z=want_z,
                              memory=1 << 30 if cache else 0)
        z, log_Q, idx, counts, sums, H_p, max_p, _ = out
        assert len(z) == (96 if want_z else 0)
        (0.3 * H_p - (log_Q.exp() * log_Q).sum()).backward()
        grads.append((e.grad, C.grad, log_Q.detach(), idx, counts, sums, H_p.detach(), max_p))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_a_state_from_before_use_count_loads_with_it_filled_from_the_cluster_sizes():
    q = make_q()
    old = {k: v for k, v in make_q().state_dict().items() if k != "use_count"}
    old["ema_count"] = torch.arange(24.0)
    q.load_state_dict(old)
    assert torch.equal(q.use_count, torch.arange(24.0))


def test_more_codes_than_latents_keeps_relative_beta_finite():
    """K >= the batch's latents (K = 65,536 at batch 128): k-means puts a code next to every latent, and dbar measured
    on that batch would be ~0. It is measured against the batch's other latents instead."""
    torch.manual_seed(0)
    q = make_q(K=64, beta_start=100.0, beta_end=100.0).train()
    z = torch.randn(2, 6, 4, 4, requires_grad=True)  # 32 latents
    z_q, losses, _ = q(z)
    (z_q.square().sum() + sum(losses.values())).backward()
    assert torch.isfinite(z.grad).all()
    e = z.detach().permute(0, 2, 3, 1).reshape(-1, 6)
    nn = torch.cdist(e[::2], e[1::2]).square().min(1).values.mean()  # the stand-in's own definition
    assert 0.9 < q.d_mean / nn < 1.1  # (after one EMA step towards this batch's distances to its codes)
