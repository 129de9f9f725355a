"""One vocabulary for config fields (core/interfaces.py glossary): no registered config -- built-in,
nested or third-party -- declares a retired name, and every retired name is rejected with an error
naming its replacement."""
from __future__ import annotations

import importlib
import typing

import pytest
from pydantic import BaseModel, ValidationError

from conftest import tiny_experiment
from core.config import experiment_model, validate
from core.errors import ConfigError
from core.interfaces import RETIRED, VocabModel
from core.plugins import build_registry, get_registry

#: field-name prefixes retired with their groups (now nested configs)
RETIRED_PREFIXES = ("d_", "dino_", "ref_")


def config_models(root: type[BaseModel]) -> list[type[BaseModel]]:
    """Every pydantic model reachable from ``root`` through field annotations (unions, lists,
    Optional, Annotated included), ``root`` first."""
    seen: list[type[BaseModel]] = []

    def visit(tp: typing.Any) -> None:
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if tp in seen:
                return
            seen.append(tp)
            for f in tp.model_fields.values():
                visit(f.annotation)
        for arg in typing.get_args(tp):
            visit(arg)

    visit(root)
    return seen


#: the experiment's own containers (``Experiment``, ``model``): built by core.config, not configs
CONTAINERS = ("Experiment", "ModelSpec")


def offences(cls: type[BaseModel]) -> list[str]:
    """What is wrong with ``cls`` against the vocabulary (empty: nothing)."""
    out = []
    if not issubclass(cls, VocabModel) and cls.__name__ not in CONTAINERS:
        out.append(f"{cls.__name__} is not a core.interfaces.VocabModel (it would not reject retired names)")
    for name in cls.model_fields:
        if name in RETIRED or name.startswith(RETIRED_PREFIXES):
            out.append(f"{cls.__name__}.{name} is a retired name")
    for name in getattr(cls, "renamed", {}):
        if name in cls.model_fields:
            out.append(f"{cls.__name__}.{name} is both a field and retired in its own `renamed`")
    return out


def all_models(reg=None) -> list[type[BaseModel]]:
    return config_models(experiment_model(reg or get_registry()))


def test_the_walk_reaches_every_registered_and_nested_config():
    reg = get_registry()
    models = all_models(reg)
    for kind, entries in reg.components.items():
        for name, entry in entries.items():
            assert entry.cls.Config in models, f"{kind} {name}"
    names = {m.__name__ for m in models}
    assert {"OptimizerConfig", "DiscriminatorOptimizerConfig", "PatchGANConfig", "DinoConfig", "RefNetConfig",
            "TeacherConfig", "TextConfig", "TrainConfig"} <= names


@pytest.mark.parametrize("cls", all_models(), ids=lambda c: c.__name__)
def test_no_config_uses_a_retired_name(cls):
    assert offences(cls) == []


def test_the_check_catches_a_config_using_a_retired_name():
    from typing import Literal

    from core.interfaces import QuantizerConfig

    class Old(QuantizerConfig):
        type: Literal["old"] = "old"
        n_codebooks: int = 2
        d_lr: float = 1.0

    class Plain(BaseModel):
        out: int = 1

    assert offences(Old) == ["Old.n_codebooks is a retired name", "Old.d_lr is a retired name"]
    assert [o.split(" ")[0] for o in offences(Plain)] == ["Plain", "Plain.out"]


def _retired_cases(models):
    return [(cls, old, new) for cls in models if issubclass(cls, VocabModel)
            for old, new in sorted(cls.retired_names().items())]


@pytest.mark.parametrize("cls,old,new", _retired_cases(all_models()),
                         ids=lambda v: v.__name__ if isinstance(v, type) else str(v).split(" ")[0])
def test_every_retired_name_is_rejected_naming_its_replacement(cls, old, new):
    with pytest.raises(ValidationError) as e:
        cls.model_validate({old: 1})
    err = e.value.errors()[0]
    assert err["type"] == "renamed" and err["ctx"] == {"old": old, "new": new}


