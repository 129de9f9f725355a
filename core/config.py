"""Experiment config: YAML -> dotted ``key=value`` overrides -> one pydantic validation.

Plugin choices (``model.quantizer``, ``losses[i]``, ``data``, ...) are discriminated unions on
``type`` built from the registry at run time. Every error is a :class:`ConfigError` whose path is
the dotted config path, e.g. ``model.quantizer.codebok_size: extra inputs are not permitted``.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from core.errors import ConfigError
from core.interfaces import ComponentConfig, OptimizerConfig, VocabModel
from core.plugins import SINGULAR, Registry, get_registry

MAX_YAML_NODES = 200_000  # a YAML "billion laughs" document expands aliases exponentially
MAX_YAML_BYTES = 4 * 1024 * 1024
MAX_YAML_DEPTH = 100  # no experiment nests deeper; PyYAML recurses per level
MAX_NAME = 200


class Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``3e-4`` as a float (YAML 1.1 wants ``3.0e-4``; people write both)."""


Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _mapping_without_duplicates(loader: Loader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    """A mapping whose keys are unique: a repeated key would otherwise silently win over the first.
    Keys brought in by a merge (``<<: *base``) may be overridden, as YAML intends."""
    seen: dict[str, int] = {}
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{key_node.value}' (first at line {seen[key_node.value] + 1})",
                                                        key_node.start_mark)
            seen[key_node.value] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, lambda loader, node: _mapping_without_duplicates_gen(loader, node))


def _mapping_without_duplicates_gen(loader: Loader, node: yaml.MappingNode) -> Any:
    # SafeLoader builds mappings in two phases (for recursive aliases): do the same
    data: dict[Any, Any] = {}
    yield data
    data.update(_mapping_without_duplicates(loader, node))


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=Loader)  # noqa: S506 - Loader is a SafeLoader subclass


class Strict(VocabModel):
    """Unknown keys are errors; retired names name their replacement (core.interfaces.RETIRED)."""


class TextConfig(Strict):
    """The text tower (open_clip TextTransformer, trained from scratch) and the CLIP image head."""

    width: int = Field(256, gt=0)
    depth: int = Field(4, gt=0, description="transformer blocks (open_clip's layers)")
    heads: int = Field(4, gt=0)
    context_length: int = Field(77, gt=0)
    embed_dim: Optional[int] = Field(None, gt=0, description="joint embedding width (default: width)")
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = math.log(100)


