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
from core.interfaces import Loss, LossConfig, LossResult
from core.plugins import _add, build_registry
from core.trainer import build, lr_factor, train

# ---- 1. the logit scale is clamped in place after every optimizer step ---------------------------


class TugConfig(LossConfig):
    type: Literal["tug"] = "tug"
    up_steps: int = 3


class Tug(Loss):
    """Pulls the logit scale up for ``up_steps`` steps, then down; records the parameter each step
    (read from the model's outputs, which carry the clamped scale when a loss needs text)."""

    Config = TugConfig
    needs = frozenset({"text"})

    def __init__(self, cfg: TugConfig, model: Any = None) -> None:
        super().__init__()
        self.cfg, self.seen = cfg, []

    def forward(self, batch: dict[str, Any], outputs: dict[str, Any], step: int) -> LossResult:
        scale = outputs["logit_scale"]
        self.seen.append(float(scale.detach()))  # the parameter's value (in range: the clamp is the identity)
        sign = -1.0 if step < self.cfg.up_steps else 1.0
        return LossResult({"tug": sign * scale})


def test_logit_scale_pushed_past_the_bound_is_clamped_and_comes_back(in_tmp):
    """AdamW pushes the scale past ln 100 (3 steps), then the loss pulls it down (7 steps). The
    official trainer clamps the parameter after each step and it comes back; a forward-only clamp
    leaves it above the bound with a zero gradient for good."""
    top = math.log(100)
    reg = build_registry()
    _add(reg, "losses", "tug", Tug, "tests", Loss)
    cfg = tiny_experiment(**{"train.steps": 10, "train.optimizer.lr": 0.05, "train.warmup": 0, "train.schedule": "constant",
                             "train.optimizer.betas": [0.5, 0.9], "train.log_every": 5})
    cfg["model"]["text"] = {"width": 32, "depth": 1, "heads": 2, "context_length": 16, "init_logit_scale": top - 0.02}
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


# ---- 4. FSQ with a level of 2 ----------------------------------------------------------------------

from plugins.quantizers.fsq import FSQ, FSQConfig  # noqa: E402


