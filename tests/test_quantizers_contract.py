"""Contract test over EVERY registered quantizer (built-ins and third-party alike).

A quantizer not listed in SMALL is built from its Config defaults.
"""
from __future__ import annotations

import math

import pytest
import torch

from core.interfaces import QuantizerOutput
from core.plugins import get_registry

# small configs so the contract runs in milliseconds
SMALL = {
    "vq": {"codebook_size": 16, "code_dim": 8},
    "mcq": {"codes_per_token": 2, "codebook_size": 16, "code_dim": 4},
    "rq": {"codes_per_token": 3, "codebook_size": 16, "code_dim": 8},
    "lfq": {"code_dim": 8},
    "gq": {"codes_per_token": 2, "code_dim": 4},
    "bsq": {"code_dim": 8, "entropy_group_size": 4},
    "fsq": {"levels": [5, 4, 3]},
}
NAMES = get_registry().names("quantizers")
# non-default options of the built-ins, run through the same contract
VARIANTS = [
    ("vq", {"codebook_update": "ema", "kmeans_init": True, "dead_code_threshold": 1.0, "distance": "euclidean"}),
    ("mcq", {"kmeans_init": True, "dead_code_threshold": 0.5}),
    ("rq", {"shared_codebook": True, "l2_normalize": "input", "kmeans_init": True}),
    ("lfq", {"codebook_entropy": "grouped", "entropy_group_size": 4, "bit_order": "big"}),
    ("lfq", {"codebook_entropy": "none"}),
    ("gq", {"codebook_entropy": "per_group", "codebook_entropy_log_eps": 1e-5}),
    ("bsq", {"codebook_entropy": "exact", "bit_order": "little"}),
]
CASES = [(n, {}) for n in NAMES] + [v for v in VARIANTS if v[0] in NAMES]
IDS = [n + "".join(f"-{k}={v}" for k, v in o.items()) for n, o in CASES]


def build(name: str, **over):
    cls = get_registry().get("quantizers", name)
    return cls(cls.Config(type=name, **{**SMALL.get(name, {}), **over}))


def latent(q, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 6, q.cfg.latent_dim, generator=g).to(dtype)


def test_all_builtins_are_covered():
    assert set(SMALL) <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_shapes_and_declared_sizes(name):
    q = build(name)
    out = q(latent(q))
    assert isinstance(out, QuantizerOutput)
    assert out.quantized.shape == (2, 6, q.cfg.latent_dim) and out.quantized.dtype == torch.float32
    assert out.indices.dtype == torch.int64 and out.indices.shape == (2, 6, q.codes_per_token)
    assert len(q.codebook_sizes) == q.codes_per_token
    if q.codes_per_token:
        assert q.bits_per_token == pytest.approx(sum(math.log2(k) for k in q.codebook_sizes))
        sizes = torch.tensor(q.codebook_sizes)
        assert (out.indices >= 0).all() and (out.indices < sizes).all()


@pytest.mark.parametrize("name,over", CASES, ids=IDS)
def test_losses_and_metrics_are_scalar_tensors(name, over):
    q = build(name, **over)
    out = q(latent(q))
    for k, v in out.losses.items():
        assert torch.is_tensor(v) and v.ndim == 0 and v.dtype == torch.float32 and torch.isfinite(v), k
    for k, v in out.metrics.items():
        assert torch.is_tensor(v) and v.ndim == 0 and not v.requires_grad and torch.isfinite(v), k
    assert set(q.loss_weights()) <= set(out.losses)


@pytest.mark.parametrize("name,over", CASES, ids=IDS)
def test_gradients_reach_the_input(name, over):
    q = build(name, **over)
    z = latent(q).requires_grad_(True)
    out = q(z)
    (out.quantized.pow(2).sum() + sum(out.losses.values(), torch.zeros(()))).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


@pytest.mark.parametrize("name,over", CASES, ids=IDS)
def test_round_trip_exact_in_eval(name, over):
    q = build(name, **over)
    if q.codes_per_token == 0:
        pytest.skip("continuous pass-through: no discrete path")
    q(latent(q, seed=1))  # one training step (k-means init / EMA) must not break the round trip
    q.eval()
    with torch.no_grad():
        out = q(latent(q))
        assert torch.equal(q.indices_to_codes(out.indices), out.quantized)


@pytest.mark.parametrize("name", NAMES)
def test_fp32_island_under_autocast(name):
    q = build(name)
    z = latent(q, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z)
    assert out.quantized.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in out.losses.values())
    ref = q(z.float())
    assert torch.equal(out.indices, ref.indices)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_given_seed(name):
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        q = build(name)
        outs.append(q(latent(q)))
    a, b = outs
    assert torch.equal(a.quantized, b.quantized) and torch.equal(a.indices, b.indices)
    assert all(torch.equal(a.losses[k], b.losses[k]) for k in a.losses)


@pytest.mark.parametrize("name", NAMES)
def test_unknown_config_key_is_rejected(name):
    cls = get_registry().get("quantizers", name)
    with pytest.raises(Exception, match="codebok_size"):
        cls.Config(type=name, codebok_size=3)
