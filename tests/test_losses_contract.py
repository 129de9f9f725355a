"""Contract over EVERY registered loss, and a timm-style gradient check over every model component.

Losses: each registered loss has an entry in CONTRACT (a tiny experiment that trains it, and the
parts of the model its terms must send gradients to); a newly registered loss without an entry
fails ``test_contract_table_covers_the_registry``. Per loss: one trainer step (``TrainStep``, as
training runs it) yields a ``LossResult`` of finite unweighted scalar terms and detached metrics;
the trainer's total is the hand-computed sum of terms x weights x schedule (metrics never in it);
the loss keeps no reference to the model and runs on the outputs alone (the model's methods raise);
every trainable parameter of the named parts receives a finite, non-zero gradient from that loss's
own terms.

Components: a tiny model with each registered encoder, decoder, projector and quantizer swapped in
is trained one step with [pixel, quantizer]; every trainable parameter of the model gets a finite
gradient and (except the ones listed in NO_GRAD with the reason) a non-zero one.
"""
from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from torch import nn

from core.config import validate
from core.plugins import get_registry
from core.interfaces import LossResult
from core.trainer import TrainStep, aux_total, build

REG = get_registry()
TEXT = {"width": 32, "depth": 1, "heads": 2, "context_length": 16}


def _alexnet_weights(tmp) -> dict:
    import torchvision

    path = tmp / "alexnet.pth"
    if not path.exists():
        sd = torchvision.models.alexnet(weights=None).state_dict()
        torch.save({k: v for k, v in sd.items() if k.startswith("features.")}, path)
    return {"net": "alex", "weights": str(path)}


def _timm_vit(tmp) -> str:
    import timm

    path = tmp / "test_vit.pth"
    if not path.exists():
        torch.save(timm.create_model("test_vit", pretrained=False, num_classes=0).state_dict(), path)
    return str(path)


# loss type -> (tmp dir -> (losses list, model extras), parts of the model that must get gradients)
# parts: "encoder", "decoder", "quantizer", "text", "loss" (the loss's own trainable submodules)
CONTRACT: dict[str, tuple[Callable[[Any], tuple[list[dict], dict]], list[str]]] = {
    "pixel": (lambda t: ([{"type": "pixel"}], {}), ["encoder", "decoder"]),
    "quantizer": (lambda t: ([{"type": "quantizer"}], {}), ["encoder", "quantizer"]),
    "perceptual": (lambda t: ([{"type": "perceptual", **_alexnet_weights(t)}], {}), ["encoder", "decoder"]),
    "contrastive": (lambda t: ([{"type": "contrastive"}], {"text": TEXT}), ["encoder", "text"]),
    "distill": (lambda t: ([{"type": "distill", "heads": 2, "teacher": {"kind": "timm", "name": "test_vit", "weights": _timm_vit(t)}}], {}),
                ["encoder", "loss"]),
    "prior": (lambda t: ([{"type": "prior", "width": 16, "depth": 1, "heads": 2, "head_width": 16, "head_depth": 1}], {}),
              ["encoder", "loss"]),
    "adversarial": (lambda t: ([{"type": "pixel"}, {"type": "adversarial", "discriminator": {"type": "patchgan", "width": 8, "depth": 2}}], {}),
                    ["decoder"]),
}


def tiny(losses: list[dict], model_extra: dict | None = None, **model_over: Any) -> Any:
    model = {"encoder": {"type": "conv", "width": 8, "downsample": 4},
             "quantizer": {"type": "vq", "codebook_size": 32, "code_dim": 8},
             "decoder": {"type": "conv", "width": 8}, **(model_extra or {}), **model_over}
    return validate({"name": "contract", "seed": 0, "data": {"type": "shapes", "image_size": 16, "train_size": 64},
                     "model": model, "losses": losses, "tracking": {"enabled": False}})


def batch_of(ds, n: int = 4) -> dict[str, Any]:
    return torch.utils.data.default_collate([ds[i] for i in range(n)])


