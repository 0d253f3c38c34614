"""bench.py end to end on its tiny grid: JSON layout, every case timed, targets evaluated, report appended.
No timing assertions: speed is what the script measures, not what the tests check."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import bench
import vqvae

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--quick", "--repeats", "1", "--threads", "2", "--device", "cpu"]  # the CPU fields are asserted


def run_bench(*args):
    proc = subprocess.run([sys.executable, str(ROOT / "bench.py"), *QUICK, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "BENCH.md"
    return run_bench("--out", out), out


def test_quick_json_has_every_case_with_positive_times(quick):
    result, _ = quick
    assert {"meta", "grid", "target_sizes", "quantizers", "floor", "training", "steps", "targets"} <= set(result)
    meta = result["meta"]
    assert meta["torch"] and meta["device"] == "cpu" and meta["logical_cores"] >= 1 and meta["cpu"]
    impls = {"vq_ema", "ba", "ba_topk", "ba_direct"} | ({"vqp"} if meta["vector_quantize_pytorch"] else set())
    grid = result["grid"]
    expected = {(impl, K, it) for K in grid["codebook_sizes"] for impl in impls
                for it in (grid["iters"] if impl in ("ba", "ba_direct") else [1] if impl == "ba_topk" else [None])}
    rows = result["quantizers"]
    assert {(r["impl"], r["K"], r["ba_iters"]) for r in rows} == expected and len(rows) == len(expected)
    for r in rows:
        assert r["ms"] > 0 and len(r["ms_all"]) == r["repeats"] == 1, r
        assert r["N"] == grid["n"] and r["D"] == grid["dims"][0]
        assert r["peak_mib"] is None or r["peak_mib"] >= 0
    floor = result["floor"]  # the GEMM, exp, softmax and nearest code under each (D, K)
    assert {(r["impl"], r["D"], r["K"]) for r in floor} == {
        (f"floor: {op}", D, K) for op in ("gemm", "gemm+exp", "gemm+softmax", "nearest_code")
        for D in grid["dims"] for K in grid["codebook_sizes"]}
    assert all(r["ms"] > 0 and 1 <= r["block_rows"] <= grid["n"] for r in floor)
    train = result["training"]
    # every quantizer vqvae.py and baselines.py register (not those other test modules register in this process)
    registered = [q for q, cls in vqvae.QUANTIZERS.items() if cls.__module__ in ("vqvae", "baselines")]
    assert {"vq_ema", "ba_vq", "ba_seed", "simvq", "fsq", "wasserstein_vq", "cvq"} <= set(registered)
    assert {(r["arch"], r["quantizer"]) for r in train} == {(a, q) for a in ("residual", "compact")
                                                            for q in registered}
    assert all(r["images_per_s"] > 0 and r["ms_per_step"] > 0 for r in train)
    steps = result["steps"]
    assert {(r["impl"], r["K"]) for r in steps} == {(i, K) for i in ("vq_ema", "ba", "ba_topk")
                                                    for K in grid["step_codebook_sizes"]}
    for r in steps:
        assert r["ms_per_step"] > 0 and len(r["ms_all"]) == r["repeats"] == 1
        vq = next(v for v in steps if v["impl"] == "vq_ema" and v["K"] == r["K"])
        assert r["vs_vq_ema"] == pytest.approx(r["ms_per_step"] / vq["ms_per_step"])


def test_quick_targets_are_ratios_of_measured_rows(quick):
    result, _ = quick
    targets = {t["target"]: t for t in result["targets"]}
    large = result["target_sizes"]["large"]
    assert len(targets) == 6 + 2 + 2  # the first issue's six, the step ratios and peak memory of ba and ba_topk
    step = targets[f"ba_topk training step / vq_ema's, K={large}"]
    assert step["status"] == ("PASS" if step["ratio"] <= 2.0 else "MISS")
    small = result["target_sizes"]["small"]
    rows = {(r["impl"], r["K"], r["ba_iters"]): r for r in result["quantizers"]}
    ba_over_vq = targets[f"BA (ba_iters 1) time / VQ-EMA time, K={small}"]
    assert ba_over_vq["ratio"] == pytest.approx(rows[("ba", small, 1)]["ms"] / rows[("vq_ema", small, None)]["ms"],
                                                abs=1e-3)
    assert ba_over_vq["status"] == ("PASS" if ba_over_vq["ratio"] <= 1.5 else "MISS")
    assert all(t["status"] in ("PASS", "MISS", "not measured") for t in targets.values())
    assert ba_over_vq["op"] == "≤" and f"≤ {ba_over_vq['need']:g}" in quick[1].read_text()


def test_quick_appends_a_markdown_section(quick):
    result, out = quick
    text = out.read_text()
    assert text.startswith("# Benchmarks") and result["meta"]["torch"] in text
    assert "| vq_ema | " in text and "| ba_direct | " in text and "images/s" in text
    n_cases = len(result["quantizers"])
    assert sum(line.startswith(("| vq_ema |", "| ba |", "| ba_direct |", "| vqp |"))
               for line in text.splitlines()) == n_cases


@pytest.mark.parametrize("impl", ["ba_direct", "vqp"])
def test_dense_references_are_skipped_beyond_the_memory_limit(impl):
    args = bench.parse_args(["--dense_max_gib", "0.001"])
    row = bench.run_case(impl, 1024, 8, 4096, 1, bench.torch.device("cpu"), args)
    assert row["ms"] is None and "GiB" in row["skipped"]


def test_direct_reference_is_a_drop_in_for_the_chunked_assignment():
    """The benchmark's ba_direct rows run BAQuantizer with ba_assign_direct swapped in: same fields, same values."""
    torch = bench.torch
    g = torch.Generator().manual_seed(0)
    e, C = torch.randn(200, 5, generator=g), torch.randn(30, 5, generator=g)
    log_Q0 = torch.full((30,), -torch.log(torch.tensor(30.0)).item())
    dense = bench.vqvae.ba_assign_direct(e, C, log_Q0, 0.6, 2, chunk=0, want_sums=True)
    chunked = bench.vqvae.ba_assign(e, C, log_Q0, 0.6, 2, chunk=64, want_sums=True)
    assert type(dense) is type(chunked) and chunked.p is None and dense.p.shape == (200, 30)
    for a, b in zip(dense[:-1], chunked[:-1]):
        if a.dtype == torch.long:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    x, outs = torch.randn(4, 5, 8, 8, generator=g), []
    for impl in ("ba", "ba_direct"):  # the same quantizer step, chunked and plain
        torch.manual_seed(0)
        forward, _ = bench.make_forward(impl, 5, 30, 2, torch.device("cpu"), 64, beta=3.0)
        outs.append(forward(x))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
