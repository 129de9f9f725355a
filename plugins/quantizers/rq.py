"""Residual quantization (RQ-VAE, Lee et al. 2022, eqs. 2-5): D stages, stage s quantizes the residual
left by stages < s; the code is the sum of the D chosen entries.

l2-normalisation choice (``l2_normalize``): residuals are not unit vectors, so every stage searches
by Euclidean distance on raw codes. ``"input"`` l2-normalises the latent once before stage 1 (the
quantized output then approximates the normalised latent, as UniTok's Table 7 RQ baseline needs
for a like-for-like comparison with cosine MCQ); ``"none"`` quantizes the raw latent (RQ-VAE).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from core.hookspecs import hookimpl
from core.interfaces import Quantizer, QuantizerConfig, QuantizerOutput
from plugins.quantizers._common import SEARCH_BUDGET, code_counts, kmeans, nearest_code, straight_through


class RQConfig(QuantizerConfig):
    type: Literal["rq"] = "rq"
    renamed = {"depth": "codes_per_token"}
    codes_per_token: int = Field(4, ge=1)  # D residual stages
    codebook_size: int = Field(1024, gt=1)  # entries per stage codebook
    code_dim: int = Field(64, gt=0)  # latent width (every stage quantizes the full width)
    shared_codebook: bool = False  # one codebook for all stages (RQ-VAE) or one per stage
    l2_normalize: Literal["none", "input"] = "none"  # see the module docstring
    commitment_weight: float = Field(0.25, ge=0)  # beta, paper weight of the commitment term
    codebook_weight: float = Field(1.0, ge=0)  # weight of the codebook term (RQ-VAE: 1)
    kmeans_init: bool = False  # k-means each stage's codebook on its residuals of the first training batch
    kmeans_iters: int = Field(10, ge=1)  # Lloyd iterations of that k-means
    search_budget: int = Field(SEARCH_BUDGET, ge=1)  # max floats in one (rows x codes) distance block

    @property
    def latent_dim(self) -> int:
        return self.code_dim


class RQ(Quantizer):
    """Residual VQ of depth D; indices ``(B, N, D)``, ``indices[..., s]`` = stage s's entry.

    Losses: ``commitment`` = mean over s of mse(z, sg(q_<=s)) (RQ-VAE eq. 5), ``codebook`` = mean
    over s of mse(e_s, sg(r_s)) where r_s is the residual stage s quantizes.
    """

    Config = RQConfig

    def __init__(self, cfg: RQConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n_books = 1 if cfg.shared_codebook else cfg.codes_per_token
        bound = cfg.code_dim**-0.5 / 36
        self.codebook = nn.Parameter(torch.empty(n_books, cfg.codebook_size, cfg.code_dim).uniform_(-bound, bound))
        self.register_buffer("initted", torch.tensor(not cfg.kmeans_init))
        self._needs_init = cfg.kmeans_init
        self.register_load_state_dict_post_hook(lambda m, _: setattr(m, "_needs_init", not bool(m.initted)))
        self.codes_per_token = cfg.codes_per_token
        self.codebook_sizes = [cfg.codebook_size] * cfg.codes_per_token
        self.bits_per_token = cfg.codes_per_token * math.log2(cfg.codebook_size)

    def _book(self, s: int) -> Tensor:
        return self.codebook[0 if self.cfg.shared_codebook else s]

    @torch.no_grad()
    def _kmeans_init(self, x: Tensor) -> None:
        """Stage by stage on the residuals (a shared codebook is fitted to the first stage's)."""
        r = x
        for s in range(self.codebook.shape[0]):
            cb = kmeans(r[None], self.cfg.codebook_size, self.cfg.kmeans_iters, "euclidean", self.cfg.search_budget)[0]
            self.codebook.data[s].copy_(cb)
            r = r - cb[nearest_code(r[None], cb[None], "euclidean", self.cfg.search_budget)[0]]
        self.initted.fill_(True)
        self._needs_init = False

    def _rows(self, z: Tensor) -> Tensor:
        x = z.reshape(-1, self.cfg.code_dim)
        return F.normalize(x, dim=-1) if self.cfg.l2_normalize == "input" else x

    def lookup(self, z: Tensor) -> Tensor:
        """Stage by stage as :meth:`quantize` (same subtraction order, so the same indices)."""
        cfg = self.cfg
        residual, idxs = self._rows(z), []
        for s in range(cfg.codes_per_token):
            cb = self._book(s).detach()
            idx = nearest_code(residual[None], cb[None], "euclidean", cfg.search_budget)[0]
            residual = residual - cb[idx]
            idxs.append(idx)
        return torch.stack(idxs, -1).reshape(*z.shape[:-1], cfg.codes_per_token)

    def quantize(self, z: Tensor) -> QuantizerOutput:
        cfg = self.cfg
        x = self._rows(z)
        if self.training and self._needs_init:
            self._kmeans_init(x.detach())
        residual, total, idxs, commit, book = x.detach(), None, [], [], []
        for s in range(cfg.codes_per_token):
            cb = self._book(s)
            idx = nearest_code(residual[None], cb.detach()[None], "euclidean", cfg.search_budget)[0]
            e = cb[idx]
            book.append(F.mse_loss(e, residual))
            total = e if total is None else total + e
            commit.append(F.mse_loss(x, total.detach()))
            residual = residual - e.detach()
            idxs.append(idx)
        idx = torch.stack(idxs, -1)
        losses = {"commitment": torch.stack(commit).mean(), "codebook": torch.stack(book).mean()}
        out = straight_through(x, total).reshape(z.shape)
        return QuantizerOutput(out, idx.reshape(*z.shape[:-1], cfg.codes_per_token), losses,
                               stats={"counts": code_counts(idx, cfg.codebook_size)})

    def loss_weights(self) -> dict[str, float]:
        return {"commitment": self.cfg.commitment_weight, "codebook": self.cfg.codebook_weight}

    def indices_to_codes(self, indices: Tensor, depth: int | None = None) -> Tensor:
        """Sum of the first ``depth`` (default all) stages' entries, in stage order (as in ``quantize``)."""
        total = None
        for s in range(depth or self.cfg.codes_per_token):
            e = self._book(s)[indices[..., s]]
            total = e if total is None else total + e
        return total


@hookimpl
def register_quantizers(register):
    register("rq", RQ)
