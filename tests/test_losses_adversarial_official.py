"""The GAN recipe of UniTok's official trainer (issue 11, item 13): adaptive-weight epsilon, D's
optimizer and learning-rate schedule (and the trainer hook that applies it), the blur fade-in,
cutout 0.2, bCR on T(x), and the DINO discriminator's conv heads / crop, each against a hand value
or a reference written here from the official layout (FoundationVision/UniTok)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from conftest import tiny_experiment
from core.config import load_experiment, validate
from core.errors import ConfigError
from losses_helpers import images
from plugins.losses import adversarial as A
from plugins.losses.adversarial import AdversarialLoss

ROOT = Path(__file__).resolve().parent.parent


def adv(**kw) -> AdversarialLoss:
    torch.manual_seed(0)
    return AdversarialLoss(AdversarialLoss.Config(discriminator={"type": "patchgan", "width": 8, "depth": 2}, **kw))


# ---- adaptive weight -------------------------------------------------------------------------------


def test_adaptive_weight_eps_is_unitoks_1e6():
    w = torch.zeros(2, requires_grad=True)
    rec, gen = 3 * w.sum(), 1e-5 * w.sum()  # gradient norms 3 sqrt 2 and 1e-5 sqrt 2
    got = A.adaptive_weight(rec, gen, w, 0.0, 1e9)
    assert got.item() == pytest.approx(3 * math.sqrt(2) / (1e-5 * math.sqrt(2) + 1e-6), rel=1e-6)
    vqgan = A.adaptive_weight(rec, gen, w, 0.0, 1e9, eps=1e-4)
    assert vqgan.item() == pytest.approx(3 * math.sqrt(2) / (1e-5 * math.sqrt(2) + 1e-4), rel=1e-6)
    assert AdversarialLoss.Config().adaptive_eps == 1e-6


# ---- D's optimizer and schedule --------------------------------------------------------------------------


def unitok_lr_multiplier(cur: float, warmup: float, max_iter: float, end: float = 0.1) -> float:
    """UniTok utils/scheduler.py LRScheduler.step with type 'cos', start_factor 0 (lr_start_ratio)."""
    if cur < warmup:
        return cur / warmup
    past = (cur - warmup) / (max_iter - warmup - 1)
    return end + (1 - end) * (0.5 + 0.5 * math.cos(math.pi * past))


def test_d_lr_schedule_equals_unitok_disc_scheduler():
    cfg = AdversarialLoss.Config(start_step=100, optimizer=dict(warmup_steps=30, schedule="cosine", decay_steps=1000))
    assert A.d_lr_factor(99, cfg) == 0.0
    assert A.d_lr_factor(100, cfg) == 0.0 and A.d_lr_factor(115, cfg) == pytest.approx(0.5)
    assert A.d_lr_factor(130, cfg) == pytest.approx(1.0) and A.d_lr_factor(1099, cfg) == pytest.approx(0.1)
    for s in range(100, 1100, 7):  # main.py: disc_scheduler.step(global_iter - disc_start_iter)
        assert A.d_lr_factor(s, cfg) == pytest.approx(unitok_lr_multiplier(s - 100, 30, 1000), abs=1e-12)
    const = AdversarialLoss.Config(start_step=10, optimizer=dict(warmup_steps=4))
    assert [A.d_lr_factor(s, const) for s in (9, 10, 12, 14, 500)] == [0.0, 0.0, 0.5, 1.0, 1.0]
    with pytest.raises(ValueError, match="decay_steps"):
        AdversarialLoss.Config(optimizer=dict(schedule="cosine", warmup_steps=10, decay_steps=5))


def test_d_optimizer_groups_and_before_aux_step():
    loss = adv(start_step=0, optimizer=dict(warmup_steps=4, grad_clip=1.0))
    params = loss.aux_parameters()
    opt = loss.aux_optimizer(params)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.2 and all(p.ndim >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(params) and opt.defaults["eps"] == 1e-6
    for p in params:
        p.grad = torch.full_like(p, 3.0)
    loss.before_aux_step(opt, 1)
    assert all(g["lr"] == pytest.approx(2e-5 * 0.25) for g in opt.param_groups)
    norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in params))
    assert norm.item() == pytest.approx(1.0, rel=1e-5)


def test_trainer_applies_the_d_schedule_each_step(in_tmp, monkeypatch):
    seen = []
    original = AdversarialLoss.before_aux_step

    def record(self, optimizer, step):
        original(self, optimizer, step)
        seen.append((step, optimizer.param_groups[0]["lr"]))

    monkeypatch.setattr(AdversarialLoss, "before_aux_step", record)
    cfg = tiny_experiment(**{"train.steps": 5, "train.ckpt_every": 100})
    cfg["losses"] = [{"type": "pixel"}, {"type": "quantizer"},
                     {"type": "adversarial", "discriminator": {"type": "patchgan", "width": 8, "depth": 2}, "start_step": 2,
                      "optimizer": {"warmup_steps": 2, "lr": 1e-3}}]
    from core.trainer import train

    train(validate(cfg))
    assert [s for s, _ in seen] == [2, 3, 4]
    assert [lr for _, lr in seen] == pytest.approx([0.0, 0.5e-3, 1e-3])


# ---- blur fade-in, cutout, bCR ----------------------------------------------------------------------------


def test_blur_kernel_hand_values_and_brute_force():
    """sigma 1 -> radius 3, kernel 2^(-t^2) = (2^-9, 2^-4, 2^-1, 1, 2^-1, 2^-4, 2^-9) / sum."""
    x = images(2, 12, seed=3)
    k = torch.tensor([2.0**-9, 2.0**-4, 0.5, 1.0, 0.5, 2.0**-4, 2.0**-9])
    k = k / k.sum()
    pad = F.pad(x, [3] * 4, mode="reflect")
    ref = torch.zeros_like(x)
    for i in range(7):
        for j in range(7):
            ref += k[i] * k[j] * pad[..., i:i + 12, j:j + 12]
    assert torch.allclose(A.gaussian_blur(x, 1.0), ref, atol=1e-6)
    assert torch.equal(A.gaussian_blur(x, 0.3), x)  # radius floor(0.9) = 0: no blur


def test_blur_fades_over_blur_fade_steps():
    cfg = AdversarialLoss.Config(start_step=100, blur_fade_steps=40)
    sigma0 = math.sqrt(256 * 0.5)  # UniTok: sqrt(H / 2)
    assert A.blur_sigma(99, cfg, 256) == 0.0
    assert A.blur_sigma(100, cfg, 256) == pytest.approx(sigma0)
    assert A.blur_sigma(110, cfg, 256) == pytest.approx(0.75 * sigma0)
    assert A.blur_sigma(140, cfg, 256) == 0.0 and A.blur_sigma(10**6, cfg, 256) == 0.0
    assert A.blur_sigma(100, AdversarialLoss.Config(start_step=100), 256) == 0.0  # off by default
    # D sees the blurred view: with translation off and BN frozen, D(x) == D(blur(x))
    loss = adv(start_step=0, blur_fade_steps=10).eval()
    x = images(2, 16, seed=4)
    assert torch.allclose(loss._d(x, 5), loss.discriminator(A.gaussian_blur(x, math.sqrt(8) * 0.5)), atol=1e-6)


def test_cutout_ratio_hole_size():
    x = torch.ones(64, 3, 20, 20)
    torch.manual_seed(0)
    holes = (A.diff_augment(x, ["cutout"]) == 0).all(1).sum((1, 2))  # default 0.2: 4 x 4 holes, clipped
    assert holes.max() == 16 and (holes <= 16).all() and (holes > 0).all()
    holes = (A.diff_augment(x, ["cutout"], cutout_ratio=0.5) == 0).all(1).sum((1, 2))
    assert holes.max() == 100


def test_bcr_view_is_t_of_the_raw_image():
    loss = adv(bcr=4.0, diffaug=["translation"], bcr_policies=["cutout"])
    loss.eval()  # BatchNorm in eval: D is a fixed function of its input
    real, fake = images(2), images(2, seed=1)
    torch.manual_seed(7)
    d = loss.aux_loss({}, {"images": real, "recon": fake}, 0)
    torch.manual_seed(7)  # same random draws, same order
    D = loss.discriminator
    lr_, lf = D(A.diff_augment(real, ["translation"])), D(A.diff_augment(fake, ["translation"]))
    ref = (D(A.diff_augment(real, ["cutout"])) - lr_).pow(2).mean() + (D(A.diff_augment(fake, ["cutout"])) - lf).pow(2).mean()
    assert d.terms["bcr"].item() == pytest.approx(4.0 * ref.item(), rel=1e-5)  # terms carry their weight


# ---- DINO discriminator ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "test_vit.pth"
    torch.save(timm.create_model("test_vit", pretrained=False, num_classes=0).state_dict(), path)
    return path


def unitok_head(tokens: torch.Tensor, sd: dict, prefix: str, kernel: int) -> torch.Tensor:
    """UniTok models/discrim.py: heads[i] = Sequential(make_block(C, 1), ResidualBlock(make_block(C, ks)),
    Conv1d(C, 1, 1)); make_block = Conv1d (circular padding) -> GroupNorm(32, eps 1e-6) -> LeakyReLU(0.2);
    ResidualBlock: (fn(x) + x) / sqrt(2). tokens (B, C, L)."""
    def block(x, i, k):
        x = F.conv1d(F.pad(x, (k // 2, k // 2), mode="circular"), sd[f"{prefix}{i}.0.weight"], sd[f"{prefix}{i}.0.bias"])
        x = F.group_norm(x, 32, sd[f"{prefix}{i}.1.weight"], sd[f"{prefix}{i}.1.bias"], eps=1e-6)
        return F.leaky_relu(x, 0.2)
    h = block(tokens, "0", 1)
    h = (block(h, "1.fn", kernel) + h) * (1 / math.sqrt(2))
    return F.conv1d(h, sd[f"{prefix}2.weight"], sd[f"{prefix}2.bias"]).flatten(1)


def to_unitok_keys(sd: dict) -> dict:
    """vtok head keys -> UniTok's ``heads.{i}.{0 | 1.fn | 2}...`` (block, residual block, output conv)."""
    return {k.replace(".inp.", ".0.").replace(".res.", ".1.fn.").replace(".out.", ".2."): v for k, v in sd.items()}


