"""Never lose a run's work: SIGKILL + resume, damaged checkpoints, interrupted MLflow runs, bf16."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import ROOT, tiny_experiment
from core import trainer
from core.checkpoint import find_latest, list_checkpoints
from core.config import validate
from core.rundir import run_dir_for
from core.tracking import resolve_uri
from core.trainer import train
from test_trainer import StopAfter, final_weights


def test_sigkill_at_a_random_step_then_resume_equals_uninterrupted(in_tmp):
    steps = 14
    cfg = tiny_experiment(**{"train.steps": steps, "train.ckpt_every": 1, "train.keep_checkpoints": 2, "tracking.enabled": True})
    (in_tmp / "exp.yaml").write_text(yaml.safe_dump(cfg))
    kill_after = random.Random().randint(2, steps - 3)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "core.run", "exp.yaml"]
    proc = subprocess.Popen(cmd, cwd=in_tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    run_dir = in_tmp / run_dir_for(validate(cfg))
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        done = [int(p.name.split("_")[1]) for p in list_checkpoints(run_dir)]
        if done and max(done) >= kill_after:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"finished before the kill: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(int(p.name.split("_")[1]) for p in list_checkpoints(run_dir))
    assert killed_at < steps, f"killed too late (step {killed_at})"
    resumed = subprocess.run(cmd, cwd=in_tmp, env=env, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    # the reference in the same kind of process (thread count changes float summation order)
    ref = subprocess.run(cmd + ["train.out_dir=uninterrupted", "tracking.enabled=false"], cwd=in_tmp, env=env, capture_output=True, text=True, timeout=240)
    assert ref.returncode == 0, ref.stderr[-2000:]
    a = load_file(str(list_checkpoints(run_dir)[-1] / "model.safetensors"))
    b = load_file(str(list_checkpoints(in_tmp / "uninterrupted" / run_dir.name)[-1] / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a), f"weights differ after SIGKILL at checkpoint {killed_at}"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(resolve_uri(None))
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"]  # the killed run was resumed, not duplicated


def test_damaged_checkpoint_falls_back_to_the_previous_one(in_tmp, monkeypatch, capsys):
    cfg = tiny_experiment(**{"train.steps": 8, "train.ckpt_every": 2, "train.keep_checkpoints": 3})
    reference = train(validate({**cfg, "train": {**cfg["train"], "out_dir": "ref"}}))
    exp = validate(cfg)
    monkeypatch.setattr(trainer, "StopFlag", StopAfter(5))
    with pytest.raises(KeyboardInterrupt):
        train(exp)
    monkeypatch.undo()
    monkeypatch.chdir(in_tmp)
    ckpts = list_checkpoints(run_dir_for(exp))
    assert [p.name for p in ckpts] == ["step_00000002", "step_00000004", "step_00000005"]
    bad = ckpts[-1] / "model.safetensors"
    data = bytearray(bad.read_bytes())
    data[-10] ^= 0xFF  # one flipped bit in the weights
    bad.write_bytes(bytes(data))
    assert find_latest(run_dir_for(exp)) == ckpts[1]
    assert f"{ckpts[-1]} is damaged (model.safetensors checksum mismatch)" in capsys.readouterr().err
    (ckpts[1] / "optim.safetensors").write_bytes(b"truncated")  # and the next one truncated
    assert find_latest(run_dir_for(exp)) == ckpts[0]
    resumed = train(exp)
    a, b = final_weights(resumed), final_weights(reference)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_interrupted_run_is_marked_killed_not_running(in_tmp, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setattr(trainer, "StopFlag", StopAfter(2))
    with pytest.raises(KeyboardInterrupt):
        train(validate(tiny_experiment(**{"tracking.enabled": True})))
    client = MlflowClient(resolve_uri(None))
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert [r.info.status for r in runs] == ["KILLED"]


def test_bf16_autocast_trains_with_fp32_quantizer(in_tmp):
    exp = validate(tiny_experiment(**{"train.precision": "bf16", "train.steps": 3}))
    seen = {}
    built = trainer.build(exp)
    built.model.quantizer.register_forward_hook(lambda m, i, o: seen.update(dtype=o.quantized.dtype, z=i[0].dtype))
    result = train(exp, built=built)
    assert seen == {"dtype": torch.float32, "z": torch.float32}
    assert torch.isfinite(torch.tensor(result.metrics["psnr"]))