class TrainConfig(Strict):
    steps: int = Field(1000, gt=0, description="optimizer steps; raising it on a finished run continues that run "
                       "(not in the run directory's hash; the schedule's horizon becomes the new total)")
    batch_size: int = Field(32, gt=0, description="global batch (split across ranks)")
    renamed = {"lr": "optimizer.lr", "betas": "optimizer.betas", "eps": "optimizer.eps",
               "weight_decay": "optimizer.weight_decay"}
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    warmup: float = Field(0.01, ge=0, description="warm-up length: a fraction of steps if < 1, else steps")
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    grad_clip: Optional[float] = Field(10.0, gt=0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: str = "auto"
    num_workers: int = Field(0, ge=0)
    log_every: int = Field(10, gt=0)
    eval_every: int = Field(0, ge=0, description="0: only at the end")
    eval_size: int = Field(256, gt=0, description="images in the eval split")
    eval_batch_size: int = Field(64, gt=0)
    ckpt_every: int = Field(0, ge=0, description="0: only at the end (and on Ctrl-C)")
    keep_checkpoints: int = Field(2, gt=0)
    resume: Union[Literal["auto", "never"], str] = "auto"
    on_nonfinite: Literal["skip", "stop"] = "stop"
    out_dir: str = "runs"
    progress: bool = True

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        if v == "auto":
            return v
        import torch

        try:
            torch.device(v)
        except (RuntimeError, ValueError):
            raise ValueError(f"'{v}' is not a torch device: use auto, cpu, cuda, cuda:N or mps") from None
        return v


class TrackingConfig(Strict):
    enabled: bool = True
    uri: Optional[str] = Field(None, description="default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    experiment: Optional[str] = Field(None, description="MLflow experiment (default: the experiment name)")
    flush_every: int = Field(100, gt=0, description="buffered metric rows per batch write")


# --------------------------------------------------------------------------------------------
# YAML and overrides
# --------------------------------------------------------------------------------------------


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Safe-load an experiment file; every problem is one ConfigError naming the file."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(str(path), "is a directory, not an experiment file")
    if not p.is_file():
        raise ConfigError(str(path), "experiment file not found")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(str(path), f"cannot read the file ({e.strerror or type(e).__name__})") from None
    if len(raw) > MAX_YAML_BYTES:
        raise ConfigError(str(path), f"file larger than {MAX_YAML_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(str(path), f"not UTF-8 text (byte {e.start})") from None
    return parse_yaml(text, str(path))


def parse_yaml(text: str, where: str) -> Any:
    try:
        data = yaml_load(text)
    except RecursionError:
        raise ConfigError(where, f"YAML nested more deeply than {MAX_YAML_DEPTH} levels") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        pos = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(where, f"invalid YAML{pos}: {problem}") from None
    if _depth(data) > MAX_YAML_DEPTH:
        raise ConfigError(where, f"YAML nested more deeply than {MAX_YAML_DEPTH} levels")
    if _expanded_size(data, {}) > MAX_YAML_NODES:
        raise ConfigError(where, f"YAML expands to more than {MAX_YAML_NODES} values through aliases: refusing a possible alias bomb")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(where, f"expected a mapping at the top level, got {type(data).__name__}")
    return data


def _depth(node: Any) -> int:
    """Nesting depth of lists and mappings (iterative; stops once past the limit)."""
    stack, deepest, seen = [(node, 1)], 0, set()
    while stack:
        n, d = stack.pop()
        if not isinstance(n, (dict, list)) or id(n) in seen:
            continue
        seen.add(id(n))
        deepest = max(deepest, d)
        if deepest > MAX_YAML_DEPTH:
            break
        stack.extend((c, d + 1) for c in (n.values() if isinstance(n, dict) else n))
    return deepest


def _expanded_size(node: Any, memo: dict[int, int]) -> int:
    """Number of values ``node`` stands for once every alias is expanded; shared (aliased)
    subtrees are counted from a memo, so this is linear in the document's text."""
    if not isinstance(node, (dict, list)):
        return 1
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = MAX_YAML_NODES + 1  # a self-referencing alias counts as infinite
    items = list(node.values()) if isinstance(node, dict) else node
    total = 1
    for child in items:
        total += _expanded_size(child, memo)
        if total > MAX_YAML_NODES:
            break
    memo[id(node)] = total
    return total


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(item, "override must be key=value (dotted key, YAML value)")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(key, "empty component in dotted key")
    try:
        parsed = yaml_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value  # a plain string the YAML parser trips on ("a: b:") is meant literally
    return parts, parsed


def set_dotted(data: dict[str, Any], parts: list[str], value: Any) -> None:
    """Set ``data[a][b][c] = value``; list elements by index. Missing maps are created (pydantic then
    rejects keys that do not exist, naming them)."""
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        path = ".".join(parts[: i + 1])
        if isinstance(node, list):
            node = node[_index(node, part, path)]
        elif isinstance(node, dict):
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        else:
            raise ConfigError(path, f"cannot set a key inside a {type(node).__name__}")
    last = parts[-1]
    if isinstance(node, list):
        node[_index(node, last, ".".join(parts))] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(".".join(parts), f"cannot set a key inside a {type(node).__name__}")


def _index(lst: list, part: str, path: str) -> int:
    if not part.lstrip("-").isdigit() or not -len(lst) <= int(part) < len(lst):
        raise ConfigError(path, f"no list element {part} (the list has {len(lst)})")
    return int(part)


def apply_overrides(data: dict[str, Any], overrides: list[str], reg: Registry | None = None) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for item in overrides:
        parts, value = parse_override(item)
        if parts[-1] == "type" and len(parts) > 1:
            _switch_type(data, parts[:-1], value, reg)
        set_dotted(data, parts, value)
    return data


def _slot_kind(parts: list[str]) -> str | None:
    """The registry kind of a plugin slot path (``model.quantizer`` -> quantizers, ``losses.1`` -> losses)."""
    path = ".".join(parts)
    for slot, kind in SLOTS.items():
        if slot == path or (slot.endswith(".*") and len(parts) == 2 and parts[0] == slot[:-2] and parts[1].lstrip("-").isdigit()):
            return kind
    return None


def _switch_type(data: dict[str, Any], parts: list[str], new_type: Any, reg: Registry | None) -> None:
    """``model.quantizer.type=fsq`` on a vq quantizer: drop the fields fsq does not have (and say so
    in one line), so switching a component's type works as people write it."""
    import sys

    node: Any = data
    for part in parts:
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
            node = node[int(part)]
        else:
            return
    kind = _slot_kind(parts)
    if kind is None or not isinstance(node, dict) or node.get("type") in (None, new_type):
        return
    reg = reg or get_registry()
    comp = reg.components.get(kind, {}).get(new_type) if isinstance(new_type, str) else None
    if comp is None:
        return  # validation names the unknown type
    fields = set(comp.cls.Config.model_fields)
    dropped = [k for k in node if k != "type" and k not in fields]
    for k in dropped:
        del node[k]
    if dropped:
        where = ".".join(parts)
        print(f"vtok: {where}.type={new_type}: dropped {', '.join(dropped)} ('{new_type}' has no such fields)",
              file=sys.stderr)


# --------------------------------------------------------------------------------------------
# The experiment model, built from the registry
# --------------------------------------------------------------------------------------------


def _union(reg: Registry, kind: str) -> Any:
    configs = tuple(reg.components[kind][n].cls.Config for n in reg.names(kind))
    if not configs:
        return ComponentConfig
    if len(configs) == 1:
        return configs[0]
    return Annotated[Union[configs], Field(discriminator="type")]  # type: ignore[valid-type]


def experiment_model(reg: Registry) -> type[BaseModel]:
    from core.sweep.paper import Paper
    from core.sweep.space import SweepConfig

    cfg = ConfigDict(extra="forbid", validate_assignment=True)
    model = create_model(
        "ModelSpec",
        __config__=cfg,
        encoder=(_union(reg, "encoders"), ...),
        pre_projector=(Optional[_union(reg, "projectors")], None),
        quantizer=(_union(reg, "quantizers"), ...),
        post_projector=(Optional[_union(reg, "projectors")], None),
        decoder=(_union(reg, "decoders"), ...),
        text=(Optional[TextConfig], None),
    )
    return create_model(
        "Experiment",
        __config__=cfg,
        # the run directory is <name>-<config hash>[-<timestamp>]: keep it under NAME_MAX (255 bytes)
        name=(str, Field("experiment", min_length=1, max_length=MAX_NAME, pattern=r"^[A-Za-z0-9_.\-]+$")),
        seed=(int, Field(0, ge=0, lt=2**32, description="numpy and the batch order take 32-bit seeds")),
        data=(_union(reg, "datasets"), ...),
        model=(model, ...),
        losses=(list[_union(reg, "losses")], Field(default_factory=list)),  # type: ignore[valid-type]
        train=(TrainConfig, Field(default_factory=TrainConfig)),
        eval=(list[_union(reg, "evaluators")], Field(default_factory=list)),  # type: ignore[valid-type]
        tracking=(TrackingConfig, Field(default_factory=TrackingConfig)),
        sweep=(Optional[SweepConfig], None),
        paper=(Optional[Paper], None),
    )


# plugin slots: dotted path (with "*" for list elements) -> registry kind
SLOTS = {
    "data": "datasets",
    "model.encoder": "encoders",
    "model.pre_projector": "projectors",
    "model.quantizer": "quantizers",
    "model.post_projector": "projectors",
    "model.decoder": "decoders",
    "losses.*": "losses",
    "eval.*": "evaluators",
}


def _check_slot_types(data: dict[str, Any], reg: Registry) -> None:
    """Unknown or missing ``type`` in a plugin slot -> one line listing what is registered."""
    for slot, kind in SLOTS.items():
        is_list = slot.endswith(".*")
        head = slot[:-2] if is_list else slot
        node: Any = data
        for part in head.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if is_list:
            targets = [(f"{head}.{i}", v) for i, v in enumerate(node)] if isinstance(node, list) else []
        else:
            targets = [(head, node)]
        for path, value in targets:
            if value is None or not isinstance(value, dict):
                continue  # pydantic reports missing / wrongly typed slots
            name = value.get("type")
            known = ", ".join(reg.names(kind)) or "none"
            if name is None:
                raise ConfigError(f"{path}.type", f"missing; choose one of: {known}")
            if name not in reg.components[kind]:
                raise ConfigError(f"{path}.type", f"unknown {SINGULAR[kind]} '{name}' (registered: {known})")


def _format_validation_error(e: ValidationError, data: dict[str, Any]) -> ConfigError:
    err = e.errors()[0]
    loc: list[Any] = []
    node: Any = data
    for part in err["loc"]:
        # discriminated unions put the tag into the location: drop it, it is not a key
        if isinstance(node, dict) and part not in node and node.get("type") == part:
            continue
        loc.append(part)
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            node = None
    msg = err["msg"][0].lower() + err["msg"][1:]
    if err["type"] == "renamed":  # a retired field name (core.interfaces.RETIRED)
        loc.append(err["ctx"]["old"])
        msg = f"renamed to {err['ctx']['new']}"
    elif err["type"] == "extra_forbidden":
        msg = "unknown key (extra inputs are not permitted)"
    elif "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], (dict, list)):
        msg += f" (got {err['input']!r})"
    return ConfigError(".".join(str(p) for p in loc) or "<root>", msg)


def validate(data: dict[str, Any], reg: Registry | None = None) -> BaseModel:
    reg = reg or get_registry()
    _check_slot_types(data, reg)
    try:
        exp = experiment_model(reg).model_validate(data)
    except ValidationError as e:
        _study_section_error(e, data)
        raise _format_validation_error(e, data) from None
    check_values(exp, data, reg)
    check_cross_fields(exp, reg)
    from core.sweep.paper import check_study

    check_study(data, exp, reg)  # every sweep cell validates; claims name cells and metrics that exist
    return exp


def _study_section_error(e: ValidationError, data: dict[str, Any]) -> None:
    """An error in the ``sweep`` or ``paper`` section is worded by that section's own parser."""
    head = e.errors()[0]["loc"][:1]
    if head == ("sweep",):
        from core.sweep.space import parse_sweep

        parse_sweep(data.get("sweep"))
    elif head == ("paper",):
        from core.sweep.paper import parse_paper

        parse_paper(data.get("paper"))


_MISSING = object()


def _fields(model: BaseModel, raw: Any, path: str) -> Iterator[tuple[str, Any, Any, Any]]:
    """(dotted path, validated value, the raw input or _MISSING, FieldInfo) of every field, nested."""
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        r = raw.get(name, _MISSING) if isinstance(raw, dict) else _MISSING
        p = f"{path}.{name}" if path else name
        if isinstance(value, BaseModel):
            yield from _fields(value, r, p)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                rr = r[i] if isinstance(r, (list, tuple)) and i < len(r) else _MISSING
                if isinstance(v, BaseModel):
                    yield from _fields(v, rr, f"{p}.{i}")
                else:
                    yield f"{p}.{i}", v, rr, field
        elif not isinstance(value, dict):
            yield p, value, r, field


def check_values(exp: BaseModel, data: dict[str, Any], reg: Registry) -> None:
    """Values that validate but cannot train: a boolean where a number is meant (``steps: true`` is
    not 1), a non-finite float (``lr: .inf``, a NaN weight) unless the field says
    ``json_schema_extra={"nonfinite": True}``, a negative loss weight unless the loss class sets
    ``negative_weight = True`` (a term meant to be maximised)."""
    for path, value, raw, field in _fields(exp, data, ""):
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if isinstance(raw, bool) and isinstance(value, (int, float)) and not isinstance(value, bool):
            raise ConfigError(path, f"expected a number, got the boolean {str(raw).lower()}")
        if isinstance(value, float) and not math.isfinite(value) and not extra.get("nonfinite"):
            raise ConfigError(path, f"must be a finite number (got {value})")
    for i, loss in enumerate(getattr(exp, "losses", [])):
        weight = getattr(loss, "weight", None)
        if isinstance(weight, (int, float)) and weight < 0 and not getattr(reg.get("losses", loss.type), "negative_weight", False):
            raise ConfigError(f"losses.{i}.weight", f"{weight} is negative: a loss weight must be >= 0 ('{loss.type}' does not declare negative weights meaningful)")


def check_cross_fields(exp: Any, reg: Registry) -> None:
    """Checks that span components (each names the path to change)."""
    m = exp.model
    qdim = m.quantizer.latent_dim
    pre_out = getattr(m.pre_projector, "out_dim", None) if m.pre_projector else None
    if pre_out is not None and pre_out != qdim:
        raise ConfigError("model.pre_projector.out_dim", f"{pre_out} does not equal the quantizer's input width {qdim} (model.quantizer)")
    enc_out = getattr(m.encoder, "out_dim", None)
    if m.pre_projector is None and enc_out is not None and enc_out != qdim:
        raise ConfigError("model.encoder.out_dim", f"{enc_out} does not equal the quantizer's input width {qdim}; set it to {qdim} or add a model.pre_projector")
    size = exp.data.image_size
    down = getattr(m.encoder, "downsample", None)
    if isinstance(down, int) and (down <= 0 or size % down):
        raise ConfigError("model.encoder.downsample", f"{down} does not divide data.image_size {size}")
    for kind, items in (("losses", exp.losses), ("eval", exp.eval)):
        for i, item in enumerate(items):
            cls = reg.get("losses" if kind == "losses" else "evaluators", item.type)
            if "text" in getattr(cls, "needs", ()):
                if m.text is None:
                    raise ConfigError(f"{kind}.{i}", f"'{item.type}' needs a text tower: add a model.text section")
                if not exp.data.provides_text:
                    raise ConfigError(f"{kind}.{i}", f"'{item.type}' needs captions but data '{exp.data.type}' provides no text")
    if exp.train.eval_size < exp.train.eval_batch_size:
        exp.train.eval_batch_size = exp.train.eval_size


def load_experiment(path: str | Path, overrides: list[str] | None = None, reg: Registry | None = None) -> BaseModel:
    data = apply_overrides(read_yaml(path), overrides or [])
    return validate(data, reg)


def to_dict(exp: BaseModel) -> dict[str, Any]:
    return exp.model_dump(mode="json")


# keys that do not change what a run computes (excluded from the config hash)
# train.steps is left out so that raising it continues a finished run in the same directory
_VOLATILE = {("train", "resume"), ("train", "progress"), ("train", "out_dir"), ("train", "steps"), ("tracking",), ("sweep",), ("paper",)}


def config_hash(exp: BaseModel) -> str:
    d = to_dict(exp)
    for key in _VOLATILE:
        node = d
        for k in key[:-1]:
            node = node.get(k, {})
        node.pop(key[-1], None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dict/list -> ``{"model.quantizer.codebook_size": 1024, "losses.0.type": "pixel"}``."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(d, list) and d and all(isinstance(v, dict) for v in d):
        for i, v in enumerate(d):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = d
    return out
