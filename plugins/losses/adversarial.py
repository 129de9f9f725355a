"""Adversarial loss with its own discriminator and optimizer (VQGAN / UniTok recipe).

- D: hinge loss ``mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat)))`` (+ optional LeCAM).
- G: ``-mean D(x_hat)`` times the adaptive weight of VQGAN (Esser et al. 2021, eq. 7)
  ``lambda = ||grad_L L_rec|| / (||grad_L L_G|| + adaptive_eps)`` at the decoder's last layer L,
  clamped to [0.015, 1e4] (UniTok), where ``L_rec`` is the sum of the weighted terms named in
  ``adaptive_from`` as ``<loss type>/<term>`` (default ``pixel/l1``, ``pixel/l2``,
  ``perceptual/lpips``), read by (type, term) from ``outputs["loss_terms"]`` (the terms computed
  this step; a type configured twice counts with both losses' terms). The loss weight
  (UniTok: 0.4), start step and warm-up ramp (UniTok: 3% of training) come from the common
  schedule; D trains from ``start_step`` on.
- Discriminators (``discriminator: {type: ...}``): ``patchgan`` (VQGAN's N-layer PatchGAN) or ``dino``
  (UniTok: frozen DINOv2-S features from timm, weights read from a local file, with trainable
  per-level token heads).
- ``optimizer``: D's AdamW settings (the same fields as ``train.optimizer``) plus its schedule and clip.
- Optional DiffAugment (Zhao et al. 2020; colour, translation, cutout) on both real and fake inputs,
  a Gaussian blur of D's inputs that fades out after ``start_step``, LeCAM regularisation (Tseng
  et al. 2021) against EMAs of D's outputs, and bCR (UniTok: 4.0).
- D's AdamW has its own learning-rate schedule (linear warm-up from 0, then constant or cosine),
  weight decay on its weight matrices only, and gradient clipping, applied in
  :meth:`AdversarialLoss.before_aux_step`, which the trainer calls before each D step.

What follows UniTok's public code (FoundationVision/UniTok), each an option:
``adaptive_eps`` 1e-6 (``trainer.py`` ``Trainer.train_step``; VQGAN: 1e-4); DiffAug = translation,
colour, cutout of 0.2 each applied with probability 1 (``utils/diffaug.py`` ``DiffAug.aug``,
``disc_aug_prob 1``); the blur fade-in: sigma = sqrt(H / 2) x (1 - (s - start) / blur_fade_steps),
kernel ``2^(-(t / sigma)^2)`` over |t| <= floor(3 sigma), reflect padding (``DiffAug.aug``,
``fade_blur_schedule`` in ``main.py`` ``train_one_ep``: 2 x the 3% D warm-up); bCR on ``T(x)``
without the DiffAug view (``Trainer.train_step``: ``bcr_strong_aug``, cutout 0.2); D's optimizer
(``utils/optimizer.py`` ``build_optimizer('dis')``: AdamW betas (0.5, 0.9), eps 1e-6, lr 2e-5,
weight decay 0.2 except on 1-d parameters, clip 10) and schedule (``main.py`` ``disc_schedule`` with
``utils/scheduler.py`` ``LRScheduler``: warm-up from 0 over 3% of training after the D start, then
cosine to 0.1x at the end of training); the DINO heads (``models/discrim.py`` ``DinoDiscV2`` built by
``models/__init__.py`` ``build_discriminator``: blocks 0, 2, 5, 8, 11; per block a head Conv1d(k=1)
-> GroupNorm(32, eps 1e-6) -> LeakyReLU(0.2), then a residual Conv1d(k=9, circular) -> GroupNorm ->
LeakyReLU scaled by 1/sqrt(2), then Conv1d(C, 1, k=1), on patch tokens plus the class token;
inputs cropped at random or area-resized (1/2 each) to 252 px for 256-px images; conv weights
xavier-normal gain 0.5, ``init_weights``). ``discriminator: {type: dino, head: mlp, resize: bilinear}`` keep vtok's
earlier head (LayerNorm -> Linear -> LeakyReLU -> Linear per patch token) and bilinear resize.

Result: term ``generator`` (adaptive weight included); metrics ``adaptive_weight``, ``logits_fake``.
D's side (:meth:`AdversarialLoss.aux_loss`): terms ``hinge``, ``lecam`` and ``bcr`` (each times its
weight, summed and minimised); metrics ``logits_real``, ``logits_fake``. Reads only the outputs
(``images``, ``recon``, ``last_layer``, ``loss_terms``); the model is not kept.
"""
from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Optional, Union

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

