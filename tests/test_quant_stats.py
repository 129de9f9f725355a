"""Quantizer.encode is a pure lookup; usage statistics are local, sum-reducible and derived in ONE
place (core.quant_stats) with the values the quantizers used to log."""
from __future__ import annotations

import copy
import math
from collections import Counter

import pytest
import torch
import torch.distributed as tdist

from core import dist, quant_stats
from test_quantizers_contract import CASES, IDS, build, latent

ALGORITHMIC = ("codebook_update", "kmeans_init", "dead_code_threshold")  # options allowed collectives in training


@pytest.fixture
def collectives(monkeypatch):
    """Pretend to be one rank of a group: every collective a quantizer issues is recorded (and is a no-op)."""
    calls: list[str] = []
    monkeypatch.setattr(dist, "is_distributed", lambda: True)
    monkeypatch.setattr(tdist, "get_world_size", lambda *a: 2)
    for name in ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter"):
        monkeypatch.setattr(tdist, name, lambda *a, _n=name, **k: calls.append(_n))
    return calls


def _state(q):
    return {k: v.detach().clone() for k, v in q.state_dict().items()}


@pytest.mark.parametrize("name,over", CASES, ids=IDS)
def test_encode_is_pure_and_equals_quantize_indices(name, over, collectives):
    q = build(name, **over)
    z = latent(q, seed=1)
    q.train()
    q(latent(q, seed=2))  # a training step first: k-means init, EMA, restarts have run
    collectives.clear()
    before, rng, flags = _state(q), torch.get_rng_state(), [m.training for m in q.modules()]
    idx = q.encode(z)
    after = _state(q)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in q.modules()] == flags
    assert collectives == []
    assert idx.dtype == torch.int64 and not idx.requires_grad
    q.eval()
    assert torch.equal(idx, q(z).indices)
    assert collectives == []  # eval mode: no collective either (rank 0 evaluates alone)
    # the encode of the same latent in bf16 autocast is the fp32 lookup
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(q.encode(z), idx)


@pytest.mark.parametrize("name,over", CASES, ids=IDS)
def test_training_forward_issues_only_algorithmic_collectives(name, over, collectives):
    q = build(name, **over)
    q.train()
    q(latent(q))
    q(latent(q, seed=3))
    if not any(k in over for k in ALGORITHMIC):
        assert collectives == [], collectives


def test_default_encode_of_a_third_party_quantizer_restores_training_flags():
    from core.interfaces import Quantizer, QuantizerOutput

    class Round(Quantizer):
        codes_per_token, codebook_sizes, bits_per_token = 1, [5], math.log2(5)

        def __init__(self):
            super().__init__()
            self.sub = torch.nn.Linear(1, 1)
            self.seen = 0

        def quantize(self, z):
            if self.training:
                self.seen += 1  # a state update that encode must not trigger
            idx = (z.clamp(-2, 2).round() + 2).long()[..., :1]
            return QuantizerOutput(z, idx)

    q = Round()
    q.train()
    z = torch.linspace(-3, 3, 12).view(1, 12, 1)
    idx = q.encode(z)
    assert q.seen == 0 and q.training and q.sub.training
    assert idx.view(-1).tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 4]


# ---- derived values = the old per-batch definitions, by brute force ----------------------------


def _brute(indices: torch.Tensor, sizes: list[int]) -> dict[str, float]:
    """The per-batch definitions the quantizers logged (UniTok usage: frequency > 0.01/K)."""
    rows = indices.reshape(-1, indices.shape[-1]).tolist()
    usage, ppl, dead = [], [], []
    for j, k in enumerate(sizes):
        c = Counter(r[j] for r in rows)
        n = len(rows)
        usage.append(100.0 * sum(1 for v in c.values() if v / n > 0.01 / k) / k)
        ppl.append(math.exp(-sum(v / n * math.log(v / n) for v in c.values())))
        dead.append(k - len(c))
    out = {"usage": sum(usage) / len(sizes), "perplexity": sum(ppl) / len(sizes), "dead_codes": sum(dead) / len(sizes)}
    if len(sizes) > 1:
        for j in range(len(sizes)):
            out.update({f"usage/{j}": usage[j], f"perplexity/{j}": ppl[j], f"dead_codes/{j}": dead[j]})
    return out


def _bits(q, indices: torch.Tensor) -> torch.Tensor:
    """The sign bits of a binary quantizer's codes, (rows, all bits), from the indices."""
    from plugins.quantizers._common import index_to_bits

    return index_to_bits(indices, q.cfg.code_dim, q.cfg.bit_order).reshape(-1, q.cfg.latent_dim)


