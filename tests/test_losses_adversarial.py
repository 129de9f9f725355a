"""Adversarial loss: hinge values, adaptive weight = gradient-norm ratio, alternating updates touch
only their own side, DiffAug / LeCAM, and the DINOv2-style discriminator read from a local file."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from core.errors import ConfigError
from core.trainer import TrainStep, aux_total, build
from losses_helpers import images, tiny_exp, tiny_model, total_loss
from plugins.losses.adversarial import AdversarialLoss, PatchGAN, diff_augment, hinge_d_loss
from plugins.losses.pixel import PixelLoss


def adv(**kw) -> AdversarialLoss:
    torch.manual_seed(0)
    return AdversarialLoss(AdversarialLoss.Config(discriminator={"type": "patchgan", "width": 8, "depth": 2}, **kw))


def test_hinge_hand_values():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - r): 0, 0.5, 2 -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + f): 0, 1, 2 -> mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(5 / 6 + 1)


def test_generator_and_discriminator_terms_equal_their_definitions():
    loss = adv(adaptive=False)
    x, y = images(2), images(2, seed=1)
    res = loss({}, {"images": x, "recon": y}, 0)
    assert set(res.terms) == {"generator"} and set(res.metrics) == {"adaptive_weight", "logits_fake"}
    assert res.terms["generator"].item() == pytest.approx(-loss.discriminator(y).mean().item(), rel=1e-6)
    d = loss.aux_loss({}, {"images": x, "recon": y}, 0)
    ref = F.relu(1 - loss.discriminator(x)).mean() + F.relu(1 + loss.discriminator(y)).mean()
    assert set(d.terms) == {"hinge"} and set(d.metrics) == {"logits_real", "logits_fake"}
    assert aux_total(d, "adversarial").item() == pytest.approx(ref.item(), rel=1e-6)


def test_adaptive_weight_equals_gradient_norm_ratio():
    model = tiny_model()
    x = images(2)
    out = model(x)
    pixel = PixelLoss(PixelLoss.Config())
    rec = total_loss(pixel, {}, out, 0)
    out["loss_terms"] = {("pixel", "l2"): rec}
    loss = adv()
    res = loss({}, out, 0)
    gen = -loss.discriminator(out["recon"]).mean()
    w = out["last_layer"]
    g_rec = torch.autograd.grad(rec, w, retain_graph=True)[0].norm()
    g_gen = torch.autograd.grad(gen, w, retain_graph=True)[0].norm()
    ratio = (g_rec / (g_gen + 1e-6)).clamp(0.015, 1e4)  # UniTok's epsilon
    assert res.metrics["adaptive_weight"].item() == pytest.approx(ratio.item(), rel=1e-4)
    assert res.terms["generator"].item() == pytest.approx((ratio * gen).item(), rel=1e-4)
    # the clamp: a tiny reconstruction gradient gives the lower bound
    out["loss_terms"] = {("pixel", "l2"): rec * 1e-9}
    assert loss({}, out, 0).metrics["adaptive_weight"].item() == pytest.approx(0.015)
    # only the (type, term) pairs in adaptive_from count
    for other in [("quantizer", "commitment"), ("pixel", "other"), ("pixel0", "l2")]:
        out["loss_terms"] = {other: rec}
        assert loss({}, out, 0).metrics["adaptive_weight"].item() == 1.0, other
    out["loss_terms"] = {("quantizer", "commitment"): rec}
    assert adv(adaptive_from=["quantizer/commitment"])({}, out, 0).metrics["adaptive_weight"].item() == \
        pytest.approx(ratio.item(), rel=1e-4)


def test_alternating_steps_touch_only_their_side():
    model = tiny_model()
    loss = adv(adaptive=False)
    g_opt = torch.optim.SGD(model.parameters(), lr=0.1)
    d_params = loss.aux_parameters()
    assert d_params and all(p in set(loss.parameters()) for p in d_params)
    d_opt = loss.aux_optimizer(d_params)
    assert isinstance(d_opt, torch.optim.AdamW) and d_opt.defaults["betas"] == (0.5, 0.9) and d_opt.defaults["lr"] == 2e-5
    snap = lambda mod: {k: v.detach().clone() for k, v in mod.named_parameters()}  # noqa: E731
    x = images(2)

    g0, d0 = snap(model), snap(loss)
    out = model(x)
    g_opt.zero_grad(set_to_none=True)
    total_loss(loss, {}, out, 0).backward()  # generator step
    g_opt.step()
    assert any(not torch.equal(v, g0[k]) for k, v in snap(model).items())
    assert all(torch.equal(v, d0[k]) for k, v in snap(loss).items())
    assert all(p.grad is None for p in d_params)  # the generator step leaves D's grads alone
    assert all(p.requires_grad for p in d_params)

    g1, d1 = snap(model), snap(loss)
    with torch.no_grad():
        out = model(x)
    d_opt.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.grad = None
    aux_total(loss.aux_loss({}, {k: (v.detach() if torch.is_tensor(v) else v) for k, v in out.items()}, 0), "adv").backward()
    d_opt.step()
    assert any(not torch.equal(v, d1[k]) for k, v in snap(loss).items())
    assert all(torch.equal(v, g1[k]) for k, v in snap(model).items())
    assert all(p.grad is None for p in model.parameters())


def test_start_step_gates_both_sides():
    loss = adv(start_step=5)
    x = images(2)
    out = {"images": x, "recon": x.clone().requires_grad_()}
    assert loss.aux_loss({}, out, 4) is None
    assert loss({}, out, 4).terms["generator"].item() == 0.0 and loss.schedule(4) == 0.0
    assert loss.aux_loss({}, out, 5) is not None


def test_diffaug_keeps_shape_and_is_differentiable():
    torch.manual_seed(0)
    x = images(3).requires_grad_()
    y = diff_augment(x, ["color", "translation", "cutout"])
    assert y.shape == x.shape and torch.isfinite(y).all() and not torch.equal(y, x)
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # translation only moves pixels (or zero-fills): every output value is an input value or 0
    z = diff_augment(x.detach(), ["translation"])
    assert torch.isin(z, torch.cat([x.detach().flatten(), torch.zeros(1)])).all()


def test_lecam_hand_value_and_ema():
    loss = adv(lecam=0.1, lecam_decay=0.5)
    loss.ema_real.fill_(0.2)
    loss.ema_fake.fill_(-0.3)
    real, fake = torch.tensor([0.5, -1.0]), torch.tensor([0.0, 0.4])
    reg = loss._lecam(real, fake)
    ref = torch.tensor([0.8, 0.0]).pow(2).mean() + torch.tensor([0.2, 0.0]).pow(2).mean()
    assert reg.item() == pytest.approx(ref.item())
    assert loss.ema_real.item() == pytest.approx(0.5 * 0.2 + 0.5 * (-0.25))
    assert loss.ema_fake.item() == pytest.approx(0.5 * -0.3 + 0.5 * 0.2)


def test_patchgan_small_images_and_bf16():
    d = PatchGAN(8, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(d(images(2, 16)).float()).all()


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory):
    """A small timm ViT (same checkpoint format as DINOv2-S) saved to a local file."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "test_vit.pth"
    torch.save(timm.create_model("test_vit", pretrained=False, num_classes=0).state_dict(), path)
    return path


