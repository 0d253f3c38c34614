"""Helpers several test modules share."""
import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_tool(name: str) -> ModuleType:
    """tools/<name>.py as a module (tools/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def as_if_killed_after_epoch_1(run_dir: Path):
    """A finished run folder made to look like one killed after epoch 1 (checkpoint_every 1): its epoch-1 checkpoint
    becomes last.pt and the final files are gone, so --resume continues from there."""
    (run_dir / "checkpoint_epoch1.pt").replace(run_dir / "last.pt")
    for name in ("final_metrics.json", "final_model.pt"):
        (run_dir / name).unlink()
