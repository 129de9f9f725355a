"""Model assembly: encoder -> pre-projector -> quantizer -> post-projector -> decoder.

Plus, when ``model.text`` is set, the semantic side UniTok trains with the contrastive loss: a
CLIP image head on the post-projection tokens (mean -> LayerNorm -> Linear -> l2-normalise) and an
open_clip ``TextTransformer`` trained from scratch, with a learnable logit scale kept in
[0, ln 100] (clamped after every optimizer step). Zero-shot evaluation reads the head on the
DISCRETE path (indices -> codes -> post).

What plugins may use of the assembled :class:`Tokenizer` is declared once in core.interfaces
(:class:`~core.interfaces.TokenizerModel`, plus :class:`~core.interfaces.TextTokenizerModel` with a
text tower); every other member is core's and may change.

Why the text tower and the CLIP head live here and not in a loss plugin: one text encoder, trained
with the tokenizer, serves the contrastive loss (which trains it), zero-shot evaluation and a vtok
distillation teacher (its CLIP head); evaluators and ``load_for_inference`` see the model and its
checkpoint, never the losses, so a tower owned by a loss would be missing where they need it. The
public UniTok code is laid out the same way (FoundationVision/UniTok, ``models/unitok.py``: the
``UniTok`` module holds the text transformer, the image head and the logit scale beside encoder,
quantizer and decoder, in one state dict), which is what lets ``core.convert`` map the released
weights tensor for tensor.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.errors import ConfigError
from core.interfaces import QuantizerOutput
from core.plugins import Registry, get_registry
from core.seeding import seeded


def fp32(module: nn.Module, x: Tensor) -> Tensor:
    """Run ``module`` with autocast off and fp32 input (projections and quantizers stay fp32)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return module(x.float())


class TextTower(nn.Module):
    """open_clip TextTransformer from scratch + open_clip's BPE tokenizer (shipped with the package)."""

    def __init__(self, cfg: Any, embed_dim: int) -> None:
        super().__init__()
        if cfg.width % cfg.heads:
            raise ConfigError("model.text.heads", f"{cfg.heads} heads do not divide the text width {cfg.width}")
        from open_clip.tokenizer import SimpleTokenizer
        from open_clip.transformer import TextTransformer

        self.context_length = cfg.context_length
        self.tokenizer = SimpleTokenizer(context_length=cfg.context_length)
        self.transformer = TextTransformer(
            context_length=cfg.context_length, vocab_size=self.tokenizer.vocab_size,
            width=cfg.width, heads=cfg.heads, layers=cfg.depth, output_dim=embed_dim,
        )

    def tokenize(self, texts: list[str], device: torch.device) -> Tensor:
        return self.tokenizer(texts, context_length=self.context_length).to(device)

    def forward(self, texts: list[str]) -> Tensor:
        device = self.transformer.token_embedding.weight.device
        return F.normalize(self.transformer(self.tokenize(texts, device)).float(), dim=-1)


class ClipImageHead(nn.Module):
    """mean over tokens -> LayerNorm (eps 1e-6, UniTok's ``fc_norm``) -> Linear -> l2-normalise (UniTok's image head)."""

    def __init__(self, in_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim, eps=1e-6)
        self.proj = nn.Linear(in_dim, embed_dim)

    def forward(self, tokens: Tensor) -> Tensor:
        return F.normalize(self.proj(self.norm(tokens.mean(dim=1))).float(), dim=-1)


def _build(reg: Registry, kind: str, cfg: Any, path: str, seed: int | None = None, **kwargs: Any) -> nn.Module:
    try:
        with seeded(seed, path):
            return reg.get(kind, cfg.type)(cfg, **kwargs)
    except ConfigError as e:
        raise e.at(path) from None


