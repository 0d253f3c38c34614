"""A quantizer of one's own, in one file: VQ-EMA plus a loss that keeps the encoder outputs small, weighted by an
option of its own (mine_alpha). With this file in the working directory:

    python train.py --import my_quantizer --quantizer mine --mine_alpha 0.3

(train.py by its path from elsewhere: `cd examples && python ../train.py ...`; from the repository, `--import
examples/my_quantizer.py`). The run's config.yaml records the import, so sweeps and --resume find it.
"""
from dataclasses import dataclass

import vqvae


@vqvae.register_quantizer("mine")  # a valid --quantizer and YAML value, listed by --help
class MyQuantizer(vqvae.VQEMAQuantizer):
    """Nearest code, EMA codebook and restarts as VQ-EMA; plus mine_alpha * mean ||e||^2."""

    @dataclass
    class Params(vqvae.VQEMAQuantizer.Params):  # the Config fields it reads, then its own options
        mine_alpha: float = vqvae.option(0.1, "mine: weight of the mean squared encoder output",
                                         check=(lambda a: a >= 0, ">= 0"))  # --mine_alpha, YAML key mine_alpha

    def quantize(self, e):  # e (N, D) float32 -> Quantized(z_q (N, D), idx (N,), {loss name: tensor}, {metric: tensor})
        q = super().quantize(e)
        small = self.hp.mine_alpha * e.square().mean()
        return q._replace(losses={**q.losses, "mine_loss": small})  # logged as train/mine_loss, val/mine_loss, ...
