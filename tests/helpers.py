"""Helpers several test modules share."""
from pathlib import Path


def as_if_killed_after_epoch_1(run_dir: Path):
    """A finished run folder made to look like one killed after epoch 1 (checkpoint_every 1): its epoch-1 checkpoint
    becomes last.pt and the final files are gone, so --resume continues from there."""
    (run_dir / "checkpoint_epoch1.pt").replace(run_dir / "last.pt")
    for name in ("final_metrics.json", "final_model.pt"):
        (run_dir / name).unlink()
