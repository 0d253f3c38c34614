"""A few training steps of `vqvae.Trainer` per config, then this process's state saved for tests/test_ddp.py.

    python tests/ddp_worker.py OUT CONFIGS_JSON STEPS                                   # one process
    python -m torch.distributed.run --nproc_per_node=2 tests/ddp_worker.py OUT CONFIGS_JSON STEPS   # two (gloo)

For config i, rank r writes OUT/rank{r}_{i}.pt: the model's state (codebook and EMA statistics included), the
gradients of the first and of the last step (after DDP's averaging), the train loss means, and validation metrics
on 33 test images in batches of 16, whose ragged last batch leaves rank 1 an empty slice.
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import baselines  # noqa: E402,F401  (registers simvq, fsq, wasserstein_vq, cvq)
import vqvae  # noqa: E402

RAGGED_IMAGES, RAGGED_BATCH = 33, 16


def grads(model: torch.nn.Module) -> dict:
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def run(cfg: vqvae.Config, steps: int, rank: int, world: int) -> dict:
    trainer = vqvae.Trainer(cfg, Path("unused"), torch.device("cpu"), rank, world)
    batches = trainer.train_batches.epoch(0)
    result = {}
    for _ in range(steps):
        out = trainer.train_step(next(batches))
        for k, v in out.items():  # as Trainer.train_epoch accumulates them
            trainer.epoch_sums[k] = trainer.epoch_sums.get(k, 0) + v.detach().float()
            trainer.epoch_counts[k] = trainer.epoch_counts.get(k, 0) + 1
        trainer.step += 1
        trainer.step_in_epoch += 1
        result.setdefault("grads_first", grads(trainer.model))
    trainer.check_finite()
    val = vqvae.Batches(trainer.val_batches.images[:RAGGED_IMAGES], RAGGED_BATCH, "cpu", False, rank=rank,
                        world=world)
    return {**result, "grads_last": grads(trainer.model), "state": trainer.model.state_dict(),
            "train_means": trainer.epoch_means(), "val": vqvae.validate(trainer.model, val)}


def main(out: str, configs_json: str, steps: str):
    rank, world = vqvae.dist_rank_world()
    for i, overrides in enumerate(json.loads(configs_json)):
        result = run(vqvae.make_config(overrides), int(steps), rank, world)
        torch.save({**result, "world": world}, Path(out) / f"rank{rank}_{i}.pt")
    if torch.distributed.is_initialized():  # a rank leaving with the group up can abort ("terminate called ...")
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(*sys.argv[1:])