from core.hookspecs import hookimpl
from core.interfaces import Loss, LossConfig, LossResult, OptimizerConfig, VocabModel
from plugins.local_weights import load_timm_local, require_file

Aug = Literal["color", "translation", "cutout"]


class PatchGANConfig(VocabModel):
    """VQGAN's N-layer PatchGAN."""

    type: Literal["patchgan"] = "patchgan"
    width: int = Field(64, gt=0)  # channels of the first layer
    depth: int = Field(3, ge=1)  # stride-2 layers (VQGAN's n_layers)


class DinoConfig(VocabModel):
    """Frozen DINOv2 features (timm, local weights) with trainable per-block token heads (UniTok)."""

    renamed = {"layers": "blocks"}  # indices of blocks, not a count
    type: Literal["dino"] = "dino"
    model: str = "vit_small_patch14_dinov2"  # timm model name
    weights: Optional[str] = None  # local weights file of ``model`` (required)
    resolution: int = Field(252, gt=0)  # backbone input size (UniTok: 256 // 14 * 14 = 252)
    resize: Literal["crop_or_area", "bilinear"] = "crop_or_area"  # random crop / area resize (UniTok) or bilinear
    blocks: list[int] = Field(default_factory=lambda: [0, 2, 5, 8, 11])  # blocks whose tokens D reads (UniTok)
    head: Literal["conv", "mlp"] = "conv"  # UniTok's Conv1d/GroupNorm heads, or vtok's per-token MLP
    kernel_size: int = Field(9, ge=1)  # conv head: kernel of the residual Conv1d (UniTok: 9)
    class_token: bool = True  # add the class token to every patch token (UniTok)

    @model_validator(mode="after")
    def _weights_present(self) -> "DinoConfig":
        if self.weights is None:
            raise ValueError(f"discriminator 'dino' needs discriminator.weights: a local {self.model} weights file")
        require_file(self.weights, f"discriminator.weights ({self.model} weights)")
        return self


DiscriminatorConfig = Annotated[Union[PatchGANConfig, DinoConfig], Field(discriminator="type")]


class DiscriminatorOptimizerConfig(OptimizerConfig):
    """D's AdamW (UniTok's defaults; weight decay not on 1-d parameters), its learning-rate schedule
    after ``start_step`` and its gradient clip."""

    lr: float = Field(2e-5, gt=0)  # (UniTok)
    betas: tuple[float, float] = (0.5, 0.9)  # (UniTok)
    eps: float = Field(1e-6, gt=0)  # (UniTok)
    weight_decay: float = Field(0.2, ge=0)  # (UniTok)
    grad_clip: Optional[float] = Field(10.0, gt=0)  # clip of D's gradient norm (UniTok: 10); null: off
    warmup_steps: int = Field(0, ge=0)  # D's lr rises linearly from 0 over this many steps after start_step
    schedule: Literal["constant", "cosine"] = "constant"  # D's lr after warm-up (UniTok: cosine)
    decay_steps: int = Field(0, ge=0)  # cosine: steps from start_step to the end of training
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # cosine: final lr / lr (UniTok: 0.1)

    @model_validator(mode="after")
    def _horizon(self) -> "DiscriminatorOptimizerConfig":
        if self.schedule == "cosine" and self.decay_steps <= self.warmup_steps:
            raise ValueError(f"schedule cosine needs decay_steps > warmup_steps ({self.warmup_steps}): "
                             "the steps from start_step to the end of training")
        return self


_RENAMED = {"width": "discriminator.width", "n_layers": "discriminator.depth"}
_RENAMED |= {f"dino_{k}": f"discriminator.{v}" for k, v in [
    ("model", "model"), ("weights", "weights"), ("resolution", "resolution"), ("resize", "resize"),
    ("layers", "blocks"), ("head", "head"), ("kernel_size", "kernel_size"), ("class_token", "class_token")]}
_RENAMED |= {f"d_{k}": f"optimizer.{k}" for k in [
    "lr", "betas", "eps", "weight_decay", "grad_clip", "warmup_steps", "schedule", "decay_steps", "min_lr_ratio"]}


