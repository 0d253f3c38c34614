"""Tests of linear_vq.py: manual vs autograd gradients and trajectories, Stiefel invariants, metric identities,
the baseline's pieces, and tiny end-to-end runs of the real CLI."""

import csv
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import linear_vq as L  # noqa: E402

#### Helpers ###########################################################################################################


def random_point(seed, orthonormal, D=64, m=4, K=16, B=128):
    """A random (W, E, x): W on the Stiefel manifold or a general matrix."""
    rng = np.random.default_rng(seed)
    W = L.random_stiefel(D, m, rng) if orthonormal else rng.standard_normal((D, m)) / math.sqrt(D)
    return W, rng.standard_normal((K, m)), rng.standard_normal((B, D))


def rel_err(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def both_grads(W, E, x, estimator, alpha=1.0, beta=0.25):
    manual = L.manual_loss_and_grads(W, E, x, alpha, beta, estimator)
    auto = L.autograd_loss_and_grads(*(torch.from_numpy(a) for a in (W, E, x)), alpha, beta, estimator)
    return manual, [t.numpy() for t in auto]


TINY = replace(L.make_config("verify", {}), n_train=2_000, n_eval=500, batch=256, steps=200, log_every=1)

#### Gradients: manual == autograd ####################################################################################


@pytest.mark.parametrize("estimator", ["ste", "rotation"])
@pytest.mark.parametrize("orthonormal", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_manual_grads_equal_autograd(estimator, orthonormal, seed):
    (lm, gWm, gEm), (la, gWa, gEa) = both_grads(*random_point(seed, orthonormal), estimator)
    assert abs(lm - la) / abs(la) < 1e-10
    assert rel_err(gWm, gWa) < 1e-10
    assert rel_err(gEm, gEa) < 1e-10


def test_grads_at_random_beta_alpha():
    W, E, x = random_point(3, True)
    (_, gWm, gEm), (_, gWa, gEa) = both_grads(W, E, x, "ste", alpha=0.7, beta=1.3)
    assert rel_err(gWm, gWa) < 1e-10 and rel_err(gEm, gEa) < 1e-10


def test_rotation_equals_ste_only_on_stiefel():
    # With W^T W = I, dL/dq~ = (2/B)(q - z) is already along u, so the projection changes nothing.
    W, E, x = random_point(4, True)
    _, gW_ste, _ = L.manual_loss_and_grads(W, E, x, 1.0, 0.25, "ste")
    _, gW_rot, _ = L.manual_loss_and_grads(W, E, x, 1.0, 0.25, "rotation")
    assert rel_err(gW_rot, gW_ste) < 1e-12
    W, E, x = random_point(4, False)
    _, gW_ste, _ = L.manual_loss_and_grads(W, E, x, 1.0, 0.25, "ste")
    _, gW_rot, _ = L.manual_loss_and_grads(W, E, x, 1.0, 0.25, "rotation")
    assert rel_err(gW_rot, gW_ste) > 1e-3


def test_rotation_safe_when_q_equals_z():
    rng = np.random.default_rng(5)
    z, q, g = (rng.standard_normal((8, 4)) for _ in range(3))
    q[0] = z[0]  # u = (q - z)/|q - z| is undefined in row 0
    manual = L.rotation_backward(g, z, q)
    assert np.isfinite(manual).all() and not manual[0].any()
    zt = torch.tensor(z, requires_grad=True)
    q_tilde = L.rotation_torch(zt, torch.from_numpy(q))
    assert torch.equal(q_tilde.detach(), torch.from_numpy(q))  # forward value is exactly q
    q_tilde.backward(torch.from_numpy(g))
    assert np.abs(zt.grad.numpy() - manual).max() < 1e-12
    W, E, x = random_point(5, False)
    E[0] = x[0] @ W  # the same through the whole loss: finite gradients
    for grads in both_grads(W, E, x, "rotation"):
        assert all(np.isfinite(t).all() for t in grads)


#### Trajectories and the Stiefel constraint ###########################################################################


@pytest.mark.parametrize("estimator", ["ste", "rotation"])
def test_manual_and_autograd_trajectories_agree(estimator):
    data = L.make_data(TINY)
    ha, (Wa, Ea) = L.train(TINY, data, "autograd", estimator)
    hm, (Wm, Em) = L.train(TINY, data, "manual", estimator)
    assert len(ha) == len(hm) == TINY.steps + 1  # every step logged
    assert hm[-1]["recon_mse"] < 0.8 * hm[0]["recon_mse"]  # training really moved
    for ra, rm in zip(ha, hm):
        for key in L.METRICS:
            assert abs(ra[key] - rm[key]) < 1e-8, (ra["step"], key)
    assert np.abs(Wa - Wm).max() < 1e-8 and np.abs(Ea - Em).max() < 1e-8


@pytest.mark.parametrize("backend", ["manual", "autograd"])
def test_W_stays_orthonormal_throughout(backend):
    history, (W, _) = L.train(TINY, L.make_data(TINY), backend, "ste")
    assert max(r["orth_err"] for r in history) < 1e-10
    assert L.orthonormality_error(W) < 1e-10


@pytest.mark.parametrize("xp", [np, torch])
def test_stiefel_step_large_random_gradients(xp):
    rng = np.random.default_rng(6)
    W = L.random_stiefel(64, 4, rng)
    W = torch.from_numpy(W) if xp is torch else W
    for _ in range(500):
        G = rng.standard_normal((64, 4)) * 10
        W = L.stiefel_step(W, torch.from_numpy(G) if xp is torch else G, 0.5, xp)
    W = W.numpy() if xp is torch else W
    assert L.orthonormality_error(W) < 1e-10


def test_stiefel_step_follows_riemannian_gradient():
    rng = np.random.default_rng(7)
    W, G = L.random_stiefel(64, 4, rng), rng.standard_normal((64, 4))
    xi = G - W @ ((W.T @ G + G.T @ W) / 2)
    assert np.abs(W.T @ xi + xi.T @ W).max() < 1e-12  # xi lies in the tangent space at W
    lr = 1e-6
    step = (L.stiefel_step(W, G, lr, np) - W) / lr  # the retraction is first-order exact
    assert np.abs(step + xi).max() < 1e-4


#### Metrics ###########################################################################################################


def test_recon_minus_in_subspace_is_out_of_span_energy():
    data = L.make_data(TINY)
    _, (W, E) = L.run_method(replace(TINY, steps=50, log_every=25), data, "manual_ste")
    for W_, E_ in [(W, E), random_point(8, True)[:2]]:  # trained, and a random point
        m = L.evaluate(W_, E_, data.x_eval)
        assert m["out_of_span"] > 0.1  # non-trivial: span(W) misses part of x
        assert abs(m["recon_mse"] - m["in_sub_dist"] - m["out_of_span"]) < 1e-10


def test_usage_stats():
    K = 8
    uniform = L.usage_stats(np.repeat(np.arange(K), 5), K)
    assert abs(uniform["usage_entropy"] - math.log(K)) < 1e-12 and uniform["entropy_frac"] == pytest.approx(1.0)
    assert uniform["dead_frac"] == 0.0
    collapsed = L.usage_stats(np.zeros(40, dtype=int), K)
    assert collapsed["usage_entropy"] == 0.0 and collapsed["dead_frac"] == (K - 1) / K


#### Data and the PCA + Lloyd baseline #################################################################################


def test_data_spectrum():
    cfg = replace(TINY, n_train=20_000)
    data = L.make_data(cfg)
    top = np.linalg.eigvalsh(data.x_train.T @ data.x_train / cfg.n_train)[::-1][: cfg.r]
    expected = L.signal_variances(cfg) + cfg.noise_std**2
    assert np.allclose(top, expected, rtol=0.1)
    assert np.abs(data.U.T @ data.U - np.eye(cfg.r)).max() < 1e-12


def test_pca_recovers_noiseless_subspace():
    cfg = replace(TINY, noise_std=0.0, m=TINY.r)
    data = L.make_data(cfg)
    W = L.pca_basis(data.x_train, cfg.m)
    assert np.abs(W @ W.T - data.U @ data.U.T).max() < 1e-8  # same projector, same subspace
    assert L.out_of_span_energy(data.x_eval, W) < 1e-20


def test_nearest_forms_agree():
    rng = np.random.default_rng(9)
    z, E = rng.standard_normal((1000, 4)), rng.standard_normal((32, 4))
    assert np.array_equal(L.nearest(z, E), L.nearest_expanded(z, E))
    assert np.array_equal(L.nearest(torch.from_numpy(z), torch.from_numpy(E)).numpy(), L.nearest(z, E))


def test_kmeanspp_then_lloyd_decreases_distortion():
    data = L.make_data(TINY)
    z = data.x_train @ L.pca_basis(data.x_train, TINY.m)
    rng = np.random.default_rng(0)
    E0 = L.kmeanspp(z, TINY.K, rng)
    assert len(np.unique(E0, axis=0)) == TINY.K  # distinct codes drawn from the data
    random_codes = z[rng.choice(len(z), TINY.K, replace=False)]
    E, distortions = L.lloyd(z, E0, 50)
    assert all(b <= a + 1e-12 for a, b in zip(distortions, distortions[1:]))
    assert distortions[-1] < 0.9 * distortions[0]
    assert L.in_subspace_distortion(z, E[L.nearest(z, E)]) < L.in_subspace_distortion(
        z, random_codes[L.nearest(z, random_codes)])


#### Config and CLI ####################################################################################################


def test_config_precedence_and_strict_flags():
    command, overrides = L.parse_args(["convergence", "--steps", "7", "--betas", "0", "0.5"])
    cfg = L.make_config(command, overrides)
    assert (cfg.steps, cfg.K, cfg.n_train, cfg.betas) == (7, 32, 20_000, [0.0, 0.5])  # flag > preset > default
    for bad in (["verify", "--bogus", "1"], ["verify", "--K", "abc"], ["nope"]):
        with pytest.raises(SystemExit):
            L.parse_args(bad)


TINY_FLAGS = ["--n_train", "300", "--n_eval", "100", "--steps", "10", "--log_every", "5", "--batch", "64",
              "--Ks", "4", "8", "--betas", "0", "0.5", "--timing_steps", "5", "--lloyd_iters", "10"]

# experiment -> (rows its CSV must have, whether it draws a PNG)
EXPECTED = {"verify": (2 * 3, True), "convergence": (4 * 3, True), "scaling": (2 * 3, True),
            "ablation": (2 * 2, True), "timing": (4, False)}


@pytest.fixture(scope="module")
def cli_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("linear_vq")
    subprocess.run([sys.executable, str(ROOT / "linear_vq.py"), "all", *TINY_FLAGS, "--out", str(out)],
                   check=True, cwd=ROOT, capture_output=True, timeout=300)
    return out


@pytest.mark.parametrize("experiment", list(EXPECTED))
def test_cli_all_writes_every_experiment(cli_out, experiment):
    n_rows, has_png = EXPECTED[experiment]
    rows = list(csv.DictReader(open(cli_out / f"{experiment}.csv")))
    assert len(rows) == n_rows
    md = (cli_out / f"{experiment}.md").read_text()
    assert md.startswith("## ") and "|---|" in md
    assert (cli_out / f"{experiment}.png").exists() == has_png
    assert experiment in L.EXPERIMENTS and md in (cli_out / "summary.md").read_text()


def test_cli_single_command(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "linear_vq.py"), "verify", *TINY_FLAGS, "--out", str(tmp_path)],
                   check=True, cwd=ROOT, capture_output=True, timeout=120)
    rows = list(csv.DictReader(open(tmp_path / "verify.csv")))
    assert {r["method"] for r in rows} == {"autograd_ste", "manual_ste"}
    assert sorted({int(r["step"]) for r in rows}) == [0, 5, 10]
    by = {(r["method"], r["step"]): float(r["recon_mse"]) for r in rows}
    assert abs(by["autograd_ste", "10"] - by["manual_ste", "10"]) < 1e-8
