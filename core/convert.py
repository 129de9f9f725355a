"""``python -m core.convert``: the released UniTok tokenizer weights as a vtok run directory.

    python -m core.convert unitok_tokenizer.pth --config experiments/full/unitok_vitamin_large.yaml \\
                           --out runs/unitok_official [key=value ...]

(add ``losses=[]`` when the training losses' weight files -- LPIPS, DINO -- are not on this machine:
the run directory's config must validate wherever it is loaded.)

The checkpoint is FoundationVision/UniTok's (``torch.load``-able, read with ``weights_only``): the
``UniTok`` state dict itself, or the training checkpoint holding it under ``trainer.unitok`` (what
its ``inference.py`` loads). ``--config`` is the vtok experiment whose ``model`` has the same layout
(the shipped full-scale config does; ``key=value`` overrides as for ``core.run``). The output is a
run directory -- ``config.yaml`` + ``checkpoints/step_00000000/`` -- that ``core.tokenize``, the
evaluators and distillation teachers (``core.rundir.load_for_inference``) accept. It holds no optimizer state.

Which official tensor goes where:
- core owns this table for what core builds: ``text_encoder.*`` -> ``text.transformer.*`` (open_clip's
  TextTransformer, same names), ``fc_norm`` / ``projection`` -> ``clip_head.norm`` / ``clip_head.proj``,
  ``logit_scale``; and for the multi-codebook quantizer, whose n official ``codebooks.i.codebook.weight``
  (k, d) tensors are the slices of vtok's one ``codebook`` (n, k, d) parameter (the official
  ``vocab_usage`` buffers are usage statistics and are dropped).
- each plugin declares its own internal names: ``unitok_state_names()`` on the encoder
  (``encoder.*``), the projections (``quant_proj.*``, ``post_quant_proj.*``) and the decoder
  (``decoder.*``) maps the official name (relative) to its own, None for an official constant
  tensor vtok does not have (it must be all zeros). Core never imports a plugin: it asks the
  built modules. A component without the method has no UniTok counterpart (e.g. decoder ``hybrid``:
  use ``vitamin``).
The checkpoint must match exactly: the first official key vtok does not expect, the first shape that
differs, the first expected key the checkpoint lacks -> one line ``error: <key>: <what>``, exit 2,
nothing written.
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from core.cli import OneLineParser, report
from core.errors import ConfigError


#: official top-level module -> the Tokenizer attribute holding the vtok component
COMPONENTS = {"encoder": "encoder", "quant_proj": "pre_projector", "post_quant_proj": "post_projector", "decoder": "decoder"}
#: official tensors of core's own parts -> vtok names (prefix rules, applied in order)
CORE_PREFIXES = [("text_encoder.", "text.transformer."), ("fc_norm.", "clip_head.norm."),
                 ("projection.", "clip_head.proj."), ("logit_scale", "logit_scale")]
_CODEBOOK = re.compile(r"quantizer\.codebooks\.(\d+)\.codebook\.weight")
_USAGE = re.compile(r"quantizer\.codebooks\.\d+\.vocab_usage")

#: one planned destination: (vtok key, index along dim 0 or None); None as a whole: drop, must be zero
Target = Optional[tuple[str, Optional[int]]]


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m core.convert", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="the official UniTok checkpoint (.pth)")
    p.add_argument("--config", required=True, help="vtok experiment YAML with the same model layout")
    p.add_argument("--out", required=True, help="run directory to write (must not exist or be empty)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the experiment")
    return p


# ---- the plan: official key -> vtok key -------------------------------------------------------


def plan(model: Any) -> dict[str, Target]:
    """Every official key the model expects -> where it goes (see the module docstring)."""
    out: dict[str, Target] = {}
    for official, attr in COMPONENTS.items():
        module = getattr(model, attr, None)
        if module is None:
            continue
        names = getattr(module, "unitok_state_names", None)
        if names is None:
            kind = getattr(getattr(module, "cfg", None), "type", type(module).__name__)
            raise ConfigError(f"model.{attr}", f"type '{kind}' has no UniTok counterpart (no unitok_state_names)")
        for off, own in names().items():
            out[f"{official}.{off}"] = None if own is None else (f"{attr}.{own}", None)
    codebook = getattr(model.quantizer, "codebook", None)
    if not isinstance(codebook, Tensor) or codebook.dim() != 3:
        raise ConfigError("model.quantizer", f"type '{model.spec.quantizer.type}' is not UniTok's multi-codebook layout (use mcq)")
    for i in range(codebook.shape[0]):
        out[f"quantizer.codebooks.{i}.codebook.weight"] = ("quantizer.codebook", i)
    own_keys = model.state_dict().keys()
    for key in own_keys:
        for vtok_prefix, official_prefix in ((v, o) for o, v in CORE_PREFIXES):
            if key.startswith(vtok_prefix):
                out[official_prefix + key[len(vtok_prefix):]] = (key, None)
    return out


def _shape(sd: dict[str, Tensor], target: tuple[str, Optional[int]]) -> tuple[int, ...]:
    key, index = target
    return tuple(sd[key].shape[1:] if index is not None else sd[key].shape)


def check(official: dict[str, Tensor], model: Any) -> dict[str, Target]:
    """The plan, after checking the checkpoint against it; ConfigError naming the first mismatch."""
    mapping = plan(model)
    own = model.state_dict()
    for key, t in official.items():
        if _USAGE.fullmatch(key):
            continue
        if key not in mapping:
            raise ConfigError(key, "unexpected key: vtok's model has no counterpart (another layout or model size?)")
        target = mapping[key]
        if target is None:
            if torch.is_tensor(t) and t.count_nonzero():
                raise ConfigError(key, "nonzero, but vtok has no such tensor (it expects UniTok's all-zero constant)")
            continue
        if tuple(t.shape) != _shape(own, target):
            raise ConfigError(key, f"shape {tuple(t.shape)} differs from vtok's {target[0]} {_shape(own, target)}")
    for key, target in mapping.items():
        if key not in official and target is not None:
            raise ConfigError(key, "missing from the checkpoint")
    covered = {t[0] for t in mapping.values() if t is not None}
    params = [n for n, _ in model.named_parameters()]
    uncovered = [n for n in params if n not in covered]
    if uncovered:
        raise ConfigError(uncovered[0], "vtok parameter with no counterpart in UniTok's model (another layout in the config?)")
    return mapping


def convert_state(official: dict[str, Tensor], model: Any) -> dict[str, Tensor]:
    """Copy the official tensors into ``model`` (in place: no second copy of a 0.8B-parameter model)
    and return its state dict; raises ConfigError on a mismatch, before anything is copied."""
    mapping = check(official, model)
    sd = model.state_dict()
    with torch.no_grad():
        for key, target in mapping.items():
            if target is None or key not in official:
                continue
            vtok_key, index = target
            dst = sd[vtok_key] if index is None else sd[vtok_key][index]
            dst.copy_(official[key].to(dst.dtype))
    return sd


# ---- files ------------------------------------------------------------------------------------


def load_official(path: str) -> dict[str, Tensor]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(path, "checkpoint not found")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types for a bad file
        raise ConfigError(path, f"not a loadable torch checkpoint ({type(e).__name__})") from None
    if isinstance(ckpt, dict) and isinstance(ckpt.get("trainer"), dict) and "unitok" in ckpt["trainer"]:
        ckpt = ckpt["trainer"]["unitok"]
    if not isinstance(ckpt, dict) or not ckpt or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in ckpt.items()):
        raise ConfigError(path, "not a UniTok state dict (expected tensors by name, or trainer.unitok holding them)")
    return {k.removeprefix("module."): v for k, v in ckpt.items()}


def write_run(out: Path, exp: Any, sd: dict[str, Tensor], source: str) -> Path:
    """config.yaml + checkpoints/step_00000000 in ``out`` (built beside it, then renamed into place)."""
    import yaml

    from core.checkpoint import save_checkpoint
    from core.config import to_dict

    tmp = out.with_name(f".{out.name}.converting")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        (tmp / "config.yaml").write_text(yaml.safe_dump(to_dict(exp), sort_keys=False))
        save_checkpoint(tmp, 0, {f"model.{k}": v for k, v in sd.items()}, {}, {"converted_from": source})
        if out.exists():
            out.rmdir()  # empty (checked before)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_intermixed_args(argv)  # overrides may follow the options
    except SystemExit as e:  # a bad command line: one line printed already (core.cli)
        return int(e.code or 0)
    try:
        from core.config import load_experiment
        from core.model import Tokenizer

        out = Path(args.out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ConfigError(str(out), "exists and is not an empty directory")
        exp = load_experiment(args.config, args.overrides)
        official = load_official(args.checkpoint)
        model = Tokenizer(exp.model, exp.data.image_size)
        sd = convert_state(official, model)
        write_run(out, exp, sd, str(args.checkpoint))
        print(f"{out}: {len(official)} official tensors -> vtok run directory (python -m core.tokenize --run {out} ...)")
        return 0
    except ConfigError as e:
        return report(e)


if __name__ == "__main__":
    sys.exit(main())