class AdversarialConfig(LossConfig):
    renamed = _RENAMED
    type: Literal["adversarial"] = "adversarial"
    discriminator: DiscriminatorConfig = Field(default_factory=PatchGANConfig)  # by type; a bare name takes its defaults
    optimizer: DiscriminatorOptimizerConfig = Field(default_factory=DiscriminatorOptimizerConfig)  # D's AdamW and lr schedule
    adaptive: bool = True  # VQGAN adaptive weight (else 1)
    # weighted terms forming L_rec, as <loss type>/<term> (a missing one counts nothing)
    adaptive_from: list[str] = Field(default_factory=lambda: ["pixel/l1", "pixel/l2", "perceptual/lpips"])
    adaptive_min: float = Field(0.015, ge=0)  # clamp of the adaptive weight (UniTok: 0.015)
    adaptive_max: float = Field(1e4, gt=0)  # (UniTok: 1e4)
    adaptive_eps: float = Field(1e-6, ge=0)  # added to ||grad L_G|| (UniTok: 1e-6; VQGAN: 1e-4)
    diffaug: list[Aug] = Field(default_factory=list)  # DiffAugment policies in order (UniTok: translation, color, cutout)
    cutout_ratio: float = Field(0.2, gt=0, le=1)  # cutout hole side / image side (UniTok: 0.2; DiffAugment: 0.5)
    blur_fade_steps: int = Field(0, ge=0)  # blur of D's inputs fading to 0 over this many steps after start_step (0: off)
    lecam: float = Field(0.0, ge=0)  # LeCAM regularisation weight (0: off)
    lecam_decay: float = Field(0.99, gt=0, lt=1)  # EMA decay of D's mean outputs for LeCAM
    bcr: float = Field(0.0, ge=0)  # balanced consistency regularisation weight (UniTok: 4.0; 0: off)
    bcr_policies: list[Aug] = Field(default_factory=lambda: ["translation", "color", "cutout"])  # bCR's T (UniTok)
    bcr_on_diffaug: bool = False  # bCR view D(T(x)) (UniTok) or T on top of the DiffAug view

    @field_validator("discriminator", mode="before")
    @classmethod
    def _bare_name(cls, v: Any) -> Any:
        return {"type": v} if isinstance(v, str) else v

    @field_validator("adaptive_from")
    @classmethod
    def _type_term_pairs(cls, v: list[str]) -> list[str]:
        for entry in v:
            if entry.count("/") != 1 or not all(entry.split("/")):
                raise ValueError(f"'{entry}': name a (loss type, term) pair as <type>/<term>, e.g. pixel/l2 "
                                 "(a bare loss type is retired)")
        return v

    @property
    def adaptive_terms(self) -> set[tuple[str, str]]:
        """``adaptive_from`` as (loss type, term) keys of ``outputs["loss_terms"]``."""
        return {tuple(entry.split("/")) for entry in self.adaptive_from}  # type: ignore[misc]


# ---- discriminators ------------------------------------------------------------------------


