"""Contract over EVERY registered evaluator: on a tiny real model (conv encoder / VQ / conv decoder
with a text tower) and a 32-image shapes eval split, ``evaluate`` (through the trainer's
``core.trainer.evaluate``) returns a non-empty ``{name: float}`` with every value finite, and the
evaluator uses only the declared model surface (core.interfaces.TextTokenizerModel): run on the
model wrapped so that any other member raises ``AttributeError`` (tests/surface_helpers.py
``Strict``), it gives the same numbers (a plugin that silently falls back when a member is hidden
would differ).

CONTRACT holds each evaluator's small test config; a newly registered evaluator without an entry
fails ``test_contract_table_covers_the_registry``.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import pytest
import torch

from core.config import validate
from core.evaluation import run_evaluators
from core.plugins import get_registry
from core.trainer import build, evaluate
from surface_helpers import Strict

REG = get_registry()
REFNET = {"extractor": "reference", "reference": {"width": 8, "steps": 2, "batch_size": 16}}


def _alexnet(tmp) -> dict:
    import torchvision

    path = tmp / "alexnet.pth"
    sd = torchvision.models.alexnet(weights=None).state_dict()
    torch.save({k: v for k, v in sd.items() if k.startswith("features.")}, path)
    return {"net": "alex", "weights": str(path)}


# evaluator type -> (tmp dir -> config without "type")
CONTRACT: dict[str, Callable[[Any], dict]] = {
    "psnr_ssim": lambda t: {"baseline": True},
    "usage": lambda t: {},
    "linear_probe": lambda t: {"max_iter": 50},
    "zero_shot": lambda t: {"attributes": ["colour"]},
    "lpips": _alexnet,
    "fd": lambda t: {**REFNET, "cache_dir": str(t)},
    "generation": lambda t: {"width": 16, "depth": 1, "heads": 2, "steps": 3, "batch_size": 8, "n_samples": 8,
                             "grid_per_class": 1, "train_images": 16, "sample_batch_size": 8, "cache_dir": str(t), **REFNET},
}


def test_contract_table_covers_the_registry():
    assert set(CONTRACT) == set(REG.names("evaluators")), "add the new evaluator to CONTRACT"


@pytest.fixture(scope="module")
def tiny_model_and_eval_set():
    exp = validate({
        "name": "eval_contract", "seed": 0,
        "data": {"type": "shapes", "image_size": 16, "train_size": 32},
        "model": {"encoder": {"type": "conv", "width": 8, "downsample": 4},
                  "quantizer": {"type": "vq", "codebook_size": 32, "code_dim": 8},
                  "decoder": {"type": "conv", "width": 8},
                  "text": {"width": 32, "depth": 1, "heads": 2, "context_length": 16}},
        "losses": [{"type": "pixel"}], "tracking": {"enabled": False}})
    built = build(exp)
    return built.model.eval(), built.eval_set


@pytest.mark.parametrize("name", REG.names("evaluators"))
def test_evaluator_returns_finite_floats_on_a_tiny_model(name, tmp_path, tiny_model_and_eval_set, monkeypatch):
    if name not in CONTRACT:
        pytest.fail(f"evaluator {name!r} has no CONTRACT entry")
    monkeypatch.chdir(tmp_path)
    model, eval_set = tiny_model_and_eval_set
    loader = torch.utils.data.DataLoader(eval_set, batch_size=16)
    assert len(eval_set) == 32
    cls = REG.get("evaluators", name)
    cfg = cls.Config(type=name, **CONTRACT[name](tmp_path))
    torch.manual_seed(0)
    metrics = evaluate(model, [cls(cfg)], loader, contextlib.nullcontext)
    torch.manual_seed(0)
    strict = run_evaluators(Strict.model(model), [cls(cfg)], loader)
    assert strict == pytest.approx(metrics, rel=1e-6, abs=1e-9), "differs when only the declared model surface is visible"
    assert metrics, f"{name} returned no metric"
    for k, v in metrics.items():
        assert isinstance(k, str) and isinstance(v, (float, int)) and not isinstance(v, bool), (k, type(v))
        assert math.isfinite(v), (k, v)
    assert not model.training  # the trainer's evaluate restores the mode it found
