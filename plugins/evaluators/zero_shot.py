"""Zero-shot classification through the jointly trained text tower, on the DISCRETE path.

As CLIP / open_clip's zero-shot classifier: each class's weight is the l2-normalised mean of the
normalised text embeddings of ``template.format(class name)`` over the templates; an image's
embedding is the shared pass's ``image_embed``, ``model.image_embed_from_indices(indices)`` (indices
-> codes -> post-projector -> CLIP head, UniTok Sec. 3; the latent itself for a continuous baseline); logits ``100 * cos``; top-1 / top-5 accuracy in %.
Written here rather than calling ``open_clip.build_zero_shot_classifier`` because vtok's text tower
takes strings (its tokenizer is inside), while open_clip's helper tokenises for the model.

Metrics: ``zero_shot_top1`` and, with more than 5 classes, ``zero_shot_top5`` on the dataset's
``class_names`` / ``label``; for each name in ``attributes`` (the dataset's extra tasks, e.g.
shapes' ``colour``) ``zero_shot_<attribute>_top1`` (and ``_top5``) on ``label_<attribute>``.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from core.errors import ConfigError
from core.hookspecs import hookimpl
from core.interfaces import ComponentConfig, Evaluator
from plugins.evaluators._common import base_dataset, device_of

TEXT_CHUNK = 256  # prompts per text-tower call


class ZeroShotConfig(ComponentConfig):
    type: Literal["zero_shot"] = "zero_shot"
    attributes: list[str] = Field(default_factory=list)  # extra zero-shot tasks from the dataset's ``attributes``


@torch.no_grad()
def class_weights(model, class_names: list[str], templates: list[str]) -> Tensor:
    """(C, D): per class, normalise(mean over templates of the normalised text embeddings)."""
    prompts = [t.format(c) for c in class_names for t in templates]
    emb = torch.cat([model.encode_text(prompts[i:i + TEXT_CHUNK]) for i in range(0, len(prompts), TEXT_CHUNK)])
    emb = F.normalize(emb.float(), dim=-1).view(len(class_names), len(templates), -1).mean(dim=1)
    return F.normalize(emb, dim=-1)


def topk_correct(logits: Tensor, labels: Tensor, k: int) -> int:
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return int((top == labels[:, None]).any(dim=1).sum())


class ZeroShot(Evaluator):
    """Zero-shot accuracy (%) with the text tower on the discrete path: ``zero_shot_top1`` [, ``_top5``]."""

    Config = ZeroShotConfig
    needs = frozenset({"text"})

    def _tasks(self, ds) -> list[tuple[str, str, list[str], list[str]]]:
        """(metric prefix, batch label key, class names, templates) per task."""
        if not ds.class_names:
            raise ConfigError("eval.zero_shot", f"data '{ds.cfg.type}' has no class_names to classify")
        tasks = [("zero_shot", "label", list(ds.class_names), list(ds.templates))]
        for attr in self.cfg.attributes:
            if attr not in ds.attributes:
                known = ", ".join(ds.attributes) or "none"
                raise ConfigError("eval.zero_shot.attributes", f"data '{ds.cfg.type}' has no attribute '{attr}' (has: {known})")
            tasks.append((f"zero_shot_{attr}", f"label_{attr}", list(ds.attributes[attr]),
                          list(ds.attribute_templates.get(attr, ds.templates))))
        return tasks

    @classmethod
    def declared_metrics(cls, cfg: ZeroShotConfig) -> dict[str, str]:
        # _top5 only with more than 5 classes (the dataset's): declared as possible
        return {f"{p}_top{k}": "higher" for p in ["zero_shot"] + [f"zero_shot_{a}" for a in cfg.attributes] for k in (1, 5)}

    def begin(self, model, loader) -> None:
        self.tasks = self._tasks(base_dataset(loader))
        self.device = device_of(model)
        self.weights = [class_weights(model, names, tmpl).to(self.device) for _, _, names, tmpl in self.tasks]
        self.correct = [[0, 0] for _ in self.tasks]
        self.seen = [0 for _ in self.tasks]

    def update(self, batch, outputs) -> None:
        emb = outputs["image_embed"].float()
        for t, ((_, key, _, _), w) in enumerate(zip(self.tasks, self.weights)):
            labels = torch.as_tensor(batch[key]).to(self.device)
            keep = labels >= 0  # unlabelled items (label -1) are skipped
            logits = 100.0 * emb[keep] @ w.T
            self.correct[t][0] += topk_correct(logits, labels[keep], 1)
            self.correct[t][1] += topk_correct(logits, labels[keep], 5)
            self.seen[t] += int(keep.sum())

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for (prefix, _, names, _), (c1, c5), n in zip(self.tasks, self.correct, self.seen):
            out[f"{prefix}_top1"] = 100.0 * c1 / max(n, 1)
            if len(names) > 5:
                out[f"{prefix}_top5"] = 100.0 * c5 / max(n, 1)
        return out


@hookimpl
def register_evaluators(register):
    register("zero_shot", ZeroShot)
