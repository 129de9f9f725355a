"""Vector quantization: ``vq`` (one codebook) and ``mcq`` (UniTok multi-codebook quantization).

VQ-VAE (van den Oord et al. 2017, eq. 3): q = argmin_k d(z, e_k); loss
``||sg(z) - q||^2 + beta ||z - sg(q)||^2``; straight-through ``z + sg(q - z)``.
UniTok (arXiv 2502.20321, Sec. 3.2, "multi-codebook quantization"): the latent f in R^D is split
into n chunks f_i in R^(D/n), chunk i is quantized with its own sub-codebook Z_i, the results are
concatenated; vocabulary K^n. Latent chunks and codes are l2-normalised (cosine assignment), the
codebook is learned by gradient, the VQ loss is averaged over the sub-codebooks.

``mcq`` config fields are PER SUB-CODEBOOK: ``codebook_size`` entries of width ``code_dim`` each,
latent width ``codes_per_token * code_dim``. UniTok's official code states TOTALS instead
(``vocab_size``/``vocab_width`` over all sub-codebooks): its final model (vocab_size 32768,
vocab_width 64, 8 codebooks) is ``{type: mcq, codes_per_token: 8, codebook_size: 4096, code_dim: 8}``.
``vq`` is ``mcq`` with one codebook (same code path, same parameters, same random draws).

Optional entropy loss (``entropy_weight > 0``; off by default), as UniTok's quantizer
(FoundationVision/UniTok ``models/quant.py``: ``get_entropy_loss``, used by ``VectorQuantizer.forward``
when ``use_entropy_loss``, i.e. ``--le > 0``; default ``le 0``, ``e_temp 0.01``): per sub-codebook,
p(k | x) = softmax_k(-||x - e_k||^2 / T) over ALL K codes (on the normalised vectors with cosine
distance), entropy = H_ps - H_cb with H_ps = mean_rows H(p(.|x)) and
H_cb = -sum_k pbar_k log(pbar_k + 1e-7), pbar = mean_rows p (``codebook_entropy_log_eps``; 0: exact),
averaged over the sub-codebooks as ``VectorQuantizerM.forward`` does. Cost: an (n, M, K) softmax
held for the backward pass, as the official code.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from core.dist import all_reduce_sum_, broadcast_
from core.hookspecs import hookimpl
from core.interfaces import Quantizer, QuantizerConfig, QuantizerOutput
from plugins.quantizers._common import (
    SEARCH_BUDGET, cluster_sums, code_counts, entropy, gather_codes, kmeans, nearest_code, straight_through,
)


class _CodebookConfig(QuantizerConfig):
    codebook_size: int = Field(1024, gt=1)  # entries in each (sub-)codebook
    code_dim: int = Field(16, gt=0)  # width of each code (per sub-codebook)
    commitment_weight: float = Field(0.25, ge=0)  # beta, paper weight of mse(z, sg(q))
    codebook_weight: float = Field(1.0, ge=0)  # weight of mse(q, sg(z)) (codebook_update=gradient; VQ-VAE: 1)
    distance: Literal["cosine", "euclidean"] = "cosine"  # cosine: l2-normalise latent and codes (UniTok)
    codebook_update: Literal["gradient", "ema"] = "gradient"  # gradient: codebook loss (UniTok); ema: running means
    ema_decay: float = Field(0.99, gt=0, lt=1)  # decay of the EMA codebook statistics (codebook_update=ema)
    kmeans_init: bool = False  # initialise the codebook by k-means on the first training batch
    kmeans_iters: int = Field(10, ge=1)  # Lloyd iterations of that k-means
    dead_code_threshold: float = Field(0.0, ge=0)  # restart codes whose EMA batch count drops below this; 0: off
    usage_decay: float = Field(0.99, gt=0, lt=1)  # decay of the EMA batch count used by dead-code restart
    search_budget: int = Field(SEARCH_BUDGET, ge=1)  # max floats in one (rows x codes) similarity block
    entropy_weight: float = Field(0.0, ge=0)  # weight of the entropy term (UniTok ``le``); 0: off, not computed
    entropy_temperature: float = Field(0.01, gt=0)  # T of the entropy loss's softmax (UniTok ``e_temp``)
    codebook_entropy_log_eps: float = Field(1e-7, ge=0)  # log(pbar + eps) in H_cb (UniTok: 1e-7); 0: exact


class VQConfig(_CodebookConfig):
    type: Literal["vq"] = "vq"

    @property
    def latent_dim(self) -> int:
        return self.code_dim

    @property
    def codes_per_token(self) -> int:
        return 1


class MCQConfig(_CodebookConfig):
    type: Literal["mcq"] = "mcq"
    codes_per_token: int = Field(8, ge=1)  # n sub-codebooks; the latent is split into n equal chunks

    @property
    def latent_dim(self) -> int:
        return self.codes_per_token * self.code_dim


class MCQ(Quantizer):
    """UniTok multi-codebook VQ: n sub-codebooks on n latent chunks, cosine or Euclidean, grad or EMA.

    Index convention: ``indices[..., i]`` is the entry of sub-codebook i chosen for channels
    ``[i*code_dim, (i+1)*code_dim)``. Loss terms: ``commitment`` = mse(z, sg(q)), ``codebook`` =
    mse(q, sg(z)) (gradient updates only), both on the l2-normalised vectors with cosine distance,
    averaged over sub-codebooks. Memory of the search: O(N D + K D + chunk K) (chunked argmax).
    """

    Config = MCQConfig

    def __init__(self, cfg: _CodebookConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n, k, d = cfg.codes_per_token, cfg.codebook_size, cfg.code_dim
        bound = d**-0.5 / 36  # UniTok's codebook init
        self.codebook = nn.Parameter(torch.empty(n, k, d).uniform_(-bound, bound),
                                     requires_grad=cfg.codebook_update == "gradient")
        if cfg.codebook_update == "ema":
            self.register_buffer("ema_count", torch.ones(n, k))
            self.register_buffer("ema_sum", self.codebook.detach().clone())
        if cfg.dead_code_threshold > 0:
            self.register_buffer("usage_ema", torch.full((n, k), -1.0))  # -1: not seen a batch yet
        self.register_buffer("initted", torch.tensor(not cfg.kmeans_init))
        self._needs_init = cfg.kmeans_init  # python mirror of ``initted``: no host sync per step
        self.register_load_state_dict_post_hook(lambda m, _: setattr(m, "_needs_init", not bool(m.initted)))
        self.codes_per_token = n
        self.codebook_sizes = [k] * n
        self.bits_per_token = n * math.log2(k)

    # ---- pieces -------------------------------------------------------------------------------
    def _codes(self) -> Tensor:
        return F.normalize(self.codebook, dim=-1) if self.cfg.distance == "cosine" else self.codebook

    def _metric(self) -> str:
        return "dot" if self.cfg.distance == "cosine" else "euclidean"

    def _entropy(self, x: Tensor, codes: Tensor) -> Tensor:
        """UniTok's entropy loss: x ``(n, M, d)``, codes ``(n, K, d)`` -> mean over n of H_ps - H_cb."""
        sq = (x.pow(2).sum(-1, keepdim=True) + codes.pow(2).sum(-1).unsqueeze(1)).float()
        logits = torch.baddbmm(sq, x.float(), codes.float().transpose(1, 2), alpha=-2).mul(-1 / self.cfg.entropy_temperature)
        p, logp = logits.softmax(-1), logits.log_softmax(-1)
        h_ps = -(p * logp).sum(-1).mean(-1)  # (n,)
        h_cb = entropy(p.mean(1), self.cfg.codebook_entropy_log_eps)  # (n,)
        return (h_ps - h_cb).mean()

    @torch.no_grad()
    def _kmeans_init(self, x: Tensor) -> None:
        cb = kmeans(x, self.cfg.codebook_size, self.cfg.kmeans_iters, self._metric(), self.cfg.search_budget)
        self.codebook.data.copy_(cb)
        if self.cfg.codebook_update == "ema":
            self.ema_sum.copy_(cb * self.ema_count.unsqueeze(-1))
        self.initted.fill_(True)
        self._needs_init = False

    @torch.no_grad()
    def _ema_update(self, x: Tensor, idx: Tensor) -> None:
        """EMA codebook (VQ-VAE-2): running per-code counts and sums, Laplace-smoothed counts."""
        sums, counts = cluster_sums(x, idx, self.cfg.codebook_size)
        all_reduce_sum_(sums), all_reduce_sum_(counts)
        decay = self.cfg.ema_decay
        self.ema_count.mul_(decay).add_(counts, alpha=1 - decay)
        self.ema_sum.mul_(decay).add_(sums, alpha=1 - decay)
        total = self.ema_count.sum(-1, keepdim=True)
        smoothed = (self.ema_count + 1e-5) / (total + self.cfg.codebook_size * 1e-5) * total
        self.codebook.data.copy_(self.ema_sum / smoothed.unsqueeze(-1))

    @torch.no_grad()
    def _restart_dead(self, x: Tensor, counts: Tensor) -> None:
        """Replace codes whose EMA batch count < threshold by random batch vectors (torch.where: no sync).
        ``counts``: this rank's; the EMA follows the GLOBAL batch count (all-reduced here)."""
        counts = all_reduce_sum_(counts.clone())
        k, m = self.cfg.codebook_size, x.shape[1]
        fresh = torch.full_like(self.usage_ema, m / k)  # a restarted code starts at the uniform count
        self.usage_ema.copy_(torch.where(self.usage_ema < 0, fresh, self.usage_ema))
        self.usage_ema.mul_(self.cfg.usage_decay).add_(counts, alpha=1 - self.cfg.usage_decay)
        dead = self.usage_ema < self.cfg.dead_code_threshold
        picks = gather_codes(x, torch.randint(m, dead.shape, device=x.device))
        self.codebook.data.copy_(broadcast_(torch.where(dead.unsqueeze(-1), picks, self.codebook)))
        self.usage_ema.copy_(torch.where(dead, fresh, self.usage_ema))
        if self.cfg.codebook_update == "ema":
            self.ema_count.copy_(torch.where(dead, fresh, self.ema_count))
            self.ema_sum.copy_(torch.where(dead.unsqueeze(-1), picks * fresh.unsqueeze(-1), self.ema_sum))

    def _chunks(self, z: Tensor) -> Tensor:
        """latent ``(..., n d)`` -> the vectors the sub-codebooks quantize ``(n, M, d)``."""
        x = z.reshape(-1, self.cfg.codes_per_token, self.cfg.code_dim).transpose(0, 1)
        return F.normalize(x, dim=-1) if self.cfg.distance == "cosine" else x

    # ---- contract -----------------------------------------------------------------------------
    def lookup(self, z: Tensor) -> Tensor:
        idx = nearest_code(self._chunks(z), self._codes().detach(), self._metric(), self.cfg.search_budget)
        return idx.t().reshape(*z.shape[:-1], self.cfg.codes_per_token)

    def quantize(self, z: Tensor) -> QuantizerOutput:
        cfg = self.cfg
        x = self._chunks(z)  # (n, M, d)
        if self.training and self._needs_init:
            self._kmeans_init(x.detach())
        codes = self._codes()
        idx = nearest_code(x.detach(), codes.detach(), self._metric(), cfg.search_budget)  # (n, M)
        q = gather_codes(codes, idx)
        losses = {"commitment": F.mse_loss(x, q.detach())}
        if cfg.codebook_update == "gradient":
            losses["codebook"] = F.mse_loss(q, x.detach())
        if cfg.entropy_weight > 0:
            losses["entropy"] = self._entropy(x, codes)
        counts = code_counts(idx.t(), cfg.codebook_size)
        if self.training:
            if cfg.codebook_update == "ema":
                self._ema_update(x.detach(), idx)
            if cfg.dead_code_threshold > 0:
                self._restart_dead(x.detach(), counts)
        out = straight_through(x, q).transpose(0, 1).reshape(z.shape)
        return QuantizerOutput(out, idx.t().reshape(*z.shape[:-1], cfg.codes_per_token), losses, stats={"counts": counts})

    def loss_weights(self) -> dict[str, float]:
        weights = {"commitment": self.cfg.commitment_weight}
        if self.cfg.codebook_update == "gradient":
            weights["codebook"] = self.cfg.codebook_weight
        if self.cfg.entropy_weight > 0:
            weights["entropy"] = self.cfg.entropy_weight
        return weights

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        n = self.cfg.codes_per_token
        flat = indices.reshape(-1, n).t()  # (n, M)
        q = gather_codes(self._codes(), flat).transpose(0, 1)
        return q.reshape(*indices.shape[:-1], n * self.cfg.code_dim)


class VQ(MCQ):
    """Single-codebook VQ (``mcq`` with codes_per_token=1): cosine or Euclidean, gradient or EMA codebook."""

    Config = VQConfig


@hookimpl
def register_quantizers(register):
    register("vq", VQ)
    register("mcq", MCQ)