@pytest.mark.parametrize("override,message", [
    ("model.quantizer={type: mcq, n_codebooks: 2, codebook_size: 8, code_dim: 4}", "model.quantizer.n_codebooks: renamed to codes_per_token"),
    ("model.quantizer={type: rq, depth: 2}", "model.quantizer.depth: renamed to codes_per_token"),
    ("model.quantizer={type: gq, n_groups: 2, group_dim: 4}", "model.quantizer.n_groups: renamed to codes_per_token"),
    ("model.quantizer={type: identity, dim: 8}", "model.quantizer.dim: renamed to code_dim"),
    ("model.quantizer={type: bsq, code_dim: 8, inv_temperature: 2}",
     "model.quantizer.inv_temperature: renamed to entropy_temperature (= 1 / inv_temperature)"),
    ("model.quantizer.commitment=0.5", "model.quantizer.commitment: renamed to commitment_weight"),
    ("model.pre_projector={type: linear, out: 8}", "model.pre_projector.out: renamed to out_dim"),
    ("model.text={width: 32, layers: 1, heads: 2}", "model.text.layers: renamed to depth"),
    ("train.lr=0.1", "train.lr: renamed to optimizer.lr"),
    ("losses.0={type: adversarial, d_lr: 0.1}", "losses.0.d_lr: renamed to optimizer.lr"),
    ("losses.0={type: adversarial, n_layers: 2}", "losses.0.n_layers: renamed to discriminator.depth"),
    ("losses.0={type: adversarial, dino_weights: x.pth}", "losses.0.dino_weights: renamed to discriminator.weights"),
    ("losses.0={type: adversarial, discriminator: {type: dino, weights: x.pth, layers: [1]}}",
     "losses.0.discriminator.layers: renamed to blocks"),
    ("losses.0={type: perceptual, backbone_path: x.pth}", "losses.0.backbone_path: renamed to weights"),
    ("losses.0={type: distill, teacher: {kind: vtok, path: runs/x}}", "losses.0.teacher.path: renamed to weights"),
    ("losses.1={type: quantizer, terms: {commitment: 0.5}}",
     "losses.1.terms: renamed to model.quantizer.<term>_weight (a term's weight lives in the quantizer's config)"),
    ("eval.0={type: fd, inception_weights: x.pth}", "eval.0.inception_weights: renamed to weights"),
    ("eval.0={type: fd, ref_steps: 2}", "eval.0.ref_steps: renamed to reference.steps"),
])
def test_retired_names_in_an_experiment_give_one_line_naming_the_new_name(override, message):
    from core.config import apply_overrides

    data = apply_overrides(tiny_experiment(), [override])
    with pytest.raises(ConfigError) as e:
        validate(data)
    assert str(e.value) == message


def test_third_party_configs_are_checked_too(tmp_path, monkeypatch):
    """A plugin installed through an entry point is walked and its config rejects retired names."""
    from test_plugins import make_site

    monkeypatch.syspath_prepend(str(make_site(tmp_path)))
    importlib.invalidate_caches()
    reg = build_registry()
    cls = reg.get("quantizers", "round3p").Config
    models = all_models(reg)
    assert cls in models and offences(cls) == []
    data = tiny_experiment()
    data["model"]["quantizer"] = {"type": "round3p", "n_codebooks": 2}
    with pytest.raises(ConfigError) as e:
        validate(data, reg)
    assert str(e.value) == "model.quantizer.n_codebooks: renamed to codes_per_token"


def test_bsq_official_operating_point_reads_as_a_temperature():
    """BSQ-ViT's inv_temperature 1 is entropy_temperature 1; an inverse of 4 is a temperature of 1/4
    and gives the same per-bit logits (4 u / (T sqrt d))."""
    import torch

    from plugins.quantizers.bsq import BSQ, BSQConfig

    assert BSQConfig().entropy_temperature == 1.0
    z = torch.randn(1, 5, 4, generator=torch.Generator().manual_seed(0))
    out = BSQ(BSQConfig(code_dim=4, entropy_group_size=2, entropy_temperature=0.25))(z)
    u = torch.nn.functional.normalize(z.reshape(-1, 4), dim=-1)
    p1 = torch.sigmoid(4 * 4.0 * u / 2)  # inv_temperature 4, sqrt(d) = 2
    h_ps = -(p1 * p1.log() + (1 - p1) * (1 - p1).log()).sum(-1).mean()
    assert out.metrics["sample_entropy"].item() == pytest.approx(h_ps.item(), rel=1e-5)