def test_dino_conv_heads_equal_unitok_layout(vit_file):
    layers = [0, 2, 5]
    loss = AdversarialLoss(AdversarialLoss.Config(discriminator=dict(type="dino", model="test_vit", weights=str(vit_file),
                                                                     resolution=32, blocks=layers)))
    D = loss.discriminator
    with torch.no_grad():  # non-trivial GroupNorm affine parameters
        for p in D.heads.parameters():
            if p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    C = D.backbone.embed_dim
    per_head = (C * C + C) + 2 * C + (C * C * 9 + C) + 2 * C + (C + 1)  # UniTok head parameter count
    assert sum(p.numel() for p in loss.aux_parameters()) == 3 * per_head
    x = images(2, 32, seed=5)  # already 32 px: bicubic to the same size is the identity
    got = D(x)
    # reference: DINOv2 get_intermediate_layers(n=layers, return_class_token=True, norm=False) on
    # ((x + 1) / 2 - mean) / std; patch tokens + class token, (B, C, L), through each head
    m = D.backbone
    h = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(((x + 1) / 2 - D.mean) / D.std))))
    acts = []
    for i, blk in enumerate(m.blocks):
        h = blk(h)
        if i in layers:
            acts.append((h[:, m.num_prefix_tokens:] + h[:, :1]).transpose(1, 2))
    sd = to_unitok_keys({f"heads.{k}": v for k, v in D.heads.state_dict().items()})
    assert len(sd) == 3 * 10
    ref = torch.cat([unitok_head(a, sd, f"heads.{j}.", 9) for j, a in enumerate(acts)], dim=1)
    assert got.shape == (2, 3 * 4) and torch.allclose(got, ref, atol=1e-5)
    # init as UniTok's init_weights(disc, -0.5): conv weights xavier-normal with gain 0.5, zero biases
    w = AdversarialLoss(AdversarialLoss.Config(discriminator=dict(type="dino", model="test_vit", weights=str(vit_file),
                                                                  resolution=32, blocks=[0]))).discriminator.heads[0].res[0]
    assert w.bias.abs().sum() == 0
    assert w.weight.std().item() == pytest.approx(0.5 * math.sqrt(2 / (C * 9 + C * 9)), rel=0.05)


