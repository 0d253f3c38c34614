"""Checkpoint I/O: the self-describing checkpoint a run writes, reads and resumes from, and its run folder.

A checkpoint is one dict (trainer_state): its format number, the run's config, the model's weights, step and
metrics; last.pt and checkpoint_epoch{N}.pt add everything a bit-exact resume needs (optimizer, step counters,
schedule anchor, RNG states), final_model.pt does not. `vqvae.load_checkpoint` rebuilds a model from the file
alone.

vqvae.py and this module import each other by module name; each reads the other's attributes only when a function
runs, so either may be imported first.
"""
from __future__ import annotations

import random
import shutil
import signal
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import yaml

import vqvae
from plumbing import UserError, atomic_write, import_modules

# Fields that may differ when a run is resumed: they change neither the model nor its training trajectory's state.
RESUMABLE_CHANGES = {"epochs", "log_every", "checkpoint_every", "wandb", "wandb_project", "resume", "overwrite",
                     "device", "data_dir", "out_dir", "compile", "deterministic", "rfid", "rfid_every", "lpips",
                     "imports"}
CHECKPOINT_FORMAT = 2  # 2: final_model.pt shares last.pt's format (minus optimizer); the schedule anchor is saved


def trainer_state(trainer: vqvae.Trainer, resumable: bool = True) -> dict:
    """One self-describing dict: config, model and metrics; with `resumable`, also everything needed to continue
    bit-exactly (optimizer, step counters, schedule, RNG states)."""
    state = {"format": CHECKPOINT_FORMAT, "config": vqvae.config_to_dict(trainer.cfg),
             "model": trainer.model.state_dict(), "step": trainer.step, "epoch": trainer.epoch,
             "val_metrics": trainer.val_metrics,
             "phase": trainer.model.phase}  # "ae" during an AE warm-up (a function of step; for readers)
    if resumable:
        state.update({
            "optimizer": trainer.optimizer.state_dict(), "scaler": trainer.scaler.state_dict(),
            "step_in_epoch": trainer.step_in_epoch, "epoch_sums": trainer.epoch_sums,
            "epoch_counts": trainer.epoch_counts,
            "schedule": {"anchor": trainer.schedule_anchor, "total_steps": trainer.total_steps,
                         "ae_warmup_steps": trainer.warmup_steps},
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}})
    return state


def save_checkpoint(trainer: vqvae.Trainer, filename: str, resumable: bool = True) -> Path:
    """trainer_state into the run folder, atomically (last.pt, checkpoint_epoch{N}.pt, final_model.pt)."""
    state = trainer_state(trainer, resumable)
    return atomic_write(trainer.run_dir / filename, lambda fh: torch.save(state, fh))


def read_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # truncated zip, not a torch file, unpickling error...
        raise UserError(f"corrupt or truncated checkpoint {path}: {type(err).__name__}") from None
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise UserError(f"{path} is not a BA-VQ checkpoint (no config/model)")
    fmt = state.get("format", 1)  # format 1 files carry no number
    if not (isinstance(fmt, int) and 1 <= fmt <= CHECKPOINT_FORMAT):
        raise UserError(f"{path} has checkpoint format {fmt!r}; this version reads formats 1 to {CHECKPOINT_FORMAT}")
    import_modules(state["config"].get("imports", vqvae.Config.imports))  # the quantizer may be registered there
    cls = vqvae.QUANTIZERS.get(state["config"].get("quantizer"))
    if cls is not None:  # an unregistered name fails in make_config, with the list of registered ones
        state["config"] = cls.upgrade_config(dict(state["config"]))
    return state