class Tokenizer(nn.Module):
    """The assembled tokenizer. ``forward(images, texts=None)`` returns the outputs dict (core.interfaces).

    With ``seed`` set, each component is initialised from its own stream seeded by (seed, its path)
    (core.seeding): its initial weights do not depend on which other components the model has."""

    def __init__(self, spec: Any, image_size: int, reg: Registry | None = None, seed: int | None = None) -> None:
        super().__init__()
        reg = reg or get_registry()
        self.spec = spec
        self.image_size = image_size
        qcfg = spec.quantizer
        qdim = qcfg.latent_dim
        enc_cfg = spec.encoder
        if spec.pre_projector is None and enc_cfg.out_dim is None:
            enc_cfg = enc_cfg.model_copy(update={"out_dim": qdim})
        self.encoder = _build(reg, "encoders", enc_cfg, "model.encoder", seed, image_size=image_size)
        if image_size % self.encoder.downsample:
            raise ConfigError("model.encoder", f"downsampling factor {self.encoder.downsample} does not divide image size {image_size}")
        self.grid = (image_size // self.encoder.downsample,) * 2
        self.pre_projector = (
            _build(reg, "projectors", spec.pre_projector, "model.pre_projector", seed, in_dim=self.encoder.out_dim, out_dim=qdim)
            if spec.pre_projector is not None else None
        )
        if self.pre_projector is None and self.encoder.out_dim != qdim:
            raise ConfigError("model.encoder.out_dim", f"{self.encoder.out_dim} does not equal the quantizer's input width {qdim}")
        self.quantizer = _build(reg, "quantizers", qcfg, "model.quantizer", seed)
        if spec.post_projector is not None:
            post_out = spec.post_projector.out_dim or self.encoder.out_dim
            self.post_projector = _build(reg, "projectors", spec.post_projector, "model.post_projector", seed, in_dim=qdim, out_dim=post_out)
        else:
            post_out, self.post_projector = qdim, None
        self.decoder = _build(reg, "decoders", spec.decoder, "model.decoder", seed, in_dim=post_out, image_size=image_size, downsample=self.encoder.downsample)
        self.text: TextTower | None = None
        if spec.text is not None:
            embed_dim = spec.text.embed_dim or spec.text.width
            with seeded(seed, "model.text"):
                self.text = TextTower(spec.text, embed_dim)
            with seeded(seed, "model.clip_head"):
                self.clip_head = ClipImageHead(post_out, embed_dim)
            self.logit_scale = nn.Parameter(torch.tensor(float(spec.text.init_logit_scale)))
            self.max_logit_scale = spec.text.max_logit_scale

    # ---- pieces ------------------------------------------------------------------------------
    def project_in(self, latent: Tensor) -> Tensor:
        return fp32(self.pre_projector, latent) if self.pre_projector is not None else latent.float()

    def project_out(self, zq: Tensor) -> Tensor:
        return fp32(self.post_projector, zq) if self.post_projector is not None else zq

    def clamped_logit_scale(self) -> Tensor:
        """The logit scale limited to [0, max_logit_scale] in value, its gradient passed straight
        through: the official forward reads the parameter unclamped (the trainer keeps it in range,
        see :meth:`after_optimizer_step`), and a plain clamp would zero the gradient at the bound."""
        s = self.logit_scale
        return s + (s.clamp(0.0, self.max_logit_scale) - s).detach()

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Called by the trainer after every optimizer step: clamp the logit scale PARAMETER in place
        to [0, max_logit_scale], as the official trainer does (FoundationVision/UniTok, trainer.py,
        ``Trainer.train_step``, after the step). Clamping only in the forward pass would leave a
        parameter that AdamW pushed past the bound with a zero gradient for good; held at the bound
        (and read straight through by :meth:`clamped_logit_scale`) it can come back."""
        if self.text is not None:
            self.logit_scale.clamp_(0.0, self.max_logit_scale)

    def encode_text(self, texts: list[str]) -> Tensor:
        if self.text is None:
            raise RuntimeError("this model has no text tower (model.text)")
        return self.text(texts)

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, images: Tensor, texts: Optional[Sequence[str]] = None) -> dict[str, Any]:
        """The outputs dict (core.interfaces). With a text tower and ``texts`` (one caption per image)
        it also holds ``text_embed`` (l2-normalised) and ``logit_scale`` (:meth:`clamped_logit_scale`),
        so the text tower and the scale are used inside the model's forward (DDP sees them there)."""
        latent, grid = self.encoder(images)
        z = self.project_in(latent)
        quant: QuantizerOutput = self.quantizer(z)
        post = self.project_out(quant.quantized)
        out = {"images": images, "latent": latent, "z": z, "quant": quant, "zq": quant.quantized,
               "post": post, "grid": grid, "recon": self.decoder(post, grid), "last_layer": self.decoder.last_layer}
        if self.text is not None:
            out["image_embed"] = self.clip_head(post)
            if texts is not None:
                out["text_embed"] = self.text(list(texts))
                out["logit_scale"] = self.clamped_logit_scale()
        return out

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """images -> int64 indices ``(B, N, K)``."""
        latent, _ = self.encoder(images)
        return self.quantizer.encode(self.project_in(latent))

    @torch.no_grad()
    def decode(self, indices: Tensor) -> Tensor:
        """indices ``(B, N, K)`` -> images."""
        return self.decoder(self.project_out(self.quantizer.indices_to_codes(indices)), self.grid)

    @torch.no_grad()
    def discrete_latent(self, images: Tensor) -> Tensor:
        """The quantized latent read through the DISCRETE path (images -> indices -> codes), what a
        downstream model sees; for a continuous quantizer (``continuous = True``) the latent itself."""
        latent, _ = self.encoder(images)
        z = self.project_in(latent)
        if self.quantizer.continuous:
            return self.quantizer(z).quantized
        return self.quantizer.indices_to_codes(self.quantizer.encode(z))

    @torch.no_grad()
    def image_embed_discrete(self, images: Tensor) -> Tensor:
        """The CLIP image embedding on the discrete path (what zero-shot evaluation uses)."""
        return self.clip_head(self.project_out(self.discrete_latent(images)))

    @torch.no_grad()
    def image_embed_from_indices(self, indices: Tensor) -> Tensor:
        """The CLIP image embedding on the discrete path (what zero-shot evaluation uses)."""
        return self.clip_head(self.project_out(self.quantizer.indices_to_codes(indices)))


def parameter_counts(model: Tokenizer) -> dict[str, int]:
    names = ["encoder", "pre_projector", "quantizer", "post_projector", "decoder", "text", "clip_head"]
    counts = {n: sum(p.numel() for p in getattr(model, n).parameters()) for n in names if getattr(model, n, None) is not None}
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts
