"""Writes tests/data/ba_seed_reference.pt: the seeds' BA quantizer's outputs on a fixed input.

The file was made at commit a47d5fe, when `ba_vq` was the seeds' method itself (soft forward, -H(Q), beta in
absolute units, codes by the batch's own Q); tests/test_ba_modes.py checks that `ba_seed` still gives them.
Regenerating it with today's code only re-records `ba_seed`:  python tools/make_ba_seed_reference.py [quantizer]
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import vqvae  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "ba_seed_reference.pt"
SETTINGS = [dict(codebook_update="ema", ba_iters=2, marginal="batch"),
            dict(codebook_update="grad", ba_iters=3, marginal="running")]


def outputs(quantizer: str, settings: dict) -> dict:
    torch.manual_seed(0)
    cfg = vqvae.Config(quantizer=quantizer, codebook_size=24, kmeans_iters=3, entropy_weight=0.1, beta_start=1.5,
                       dead_code_threshold=0.0,
                       **settings)
    q = vqvae.make_quantizer(cfg, 6).train()
    g = torch.Generator().manual_seed(1)
    out = {}
    for step in range(2):  # k-means on the first batch, then EMA / running-marginal state carried to the second
        z = torch.randn(4, 6, 3, 3, generator=g).requires_grad_()
        z_q, losses, metrics = q(z)
        (z_q.square().sum() + sum(losses.values())).backward()
        out[f"step{step}"] = {"z_q": z_q.detach(), "losses": {k: v.detach() for k, v in losses.items()},
                              "codes": metrics["code_indices"], "z_grad": z.grad}
    q.eval()
    z_q, losses, metrics = q(torch.randn(8, 6, 2, 2, generator=g))
    out["eval"] = {"z_q": z_q, "codes": metrics["code_indices"], "losses": losses}
    out["state"] = {k: v.clone() for k, v in q.state_dict().items() if k != "beta"}
    return out


if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else "ba_seed"
    torch.save([outputs(name, s) for s in SETTINGS], OUT)
    print(f"wrote {OUT}")
