"""Every loss term is finite under bf16 autocast (CPU autocast here), evaluated like the trainer:
ascending ``order``, ``outputs["loss_terms"]`` holding the weighted terms computed so far."""
from __future__ import annotations

import timm
import torch
import torchvision

from core.plugins import get_registry
from losses_helpers import images, tiny_model

CAPTIONS = ["a red circle", "a blue square"]


def test_all_loss_terms_finite_under_bf16_autocast(tmp_path):
    torch.manual_seed(0)
    alex = tmp_path / "alex.pth"
    torch.save({k: v for k, v in torchvision.models.alexnet(weights=None).state_dict().items() if k.startswith("features.")}, alex)
    vit = tmp_path / "vit.pth"
    torch.save(timm.create_model("test_vit", pretrained=False, num_classes=0).state_dict(), vit)
    cfgs = {
        "pixel": {}, "quantizer": {"ramp_steps": 10},
        "perceptual": {"net": "alex", "weights": str(alex)},
        "adversarial": {"discriminator": {"type": "patchgan", "width": 8, "depth": 2}, "diffaug": ["color", "translation", "cutout"], "lecam": 0.1},
        "contrastive": {},
        "distill": {"teacher": {"kind": "timm", "name": "test_vit", "weights": str(vit), "image_size": 32}},
        "prior": {"width": 16, "depth": 1, "heads": 2},
    }
    reg = get_registry()
    model = tiny_model(text=True)
    losses = {n: reg.get("losses", n)(reg.get("losses", n).Config(**c), model=model) for n, c in cfgs.items()}
    batch = {"text": CAPTIONS}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images(2), CAPTIONS)
        out["loss_terms"] = {}
        for name, loss in sorted(losses.items(), key=lambda kv: kv[1].order):
            w = loss.term_weights()
            res = loss(batch, out, 0)
            for term, v in {**res.terms, **res.metrics}.items():
                assert v.ndim == 0 and torch.isfinite(v), f"{name}/{term}"
            for term, v in res.terms.items():
                out["loss_terms"][(name, term)] = loss.schedule(0) * w.get(term, 1.0) * v
        d = losses["adversarial"].aux_loss(batch, {k: (v.detach() if torch.is_tensor(v) else v) for k, v in out.items()}, 0)
    assert all(torch.isfinite(v) for v in {**d.terms, **d.metrics}.values())
    total = sum(out["loss_terms"].values())
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert ("adversarial", "adaptive_weight") not in out["loss_terms"]  # a diagnostic: a metric, not a term
