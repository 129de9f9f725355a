"""torchrun with 2 gloo processes on CPU equals one process with the same global batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import ROOT, tiny_experiment

RANK_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from safetensors.torch import save_file
    from core import dist
    from core.config import load_experiment
    from core.trainer import train

    dist.setup_from_env()
    exp = load_experiment(sys.argv[1], sys.argv[2:])
    result = train(exp)
    rank = dist.rank()
    save_file({k: v.contiguous() for k, v in result.model.quantizer.state_dict().items()}, f"quantizer_rank{rank}.safetensors")
    if rank == 0:
        json.dump(result.metrics, open("metrics.json", "w"))
    dist.teardown()
""")


def test_two_gloo_ranks_match_single_process(in_tmp):
    cfg = tiny_experiment(**{"train.steps": 6, "train.batch_size": 8})
    cfg["losses"] = [{"type": "pixel"}, {"type": "quantizer"}]
    (in_tmp / "exp.yaml").write_text(yaml.safe_dump(cfg))
    (in_tmp / "rank.py").write_text(RANK_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "rank.py", "exp.yaml", "train.out_dir=ddp"], cwd=in_tmp, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ddp_metrics = json.loads((in_tmp / "metrics.json").read_text())
    q0, q1 = load_file(str(in_tmp / "quantizer_rank0.safetensors")), load_file(str(in_tmp / "quantizer_rank1.safetensors"))
    for k in q0:  # DDP keeps replicas bit-identical
        assert torch.equal(q0[k], q1[k]), k

    single = subprocess.run([sys.executable, "rank.py", "exp.yaml", "train.out_dir=single"], cwd=in_tmp, env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    single_metrics = json.loads((in_tmp / "metrics.json").read_text())
    # same global batch and data order; gradients averaged over ranks equal the single-process mean
    # up to float summation order: PSNR within 0.05 dB, weights within 1e-3
    assert ddp_metrics["psnr"] == pytest.approx(single_metrics["psnr"], abs=0.05)
    a = load_file(str(next((in_tmp / "ddp").glob("*/checkpoints/step_*/model.safetensors"))))
    b = load_file(str(next((in_tmp / "single").glob("*/checkpoints/step_*/model.safetensors"))))
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-3
    assert not list((in_tmp / "ddp").glob("*/checkpoints/.tmp*"))  # only rank 0 wrote, and atomically


@pytest.mark.slow
def test_interrupted_two_rank_run_resumes_with_the_same_world_size(in_tmp):
    """torchrun forwards Ctrl-C to both ranks: rank 0 checkpoints, the same command resumes, and the
    result matches one process trained without interruption."""
    import signal
    import time

    cfg = tiny_experiment(**{"train.steps": 40, "train.ckpt_every": 2, "train.batch_size": 8, "tracking.enabled": True})
    (in_tmp / "exp.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "core.run", "exp.yaml"]
    proc = subprocess.Popen(cmd, cwd=in_tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not list(in_tmp.glob("runs/*/checkpoints/step_00000006")):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    steps = sorted(p.name for p in in_tmp.glob("runs/*/checkpoints/step_*"))
    assert steps and steps[-1] < "step_00000040", steps
    assert subprocess.run(cmd, cwd=in_tmp, env=env, capture_output=True, timeout=300).returncode == 0
    single = subprocess.run([sys.executable, "-m", "core.run", "exp.yaml", "train.out_dir=single", "tracking.enabled=false"],
                            cwd=in_tmp, env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    a = load_file(str(sorted(in_tmp.glob("runs/*/checkpoints/step_*/model.safetensors"))[-1]))
    b = load_file(str(sorted(in_tmp.glob("single/*/checkpoints/step_*/model.safetensors"))[-1]))
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-3
    from mlflow.tracking import MlflowClient

    from core.tracking import resolve_uri

    client = MlflowClient(resolve_uri(None))
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"]
