"""Pre-Post Distillation (UniWeTok PPD): semantic heads on the latents regress a frozen teacher.

``L_pre = 1 - cos(Head_pre(U_G), f_T)`` on the continuous group latents (``outputs["z"]``, the
quantizer input) and ``L_post = 1 - cos(Head_post(U_Q), f_T)`` on the quantized latents
(``outputs["zq"]``); ``L_PPD = L_pre + eta * L_post`` and the loss weight is theta. Heads are
attention pooling (timm ``AttentionPoolLatent``: a learned query attends over the tokens, then an
MLP; UniWeTok's better choice) or linear (mean over tokens -> Linear). The heads train with the
tokenizer (main optimizer).

Teacher ``f_T`` (one embedding per image, no gradient), from local files:
- ``vtok``: a vtok run or checkpoint directory (e.g. experiments/clip_teacher.yaml); the embedding is its CLIP head
  on the CONTINUOUS path, ``clip_head(project_out(project_in(encoder(x))))`` (without a text head:
  the mean of ``project_out(...)`` tokens).
- ``open_clip``: ``open_clip.create_model(name, pretrained=path).encode_image``.
- ``timm``: ``timm.create_model(name, num_classes=0)`` with the file's weights (pooled features).
"""
from __future__ import annotations

from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from core.errors import ConfigError
from core.hookspecs import hookimpl
from core.interfaces import Loss, LossConfig, LossResult, VocabModel
from core.rundir import find_run_dir, load_for_inference
from plugins.local_weights import load_timm_local, require_file


class TeacherConfig(VocabModel):
    renamed = {"path": "weights"}
    kind: Literal["vtok", "open_clip", "timm"] = "vtok"  # what the file is
    weights: str  # vtok: run or checkpoint directory, or a run-name prefix (runs/clip_teacher); open_clip / timm: local weights file
    name: Optional[str] = None  # open_clip / timm model name (e.g. ViT-B-16, vit_base_patch16_siglip_224)
    image_size: Optional[int] = Field(None, gt=0)  # resize images to this (default: the teacher's own size)

    @model_validator(mode="after")
    def _check(self) -> "TeacherConfig":
        if self.kind != "vtok" and not self.name:
            raise ValueError(f"teacher kind '{self.kind}' needs a model name (teacher.name)")
        if self.kind == "vtok":
            try:
                found = find_run_dir(self.weights)
            except ConfigError as e:  # an ambiguous run-name prefix
                raise ValueError(e.message) from None
            if found is None:
                from core.needs import missing

                missing("distillation teacher run",  # --dry-run lists it; a real run stops here
                        "a vtok run or checkpoint directory, or a run-name prefix such as runs/clip_teacher "
                        "after python -m core.run experiments/clip_teacher.yaml", at=self.weights)
        else:
            require_file(self.weights, f"distillation teacher weights file ({self.kind} {self.name})")
        return self


class DistillConfig(LossConfig):
    type: Literal["distill"] = "distill"
    teacher: TeacherConfig  # the frozen image encoder giving f_T
    head: Literal["attention", "linear"] = "attention"  # semantic head (UniWeTok Table 6)
    heads: int = Field(4, gt=0)  # attention heads of the pooling head (must divide the latent width)
    pre: bool = True  # L_pre on the continuous group latents (UniWeTok Tables 2/3)
    post: bool = True  # L_post on the quantized latents
    eta: float = Field(1.0, ge=0)  # weight of L_post relative to L_pre

    @model_validator(mode="after")
    def _some_term(self) -> "DistillConfig":
        if not (self.pre or self.post):
            raise ValueError("at least one of pre / post must be on")
        return self


# ---- teachers --------------------------------------------------------------------------------


class Teacher(nn.Module):
    """images in [-1, 1] -> fp32 embedding ``(B, d_T)``; frozen, eval mode, no gradient."""

    def __init__(self, embed: Any, net: nn.Module, size: Optional[int], mean: Any = None, std: Any = None) -> None:
        super().__init__()
        self.embed, self.net, self.size = embed, net.eval().requires_grad_(False), size
        self.normalise = mean is not None
        self.register_buffer("mean", torch.tensor(mean or (0.0,) * 3).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std or (1.0,) * 3).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = images.float()
        if self.size is not None and x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False)
        if self.normalise:  # these teachers expect [0, 1] images standardised per channel
            x = ((x + 1) / 2 - self.mean) / self.std
        return self.embed(self.net, x).float()


