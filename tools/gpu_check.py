"""The GPU check: every GPU goal of the project measured in one call of at most 8 minutes, the whole suite in a second.

    python tools/gpu_check.py                                  # on a GPU machine: the plan below, 445 s at most
    python tools/gpu_check.py --stage suite                    # a second call: the whole suite, 540 s at most
    python tools/gpu_check.py --device cpu --quick --out DIR   # the same plan at tiny sizes on the CPU

Needs torch (a CUDA build), numpy, pyyaml, matplotlib and pytest; vector-quantize-pytorch for the rows against the
peer (without it those rows say so). Downloads nothing.

The plan: stages in this order, each in a process of its own (forked from this one once it has imported torch and
the project, so a stage starts in a moment; CUDA starts in the stage) in a session and process group of its own,
under a fixed budget in seconds. The group gets SIGTERM 5 s before the budget ends and SIGKILL at its end (sweep
workers and test subprocesses included), and the next stage starts anyway. Budgets:
    data      10  tile the bundled CIFAR-10 sample (or --source, a CIFAR-10 folder) to full size in data/tiled:
                  50,850 train / 10,170 test images, the epoch of the first GPU figures (issue 23: the shared subset
                  tiled 10 times, 198 steps at batch 256); kept for later calls
    tests     80  tests/test_cuda.py and tests/test_devices.py: every quantizer in float32 on the GPU against
                  float64 on the CPU, bf16 training, resume bit for bit under --deterministic, the device errors
    epochs   170  the seed-004 config (config.yaml: residual, batch 256, bf16), 2 epochs each of vq_ema and ba_vq,
                  eager, then with --compile: seconds per epoch (training and validation; the second is the steady
                  one) and whether Dynamo compiled graphs, with its graph breaks
    busy      20  GPU busy share during a training epoch of the seed-004 config (vq_ema, ba_vq): NVML's utilization
                  (the share of time a kernel ran) sampled every 0.1 s by a thread, through torch.cuda.utilization
                  where pynvml is installed, else nvidia-smi
    bench     25  the quantizer alone (forward + backward, N = 16,384, D = 64): vq_ema against vector-quantize-
                  pytorch's VectorQuantize at K = 512 and 16,384 (bench.py's cases)
    peer      40  end to end: 2 epochs of the compact arch at K = 16,384 with vq_ema, and with VectorQuantize in the
                  same nets, data and loop
    ba65k     25  exact BA at K = 65,536: the quantizer's peak memory growth, a training step against vq_ema's
    syncs     30  host syncs per training step (between log steps) of every registered quantizer at K = 16,384,
                  counted on the device: CUDA's synchronisation events in the profiler's trace (on the CPU: host
                  reads, the proxy tests/test_host_syncs.py pins)
    jobs      45  a two-run sweep (compact, K = 512, 1 epoch) under --deterministic, one by one and with --jobs 2:
                  equal bit for bit, and the wall time of each
                  ---
             445  in all: within the 480 s (8 minutes) of one call, with 35 s for importing torch and the project
    suite    540  (--stage suite, a call of its own) python -m pytest tests
--quick runs every stage at tiny sizes (the bundled sample's first images tiled twice, compact nets without k-means,
small K, one epoch, one thread; Dynamo without inductor's code generation, for vq_ema only) to check the plan itself:
its speed and memory figures are not the targets' and are not judged.

Output in --out: gpu_check.json (written after every stage, so a cut call keeps what it measured), gpu_check.md (one
table: each goal, its target, the measured figure, pass/fail; also printed at the end), and each stage's stdout and
stderr (<stage>.out, <stage>.err). A stage reports on stdout only, in lines of one JSON object after the marker
RESULT, which are merged in order; every other line, and stderr, only go to the logs. --append adds the table to
BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "assets" / "cifar10_sample.npz"
PLAN = {"data": 10, "tests": 80, "epochs": 170, "busy": 20, "bench": 25, "peer": 40, "ba65k": 25, "syncs": 30,
        "jobs": 45}
CALL_LIMIT_S = 480  # one call on a lent GPU; the plan's budgets sum to less
DATA_STAGES = {"epochs", "busy", "peer", "jobs"}  # those that train on the tiled data
BUDGETS = {**PLAN, "suite": 540}
KILL_GRACE_S = 5
RESULT = "RESULT "  # a stage's result lines on stdout start with this

# the sizes of each mode: full on the GPU, quick (tiny) anywhere
FULL = {"tile": (None, None), "train_images": 50_850, "test_images": 10_170, "n": 16_384, "dim": 64,
        "small_k": 512, "large_k": 16_384, "huge_k": 65_536, "step_batch": 128, "step_steps": 3, "repeats": 3,
        "sweep_k": 512, "epochs": 2, "sync_steps": 3}
QUICK = {"tile": (64, 16), "train_images": 128, "test_images": 32, "n": 512, "dim": 16, "small_k": 64,
         "large_k": 256, "huge_k": 256, "step_batch": 8, "step_steps": 1, "repeats": 1, "sweep_k": 32, "epochs": 1,
         "sync_steps": 1}
QUICK_NETS = {"arch": "compact", "latent_dim": 16, "codebook_size": 32, "batch_size": 64, "kmeans_init": False}
TESTS = {"tests": ["tests/test_cuda.py", "tests/test_devices.py"], "suite": ["tests"]}
# quick: one case of the CUDA module (on --device: BAVQ_TEST_DEVICE), and one small module for the suite
QUICK_TESTS = {"tests": ["tests/test_cuda.py::test_quantizer_in_float32_on_the_device_matches_float64_on_the_cpu"
                         "[vq_ema]"], "suite": ["tests/test_metrics.py"]}
# host syncs per step that remain by design, as tests/test_host_syncs.py pins them on the CPU
KNOWN_SYNCS = {"ba_vq": 1, "ba_seed": 1, "wasserstein_vq": 2}
# the GPU goals (issue 23), with epochs of 50,850 images
TARGETS = {"epoch_s": {"vq_ema": 0.8, "ba_vq": 1.1}, "vqp_speedup": {"small_k": 1.5, "large_k": 5.0},
           "peer_speedup": 2.0, "ba_peak_gib": 1.5, "ba_step_ratio": 2.5}


# ################################################################################################################
# The plan: stages as process groups under fixed budgets
# ################################################################################################################

def run_stage(args, name: str) -> dict:
    """One stage in a process of its own (a fork of this one, so it starts with torch and the project imported) in
    a session and process group of its own, stopped with its whole group at its budget; its result lines merged."""
    out, err = Path(args.out) / f"{name}.out", Path(args.out) / f"{name}.err"
    t0, cpu0 = time.monotonic(), _children_cpu()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.setsid()
        _stage_process(args, name, out, err)  # does not return
    try:
        code = wait_group(pid, BUDGETS[name])
    except KeyboardInterrupt:  # the stage has a session of its own: Ctrl-C here does not reach it
        _signal_group(pid, signal.SIGKILL)
        raise
    status = "cut" if code is None else "ok" if code == 0 else "failed"
    result = {"status": status, "exit_code": code, "budget_s": BUDGETS[name],
              "seconds": round(time.monotonic() - t0, 1), "cpu_s": round(_children_cpu() - cpu0, 1),
              **read_results(out.read_text(errors="replace"))}
    if status != "ok":
        result["stderr_tail"] = err.read_text(errors="replace")[-1500:]
    return result


def _stage_process(args, name: str, out: Path, err: Path):
    code = 1
    try:
        for fd, path in ((1, out), (2, err)):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        os.environ.update(PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
        code = run_worker(args, name)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def wait_group(pid: int, budget: float):
    """The exit code of process `pid`, or None if it ran past its budget: its process group gets SIGTERM
    KILL_GRACE_S before the budget ends (a training run then writes its checkpoint and leaves) and SIGKILL at the
    end. The group gets SIGKILL whenever the stage ends, too: what a finished stage left running (sweep workers)."""
    end = time.monotonic() + budget
    code = _wait(pid, end - KILL_GRACE_S)
    reaped = code is not None
    if not reaped:
        _signal_group(pid, signal.SIGTERM)
        reaped = _wait(pid, end) is not None
    _signal_group(pid, signal.SIGKILL)
    if not reaped:
        _wait(pid, time.monotonic() + 2)
    return code


def _wait(pid: int, deadline: float):
    """pid's exit code if it ends (and is reaped here) before `deadline`, else None."""
    code = _reap(pid)
    while code is None and time.monotonic() < deadline:
        time.sleep(0.05)
        code = _reap(pid)
    return code


