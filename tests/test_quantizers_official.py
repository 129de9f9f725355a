"""Quantizer options that follow the papers' public code (issue 11, items 11, 15, 16, 17).

Each reference below is written here, in plain torch, from the layout of the official code it names
(same formulas, same reductions, same epsilons) and fed the same inputs / weights as vtok's plugin.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from core.config import validate
from core.errors import ConfigError
from core.reference_quantizers import corners
from losses_helpers import total_loss
from plugins.losses.quantizer import QuantizerLoss
from plugins.quantizers.bsq import BSQ, BSQConfig
from plugins.quantizers.lfq import GQ, LFQ, GQConfig, LFQConfig
from plugins.quantizers.vq import MCQ, VQ, MCQConfig, VQConfig


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---- item 11: UniTok's optional MCQ entropy loss ------------------------------------------------


def unitok_entropy_loss(features: torch.Tensor, weights: list[torch.Tensor], temp: float) -> torch.Tensor:
    """FoundationVision/UniTok models/quant.py: VectorQuantizerM splits the features into chunks;
    each VectorQuantizer normalises its chunk and its (NormalizedEmbedding) codebook and calls
    get_entropy_loss (squared distances, logits -d/T, per-sample entropy from log_softmax,
    codebook entropy with log(avg + 1e-7)); the losses are averaged over the codebooks."""
    chunks = features.reshape(-1, features.shape[-1]).split(features.shape[-1] // len(weights), dim=-1)
    total = 0.0
    for chunk, w in zip(chunks, weights):
        x, c = F.normalize(chunk, dim=-1).float(), F.normalize(w, dim=1)
        dist = x.square().sum(1, keepdim=True) + c.square().sum(1) - 2 * x @ c.T
        logits = -dist / temp
        prob, log_prob = logits.softmax(-1), logits.log_softmax(-1)
        per_sample = (-prob * log_prob).sum(-1).mean()
        avg = prob.mean(0)
        total = total + per_sample - (-avg * torch.log(avg + 1e-7)).sum()
    return total / len(weights)


@pytest.mark.parametrize("temp", [0.01, 0.2])
def test_mcq_entropy_loss_equals_unitok_get_entropy_loss(temp):
    torch.manual_seed(0)
    q = MCQ(MCQConfig(codes_per_token=3, codebook_size=16, code_dim=4, entropy_weight=0.5, entropy_temperature=temp))
    q.codebook.data = randn(3, 16, 4, seed=1)
    z = randn(2, 5, 12, seed=2).requires_grad_(True)
    out = q(z)
    assert q.loss_weights()["entropy"] == 0.5
    weights = [q.codebook[i] for i in range(3)]
    z_ref = z.detach().clone().requires_grad_(True)
    ref = unitok_entropy_loss(z_ref, weights, temp)
    assert out.losses["entropy"].item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    g, gc = torch.autograd.grad(out.losses["entropy"], [z, q.codebook])
    g_ref, gc_ref = torch.autograd.grad(ref, [z_ref, q.codebook])
    assert torch.allclose(g, g_ref, atol=1e-5) and torch.allclose(gc, gc_ref, atol=1e-5)
    assert gc.abs().sum() > 0  # the entropy loss trains the codebook as in the official code


def test_mcq_entropy_hand_value_two_codes():
    """One 1-d code pair {+1, -1}, rows x = +1 and x = -1 (already unit): distances 0 and 4, so
    p(. | x=+1) = (1/(1+e^-4/T), e^-4/T/(1+e^-4/T)) and mirrored; pbar = (1/2, 1/2)."""
    T = 2.0
    q = VQ(VQConfig(codebook_size=2, code_dim=1, entropy_weight=1.0, entropy_temperature=T, codebook_entropy_log_eps=0.0))
    q.codebook.data = torch.tensor([[[1.0], [-1.0]]])
    out = q(torch.tensor([[[3.0], [-0.5]]]))
    a = 1 / (1 + math.exp(-4 / T))
    h = -(a * math.log(a) + (1 - a) * math.log(1 - a))
    assert out.losses["entropy"].item() == pytest.approx(h - math.log(2), rel=1e-6)


def test_mcq_entropy_off_by_default():
    q = MCQ(MCQConfig(codes_per_token=2, codebook_size=8, code_dim=4))
    assert "entropy" not in q(randn(1, 3, 8)).losses and "entropy" not in q.loss_weights()


# ---- item 15: BSQ at BSQ-ViT's released operating point ---------------------------------------------


def bsq_vit_reference(z: torch.Tensor, d: int, group: int, beta: float, zeta: float, inv_t: float,
                      analytical: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """zhaoyue-zephyrus/bsq-vit: VITBSQModel.encode l2-normalises the latent (l2_norm=True), then
    BinarySphericalQuantizer(l2_norm=True).forward: sign straight-through on the unit latent, then
    times 1/sqrt(d); soft_entropy_loss over group codebooks (big-endian sub-codes / sqrt(d)),
    entropies with log(p + 1e-8); commitment beta * mean_tokens sum_dims; loss
    commit + zeta * (H_ps - H_cb) / inv_temperature (gamma0 = gamma = 1)."""
    z = F.normalize(z, dim=-1)
    zhat = torch.where(z > 0, 1.0, -1.0)
    zq = (z + (zhat - z).detach()) * (1 / d**0.5)
    codebook = corners(group, big_endian=True) / d**0.5
    zg = z.reshape(*z.shape[:-1], d // group, group)
    prob = (2 * torch.einsum("...gc,kc->...gk", zg, codebook) * inv_t).softmax(-1)
    ent = lambda p: -(p * torch.log(p + 1e-8)).sum(-1)  # noqa: E731
    if analytical:
        p1 = torch.sigmoid(-4 * z / d**0.5 * inv_t)
        h_ps = ent(torch.stack([p1, 1 - p1], -1)).sum(-1).mean()
    else:
        h_ps = ent(prob).sum(-1).mean()
    h_cb = ent(prob.reshape(-1, d // group, 2**group).mean(0)).sum()
    commit = beta * ((zq.detach() - z) ** 2).sum(-1).mean()
    return zq, commit + zeta * (h_ps - h_cb) / inv_t


@pytest.mark.parametrize("group,inv_t,analytical", [(3, 1.0, False), (6, 1.0, True), (2, 4.0, False), (1, 2.5, True)])
def test_bsq_equals_bsq_vit_forward_and_gradients(group, inv_t, analytical):
    d, beta, zeta = 6, 0.25, 0.1
    over = {} if inv_t == 1.0 else {"entropy_temperature": 1 / inv_t}  # vtok states T, BSQ-ViT 1 / T
    q = BSQ(BSQConfig(code_dim=d, entropy_group_size=group, commitment_weight=beta, entropy_weight=zeta, **over))
    z = randn(2, 15, d, seed=3).requires_grad_(True)
    g = randn(2, 15, d, seed=4)
    out = q(z)
    w = q.loss_weights()
    loss = w["commitment"] * out.losses["commitment"] + w["entropy"] * out.losses["entropy"]
    z_ref = z.detach().clone().requires_grad_(True)
    zq_ref, loss_ref = bsq_vit_reference(z_ref, d, group, beta, zeta, inv_t, analytical)
    assert torch.equal(out.quantized, zq_ref)
    assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-5, abs=1e-6)
    (grad,) = torch.autograd.grad((out.quantized * g).sum() + loss, z)
    (grad_ref,) = torch.autograd.grad((zq_ref * g).sum() + loss_ref, z_ref)
    assert torch.allclose(grad, grad_ref, atol=1e-5)


def test_bsq_defaults_are_bsq_vit_and_options_give_the_old_behaviour():
    d = 4
    cfg = BSQConfig(code_dim=d, entropy_group_size=2)
    assert (cfg.entropy_temperature, cfg.straight_through, cfg.commitment_reduction, cfg.entropy_scaled_by_temperature) == \
        (1.0, "scaled", "sum", True)
    z = randn(1, 8, d, seed=5).requires_grad_(True)
    u = F.normalize(z.detach(), dim=-1)
    q_codes = torch.where(u > 0, 0.5, -0.5)
    new = BSQ(cfg)(z)
    old = BSQ(BSQConfig(code_dim=d, entropy_group_size=2, entropy_temperature=1.0, straight_through="identity",
                        commitment_reduction="mean", entropy_scaled_by_temperature=False))(z)
    assert new.losses["commitment"].item() == pytest.approx((q_codes - u).pow(2).sum(-1).mean().item(), rel=1e-6)
    assert old.losses["commitment"].item() == pytest.approx(new.losses["commitment"].item() / d, rel=1e-6)
    # straight-through: gradient 1/sqrt(d) = 1/2 of the identity one, on the normalised latent
    (g_new,) = torch.autograd.grad(new.quantized.sum(), z)
    (g_old,) = torch.autograd.grad(old.quantized.sum(), z)
    assert torch.allclose(g_new, g_old / 2, atol=1e-7) and g_old.abs().sum() > 0
    # the entropy term is divided by the inverse temperature (BSQ-ViT's 5 = 1 / T)
    a = BSQ(BSQConfig(code_dim=d, entropy_group_size=2, entropy_temperature=1 / 5.0))(z)
    b = BSQ(BSQConfig(code_dim=d, entropy_group_size=2, entropy_temperature=1 / 5.0, entropy_scaled_by_temperature=False))(z)
    assert a.losses["entropy"].item() == pytest.approx(b.losses["entropy"].item() / 5, rel=1e-6)


def test_bsq_group_up_to_full_width():
    d = 18
    q = BSQ(BSQConfig(code_dim=d, entropy_group_size=d))
    e = BSQ(BSQConfig(code_dim=d, codebook_entropy="exact"))
    z = randn(1, 20, d, seed=6)
    assert q(z).metrics["codebook_entropy"] == pytest.approx(e(z).metrics["codebook_entropy"].item(), rel=1e-5)
    with pytest.raises(ValueError, match="at most 24"):
        BSQConfig(code_dim=50, entropy_group_size=25)


def test_quantizers_experiment_runs_bsq_at_the_released_operating_point():
    import yaml
    from pathlib import Path

    raw = yaml.safe_load((Path(__file__).resolve().parent.parent / "experiments" / "quantizers.yaml").read_text())
    bsq = BSQConfig(**raw["sweep"]["space"]["model.quantizer"]["bsq"])
    assert (bsq.entropy_temperature, bsq.straight_through, bsq.commitment_reduction, bsq.entropy_scaled_by_temperature) == \
        (1.0, "scaled", "sum", True)
    assert bsq.entropy_weight == 0.1 and bsq.commitment_weight == 0.0


# ---- item 16: Open-MAGVIT2 / WeTok's log(p + 1e-5) and the entropy-only ramp ----------------------------


def magvit2_entropy_loss(logits: torch.Tensor, temperature: float, eps: float = 1e-5) -> torch.Tensor:
    """TencentARC/SEED-Voken src/Open_MAGVIT2/modules/vqvae/lookup_free_quantize.py, entropy_loss
    (same function in WeTok): softmax(logits / T); per-sample entropy from log_softmax(logits / T + eps);
    codebook entropy of the mean over every leading axis with log(avg + eps)."""
    probs = F.softmax(logits / temperature, -1)
    log_probs = F.log_softmax(logits / temperature + eps, -1)
    avg = probs.reshape(-1, probs.shape[-1]).mean(0)
    return torch.mean(-torch.sum(probs * log_probs, -1)) - (-torch.sum(avg * torch.log(avg + eps)))


def test_lfq_log_eps_equals_open_magvit2_entropy_loss():
    d, T = 5, 0.05
    q = LFQ(LFQConfig(code_dim=d, entropy_temperature=T, codebook_entropy_log_eps=1e-5))
    exact = LFQ(LFQConfig(code_dim=d, entropy_temperature=T))
    z = (randn(1, 12, d, seed=7) * 2).requires_grad_(True)
    out = q(z)
    ref = magvit2_entropy_loss(2 * z.reshape(-1, d) @ corners(d).T, T)
    assert out.losses["entropy"].item() == pytest.approx(ref.item(), abs=1e-6)
    # 12 rows over 32 codes with a sharp T: many mean probabilities are near eps, where it matters
    assert abs(exact(z).losses["entropy"].item() - ref.item()) > 5e-5
    (g,) = torch.autograd.grad(out.losses["entropy"], z)
    (g_ref,) = torch.autograd.grad(ref, z)
    assert torch.allclose(g, g_ref, atol=1e-4)


def test_gq_pooled_log_eps_equals_wetok_gfq():
    g, dg, T = 3, 4, 0.05
    q = GQ(GQConfig(codes_per_token=g, code_dim=dg, entropy_temperature=T, codebook_entropy_log_eps=1e-5))
    z = randn(2, 4, g * dg, seed=8) * 2
    # WeTok GFQ.forward: x -> (b, n, c, d), logits 2 x . codebook over each group's 2^d' codes
    logits = 2 * torch.einsum("bncd,jd->bncj", z.reshape(2, 4, g, dg), corners(dg))
    assert q(z).losses["entropy"].item() == pytest.approx(magvit2_entropy_loss(logits, T).item(), rel=1e-5)


def test_entropy_only_ramp_equals_codebook_enlarge():
    """Open-MAGVIT2 vqperceptual: entropy * codebook_weight * (1 + 3 max(0, 1 - s/2000)) + commit * 0.25."""
    exp = validate({"name": "t", "data": {"type": "shapes", "image_size": 16},
                    "model": {"encoder": {"type": "conv", "width": 8, "downsample": 4},
                              "quantizer": {"type": "lfq", "code_dim": 6}, "decoder": {"type": "conv", "width": 8}},
                    "losses": [{"type": "quantizer", "ramp_steps": 2000, "ramp_from": 4.0, "ramp_terms": ["entropy"]}]})
    from core.model import Tokenizer

    model = Tokenizer(exp.model, exp.data.image_size)
    loss = QuantizerLoss(exp.losses[0], model=model)
    out = {"quant": LFQ(LFQConfig(code_dim=6))(randn(2, 5, 6, seed=9))}
    ent, com = out["quant"].losses["entropy"], out["quant"].losses["commitment"]
    for s in (0, 500, 1999, 2000, 5000):
        ref = 0.1 * ent * (1 + 3 * max(0.0, 1 - s / 2000)) + 0.25 * com
        assert total_loss(loss, {}, out, s).item() == pytest.approx(ref.item(), rel=1e-6)
    # the default ramp (BSQ-ViT) multiplies every term
    all_terms = QuantizerLoss(QuantizerLoss.Config(ramp_steps=2000, ramp_from=3.0), model=model)
    ref = (0.1 * ent + 0.25 * com) * (3 - 2 * 500 / 2000)
    assert total_loss(all_terms, {}, out, 500).item() == pytest.approx(ref.item(), rel=1e-6)


# ---- item 17: gq pooled vs per_group on the same scale ------------------------------------------------


def test_gq_modes_share_the_per_sample_term_and_scale():
    g, dg, T = 4, 3, 0.5
    z = randn(3, 5, g * dg, seed=10)
    pooled = GQ(GQConfig(codes_per_token=g, code_dim=dg, entropy_temperature=T))(z)
    per = GQ(GQConfig(codes_per_token=g, code_dim=dg, entropy_temperature=T, codebook_entropy="per_group"))(z)
    assert pooled.metrics["sample_entropy"] == per.metrics["sample_entropy"]
    # both H_cb per group code, within [0, d' ln 2]; pooled >= mean of the per-group ones (concavity)
    for out in (pooled, per):
        assert 0 <= out.metrics["codebook_entropy"] <= dg * math.log(2) + 1e-6
    assert pooled.metrics["codebook_entropy"] >= per.metrics["codebook_entropy"] - 1e-6
    with pytest.raises(ValueError):
        GQConfig(codebook_entropy="summed")


def test_gq_summed_is_rejected_in_configs():
    with pytest.raises(ConfigError):
        validate({"name": "t", "data": {"type": "shapes", "image_size": 16},
                  "model": {"encoder": {"type": "conv", "width": 8, "downsample": 4},
                            "quantizer": {"type": "gq", "codes_per_token": 2, "code_dim": 4, "codebook_entropy": "summed"},
                            "decoder": {"type": "conv", "width": 8}}})