def _vtok_embed(model: nn.Module, x: Tensor) -> Tensor:
    latent, _ = model.encoder(x)
    post = model.project_out(model.project_in(latent))
    return model.clip_head(post) if getattr(model, "text", None) is not None else post.mean(dim=1)


def build_teacher(cfg: TeacherConfig) -> Teacher:
    size = cfg.image_size
    if cfg.kind == "vtok":
        _, model = load_for_inference(cfg.weights)
        return Teacher(_vtok_embed, model, size or model.image_size)
    if cfg.kind == "open_clip":
        import open_clip

        net = open_clip.create_model(cfg.name, pretrained=cfg.weights, require_pretrained=True)
        vis = net.visual
        img = vis.image_size[0] if isinstance(vis.image_size, (tuple, list)) else vis.image_size
        mean = getattr(vis, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        std = getattr(vis, "image_std", None) or open_clip.OPENAI_DATASET_STD
        return Teacher(lambda n, x: n.encode_image(x), net, size or img, tuple(mean), tuple(std))
    net = load_timm_local(cfg.name, cfg.weights, num_classes=0)
    pc = net.pretrained_cfg
    return Teacher(lambda n, x: n(x), net, size or pc["input_size"][-1], tuple(pc["mean"]), tuple(pc["std"]))


# ---- heads -----------------------------------------------------------------------------------


class LinearHead(nn.Module):
    """mean over tokens -> Linear (UniWeTok's linear baseline head)."""

    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, out)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.proj(tokens.mean(dim=1))


def make_head(kind: str, dim: int, out: int, heads: int) -> nn.Module:
    if kind == "linear":
        return LinearHead(dim, out)
    if dim % heads:
        raise ConfigError("heads", f"{heads} does not divide the latent width {dim}")
    from timm.layers import AttentionPoolLatent

    return AttentionPoolLatent(dim, out_features=out, num_heads=heads)


def cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """``mean_i (1 - cos(a_i, b_i))``, fp32."""
    return (1 - F.cosine_similarity(a.float(), b.float(), dim=-1)).mean()


class DistillLoss(Loss):
    """UniWeTok PPD: terms ``pre`` and/or ``post`` (cosine distances to the teacher embedding).

    Reads the outputs ``images``, ``z`` and ``zq`` only; the tokenizer's dims are read at build time
    and it is not kept. The teacher is a separate frozen network the loss owns (not the model)."""

    Config = DistillConfig

    def __init__(self, cfg: DistillConfig, model: Any = None, teacher: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.cfg = cfg
        t = teacher if teacher is not None else build_teacher(cfg.teacher)
        # frozen: not a submodule (neither checkpointed nor optimised); moved to the batch's device
        self._teacher = (t,)
        dim = model.spec.quantizer.latent_dim
        out = t(torch.zeros(1, 3, model.image_size, model.image_size)).shape[-1]
        self.head_pre = make_head(cfg.head, dim, out, cfg.heads) if cfg.pre else None
        self.head_post = make_head(cfg.head, dim, out, cfg.heads) if cfg.post else None

    def teacher_embed(self, images: Tensor) -> Tensor:
        teacher = self._teacher[0].to(images.device)
        return teacher(images)

    def forward(self, batch: dict[str, Any], outputs: dict[str, Any], step: int) -> LossResult:
        target = self.teacher_embed(outputs["images"])
        terms = {}
        if self.head_pre is not None:
            terms["pre"] = cosine_distance(self.head_pre(outputs["z"].float()), target)
        if self.head_post is not None:
            terms["post"] = cosine_distance(self.head_post(outputs["zq"].float()), target)
        return LossResult(terms)

    def term_weights(self) -> dict[str, float]:
        return {"pre": 1.0, "post": self.cfg.eta}


@hookimpl
def register_losses(register):
    register("distill", DistillLoss)