def holds_model(obj: Any, model: nn.Module) -> list[str]:
    """Paths inside ``obj`` (attributes, submodules, tuples, lists, dicts) that reach the model, one
    of its submodules or one of its parameters."""
    targets = {id(m) for m in model.modules()} | {id(p) for p in model.parameters()}
    found, seen = [], set()

    def walk(x: Any, path: str) -> None:
        if id(x) in seen or isinstance(x, (str, bytes, int, float, bool, type(None))):
            return
        seen.add(id(x))
        if id(x) in targets:
            found.append(path)
            return
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{path}[{k!r}]")
        elif isinstance(x, (list, tuple, set)):
            for i, v in enumerate(x):
                walk(v, f"{path}[{i}]")
        elif isinstance(x, nn.Module) or hasattr(x, "__dict__") and not isinstance(x, (torch.Tensor, type)):
            for k, v in vars(x).items():
                walk(v, f"{path}.{k}")

    walk(obj, "loss")
    return found


def poisoned(model: nn.Module) -> None:
    """Make every model entry point a loss could call at forward time raise."""
    def boom(*a: Any, **k: Any) -> None:
        raise AssertionError("a loss called the model during its forward")
    for name in ("forward", "encode_text", "clamped_logit_scale", "encode", "decode", "discrete_latent",
                 "image_embed_discrete", "project_in", "project_out"):
        setattr(model, name, boom)


def trainable(module: nn.Module, skip: set[int] = frozenset()) -> dict[str, nn.Parameter]:
    return {n: p for n, p in module.named_parameters() if p.requires_grad and id(p) not in skip}


def test_contract_table_covers_the_registry():
    assert set(CONTRACT) == set(REG.names("losses")), "add the new loss to CONTRACT"


@pytest.mark.parametrize("name", REG.names("losses"))
def test_loss_terms_finite_unweighted_scalars_and_gradients_reach_their_parts(name, tmp_path):
    if name not in CONTRACT:
        pytest.fail(f"loss {name!r} has no CONTRACT entry")
    make, parts = CONTRACT[name]
    losses, extra = make(tmp_path)
    built = build(tiny(losses, extra))
    step = TrainStep(built.model, built.losses, built.labels)
    batch = batch_of(built.train_set)
    total, outputs, logs = step(batch, 0)
    assert torch.isfinite(total)
    (i,) = [k for k, loss in enumerate(built.losses) if loss.cfg.type == name]
    loss, label = built.losses[i], built.labels[i]
    assert not holds_model(loss, built.model), holds_model(loss, built.model)
    poisoned(built.model)  # the loss reads the outputs only
    results = {lab: l(batch, outputs, 0) for lab, l in zip(built.labels, built.losses)}
    assert all(isinstance(r, LossResult) for r in results.values())
    res = results[label]
    terms, metrics = res.terms, res.metrics
    assert terms and not set(terms) & set(metrics)
    # unweighted terms and metrics as the trainer logged them (values differ for losses that sample: prior's t)
    logged = {k.split("/", 2)[2]: v for k, v in logs.items() if k.startswith(f"loss/{label}/")}
    assert set(logged) == set(terms) | set(metrics)
    assert {k.split("/", 2)[2] for k in logs if k.startswith(f"loss_w/{label}/")} == set(terms)
    for k, v in {**terms, **metrics}.items():
        assert torch.is_tensor(v) and v.ndim == 0 and torch.isfinite(v) and torch.isfinite(logged[k]), k
    assert all(not v.requires_grad for v in metrics.values())
    # the trainer's total = sum over every loss of schedule x term weight x the logged unweighted term
    hand = sum(l.schedule(0) * l.term_weights().get(t, 1.0) * logs[f"loss/{lab}/{t}"].item()
               for lab, l in zip(built.labels, built.losses) for t in results[lab].terms)
    assert total.item() == pytest.approx(hand, rel=1e-6, abs=1e-7)
    # gradients of this loss's own terms
    aux = {id(p) for p in loss.aux_parameters()}
    modules = {"loss": loss, "text": built.model.text, **{p: getattr(built.model, p) for p in ("encoder", "decoder", "quantizer")}}
    targets = {f"{part}.{n}": p for part in parts for n, p in trainable(modules[part], aux).items()}
    assert targets
    objective = sum(v.float() for v in terms.values())
    grads = torch.autograd.grad(objective, list(targets.values()), allow_unused=True)
    missing = [n for (n, _), g in zip(targets.items(), grads) if g is None or not torch.isfinite(g).all() or g.abs().sum() == 0]
    assert not missing, f"{name}: no gradient for {missing[:5]} (+{max(0, len(missing) - 5)})"
    # an adversary (a discriminator) is trained by its own loss: every aux parameter gets a gradient
    if aux:
        detached = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in outputs.items()}
        res = loss.aux_loss(batch, detached, 0)
        assert isinstance(res, LossResult) and res.terms and not set(res.terms) & set(res.metrics)
        aux = aux_total(res, label)
        assert torch.isfinite(aux) and aux.item() == pytest.approx(sum(v.item() for v in res.terms.values()), rel=1e-6)
        params = loss.aux_parameters()
        grads = torch.autograd.grad(aux, params, allow_unused=True)
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        # every weight tensor moves (a final bias may cancel exactly: the hinge loss's -1 + 1 at init)
        dead = [i for i, (p, g) in enumerate(zip(params, grads)) if p.ndim >= 2 and g.abs().sum() == 0]
        assert not dead, f"{name}: aux weights {dead} of {len(params)} get no gradient"


# ---- timm-style: every trainable parameter of every model component receives a gradient ----------

TINY_COMPONENTS: dict[str, dict[str, dict]] = {
    "encoders": {"conv": {"width": 8, "downsample": 4},
                 "vit": {"width": 16, "depth": 1, "heads": 2, "downsample": 4},
                 "hybrid": {"width": 16, "depth": 1, "heads": 2, "downsample": 4, "conv_width": 8, "conv_depth": 1}},
    "decoders": {"conv": {"width": 8},
                 "vit": {"width": 16, "depth": 1, "heads": 2},
                 "hybrid": {"width": 16, "depth": 1, "heads": 2, "conv_width": 8},
                 "vitamin": {"width": 16, "depth": 2, "heads": 2, "stage_widths": [8], "stage_depths": [1]}},
    "projectors": {"linear": {}, "attention": {"heads": 2}},
    "quantizers": {"vq": {"codebook_size": 32, "code_dim": 8}, "mcq": {"codes_per_token": 2, "codebook_size": 16, "code_dim": 4},
                   "rq": {"codes_per_token": 2, "codebook_size": 16, "code_dim": 8}, "lfq": {"code_dim": 8},
                   "gq": {"codes_per_token": 2, "code_dim": 4}, "bsq": {"code_dim": 8, "entropy_group_size": 4}, "fsq": {"levels": [5, 4, 3]},
                   "identity": {"code_dim": 8}},
}
SLOT = {"encoders": "encoder", "decoders": "decoder", "quantizers": "quantizer", "projectors": "pre_projector"}
COMPONENT_CASES = [(kind, name) for kind in SLOT for name in REG.names(kind)]


def test_component_table_covers_the_registry():
    for kind in SLOT:
        assert set(TINY_COMPONENTS[kind]) == set(REG.names(kind)), f"add the new {kind} to TINY_COMPONENTS"


@pytest.mark.parametrize("kind,name", COMPONENT_CASES, ids=[f"{k}-{n}" for k, n in COMPONENT_CASES])
def test_every_trainable_parameter_receives_a_gradient(kind, name):
    if name not in TINY_COMPONENTS[kind]:
        pytest.fail(f"{kind} {name!r} has no TINY_COMPONENTS entry")
    cfg = {"type": name, **TINY_COMPONENTS[kind][name]}
    over: dict[str, Any] = {SLOT[kind]: cfg}
    if (kind, name) == ("decoders", "vitamin"):  # needs one MbConv stage: downsample 8
        over["encoder"] = {"type": "conv", "width": 8, "downsample": 8}
    if kind == "projectors":  # both sides: encoder -> pre -> quantizer -> post -> decoder
        over = {"encoder": {"type": "conv", "width": 8, "downsample": 4, "out_dim": 16},
                "pre_projector": cfg, "post_projector": {**cfg, "out_dim": 16}}
    built = build(tiny([{"type": "pixel"}, {"type": "quantizer"}], **over))
    model = built.model.train()
    total, _, _ = TrainStep(model, built.losses, built.labels)(batch_of(built.train_set), 0)
    total.backward()
    params = trainable(model)
    assert params
    no_grad = [n for n, p in params.items() if p.grad is None]
    assert not no_grad, f"no gradient: {no_grad}"
    assert all(torch.isfinite(p.grad).all() for p in params.values())
    zero = [n for n, p in params.items() if p.grad.abs().sum() == 0]
    assert not zero, f"zero gradient: {zero}"