def _signal_group(pgid: int, sig: int):
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):  # nothing of the group is left
        pass


def _reap(pid: int):
    """pid's exit code once it has ended (and is reaped here), else None."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # reaped already
        return None
    return os.waitstatus_to_exitcode(status) if done else None


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def read_results(stdout: str) -> dict:
    """The stage's RESULT lines merged in order (nested dicts key by key); a line cut short by a kill is skipped."""
    merged: dict = {}
    for line in stdout.splitlines():
        if line.startswith(RESULT):
            try:
                _merge(merged, json.loads(line[len(RESULT):]))
            except json.JSONDecodeError:
                continue
    return merged


def _merge(into: dict, new: dict):
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def machine_info() -> dict:
    """What this machine is, without importing torch (this process never touches the GPU)."""
    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "python": platform.python_version(),
            "platform": platform.platform(), "cpus": os.cpu_count(), "gpu": None}
    for package in ("torch", "numpy", "pytest", "vector-quantize-pytorch"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = None
    if shutil.which("nvidia-smi"):
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            info["gpu"] = smi.stdout.strip() or None
        except (OSError, subprocess.TimeoutExpired):
            pass
    return info


# ################################################################################################################
# The table: each goal, its target, the measured figure, pass/fail
# ################################################################################################################

def goal_rows(result: dict) -> list[dict]:
    quick, stages = result["quick"], result["stages"]
    rows = []

    def row(stage, goal, target, measured, ok=None, speed=False, status=None):
        """ok None: informational. Speed and memory targets are for full sizes on a GPU: not judged in quick."""
        s = stages.get(stage)
        if s is None:  # the stage was not asked for in this call
            return
        if status is None and measured is None:
            status, measured = "fail", {"cut": f"cut at {s['budget_s']} s",
                                        "failed": f"stage failed (exit {s['exit_code']})"}.get(s["status"],
                                                                                              "not measured")
        elif status is None:
            status = "n/a (quick)" if speed and quick and _numeric(measured) else \
                "info" if ok is None else "pass" if ok else "fail"
        rows.append({"goal": goal, "target": target, "measured": measured, "status": status})

    d = stages.get("data", {})
    sizes = QUICK if quick else FULL
    row("data", "full-size data, built here (no download)", f"{sizes['train_images']:,} / {sizes['test_images']:,} "
        f"images", d.get("train") and f"{d['train']:,} / {d['test']:,} ({'built' if d.get('built') else 'present'})",
        d.get("train") == sizes["train_images"] and d.get("test") == sizes["test_images"])
    for stage, goal in (("tests", "CUDA tests: float32 vs float64, bf16, bit-exact --deterministic resume, devices"),
                        ("suite", "the whole suite")):
        if stage in stages:
            t = _test_counts(stages[stage])
            row(stage, goal, "all pass", t and f"{t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped",
                bool(t) and t["failed"] == 0 and t["passed"] > 0 and stages[stage]["status"] == "ok")
    runs = stages.get("epochs", {}).get("runs", {})
    for q in ("vq_ema", "ba_vq"):
        r, c = runs.get(q, {}), runs.get(f"{q}, --compile", {})
        limit = TARGETS["epoch_s"][q]
        row("epochs", f"seed-004 config epoch, {q} (training + validation, epoch {sizes['epochs']})", f"≤ {limit} s",
            _last(r) and f"{_last(r):.2f} s" or r.get("error"), _last(r) is not None and _last(r) <= limit, speed=True)
        measured = c.get("error")
        if c.get("epoch_s"):
            measured = (f"{'compiled' if c.get('compiled') else 'NOT compiled'} ({c.get('graphs')} graphs, "
                        f"{c.get('graph_breaks')} breaks), {_last(c):.2f} s vs eager "
                        + (f"{_last(r):.2f} s" if _last(r) else "-"))
        ok = bool(c.get("compiled")) and (quick or (_last(r) is not None and _last(c) <= _last(r)))
        skipped = quick and (q, True) not in QUICK_EPOCH_RUNS
        row("epochs", f"--compile compiles and does not slow the epoch, {q}", "compiled; ≤ eager's",
            "not in quick mode" if skipped else measured, ok, status="n/a (quick)" if skipped else None)
    for q, r in stages.get("busy", {}).get("runs", {}).items():
        measured = f"{r['busy_pct']:.0f} % ({r['samples']} samples, {r['source']})" if r.get("busy_pct") is not None \
            else r.get("error") or f"not measured ({r.get('source')})"
        row("busy", f"GPU busy share in a seed-004 training epoch, {q}", "info (26-48 % before issue 23)", measured,
            False if "error" in r else None)
    rows_b = stages.get("bench", {}).get("rows", {})
    for key in ("small_k", "large_k"):
        K = sizes[key]
        vq, peer = rows_b.get(f"vq_ema K={K}", {}), rows_b.get(f"vqp K={K}", {})
        need = TARGETS["vqp_speedup"][key]
        ratio = peer.get("ms") / vq["ms"] if peer.get("ms") and vq.get("ms") else None
        measured = peer.get("skipped") or ratio and f"{ratio:.2f}x (VectorQuantize {peer['ms']:.2f} / vq_ema " \
                                                    f"{vq['ms']:.2f} ms)" or vq.get("error") or peer.get("error")
        row("bench", f"quantizer alone: vq_ema's speed-up over VectorQuantize, K={K:,}", f"≥ {need}x", measured,
            ratio is not None and ratio >= need, speed=True, status="n/a" if peer.get("skipped") else None)
    p = stages.get("peer", {}).get("runs", {})
    ours, peer = p.get("vq_ema", {}), p.get("vqp", {})
    ratio = _last(peer) / _last(ours) if _last(peer) and _last(ours) else None
    measured = peer.get("skipped") or ratio and f"{ratio:.2f}x (VectorQuantize {_last(peer):.2f} s / vq_ema " \
                                                f"{_last(ours):.2f} s)" or ours.get("error") or peer.get("error")
    row("peer", f"end to end, compact K={sizes['large_k']:,} epoch: vq_ema's speed-up over VectorQuantize",
        f"≥ {TARGETS['peer_speedup']}x", measured, ratio is not None and ratio >= TARGETS["peer_speedup"],
        speed=True, status="n/a" if peer.get("skipped") else None)
    b = stages.get("ba65k", {})
    q, steps = b.get("quantizer", {}), b.get("steps", {})
    gib = q["peak_mib"] / 1024 if q.get("peak_mib") is not None else None
    row("ba65k", f"exact BA at K={sizes['huge_k']:,}: the quantizer's peak memory growth",
        f"≤ {TARGETS['ba_peak_gib']} GiB", gib is not None and f"{gib:.2f} GiB ({q['ms']:.1f} ms a pass)"
        or q.get("error"),
        gib is not None and gib <= TARGETS["ba_peak_gib"], speed=True)
    ba, vq = steps.get("ba", {}), steps.get("vq_ema", {})
    ratio = ba.get("vs_vq_ema")
    row("ba65k", f"exact BA training step / vq_ema's, K={sizes['huge_k']:,}", f"≤ {TARGETS['ba_step_ratio']}x",
        ratio and f"{ratio:.2f}x ({ba['ms_per_step']:.1f} / {vq['ms_per_step']:.1f} ms)"
        or ba.get("failed") or vq.get("failed"),
        ratio is not None and ratio <= TARGETS["ba_step_ratio"], speed=True)
    s = stages.get("syncs", {})
    per = s.get("per_step", {})
    row("syncs", f"host syncs per training step ({s.get('source', '-')})",
        "≤ " + ", ".join(f"{k} {v}" for k, v in KNOWN_SYNCS.items()) + ", others 0",
        "; ".join([", ".join(f"{k} {v:g}" for k, v in sorted(per.items()))]
                  + [f"{k} failed: {e}" for k, e in s.get("errors", {}).items()]).strip("; ") or None,
        bool(per) and not s.get("errors") and all(v <= KNOWN_SYNCS.get(k, 0) for k, v in per.items()))
    j = stages.get("jobs", {})
    row("jobs", "--jobs 2 equals one by one under --deterministic", "bit-identical final metrics",
        {True: "equal", False: "differ"}.get(j.get("equal")), j.get("equal") is True)
    if j.get("wall_s"):
        w = j["wall_s"]
        row("jobs", "--jobs 2 sweep wall time (2 runs)", "info", f"{w.get('jobs 2', 0):.1f} s with --jobs 2, "
            f"{w.get('one by one', 0):.1f} s one by one")
    return rows


def _numeric(measured: str) -> bool:
    """Whether a measured cell holds a figure (a speed row in quick mode is then not judged) rather than an error."""
    return bool(measured) and measured[0].isdigit()


def _last(run: dict):
    """The run's last (steady) epoch seconds, or None."""
    return run["epoch_s"][-1] if run and run.get("epoch_s") else None


def _test_counts(stage: dict):
    outcomes = list(stage.get("tests", {}).values())
    if not outcomes:
        return None
    return {k: outcomes.count(k) for k in ("passed", "failed", "skipped")}


def markdown(result: dict, rows: list[dict]) -> str:
    m = result["machine"]
    lines = [f"## GPU check {m['date']} | {result['device']} | {m['gpu'] or str(m['cpus']) + ' CPUs'} | "
             f"torch {m['torch']}", "",
             f"Command: `{result['command']}`{' (quick: tiny sizes, speed not judged)' if result['quick'] else ''}. "
             f"Python {m['python']}; {m['cpus']} CPUs; vector-quantize-pytorch "
             f"{m['vector-quantize-pytorch'] or 'not installed'}.",
             "", "Stages: " + "; ".join(f"{k} {v['status']} in {v['seconds']} s of {v['budget_s']}"
                                        for k, v in result["stages"].items()) + ".", "",
             "| goal | target | measured | pass/fail |", "|---|---|---|---|"]
    lines += [f"| {r['goal']} | {r['target']} | {r['measured']} | {r['status']} |" for r in rows]
    return "\n".join(lines) + "\n"


def run_plan(args, argv) -> int:
    stages = args.stage.split(",") if args.stage else list(PLAN)
    if set(stages) & DATA_STAGES and "data" not in stages:  # never a download: the tiled data first
        stages.insert(0, "data")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python tools/gpu_check.py " + " ".join(argv)
    result = {"command": command.strip(), "device": args.device, "quick": args.quick, "machine": machine_info(),
              "stages": {}}
    path = out / "gpu_check.json"
    if set(stages) - {"data"}:
        result["preload_error"] = preload()
    for name in stages:
        print(f"[gpu_check] {name}: up to {BUDGETS[name]} s", flush=True)
        result["stages"][name] = run_stage(args, name)
        s = result["stages"][name]
        print(f"[gpu_check] {name}: {s['status']} in {s['seconds']} s", flush=True)
        path.write_text(json.dumps(result, indent=1))  # after every stage: a cut call keeps what it measured
    rows = goal_rows(result)
    result["table"] = rows
    path.write_text(json.dumps(result, indent=1))
    section = markdown(result, rows)
    (out / "gpu_check.md").write_text(section)
    if args.append:
        with open(ROOT / "BENCHMARKS.md", "a") as fh:
            fh.write("\n" + section)
    print(section, flush=True)
    return 0 if all(s["status"] == "ok" for s in result["stages"].values()) else 1


# ################################################################################################################
# The stages' workers (each runs in a process of its own)
# ################################################################################################################

_results_out = None


def emit(**fields):
    """One RESULT line on the process's real stdout (a duplicate of fd 1, so pytest's capture cannot swallow it)."""
    print("\n" + RESULT + json.dumps(fields), file=_results_out, flush=True)  # a line of its own, whatever came before


def attempt(measure, *a, **kw):
    """measure(*a, **kw), or {"error": ...} when it raises (its traceback to stderr): one failing run or case is a
    result, and the stage goes on with the next."""
    try:
        return measure(*a, **kw)
    except Exception as err:
        traceback.print_exc()
        return {"error": f"{type(err).__name__}: {str(err)[:300]}"}


def stage_data(args):
    """The tiled data, with numpy alone: the source's images repeated to full size, in CIFAR-10's pickle layout."""
    import pickle

    import numpy as np
    sizes = QUICK if args.quick else FULL
    folder = Path(args.data_dir) / "cifar-10-batches-py"
    want = {"source": str(args.source), "train": sizes["train_images"], "test": sizes["test_images"]}
    stamp = folder / "tiled.json"
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        emit(built=False, **want)
        return
    t0 = time.monotonic()
    train, test = _read_source(Path(args.source))
    train, test = train[:sizes["tile"][0]], test[:sizes["tile"][1]]  # the images tiled (quick: a few of them)
    folder.mkdir(parents=True, exist_ok=True)

    def tiled(images, n):  # (N, 3072) uint8 repeated to n rows
        return np.tile(images, (math.ceil(n / len(images)), 1))[:n]

    files = {f"data_batch_{i + 1}": part for i, part in enumerate(np.array_split(tiled(train, want["train"]), 5))}
    files["test_batch"] = tiled(test, want["test"])
    for name, data in files.items():
        with open(folder / f".{name}.tmp", "wb") as fh:
            pickle.dump({"data": data, "labels": [0] * len(data)}, fh, protocol=4)
        os.replace(folder / f".{name}.tmp", folder / name)
    stamp.write_text(json.dumps(want))
    emit(built=True, seconds=round(time.monotonic() - t0, 1), **want)


def _read_source(source: Path):
    """(train, test) uint8 (N, 3072) of the bundled .npz or of a folder holding CIFAR-10 batches."""
    import pickle

    import numpy as np
    if source.suffix == ".npz":
        with np.load(source) as sample:
            return sample["train"].reshape(len(sample["train"]), -1), sample["test"].reshape(len(sample["test"]), -1)
    folder = source / "cifar-10-batches-py" if (source / "cifar-10-batches-py").is_dir() else source

    def read(path):
        with open(path, "rb") as fh:
            return np.asarray(pickle.load(fh, encoding="latin1")["data"], dtype=np.uint8)
    return np.concatenate([read(p) for p in sorted(folder.glob("data_batch_*"))]), read(folder / "test_batch")


def stage_tests(args, paths: list[str]):
    """pytest in this process; every test's outcome reported as it finishes."""
    import pytest

    class Report:
        def pytest_runtest_logreport(self, report):
            if report.failed or (report.when == "call" and report.passed) or report.skipped:
                emit(tests={report.nodeid: report.outcome})

    if args.quick:
        os.environ["BAVQ_TEST_DEVICE"] = args.device  # tests/test_cuda.py on the CPU too, to check the stage itself
    os.environ["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # the suite uses no plugin; loading installed ones takes seconds
    code = pytest.main(["-q", "-p", "no:cacheprovider", *paths], plugins=[Report()])
    emit(pytest_exit=int(code))


EPOCH_RUNS = [("vq_ema", False), ("ba_vq", False), ("vq_ema", True), ("ba_vq", True)]  # (quantizer, --compile)
QUICK_EPOCH_RUNS = EPOCH_RUNS[:3]  # Dynamo alone takes ~10 s on a CPU for BA's graphs: quick compiles vq_ema only


def stage_epochs(args):
    """train.py's training (vqvae.train) per run, eager first, then compiled."""
    _, vqvae = _project(args)
    for quantizer, compiled in QUICK_EPOCH_RUNS if args.quick else EPOCH_RUNS:
        label = quantizer + (", --compile" if compiled else "")
        emit(runs={label: {"started": True}})
        emit(runs={label: attempt(train_run, args, vqvae, label, _seed004(args, quantizer, compile=compiled))})


def _seed004(args, quantizer: str, **overrides) -> tuple:
    """(config file, flags) of the seed-004 config with `quantizer` (quick: tiny compact nets)."""
    return (None, {**QUICK_NETS, "quantizer": quantizer, **overrides}) if args.quick else \
        ("config.yaml", {"quantizer": quantizer, **overrides})


def train_run(args, vqvae, label: str, config: tuple) -> dict:
    """One run of vqvae.train: seconds of each epoch from its records, and for --compile whether Dynamo compiled."""
    import warnings

    import torch
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    name = "".join(c if c.isalnum() else "_" for c in label)
    epochs = (QUICK if args.quick else FULL)["epochs"]
    flags = {"data_dir": str(args.data_dir), "device": args.device, "epochs": epochs, "wandb": False, "rfid": "off",
             "lpips": False, "out_dir": str(Path(args.out) / "runs"), "name": name, "overwrite": True,
             **config[1]}
    cfg = vqvae.resolve_config(config[0], flags)
    t0 = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        final = vqvae.train(cfg)
    records = [json.loads(ln) for ln in (Path(cfg.out_dir) / name / "metrics.jsonl").read_text().splitlines()]
    out = {"wall_s": round(time.monotonic() - t0, 1), "psnr": final.get("psnr"),
           "epoch_s": [round(r["epoch_time"], 3) for r in records if "epoch_time" in r]}
    if cfg.compile:
        graphs = counters["stats"]["unique_graphs"]
        eager = any("running eagerly" in str(w.message) for w in caught)
        out.update(compiled=graphs > 0 and not eager, graphs=graphs, graph_breaks=sum(counters["graph_break"].values()))
    return out


def stage_busy(args):
    """A training epoch of the seed-004 config (Trainer.train_epoch, after two warm-up steps) while a thread samples
    the GPU's utilization."""
    device, vqvae = _project(args)
    for quantizer in ("vq_ema", "ba_vq"):
        emit(runs={quantizer: attempt(busy_epoch, args, vqvae, device, quantizer)})


def busy_epoch(args, vqvae, device, quantizer: str) -> dict:
    import tempfile
    import types
    config_file, flags = _seed004(args, quantizer)
    cfg = vqvae.resolve_config(config_file, {"data_dir": str(args.data_dir), "device": args.device, "wandb": False,
                                             **flags})
    with tempfile.TemporaryDirectory() as tmp:
        trainer = vqvae.Trainer(cfg, Path(tmp), device)
        warm = trainer.train_batches.epoch(0)
        for _ in range(2):  # k-means, cuDNN's autotuning
            trainer.train_step(next(warm))
        quiet = types.SimpleNamespace(update=lambda n: None, set_postfix=lambda **kw: None)
        logger, stop = vqvae.Logger(Path(tmp), enabled=False), types.SimpleNamespace(requested=False)
        _sync(device)
        with BusySampler(device) as sampler:
            t0 = time.monotonic()
            trainer.train_epoch(logger, stop, quiet)
            trainer.check_finite()
            _sync(device)
            seconds = time.monotonic() - t0
    return {"busy_pct": sampler.mean(), "samples": len(sampler.samples), "source": sampler.source,
            "train_epoch_s": round(seconds, 3), "steps": len(trainer.train_batches)}


class BusySampler:
    """GPU busy share while the block runs: NVML's utilization (the share of its last sample period in which a kernel
    ran) every 0.1 s from a thread, through torch.cuda.utilization (needs pynvml) or else nvidia-smi."""

    def __init__(self, device):
        self.samples, self.read, self.source = [], None, "none: not a GPU"
        if device.type != "cuda":
            return
        import torch
        try:
            torch.cuda.utilization(device)
            self.read, self.source = (lambda: torch.cuda.utilization(device)), "torch.cuda.utilization"
        except Exception:
            if shutil.which("nvidia-smi"):
                index = device.index if device.index is not None else torch.cuda.current_device()
                visible = os.environ.get("CUDA_VISIBLE_DEVICES")
                gpu = visible.split(",")[index] if visible else str(index)
                cmd = ["nvidia-smi", "-i", gpu, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
                self.read = lambda: float(subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout)
                self.source = "nvidia-smi"
            else:
                self.source = "none: no pynvml, no nvidia-smi"
        self._stop = threading.Event()

    def __enter__(self):
        if self.read is not None:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.1):
            try:
                self.samples.append(float(self.read()))
            except Exception:
                pass

    def __exit__(self, *exc):
        if self.read is not None:
            self._stop.set()
            self._thread.join()

    def mean(self):
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None


def stage_bench(args):
    """bench.py's quantizer cases: vq_ema and VectorQuantize, one forward + backward on N vectors."""
    device, _ = _project(args)
    import bench
    sizes = QUICK if args.quick else FULL
    bargs = bench.parse_args(["--device", args.device, "--repeats", str(sizes["repeats"])])
    for key in ("small_k", "large_k"):
        K = sizes[key]
        for impl in ("vq_ema", "vqp"):
            if impl == "vqp" and not bench._vqp_version():
                row = {"impl": impl, "K": K, "skipped": "VectorQuantize: vector-quantize-pytorch not installed"}
            else:
                row = attempt(bench.run_case, impl, sizes["n"], sizes["dim"], K, 1, device, bargs)
            emit(rows={f"{impl} K={K}": row})


def stage_peer(args):
    """Two epochs at K = 16,384 (compact) of vq_ema (restarts as the leaderboard runs them) and of VectorQuantize,
    registered as a quantizer of this project so that it runs in the same nets, data and training loop."""
    _, vqvae = _project(args)
    import bench
    K = (QUICK if args.quick else FULL)["large_k"]
    nets = {**(QUICK_NETS if args.quick else {"arch": "compact"}), "codebook_size": K}
    emit(runs={"vq_ema": attempt(train_run, args, vqvae, "peer vq_ema", (None, {**nets, "quantizer": "vq_ema",
                                                                                 "dead_code_threshold": 1 / 32}))})
    if not bench._vqp_version():
        emit(runs={"vqp": {"skipped": "VectorQuantize: vector-quantize-pytorch not installed"}})
        return
    register_peer(vqvae)
    emit(runs={"vqp": attempt(train_run, args, vqvae, "peer vqp", (None, {**nets, "quantizer": "vqp"}))})


def register_peer(vqvae):
    """vector-quantize-pytorch's VectorQuantize as a quantizer of the contract, with bench.py's settings (EMA decay
    0.99, k-means init, no rotation trick; commitment weight as ours): --quantizer vqp in this process."""
    from dataclasses import dataclass

    from vector_quantize_pytorch import VectorQuantize

    @vqvae.register_quantizer("vqp")
    class VectorQuantizePeer(vqvae.Quantizer):
        @dataclass
        class Params(vqvae.Quantizer.Params):
            decay: float
            commitment_weight: float

        def __init__(self, params, dim: int):
            super().__init__(params, dim)
            self.vq = VectorQuantize(dim=dim, codebook_size=self.K, decay=params.decay, kmeans_init=True,
                                     commitment_weight=params.commitment_weight, rotation_trick=False)

        def quantize(self, e):  # e (N, D) as (1, N, D), the layout it takes
            z_q, idx, loss = self.vq(e[None])
            return vqvae.Quantized(z_q[0], idx[0], {"commitment_loss": loss.sum()}, {})

        def decoder_input(self, e, z_q):
            return z_q  # its output carries its own straight-through estimator

        def codes(self, idx):
            return self.vq.codebook[idx]


def stage_ba65k(args):
    """Exact BA at K = 65,536: bench.py's quantizer case (time, peak memory growth) and its training steps
    (compact, batch 128) against vq_ema's, timed in turn."""
    device, _ = _project(args)
    import bench
    sizes = QUICK if args.quick else FULL
    K = sizes["huge_k"]
    bargs = bench.parse_args(["--device", args.device, "--repeats", str(sizes["repeats"]), "--impls", "vq_ema", "ba"])
    emit(quantizer=attempt(bench.run_case, "ba", sizes["n"], sizes["dim"], K, 1, device, bargs))
    grid = {"step_codebook_sizes": [K], "step_batch": sizes["step_batch"], "step_steps": sizes["step_steps"]}
    emit(steps={r["impl"]: r for r in bench.step_rows(grid, device, bargs)})  # a failed step is a row of its own


def stage_syncs(args):
    """Host syncs in the steps between log steps, per registered quantizer, after two steps (k-means) not counted."""
    device, vqvae = _project(args)
    emit(source="CUDA sync events in the profiler" if device.type == "cuda" else
         "CPU proxy: host reads, aten::_local_scalar_dense")
    for name in sorted(vqvae.QUANTIZERS):
        count = attempt(syncs_per_step, args, vqvae, device, name)
        if isinstance(count, dict):
            emit(errors={name: count["error"]})
        else:
            emit(per_step={name: count})


def syncs_per_step(args, vqvae, device, name: str) -> float:
    import tempfile

    import torch
    import host_reads
    # full: the leaderboard's compact runs at K = 16,384 (D = 64, batch 128, restarts at 1/32)
    overrides = {} if args.quick else {"latent_dim": None, "codebook_size": FULL["large_k"], "batch_size": 128,
                                       "dead_code_threshold": 1 / 32}
    cfg = vqvae.make_config({**host_reads.TINY, "quantizer": name, "device": args.device, **overrides})
    with tempfile.TemporaryDirectory() as tmp:
        trainer = vqvae.Trainer(cfg, Path(tmp), device)
    batches = trainer.train_batches.epoch(0)

    def step():  # as Trainer.train_epoch takes a step between log steps
        out = trainer.train_step(next(batches))
        trainer.step += 1
        for k, v in out.items():
            trainer.epoch_sums[k] = trainer.epoch_sums.get(k, 0) + torch.as_tensor(v).detach().float()

    for _ in range(2):  # k-means: the first step may read
        step()
    steps = (QUICK if args.quick else FULL)["sync_steps"]
    count = device_syncs(step, steps) if device.type == "cuda" else host_reads.host_reads(trainer, batches, steps)
    return count / steps


SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def device_syncs(step, steps: int) -> int:
    """Host-device synchronisations in `steps` calls of step(), from the profiler's trace: CUPTI's synchronisation
    records (stream, event and context syncs; not a stream waiting on an event, which the host does not see), or
    the runtime's sync calls where those are more; less those of profiling an empty block."""
    return _syncs_profiled(lambda: [step() for _ in range(steps)]) - _syncs_profiled(lambda: None)


def _syncs_profiled(work) -> int:
    import tempfile

    import torch
    from torch._C._profiler import _ExperimentalConfig
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                 experimental_config=_ExperimentalConfig(enable_cuda_sync_events=True)) as prof:
        work()
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        events = json.loads(Path(f"{tmp}/trace.json").read_text())["traceEvents"]
    records = sum(e.get("cat") == "cuda_sync" and e.get("args", {}).get("cuda_sync_kind") != "Stream Wait Event"
                  for e in events)
    return max(records, sum(e.get("name") in SYNC_CALLS for e in events))


JOBS_SWEEP = {"name": "jobs", "base": {"arch": "compact", "epochs": 1, "deterministic": True},
              "experiments": [{"name": "vq_ema", "quantizer": "vq_ema"}, {"name": "ba_vq", "quantizer": "ba_vq"}]}


def stage_jobs(args):
    """The sweep one by one (in this process) and with --jobs 2 (two train.py processes), from scratch each time."""
    import yaml
    device, vqvae = _project(args)
    import sweep
    if device.type == "cpu":  # the same threads both ways: the same float arithmetic
        import torch
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"
    sizes = QUICK if args.quick else FULL
    spec = {**JOBS_SWEEP, "base": {**JOBS_SWEEP["base"], **(QUICK_NETS if args.quick else {}),
                                   "codebook_size": sizes["sweep_k"]}}
    folder = Path(args.out) / "jobs"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "jobs.yaml").write_text(yaml.safe_dump(spec))
    flags = {"data_dir": str(args.data_dir), "device": args.device, "wandb": False, "rfid": "off", "lpips": False}
    finals = {}
    for label, jobs in (("one by one", 1), ("jobs 2", 2)):
        t0 = time.monotonic()
        sweep.run_sweep(str(folder / "jobs.yaml"), None, {**flags, "out_dir": str(folder / str(jobs))}, jobs)
        emit(wall_s={label: round(time.monotonic() - t0, 1)})
        finals[label] = {e["name"]: (folder / str(jobs) / "jobs" / e["name"] / "final_metrics.json").read_text()
                         for e in spec["experiments"]}
    emit(equal=finals["one by one"] == finals["jobs 2"])


