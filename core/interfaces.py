"""The contracts every plugin implements.

One base class per kind. A component is an ``nn.Module`` (datasets: a torch ``Dataset``) whose
constructor takes its pydantic ``Config`` first; the model assembly passes the few dimensions a
component cannot know on its own as keyword arguments (documented per kind below).

Tensors of tokens are ``(B, N, C)`` with the token grid ``(h, w)`` carried alongside; images are
``(B, 3, H, W)`` in [-1, 1].

The model's forward returns an ``outputs`` dict that losses and evaluators read:

================  =====================================================================
key               meaning
================  =====================================================================
``images``        the input images ``(B, 3, H, W)``
``latent``        encoder tokens ``(B, N, C_enc)`` (continuous; after the final activation)
``z``             quantizer input ``(B, N, D)`` (after the pre-projector, continuous)
``quant``         the :class:`QuantizerOutput`
``zq``            ``quant.quantized`` (straight-through), ``(B, N, D)``
``post``          post-projector tokens ``(B, N, C_dec)`` (decoder input)
``recon``         decoded images ``(B, 3, H, W)``
``grid``          ``(h, w)``
``image_embed``   l2-normalised CLIP image embedding of ``post`` (only with ``model.text``)
``text_embed``    l2-normalised text embedding ``(B, E)`` of the batch's captions (only with
                  ``model.text`` and texts passed to ``forward(images, texts)``; the trainer passes
                  ``batch["text"]`` when an active loss ``needs`` text)
``logit_scale``   the CLIP log logit scale, a scalar clamped to [0, max] in value with its gradient
                  passed straight through (with ``text_embed``); ``exp()`` it for the multiplier
``last_layer``    the decoder's last weight (for adaptive GAN weighting)
``loss_terms``    added by the trainer: WEIGHTED terms of the losses computed so far this step, a
                  dict keyed ``(loss type, term)`` (:data:`LossTermKey`); when a type is configured
                  twice, its key holds the SUM of both losses' weighted terms (they are logged apart,
                  under their labels). Losses run in ascending ``Loss.order``, so a later loss
                  (adversarial, order 10) can read the reconstruction terms
================  =====================================================================

Config vocabulary: one name per idea, in every plugin (a third-party plugin should use them too).
A retired name in a config is an error naming its replacement (:data:`RETIRED`, per-class
``renamed``), e.g. ``error: model.quantizer.n_codebooks: renamed to codes_per_token``.

=========================  ===============================================================  ==========================================
name                       meaning                                                          retired names
=========================  ===============================================================  ==========================================
``codes_per_token``        K, the number of codes a token is quantized to (sub-codebooks   ``n_codebooks`` (mcq), ``depth`` (rq),
                           of mcq, residual stages of rq, bit groups of gq); the K of       ``n_groups`` (gq)
                           ``indices (B, N, K)`` and ``Quantizer.codes_per_token``
``code_dim``               width of ONE code (the latent is ``codes_per_token * code_dim``  ``group_dim`` (gq), ``dim`` (identity)
                           wide, except rq whose stages all quantize the full width)
``entropy_temperature``    T of an entropy loss's softmax ``softmax(-d(z, c) / T)``          ``inv_temperature`` (bsq: 1 / T),
                           (a temperature, never its inverse)                               ``entropy_over_inv_temperature``
``<term>_weight``          the weight of a quantizer's loss term ``<term>``, set ONLY in    ``commitment``; the ``quantizer`` loss's
                           the quantizer's config (``commitment_weight``,                   ``terms``
                           ``codebook_weight``, ``entropy_weight``)
``out_dim``                output width of an encoder or a projector                        ``out`` (projectors)
``depth``                  number of blocks of a stack (transformer blocks, PatchGAN        ``layers`` (``model.text``),
                           stride-2 layers); ``<part>_depth`` for a sub-stack               ``n_layers`` (patchgan)
``weights``                a local pretrained-weights file, in the config of the network    ``backbone_path`` (lpips), ``dino_weights``,
                           it loads (no downloads here)                                     ``teacher.path``, ``inception_weights``
``optimizer``              :class:`OptimizerConfig` (``lr``, ``betas``, ``eps``,            ``train.lr`` / ``betas`` / ``eps`` /
                           ``weight_decay``): ``train.optimizer`` and a discriminator's     ``weight_decay``, ``d_lr`` / ``d_betas`` /
                           ``optimizer`` (which adds its schedule and clip)                 ``d_eps`` / ``d_weight_decay`` / ``d_*``
nested configs             a sub-network is its own config, selected by ``type`` where      ``dino_*`` -> ``discriminator.*``,
                           there are several (``discriminator: {type: dino, ...}``)         ``ref_*`` -> ``reference.*`` (fd)
=========================  ===============================================================  ==========================================

Why these names: ``codes_per_token`` is what a tokenizer user counts (the K of a token file, the
``Quantizer`` attribute of the same name) and reads the same for sub-codebooks, residual stages and
bit groups, where ``n_codebooks`` is wrong for a shared-codebook rq and ``depth`` is taken by the
number of blocks. ``entropy_temperature`` because three of the four entropy-regularised quantizers
(lfq / gq, vq / mcq; UniTok's ``e_temp``, Open-MAGVIT2's ``temperature``) state T; BSQ-ViT's
``inv_temperature`` converts as T = 1 / inv_temperature (its operating point 1 stays 1). ``depth``
is timm's and open_clip's vision name for a block count; ``weights`` is one word for every local
file, wherever the network sits.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Optional, Protocol, runtime_checkable

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator, field_validator
from pydantic_core import PydanticCustomError
from torch import Tensor, nn

#: Retired field names -> the name that replaced them (see the glossary above). A config that
#: uses one of these keys (and does not declare it as a field) fails with ``<path>.<old>: renamed
#: to <new>``. Names whose meaning depends on the plugin (``depth`` in ``rq``, ``dim``, ``path``,
#: ``terms``, the ``d_*`` / ``dino_*`` / ``ref_*`` groups, ``train.lr``) are retired per class
#: in ``renamed``.
RETIRED: dict[str, str] = {
    "n_codebooks": "codes_per_token",
    "n_groups": "codes_per_token",
    "group_dim": "code_dim",
    "inv_temperature": "entropy_temperature (= 1 / inv_temperature)",
    "entropy_over_inv_temperature": "entropy_scaled_by_temperature",
    "out": "out_dim",
    "layers": "depth",
    "n_layers": "depth",
    "backbone_path": "weights",
    "inception_weights": "weights",
    "dino_weights": "discriminator.weights",
    "commitment": "commitment_weight",
}


class VocabModel(BaseModel):
    """Base of every config model: unknown keys are errors, and a retired name is an error naming
    its replacement (:data:`RETIRED` plus the class's own ``renamed`` table)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    #: retired field name -> its replacement, for this class only (merged over :data:`RETIRED`)
    renamed: ClassVar[dict[str, str]] = {}

    @classmethod
    def retired_names(cls) -> dict[str, str]:
        """Every retired name this class rejects (none of them is one of its fields)."""
        table = {**RETIRED, **cls.renamed}
        return {old: new for old, new in table.items() if old not in cls.model_fields}

    @model_validator(mode="before")
    @classmethod
    def _reject_retired_names(cls, data: Any) -> Any:
        if isinstance(data, dict):
            table = cls.retired_names()
            for key in data:
                if key in table:
                    raise PydanticCustomError("renamed", "renamed to {new}", {"old": key, "new": table[key]})
        return data


class OptimizerConfig(VocabModel):
    """AdamW settings, one model for every optimizer a config describes (``train.optimizer`` and a
    discriminator's ``optimizer``, which subclasses it with its own defaults)."""

    lr: float = Field(5e-4, gt=0)  # learning rate (peak, after warm-up)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    eps: float = Field(1e-6, gt=0)  # AdamW eps
    weight_decay: float = Field(0.02, ge=0)  # AdamW decoupled weight decay (not on 1-d parameters)

    def build(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        """The AdamW these settings describe, over parameter ``groups`` (each may set its own
        ``weight_decay``). Torch's fused kernel: the same update as the per-tensor loop (equal to
        float32 rounding), one pass over all tensors instead of a dozen kernels per tensor; on this
        2-core CPU it steps a 3.4M-parameter model 3.8x faster (the text tower's 49408-token
        embedding dominates). Used where the device has the kernel (CPU, CUDA)."""
        params = [p for g in groups for p in g["params"]]
        fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        return torch.optim.AdamW(groups, lr=self.lr, betas=self.betas, eps=self.eps, fused=fused or None)

    @field_validator("betas")
    @classmethod
    def _betas_in_unit_interval(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError(f"each of Adam's betas must lie in [0, 1), got {list(v)}")
        return v


class ComponentConfig(VocabModel):
    """Base of every plugin config: unknown keys are errors; ``type`` names the plugin.

    Subclasses narrow ``type`` to ``Literal["name"]`` so the registry can build discriminated unions.
    """

    type: str


class Component:
    """Mixin giving every component its ``Config`` class and a one-line summary (the docstring)."""

    Config: ClassVar[type[ComponentConfig]]

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


# --------------------------------------------------------------------------------------------
# Encoder / Decoder / Projector
# --------------------------------------------------------------------------------------------


class EncoderConfig(ComponentConfig):
    #: token width C; None: the encoder's natural width, or the quantizer's width when there is
    #: no pre-projector (the model assembly fills it in)
    out_dim: Optional[int] = Field(None, gt=0)


class Encoder(Component, nn.Module):
    """Image ``(B, 3, H, W)`` -> tokens ``(B, N, C)`` and grid ``(h, w)``.

    Constructed as ``Encoder(cfg, image_size=int)``; must set ``self.out_dim`` (C) and
    ``self.downsample`` (H / h). Its config subclasses :class:`EncoderConfig`.
    """

    Config: ClassVar[type[EncoderConfig]]

    out_dim: int
    downsample: int

    def forward(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:  # pragma: no cover
        raise NotImplementedError


class Decoder(Component, nn.Module):
    """Tokens ``(B, N, C)`` + grid ``(h, w)`` -> image ``(B, 3, H, W)``.

    Constructed as ``Decoder(cfg, in_dim=int, image_size=int, downsample=int)`` where ``downsample``
    is the encoder's. ``last_layer`` (a weight tensor) is what adaptive GAN weighting differentiates.
    """

    def forward(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    @property
    def last_layer(self) -> Tensor:  # pragma: no cover
        raise NotImplementedError


class ProjectorConfig(ComponentConfig):
    #: output width; None: whatever the next stage needs (the model assembly fills it in)
    out_dim: Optional[int] = Field(None, gt=0)


class Projector(Component, nn.Module):
    """``(B, N, C_in)`` -> ``(B, N, C_out)``; before (compression) and after (expansion) the quantizer.

    Constructed as ``Projector(cfg, in_dim=int, out_dim=int)``. Runs in fp32 (the model disables
    autocast around it). Its config subclasses :class:`ProjectorConfig`.
    """

    Config: ClassVar[type[ProjectorConfig]]

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# Quantizer
# --------------------------------------------------------------------------------------------


@dataclass
class QuantizerOutput:
    """What every quantizer returns.

    quantized: same shape as the input, straight-through gradients to the input.
    indices:   int64 ``(B, N, K)``; K = ``codes_per_token`` (sub-codebooks, residual depth or bit
               groups).
    losses:    term name -> UNWEIGHTED scalar tensor (e.g. ``commitment``, ``codebook``, ``entropy``).
    metrics:   name -> detached scalar tensor of THIS batch on THIS rank (e.g. the entropies
               ``sample_entropy``, ``codebook_entropy``). Tensors, not floats: no host sync in the
               hot path.
    stats:     LOCAL sum-reducible usage statistics (``counts`` ``(n, K)``, ``bit_sums`` ``(d,)``,
               ``rows``), see :mod:`core.quant_stats`: the trainer sums them over ranks once per
               logging step and derives ``quant/usage``, ``quant/perplexity``, ``quant/dead_codes``,
               ``quant/bit_balance`` from them.
    """

    quantized: Tensor
    indices: Tensor
    losses: dict[str, Tensor] = field(default_factory=dict)
    metrics: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, Tensor] = field(default_factory=dict)


class QuantizerConfig(ComponentConfig):
    """Quantizer configs also say which latent width they quantize (used by cross-field checks)."""

    @property
    def latent_dim(self) -> int:  # pragma: no cover
        raise NotImplementedError


class Quantizer(Component, nn.Module):
    """``(B, N, D)`` continuous latent -> :class:`QuantizerOutput`.

    Constructed as ``Quantizer(cfg)``. Subclasses implement :meth:`quantize`; :meth:`forward` wraps
    it in an fp32 island (autocast off, input cast to float32) so distances and entropies are
    always computed in fp32. The quantized output is returned in fp32.

    :meth:`encode` is the pure lookup (indices only): no losses, no statistics, no state update, no
    random draw, no collective -- what tokenization, the model's discrete path and evaluators use
    (rank 0 can evaluate alone). :meth:`quantize` reports usage as LOCAL statistics
    (``QuantizerOutput.stats``) and issues no collective for them. The only collectives inside a
    quantizer are algorithmic, in training mode only: the EMA codebook's per-code sums and counts
    (``vq``/``mcq`` ``codebook_update: ema``, all-reduce), the k-means initialisation (``vq``/``mcq``/
    ``rq`` ``kmeans_init``, broadcast from rank 0) and the dead-code restart (``vq``/``mcq``
    ``dead_code_threshold``: the batch's code counts all-reduced, the new codes broadcast from rank 0).
    """

    Config: ClassVar[type[QuantizerConfig]]

    #: number of codes per token (K in ``indices``)
    codes_per_token: int
    #: information per token in bits (sum of log2 of the sub-codebook sizes)
    bits_per_token: float
    #: size of each of the K codebooks (for usage metrics), length ``codes_per_token``
    codebook_sizes: list[int]
    #: True for a no-op "quantizer" (continuous baselines): there is no discrete path, and
    #: evaluators read the continuous latent instead
    continuous: ClassVar[bool] = False

    def forward(self, z: Tensor) -> QuantizerOutput:
        with torch.autocast(device_type=z.device.type, enabled=False):
            return self.quantize(z.float())

    def quantize(self, z: Tensor) -> QuantizerOutput:  # pragma: no cover
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, z: Tensor) -> Tensor:
        """``(B, N, D)`` latent -> int64 indices ``(B, N, K)``, equal to ``quantize(z).indices`` in eval
        mode, without losses, statistics, state updates, random draws or collectives. Runs
        :meth:`lookup` in the same fp32 island as :meth:`forward`."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            return self.lookup(z.float())

    def lookup(self, z: Tensor) -> Tensor:
        """fp32 latent -> indices, the body of :meth:`encode`. Default: :meth:`quantize` in eval mode
        (the training flags are restored), side-effect free when eval-mode ``quantize`` updates
        nothing; the built-in quantizers override it with the bare nearest-code lookup."""
        modes = [(m, m.training) for m in self.modules()]
        self.train(False)
        try:
            return self.quantize(z).indices
        finally:
            for m, mode in modes:
                m.training = mode

    def loss_weights(self) -> dict[str, float]:
        """The weight of each reported loss term, from the config's ``<term>_weight`` fields (defaults:
        the source paper's, e.g. ``commitment_weight`` beta=0.25); the ``quantizer`` loss applies them
        (the only place a quantizer term's weight is set)."""
        return {}

    def indices_to_codes(self, indices: Tensor) -> Tensor:  # pragma: no cover
        """int64 ``(B, N, K)`` -> quantized latent ``(B, N, D)``, equal to ``quantized`` in eval mode."""
        raise NotImplementedError

    def index_radices(self) -> list[list[int]]:
        """Per K-slot, the mixed-radix digit sizes of its index, least significant first:
        ``index = sum_j digit_j prod_{i<j} r_i`` with ``prod_j r_j == codebook_sizes[k]``. A binary
        index (LFQ, BSQ, a GQ group) is ``[2] * bits`` whatever its bit order; FSQ's is its levels.
        A generator reads it to split a huge slot into several small softmax heads. Default: one
        digit per slot."""
        return [[int(n)] for n in self.codebook_sizes]


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------


class LossConfig(ComponentConfig):
    """Common fields of every loss: an overall weight and a schedule.

    The effective multiplier at step s is ``weight * ramp(s)`` where ramp is 0 before
    ``start_step`` and rises linearly to 1 over ``warmup_steps``.
    """

    weight: float = 1.0
    start_step: int = 0
    warmup_steps: int = 0


#: key of ``outputs["loss_terms"]``: (loss type, term name), e.g. ``("pixel", "l2")``
LossTermKey = tuple[str, str]


@dataclass
class LossResult:
    """What :meth:`Loss.forward` and :meth:`Loss.aux_loss` return.

    terms:   term name -> scalar tensor that is optimised. From ``forward``: UNWEIGHTED; the trainer
             multiplies each by ``term_weights()[name]`` (default 1.0) and ``schedule(step)`` and
             sums them into the step's total. From ``aux_loss``: summed as they are (the loss applies
             its own coefficients) and minimised by the aux optimizer.
    metrics: name -> scalar diagnostic, only logged (detached by the trainer), NEVER part of a total.
             Names differ from the term names.
    """

    terms: dict[str, Tensor]
    metrics: dict[str, Tensor] = field(default_factory=dict)


class Loss(Component, nn.Module):
    """A named loss term computed from the step's batch and the model's outputs.

    Constructed as ``Loss(cfg, model=Tokenizer)``: read the model's dims at build time; do not keep
    a reference to the model. ``forward(batch, outputs, step)`` reads ONLY ``outputs`` (what the
    model's forward produced, see the table above; the text embedding and logit scale included)
    and the batch's targets / labels, and returns a :class:`LossResult`: ``terms`` UNWEIGHTED scalar
    tensors, which the trainer multiplies by ``term_weights()[name]`` (default 1.0) and the schedule
    and sums into the total; ``metrics`` detached diagnostics, only logged. Logged as
    ``loss/<label>/<term>`` (unweighted), ``loss_w/<label>/<term>`` (weighted) and
    ``loss/<label>/<metric>``; ``<label>`` is the loss type, or type + index when a type repeats.
    Another loss's weighted terms so far this step are ``outputs["loss_terms"][(type, term)]``.

    Modules a loss trains WITH the tokenizer (distillation heads, a prior model) are ordinary
    submodules with ``requires_grad``; they join the main optimizer. A module the loss trains
    against the tokenizer (a discriminator) is returned by :meth:`aux_parameters` and trained by
    the trainer with :meth:`aux_optimizer` on :meth:`aux_loss`, alternating with generator steps.
    """

    Config: ClassVar[type[LossConfig]]
    #: what the loss needs from the model or data: subset of {"text"} ("text": a text tower and
    #: captions; the trainer then passes the captions to the model, which adds ``text_embed`` and
    #: ``logit_scale`` to the outputs)
    needs: ClassVar[frozenset[str]] = frozenset()
    #: evaluation order within a step (ascending); see ``outputs["loss_terms"]``
    order: ClassVar[int] = 0

    def forward(self, batch: dict[str, Any], outputs: dict[str, Any], step: int) -> LossResult:  # pragma: no cover
        raise NotImplementedError

    def term_weights(self) -> dict[str, float]:
        """Weight of each term of ``forward``'s result (missing: 1.0)."""
        return {}

    def schedule(self, step: int) -> float:
        cfg = self.cfg  # type: ignore[attr-defined]
        if step < cfg.start_step:
            return 0.0
        if cfg.warmup_steps <= 0:
            return cfg.weight
        return cfg.weight * min(1.0, (step - cfg.start_step + 1) / cfg.warmup_steps)

    # --- optional adversarial side -----------------------------------------------------------
    def aux_parameters(self) -> list[nn.Parameter]:
        return []

    def aux_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer | None:
        return None

    def aux_loss(self, batch: dict[str, Any], outputs: dict[str, Any], step: int) -> LossResult | None:
        """Loss for the aux module (outputs are detached): the sum of ``terms`` is minimised (logged as
        ``aux/<label>/total``, each term and metric as ``aux/<label>/<name>``); None skips the step."""
        return None

    def before_aux_step(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Called after the aux loss's backward (gradients all-reduced), before ``optimizer.step()``:
        set this step's learning rate, clip gradients. Default: nothing."""


# --------------------------------------------------------------------------------------------
# Evaluator and Dataset
# --------------------------------------------------------------------------------------------


class Evaluator(Component):
    """Metrics of a trained tokenizer over the whole eval loader, in ONE shared pass.

    Constructed as ``Evaluator(cfg)``. ``loader.dataset`` is a :class:`Dataset`. The model is in
    eval mode under ``torch.no_grad`` when called; use only its members declared by
    :class:`TokenizerModel` (:class:`TextTokenizerModel` when ``needs`` has ``"text"``).

    Declared metrics: :meth:`declared_metrics` ``(cfg) -> {name: "higher" | "lower" | None}`` is a
    pure function of the config naming every metric the evaluator may report and which way is
    better (``None``: a property, not a quality). A name may hold ``<placeholders>`` (``usage_<k>``)
    that stand for one word. Validation checks ``sweep.objective.metric`` and the ``paper`` metrics
    against the union of these before anything trains, and the report takes directions from it.

    One pass (:func:`core.evaluation.run_evaluators`): the eval split goes through the model once;
    for each batch the evaluators get ``update(batch, outputs)`` where ``outputs`` is a
    :class:`core.evaluation.EvalOutputs` (``images``, ``recon`` clamped to [-1, 1] in fp32,
    ``indices``, ``codes`` / ``post`` / ``image_embed`` on the DISCRETE path -- computed on first
    use, shared by all evaluators). Order: ``begin(model, loader)``, ``update`` per batch,
    ``compute() -> dict[str, float]``. Work that is not per eval batch (a probe fit, a reference
    network, training a prior) goes in ``begin`` / ``compute``.

    Adapters: ``evaluate(model, loader)`` is implemented by default as that one pass with this
    evaluator alone. A third-party evaluator that overrides only ``evaluate`` (and not ``update``)
    still works: the pass calls its ``evaluate`` on its own (it runs the model itself).
    """

    Config: ClassVar[type[ComponentConfig]]
    needs: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, cfg: ComponentConfig) -> None:
        self.cfg = cfg

    @classmethod
    def declared_metrics(cls, cfg: ComponentConfig) -> Optional[dict[str, Optional[str]]]:
        """``{metric name or pattern: "higher" | "lower" | None}`` this config can produce.
        Default ``None``: undeclared (validation cannot check names against it)."""
        return None

    def begin(self, model: nn.Module, loader: torch.utils.data.DataLoader) -> None:
        """Before the pass: reset accumulators (default: remember model and loader)."""
        self.model, self.loader = model, loader

    def update(self, batch: dict[str, Any], outputs: Any) -> None:
        """One eval batch and the shared outputs of the model on it (default: nothing)."""

    def compute(self) -> dict[str, float]:  # pragma: no cover - overridden by streaming evaluators
        raise NotImplementedError

    def evaluate(self, model: nn.Module, loader: torch.utils.data.DataLoader) -> dict[str, float]:
        """The pass with this evaluator alone (see the class docstring)."""
        from core.evaluation import run_evaluators

        return run_evaluators(model, [self], loader)

    def save_artifacts(self, run_dir: Any, step: int) -> list[tuple[Any, str]]:
        """Optional: write files kept from the last ``evaluate`` (sample grids, a trained model) under
        the run directory ``run_dir`` and return ``(path, MLflow artifact directory)`` pairs to log.
        The trainer calls it on rank 0 after each evaluation at ``step``. Default: nothing."""
        return []


class DatasetConfig(ComponentConfig):
    image_size: int = 32

    @property
    def provides_text(self) -> bool:
        """Whether items carry ``text`` (checked before training by losses that need it)."""
        return False


class Dataset(Component, torch.utils.data.Dataset):
    """Yields dicts ``{"image": float (3, H, W) in [-1, 1], "text": str, "label": int}``.

    Constructed as ``Dataset(cfg, split="train"|"eval", seed=int)``. ``text`` and ``label`` only
    where the data has them (say so with ``Config.provides_text`` / ``class_names``). ``class_names`` and
    ``templates`` ("a photo of a {}.") serve zero-shot evaluation. An iterable dataset may
    subclass ``torch.utils.data.IterableDataset`` as well.
    """

    Config: ClassVar[type[DatasetConfig]]
    class_names: list[str] = []
    templates: list[str] = ["a photo of a {}."]
    #: optional extra zero-shot tasks: attribute -> class names; items then carry ``label_<attribute>``
    attributes: dict[str, list[str]] = {}
    #: prompt templates per attribute (default: ``templates``)
    attribute_templates: dict[str, list[str]] = {}
    #: set by the constructor, so an evaluator can rebuild the train split: ``type(ds)(ds.cfg, "train", ds.seed)``
    cfg: DatasetConfig
    split: str
    seed: int


# --------------------------------------------------------------------------------------------
# The model surface: what plugins may call on the assembled tokenizer
# --------------------------------------------------------------------------------------------


@runtime_checkable
class TokenizerModel(Protocol):
    """The members of the assembled tokenizer (:class:`core.model.Tokenizer`) that plugins -- losses
    (constructed with ``model=``), evaluators (the generation evaluator included), distillation
    teachers -- and the inference paths (:mod:`core.evaluation`, ``core.tokenize``, ``core.generate``)
    may use. Everything else on the model belongs to core and may change.

    Shapes: images ``(B, 3, H, W)`` in [-1, 1] with ``H = W = image_size``; ``grid = (h, w)`` and
    ``N = h * w`` tokens; ``K = quantizer.codes_per_token``; ``D`` the quantizer's input width
    (``spec.quantizer.latent_dim``); ``C_enc`` the encoder's width; ``C_post`` the post-projector's
    output width (the decoder's input); ``E`` the CLIP embedding width.

    The model is an ``nn.Module``. Of its ``nn.Module`` members plugins use only: calling it (runs
    :meth:`forward`), :meth:`parameters` (to find the device), :meth:`eval` and
    :meth:`requires_grad_` (to freeze a loaded model, e.g. a distillation teacher, which may also be
    held as a submodule of a frozen wrapper moved with ``.to``). Training mode, state dicts,
    optimizer steps and the logit-scale clamp are the trainer's.

    Members that are contracts of their own (``quantizer``, ``encoder``) are used through those
    contracts only (:class:`Quantizer`, :class:`Encoder`). A model with a text tower is also a
    :class:`TextTokenizerModel`. Checked: the Tokenizer (``tests/test_model_surface.py``) and the
    evaluator tests' hand-made model (``tests/test_evaluators.py``) satisfy both, members and
    signatures; every registered loss (``tests/test_model_surface.py``) and evaluator
    (``tests/test_evaluators_contract.py``) runs on a model wrapped so that any other member raises
    ``AttributeError``.
    """

    spec: Any
    """The validated ``model`` section of the experiment (``core.config``); plugins read
    ``spec.quantizer`` (its ``latent_dim`` D, its settings)."""

    image_size: int
    """H = W of the images the model takes."""

    grid: tuple[int, int]
    """``(h, w)``: the token grid of one image (N = h * w)."""

    encoder: Encoder
    """images ``(B, 3, H, W)`` -> ``(latent (B, N, C_enc), grid)``: the continuous tokens before the
    pre-projector (the CONTINUOUS path of a distillation teacher)."""

    quantizer: Quantizer
    """The quantizer: ``codes_per_token`` K, ``codebook_sizes``, ``continuous``, ``index_radices()``,
    ``indices_to_codes`` ``(B, N, K) -> (B, N, D)``, ``loss_weights()``."""

    text: Optional[nn.Module]
    """The text tower, ``None`` without ``model.text``. Plugins only test it against ``None``; text is
    embedded with :meth:`TextTokenizerModel.encode_text` or by :meth:`forward`."""

    def forward(self, images: Tensor, texts: Optional[list[str]] = None) -> dict[str, Any]:
        """images ``(B, 3, H, W)`` -> the ``outputs`` dict (table in this module's docstring). With a text
        tower and ``texts`` (B strings) it also holds ``text_embed`` ``(B, E)`` (l2-normalised) and
        ``logit_scale`` (a scalar: the learnable LOG logit scale, clamped in value; the CLIP logits
        are ``logit_scale.exp() * cos``), so losses read only ``outputs``."""
        ...

    def encode(self, images: Tensor) -> Tensor:
        """images ``(B, 3, H, W)`` -> int64 indices ``(B, N, K)`` (no losses, statistics or state change)."""
        ...

    def decode(self, indices: Tensor) -> Tensor:
        """int64 indices ``(B, N, K)`` -> images ``(B, 3, H, W)`` (not clamped)."""
        ...

    def discrete_latent(self, images: Tensor) -> Tensor:
        """images -> the quantized latent ``(B, N, D)`` on the DISCRETE path (indices -> codes), what a
        downstream model sees; for a continuous quantizer the latent itself."""
        ...

    def project_in(self, latent: Tensor) -> Tensor:
        """Encoder tokens ``(B, N, C_enc)`` -> quantizer input ``(B, N, D)`` (fp32; the pre-projector)."""
        ...

    def project_out(self, zq: Tensor) -> Tensor:
        """Quantized latent ``zq`` ``(B, N, D)`` -> decoder input ``(B, N, C_post)`` (the post-projector)."""
        ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        """``nn.Module.parameters``: plugins read the first one's device."""
        ...

    def eval(self) -> "TokenizerModel":
        """``nn.Module.eval``: inference mode, returns the model."""
        ...

    def requires_grad_(self, requires_grad: bool = True) -> "TokenizerModel":
        """``nn.Module.requires_grad_``: freeze a loaded model, returns it."""
        ...


@runtime_checkable
class TextTokenizerModel(TokenizerModel, Protocol):
    """What a model with a text tower (``model.text``) adds to :class:`TokenizerModel`: the members that
    plugins which declare ``needs = {"text"}`` may call (validation guarantees the tower)."""

    def encode_text(self, texts: list[str]) -> Tensor:
        """T strings -> l2-normalised fp32 text embeddings ``(T, E)``."""
        ...

    def clip_head(self, tokens: Tensor) -> Tensor:
        """Post-projector tokens ``(B, N, C_post)`` -> l2-normalised CLIP image embedding ``(B, E)``
        (mean over tokens -> LayerNorm -> Linear)."""
        ...

    def image_embed_from_indices(self, indices: Tensor) -> Tensor:
        """int64 indices ``(B, N, K)`` -> the CLIP image embedding ``(B, E)`` on the DISCRETE path
        (indices -> codes -> post-projector -> :meth:`clip_head`), what zero-shot evaluation uses."""
        ...
