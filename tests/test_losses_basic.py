"""pixel, quantizer (weights + 3x->1x ramp), contrastive (InfoNCE by hand), the common schedule."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from core.errors import ConfigError
from losses_helpers import images, tiny_exp, tiny_model
from plugins.losses.contrastive import ContrastiveLoss
from plugins.losses.pixel import PixelLoss
from plugins.losses.quantizer import QuantizerLoss, ramp_factor


def test_pixel_hand_values():
    x = torch.tensor([[[[0.0, 1.0], [-1.0, 0.5]]]]).expand(1, 3, 2, 2)
    y = torch.tensor([[[[0.5, 1.0], [0.0, 0.5]]]]).expand(1, 3, 2, 2)
    loss = PixelLoss(PixelLoss.Config(l1=0.2, l2=1.0))
    res = loss({}, {"images": x, "recon": y}, 0)
    terms = res.terms
    assert res.metrics == {}
    assert terms["l1"].item() == pytest.approx((0.5 + 1.0) / 4)
    assert terms["l2"].item() == pytest.approx((0.25 + 1.0) / 4)
    assert loss.term_weights() == {"l1": 0.2, "l2": 1.0}


def test_schedule_start_and_warmup():
    loss = PixelLoss(PixelLoss.Config(weight=2.0, start_step=10, warmup_steps=4))
    assert [loss.schedule(s) for s in (0, 9, 10, 11, 13, 100)] == [0.0, 0.0, 0.5, 1.0, 2.0, 2.0]


def test_quantizer_weights_come_from_the_quantizer_config():
    model = tiny_model()
    assert QuantizerLoss(QuantizerLoss.Config(), model=model).term_weights() == {"commitment": 0.25, "codebook": 1.0}
    q = {"type": "vq", "codebook_size": 32, "code_dim": 8, "commitment_weight": 0.5}
    w = QuantizerLoss(QuantizerLoss.Config(), model=tiny_model(quantizer=q)).term_weights()
    assert w["commitment"] == 0.5
    assert w["codebook"] == model.quantizer.loss_weights()["codebook"]
    out = model(images())
    assert set(QuantizerLoss(QuantizerLoss.Config(), model=model)({}, out, 0).terms) == set(out["quant"].losses)


def test_quantizer_ramp_three_to_one():
    assert [ramp_factor(s, 4, 3.0) for s in (0, 1, 2, 4, 9)] == [3.0, 2.5, 2.0, 1.0, 1.0]
    loss = QuantizerLoss(QuantizerLoss.Config(weight=0.1, ramp_steps=2000), model=tiny_model())
    assert loss.schedule(0) == pytest.approx(0.3)
    assert loss.schedule(1000) == pytest.approx(0.2)
    assert loss.schedule(5000) == pytest.approx(0.1)
    assert QuantizerLoss(QuantizerLoss.Config(weight=0.1), model=tiny_model()).schedule(0) == pytest.approx(0.1)


def test_contrastive_equals_direct_softmax_cross_entropy():
    model = tiny_model(text=True)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))
    texts = ["a red circle", "a blue square", "a green star", "a big triangle"]
    out = model(images(), texts)
    loss = ContrastiveLoss(ContrastiveLoss.Config(), model=model)
    got = loss({"text": texts}, out, 0).terms["clip"]
    img = out["image_embed"]
    txt = model.encode_text(texts)
    assert torch.equal(out["text_embed"], txt)
    logits = 10.0 * img @ txt.t()
    labels = torch.arange(4)
    ref = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    got.backward()  # gradients reach both towers and the logit scale
    assert model.logit_scale.grad is not None and model.text.transformer.token_embedding.weight.grad.abs().sum() > 0
    assert sum(p.grad.abs().sum() for p in model.encoder.parameters() if p.grad is not None) > 0


def test_contrastive_logit_scale_is_clamped():
    model = tiny_model(text=True)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # above ln 100
    texts = ["a", "b"]
    out = model(images(2), texts)
    got = ContrastiveLoss(ContrastiveLoss.Config(), model=model)({"text": texts}, out, 0).terms["clip"]
    logits = 100.0 * out["image_embed"] @ model.encode_text(texts).t()
    ref = 0.5 * (F.cross_entropy(logits, torch.arange(2)) + F.cross_entropy(logits.t(), torch.arange(2)))
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)


def test_contrastive_needs_text_at_validation():
    with pytest.raises(ConfigError, match="needs a text tower"):
        tiny_exp(losses=[{"type": "contrastive"}])
    tiny_exp(losses=[{"type": "contrastive"}], text=True)  # shapes has captions


def test_contrastive_on_hand_made_outputs_is_symmetric_infonce():
    """The loss reads only the outputs: embeddings and log scale made by hand (no model at all)
    give the symmetric InfoNCE computed here entry by entry."""
    g = torch.Generator().manual_seed(3)
    img = F.normalize(torch.randn(3, 4, generator=g), dim=-1)
    txt = F.normalize(torch.randn(3, 4, generator=g), dim=-1)
    s = math.log(7.0)
    res = ContrastiveLoss(ContrastiveLoss.Config())({}, {"image_embed": img, "text_embed": txt,
                                                         "logit_scale": torch.tensor(s)}, 0)
    assert set(res.terms) == {"clip"} and res.metrics == {}
    logits = [[7.0 * float(img[i] @ txt[j]) for j in range(3)] for i in range(3)]
    i2t = -sum(logits[i][i] - math.log(sum(math.exp(v) for v in logits[i])) for i in range(3)) / 3
    t2i = -sum(logits[j][j] - math.log(sum(math.exp(logits[i][j]) for i in range(3))) for j in range(3)) / 3
    assert res.terms["clip"].item() == pytest.approx((i2t + t2i) / 2, rel=1e-5)
    with pytest.raises(KeyError, match="text_embed"):
        ContrastiveLoss(ContrastiveLoss.Config())({}, {"image_embed": img}, 0)


def test_model_forward_adds_text_embed_and_logit_scale_only_with_a_text_tower_and_texts():
    texts = ["a red circle", "a blue square"]
    model = tiny_model(text=True)
    with torch.no_grad():
        model.logit_scale.fill_(9.0)  # above ln 100: the value is clamped, the gradient passes
    assert not {"text_embed", "logit_scale"} & set(model(images(2)))
    out = model(images(2), texts)
    assert torch.equal(out["text_embed"], model.encode_text(texts))
    assert torch.allclose(out["text_embed"].norm(dim=-1), torch.ones(2))
    assert out["logit_scale"].item() == pytest.approx(math.log(100))
    out["logit_scale"].backward()
    assert model.logit_scale.grad.item() == 1.0
    plain = tiny_model()
    assert not {"text_embed", "logit_scale", "image_embed"} & set(plain(images(2), texts))
