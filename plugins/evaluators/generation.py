"""Generation: judge a tokenizer by what a small class-conditional autoregressive prior makes of its tokens.

On the trained tokenizer the evaluator encodes the TRAIN split once to indices (at most
``train_images``), trains a small GPT-style transformer on them, samples images class by class,
decodes them and measures them against the real EVAL images:

- ``gfd_refnet`` / ``gfid`` — the Fréchet distance of ``n_samples`` samples drawn with guidance
  scale ``cfg_scale`` to the eval images, in the same declared feature space as the ``fd``
  evaluator's reconstruction FD (same ``extractor`` / ``reference`` fields, same cached reference
  network). Named ``gfid`` only when torch-fidelity's Inception-v3 weights are loaded (as ``rfid``).
- ``gfd_refnet_nocfg`` / ``gfid_nocfg`` — the same without guidance (scale 1: the conditional model).
- ``prior_bits_per_image`` — the prior's negative log-likelihood of the eval split's tokens given
  their class, in bits per image (summed over positions and sub-codes): comparable across
  quantizers and codebook sizes, lower is better. ``prior_bits_per_token`` is it over N.
Sample labels cycle through the eval split's labels, so the samples share the reference set's
class frequencies. A grid of ``grid_per_class`` samples per class (one row per class) is kept for
:meth:`Generation.save_artifacts`, which writes ``<run>/generation/samples_<step>.png`` (logged to
MLflow under ``generation/``) and the trained prior ``<run>/generation/prior.safetensors`` that
``python -m core.generate`` samples from without retraining.

The prior (LlamaGen-style class-conditional GPT, written afresh): raster order; the sequence is
``[class token, x_0, ..., x_{N-2}]`` with learned absolute position embeddings and predicts
``x_0 .. x_{N-1}``; pre-LayerNorm blocks (causal multi-head attention, GELU MLP); classifier-free
guidance by label dropout (``label_dropout``, a learned null class) and ``logits = u + s (c - u)``
at sampling (LlamaGen's ``cfg_scale``); sampling with a key/value cache (``kv_cache``).

Output heads follow the quantizer's index structure (:class:`HeadLayout`, from
``Quantizer.index_radices``): one softmax per sub-codebook (MCQ), per depth (RQ), per channel
level (FSQ), one per group of ``group_bits`` bits of a binary index (LFQ / BSQ / GQ: 2^128 codes =
16 heads of 256, never one 2^128-way softmax), one for VQ. A position's input embedding is the sum
of its heads' embeddings. ``factorisation``:

- ``parallel`` (default): every head of a position reads the same context (the transformer's
  output at that position); p(x_t | <t) = prod_k p(x_t^k | <t).
- ``sequential``: head k also reads the sub-codes < k of the same position,
  ``logits_k = W_k LN_k(h_t + sum_{j<k} E'_j[x_t^j])`` — exact autoregression over sub-codes for one
  extra embedding per head (Open-MAGVIT2's ``token_factorization`` likewise predicts its two
  sub-tokens one after the other: TencentARC/SEED-Voken,
  ``Open_MAGVIT2/models/cond_transformer_gpt.py``, ``Net2NetTransformer.forward``).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from core.errors import ConfigError
from core.hookspecs import hookimpl
from core.interfaces import Evaluator
from plugins.evaluators._common import base_dataset, device_of, no_autocast
from plugins.evaluators.fd import FeatureSpaceConfig, extractor, feature_fn, frechet_distance, space_names

PRIOR_FORMAT = 1  # bump when the prior's parameters or file layout change


class GenerationConfig(FeatureSpaceConfig):
    type: Literal["generation"] = "generation"
    # --- the prior (sized for a 2-core CPU: ~0.1 M parameters + heads) ---
    width: int = Field(64, gt=0)  # transformer width
    depth: int = Field(2, gt=0)  # transformer blocks
    heads: int = Field(4, gt=0)  # attention heads (divide width)
    mlp_ratio: float = Field(4.0, gt=0)  # MLP hidden = mlp_ratio * width
    factorisation: Literal["parallel", "sequential"] = "parallel"  # sub-codes of a position: see the docstring
    group_bits: int = Field(8, ge=1, le=16)  # bits per head for binary indices (LFQ/BSQ/GQ)
    # --- its training ---
    steps: int = Field(300, gt=0)  # AdamW steps
    batch_size: int = Field(64, gt=0)  # sequences per step
    lr: float = Field(2e-3, gt=0)  # peak learning rate (linear warm-up, cosine to 0.1x)
    warmup: int = Field(20, ge=0)  # warm-up steps
    weight_decay: float = Field(0.05, ge=0)  # on matrices only
    grad_clip: Optional[float] = Field(1.0, gt=0)
    label_dropout: float = Field(0.1, ge=0, lt=1)  # P(class -> null class) in training (LlamaGen: 0.1)
    train_images: Optional[int] = Field(5000, gt=0)  # encode at most this many train images (None: all)
    # --- sampling ---
    n_samples: int = Field(256, gt=1)  # samples for each gFD (with and without guidance)
    cfg_scale: float = Field(2.0, ge=1.0)  # guidance scale s of the gfd metric (1: no guidance)
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0)  # 0: the whole distribution of each head
    grid_per_class: int = Field(8, ge=0)  # samples per class in the saved grid (0: no grid)
    sample_batch_size: int = Field(256, gt=0)  # images sampled at once
    kv_cache: bool = True  # key/value cache while sampling (False: recompute the prefix each step)
    seed: int = 0  # prior initialisation, batches, label dropout and sampling

    @model_validator(mode="after")
    def _guidance_needs_a_null_class(self) -> "GenerationConfig":
        if self.cfg_scale != 1.0 and self.label_dropout == 0:
            raise ValueError("cfg_scale > 1 needs label_dropout > 0 (the null class guidance contrasts with is never trained)")
        if self.width % self.heads:
            raise ValueError(f"{self.heads} heads do not divide the width {self.width}")
        return self


# ---- head layout ---------------------------------------------------------------------------------


@dataclass
class HeadLayout:
    """How a token's K indices map to the prior's H softmax heads.

    ``slots[k]`` lists the head sizes of K-slot k, least significant first: slot k's index is the
    mixed-radix number ``sum_h t_h prod_{g<h} size_g`` of its heads' targets ``t_h``.
    """

    slots: list[list[int]]

    @classmethod
    def for_quantizer(cls, quantizer: Any, group_bits: int = 8) -> "HeadLayout":
        radices = quantizer.index_radices() if hasattr(quantizer, "index_radices") else [[n] for n in quantizer.codebook_sizes]
        return cls([group_radices(r, group_bits) for r in radices])

    @property
    def sizes(self) -> list[int]:
        return [s for slot in self.slots for s in slot]

    @property
    def bits(self) -> float:
        return sum(math.log2(s) for s in self.sizes)

    def to_targets(self, indices: Tensor) -> Tensor:
        """int64 ``(..., K)`` -> ``(..., H)``."""
        out = []
        for k, slot in enumerate(self.slots):
            x = indices[..., k]
            for size in slot:
                out.append(x % size)
                x = x // size
        return torch.stack(out, -1)

    def from_targets(self, targets: Tensor) -> Tensor:
        """``(..., H)`` -> int64 ``(..., K)``."""
        out, h = [], 0
        for slot in self.slots:
            x, scale = torch.zeros_like(targets[..., 0]), 1
            for size in slot:
                x = x + targets[..., h] * scale
                scale *= size
                h += 1
            out.append(x)
        return torch.stack(out, -1)


def group_radices(radices: list[int], group_bits: int) -> list[int]:
    """Head sizes of one slot: runs of binary digits merged into heads of up to ``group_bits`` bits;
    any other digit (an FSQ level, a codebook) is a head of its own."""
    heads: list[int] = []
    bits = 0  # bits in the last head when it is binary, else 0
    for r in radices:
        if r == 2 and 0 < bits < group_bits:
            heads[-1] *= 2
            bits += 1
        else:
            heads.append(int(r))
            bits = 1 if r == 2 else 0
    return heads


# ---- the prior -----------------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-LN transformer block; ``cache`` = (k, v) buffers ``(B, heads, T_max, d)`` filled at ``pos``."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        hidden = int(mlp_ratio * width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: Tensor, cache: Optional[tuple[Tensor, Tensor]] = None, pos: int = 0) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if cache is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # incremental: the new positions attend to everything cached so far (and themselves)
            ck, cv = cache
            ck[:, :, pos:pos + t], cv[:, :, pos:pos + t] = k, v
            mask = None if t == 1 else torch.ones(t, pos + t, dtype=torch.bool, device=x.device).tril(pos)
            a = F.scaled_dot_product_attention(q, ck[:, :, :pos + t], cv[:, :, :pos + t], attn_mask=mask)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


class Prior(nn.Module):
    """Class-conditional autoregressive transformer over a token grid with one softmax per head."""

    def __init__(self, sizes: list[int], n_tokens: int, n_classes: int, width: int = 128, depth: int = 3,
                 heads: int = 4, mlp_ratio: float = 4.0, sequential: bool = False) -> None:
        super().__init__()
        if width % heads:
            raise ConfigError("eval.generation.heads", f"{heads} heads do not divide the width {width}")
        self.sizes, self.n_tokens, self.n_classes, self.sequential = list(sizes), n_tokens, n_classes, sequential
        self.hparams = {"sizes": list(sizes), "n_tokens": n_tokens, "n_classes": n_classes, "width": width,
                        "depth": depth, "heads": heads, "mlp_ratio": mlp_ratio, "sequential": sequential}
        # one table for all heads (head h's rows start at offsets[h]): one lookup, one backward
        self.tok = nn.Embedding(sum(sizes), width)
        self.register_buffer("offsets", torch.tensor([0, *sizes[:-1]]).cumsum(0), persistent=False)
        self.cls = nn.Embedding(n_classes + 1, width)  # index n_classes: the null class (guidance)
        self.pos = nn.Parameter(torch.randn(n_tokens, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        # parallel: one fused projection to every head's logits; sequential: one per head
        self.out = nn.ModuleList(nn.Linear(width, s) for s in sizes) if sequential else nn.Linear(width, sum(sizes))
        if sequential:
            self.intra = nn.ModuleList(nn.Embedding(s, width) for s in sizes[:-1])
            self.head_norm = nn.ModuleList(nn.LayerNorm(width) for _ in sizes)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def null_class(self) -> int:
        return self.n_classes

    def embed(self, targets: Tensor) -> Tensor:
        """``(B, T, H)`` -> ``(B, T, width)``: the sum of the heads' embeddings."""
        return self.tok(targets + self.offsets).sum(-2)

    def inputs(self, labels: Tensor, targets: Tensor) -> Tensor:
        """[class token, x_0 .. x_{T-1}] + positions, ``(B, T + 1, width)`` (T < n_tokens)."""
        x = torch.cat([self.cls(labels)[:, None], self.embed(targets)], 1)
        return x + self.pos[: x.shape[1]]

    def hidden(self, labels: Tensor, targets: Tensor) -> Tensor:
        """Normalised outputs ``(B, T + 1, width)`` over the prefix ``targets`` (uncached)."""
        x = self.inputs(labels, targets)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def head_logits(self, h: Tensor, k: int, previous: Optional[Tensor] = None) -> Tensor:
        """Logits of head k from hidden ``h`` (..., width); ``previous`` (..., >= k) the sub-codes
        before k of the same position (used by the sequential factorisation)."""
        if not self.sequential:
            lo = int(self.offsets[k])
            return F.linear(h, self.out.weight[lo:lo + self.sizes[k]], self.out.bias[lo:lo + self.sizes[k]])
        if k and previous is not None:
            h = h + sum(self.intra[j](previous[..., j]) for j in range(k))
        return self.out[k](self.head_norm[k](h))

    def forward(self, labels: Tensor, targets: Tensor) -> list[Tensor]:
        """Teacher-forced logits per head, each ``(B, N, size_h)``, for ``targets`` ``(B, N, H)``."""
        h = self.hidden(labels, targets[:, :-1])
        if not self.sequential:
            return list(self.out(h).split(self.sizes, -1))
        return [self.head_logits(h, k, targets) for k in range(len(self.sizes))]

    def nll(self, labels: Tensor, targets: Tensor) -> Tensor:
        """Negative log-likelihood in nats per image ``(B,)`` (summed over positions and heads)."""
        logits = self(labels, targets)
        return sum(F.cross_entropy(lg.flatten(0, 1).float(), targets[..., k].flatten(), reduction="none").view(len(labels), -1).sum(1)
                   for k, lg in enumerate(logits))

    # ---- cached decoding -----------------------------------------------------------------------
    def new_cache(self, batch: int, device: torch.device) -> list[tuple[Tensor, Tensor]]:
        width = self.cls.embedding_dim
        heads = self.blocks[0].heads
        shape = (batch, heads, self.n_tokens, width // heads)
        return [(torch.zeros(shape, device=device), torch.zeros(shape, device=device)) for _ in self.blocks]

    def step(self, x: Tensor, pos: int, cache: list[tuple[Tensor, Tensor]]) -> Tensor:
        """One input embedding ``(B, width)`` at position ``pos`` -> normalised output ``(B, width)``."""
        h = (x + self.pos[pos])[:, None]
        for blk, c in zip(self.blocks, cache):
            h = blk(h, c, pos)
        return self.norm(h[:, 0])


def guided(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance on logits: ``u + s (c - u)`` (s = 1: the conditional logits)."""
    return uncond + scale * (cond - uncond)


def draw(logits: Tensor, temperature: float, top_k: int, generator: torch.Generator) -> Tensor:
    """One sample per row by inverting the CDF at a uniform from ``generator`` (one per row, so the
    cached and uncached samplers consume the same random numbers)."""
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    cdf = logits.softmax(-1).cumsum(-1)
    u = torch.rand(logits.shape[0], 1, generator=generator, device=generator.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).clamp_max(logits.shape[-1] - 1)[:, 0]


@torch.no_grad()
def sample(prior: Prior, labels: Tensor, cfg_scale: float = 1.0, temperature: float = 1.0, top_k: int = 0,
           generator: Optional[torch.Generator] = None, kv_cache: bool = True) -> Tensor:
    """Head targets ``(B, N, H)`` for class ``labels`` ``(B,)``. Guidance runs the conditional and
    the null-class branch in one batch; at scale 1 only the conditional one runs."""
    device = labels.device
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(0)
    b, n, nh = len(labels), prior.n_tokens, len(prior.sizes)
    use_cfg = cfg_scale != 1.0
    lab = torch.cat([labels, torch.full_like(labels, prior.null_class)]) if use_cfg else labels
    out = torch.zeros(b, n, nh, dtype=torch.long, device=device)
    cache = prior.new_cache(len(lab), device) if kv_cache else None
    x = prior.cls(lab)
    for i in range(n):
        if cache is not None:
            h = prior.step(x, i, cache)
        else:
            prefix = out[:, :i].repeat(2, 1, 1) if use_cfg else out[:, :i]
            h = prior.hidden(lab, prefix)[:, -1]
        chosen = torch.zeros(len(lab), nh, dtype=torch.long, device=device)
        for k in range(nh):
            logits = prior.head_logits(h, k, chosen)
            if use_cfg:
                logits = guided(*logits.chunk(2), cfg_scale)
            t = draw(logits, temperature, top_k, generator)
            chosen[:, k] = t.repeat(2) if use_cfg else t
        out[:, i] = chosen[:b]
        if cache is not None:
            x = prior.embed(chosen[:, None])[:, 0]
    return out


def lr_at(step: int, cfg: GenerationConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_prior(targets: Tensor, labels: Tensor, sizes: list[int], n_classes: int, cfg: GenerationConfig,
                device: torch.device) -> Prior:
    """Fit a prior with head ``sizes`` to head targets ``(M, N, H)`` with class ``labels`` (M,)
    (deterministic in ``cfg.seed``; the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]), torch.enable_grad(), no_autocast(device):
        torch.manual_seed(cfg.seed)
        prior = Prior(sizes, targets.shape[1], n_classes, cfg.width, cfg.depth, cfg.heads,
                      cfg.mlp_ratio, cfg.factorisation == "sequential").to(device)
        decay = [p for p in prior.parameters() if p.ndim >= 2]
        other = [p for p in prior.parameters() if p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}],
                                lr=cfg.lr, betas=(0.9, 0.95))
        g = torch.Generator().manual_seed(cfg.seed)
        m = len(targets)
        perm, at = torch.randperm(m, generator=g), 0
        prior.train()
        for step in range(cfg.steps):
            if at + min(cfg.batch_size, m) > m:
                perm, at = torch.randperm(m, generator=g), 0
            idx = perm[at:at + cfg.batch_size]
            at += len(idx)
            y = labels[idx].clone()
            y[torch.rand(len(idx), generator=g) < cfg.label_dropout] = n_classes
            t = targets[idx].to(device)
            loss = prior.nll(y.to(device), t).mean() / t.shape[1]
            for grp in opt.param_groups:
                grp["lr"] = lr_at(step, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(prior.parameters(), cfg.grad_clip)
            opt.step()
    return prior.eval()


# ---- the evaluator -------------------------------------------------------------------------------


@dataclass
class Bundle:
    """A trained prior with what is needed to sample images from it."""

    prior: Prior
    layout: HeadLayout
    class_names: list[str]


class Generation(Evaluator):
    """Generation quality of the tokens: ``gfd_refnet`` (or ``gfid``), ``gfd_refnet_nocfg``, ``prior_bits_per_image``, ``prior_bits_per_token``."""

    Config = GenerationConfig

    def __init__(self, cfg: GenerationConfig) -> None:
        super().__init__(cfg)
        self.last: Optional[dict[str, Any]] = None

    # ---- pieces core.generate uses ---------------------------------------------------------------
    def layout(self, model: Any) -> HeadLayout:
        if getattr(model.quantizer, "continuous", False):
            raise ConfigError("eval.generation", "the quantizer is continuous: there are no tokens to model")
        return HeadLayout.for_quantizer(model.quantizer, self.cfg.group_bits)

    def encode(self, model: Any, dataset: Any, limit: Optional[int] = None) -> tuple[Tensor, Tensor]:
        """(indices (M, N, K), labels (M,)) of a dataset split; missing or negative labels -> class 0."""
        from core.tokenize import encode_dataset

        indices, labels = encode_dataset(model, dataset, batch_size=64, limit=limit, device=str(device_of(model)))
        if labels is None:
            labels = torch.zeros(len(indices), dtype=torch.long)
        return indices, labels.clamp_min(0)

    def fit(self, model: Any, train_set: Any) -> Bundle:
        """Encode the train split and train a prior on it."""
        self.layout(model)
        indices, labels = self.encode(model, train_set, self.cfg.train_images)
        return self.train_on(model, indices, labels, list(getattr(train_set, "class_names", []) or []))

    def train_on(self, model: Any, indices: Tensor, labels: Tensor, class_names: list[str]) -> Bundle:
        """Train a prior on indices ``(M, N, K)`` with labels ``(M,)``."""
        layout = self.layout(model)
        n_classes = max(len(class_names), int(labels.max()) + 1)
        prior = train_prior(layout.to_targets(indices), labels, layout.sizes, n_classes, self.cfg, device_of(model))
        return Bundle(prior, layout, class_names or [str(i) for i in range(n_classes)])

    @torch.no_grad()
    def sample_images(self, bundle: Bundle, model: Any, labels: Tensor, cfg_scale: float, seed: int = 0,
                      kv_cache: Optional[bool] = None) -> tuple[Tensor, Tensor]:
        """(images (B, 3, H, W) in [-1, 1] on the CPU, indices (B, N, K)) for class ``labels``."""
        device = device_of(model)
        g = torch.Generator(device=device).manual_seed(seed)
        imgs, idx = [], []
        with no_autocast(device):
            for i in range(0, len(labels), self.cfg.sample_batch_size):
                lab = labels[i:i + self.cfg.sample_batch_size].to(device)
                t = sample(bundle.prior, lab, cfg_scale, self.cfg.temperature, self.cfg.top_k, g,
                           self.cfg.kv_cache if kv_cache is None else kv_cache)
                ind = bundle.layout.from_targets(t)
                idx.append(ind.cpu())
                imgs.append(model.decode(ind).float().clamp(-1, 1).cpu())
        return torch.cat(imgs), torch.cat(idx)

    @torch.no_grad()
    def bits_per_image(self, bundle: Bundle, indices: Tensor, labels: Tensor, device: torch.device) -> float:
        total = 0.0
        with no_autocast(device):
            for i in range(0, len(indices), 256):
                t = bundle.layout.to_targets(indices[i:i + 256]).to(device)
                total += float(bundle.prior.nll(labels[i:i + 256].to(device), t).sum())
        return total / len(indices) / math.log(2)

    def grid(self, bundle: Bundle, model: Any, seed: int) -> Optional[Tensor]:
        n = self.cfg.grid_per_class
        if not n:
            return None
        labels = torch.arange(bundle.prior.n_classes).repeat_interleave(n)
        return self.sample_images(bundle, model, labels, self.cfg.cfg_scale, seed + 1)[0]

    # ---- the evaluator ---------------------------------------------------------------------------
    @classmethod
    def declared_metrics(cls, cfg: GenerationConfig) -> dict[str, str]:
        out = {f"{n}{suffix}": "lower" for n in space_names(cfg, "gfid", "gfd_refnet") for suffix in ("", "_nocfg")}
        return {**out, "prior_bits_per_image": "lower", "prior_bits_per_token": "lower"}

    def begin(self, model, loader) -> None:
        """The extra work before the pass: encode the TRAIN split, train the prior, load the feature network."""
        self.model, self.device = model, device_of(model)
        ds = base_dataset(loader)
        self.bundle = self.fit(model, type(ds)(ds.cfg, split="train", seed=ds.seed))
        self.space, net, uint8 = extractor(self.cfg, ds)
        self.feats = feature_fn(net, uint8, self.device)
        self.real, self.eval_idx, self.eval_labels = [], [], []

    def update(self, batch, outputs) -> None:
        x = outputs["images"]
        self.real.append(self.feats(x).cpu())
        self.eval_idx.append(outputs["indices"].cpu())
        lab = batch.get("label")
        self.eval_labels.append(torch.as_tensor(lab).long().clamp_min(0) if lab is not None else torch.zeros(len(x), dtype=torch.long))

    def compute(self) -> dict[str, float]:
        """The extra work after the pass: sampling, decoding, the gFDs and the prior's likelihood."""
        model, device, bundle, feats = self.model, self.device, self.bundle, self.feats
        real_f, eval_idx_t, eval_lab = torch.cat(self.real), torch.cat(self.eval_idx), torch.cat(self.eval_labels)
        eval_lab = eval_lab.clamp_max(bundle.prior.n_classes - 1)
        labels = eval_lab[torch.arange(self.cfg.n_samples) % len(eval_lab)]
        name = "gfid" if self.space == "inception" else f"gfd_{self.space}"
        out = {f"{name}": 0.0, f"{name}_nocfg": 0.0}
        scales = {name: self.cfg.cfg_scale, f"{name}_nocfg": 1.0}
        done: dict[float, float] = {}
        for key, s in scales.items():
            if s not in done:
                imgs, _ = self.sample_images(bundle, model, labels, s, self.cfg.seed)
                fake = torch.cat([feats(imgs[i:i + 256].to(device)).cpu() for i in range(0, len(imgs), 256)])
                done[s] = frechet_distance(real_f, fake)
            out[key] = done[s]
        bits = self.bits_per_image(bundle, eval_idx_t, eval_lab, device)
        out["prior_bits_per_image"] = bits
        out["prior_bits_per_token"] = bits / eval_idx_t.shape[1]
        self.last = {"bundle": bundle, "grid": self.grid(bundle, model, self.cfg.seed), "model_grid": tuple(model.grid)}
        return out

    # file helpers, reachable from an instance (core.generate gets the evaluator from the registry)
    @staticmethod
    def save_prior(bundle: Bundle, path: Path, extra: Optional[dict[str, str]] = None) -> Path:
        return save_prior(bundle, path, extra)

    @staticmethod
    def load_prior(path: Path, model: Any, group_bits: int = 8) -> tuple[Bundle, dict[str, str]]:
        return load_prior(path, model, group_bits)

    @staticmethod
    def save_grid(images: Tensor, path: Path, nrow: int) -> Path:
        return save_grid(images, path, nrow)

    def save_artifacts(self, run_dir, step: int) -> list[tuple[Path, str]]:
        if self.last is None:
            return []
        d = Path(run_dir) / "generation"
        d.mkdir(parents=True, exist_ok=True)
        save_prior(self.last["bundle"], d / "prior.safetensors", {"tokenizer_step": str(step)})
        files: list[tuple[Path, str]] = []
        if self.last["grid"] is not None:
            png = d / f"samples_{step:08d}.png"
            save_grid(self.last["grid"], png, self.cfg.grid_per_class)
            files.append((png, "generation"))
        return files


# ---- files ---------------------------------------------------------------------------------------


def save_grid(images: Tensor, path: Path, nrow: int, min_side: int = 64) -> Path:
    """A PNG grid (``nrow`` images per row), upscaled without smoothing to at least ``min_side`` px."""
    from torchvision.utils import save_image

    side = images.shape[-1]
    if side < min_side:
        images = F.interpolate(images, scale_factor=math.ceil(min_side / side), mode="nearest")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    save_image(images * 0.5 + 0.5, str(tmp), nrow=max(1, nrow), padding=2)
    os.replace(tmp, path)
    return path


def save_prior(bundle: Bundle, path: Path, extra: Optional[dict[str, str]] = None) -> Path:
    """safetensors with the prior's weights; metadata: hyper-parameters, head layout, class names."""
    from safetensors.torch import save_file

    meta = {"format": str(PRIOR_FORMAT), "hparams": json.dumps(bundle.prior.hparams),
            "layout": json.dumps(bundle.layout.slots), "class_names": json.dumps(bundle.class_names), **(extra or {})}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({k: v.detach().cpu().contiguous() for k, v in bundle.prior.state_dict().items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def load_prior(path: Path, model: Any, group_bits: int = 8) -> tuple[Bundle, dict[str, str]]:
    """A saved prior, checked against the tokenizer's token grid and head layout."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "prior file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        hp = json.loads(meta["hparams"])
        slots = json.loads(meta["layout"])
        names = json.loads(meta["class_names"])
    except Exception as e:  # noqa: BLE001 - safetensors, json and missing keys raise several types
        raise ConfigError(str(path), f"not a vtok prior file ({type(e).__name__})") from None
    if meta.get("format") != str(PRIOR_FORMAT):
        raise ConfigError(str(path), f"prior file format {meta.get('format')}, this vtok reads {PRIOR_FORMAT}")
    layout = HeadLayout(slots)
    want = HeadLayout.for_quantizer(model.quantizer, group_bits).slots
    n_tokens = model.grid[0] * model.grid[1]
    if hp["n_tokens"] != n_tokens or layout.sizes != [s for sl in want for s in sl] or len(slots) != len(want):
        raise ConfigError(str(path), f"the prior models {hp['n_tokens']} tokens with heads {layout.slots}; "
                          f"the tokenizer has {n_tokens} tokens with heads {want}")
    prior = Prior(hp["sizes"], hp["n_tokens"], hp["n_classes"], hp["width"], hp["depth"], hp["heads"], hp["mlp_ratio"], hp["sequential"])
    prior.load_state_dict(tensors)
    return Bundle(prior.to(device_of(model)).eval(), layout, names), meta


@hookimpl
def register_evaluators(register):
    register("generation", Generation)
