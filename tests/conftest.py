import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import baselines  # noqa: E402,F401  (registers simvq, fsq, wasserstein_vq, cvq, as train.py does)
torch.set_num_threads(2)
