"""Adversarial loss with its own discriminator and optimizer (VQGAN / UniTok recipe).

- D: hinge loss ``mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat)))`` (+ optional LeCAM).
- G: ``-mean D(x_hat)`` times the adaptive weight of VQGAN (Esser et al. 2021, eq. 7)
  ``lambda = ||grad_L L_rec|| / (||grad_L L_G|| + 1e-4)`` at the decoder's last layer L, clamped to
  [0.015, 1e4] (UniTok), where ``L_rec`` is the sum of the weighted terms of the losses named in
  ``adaptive_from`` already computed this step (``outputs["loss_terms"]``). The loss weight
  (UniTok: 0.4), start step and warm-up ramp come from the common schedule; D trains from
  ``start_step`` on.
- Discriminators: ``patchgan`` (VQGAN's N-layer PatchGAN) or ``dino`` (UniTok: frozen DINOv2-S
  features from timm, weights read from a local file, with trainable per-level token heads).
- Optional DiffAugment (Zhao et al. 2020; colour, translation, cutout) on both real and fake inputs,
  LeCAM regularisation (Tseng et al. 2021) against EMAs of D's outputs, and bCR (UniTok: 4.0).

Terms: ``generator`` (adaptive weight included), and diagnostics with weight 0:
``adaptive_weight``, ``logits_fake``.
"""
from __future__ import annotations

from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from core.hookspecs import hookimpl
from core.interfaces import Loss, LossConfig
from plugins.local_weights import load_timm_local, require_file

Aug = Literal["color", "translation", "cutout"]


class AdversarialConfig(LossConfig):
    type: Literal["adversarial"] = "adversarial"
    discriminator: Literal["patchgan", "dino"] = "patchgan"  # PatchGAN, or frozen DINOv2 features + heads
    width: int = Field(64, gt=0)  # patchgan: channels of the first layer
    n_layers: int = Field(3, ge=1)  # patchgan: stride-2 layers
    dino_model: str = "vit_small_patch14_dinov2"  # dino: timm model name
    dino_weights: Optional[str] = None  # dino: local weights file (required for dino)
    dino_resolution: int = Field(224, gt=0)  # dino: images are resized to this before the backbone
    dino_layers: list[int] = Field(default_factory=lambda: [2, 5, 8, 11])  # dino: blocks whose tokens D reads
    adaptive: bool = True  # VQGAN adaptive weight (else 1)
    adaptive_from: list[str] = Field(default_factory=lambda: ["pixel", "perceptual"])  # loss types forming L_rec
    adaptive_min: float = Field(0.015, ge=0)  # clamp of the adaptive weight (UniTok: 0.015)
    adaptive_max: float = Field(1e4, gt=0)  # (UniTok: 1e4)
    diffaug: list[Aug] = Field(default_factory=list)  # DiffAugment policies, e.g. [color, translation]
    lecam: float = Field(0.0, ge=0)  # LeCAM regularisation weight (0: off)
    lecam_decay: float = Field(0.99, gt=0, lt=1)  # EMA decay of D's mean outputs for LeCAM
    bcr: float = Field(0.0, ge=0)  # balanced consistency regularisation weight (UniTok: 4.0; 0: off)
    bcr_policies: list[Aug] = Field(default_factory=lambda: ["translation", "cutout"])  # bCR's augmentations
    d_lr: float = Field(2e-5, gt=0)  # discriminator AdamW learning rate (UniTok)
    d_betas: tuple[float, float] = (0.5, 0.9)  # discriminator AdamW betas (UniTok)
    d_weight_decay: float = Field(0.0, ge=0)  # discriminator AdamW weight decay

    @model_validator(mode="after")
    def _dino_weights_present(self) -> "AdversarialConfig":
        if self.discriminator == "dino":
            if self.dino_weights is None:
                raise ValueError(f"discriminator 'dino' needs dino_weights: a local {self.dino_model} weights file")
            require_file(self.dino_weights, f"dino_weights ({self.dino_model} weights)")
        return self


# ---- discriminators ------------------------------------------------------------------------


class PatchGAN(nn.Module):
    """VQGAN's N-layer PatchGAN (Isola et al. 2017): 4x4 convs, BatchNorm, LeakyReLU(0.2); logits per patch."""

    def __init__(self, width: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = width
        for i in range(1, n_layers + 1):
            out = width * min(2**i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(ch, out, 4, stride, 1, bias=False), nn.BatchNorm2d(out), nn.LeakyReLU(0.2)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        # n_layers halvings, then two 4x4 stride-1 convs that each remove one pixel
        self.min_size = 3 * 2**n_layers
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


class DinoDiscriminator(nn.Module):
    """Frozen DINOv2 ViT; trainable per-level token heads (LN -> Linear -> LeakyReLU -> Linear)."""

    def __init__(self, model: str, weights: str, resolution: int, layers: list[int]) -> None:
        super().__init__()
        self.backbone = load_timm_local(model, weights, img_size=resolution, num_classes=0)
        self.backbone.eval().requires_grad_(False)
        self.resolution, self.layers = resolution, list(layers)
        dim = self.backbone.embed_dim
        cfg = self.backbone.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1), persistent=False)
        self.heads = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.LeakyReLU(0.2), nn.Linear(dim, 1)) for _ in layers
        )

    def train(self, mode: bool = True) -> "DinoDiscriminator":
        super().train(mode)
        self.backbone.eval()  # frozen features: no dropout / drop-path ever
        return self

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate((x + 1) / 2, size=(self.resolution,) * 2, mode="bilinear", align_corners=False)
        feats = self.backbone.forward_intermediates((x - self.mean) / self.std, indices=self.layers,
                                                    intermediates_only=True, output_fmt="NLC")
        return torch.cat([h(f).flatten(1) for h, f in zip(self.heads, feats)], dim=1)


