"""Speed and memory of the quantizers, and training throughput. Prints JSON; appends a section to BENCHMARKS.md.

    python bench.py                              # full grid on CUDA when present, else CPU
    python bench.py --device cpu --dims 64       # a subset of the grid
    python bench.py --quick --no_append          # tiny grid in seconds (the smoke test runs this)

Quantizer rows: one training-mode forward+backward of a quantizer module on N encoder vectors (a synthetic loss
on z_q plus the quantizer's own losses): median of --repeats timed passes after a warm-up pass, which also runs
the k-means initialisation. Implementations:
  vq_ema     our VQEMAQuantizer (chunked nearest code, scatter-add EMA update)
  ba         our BAQuantizer (chunked Blahut-Arimoto with a recomputing backward), ba_iters 1 and 2
  ba_topk    the same with ba_topk = --topk (ba_iters 1): each latent's top codes only, after a probe that
             measures the dropped mass (ba_topk_max_drop 1, so every pass is truncated and the probe is included)
  ba_direct  the same BAQuantizer with its assignment replaced by `vqvae.ba_assign_direct`: the formula written
             with (N, K) matrices and autograd's backward
  vqp        vector-quantize-pytorch's VectorQuantize(decay=0.99, kmeans_init=True, rotation_trick=False), when
             installed, on the same values in the (B, H*W, D) layout it takes, as an external reference
ba_direct and vqp hold (N, K) matrices; they are skipped where those would exceed --dense_max_gib.
Peak memory is the increase over what is held before the pass: torch.cuda.max_memory_allocated on CUDA; on CPU
the process's resident-set high-water mark (reset through /proc/self/clear_refs, with malloc's free memory
handed back first, so the mark reflects this pass alone; Linux only).
BA rows run at beta = --beta (default 100, the default schedule's end: the sharp assignments top-k is for).
Floor rows (`floor: ...`): the GEMM, exp and softmax an exact BA pass cannot do without, and VQ-EMA's nearest
code, at the same N, D, K and in the same blocks, so a BA row reads against its floor.
Training rows: images/s of `Trainer.train_step` (the real step: forward, backward, AdamW) on the bundled CIFAR-10
sample, for each arch x quantizer.
Step rows: the same training step for the compact arch at batch 128 and K = --step_codebook_sizes, for vq_ema, exact
ba_vq and ba_vq with top-k (those of them in --impls), timed in alternation (one pass of several steps each, in
turn, --repeats times) so that a machine's drift hits all three alike; the ratio to vq_ema is the figure. An epoch
of the CIFAR-10 subset (5,085 images) is 39 such steps.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import baselines  # noqa: F401  (registers simvq, fsq, wasserstein_vq, cvq)
import plumbing
import vqvae

# ################################################################################################################
# Grid and targets
# ################################################################################################################

FULL = {"n": 16384, "dims": [64, 256], "codebook_sizes": [512, 4096, 16384, 65536], "iters": [1, 2],
        "train_batch": 128, "train_steps": 5, "train_codebook_size": 512,
        "step_codebook_sizes": [512, 16384, 65536], "step_batch": 128, "step_steps": 3}
QUICK = {"n": 512, "dims": [16], "codebook_sizes": [64, 256], "iters": [1, 2],
         "train_batch": 8, "train_steps": 1, "train_codebook_size": 32,
         "step_codebook_sizes": [256], "step_batch": 8, "step_steps": 1}
IMPLS = ["vq_ema", "ba", "ba_topk", "ba_direct", "vqp"]
STEP_IMPLS = {"vq_ema": {"quantizer": "vq_ema"}, "ba": {"quantizer": "ba_vq"},
              "ba_topk": {"quantizer": "ba_vq", "ba_topk_max_drop": 1.0}}
ARCHS = ["residual", "compact"]


def target_sizes(grid: dict) -> dict:
    """Where the issue's targets are measured: N = 16,384, D = 64, K = 512 / 16,384 / 65,536 (quick: stand-ins)."""
    if grid is QUICK:
        return {"N": QUICK["n"], "D": QUICK["dims"][0], "small": 64, "large": 256, "huge": 256}
    return {"N": 16384, "D": 64, "small": 512, "large": 16384, "huge": 65536}


