"""A directory tracking store (``tracking.uri=file:DIR`` or a plain path) records a run.

MLflow 3 refuses its file store unless ``MLFLOW_ALLOW_FILE_STORE`` is set; vtok documents the
directory store as accepted, so it opts in for the user (this test failed with MLflow's
"maintenance mode" exception before)."""
from __future__ import annotations

import pytest

from conftest import tiny_experiment
from core.config import validate
from core.trainer import train


@pytest.mark.parametrize("form", ["file:{}", "{}"])
def test_a_directory_store_records_a_finished_run(in_tmp, monkeypatch, form):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    store = in_tmp / "mlruns"
    uri = form.format(store)
    exp = validate(tiny_experiment(**{"tracking.enabled": True, "tracking.uri": uri, "train.steps": 2}))
    result = train(exp)
    run = MlflowClient(tracking_uri=uri).get_run(result.run_id)
    assert run.info.status == "FINISHED" and "psnr" in run.data.metrics
    assert store.is_dir()
