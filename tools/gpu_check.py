"""The GPU check: what to run in the first minutes a GPU is at hand, as one command that writes a dated section for
BENCHMARKS.md. Needs torch, numpy, pyyaml and pytest only (no wandb, no nbclient).

    python tools/gpu_check.py --data_dir data/tiled --out gpu_out       # on the GPU machine (see below for the data)
    python tools/gpu_check.py --device cpu --quick --out /tmp/check     # the script itself, on any machine

Data: full-size epochs of the CIFAR-10 subset, 10 copies (50,850 training images), made with
`python ../shared/tools/make_tiled.py ../shared/data/cifar10-subset data/tiled 10` (data/ is git-ignored; carry it).
Steps, each a subprocess with its own time limit, each allowed to fail without stopping the rest (--steps picks):
  machine        GPU name, driver, torch and CUDA versions
  tests          pytest tests/test_cuda.py tests/test_devices.py: the CUDA module and the device errors
  bench          bench.py --device cuda (its JSON; the quantizer grid, training throughput and step rows)
  epochs         train.py for 2 epochs: the seed-004 config (config.yaml: residual, batch 256, bf16) with vq_ema and
                 ba_vq, and the compact arch at K = 16,384 with vq_ema and ba_vq; seconds of each epoch (training
                 and validation), the second being the steady one (the first carries cuDNN autotuning and warm-up)
  deterministic  compact K = 512 vq_ema, 2 epochs, with and without --deterministic: its cost
  syncs          host syncs per training step on the device (torch.cuda.set_sync_debug_mode counts them), for
                 every registered quantizer at K = 16,384: the figure tests/test_host_syncs.py pins on the CPU
  compile        compact K = 16,384 vq_ema and ba_vq, 2 epochs with --compile (beside the epochs step's eager ones)
  jobs           the leaderboard sweep at 6 epochs of the tiled data (2,382 steps a run) with --jobs N: its wall time
                 and results.csv
  suite          the whole test suite (python -m pytest -q tests), last, within the time that is left
Writes <out>/gpu_check.json, <out>/gpu_check.md (the section) and <out>/gpu_check.log, and appends the section to
BENCHMARKS.md unless --no_append.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("machine", "tests", "bench", "epochs", "deterministic", "syncs", "compile", "jobs", "suite")
COMPACT_16K = ["--arch", "compact", "--codebook_size", "16384", "--dead_code_threshold", "0.03125"]
EPOCH_RUNS = {  # label -> train.py flags (besides data, epochs, out_dir, name)
    "seed-004 config, vq_ema": ["--config", "config.yaml", "--quantizer", "vq_ema"],
    "seed-004 config, ba_vq": ["--config", "config.yaml", "--quantizer", "ba_vq"],
    "compact K=16384, vq_ema": [*COMPACT_16K, "--quantizer", "vq_ema"],
    "compact K=16384, ba_vq": [*COMPACT_16K, "--quantizer", "ba_vq"],
}
QUICK_RUNS = {"compact K=64, vq_ema": ["--arch", "compact", "--codebook_size", "64", "--quantizer", "vq_ema"]}


class Check:
    """Runs the steps as subprocesses in the repository, logging each command and its output."""

    def __init__(self, args):
        self.args, self.out = args, Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = open(self.out / "gpu_check.log", "a")
        self.deadline = time.monotonic() + args.budget

    def run(self, cmd: list[str], timeout: float) -> tuple[int, str, float]:
        """(exit code, output, seconds); exit code 124 when the time limit or the overall budget ran out."""
        timeout = max(1.0, min(timeout, self.deadline - time.monotonic()))
        print(f"$ {' '.join(cmd)}", file=self.log, flush=True)
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"})
            code, text = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as err:
            code, text = 124, f"{err.stdout or ''}{err.stderr or ''}\n[stopped after {timeout:.0f} s]"
        seconds = time.monotonic() - t0
        print(text[-20000:] if isinstance(text, str) else text, file=self.log, flush=True)
        return code, text if isinstance(text, str) else text.decode(errors="replace"), seconds

    def data_flags(self) -> list[str]:
        return ["--dataset", "cifar10-sample"] if self.args.quick else ["--data_dir", self.args.data_dir]

    # -- the steps ----------------------------------------------------------------------------------------------
    def machine(self) -> dict:
        code, text, _ = self.run([sys.executable, "-c", (
            "import torch, json; c = torch.cuda.is_available(); print(json.dumps({'torch': torch.__version__, "
            "'cuda': torch.version.cuda, 'gpu': torch.cuda.get_device_name(0) if c else None, "
            "'gpus': torch.cuda.device_count() if c else 0}))")], 120)
        info = json.loads(text.strip().splitlines()[-1]) if code == 0 else {"error": text[-500:]}
        smi = self.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"], 60) \
            if self.args.device.startswith("cuda") else (1, "", 0)
        return {**info, "nvidia_smi": smi[1].strip() if smi[0] == 0 else None, "python": platform.python_version(),
                "cpus": os.cpu_count(), "date": datetime.datetime.now().isoformat(timespec="seconds")}

    def tests(self) -> dict:
        env_device = [] if self.args.device.startswith("cuda") else ["env", f"BAVQ_TEST_DEVICE={self.args.device}"]
        code, text, seconds = self.run([*env_device, sys.executable, "-m", "pytest", "-q", "-rs",
                                        "tests/test_cuda.py", "tests/test_devices.py"], 600)
        return {"exit_code": code, "summary": pytest_summary(text), "seconds": round(seconds, 1)}

    def bench(self) -> dict:
        cmd = [sys.executable, "bench.py", "--device", self.args.device, "--no_append"]
        code, text, seconds = self.run([*cmd, *(["--quick", "--repeats", "1"] if self.args.quick else [])], 420)
        if code != 0:
            return {"exit_code": code, "seconds": round(seconds, 1), "error": text[-1000:]}
        result = json.loads(text[text.index("{"):text.rindex("}") + 1])
        (self.out / "bench.json").write_text(json.dumps(result, indent=1))
        return {"exit_code": 0, "seconds": round(seconds, 1), "targets": result.get("targets", []),
                "steps": result.get("steps", [])}

    def epochs(self) -> dict:
        return {label: self.train(label, flags) for label, flags in (QUICK_RUNS if self.args.quick
                                                                       else EPOCH_RUNS).items()}

    def deterministic(self) -> dict:
        flags = ["--arch", "compact", "--codebook_size", "64" if self.args.quick else "512", "--quantizer", "vq_ema"]
        return {"default": self.train("default", flags), "deterministic": self.train("deterministic",
                                                                                       [*flags, "--deterministic"])}

    def syncs(self) -> dict:
        code, text, seconds = self.run([sys.executable, "-c", SYNC_PROBE, self.args.device,
                                        "64" if self.args.quick else "16384"], 300)
        counts = json.loads(text.strip().splitlines()[-1]) if code == 0 else {"error": text[-800:]}
        return {"exit_code": code, "seconds": round(seconds, 1), "per_step": counts}

    def compile(self) -> dict:
        runs = QUICK_RUNS if self.args.quick else {k: v for k, v in EPOCH_RUNS.items() if k.startswith("compact")}
        return {f"{label}, --compile": self.train(f"{label} compiled", [*flags, "--compile"])
                for label, flags in runs.items()}

    def jobs(self) -> dict:
        epochs = "1" if self.args.quick else "6"  # 6 epochs of the tiled subset: 2,382 steps a run
        out = self.out / "runs" / "sweep"
        t0 = time.monotonic()
        code, text, _ = self.run([sys.executable, "train.py", "--sweep", "sweeps/leaderboard.yaml", *self.data_flags(),
                                  "--epochs", epochs, "--jobs", str(self.args.jobs), "--device", self.args.device,
                                  "--no_wandb", "--out_dir", str(out)], self.args.jobs_seconds)
        csv_path = out / "leaderboard" / "results.csv"
        if csv_path.exists():
            (self.out / "leaderboard_results.csv").write_text(csv_path.read_text())
        done = len(list((out / "leaderboard").glob("*/final_metrics.json")))
        return {"exit_code": code, "wall_s": round(time.monotonic() - t0, 1), "jobs": self.args.jobs,
                "finished_runs": done, "error": None if code == 0 else text[-800:]}

    def suite(self) -> dict:
        code, text, seconds = self.run([sys.executable, "-m", "pytest", "-q", "tests"], 900)
        return {"exit_code": code, "summary": pytest_summary(text), "seconds": round(seconds, 1)}

    def train(self, label: str, flags: list[str]) -> dict:
        """Two epochs of train.py; the seconds of each epoch from its metrics.jsonl."""
        name = re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_")
        run_dir = self.out / "runs" / name
        code, text, seconds = self.run([sys.executable, "train.py", *self.data_flags(), *flags, "--epochs", "2",
                                        "--device", self.args.device, "--no_wandb", "--overwrite",
                                        "--out_dir", str(run_dir.parent), "--name", name], 420)
        records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()] \
            if (run_dir / "metrics.jsonl").exists() else []
        epochs = [r for r in records if "epoch_time" in r]
        return {"exit_code": code, "wall_s": round(seconds, 1), "epoch_s": [round(r["epoch_time"], 3) for r in epochs],
                "psnr": epochs[-1]["val/psnr"] if epochs else None, "error": None if code == 0 else text[-800:]}


# host syncs per training step, counted by CUDA's sync debug mode (on the CPU, where nothing syncs: zeros)
SYNC_PROBE = """
import json, sys, warnings, tempfile
from pathlib import Path
import torch
sys.path.insert(0, '.')
import baselines, vqvae
device, K = torch.device(sys.argv[1]), int(sys.argv[2])
counts = {}
for name, cls in sorted(vqvae.QUANTIZERS.items()):
    cfg = vqvae.make_config({'dataset': 'cifar10-sample', 'arch': 'compact', 'quantizer': name, 'codebook_size': K,
                             'batch_size': 64, 'dead_code_threshold': 1 / 32, 'wandb': False, 'device': str(device)})
    with tempfile.TemporaryDirectory() as tmp:
        trainer = vqvae.Trainer(cfg, Path(tmp), device)
    batches = trainer.train_batches.epoch(0)
    for _ in range(3):
        trainer.train_step(next(batches)); trainer.step += 1
    if device.type == 'cuda':
        torch.cuda.synchronize(); torch.cuda.set_sync_debug_mode('warn')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        for _ in range(3):
            trainer.train_step(next(batches)); trainer.step += 1
    if device.type == 'cuda':
        torch.cuda.set_sync_debug_mode(0)
    counts[name] = sum('synchroniz' in str(w.message) for w in caught) / 3