# ################################################################################################################
# Machine
# ################################################################################################################

def machine_info(device: torch.device) -> dict:
    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "device": str(device),
            "cpu": cpu_model(), "logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "cuda_available": torch.cuda.is_available(), "vector_quantize_pytorch": _vqp_version(),
            "denormals_flushed": plumbing.denormals_flushed()}
    return info


def cpu_ticks() -> list[int] | None:
    """Machine-wide CPU time counters (user, nice, system, idle, iowait, irq, softirq, steal), Linux only."""
    try:
        return [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None


def contention(start: list[int] | None) -> dict:
    """Over the run: % of machine CPU time stolen by the hypervisor, and the 1-minute load average at its end
    (this run alone keeps it near the thread count)."""
    end = cpu_ticks()
    if start is None or end is None:
        return {}
    d = [b - a for a, b in zip(start, end)]
    return {"steal_pct": round(100 * d[7] / max(sum(d), 1), 1), "loadavg_end": os.getloadavg()[0]}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _vqp_version():
    try:
        from importlib.metadata import version
        import vector_quantize_pytorch  # noqa: F401  (importable, not just installed)
        return version("vector-quantize-pytorch")
    except Exception:
        return None


# ################################################################################################################
# Measuring
# ################################################################################################################

def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_passes(step, device, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_increase_mib(step, device) -> float | None:
    """Memory one pass of step() needs on top of what is already held, in MiB (None where not measurable)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    try:
        # malloc keeps freed blocks for reuse, which the pass would then use without raising the resident set:
        # hand them back first, so every page the pass touches counts
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        base = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    except OSError:  # not Linux/glibc
        return None
    step()
    return (_status_kib("VmHWM") - base) / 1024


# ################################################################################################################
# Quantizer cases
# ################################################################################################################

def make_forward(impl: str, D: int, K: int, iters: int, device, chunk: int, beta: float = 100.0,
                 topk_k: int = 16):
    """(forward(x) -> (z_q, quantizer loss), input layout) for one implementation, in training mode."""
    if impl == "vqp":
        from vector_quantize_pytorch import VectorQuantize
        vq = VectorQuantize(dim=D, codebook_size=K, decay=0.99, kmeans_init=True, rotation_trick=False)
        vq = vq.to(device).train()

        def forward_vqp(x):
            z_q, _, loss = vq(x)
            return z_q, loss.sum()
        return forward_vqp, "BND"
    kind = "vq_ema" if impl == "vq_ema" else "ba_vq"
    topk = {"ba_topk": topk_k, "ba_topk_max_drop": 1.0} if impl == "ba_topk" else {}
    cfg = vqvae.Config(quantizer=kind, codebook_size=K, ba_iters=iters, chunk_size=chunk, wandb=False, **topk)
    q = vqvae.make_quantizer(cfg, D).to(device).train()
    if kind == "ba_vq":
        q.set_beta(beta)
    if impl == "ba_direct":  # the E-M pass written plainly, (N, K) matrices and autograd's backward
        q.assign = vqvae.ba_assign_direct

    def forward(z):
        z_q, losses, _ = q(z)
        return z_q, sum(losses.values())
    return forward, "BDHW"


def dense_gib(impl: str, N: int, K: int, iters: int) -> float:
    """Rough peak of the implementations that hold (N, K) float32 matrices (measured: ba_direct about 3 + 2 ba_iters
    of them, VectorQuantize about 6); 0 for ours."""
    return 4 * N * K * {"ba_direct": 3 + 2 * iters, "vqp": 6}.get(impl, 0) / 2 ** 30


def run_case(impl, N, D, K, iters, device, args) -> dict:
    row = {"impl": impl, "N": N, "D": D, "K": K, "ba_iters": iters if impl.startswith("ba") else None}
    topk_k = min(args.topk, K - 1)  # ba_topk must stay below K
    if impl == "ba_topk":
        row["topk"] = topk_k
    if dense_gib(impl, N, K, iters) > args.dense_max_gib:
        return {**row, "ms": None, "skipped": f"needs about {dense_gib(impl, N, K, iters):.0f} GiB of (N, K) "
                                              f"matrices (> --dense_max_gib {args.dense_max_gib:g})"}
    torch.manual_seed(0)
    forward, layout = make_forward(impl, D, K, iters, device, args.chunk_size, args.beta, topk_k)
    # N encoder vectors as a (B, D, 8, 8) feature map, like the encoders' output
    z = torch.randn(N // 64, D, 8, 8, generator=torch.Generator().manual_seed(1)).to(device)
    x = z.permute(0, 2, 3, 1).reshape(N // 64, 64, D).contiguous() if layout == "BND" else z

    def step():
        leaf = x.detach().requires_grad_()
        z_q, loss = forward(leaf)
        (z_q.float().square().mean() + loss).backward()

    warm = time_passes(step, device, 1)[0]  # k-means initialisation happens here
    warm += time_passes(step, device, 1)[0]
    # very slow cases (large K on a CPU) get one timed pass
    repeats = args.repeats if warm < 2 * args.slow_seconds else 1
    times = time_passes(step, device, repeats)
    peak = peak_increase_mib(step, device)
    del forward, step, z, x
    gc.collect()
    return {**row, "ms": 1e3 * statistics.median(times), "ms_all": [round(1e3 * t, 2) for t in times],
            "repeats": repeats, "peak_mib": peak}


def quantizer_rows(grid: dict, device, args) -> list[dict]:
    impls = [i for i in args.impls if i != "vqp" or _vqp_version()]
    rows = []
    for D in grid["dims"]:
        for K in grid["codebook_sizes"]:
            for impl in impls:
                for iters in (grid["iters"] if impl in ("ba", "ba_direct") else [1]):
                    row = run_case(impl, grid["n"], D, K, iters, device, args)
                    _progress(row)
                    rows.append(row)
    return rows


def _progress(row: dict):
    what = " ".join(f"{k}={v}" for k, v in row.items() if k in ("impl", "N", "D", "K", "ba_iters", "arch",
                                                               "quantizer") and v is not None)
    result = (f"{row['ms']:.1f} ms, peak +{row['peak_mib'] or 0:.0f} MiB" if "ms" in row and row["ms"]
              else f"{row['images_per_s']:.1f} images/s" if "images_per_s" in row
              else f"{row['ms_per_step']:.0f} ms/step" if row.get("ms_per_step")
              else row.get("skipped") or row.get("failed"))
    print(f"[bench] {what}: {result}", file=sys.stderr, flush=True)


def floor_rows(grid: dict, device, args) -> list[dict]:
    """The floor under an exact BA pass at each (D, K): over N rows, in the blocks BA's forward uses (`ba_plan`),
    the (rows, D+1) x (D+1, K) GEMM of the logits, an exp and a softmax of the shifted logits (at beta = --beta,
    latents and codes drawn as in the quantizer rows), and VQ-EMA's nearest code (GEMM and row argmax). BA's
    training-mode pass costs at least GEMM + softmax (forward) and a GEMM and a softmax again when its backward
    forms p once more; the quantizer rows put the measured pass beside these."""
    from ba_kernels import _ba_logit_weights, ba_plan
    from plumbing import nearest_code, with_ones
    rows, N = [], grid["n"]
    for D in grid["dims"]:
        for K in grid["codebook_sizes"]:
            g = torch.Generator().manual_seed(2)
            e, C = torch.randn(N, D, generator=g).to(device), torch.randn(K, D, generator=g).to(device)
            d_typical = 2.0 * D  # E ||e - c||^2 for independent unit Gaussians: beta relative to it, as BA's
            beta = args.beta / d_typical
            log_Q = torch.full((K,), -math.log(K), device=device)  # a uniform prior, as the first E-step's
            W = _ba_logit_weights(C, (C * C).sum(1), log_Q, torch.tensor(beta, device=device))  # (K, D+1)
            block, _ = ba_plan(N, K, 1, args.chunk_size, device, 4, vqvae.Config.ba_memory_mib << 20, True)
            e1 = with_ones(e)

            def blocks(op):
                def run():
                    for s in range(0, N, block):
                        op(e1[s:s + block])
                return run
            def shifted(x):  # the block's logits less their row max, as BA's forward forms them
                logits = x @ W.t()
                return logits.sub_(logits.amax(1, keepdim=True))
            ops = {"gemm": blocks(lambda x: x @ W.t()), "gemm+exp": blocks(lambda x: shifted(x).exp_()),
                   "gemm+softmax": blocks(lambda x: torch.softmax(shifted(x), 1)),
                   "nearest_code": lambda: nearest_code(e, C, args.chunk_size)}
            for name, run in ops.items():
                run()
                times = time_passes(run, device, args.repeats)
                row = {"impl": f"floor: {name}", "N": N, "D": D, "K": K, "ba_iters": None, "block_rows": block,
                       "ms": 1e3 * statistics.median(times), "ms_all": [round(1e3 * t, 2) for t in times],
                       "repeats": args.repeats, "peak_mib": None}
                _progress(row)
                rows.append(row)
    return rows


# ################################################################################################################
# Training throughput
# ################################################################################################################

def training_rows(grid: dict, device, args) -> list[dict]:
    rows = []
    for arch in ARCHS:
        for quantizer in vqvae.QUANTIZERS:
            cfg = vqvae.Config(dataset="cifar10-sample", arch=arch, quantizer=quantizer, epochs=100,
                               batch_size=grid["train_batch"], codebook_size=grid["train_codebook_size"],
                               device=str(device), wandb=False, chunk_size=args.chunk_size)
            with tempfile.TemporaryDirectory() as tmp:
                trainer = vqvae.Trainer(cfg, Path(tmp), device)
                xs = list(trainer.train_batches.epoch(0))

                def step(i=[0]):
                    trainer.train_step(xs[i[0] % len(xs)])
                    trainer.step += 1
                    i[0] += 1
                    trainer.check_finite()  # reads the losses back: waits for the device
                time_passes(step, device, 2)  # k-means initialisation, then one steady step
                seconds = sum(time_passes(step, device, grid["train_steps"]))
            row = {"arch": arch, "quantizer": quantizer, "batch": grid["train_batch"],
                   "K": grid["train_codebook_size"], "D": cfg.code_dim, "steps": grid["train_steps"],
                   "ms_per_step": 1e3 * seconds / grid["train_steps"],
                   "images_per_s": grid["train_steps"] * grid["train_batch"] / seconds}
            _progress(row)
            rows.append(row)
    return rows


def step_rows(grid: dict, device, args) -> list[dict]:
    """ms per training step of vq_ema, ba and ba_topk at each K, the three timed in turn (see the docstring)."""
    rows = []
    for K in grid["step_codebook_sizes"]:
        steps, tmps, failed = {}, [], []
        for impl, overrides in ((i, o) for i, o in STEP_IMPLS.items() if i in args.impls):
            extra = {"ba_topk": min(args.topk, K - 1)} if impl == "ba_topk" else {}
            cfg = vqvae.Config(dataset="cifar10-sample", arch="compact", codebook_size=K, epochs=100,
                               batch_size=grid["step_batch"], beta_start=args.beta, beta_end=args.beta,
                               device=str(device), wandb=False, chunk_size=args.chunk_size, **overrides, **extra)
            tmps.append(tempfile.TemporaryDirectory())
            trainer = vqvae.Trainer(cfg, Path(tmps[-1].name), device)
            xs = list(trainer.train_batches.epoch(0))

            def step(trainer=trainer, xs=xs, i=[0]):
                for _ in range(grid["step_steps"]):
                    trainer.train_step(xs[i[0] % len(xs)])
                    trainer.step += 1
                    i[0] += 1
                    trainer.check_finite()
            try:
                time_passes(step, device, 1)  # k-means initialisation and a first pass
            except vqvae.NonFiniteError as err:  # a code state that cannot train is a result, not a crash
                failed.append({"impl": impl, "K": K, "batch": grid["step_batch"], "ms_per_step": None,
                               "vs_vq_ema": None, "repeats": 0, "peak_mib": None, "failed": str(err).split(";")[0]})
                continue
            steps[impl] = step
        times = {impl: [] for impl in steps}
        for _ in range(args.repeats):
            for impl, step in steps.items():
                times[impl] += time_passes(step, device, 1)
        for impl, step in steps.items():
            ms = 1e3 * statistics.median(times[impl]) / grid["step_steps"]
            row = {"impl": impl, "K": K, "batch": grid["step_batch"], "steps": grid["step_steps"],
                   "repeats": args.repeats, "ms_per_step": ms,
                   "ms_all": [round(1e3 * t / grid["step_steps"], 1) for t in times[impl]],
                   "peak_mib": peak_increase_mib(step, device)}
            _progress(row)
            rows.append(row)
        vq = times.get("vq_ema") and rows[len(rows) - len(steps)]  # vq_ema, when timed, is this K's first row
        for row in rows[len(rows) - len(steps):]:
            row["vs_vq_ema"] = row["ms_per_step"] / vq["ms_per_step"] if vq else None
        rows += failed
        for tmp in tmps:
            tmp.cleanup()
    return rows


# ################################################################################################################
# Targets
# ################################################################################################################

def target_rows(rows: list[dict], sizes: dict) -> list[dict]:
    """The issue's four targets, as ratios of rows measured side by side in this run."""
    def ms(impl, K, iters=None):
        for r in rows:
            if (r["impl"], r["N"], r["D"], r["K"]) == (impl, sizes["N"], sizes["D"], K) \
                    and r["ba_iters"] == iters and r.get("ms"):
                return r
        return None

    small, large, huge = sizes["small"], sizes["large"], sizes["huge"]
    out = []

    def ratio(name, num, den, need, at_least=True):
        op = "≥" if at_least else "≤"
        if num is None or den is None:
            out.append({"target": name, "ratio": None, "need": need, "op": op, "status": "not measured", "from": ""})
            return
        value = num["ms"] / den["ms"]
        ok = value >= need if at_least else value <= need
        out.append({"target": name, "ratio": round(value, 3), "need": need, "op": op,
                    "status": "PASS" if ok else "MISS",
                    "from": f"{num['impl']} {num['ms']:.1f} ms / {den['impl']} {den['ms']:.1f} ms"})

    ratio(f"VQ-EMA speed-up over VectorQuantize, K={small}", ms("vqp", small), ms("vq_ema", small), 1.5)
    ratio(f"VQ-EMA speed-up over VectorQuantize, K={large}", ms("vqp", large), ms("vq_ema", large), 5.0)
    ratio(f"BA (ba_iters 1) time / VQ-EMA time, K={small}", ms("ba", small, 1), ms("vq_ema", small), 1.5,
          at_least=False)
    ratio(f"BA (ba_iters 1) speed-up over direct N x K BA, K={large}", ms("ba_direct", large, 1),
          ms("ba", large, 1), 4.0)
    ba = ms("ba", large, 1)
    peak = ba["peak_mib"] / 1024 if ba and ba.get("peak_mib") is not None else None
    out.append({"target": f"BA (ba_iters 1) peak memory increase in GiB, K={large}",
                "ratio": None if peak is None else round(peak, 3), "need": 1.5, "op": "≤",
                "status": "not measured" if peak is None else "PASS" if peak <= 1.5 else "MISS",
                "from": "" if peak is None else f"ba {ba['peak_mib']:.0f} MiB"})
    ran = ms("ba", huge, 1)
    out.append({"target": f"BA (ba_iters 1) runs at K={huge}", "ratio": None, "need": None, "op": None,
                "status": "PASS" if ran else "not measured", "from": f"ba {ran['ms']:.1f} ms" if ran else ""})
    return out


def step_targets(rows: list[dict], sizes: dict) -> list[dict]:
    """The BA-speed issue's goal: a ba_vq training step within 2x of vq_ema's at the large K, peak memory growth
    within 1.5 GiB at the largest."""
    out = []
    for K in sorted({sizes["large"], sizes["huge"]}):
        by = {r["impl"]: r for r in rows if r["K"] == K}
        for impl in ("ba", "ba_topk"):
            if impl not in by:
                continue
            r = by[impl]
            if r.get("failed"):
                out.append({"target": f"{impl} training step / vq_ema's, K={K}", "ratio": None, "need": 2.0,
                            "op": "≤", "status": "MISS", "from": r["failed"]})
                continue
            if r["vs_vq_ema"] is None:
                continue
            v = by["vq_ema"]
            out.append({"target": f"{impl} training step / vq_ema's, K={K}", "ratio": round(r["vs_vq_ema"], 3),
                        "need": 2.0, "op": "≤", "status": "PASS" if r["vs_vq_ema"] <= 2.0 else "MISS",
                        "from": f"{impl} {r['ms_per_step']:.0f} ms / vq_ema {v['ms_per_step']:.0f} ms"})
    for r in rows:
        if r["K"] == sizes["huge"] and r["impl"].startswith("ba") and r.get("peak_mib") is not None:
            gib = r["peak_mib"] / 1024
            out.append({"target": f"{r['impl']} training step peak memory increase in GiB, K={r['K']}",
                        "ratio": round(gib, 3), "need": 1.5, "op": "≤", "status": "PASS" if gib <= 1.5 else "MISS",
                        "from": f"{r['impl']} {r['peak_mib']:.0f} MiB"})
    return out


# ################################################################################################################
# Report
# ################################################################################################################

def markdown(result: dict, command: str) -> str:
    m = result["meta"]
    where = m["gpu"] if m["gpu"] else f"{m['cpu']}, {m['logical_cores']} logical cores, {m['torch_threads']} threads"
    lines = [f"## {m['date']} | {m['device']} | {where} | torch {m['torch']}", "",
             f"Command: `{command}`. Python {m['python']}, {m['platform']}; vector-quantize-pytorch "
             f"{m['vector_quantize_pytorch'] or 'not installed'}."
             + (f" CPU time stolen by the hypervisor during the run: {m['steal_pct']}%; load average at the end: "
                f"{m['loadavg_end']:.2f}." if "steal_pct" in m else ""), ""]
    if m["device"] == "cpu" and not m["cuda_available"]:
        lines += ["No GPU was available for this run, so these are CPU figures only; the CUDA table is still to be "
                  "recorded on a GPU machine with `python bench.py --device cuda`.", ""]
    lines += ["Training-mode forward+backward of the quantizer alone (median of the timed passes, after a warm-up "
              "pass that runs the k-means init); peak memory = increase over what was held before the pass.", "",
              "| impl | N | D | K | ba_iters | fwd+bwd ms | passes | peak mem increase MiB | note |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["quantizers"] + result.get("floor", []):
        ms = f"{r['ms']:.1f}" if r.get("ms") else "-"
        peak = f"{r['peak_mib']:.0f}" if r.get("peak_mib") is not None else "-"
        lines.append(f"| {r['impl']} | {r['N']} | {r['D']} | {r['K']} | {r['ba_iters'] or ''} | {ms} | "
                     f"{r.get('repeats', '')} | {peak} | {r.get('skipped', '')} |")
    if result["training"]:
        lines += ["", "Training throughput (`Trainer.train_step`: forward, backward, AdamW; bundled CIFAR-10 sample):",
                  "", "| arch | quantizer | D | K | batch | ms/step | images/s |", "|---|---|---:|---:|---:|---:|---:|"]
        for r in result["training"]:
            lines.append(f"| {r['arch']} | {r['quantizer']} | {r['D']} | {r['K']} | {r['batch']} | "
                         f"{r['ms_per_step']:.0f} | {r['images_per_s']:.1f} |")
    if result.get("steps"):
        lines += ["", f"Training step, compact arch, alternating (`Trainer.train_step`; BA at beta {result['beta']:g}, "
                      f"top-k {result['topk']}; peak = increase over what was held):", "",
                  "| impl | K | batch | ms/step | vs vq_ema | passes | peak mem increase MiB |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in result["steps"]:
            if r.get("failed"):
                lines.append(f"| {r['impl']} | {r['K']} | {r['batch']} | failed: {r['failed']} | | | |")
                continue
            peak = f"{r['peak_mib']:.0f}" if r.get("peak_mib") is not None else "-"
            lines.append(f"| {r['impl']} | {r['K']} | {r['batch']} | {r['ms_per_step']:.0f} | "
                         f"{'-' if r['vs_vq_ema'] is None else format(r['vs_vq_ema'], '.2f') + 'x'} | "
                         f"{r['repeats']} | {peak} |")
    lines += ["", f"Targets (N = {result['target_sizes']['N']}, D = {result['target_sizes']['D']}):", "",
              "| target | measured | required | status | from |", "|---|---:|---:|---|---|"]
    for t in result["targets"]:
        need = "" if t["need"] is None else f"{t['op']} {t['need']:g}"
        lines.append(f"| {t['target']} | {'' if t['ratio'] is None else t['ratio']} | {need} | {t['status']} | "
                     f"{t['from']} |")
    return "\n".join(lines) + "\n"


HEADER = """# Benchmarks

Sections are appended by `python bench.py` and `python bench_data.py` (see their docstrings for what is measured
and how). Each section names its machine, torch version and device; compare figures only within one section.
"""


def append_report(path: Path, text: str):
    if not path.exists():
        path.write_text(HEADER)
    with open(path, "a") as fh:
        fh.write("\n" + text)


# ################################################################################################################
# Main
# ################################################################################################################

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:1")
    p.add_argument("--quick", action="store_true", help="tiny grid (N=512, D=16, K 64/256), seconds")
    p.add_argument("--out", default="BENCHMARKS.md", help="Markdown file the section is appended to")
    p.add_argument("--no_append", action="store_true", help="print the JSON only; leave --out alone")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per case (after 2 warm-up passes)")
    p.add_argument("--slow_seconds", type=float, default=20.0,
                   help="cases whose warm-up passes average more than this get one timed pass")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--n", type=int, default=None, help="encoder vectors per pass (a multiple of 64)")
    p.add_argument("--dims", type=int, nargs="+", default=None, help="code dimensions D")
    p.add_argument("--codebook_sizes", type=int, nargs="+", default=None, help="codebook sizes K")
    p.add_argument("--iters", type=int, nargs="+", default=None, help="BA iterations per forward")
    p.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS, help="implementations to time")
    p.add_argument("--chunk_size", type=int, default=vqvae.Config.chunk_size, help="our quantizers' chunk_size")
    p.add_argument("--dense_max_gib", type=float, default=10.0,
                   help="skip ba_direct and vqp where their (N, K) matrices would need more than this")
    p.add_argument("--no_train", action="store_true", help="skip the training-throughput rows")
    p.add_argument("--no_floor", action="store_true", help="skip the floor rows (GEMM, exp, softmax, nearest code)")
    p.add_argument("--no_steps", action="store_true", help="skip the alternating training-step rows")
    p.add_argument("--step_codebook_sizes", type=int, nargs="+", default=None, help="K of the step rows")
    p.add_argument("--beta", type=float, default=100.0, help="BA's beta (relative units) in every BA row")
    p.add_argument("--keep_denormals", action="store_true", help="CPU arithmetic on subnormal floats, as before "
                                                                 "train() flushed them to zero (for an A/B)")
    p.add_argument("--topk", type=int, default=16, help="ba_topk of the ba_topk rows")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_flush_denormal(not args.keep_denormals)  # as train() runs; before the thread pool starts (it inherits)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    grid = QUICK if args.quick else FULL
    sizes = target_sizes(grid)
    grid = {**grid, **{k: v for k, v in (("n", args.n), ("dims", args.dims), ("codebook_sizes",
                                                                              args.codebook_sizes),
                                          ("iters", args.iters), ("step_codebook_sizes",
                                                                  args.step_codebook_sizes)) if v is not None}}
    if grid["n"] % 64:
        raise SystemExit("--n must be a multiple of 64 (vectors are laid out as (B, D, 8, 8))")
    result = {"meta": machine_info(device), "grid": grid, "target_sizes": sizes, "beta": args.beta,
              "topk": args.topk}
    ticks = cpu_ticks()
    result["quantizers"] = quantizer_rows(grid, device, args)
    result["floor"] = [] if args.no_floor else floor_rows(grid, device, args)
    result["training"] = [] if args.no_train else training_rows(grid, device, args)
    result["steps"] = [] if args.no_steps else step_rows(grid, device, args)
    result["meta"].update(contention(ticks))
    result["targets"] = target_rows(result["quantizers"], sizes) + step_targets(result["steps"], sizes)
    print(json.dumps(result, indent=1))
    if not args.no_append:
        command = "python bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
        append_report(Path(args.out), markdown(result, command.strip()))
    return result


if __name__ == "__main__":
    main()