def preload():
    """torch and the project imported here, once, before the stages' processes fork from this one (each then starts
    in a moment instead of seconds). Nothing here may start CUDA, which a forked process could not use: each stage's
    process starts its own. None, or the error."""
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # a torch.cuda.is_available() here: NVML, fork-safe
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401  (each run's reconstructions.png)
        import pytest  # noqa: F401
        import torch._dynamo  # noqa: F401

        import baselines  # noqa: F401  (registers simvq, fsq, wasserstein_vq, cvq, as train.py does)
        import bench  # noqa: F401
        import sweep  # noqa: F401
        import vqvae  # noqa: F401
    except Exception:
        return traceback.format_exc()[-1500:]  # each stage then meets it again, in its own log
    try:
        import vector_quantize_pytorch  # noqa: F401  (the peer, where installed: seconds of imports)
    except ImportError:
        pass
    import gc

    import torch
    gc.freeze()  # what is imported stays: the stages' garbage collections need not walk it (nor copy its pages)
    return "CUDA started while importing: the stages' CUDA work will fail" if torch.cuda.is_initialized() else None


def _project(args):
    """(device, vqvae) with the project importable and its quantizers registered; quick compiles with Dynamo alone
    (the eager backend: graphs captured, no inductor code generation, which takes minutes on a CPU)."""
    sys.path.insert(0, str(ROOT))
    import baselines  # noqa: F401
    import vqvae
    if args.quick:
        import functools

        import plumbing
        vqvae.compile_model = functools.partial(plumbing.compile_model, backend="eager")
    return vqvae.pick_device(args.device), vqvae


def _sync(device):
    if device.type == "cuda":
        import torch
        torch.cuda.synchronize(device)


def run_worker(args, name: str) -> int:
    global _results_out
    _results_out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.chdir(ROOT)
    if args.quick and name != "data":  # one thread: tiny ops, and a shared 2-core machine
        import torch
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"
    if name in TESTS:
        stage_tests(args, (QUICK_TESTS if args.quick else TESTS)[name])
    else:
        globals()[f"stage_{name}"](args)
    return 0


# ################################################################################################################
# Main
# ################################################################################################################

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", help=f"comma-separated stages to run instead of the plan, of {', '.join(BUDGETS)} "
                                   f"(suite: the whole suite, a call of its own)")
    p.add_argument("--device", default="cuda", help="cuda (or cpu, with --quick, to check the plan itself)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: the plan end to end in seconds")
    p.add_argument("--out", default="gpu_check_out", help="folder for gpu_check.json, gpu_check.md and the logs")
    p.add_argument("--data_dir", help="where the tiled data goes (default data/tiled; quick: OUT/data)")
    p.add_argument("--source", default=str(SAMPLE), help="images to tile: the bundled sample (default) or a folder "
                                                         "holding CIFAR-10 batches")
    p.add_argument("--append", action="store_true", help="append the table to BENCHMARKS.md")
    args = p.parse_args(argv)
    unknown = set(args.stage.split(",")) - set(BUDGETS) if args.stage else set()
    if unknown:
        p.error(f"unknown stages {sorted(unknown)}; choose from {', '.join(BUDGETS)}")
    args.out = Path(args.out).resolve()
    args.data_dir = Path(args.data_dir or (args.out / "data" if args.quick else ROOT / "data" / "tiled")).resolve()
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    return run_plan(args, argv)


if __name__ == "__main__":
    sys.exit(main())
