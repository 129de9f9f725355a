"""Linear probe: multinomial logistic regression (scikit-learn) on frozen pooled DISCRETE features.

The cheap stand-in for the papers' understanding columns (VQA through an MLLM): how linearly
decodable the class is from what the tokens carry. Features: mean over tokens of the codes
looked up from the indices (``features: codes``) or of the post-projector output on them
(``post``, default: what the decoder and the CLIP head read). The eval set is split once with a
fixed permutation: ``1 - holdout`` of it fits the probe (standardised features, L2 penalty
``1 / c``), the rest measures ``linear_probe_top1`` (%); ``linear_probe_fit_top1`` is the fit
accuracy (a large gap means too few eval images for the feature width).
"""
from __future__ import annotations

from typing import Literal, Optional

import numpy as np
import torch
from pydantic import Field

from core.errors import ConfigError
from core.hookspecs import hookimpl
from core.interfaces import ComponentConfig, Evaluator


class LinearProbeConfig(ComponentConfig):
    type: Literal["linear_probe"] = "linear_probe"
    features: Literal["post", "codes"] = "post"  # which discrete-path tokens are pooled
    holdout: float = Field(0.5, gt=0, lt=1)  # fraction of the eval set the probe is scored on
    c: float = Field(1.0, gt=0)  # inverse L2 strength of the logistic regression
    max_iter: int = Field(1000, gt=0)  # L-BFGS iterations
    seed: int = 0  # the fit / held-out permutation


def probe_accuracy(feats: np.ndarray, labels: np.ndarray, cfg: LinearProbeConfig) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    perm = np.random.default_rng(cfg.seed).permutation(len(labels))
    n_test = max(1, int(round(cfg.holdout * len(labels))))
    test, fit = perm[:n_test], perm[n_test:]
    if len(fit) == 0 or len(np.unique(labels[fit])) < 2:
        raise ConfigError("eval.linear_probe", f"{len(labels)} labelled eval images leave fewer than 2 classes to fit; raise train.eval_size")
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=cfg.c, max_iter=cfg.max_iter))
    probe.fit(feats[fit], labels[fit])
    return {"linear_probe_top1": 100.0 * float((probe.predict(feats[test]) == labels[test]).mean()),
            "linear_probe_fit_top1": 100.0 * float((probe.predict(feats[fit]) == labels[fit]).mean())}


class LinearProbe(Evaluator):
    """Logistic-regression probe on pooled discrete features: ``linear_probe_top1`` (%) on a held-out part."""

    Config = LinearProbeConfig

    @classmethod
    def declared_metrics(cls, cfg: LinearProbeConfig) -> dict[str, Optional[str]]:
        return {"linear_probe_top1": "higher", "linear_probe_fit_top1": None}  # fit accuracy: a diagnostic

    def begin(self, model, loader) -> None:
        self.feats, self.labels = [], []

    def update(self, batch, outputs) -> None:
        f = outputs["post" if self.cfg.features == "post" else "codes"].float().mean(dim=1)
        self.feats.append(f.cpu().numpy().astype(np.float64))
        self.labels.append(torch.as_tensor(batch["label"]).cpu().numpy())

    def compute(self) -> dict[str, float]:
        """Fits the probe (the extra work, after the pass)."""
        x, y = np.concatenate(self.feats), np.concatenate(self.labels)
        keep = y >= 0
        return probe_accuracy(x[keep], y[keep], self.cfg)


@hookimpl
def register_evaluators(register):
    register("linear_probe", LinearProbe)