class PatchGAN(nn.Module):
    """VQGAN's N-layer PatchGAN (Isola et al. 2017): 4x4 convs, BatchNorm, LeakyReLU(0.2); logits per patch."""

    def __init__(self, width: int = 64, depth: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = width
        for i in range(1, depth + 1):
            out = width * min(2**i, 8)
            stride = 2 if i < depth else 1
            layers += [nn.Conv2d(ch, out, 4, stride, 1, bias=False), nn.BatchNorm2d(out), nn.LeakyReLU(0.2)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        # depth halvings, then two 4x4 stride-1 convs that each remove one pixel
        self.min_size = 3 * 2**depth
        for m in self.modules():  # VQGAN's init
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        if min(x.shape[-2:]) < self.min_size:  # tiny images: upsample so the last 4x4 convs fit
            x = F.interpolate(x, size=(self.min_size,) * 2, mode="bilinear", align_corners=False)
        return self.net(x).flatten(1)


def _conv_block(dim: int, kernel: int) -> nn.Sequential:
    """UniTok's ``make_block`` with GroupNorm: Conv1d (circular padding) -> GroupNorm(32) -> LeakyReLU(0.2)."""
    return nn.Sequential(nn.Conv1d(dim, dim, kernel, padding=kernel // 2, padding_mode="circular"),
                         nn.GroupNorm(math.gcd(32, dim), dim, eps=1e-6), nn.LeakyReLU(0.2))


class ConvTokenHead(nn.Module):
    """UniTok's DINO head on tokens ``(B, L, C)``: block(k=1), residual block(k) / sqrt(2), Conv1d(C, 1)."""

    def __init__(self, dim: int, kernel: int) -> None:
        super().__init__()
        self.inp, self.res, self.out = _conv_block(dim, 1), _conv_block(dim, kernel), nn.Conv1d(dim, 1, 1)
        for m in self.modules():  # UniTok init_weights(disc, -0.5): xavier-normal gain 0.5, zero bias
            if isinstance(m, nn.Conv1d):
                nn.init.xavier_normal_(m.weight, gain=0.5)
                nn.init.zeros_(m.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.inp(tokens.transpose(1, 2))
        h = (self.res(h) + h) / math.sqrt(2)
        return self.out(h).flatten(1)


def dino_input(x: Tensor, size: int, mode: str) -> Tensor:
    """Images ``(B, 3, H, W)`` -> ``size`` x ``size``. ``crop_or_area`` (UniTok ``DinoDiscV2.forward``):
    when larger, one random crop for the batch or an area resize, 1/2 each; else bicubic."""
    if mode == "bilinear":
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    h, w = x.shape[-2:]
    if h > size and w > size:
        if torch.rand(()).item() <= 0.5:  # CPU generator: no device sync
            top, left = (int(torch.randint(n - size + 1, ())) for n in (h, w))
            return x[..., top:top + size, left:left + size]
        return F.interpolate(x, size=(size, size), mode="area")
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)


class DinoDiscriminator(nn.Module):
    """Frozen DINOv2 ViT; trainable per-level token heads (UniTok's conv heads, or vtok's MLP)."""

    def __init__(self, model: str, weights: str, resolution: int, blocks: list[int], head: str = "conv",
                 kernel: int = 9, class_token: bool = True, resize: str = "crop_or_area") -> None:
        super().__init__()
        self.backbone = load_timm_local(model, weights, img_size=resolution, num_classes=0)
        self.backbone.eval().requires_grad_(False)
        self.resolution, self.blocks, self.class_token, self.resize = resolution, list(blocks), class_token, resize
        dim = self.backbone.embed_dim
        cfg = self.backbone.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1), persistent=False)
        if head == "conv":
            self.heads = nn.ModuleList(ConvTokenHead(dim, kernel) for _ in blocks)
        else:
            self.heads = nn.ModuleList(
                nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.LeakyReLU(0.2), nn.Linear(dim, 1)) for _ in blocks
            )

    def train(self, mode: bool = True) -> "DinoDiscriminator":
        super().train(mode)
        self.backbone.eval()  # frozen features: no dropout / drop-path ever
        return self

    def forward(self, x: Tensor) -> Tensor:
        x = dino_input(((x.float() + 1) / 2 - self.mean) / self.std, self.resolution, self.resize)
        feats = self.backbone.forward_intermediates(x, indices=self.blocks, return_prefix_tokens=True,
                                                    intermediates_only=True, output_fmt="NLC", norm=False)
        out = []
        for head, (patches, prefix) in zip(self.heads, feats):
            tokens = patches.float() + prefix[:, :1].float() if self.class_token else patches.float()
            out.append(head(tokens).flatten(1))
        return torch.cat(out, dim=1)


# ---- DiffAugment (written afresh; same transform for a whole batch call) ---------------------


def diff_augment(x: Tensor, policies: list[str], cutout_ratio: float = 0.2) -> Tensor:
    """Differentiable augmentations of images in [-1, 1] (Zhao et al. 2020), in the listed order."""
    for p in policies:
        x = _cutout(x, cutout_ratio) if p == "cutout" else _AUGS[p](x)
    return x


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """UniTok's fade-in blur (``DiffAug.aug``): separable kernel ``2^(-(t / sigma)^2)`` normalised, over
    |t| <= floor(3 sigma) (no blur below 1 pixel), reflect padding; float32."""
    x = x.float()
    radius = min(math.floor(3 * sigma), min(x.shape[-2:]) - 1)
    if sigma <= 0 or radius < 1:
        return x
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
    k = torch.exp2(-(t / sigma).square())
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, [radius] * 4, mode="reflect")
    x = F.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)


def _color(x: Tensor) -> Tensor:
    b = x.shape[0]
    r = lambda: torch.rand(b, 1, 1, 1, device=x.device, dtype=x.dtype)  # noqa: E731
    x = x + (r() - 0.5)  # brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (r() * 2) + mean  # saturation
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (r() + 0.5) + mean  # contrast