def test_dino_input_crop_or_area():
    x = images(2, 36, seed=6)
    area = F.interpolate(x, size=(32, 32), mode="area")
    crops = {(t, l): x[..., t:t + 32, l:l + 32] for t in range(5) for l in range(5)}
    kinds = set()
    for seed in range(20):
        torch.manual_seed(seed)
        y = A.dino_input(x, 32, "crop_or_area")
        if torch.equal(y, area):
            kinds.add("area")
        else:
            assert any(torch.equal(y, c) for c in crops.values())
            kinds.add("crop")
    assert kinds == {"area", "crop"}
    small = images(1, 28, seed=7)
    assert torch.equal(A.dino_input(small, 32, "crop_or_area"), F.interpolate(small, size=(32, 32), mode="bicubic"))


def test_defaults_follow_unitok():
    cfg = AdversarialLoss.Config()
    dino = A.DinoConfig.model_construct()  # defaults without the (required) weights file
    assert dino.blocks == [0, 2, 5, 8, 11] and dino.head == "conv" and dino.kernel_size == 9
    assert dino.class_token and dino.resolution == 252 == 256 // 14 * 14
    o = cfg.optimizer
    assert (o.weight_decay, o.eps, o.grad_clip, cfg.cutout_ratio) == (0.2, 1e-6, 10.0, 0.2)
    assert cfg.bcr_policies == ["translation", "color", "cutout"] and not cfg.bcr_on_diffaug


