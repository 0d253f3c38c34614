"""tools/gpu_check.py, the first command on a GPU machine, checked on the CPU: its quick mode runs the whole plan end to
end (every stage in a process group of its own, within its budget, reporting on stdout), writes the JSON and the
table; the plan fits one call; a stage past its budget is stopped with its whole group and keeps what it reported."""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from helpers import load_tool

ROOT = Path(__file__).resolve().parents[1]
gpu_check = load_tool("gpu_check")


def test_the_quick_plan_runs_every_stage_and_writes_its_json_and_table(tmp_path):
    proc = subprocess.run([sys.executable, "tools/gpu_check.py", "--device", "cpu", "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert proc.returncode == 0, json.dumps(result["stages"], indent=1)[-4000:]
    stages = result["stages"]
    assert list(stages) == list(gpu_check.PLAN)
    assert all(s["status"] == "ok" and s["seconds"] <= s["budget_s"] for s in stages.values())
    assert stages["data"]["train"] == gpu_check.QUICK["train_images"]
    assert list(stages["tests"]["tests"].values()) == ["passed"]
    assert stages["epochs"]["runs"]["vq_ema, --compile"]["compiled"] is True
    assert all(len(r["epoch_s"]) == 1 and r["epoch_s"][0] > 0 for r in stages["epochs"]["runs"].values())
    from test_host_syncs import KNOWN  # the CPU proxy gives the figures the suite pins
    assert stages["syncs"]["per_step"] == {q: KNOWN.get(q, 0) for q in stages["syncs"]["per_step"]}
    assert gpu_check.KNOWN_SYNCS == KNOWN
    assert stages["jobs"]["equal"] is True and stages["ba65k"]["steps"]["ba"]["ms_per_step"] > 0
    table = result["table"]
    assert not [r for r in table if r["status"] in ("fail", "not run")], table
    assert {r["status"] for r in table} <= {"pass", "info", "n/a", "n/a (quick)"}
    section = (tmp_path / "gpu_check.md").read_text()
    assert all(f"| {r['goal']} | {r['target']} | {r['measured']} | {r['status']} |" in section for r in table)
    assert proc.stdout.rstrip().endswith(section.rstrip())  # the table printed at the end


def test_the_plan_fits_one_call_and_the_docstring_states_each_budget():
    assert sum(gpu_check.PLAN.values()) <= gpu_check.CALL_LIMIT_S == 480
    for name, budget in gpu_check.BUDGETS.items():
        assert re.search(rf"^ +(--stage )?{name} +{budget} ", gpu_check.__doc__, re.M), name
    assert re.search(rf"^ +{sum(gpu_check.PLAN.values())} +in all", gpu_check.__doc__, re.M)


def test_a_stage_past_its_budget_is_stopped_with_its_whole_group_and_keeps_its_results(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "KILL_GRACE_S", 0.3)
    out = tmp_path / "stage.out"
    script = ("trap '' TERM; sleep 60 & echo $! > child.pid; echo 'RESULT {\"rows\": {\"a\": 1}}'; echo noise >&2;"
              " echo 'RESULT {\"rows\": {\"b\": 2}}'; printf 'RESULT {\"cut'; while :; do sleep 0.1; done")
    with open(out, "w") as fh:
        proc = subprocess.Popen(["bash", "-c", script], cwd=tmp_path, stdout=fh, start_new_session=True)
        while '{"cut' not in out.read_text():  # it has reported; it and its child ignore SIGTERM: SIGKILL it is
            time.sleep(0.02)
        t0 = time.monotonic()
        assert gpu_check.wait_group(proc.pid, 0.6) is None  # cut
    assert time.monotonic() - t0 < 0.6 + 2.5
    child = int((tmp_path / "child.pid").read_text())
    assert not _running(proc.pid) and not _running(child)  # the stage and what it started
    assert gpu_check.read_results(out.read_text()) == {"rows": {"a": 1, "b": 2}}  # the cut line is skipped


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie has ended, waiting only to be reaped