# ---- DiffAugment (written afresh; same transform for a whole batch call) ---------------------


def diff_augment(x: Tensor, policies: list[str]) -> Tensor:
    """Differentiable augmentations of images in [-1, 1] (Zhao et al. 2020)."""
    for p in policies:
        x = _AUGS[p](x)
    return x


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


def _cutout(x: Tensor, ratio: float = 0.5) -> Tensor:
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


def adaptive_weight(rec: Tensor, gen: Tensor, last_layer: Tensor, lo: float, hi: float) -> Tensor:
    """VQGAN eq. 7: ``||d rec / d W|| / (||d gen / d W|| + 1e-4)`` clamped to [lo, hi], detached."""
    g_rec = torch.autograd.grad(rec, last_layer, retain_graph=True)[0]
    g_gen = torch.autograd.grad(gen, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_gen.norm() + 1e-4)).clamp(lo, hi).detach()


class AdversarialLoss(Loss):
    """GAN loss with a plugin-owned discriminator and AdamW (terms ``generator`` + diagnostics)."""

    Config = AdversarialConfig
    order = 10  # after the reconstruction terms the adaptive weight balances against

    def __init__(self, cfg: AdversarialConfig, model: Any = None) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.discriminator == "dino":
            self.discriminator: nn.Module = DinoDiscriminator(cfg.dino_model, cfg.dino_weights, cfg.dino_resolution, cfg.dino_layers)
        else:
            self.discriminator = PatchGAN(cfg.width, cfg.n_layers)
        self.register_buffer("ema_real", torch.zeros(()))  # LeCAM anchors
        self.register_buffer("ema_fake", torch.zeros(()))

    def _d(self, x: Tensor) -> Tensor:
        return self.discriminator(diff_augment(x, self.cfg.diffaug)).float()

    def _rec_loss(self, outputs: dict[str, Any]) -> Optional[Tensor]:
        # the trainer labels repeated loss types "pixel0", "pixel1": match on the type
        terms = [v for k, v in outputs.get("loss_terms", {}).items()
                 if k.split("/", 1)[0].rstrip("0123456789") in self.cfg.adaptive_from and v.requires_grad]
        return torch.stack([t.float() for t in terms]).sum() if terms else None

    def forward(self, batch: dict[str, Any], outputs: dict[str, Any], step: int) -> dict[str, Tensor]:
        recon = outputs["recon"]
        if step < self.cfg.start_step:  # no D forward before the GAN starts
            zero = recon.new_zeros((), dtype=torch.float32)
            return {"generator": zero, "adaptive_weight": zero, "logits_fake": zero}
        params = self.aux_parameters()
        try:  # the generator step must not fill the discriminator's .grad
            for p in params:
                p.requires_grad_(False)
            logits_fake = self._d(recon)
        finally:
            for p in params:
                p.requires_grad_(True)
        gen = -logits_fake.mean()
        rec = self._rec_loss(outputs)
        weight = gen.new_ones(())
        if self.cfg.adaptive and rec is not None and gen.requires_grad and torch.is_grad_enabled():
            weight = adaptive_weight(rec, gen, outputs["last_layer"], self.cfg.adaptive_min, self.cfg.adaptive_max)
        return {"generator": weight * gen, "adaptive_weight": weight.detach(), "logits_fake": logits_fake.detach().mean()}

    def term_weights(self) -> dict[str, float]:
        return {"generator": 1.0, "adaptive_weight": 0.0, "logits_fake": 0.0}

    # ---- discriminator side ------------------------------------------------------------------
    def aux_parameters(self) -> list[nn.Parameter]:
        frozen = set(map(id, self.discriminator.backbone.parameters())) if hasattr(self.discriminator, "backbone") else set()
        return [p for p in self.discriminator.parameters() if id(p) not in frozen]

    def aux_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=self.cfg.d_lr, betas=self.cfg.d_betas, weight_decay=self.cfg.d_weight_decay)

    def aux_loss(self, batch: dict[str, Any], outputs: dict[str, Any], step: int) -> Optional[dict[str, Tensor]]:
        if step < self.cfg.start_step:
            return None
        real, fake = outputs["images"].detach(), outputs["recon"].detach()
        lr_, lf = self._d(real), self._d(fake)
        hinge = hinge_d_loss(lr_, lf)
        out = {"hinge": hinge, "logits_real": lr_.detach().mean(), "logits_fake": lf.detach().mean()}
        total = hinge
        if self.cfg.lecam > 0:
            out["lecam"] = self._lecam(lr_, lf)
            total = total + self.cfg.lecam * out["lecam"]
        if self.cfg.bcr > 0:
            out["bcr"] = self._bcr(real, fake, lr_, lf)
            total = total + self.cfg.bcr * out["bcr"]
        out["total"] = total
        return out

    def _bcr(self, real: Tensor, fake: Tensor, logits_real: Tensor, logits_fake: Tensor) -> Tensor:
        """bCR (Zhao et al. 2021): ``mean((D(T(x)) - D(x))^2) + mean((D(T(x_hat)) - D(x_hat))^2)``,
        T = ``bcr_policies`` (applied on top of the DiffAug view D already saw)."""
        aug = lambda x: self._d(diff_augment(x, self.cfg.bcr_policies))  # noqa: E731
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
