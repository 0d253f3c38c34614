"""analyze.ipynb runs headless on two tiny runs made by the real CLI, and draws every figure."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat/nbclient (requirements-dev.txt) run the notebook")
NotebookClient = pytest.importorskip("nbclient", reason="nbclient (requirements-dev.txt) runs the notebook"
                                     ).NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "analyze.ipynb"
TINY = ["--dataset", "cifar10-sample", "--arch", "compact", "--codebook_size", "32", "--batch_size", "64",
        "--epochs", "2", "--no_wandb", "--log_every", "2", "--kmeans_iters", "2"]
FIGURES = ["epoch_curves", "dimension_curves", "latent_spectrum", "step_perplexity", "code_usage", "reconstructions",
           "psnr_vs_usage", "usage_vs_k", "rate_distortion"]


def figure_cells(nb):
    return [c for c in nb.cells if "figure" in c.metadata.get("tags", [])]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiments")
    procs = [subprocess.Popen([sys.executable, str(ROOT / "train.py"), *TINY, "--quantizer", quantizer,
                               "--out_dir", str(out), "--name", name], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, quantizer in [("vq", "vq_ema"), ("ba", "ba_vq")]]
    for proc in procs:
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, output[-3000:]
    return out


def python_kernel(tmp_path) -> str:
    """A kernelspec that runs this interpreter (a registered 'python3' may point at another python)."""
    spec = tmp_path / "jupyter" / "kernels" / "bavq-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "bavq-test", "language": "python"}))
    return str(tmp_path / "jupyter")


def test_notebook_is_saved_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert len(figure_cells(nb)) == len(FIGURES)


def test_notebook_executes_and_draws_every_figure(two_runs, tmp_path, monkeypatch):
    fig_dir = tmp_path / "figures"
    # two folders joined by os.pathsep, as for several sweeps (a run folder is itself a folder to search)
    monkeypatch.setenv("BAVQ_EXPERIMENTS", os.pathsep.join(str(two_runs / name) for name in ("vq", "ba")))
    monkeypatch.setenv("BAVQ_FIG_DIR", str(fig_dir))
    monkeypatch.delenv("BAVQ_RD_RUN", raising=False)
    monkeypatch.setenv("JUPYTER_PATH", python_kernel(tmp_path))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="bavq-test", resources={"metadata": {"path": str(ROOT)}}).execute()

    outputs = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "2 runs under" in outputs and "ba: operating point" in outputs  # R(D) cell picked the BA run
    for cell in figure_cells(nb):
        assert any("image/png" in o.get("data", {}) for o in cell.outputs), cell.source[:200]
    saved = sorted(p.stem for p in fig_dir.glob("*.png"))
    assert saved == sorted(FIGURES)
