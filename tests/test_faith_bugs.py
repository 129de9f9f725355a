"""Bugs found by running vtok beside the papers' public code (issue 11, items 1, 2, 4, 14).

Each test here failed on the code before its fix.
"""
from __future__ import annotations

import math
from typing import Any, Literal

import pytest
import torch

from conftest import tiny_experiment
from core.config import TrainConfig, validate
from core.interfaces import Loss, LossConfig
from core.plugins import _add, build_registry
from core.trainer import build, lr_factor, train

# ---- 1. the logit scale is clamped in place after every optimizer step ---------------------------


class TugConfig(LossConfig):
    type: Literal["tug"] = "tug"
    up_steps: int = 3


class Tug(Loss):
    """Pulls the logit scale up for ``up_steps`` steps, then down; records the parameter each step."""

    Config = TugConfig

    def __init__(self, cfg: TugConfig, model: Any = None) -> None:
        super().__init__()
        self.cfg, self._model, self.seen = cfg, (model,), []

    def forward(self, batch: dict[str, Any], outputs: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        model = self._model[0]
        self.seen.append(float(model.logit_scale.detach()))
        sign = -1.0 if step < self.cfg.up_steps else 1.0
        return {"tug": sign * model.clamped_logit_scale()}


def test_logit_scale_pushed_past_the_bound_is_clamped_and_comes_back(in_tmp):
    """AdamW pushes the scale past ln 100 (3 steps), then the loss pulls it down (7 steps). The
    official trainer clamps the parameter after each step and it comes back; a forward-only clamp
    leaves it above the bound with a zero gradient for good."""
    top = math.log(100)
    reg = build_registry()
    _add(reg, "losses", "tug", Tug, "tests", Loss)
    cfg = tiny_experiment(**{"train.steps": 10, "train.lr": 0.05, "train.warmup": 0, "train.schedule": "constant",
                             "train.betas": [0.5, 0.9], "train.log_every": 5})
    cfg["model"]["text"] = {"width": 32, "layers": 1, "heads": 2, "context_length": 16, "init_logit_scale": top - 0.02}
    cfg["losses"] = [{"type": "pixel"}, {"type": "tug", "up_steps": 3}]
    exp = validate(cfg, reg)
    built = build(exp, reg)
    tug = next(loss for loss in built.losses if isinstance(loss, Tug))
    result = train(exp, reg, built=built)
    seen = tug.seen + [float(result.model.logit_scale.detach())]
    assert seen[0] == pytest.approx(top - 0.02)
    assert max(seen) <= top + 1e-6, seen  # never above the bound after a step
    assert seen[3] == pytest.approx(top, abs=1e-6)  # three steps up: held at the bound
    assert seen[-1] < top - 0.05, seen  # pulled down, it leaves the bound again
    assert all(b < a for a, b in zip(seen[4:], seen[5:])), seen


# ---- 2. warm-up never exceeds the peak learning rate -----------------------------------------------


def test_warmup_factor_never_exceeds_one():
    """(s + 1) / w overshoots 1 when w = warmup * steps is not an integer (2x the peak LR at step 0
    for 50 steps with 1% warm-up)."""
    for schedule in ("cosine", "constant"):
        for steps in (1, 2, 3, 5, 7, 10, 33, 50, 64, 99, 100, 333, 1000):
            for warmup in (0, 0.001, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.07, 0.1, 0.25, 0.33, 0.5, 0.99,
                           1, 1.5, 2, 2.5, 3.7, 10, 12.25):
                cfg = TrainConfig(steps=steps, warmup=warmup, schedule=schedule, min_lr_ratio=0.1)
                f = [lr_factor(s, cfg) for s in range(steps)]
                assert max(f) <= 1.0, (schedule, steps, warmup, max(f))
                assert min(f) > 0
                warm = warmup * steps if warmup < 1 else warmup
                if warm > 0:  # hand value at step 0, and the ramp only rises
                    assert f[0] == pytest.approx(min(1.0, 1 / warm))
                    ramp = f[: math.ceil(warm)]
                    assert all(b >= a for a, b in zip(ramp, ramp[1:]))
    assert lr_factor(0, TrainConfig(steps=50, warmup=0.01)) == 1.0


def test_loss_weight_warmup_never_exceeds_the_weight():
    from plugins.losses.pixel import PixelLoss

    for warmup_steps in range(0, 12):
        for start in (0, 3):
            loss = PixelLoss(PixelLoss.Config(weight=0.7, start_step=start, warmup_steps=warmup_steps))
            w = [loss.schedule(s) for s in range(40)]
            assert max(w) == pytest.approx(0.7) and all(0 <= x <= 0.7 for x in w)
            assert w[:start] == [0.0] * start
