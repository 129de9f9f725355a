"""Resume is exact in every shipped experiment: the first cell of each, interrupted (a Ctrl-C after
a few steps) and resumed, ends with the same weights as the same cell run without interruption.

The quick start runs by default (its dead-code restart draws from torch's global stream, which
resuming used to shift by one draw); every other experiment is ``-m slow``. Also: every random
state a run draws from (torch, numpy, Python, generators held by plugins) round-trips through a
checkpoint.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import tiny_experiment
from core import sweep, trainer
from core.checkpoint import capture_rng, load_checkpoint, plugin_generators, restore_rng, save_checkpoint
from core.config import apply_overrides, read_yaml, validate
from core.trainer import train
from test_trainer import StopAfter

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted((ROOT / "experiments").glob("*.yaml"))


def first_cell(path: Path, out: Path, steps: int) -> dict:
    """The experiment's first sweep cell (or the experiment itself) at ``steps`` steps, small batches,
    no evaluation, no tracking."""
    raw = read_yaml(path)
    over = [f"train.steps={steps}", "train.batch_size=8", "train.eval_size=8", "train.eval_batch_size=8", "train.eval_every=0",
            "train.ckpt_every=0", "train.progress=false", "tracking.enabled=false", f"train.out_dir={out}", "eval=[]"]
    raw = apply_overrides(raw, over)
    if raw.get("sweep"):
        sw = sweep.parse_sweep(validate(raw).sweep)
        choices = sweep.grid_points(sw)[0] if sw.sampler == "grid" else sweep.check_all(raw, sw)[0].choices
        raw = sweep.compose(raw, sw, choices, sw.seeds[0])
    raw.pop("sweep", None)
    raw.pop("paper", None)
    return raw


def weights(result) -> dict[str, torch.Tensor]:
    from core.checkpoint import list_checkpoints
    from safetensors.torch import load_file

    return load_file(str(list_checkpoints(result.run_dir)[-1] / "model.safetensors"))


def interrupted_equals_uninterrupted(raw: dict, monkeypatch, stop_after: int) -> None:
    full = train(validate({**raw, "train": {**raw["train"], "out_dir": str(Path(raw["train"]["out_dir"]) / "a")}}))
    exp = validate({**raw, "train": {**raw["train"], "out_dir": str(Path(raw["train"]["out_dir"]) / "b")}})
    with monkeypatch.context() as m:
        m.setattr(trainer, "StopFlag", StopAfter(stop_after))
        with pytest.raises(KeyboardInterrupt):
            train(exp)
    resumed = train(exp)
    a, b = weights(full), weights(resumed)
    assert a.keys() == b.keys()
    differ = {k: (a[k].double() - b[k].double()).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    assert not differ, f"weights differ after resume: {dict(list(differ.items())[:5])}"


def test_quickstart_interrupted_and_resumed_equals_uninterrupted(in_tmp, monkeypatch):
    # 10 steps at the quick start's own batch; a fast-forgetting usage count so that dead codes
    # are restarted after the resume point (at usage_decay 0.99 the first restarts come near step 130)
    raw = first_cell(ROOT / "experiments" / "quickstart.yaml", in_tmp / "runs", steps=10)
    raw["train"]["batch_size"] = 32
    raw["model"]["quantizer"]["usage_decay"] = 0.5
    interrupted_equals_uninterrupted(raw, monkeypatch, stop_after=4)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """runs/clip_teacher for the experiments that distil from vtok's own CLIP (2 steps)."""
    d = tmp_path_factory.mktemp("teacher")
    raw = first_cell(ROOT / "experiments" / "clip_teacher.yaml", d / "t", steps=2)
    result = train(validate(raw))
    return result.run_dir.resolve()


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in FILES if p.stem != "quickstart"], ids=lambda p: p.stem)
def test_first_cell_interrupted_and_resumed_equals_uninterrupted(path, in_tmp, monkeypatch, teacher_dir):
    (in_tmp / "runs").mkdir()
    (in_tmp / "runs" / "clip_teacher").symlink_to(teacher_dir)
    monkeypatch.setenv("VTOK_CACHE", str(in_tmp / "cache"))
    raw = first_cell(path, in_tmp / "out", steps=5)
    interrupted_equals_uninterrupted(raw, monkeypatch, stop_after=2)


# ---- the random states themselves -------------------------------------------------------------------


class HoldsGenerator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.lin.gen = torch.Generator().manual_seed(7)


def draws(mod: HoldsGenerator) -> list:
    return [torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random(), random.gauss(0, 1),
            torch.rand(3, generator=mod.lin.gen).tolist()]


def test_every_random_state_round_trips_through_a_checkpoint(tmp_path):
    mod = HoldsGenerator()
    gens = plugin_generators(mod)
    assert list(gens) == ["0.lin.gen"]
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    torch.rand(5, generator=mod.lin.gen)
    ckpt = save_checkpoint(tmp_path, 1, {"w": torch.zeros(1)}, {}, {}, generators=gens)
    expected = draws(mod)
    torch.manual_seed(11), np.random.seed(12), random.seed(13), mod.lin.gen.manual_seed(14)
    restore_rng(load_checkpoint(ckpt)["rng"], gens)
    assert draws(mod) == expected


def test_rng_capture_is_json_and_safetensors_only():
    tensors, plain = capture_rng({"g": torch.Generator()})
    assert all(torch.is_tensor(v) for v in tensors.values())
    import json

    json.dumps(plain)
    assert {"torch", "numpy", "python", "gen.g"} <= set(tensors)


def test_resume_from_another_architecture_is_one_config_error(in_tmp, monkeypatch):
    from core.errors import ConfigError

    cfg = tiny_experiment(**{"train.steps": 4})
    first = train(validate(cfg))
    from core.checkpoint import list_checkpoints

    ckpt = list_checkpoints(first.run_dir)[-1]
    other = tiny_experiment(**{"train.steps": 4, "model.quantizer.codebook_size": 64, "train.resume": str(ckpt), "train.out_dir": "other"})
    with pytest.raises(ConfigError, match=r"train.resume: .* was written by a different model: model.quantizer.codebook has shape \(1, 32, 8\) \(torch.float32\), this model needs \(1, 64, 8\)"):
        train(validate(other))
    assert not (in_tmp / "other").exists()