def restore_trainer(trainer: vqvae.Trainer, state: dict):
    """Continue from a resumable state (last.pt): the inverse of trainer_state."""
    trainer.model.load_state_dict(state["model"])
    try:
        trainer.optimizer.load_state_dict(state["optimizer"])
    except ValueError as err:  # e.g. a quantizer that has since gained an optimizer group or a parameter
        raise UserError(f"--resume: the checkpoint's optimizer does not fit this model ({err}); it was written "
                        f"by a version of {trainer.cfg.quantizer} that trained other parameters") from None
    trainer.scaler.load_state_dict(state["scaler"])
    trainer.step, trainer.epoch, trainer.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
    trainer.epoch_sums = {k: v.to(trainer.device) for k, v in state["epoch_sums"].items()}
    trainer.epoch_counts = dict(state.get("epoch_counts", {}))  # older files: every key at every step
    trainer.val_metrics = state.get("val_metrics")
    schedule = state.get("schedule", {"anchor": (0, 0.0), "total_steps": trainer.total_steps})
    # the warm-up stays where the run put it (ae_warmup_frac of the total at its start); older files had none
    trainer.warmup_steps = schedule.get("ae_warmup_steps", 0)
    trainer._check_warmup()
    trainer.model.phase = trainer.phase_after(trainer.step)
    trainer.schedule_anchor = tuple(schedule["anchor"])
    # resumed with other epochs, once the schedule has started: continue from where it stood
    if schedule["total_steps"] != trainer.total_steps and trainer.step > trainer.schedule_anchor[0]:
        trainer.schedule_anchor = (trainer.step, vqvae.schedule_progress(trainer.step, trainer.schedule_anchor,
                                                                   schedule["total_steps"]))
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


RESUME_KEYS = ("config", "model", "optimizer", "scaler", "step", "epoch", "step_in_epoch", "epoch_sums", "rng")


def check_run_dir(cfg: vqvae.Config, run_dir: Path) -> Optional[dict]:
    """Every check on the run folder, writing nothing. Returns the checkpoint to resume from (resume) or None.
    Refuses an existing run unless resume or overwrite is asked for."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} is a file")
    last = run_dir / "last.pt"
    if cfg.resume:
        if not last.exists():
            raise UserError(f"--resume: no checkpoint at {last}")
        state = read_checkpoint(last)
        missing = [k for k in RESUME_KEYS if k not in state]
        if missing:
            raise UserError(f"--resume: {last} is not a resumable checkpoint (it has no {', '.join(missing)})")
        check_resume_config(vqvae.make_config(state["config"]), cfg)
        return state
    if run_dir.exists() and any(run_dir.iterdir()) and not cfg.overwrite:
        raise UserError(f"run folder {run_dir} exists; pass --resume to continue it or --overwrite to replace it")
    return None


def prepare_run_dir(cfg: vqvae.Config, run_dir: Path, resume: bool):
    """Create the run folder (replacing it under overwrite) or reopen it to resume; write config.yaml.
    Called once check_run_dir and the data have passed."""
    if resume:
        for tmp in run_dir.glob(".*.tmp"):  # left by an atomic write that a kill cut short
            tmp.unlink()
    elif cfg.overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    write_config(cfg, run_dir)


def check_resume_config(saved: vqvae.Config, given: vqvae.Config):
    for name in vqvae.config_fields():
        if name in RESUMABLE_CHANGES:
            continue
        if getattr(saved, name) != getattr(given, name):
            raise UserError(f"--resume: '{name}' differs from the run's config ({getattr(saved, name)!r} there, "
                            f"{getattr(given, name)!r} given); it changes the model or its training")


def write_config(cfg: vqvae.Config, run_dir: Path):
    run_dir.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(vqvae.config_to_dict(cfg), sort_keys=False)
    atomic_write(run_dir / "config.yaml", lambda fh: fh.write(text.encode()))


class Interrupted(Exception):
    """Raised after a stop signal once last.pt holds the state; the CLI exits 128 + signum (130 / 143)."""

    def __init__(self, signum: Optional[int], trainer: vqvae.Trainer):
        cfg = trainer.cfg
        signum = signum or signal.SIGTERM  # a rank that stops because another rank was signalled
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {trainer.step}; checkpoint "
                         f"{trainer.run_dir / 'last.pt'} written; continue with --resume --name {cfg.name} "
                         f"--out_dir {cfg.out_dir}")
        self.exit_code = 128 + signum