def test_dino_discriminator_loads_local_weights(vit_file):
    cfg = dict(discriminator=dict(type="dino", model="test_vit", weights=str(vit_file), resolution=32, blocks=[1, 3]))
    tiny_exp(losses=[{"type": "adversarial", **cfg}])  # validates
    loss = AdversarialLoss(AdversarialLoss.Config(**cfg))
    ref = torch.load(vit_file, weights_only=True)
    assert torch.equal(loss.discriminator.backbone.blocks[0].attn.qkv.weight, ref["blocks.0.attn.qkv.weight"])
    trainable = loss.aux_parameters()
    assert trainable and all(not p.requires_grad for p in loss.discriminator.backbone.parameters())
    assert {id(p) for p in trainable} == {id(p) for p in loss.discriminator.heads.parameters()}
    y = images(2).requires_grad_()
    loss({}, {"images": images(2), "recon": y}, 0).terms["generator"].backward()
    assert y.grad.abs().sum() > 0  # the generator's gradient passes through the frozen features
    d = loss.aux_loss({}, {"images": images(2), "recon": images(2, seed=3)}, 0)
    assert torch.isfinite(aux_total(d, "adversarial"))


def test_dino_missing_weights_fail_at_validation(tmp_path):
    with pytest.raises(ConfigError, match="needs discriminator.weights"):
        tiny_exp(losses=[{"type": "adversarial", "discriminator": "dino"}])
    missing = tmp_path / "dinov2_vits14.pth"
    with pytest.raises(ConfigError) as e:
        tiny_exp(losses=[{"type": "adversarial", "discriminator": {"type": "dino", "weights": str(missing)}}])
    assert str(missing) in str(e.value) and "\n" not in str(e.value)


