import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import baselines  # noqa: E402,F401  (registers simvq, fsq, wasserstein_vq, cvq, as train.py does)
torch.set_flush_denormal(True)  # as train() runs, set before torch's thread pool starts (it inherits the mode)
torch.set_num_threads(2)
# perceptual metric weights and statistics from a cache of the suite's own, empty: every machine runs the same tests
# (BAVQ_CACHE set by hand points the tests that use the real weights at them)
os.environ.setdefault("BAVQ_CACHE", tempfile.mkdtemp(prefix="bavq-cache-"))
