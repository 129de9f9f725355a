"""The MLflow UI's view of a sweep: ``mlflow server`` over the sweep's SQLite store on 127.0.0.1 serves
the parent run and its children, with the cells' choices as params and their metrics, through the
REST API the UI's compare view reads."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from sweep_helpers import free_port, run_sweep, write_tiny


def _post(base: str, endpoint: str, body: dict) -> dict:
    req = urllib.request.Request(f"{base}/api/2.0/mlflow/{endpoint}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _get(base: str, endpoint: str) -> dict:
    with urllib.request.urlopen(f"{base}/api/2.0/mlflow/{endpoint}", timeout=30) as r:
        return json.loads(r.read())


def _wait_up(base: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {proc.stdout.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise TimeoutError("mlflow server did not start")


def test_mlflow_server_serves_parent_and_children_with_params_and_metrics(tmp_path):
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    if not mlflow_bin.is_file() and shutil.which("mlflow") is None:
        pytest.skip("the mlflow command is not installed")
    space = {"model.quantizer": {"vq16": {"type": "vq", "codebook_size": 16, "code_dim": 4},
                                 "mcq2x8": {"type": "mcq", "codes_per_token": 2, "codebook_size": 8, "code_dim": 2}}}
    path = write_tiny(tmp_path, **{"sweep.space": space, "train.steps": 2})
    assert run_sweep(path) == 0

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [str(mlflow_bin) if mlflow_bin.is_file() else "mlflow", "server", "--backend-store-uri",
           f"sqlite:///{tmp_path / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "MLFLOW_TRACKING_URI": ""}, start_new_session=True)
    try:
        _wait_up(base, proc)
        exp_id = _get(base, "experiments/get-by-name?experiment_name=tiny_sweep")["experiment"]["experiment_id"]
        parents = _post(base, "runs/search", {"experiment_ids": [exp_id], "filter": "tags.`vtok.sweep` = 'parent'"})["runs"]
        assert len(parents) == 1
        parent = parents[0]
        ptags = {t["key"]: t["value"] for t in parent["data"]["tags"]}
        assert ptags["vtok.study"].startswith("tiny_sweep-") and ptags["vtok.storage"].endswith("journal.log")
        assert parent["info"]["status"] == "FINISHED"
        pid = parent["info"]["run_id"]
        children = _post(base, "runs/search", {"experiment_ids": [exp_id],
                                               "filter": f"tags.mlflow.parentRunId = '{pid}'"})["runs"]
        assert len(children) == 4  # 2 cells x 2 seeds
        seen = set()
        for run in children:
            params = {p["key"]: p["value"] for p in run["data"]["params"]}
            tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
            metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
            assert params["sweep.model.quantizer"] == tags["sweep.model.quantizer"] == tags["vtok.cell"]
            assert params["model.quantizer.type"] == {"vq16": "vq", "mcq2x8": "mcq"}[tags["vtok.cell"]]
            assert metrics["psnr"] > 0 and run["info"]["status"] == "FINISHED"
            seen.add((tags["vtok.cell"], params["seed"]))
        assert seen == {("vq16", "0"), ("vq16", "1"), ("mcq2x8", "0"), ("mcq2x8", "1")}
    finally:
        os.killpg(proc.pid, 15)  # the server and its gunicorn/uvicorn workers (our own process group)
        proc.wait(timeout=60)