def fsq_reference(z: torch.Tensor, levels: list[int], eps: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 brute force of the paper's bounding: per channel the nearest of its L integers found
    by search. Returns (digits, indices, codes) and the bounded values' distance to a rounding
    boundary (to skip the samples float32 could round the other way)."""
    digits, margin = [], []
    for i, n in enumerate(levels):
        h = (n - 1) * (1 - eps) / 2
        off = 0.5 if n % 2 == 0 else 0.0
        b = torch.tanh(z[..., i].double() + math.tan(off / h)) * h - off
        grid = torch.arange(n, dtype=torch.float64) - n // 2  # the L integers
        dist = (b.unsqueeze(-1) - grid).abs()
        digits.append(dist.argmin(-1))
        margin.append((dist.sort(-1).values[..., 1] - dist.min(-1).values) if n > 1 else torch.full_like(b, 1.0))
    d = torch.stack(digits, -1)
    radix = torch.tensor([math.prod(levels[:i]) for i in range(len(levels))])
    width = torch.tensor([n // 2 for n in levels], dtype=torch.float64)
    return d, (d * radix).sum(-1, keepdim=True), ((d - width) / width).float(), torch.stack(margin, -1).min(-1).values


@pytest.mark.parametrize("levels", [[2, 2, 2, 2], [8, 2, 5]])
def test_fsq_with_a_level_of_two(levels):
    q = FSQ(FSQConfig(levels=levels))
    k = math.prod(levels)
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(4, 512, len(levels), generator=g) * 2).requires_grad_()
    out = q(z)
    assert torch.isfinite(out.quantized).all()
    assert out.indices.min() >= 0 and out.indices.max() < k
    # numbers: the brute-force reference, away from rounding boundaries
    _, idx, codes, margin = fsq_reference(z.detach(), levels)
    keep = margin > 1e-4
    assert keep.float().mean() > 0.99
    assert torch.equal(out.indices[keep], idx[keep])
    assert torch.equal(out.quantized.detach()[keep], codes[keep])
    # straight-through gradient: finite, nonzero where tanh is not saturated
    out.quantized.sum().backward()
    assert torch.isfinite(z.grad).all() and (z.grad.abs() > 1e-3).float().mean() > 0.5
    # every code reachable: per channel a latent for each digit (found by a 1-D search), all combinations
    line = torch.linspace(-6, 6, 4801)
    per_channel = []
    for i, n in enumerate(levels):
        zi = torch.zeros(line.numel(), len(levels))
        zi[:, i] = line
        d = fsq_reference(zi, levels)[0][:, i]
        per_channel.append(torch.stack([line[d == j][(d == j).sum() // 2] for j in range(n)]))
    grid = torch.cartesian_prod(*per_channel).view(1, -1, len(levels))
    hit = q(grid).indices.view(-1)
    digits = torch.cartesian_prod(*[torch.arange(n) for n in levels]).view(-1, len(levels))
    assert torch.equal(hit, (digits * q.radix).sum(-1))
    assert sorted(hit.tolist()) == list(range(k))
    # round trip: indices -> codes -> (a latent bounded onto that code) -> indices
    every = torch.arange(k).view(1, k, 1)
    codes = q.indices_to_codes(every)
    target = codes * q.width + q.offset
    back = q(torch.atanh((target / q.half_range).clamp(-0.9999, 0.9999)) - q.shift)
    assert torch.equal(back.indices, every) and torch.equal(back.quantized, codes)


def test_fsq_level_two_hand_values():
    """L = 2: codes -1 and 0 (digits 0 and 1); the boundary f(z) = -1/2 sits at z = -tan(0.5 / 0.4995)."""
    q = FSQ(FSQConfig(levels=[2]))
    edge = -math.tan(0.5 / 0.4995)
    assert edge == pytest.approx(-1.5608420, abs=1e-6)
    z = torch.tensor([-9.0, edge - 0.01, edge + 0.01, 0.0, 9.0]).view(1, 5, 1)
    out = q(z)
    assert out.indices.view(-1).tolist() == [0, 0, 1, 1, 1]
    assert out.quantized.view(-1).tolist() == [-1.0, -1.0, 0.0, 0.0, 0.0]
    # f(0) = tanh(shift) * h - 1/2 = -0.04268 (hand value), inside code 0's cell
    f0 = math.tanh(-edge) * 0.4995 - 0.5
    assert f0 == pytest.approx(-0.0426794, abs=1e-6)


def test_fsq_atanh_shift_rejects_a_level_of_two():
    cfg = tiny_experiment()
    cfg["model"]["quantizer"] = {"type": "fsq", "levels": [8, 2, 5], "shift": "atanh"}
    from core.errors import ConfigError

    with pytest.raises(ConfigError, match="needs shift: tan") as e:
        validate(cfg)
    assert "\n" not in str(e.value) and "model.quantizer" in str(e.value)
    cfg["model"]["quantizer"]["levels"] = [8, 4, 5]  # atanh is defined for every other level
    q = FSQ(validate(cfg).model.quantizer)
    assert q.shift.tolist() == pytest.approx([math.atanh(0.5 / 3.4965), math.atanh(0.5 / 1.4985), 0.0])


# ---- 14. usage evaluator: two definitions, over the whole eval split ---------------------------------

from plugins.evaluators.usage import Usage, UsageConfig  # noqa: E402
from plugins.quantizers._common import usage_metrics  # noqa: E402


class Replay(torch.nn.Module):
    """A model whose ``encode`` returns prepared indices batch by batch (the image is the batch number)."""

    def __init__(self, batches: list[torch.Tensor], sizes: list[int]) -> None:
        super().__init__()
        self.batches, self.w = batches, torch.nn.Parameter(torch.zeros(1))
        self.quantizer = type("Q", (), {"codebook_sizes": sizes})()

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.batches[int(images.flatten()[0])]


def test_usage_two_definitions_over_the_whole_split():
    """K = 1 codebook of 8 codes, 3 batches of 400 tokens. Batch 0 uses codes 0..3, batch 1 codes
    4..6, batch 2 code 0 except ONE token of code 7 (frequency 1/1200 < 0.01/8 = 1/800)."""
    b0 = torch.arange(4).repeat(100)
    b1 = torch.tensor([4, 5, 6]).repeat(134)[:400]
    b2 = torch.zeros(400, dtype=torch.long)
    b2[17] = 7
    batches = [b.view(1, 400, 1) for b in (b0, b1, b2)]
    loader = [{"image": torch.full((1, 3, 4, 4), float(i))} for i in range(3)]
    out = Usage(UsageConfig()).evaluate(Replay(batches, [8]), loader)
    assert out["usage"] == 100.0  # every code at least once over the split (per batch: 50, 37.5, 25)
    assert out["usage_freq"] == 87.5  # code 7 is below 0.01/K
    assert out["dead_codes"] == 0.0
    counts = torch.bincount(torch.cat([b0, b1, b2]), minlength=8)
    assert counts.tolist() == [100 + 399, 100, 100, 100, 134, 133, 133, 1]
    # usage_freq is the training metric's definition (quant/usage) applied to the split's counts
    assert out["usage_freq"] == pytest.approx(float(usage_metrics(counts.view(1, 8).float())["usage"]))
    p = counts.double() / 1200
    assert out["perplexity"] == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-12)
    assert Usage(UsageConfig(freq_threshold=0.0)).evaluate(Replay(batches, [8]), loader)["usage_freq"] == 100.0
