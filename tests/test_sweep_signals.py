"""Ctrl-C / SIGTERM on a two-worker sweep, with real signals: every running cell writes its checkpoint,
the command prints one line (no traceback) and exits 130, and running it again resumes those cells
from their checkpoints (the same MLflow runs go on: no run is started over)."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from sweep_helpers import cli, write_tiny

SPACE = {"model.quantizer": {"vq16": {"type": "vq", "codebook_size": 16, "code_dim": 4},
                             "mcq2x8": {"type": "mcq", "codes_per_token": 2, "codebook_size": 8, "code_dim": 2}}}


def _checkpoints(tmp_path: Path) -> dict[Path, list[str]]:
    return {p.parent: sorted(c.name for c in (p.parent / "checkpoints").glob("step_*")) for p in (tmp_path / "runs").rglob("config.yaml")}


def _children(tmp_path: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny_sweep")
    return [r for r in client.search_runs([exp.experiment_id], max_results=100) if r.data.tags.get("vtok.sweep") == "child"]


@pytest.mark.parametrize("how", ["ctrl_c", pytest.param("sigterm", marks=pytest.mark.slow)])
def test_signal_on_two_workers_checkpoints_every_running_cell_and_rerun_resumes(tmp_path, how):
    steps = 400
    path = write_tiny(tmp_path, **{"sweep.space": SPACE, "sweep.seeds": [0], "sweep.workers": 2,
                                   "train.steps": steps, "train.log_every": 1000})
    proc = cli([str(path)], tmp_path, start_new_session=True)  # a terminal's job: its own process group
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and len(_checkpoints(tmp_path) if (tmp_path / "runs").exists() else {}) < 2:
        time.sleep(0.2)
    time.sleep(1.5)  # both cells are training
    assert proc.poll() is None, proc.stdout.read()
    t_signal = time.time()
    if how == "ctrl_c":
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does: the whole foreground group
    else:
        os.kill(proc.pid, signal.SIGTERM)  # `kill PID`: the command only
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, out
    assert time.time() - t_signal < 60
    tail = out.split("vtok sweep: trial")[-1].splitlines()[1:]  # what came after the last cell started
    lines = [line for line in tail if line.strip() and "INFO mlflow" not in line]
    assert "Traceback" not in out and len(lines) == 1 and lines[0].startswith("vtok sweep: interrupted"), out
    saved = _checkpoints(tmp_path)
    assert len(saved) == 2 and all(len(c) == 1 and c[0] < f"step_{steps:08d}" for c in saved.values()), saved
    before = {r.data.tags["vtok.cell"]: r.info.run_id for r in _children(tmp_path)}
    assert {r.info.status for r in _children(tmp_path)} == {"KILLED"}

    again = cli([str(path)], tmp_path)
    out2 = again.communicate(timeout=300)[0]
    assert again.returncode == 0, out2
    assert "0 of 2 runs done or under way, 2 to run" in out2
    after = _children(tmp_path)
    assert {r.data.tags["vtok.cell"]: r.info.run_id for r in after} == before  # resumed, not started over
    assert {r.info.status for r in after} == {"FINISHED"}
    for run_dir, ckpts in _checkpoints(tmp_path).items():
        assert saved[run_dir][0] in ckpts and ckpts[-1] == f"step_{steps:08d}"  # the interrupted step, then the end


def _child_pids(pid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(p.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads worker pids from /proc (Linux)")
def test_killing_the_command_stops_its_workers_and_a_rerun_resumes(tmp_path):
    """SIGKILL to the command alone (its workers sit in their own process groups): before, they
    trained on alone; now each gets SIGTERM from the kernel, checkpoints and stops."""
    steps = 400
    path = write_tiny(tmp_path, **{"sweep.space": SPACE, "sweep.seeds": [0], "sweep.workers": 2,
                                   "train.steps": steps, "train.log_every": 1000})
    proc = cli([str(path)], tmp_path, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and len(_checkpoints(tmp_path) if (tmp_path / "runs").exists() else {}) < 2:
        time.sleep(0.2)
    time.sleep(1.5)
    assert proc.poll() is None, proc.stdout.read()
    workers = [p for p in _child_pids(proc.pid) if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()]
    assert len(workers) == 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    deadline = time.time() + 60
    while time.time() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.2)
    assert not any(_alive(p) for p in workers), "workers outlived their command"
    saved = _checkpoints(tmp_path)
    assert len(saved) == 2 and all(len(c) == 1 and c[0] < f"step_{steps:08d}" for c in saved.values()), saved

    again = cli([str(path)], tmp_path)
    out2 = again.communicate(timeout=300)[0]
    assert again.returncode == 0, out2
    assert "0 of 2 runs done or under way, 2 to run" in out2
    for run_dir, ckpts in _checkpoints(tmp_path).items():
        assert saved[run_dir][0] in ckpts and ckpts[-1] == f"step_{steps:08d}"