def test_bcr_hand_value():
    loss = adv(bcr=4.0, bcr_policies=["cutout"])
    loss.eval()  # BatchNorm in eval: D is a fixed function of its input
    real, fake = images(2), images(2, seed=1)
    torch.manual_seed(7)
    d = loss.aux_loss({}, {"images": real, "recon": fake}, 0)
    torch.manual_seed(7)
    D = loss.discriminator
    lr_, lf = D(real), D(fake)
    ref = (D(diff_augment(real, ["cutout"])) - lr_).pow(2).mean() + (D(diff_augment(fake, ["cutout"])) - lf).pow(2).mean()
    assert d.terms["bcr"].item() == pytest.approx(4.0 * ref.item(), rel=1e-5)  # a term is weighted: summed as it is
    assert aux_total(d, "adversarial").item() == pytest.approx((hinge_d_loss(lr_, lf) + 4.0 * ref).item(), rel=1e-5)


def test_adaptive_weight_finds_terms_by_type_and_term_through_the_trainer():
    """Two pixel losses (labels pixel0, pixel1) and a perceptual-free adversarial: the trainer keys the
    weighted terms by (type, term), a repeated type's key holds the sum of both losses' terms, and
    the adaptive weight is the gradient-norm ratio of exactly that sum (pixel/l1 + pixel/l2)."""
    exp = tiny_exp(losses=[{"type": "pixel", "l1": 0.5}, {"type": "pixel", "l1": 0.0, "l2": 2.0},
                           {"type": "quantizer"}, {"type": "adversarial", "discriminator": {"type": "patchgan", "width": 8, "depth": 2}}])
    built = build(exp)
    assert built.labels == ["pixel0", "pixel1", "quantizer", "adversarial"]
    step = TrainStep(built.model, built.losses, built.labels)
    batch = torch.utils.data.default_collate([built.train_set[i] for i in range(2)])
    total, out, logs = step(batch, 0)
    lt = out["loss_terms"]
    assert set(lt) == {("pixel", "l1"), ("pixel", "l2"), ("quantizer", "commitment"), ("quantizer", "codebook"),
                       ("adversarial", "generator")}
    x, y = out["images"].float(), out["recon"].float()
    l1, l2 = F.l1_loss(y, x), F.mse_loss(y, x)
    assert lt[("pixel", "l1")].item() == pytest.approx((0.5 * l1 + 0.0 * l1).item(), rel=1e-6)
    assert lt[("pixel", "l2")].item() == pytest.approx((1.0 * l2 + 2.0 * l2).item(), rel=1e-6)
    assert logs["loss_w/pixel0/l2"].item() == pytest.approx(l2.item(), rel=1e-6)  # logged apart, by label
    assert logs["loss_w/pixel1/l2"].item() == pytest.approx(2 * l2.item(), rel=1e-6)
    adv_loss = built.losses[3]
    rec = lt[("pixel", "l1")] + lt[("pixel", "l2")]
    gen = -adv_loss.discriminator(out["recon"]).mean()
    w = out["last_layer"]
    g_rec = torch.autograd.grad(rec, w, retain_graph=True)[0].norm()
    g_gen = torch.autograd.grad(gen, w, retain_graph=True)[0].norm()
    ratio = (g_rec / (g_gen + 1e-6)).clamp(0.015, 1e4)
    assert ratio.item() != pytest.approx(1.0)
    assert logs["loss/adversarial/adaptive_weight"].item() == pytest.approx(ratio.item(), rel=1e-4)


def test_adaptive_from_names_type_term_pairs():
    assert AdversarialLoss.Config().adaptive_terms == {("pixel", "l1"), ("pixel", "l2"), ("perceptual", "lpips")}
    for bad in ["pixel", "pixel/", "a/b/c"]:
        with pytest.raises(ConfigError) as e:
            tiny_exp(losses=[{"type": "adversarial", "adaptive_from": [bad]}])
        msg = str(e.value)
        assert "\n" not in msg and "losses.0.adaptive_from" in msg and "<type>/<term>" in msg, msg
