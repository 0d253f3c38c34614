"""tools/gpu_check.py, the script a GPU machine runs first, checked on the CPU in its quick mode: it runs its steps,
times two epochs from the run's records, and writes its JSON and Markdown section."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_check_on_the_cpu_times_epochs_and_writes_its_section(tmp_path):
    proc = subprocess.run([sys.executable, "tools/gpu_check.py", "--device", "cpu", "--quick", "--steps",
                           "machine,epochs", "--out", str(tmp_path), "--no_append"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["machine"]["torch"] and set(result) >= {"machine", "epochs"} and "bench" not in result
    (run,) = result["epochs"].values()
    assert run["exit_code"] == 0 and len(run["epoch_s"]) == 2 and all(s > 0 for s in run["epoch_s"])
    section = (tmp_path / "gpu_check.md").read_text()
    assert section.startswith("## GPU check") and f"| {run['epoch_s'][1]} |" in section
    assert "$ " in (tmp_path / "gpu_check.log").read_text()  # every command is logged with its output