def test_full_config_gan_section_is_the_official_recipe(tmp_path):
    from test_full_configs import weight_overrides

    path = ROOT / "experiments" / "full" / "unitok_vitamin_large.yaml"
    exp = load_experiment(path, weight_overrides(path, tmp_path))
    gan = exp.losses[4]
    steps = exp.train.steps
    start, warm = 0.375 * steps, 0.03 * steps  # utils/config.py: disc_start_ep 0.375, disc_warmup_ep 0.03
    assert gan.type == "adversarial" and gan.start_step == int(start) and gan.warmup_steps == round(warm)
    assert gan.blur_fade_steps == round(2 * warm) and gan.optimizer.warmup_steps == round(warm)
    assert gan.optimizer.schedule == "cosine" and gan.optimizer.decay_steps == round(steps - start) and gan.optimizer.min_lr_ratio == 0.1
    assert gan.bcr == 4.0 and gan.diffaug == ["translation", "color", "cutout"] and gan.cutout_ratio == 0.2
    assert gan.optimizer.weight_decay == 0.2 and gan.adaptive_eps == 1e-6 and gan.weight == 0.4
    assert gan.discriminator.blocks == [0, 2, 5, 8, 11] and gan.discriminator.resolution == 252 and gan.discriminator.head == "conv"
    # the generator's adversarial weight: 0 before the start, then 0.4 x (s - start + 1) / 1831 up to 0.4
    # (UniTok: 0.4 x (s - start) / (0.03 x steps); one step apart)
    from types import SimpleNamespace

    sched = lambda s: AdversarialLoss.schedule(SimpleNamespace(cfg=gan), s)  # noqa: E731
    assert sched(22887) == 0.0 and sched(22888 + 915) == pytest.approx(0.4 * 916 / 1831) and sched(10**5) == 0.4


def test_cosine_without_horizon_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^losses\.0\.optimizer: value error, schedule cosine needs decay_steps"):
        validate(tiny_experiment(losses=[{"type": "adversarial", "optimizer": {"schedule": "cosine"}}]))