def _translation(x: Tensor, ratio: float = 0.125) -> Tensor:
    b, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-sh, sh + 1, (b,), device=x.device)
    dx = torch.randint(-sw, sw + 1, (b,), device=x.device)
    ys = (torch.arange(h, device=x.device)[None] + dy[:, None]).clamp(-1, h)  # -1 / h: the zero border
    xs = (torch.arange(w, device=x.device)[None] + dx[:, None]).clamp(-1, w)
    padded = F.pad(x, (1, 1, 1, 1))
    bi = torch.arange(b, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[bi, ys[:, :, None] + 1, xs[:, None, :] + 1].permute(0, 3, 1, 2)


def _cutout(x: Tensor, ratio: float = 0.2) -> Tensor:
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    y0 = torch.randint(0, h, (b, 1, 1), device=x.device) - ch // 2  # hole centre anywhere, clipped
    x0 = torch.randint(0, w, (b, 1, 1), device=x.device) - cw // 2
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    hole = (ys >= y0) & (ys < y0 + ch) & (xs >= x0) & (xs < x0 + cw)
    return x * (~hole).unsqueeze(1).to(x.dtype)


_AUGS = {"color": _color, "translation": _translation, "cutout": _cutout}


# ---- the loss --------------------------------------------------------------------------------


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """``mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat)))`` (each side averaged, then summed)."""
    return F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean()


def adaptive_weight(rec: Tensor, gen: Tensor, last_layer: Tensor, lo: float, hi: float, eps: float = 1e-6) -> Tensor:
    """VQGAN eq. 7: ``||d rec / d W|| / (||d gen / d W|| + eps)`` clamped to [lo, hi], detached
    (eps: UniTok 1e-6, VQGAN 1e-4)."""
    g_rec = torch.autograd.grad(rec, last_layer, retain_graph=True)[0]
    g_gen = torch.autograd.grad(gen, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_gen.norm() + eps)).clamp(lo, hi).detach()


def d_lr_factor(step: int, cfg: "AdversarialConfig") -> float:
    """D's learning rate / ``optimizer.lr`` at ``step`` (UniTok ``LRScheduler.step`` on ``step - start_step``):
    0 before the start, linear warm-up from 0, then 1 or a cosine to ``optimizer.min_lr_ratio`` at the end."""
    s, o = step - cfg.start_step, cfg.optimizer
    if s < 0:
        return 0.0
    if s < o.warmup_steps:
        return s / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    past = min(1.0, (s - o.warmup_steps) / max(1, o.decay_steps - o.warmup_steps - 1))
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * (0.5 + 0.5 * math.cos(math.pi * past))


def blur_sigma(step: int, cfg: "AdversarialConfig", size: int) -> float:
    """UniTok's fade-in: sigma = sqrt(size / 2) x (1 - (step - start) / blur_fade_steps), 0 when off or done."""
    if cfg.blur_fade_steps <= 0 or step < cfg.start_step:
        return 0.0
    fade = 1.0 - min(1.0, (step - cfg.start_step) / cfg.blur_fade_steps)
    return math.sqrt(size * 0.5) * fade if fade >= 1e-6 else 0.0


