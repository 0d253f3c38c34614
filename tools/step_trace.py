"""Which definitions one steady-state training step passes through, by module and banner section: how far a reader
follows the method (STYLE.md's measure). Traces the fourth training step of a compact run on the bundled sample.

    python tools/step_trace.py ba_vq          # or any registered quantizer; --codebook_size K
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import ba_kernels  # noqa: E402
import baselines  # noqa: E402
import plumbing  # noqa: E402
import vqvae  # noqa: E402

MODULES = {Path(m.__file__).resolve(): m.__name__ for m in (vqvae, ba_kernels, plumbing, baselines)}


def sections(path: Path) -> list[tuple[int, str]]:
    """(first line, name) of each banner section: a '# ####' line, the name, another '# ####' line."""
    lines = path.read_text().splitlines()
    return [(i + 2, lines[i + 1][2:].split(" (")[0].strip()) for i in range(len(lines) - 2)
            if lines[i].startswith("# ####") and lines[i + 2].startswith("# ####")
            and not lines[i + 1].startswith("# ####")]


def trace_step(quantizer: str, K: int) -> dict[tuple[str, str], list[str]]:
    """{(module, section): [definition names in call order]} of one training step."""
    cfg = vqvae.make_config({"dataset": "cifar10-sample", "arch": "compact", "quantizer": quantizer,
                             "codebook_size": K, "wandb": False, "device": "cpu"})
    with tempfile.TemporaryDirectory() as tmp:
        trainer = vqvae.Trainer(cfg, Path(tmp), torch.device("cpu"))
    batches = trainer.train_batches.epoch(0)
    for _ in range(3):  # initialisation and warm-up steps
        trainer.train_step(next(batches))
        trainer.step += 1
    seen: dict[tuple[str, str], list[str]] = {}
    banners = {path: sections(path) for path in MODULES}

    def tracer(frame, event, arg):
        path = Path(frame.f_code.co_filename).resolve()
        if event == "call" and path in MODULES and "<" not in frame.f_code.co_name:
            line = frame.f_code.co_firstlineno
            section = max((s for s in banners[path] if s[0] <= line), default=(0, "?"))[1]
            names = seen.setdefault((MODULES[path], section), [])
            if frame.f_code.co_qualname not in names:
                names.append(frame.f_code.co_qualname)

    x = next(batches)
    sys.settrace(tracer)
    try:
        trainer.train_step(x)
    finally:
        sys.settrace(None)
    return seen


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("quantizer", nargs="?", default="ba_vq")
    p.add_argument("--codebook_size", type=int, default=512)
    args = p.parse_args(argv)
    seen = trace_step(args.quantizer, args.codebook_size)
    for module in MODULES.values():
        parts = {s: names for (m, s), names in seen.items() if m == module}
        if parts:
            n = sum(len(v) for v in parts.values())
            print(f"{module}.py: {n} definitions in {len(parts)} sections")
            for section, names in parts.items():
                print(f"  {section} ({len(names)}): {', '.join(names)}")
    return seen


if __name__ == "__main__":
    main()