COUNTED = [(n, o) for n, o in CASES if n != "identity"]


@pytest.mark.parametrize("name,over", COUNTED, ids=[IDS[CASES.index(c)] for c in COUNTED])
def test_derived_values_equal_a_brute_force_count(name, over):
    q = build(name, **over)
    q.eval()
    z = torch.randn(4, 16, q.cfg.latent_dim, generator=torch.Generator().manual_seed(5))
    out = q(z)
    got = quant_stats.derive(out.stats)
    want = _brute(out.indices, q.codebook_sizes)
    if "bit_sums" in out.stats:
        f = _bits(q, out.indices).double().mean(0)
        want["bit_balance"] = float(1 - (2 * f - 1).abs().mean())
    assert got.keys() == want.keys()
    for k in want:
        assert float(got[k]) == pytest.approx(want[k], rel=1e-5, abs=1e-5), k
    # the trainer's path (flatten, one reduction of a one-step window, derive) gives the same numbers
    flat, layout = quant_stats.flatten(out.stats)
    window = quant_stats.window_metrics([flat], layout, all_reduce=lambda t: t)
    assert window == pytest.approx({k: float(v) for k, v in got.items()}, rel=1e-6)


def test_bit_balance_hand_computed():
    bits = torch.tensor([[1, 0, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)  # f = 1, .5, .5
    s = quant_stats.bit_stats(bits)
    assert s["bit_sums"].tolist() == [4.0, 2.0, 2.0] and float(s["rows"]) == 4
    assert float(quant_stats.bit_balance(s["bit_sums"], s["rows"])) == pytest.approx(1 - 1 / 3)


# ---- two ranks: the sum of the local statistics = the statistics of the concatenated batch ------


@pytest.mark.parametrize("name,over", COUNTED, ids=[IDS[CASES.index(c)] for c in COUNTED])
def test_two_rank_reduction_equals_the_concatenated_batch(name, over):
    q = build(name, **over)
    q.eval()
    steps = [torch.randn(4, 8, q.cfg.latent_dim, generator=torch.Generator().manual_seed(s)) for s in (7, 8)]
    # each of the two "ranks" sees half of every step's global batch
    per_rank = [[quant_stats.flatten(q(z[r::2]).stats) for z in steps] for r in (0, 1)]
    layout = per_rank[0][0][1]
    other = torch.stack([flat for flat, _ in per_rank[1]])

    def fake_all_reduce(t):  # rank 0's view of the sum over the two ranks
        return t.add_(other)

    calls = []
    got = quant_stats.window_metrics([f for f, _ in per_rank[0]], layout,
                                     all_reduce=lambda t: (calls.append(t.shape), fake_all_reduce(t))[1])
    assert calls == [torch.Size([2, other.shape[1]])]  # ONE collective for the whole window
    whole = [quant_stats.derive(q(z).stats) for z in steps]
    want = {k: sum(float(d[k]) for d in whole) / 2 for k in whole[0]}
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-6), k


def test_window_metrics_average_per_step_values_not_pooled_counts():
    """Two steps with disjoint codes: each step uses 1 of 2 codes (50 %), the pooled window would say 100 %."""
    a = {"counts": torch.tensor([[4.0, 0.0]])}
    b = {"counts": torch.tensor([[0.0, 4.0]])}
    (fa, layout), (fb, _) = quant_stats.flatten(a), quant_stats.flatten(b)
    got = quant_stats.window_metrics([fa, fb], layout, all_reduce=lambda t: t)
    assert got == {"usage": 50.0, "perplexity": 1.0, "dead_codes": 1.0}


def test_local_only_switch_is_gone():
    assert not hasattr(dist, "local_only") and not hasattr(dist, "_LOCAL_ONLY")


def test_model_encode_and_discrete_latent_use_the_pure_lookup(collectives):
    from core.config import validate
    from core.trainer import build as build_run
    from conftest import tiny_experiment

    exp = validate(tiny_experiment(**{"model.quantizer": {"type": "vq", "codebook_size": 16, "code_dim": 8,
                                                          "codebook_update": "ema", "kmeans_init": True}}))
    model = build_run(exp).model
    model.train()
    images = torch.rand(2, 3, exp.data.image_size, exp.data.image_size)
    before = copy.deepcopy(model.quantizer.state_dict())
    idx = model.encode(images)
    lat = model.discrete_latent(images)
    assert collectives == [] and model.quantizer._needs_init  # no k-means init, no EMA step
    assert all(torch.equal(before[k], v) for k, v in model.quantizer.state_dict().items())
    assert torch.equal(lat, model.quantizer.indices_to_codes(idx))