class AdversarialLoss(Loss):
    """GAN loss with a plugin-owned discriminator and AdamW (terms ``generator`` + diagnostics)."""

    Config = AdversarialConfig
    order = 10  # after the reconstruction terms the adaptive weight balances against

    def __init__(self, cfg: AdversarialConfig, model: Any = None) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.discriminator
        if isinstance(d, DinoConfig):
            self.discriminator: nn.Module = DinoDiscriminator(
                d.model, d.weights, d.resolution, d.blocks, d.head, d.kernel_size, d.class_token, d.resize)
        else:
            self.discriminator = PatchGAN(d.width, d.depth)
        self.register_buffer("ema_real", torch.zeros(()))  # LeCAM anchors
        self.register_buffer("ema_fake", torch.zeros(()))

    def _d(self, x: Tensor, step: int = -1) -> Tensor:
        """D on the blurred (fade-in), DiffAugmented view of x."""
        sigma = blur_sigma(step, self.cfg, x.shape[-2])
        x = gaussian_blur(x, sigma) if sigma > 0 else x
        return self.discriminator(diff_augment(x, self.cfg.diffaug, self.cfg.cutout_ratio)).float()

    def _rec_loss(self, outputs: dict[str, Any]) -> Optional[Tensor]:
        """Sum of the weighted terms named in ``adaptive_from`` (keys ``(type, term)``) that carry a gradient."""
        wanted = self.cfg.adaptive_terms
        terms = [v for key, v in outputs.get("loss_terms", {}).items() if key in wanted and v.requires_grad]
        return torch.stack([t.float() for t in terms]).sum() if terms else None

    def forward(self, batch: dict[str, Any], outputs: dict[str, Any], step: int) -> LossResult:
        recon = outputs["recon"]
        if step < self.cfg.start_step:  # no D forward before the GAN starts
            zero = recon.new_zeros((), dtype=torch.float32)
            return LossResult({"generator": zero}, {"adaptive_weight": zero, "logits_fake": zero})
        params = self.aux_parameters()
        try:  # the generator step must not fill the discriminator's .grad
            for p in params:
                p.requires_grad_(False)
            logits_fake = self._d(recon, step)
        finally:
            for p in params:
                p.requires_grad_(True)
        gen = -logits_fake.mean()
        rec = self._rec_loss(outputs)
        weight = gen.new_ones(())
        if self.cfg.adaptive and rec is not None and gen.requires_grad and torch.is_grad_enabled():
            weight = adaptive_weight(rec, gen, outputs["last_layer"], self.cfg.adaptive_min, self.cfg.adaptive_max,
                                     self.cfg.adaptive_eps)
        return LossResult({"generator": weight * gen},
                          {"adaptive_weight": weight.detach(), "logits_fake": logits_fake.detach().mean()})

    # ---- discriminator side ------------------------------------------------------------------
    def aux_parameters(self) -> list[nn.Parameter]:
        frozen = set(map(id, self.discriminator.backbone.parameters())) if hasattr(self.discriminator, "backbone") else set()
        return [p for p in self.discriminator.parameters() if id(p) not in frozen]

    def aux_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """AdamW; weight decay on parameters with 2+ dims only (UniTok ``partition_param_groups``)."""
        o = self.cfg.optimizer
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        return o.build([g for g in groups if g["params"]])

    def before_aux_step(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Called by the trainer between D's backward and ``optimizer.step()``: D's learning rate for
        this step (warm-up + schedule, stateless) and the gradient clip."""
        o = self.cfg.optimizer
        lr = o.lr * d_lr_factor(step, self.cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        if o.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], o.grad_clip)

    def aux_loss(self, batch: dict[str, Any], outputs: dict[str, Any], step: int) -> Optional[LossResult]:
        """D's objective: terms ``hinge``, ``lecam`` x weight, ``bcr`` x weight (summed by the trainer)."""
        if step < self.cfg.start_step:
            return None
        real, fake = outputs["images"].detach(), outputs["recon"].detach()
        lr_, lf = self._d(real, step), self._d(fake, step)
        terms = {"hinge": hinge_d_loss(lr_, lf)}
        if self.cfg.lecam > 0:
            terms["lecam"] = self.cfg.lecam * self._lecam(lr_, lf)
        if self.cfg.bcr > 0:
            terms["bcr"] = self.cfg.bcr * self._bcr(real, fake, lr_, lf)
        return LossResult(terms, {"logits_real": lr_.detach().mean(), "logits_fake": lf.detach().mean()})

    def _bcr(self, real: Tensor, fake: Tensor, logits_real: Tensor, logits_fake: Tensor) -> Tensor:
        """bCR (Zhao et al. 2021): ``mean((D(T(x)) - D(x))^2) + mean((D(T(x_hat)) - D(x_hat))^2)``,
        T = ``bcr_policies`` on the raw image, no blur (UniTok), or on top of the DiffAug view
        (``bcr_on_diffaug``); D(x) is the view the hinge loss saw."""
        def aug(x: Tensor) -> Tensor:
            x = diff_augment(x, self.cfg.bcr_policies, self.cfg.cutout_ratio)
            return self._d(x) if self.cfg.bcr_on_diffaug else self.discriminator(x).float()
        return (aug(real) - logits_real).pow(2).mean() + (aug(fake) - logits_fake).pow(2).mean()

    def _lecam(self, logits_real: Tensor, logits_fake: Tensor) -> Tensor:
        """LeCAM (Tseng et al. 2021, eq. 3): ``mean(relu(D(x) - a_F)^2) + mean(relu(a_R - D(x_hat))^2)``."""
        reg = F.relu(logits_real - self.ema_fake).pow(2).mean() + F.relu(self.ema_real - logits_fake).pow(2).mean()
        with torch.no_grad():
            d = self.cfg.lecam_decay
            self.ema_real.mul_(d).add_((1 - d) * logits_real.mean())
            self.ema_fake.mul_(d).add_((1 - d) * logits_fake.mean())
        return reg


@hookimpl
def register_losses(register):
    register("adversarial", AdversarialLoss)