print(json.dumps(counts))
"""


def pytest_summary(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", ln)]
    return lines[-1].strip("= ") if lines else text.strip().splitlines()[-1] if text.strip() else ""


def markdown(result: dict, command: str) -> str:
    m = result.get("machine", {})
    where = m.get("gpu") or f"{m.get('cpus')} CPUs"
    lines = [f"## GPU check {m.get('date', '')} | {result['device']} | {where} | torch {m.get('torch')}", "",
             f"Command: `{command}` ({'bundled sample, quick' if result['quick'] else 'data: ' + result['data_dir']}). "
             f"nvidia-smi: {m.get('nvidia_smi') or '-'}; CUDA {m.get('cuda')}; {m.get('cpus')} CPUs.", ""]
    for step in ("tests", "suite"):
        if step in result:
            r = result[step]
            lines.append(f"- {step}: {r['summary']} (exit {r['exit_code']}, {r['seconds']} s)")
    if "bench" in result:
        r = result["bench"]
        lines.append(f"- bench.py: exit {r['exit_code']}, {r['seconds']} s (JSON in bench.json)")
        for t in r.get("targets", []):
            lines.append(f"  - {t['target']}: {t['ratio']} ({t['status']})")
    if "syncs" in result:
        lines.append(f"- host syncs per training step (K = 16,384): {result['syncs'].get('per_step')}")
    if "jobs" in result:
        r = result["jobs"]
        lines.append(f"- leaderboard sweep, 2,382 steps a run, --jobs {r['jobs']}: {r['finished_runs']} runs finished "
                     f"in {r['wall_s']} s (exit {r['exit_code']}; leaderboard_results.csv)")
    runs = {**result.get("epochs", {}), **result.get("compile", {}),
            **{f"deterministic: {k}": v for k, v in result.get("deterministic", {}).items()}}
    if runs:
        lines += ["", "| run (2 epochs) | epoch 1 s | epoch 2 s | val PSNR | exit |", "|---|---:|---:|---:|---:|"]
        for label, r in runs.items():
            e = r["epoch_s"] + [None, None]
            psnr = f"{r['psnr']:.2f}" if r["psnr"] is not None else "-"
            lines.append(f"| {label} | {e[0] if e[0] is not None else '-'} | {e[1] if e[1] is not None else '-'} | "
                         f"{psnr} | {r['exit_code']} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_dir", default="data/tiled", help="CIFAR-10 folder (tiled subset: see above)")
    p.add_argument("--device", default="cuda", help="cuda (or cpu, to check the script)")
    p.add_argument("--out", default="gpu_check_out", help="folder for the JSON, the section and the log")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, of {', '.join(STEPS)}")
    p.add_argument("--quick", action="store_true", help="bundled sample, tiny runs: the script checked in seconds")
    p.add_argument("--budget", type=float, default=540.0, help="seconds for all steps together")
    p.add_argument("--jobs", type=int, default=8, help="experiments at a time in the jobs step")
    p.add_argument("--jobs_seconds", type=float, default=420.0, help="time limit of the jobs step")
    p.add_argument("--no_append", action="store_true", help="leave BENCHMARKS.md alone")
    args = p.parse_args(argv)
    unknown = set(args.steps.split(",")) - set(STEPS)
    if unknown:
        p.error(f"unknown steps {sorted(unknown)}; choose from {', '.join(STEPS)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    check = Check(args)
    result = {"device": args.device, "quick": args.quick, "data_dir": args.data_dir}
    for step in STEPS:
        if step in args.steps.split(","):
            t0 = time.monotonic()
            result[step] = getattr(check, step)()
            print(f"[gpu_check] {step}: {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
            (check.out / "gpu_check.json").write_text(json.dumps(result, indent=1))  # what is done, if stopped later
    command = "python tools/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:])
    section = markdown(result, command.strip())
    (check.out / "gpu_check.md").write_text(section)
    if not args.no_append:
        with open(ROOT / "BENCHMARKS.md", "a") as fh:
            fh.write("\n" + section)
    print(section)
    return result


if __name__ == "__main__":
    main()
