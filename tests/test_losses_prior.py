"""Generative-Aware Prior: query token switch, causality, the v-loss by hand, joint training."""
from __future__ import annotations

import pytest
import torch

from losses_helpers import images, tiny_model, total_loss
from plugins.losses.prior import PriorLoss, v_loss


def prior(query: bool, n: int = 5, d: int = 3) -> PriorLoss:
    torch.manual_seed(0)
    return PriorLoss(PriorLoss.Config(width=16, depth=1, heads=2, head_width=16, query=query), dim=d, n_tokens=n)


def test_query_token_switch_decides_whether_the_first_token_is_predicted():
    x = torch.randn(2, 5, 3)
    on, off = prior(True), prior(False)
    h_on, tgt_on = on.condition(x)
    h_off, tgt_off = off.condition(x)
    assert tgt_on.shape[1] == 5 and torch.equal(tgt_on, x)  # token 0 is predicted from the query
    assert tgt_off.shape[1] == 4 and torch.equal(tgt_off, x[:, 1:])  # token 0 gets no prediction
    assert on.per_token_loss(x).shape == (2, 5) and off.per_token_loss(x).shape == (2, 4)
    assert on.query is not None and off.query is None


@pytest.mark.parametrize("query", [True, False])
def test_predictions_are_causal(query):
    p = prior(query).eval()
    x = torch.randn(2, 5, 3)
    m = 5 if query else 4
    t, eps = torch.rand(2, m, 1), torch.randn(2, m, 3)
    base = p.per_token_loss(x, t, eps)
    k = 2  # change token k: predictions conditioned only on tokens < k keep their loss
    x2 = x.clone()
    x2[:, k] += 1.0
    after = p.per_token_loss(x2, t, eps)
    first_changed = k if query else k - 1  # the target index k sits at position k (query) or k-1
    assert torch.allclose(after[:, :first_changed], base[:, :first_changed], atol=1e-6)
    assert not torch.allclose(after[:, first_changed:], base[:, first_changed:])


def test_v_loss_hand_value():
    x = torch.tensor([[[1.0, -1.0]]])
    x_hat = torch.tensor([[[0.5, -1.0]]])
    eps = torch.tensor([[[0.2, 0.4]]])
    for t_val, denom in ((0.5, 0.5), (0.99, 0.05)):  # (1 - t) clamped at 0.05
        t = torch.full((1, 1, 1), t_val)
        z = (1 - t) * eps + t * x
        got = v_loss(x, x_hat, z, t, 0.05)
        assert got.item() == pytest.approx(((0.5 / denom) ** 2 + 0.0) / 2, rel=1e-5)


def test_per_token_loss_follows_bitdance_formulas():
    p = prior(True)
    x = torch.randn(1, 5, 3)
    t, eps = torch.full((1, 5, 1), 0.3), torch.randn(1, 5, 3)
    h, _ = p.condition(x)
    z = 0.7 * eps + 0.3 * x
    ref = ((x - p.head(z, h, t)) / 0.7).pow(2).mean(-1)
    assert torch.allclose(p.per_token_loss(x, t, eps), ref, atol=1e-6)


def test_joint_training_reaches_the_tokenizer_and_stays_finite_in_bf16():
    model = tiny_model()
    loss = PriorLoss(PriorLoss.Config(width=16, depth=1, heads=2, weight=0.5), model=model)
    assert loss.pos.shape[1] == model.grid[0] * model.grid[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images(2))
        terms = loss({}, out, 0).terms
    assert set(terms) == {"next_token"} and torch.isfinite(terms["next_token"])
    total_loss(loss, {}, out, 0).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())
    assert all(p.grad is not None for p in loss.parameters())
