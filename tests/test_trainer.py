"""Trainer: deterministic resume, MLflow records, FAILED runs, non-finite handling, schedules."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_experiment
from core import trainer
from core.checkpoint import list_checkpoints
from core.config import validate
from core.rundir import run_dir_for
from core.tracking import resolve_uri
from core.trainer import lr_factor, train


def final_weights(result):
    return load_file(str(list_checkpoints(result.run_dir)[-1] / "model.safetensors"))


class StopAfter:
    """Stands in for trainer.StopFlag: reports a Ctrl-C after ``n`` steps."""

    def __init__(self, n):
        self.n, self.checks = n, 0

    def __call__(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *a):
        pass

    @property
    def stop(self):
        self.checks += 1
        return self.checks >= self.n


def test_interrupted_and_resumed_run_equals_uninterrupted(in_tmp, monkeypatch):
    cfg = tiny_experiment(**{"train.steps": 8, "train.ckpt_every": 100})
    full = train(validate({**cfg, "train": {**cfg["train"], "out_dir": "a"}}))
    monkeypatch.setattr(trainer, "StopFlag", StopAfter(3))
    exp_b = validate({**cfg, "train": {**cfg["train"], "out_dir": "b"}})
    with pytest.raises(KeyboardInterrupt):
        train(exp_b)
    assert [p.name for p in list_checkpoints(run_dir_for(exp_b))] == ["step_00000003"]
    monkeypatch.undo()
    monkeypatch.chdir(in_tmp)
    resumed = train(exp_b)
    a, b = final_weights(full), final_weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.metrics == pytest.approx(full.metrics)


def test_completed_run_is_not_repeated(in_tmp, capsys):
    exp = validate(tiny_experiment(**{"train.steps": 2}))
    first = train(exp)
    again = train(exp)
    assert again.metrics == first.metrics and "already complete" in capsys.readouterr().err


def test_mlflow_records_params_metrics_image_and_status(in_tmp):
    from mlflow.tracking import MlflowClient

    exp = validate(tiny_experiment(**{"tracking.enabled": True, "train.steps": 4}))
    result = train(exp)
    client = MlflowClient(resolve_uri(None))
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.quantizer.codebook_size"] == "32"
    assert run.data.params["losses.0.type"] == "pixel"
    assert {"psnr", "ssim", "loss/total", "loss/pixel/l2", "loss_w/pixel/l1", "quant/usage", "train/images_per_s"} <= set(run.data.metrics)
    assert len(client.get_metric_history(result.run_id, "loss/total")) == 2  # log_every=2 over 4 steps
    assert run.data.tags["vtok.config_hash"] and run.data.tags["vtok.experiment"] == "tiny"
    arts = [a.path for a in client.list_artifacts(result.run_id)]
    assert "config.yaml" in arts and "reconstructions" in arts
    assert any(a.path.endswith(".png") for a in client.list_artifacts(result.run_id, "reconstructions"))


def _nan_at(step_nan):
    from plugins.losses.pixel import PixelLoss

    orig = PixelLoss.forward

    def forward(self, batch, outputs, step):
        out = orig(self, batch, outputs, step)
        if step == step_nan:
            out.terms["l2"] = out.terms["l2"] * float("nan")
        return out
    return forward


def test_crash_marks_run_failed(in_tmp, monkeypatch):
    from mlflow.tracking import MlflowClient

    from plugins.losses.pixel import PixelLoss

    def boom(self, batch, outputs, step):
        raise RuntimeError("boom")
    monkeypatch.setattr(PixelLoss, "forward", boom)
    with pytest.raises(RuntimeError, match="boom"):
        train(validate(tiny_experiment(**{"tracking.enabled": True})))
    client = MlflowClient(resolve_uri(None))
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_nonfinite_stop_and_skip(in_tmp, monkeypatch):
    from plugins.losses.pixel import PixelLoss

    monkeypatch.setattr(PixelLoss, "forward", _nan_at(3))
    with pytest.raises(trainer.NonFiniteLoss, match="step 3"):
        train(validate(tiny_experiment(**{"train.on_nonfinite": "stop", "train.ckpt_every": 2})))
    ckpts = list_checkpoints(run_dir_for(validate(tiny_experiment(**{"train.on_nonfinite": "stop", "train.ckpt_every": 2}))))
    assert [p.name for p in ckpts] == ["step_00000002"]
    result = train(validate(tiny_experiment(**{"train.on_nonfinite": "skip"})))
    assert result.metrics["skipped_steps"] == 1 and math.isfinite(result.metrics["psnr"])


def test_lr_schedule_warmup_then_cosine_to_floor():
    cfg = validate(tiny_experiment(**{"train.steps": 100, "train.warmup": 0.1, "train.min_lr_ratio": 0.1})).train
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(55, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(100, cfg) == pytest.approx(0.1)


def test_no_weight_decay_on_1d_params():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    decay, no_decay = trainer.param_groups([model], set(), 0.02)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3])]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def test_quickstart_shortened_records_an_mlflow_run(in_tmp, capsys):
    from mlflow.tracking import MlflowClient

    from conftest import ROOT
    from core.run import main

    code = main([str(ROOT / "experiments" / "quickstart.yaml"), "train.steps=4", "train.eval_size=32",
                 "train.progress=false", "data.train_size=256"])
    out = capsys.readouterr().out
    assert code == 0 and "psnr:" in out and "psnr_mean_image:" in out
    client = MlflowClient(resolve_uri(None))
    (run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["model.quantizer.type"] == "vq"
    assert {"psnr", "psnr_mean_image", "loss/total", "usage"} <= set(run.data.metrics)
    assert [a.path for a in client.list_artifacts(run.info.run_id, "reconstructions")]


def test_optimizer_build_is_fused_adamw_equal_to_the_per_tensor_loop():
    """OptimizerConfig.build uses torch's fused AdamW; five steps of it equal the per-tensor loop
    with the same groups to float32 rounding (a few ulp), weight decay per group included."""
    from core.interfaces import OptimizerConfig

    o = OptimizerConfig(lr=1e-2, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1)
    torch.manual_seed(0)
    start = [torch.randn(300, 16), torch.randn(16)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(5)]
    out = []
    for make in (lambda g: o.build(g), lambda g: torch.optim.AdamW(g, lr=o.lr, betas=o.betas, eps=o.eps, foreach=False)):
        ps = [torch.nn.Parameter(p.clone()) for p in start]
        opt = make([{"params": ps[:1], "weight_decay": o.weight_decay}, {"params": ps[1:], "weight_decay": 0.0}])
        for g in grads:
            for p, gg in zip(ps, g):
                p.grad = gg.clone()
            opt.step()
        out.append((opt, ps))
    assert out[0][0].defaults["fused"] is True
    for a, b, p0 in zip(out[0][1], out[1][1], start):
        assert not torch.equal(a, p0)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
