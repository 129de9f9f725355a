"""Numerical checks of the quantizers against brute-force references over the full codebook."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from core.reference_quantizers import brute_entropies, nearest
from core.reference_quantizers import corners as full_codebook
from plugins.quantizers import _common as C
from plugins.quantizers.bsq import BSQ, BSQConfig
from plugins.quantizers.fsq import FSQ, FSQConfig
from plugins.quantizers.lfq import GQ, LFQ, GQConfig, LFQConfig
from plugins.quantizers.rq import RQ, RQConfig
from plugins.quantizers.vq import MCQ, VQ, MCQConfig, VQConfig


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---- nearest-code search ------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["dot", "euclidean"])
def test_chunked_search_equals_brute_force(metric):
    x, cb = randn(3, 50, 6, seed=1), randn(3, 1024, 6, seed=2)  # 1024 codes: blocked argmax path
    got = C.nearest_code(x, cb, metric, budget=3 * 1024 * 7)  # 7 rows per chunk: many chunks
    ref = nearest(x, cb, metric)
    assert torch.equal(got, ref)


def test_blocked_argmax_equals_argmax_with_ties():
    for sim in (randn(3, 7, 1024, seed=14), torch.randint(0, 4, (3, 7, 1024), generator=torch.Generator().manual_seed(0)).float()):
        assert torch.equal(C.argmax_last(sim), sim.argmax(-1))


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_vq_assignment_equals_brute_force(distance):
    q = MCQ(MCQConfig(codes_per_token=2, codebook_size=64, code_dim=4, distance=distance, search_budget=100))
    q.codebook.data = randn(2, 64, 4, seed=3)
    z = randn(5, 7, 8, seed=4)
    idx = q(z).indices.reshape(-1, 2)
    for i in range(2):
        x, cb = z.reshape(-1, 2, 4)[:, i], q.codebook[i].detach()
        ref = nearest(x, cb, distance)
        assert torch.equal(idx[:, i], ref)


# ---- gradients ---------------------------------------------------------------------------------


def test_straight_through_is_identity_euclidean():
    q = VQ(VQConfig(codebook_size=8, code_dim=4, distance="euclidean"))
    z = randn(2, 3, 4).requires_grad_(True)
    g = randn(2, 3, 4, seed=5)
    (q(z).quantized * g).sum().backward()
    assert torch.equal(z.grad, g)


def test_straight_through_cosine_is_identity_on_normalised_input():
    q = VQ(VQConfig(codebook_size=8, code_dim=4))
    z = randn(2, 3, 4).requires_grad_(True)
    g = randn(2, 3, 4, seed=5)
    (q(z).quantized * g).sum().backward()
    z2 = z.detach().clone().requires_grad_(True)
    (F.normalize(z2, dim=-1) * g).sum().backward()
    assert torch.allclose(z.grad, z2.grad, atol=1e-6)


def test_codebook_gets_exactly_the_codebook_loss_gradient():
    q = VQ(VQConfig(codebook_size=8, code_dim=4, distance="euclidean"))
    q.codebook.data = randn(1, 8, 4, seed=6)
    z = randn(2, 3, 4).requires_grad_(True)
    out = q(z)
    out.quantized.sum().backward()  # straight-through: nothing reaches the codebook
    assert q.codebook.grad is None or q.codebook.grad.abs().sum() == 0
    q.codebook.grad = None
    out = q(z)
    out.losses["codebook"].backward()
    idx, x = out.indices.reshape(-1), z.detach().reshape(-1, 4)
    ref = torch.zeros(8, 4).index_add_(0, idx, 2 * (q.codebook[0].detach()[idx] - x) / x.numel())
    assert torch.allclose(q.codebook.grad[0], ref, atol=1e-7)


# ---- VQ variants ---------------------------------------------------------------------------------


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_mcq_with_one_codebook_equals_vq(distance):
    torch.manual_seed(0)
    vq = VQ(VQConfig(codebook_size=32, code_dim=6, distance=distance))
    torch.manual_seed(0)
    mcq = MCQ(MCQConfig(codes_per_token=1, codebook_size=32, code_dim=6, distance=distance))
    z = randn(3, 5, 6)
    a, b = vq(z), mcq(z)
    assert torch.equal(a.quantized, b.quantized) and torch.equal(a.indices, b.indices)
    assert all(torch.equal(a.losses[k], b.losses[k]) for k in a.losses)
    assert a.metrics.keys() == b.metrics.keys()


def test_usage_metrics_hand_computed():
    counts = torch.tensor([[6.0, 3.0, 1.0, 0.0]])  # p = .6 .3 .1 0; threshold 0.01/4
    m = C.usage_metrics(counts)
    assert m["usage"] == pytest.approx(75.0) and m["dead_codes"] == 1
    assert m["perplexity"] == pytest.approx(math.exp(-(0.6 * math.log(0.6) + 0.3 * math.log(0.3) + 0.1 * math.log(0.1))))


def test_kmeans_recovers_separated_clusters():
    centers = torch.tensor([[5.0, 0.0], [-5.0, 0.0], [0.0, 5.0]])
    torch.manual_seed(0)
    x = (centers[torch.arange(300) % 3] + 0.1 * randn(300, 2))[None]
    torch.manual_seed(1)
    got = C.kmeans(x, 3, 10, "euclidean")[0]
    dist = torch.cdist(centers, got).min(-1).values
    assert (dist < 0.1).all()


def test_ema_update_moves_codes_to_running_means():
    q = VQ(VQConfig(codebook_size=2, code_dim=1, distance="euclidean", codebook_update="ema", ema_decay=0.5))
    q.codebook.data = torch.tensor([[[-1.0], [1.0]]])
    q.ema_sum.copy_(q.codebook.detach())  # counts start at 1
    q(torch.tensor([[[-3.0], [-3.0], [5.0]]]))
    # count_0 = .5*1 + .5*2 = 1.5, sum_0 = .5*-1 + .5*-6 = -3.5 -> -3.5/1.5 (Laplace eps ~1e-5)
    assert q.codebook[0, 0, 0].item() == pytest.approx(-3.5 / 1.5, rel=1e-4)
    assert q.codebook[0, 1, 0].item() == pytest.approx((0.5 + 2.5) / 1.0, rel=1e-4)


def test_dead_codes_restart_from_batch_vectors():
    q = VQ(VQConfig(codebook_size=4, code_dim=2, distance="euclidean", dead_code_threshold=10.0))
    z = randn(1, 8, 2, seed=7)
    q(z)
    rows = z.reshape(-1, 2)
    # every code's EMA count (uniform start 2, then < 10) is below threshold: all replaced by batch rows
    assert all(((rows - c).abs().sum(-1) == 0).any() for c in q.codebook[0].detach())


def test_rq_error_non_increasing_with_depth():
    torch.manual_seed(0)
    q = RQ(RQConfig(codes_per_token=6, codebook_size=8, code_dim=4, kmeans_init=True))
    z = randn(4, 64, 4, seed=8)
    q(z)  # k-means init of each stage on its residuals
    q.eval()
    idx = q(z).indices
    errs = [(q.indices_to_codes(idx, d) - z).pow(2).sum().item() for d in range(1, 7)]
    assert all(b <= a + 1e-4 for a, b in zip(errs, errs[1:])) and errs[-1] < 0.5 * errs[0]


# ---- lookup-free family ------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["little", "big"])
@pytest.mark.parametrize("make", [lambda o: LFQ(LFQConfig(code_dim=5, bit_order=o)),
                                  lambda o: GQ(GQConfig(codes_per_token=1, code_dim=5, bit_order=o)),
                                  lambda o: BSQ(BSQConfig(code_dim=5, bit_order=o, codebook_entropy="exact"))])
def test_binary_index_code_bijection(make, order):
    q = make(order).eval()
    idx = torch.arange(32).view(1, 32, 1)
    codes = q.indices_to_codes(idx)
    assert torch.unique(codes.reshape(32, 5), dim=0).shape[0] == 32
    assert torch.equal(q(codes).indices, idx)
    if order == "little":
        assert torch.equal(codes[0, 1] > 0, torch.tensor([True, False, False, False, False]))


@pytest.mark.parametrize("d", [5, 6])
def test_lfq_entropies_equal_brute_force_and_gradients_match(d):
    T = 0.5
    q = LFQ(LFQConfig(code_dim=d, entropy_temperature=T))
    z = randn(1, 40, d, seed=9).requires_grad_(True)
    out = q(z)
    h_ps, h_cb = brute_entropies(2 * z.reshape(-1, d) @ full_codebook(d).t() / T)
    assert out.metrics["sample_entropy"] == pytest.approx(h_ps.item(), rel=1e-5)
    assert out.metrics["codebook_entropy"] == pytest.approx(h_cb.item(), rel=1e-5)
    (g,) = torch.autograd.grad(out.losses["entropy"], z)
    (g_ref,) = torch.autograd.grad(h_ps - h_cb, z)
    assert torch.allclose(g, g_ref, atol=1e-5)


def test_sharp_temperature_keeps_entropy_gradients_finite():
    q = LFQ(LFQConfig(code_dim=10))  # T = 0.01: most probabilities underflow to exactly 0
    z = randn(1, 64, 10, seed=13).requires_grad_(True)
    q(z).losses["entropy"].backward()
    assert torch.isfinite(z.grad).all()


def test_grouped_codebook_entropy_equals_brute_marginals():
    d, T, g = 6, 0.5, 3
    q = LFQ(LFQConfig(code_dim=d, entropy_temperature=T, codebook_entropy="grouped", entropy_group_size=g))
    z = randn(1, 40, d, seed=10)
    p = torch.softmax(2 * z.reshape(-1, d) @ full_codebook(d).t() / T, -1).mean(0)  # (2^d,) little-endian
    marg = p.view(2**g, 2**g)  # [high group, low group]
    ref = sum(-(m * m.log()).sum() for m in (marg.sum(0), marg.sum(1)))
    assert q(z).metrics["codebook_entropy"] == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize("mode", ["per_group", "pooled"])
def test_gq_equals_independent_lfqs(mode):
    g, dg, T = 3, 4, 0.3
    gq = GQ(GQConfig(codes_per_token=g, code_dim=dg, entropy_temperature=T, codebook_entropy=mode))
    lfq = LFQ(LFQConfig(code_dim=dg, entropy_temperature=T))
    z = randn(2, 10, g * dg, seed=11)
    out = gq(z)
    parts = [lfq(z[..., k * dg:(k + 1) * dg]) for k in range(g)]
    assert torch.equal(out.indices, torch.cat([p.indices for p in parts], -1))
    assert torch.equal(out.quantized, torch.cat([p.quantized for p in parts], -1))
    assert out.losses["commitment"] == pytest.approx(sum(p.losses["commitment"] for p in parts).item() / g, rel=1e-6)
    if mode == "per_group":  # the g independent LFQ terms, averaged
        ref = sum(p.losses["entropy"] for p in parts) / g
    else:  # one 2^d' distribution shared by all (token, group) samples
        x = z.reshape(-1, g, dg).transpose(0, 1).reshape(-1, dg)
        h_ps, h_cb = brute_entropies(2 * x @ full_codebook(dg).t() / T)
        ref = h_ps - h_cb
    assert out.losses["entropy"].item() == pytest.approx(ref.item(), rel=1e-5)


def test_bsq_unit_norm_and_entropies_brute_force():
    d, inv_t = 6, 3.0
    q = BSQ(BSQConfig(code_dim=d, entropy_temperature=1 / inv_t, entropy_group_size=2))
    qe = BSQ(BSQConfig(code_dim=d, entropy_temperature=1 / inv_t, codebook_entropy="exact"))
    z = randn(1, 30, d, seed=12)
    out, oute = q(z), qe(z)
    assert torch.allclose(out.quantized.norm(dim=-1), torch.ones(1, 30))
    u = F.normalize(z.reshape(-1, d), dim=-1)
    logits = 2 * inv_t * u @ (full_codebook(d) / math.sqrt(d)).t()
    h_ps, h_cb = brute_entropies(logits)
    assert out.metrics["sample_entropy"] == pytest.approx(h_ps.item(), rel=1e-5)
    assert oute.metrics["codebook_entropy"] == pytest.approx(h_cb.item(), rel=1e-5)
    p = torch.softmax(logits, -1).mean(0).view(4, 4, 4)  # little-endian bits: [b5b4, b3b2, b1b0]
    ref = sum(-(m * m.log()).sum() for m in (p.sum((1, 2)), p.sum((0, 2)), p.sum((0, 1))))
    assert out.metrics["codebook_entropy"] == pytest.approx(ref.item(), rel=1e-5)
    assert out.metrics["codebook_entropy"] >= oute.metrics["codebook_entropy"] - 1e-5  # grouped is an upper bound


def test_fsq_grid_and_bijection():
    q = FSQ(FSQConfig(levels=[4, 3, 5])).eval()
    idx = torch.arange(60).view(1, 60, 1)
    codes = q.indices_to_codes(idx)
    assert torch.unique(codes[0], dim=0).shape[0] == 60
    assert codes.min() >= -1 and codes.max() <= 1
    assert torch.equal(q(_fsq_preimage(q, codes)).indices, idx)


def _fsq_preimage(q: FSQ, codes: torch.Tensor) -> torch.Tensor:
    """A latent that the bounding maps exactly onto the grid point ``codes``."""
    target = codes * q.width + q.offset
    return torch.atanh((target / q.half_range).clamp(-0.9999, 0.9999)) - q.shift
