"""Checking a model against the declared model surface (core.interfaces.TokenizerModel).

- :func:`members`: the names a Protocol (or a contract class such as ``Quantizer``) declares.
- :func:`surface_problems`: what a model lacks or gets wrong: a missing member, a data member of the
  wrong type, a method a call written against the Protocol's signature could not reach.
- :class:`Strict`: the model as a plugin may see it: any undeclared attribute raises
  ``AttributeError``; ``quantizer`` and ``encoder`` are restricted to their own contracts, ``text``
  to nothing (it may only be compared with ``None``), methods return the wrapper instead of the model.
"""
from __future__ import annotations

import inspect
import typing
from typing import Any, Optional

from torch import nn

from core.interfaces import Encoder, Quantizer, TextTokenizerModel, TokenizerModel

_SKIP = {object, typing.Protocol, typing.Generic, nn.Module}


def members(cls: type) -> frozenset[str]:
    """Public names declared in ``cls`` and its bases (annotations and attributes; ``nn.Module`` and
    the typing machinery excluded)."""
    out: set[str] = set()
    for base in cls.__mro__:
        if base in _SKIP or base.__module__ == "typing":
            continue
        out |= {n for n in list(vars(base).get("__annotations__", {})) + list(vars(base)) if not n.startswith("_")}
    return frozenset(out)


def protocol_for(model: Any) -> type:
    """The Protocol ``model`` must satisfy: the text one when it has a text tower."""
    return TextTokenizerModel if getattr(model, "text", None) is not None else TokenizerModel


def _conforms(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        return any(_conforms(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is tuple:
        return isinstance(value, tuple) and len(value) == len(args) and all(_conforms(v, a) for v, a in zip(value, args))
    return isinstance(value, origin or hint)


def call_problems(impl: inspect.Signature, proto: inspect.Signature) -> list[str]:
    """Ways a call written against ``proto`` (self removed) could fail on ``impl``: a parameter it
    cannot pass (by position and by name), an optional one the implementation requires, or an extra
    required parameter of the implementation."""
    want = [p for p in proto.parameters.values() if p.name != "self"]
    have = list(impl.parameters.values())
    var_pos = any(p.kind is p.VAR_POSITIONAL for p in have)
    var_kw = any(p.kind is p.VAR_KEYWORD for p in have)
    positional = [p for p in have if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    by_name = {p.name: p for p in have if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    problems, used = [], set()
    for i, p in enumerate(want):
        if p.kind is p.POSITIONAL_OR_KEYWORD:
            at = positional[i] if i < len(positional) else None
            if at is None and not var_pos:
                problems.append(f"cannot take {p.name!r} as argument {i + 1}")
            elif at is not None and at.name != p.name and not var_kw:
                problems.append(f"argument {i + 1} is {at.name!r}, not {p.name!r}")
            target = at
        else:
            target = by_name.get(p.name)
            if target is None and not var_kw:
                problems.append(f"has no keyword {p.name!r}")
        if target is not None:
            used.add(target.name)
            if p.default is not p.empty and target.default is target.empty:
                problems.append(f"requires {p.name!r}, which is optional in the surface")
    for p in have:
        if p.name not in used and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.default is p.empty:
            problems.append(f"requires {p.name!r}, which the surface does not pass")
    return problems


def surface_problems(model: Any, protocol: Optional[type] = None) -> dict[str, str]:
    """member -> what is wrong with it on ``model`` (empty: ``model`` satisfies the Protocol)."""
    protocol = protocol or protocol_for(model)
    hints = typing.get_type_hints(protocol)
    out: dict[str, str] = {}
    for name in sorted(members(protocol)):
        if not hasattr(model, name):
            out[name] = "missing"
            continue
        value = getattr(model, name)
        if name in hints and not callable(getattr(protocol, name, None)):
            if not _conforms(value, hints[name]):
                out[name] = f"{type(value).__name__} is not {hints[name]}"
            continue
        if not callable(value):
            out[name] = f"{type(value).__name__} is not callable"
            continue
        bad = call_problems(inspect.signature(value), inspect.signature(getattr(protocol, name)))
        if bad:
            out[name] = "; ".join(bad)
    return out


class Strict:
    """``target`` restricted to ``allowed`` names; see the module docstring."""

    def __init__(self, target: Any, allowed: frozenset[str], label: str) -> None:
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_allowed", allowed)
        object.__setattr__(self, "_label", label)

    @classmethod
    def model(cls, model: Any) -> "Strict":
        return cls(model, members(protocol_for(model)), "model")

    def _wrap(self, name: str, value: Any) -> Any:
        if name == "quantizer":
            return Strict(value, members(Quantizer), "model.quantizer")
        if name == "encoder":
            return Strict(value, members(Encoder), "model.encoder")
        if name == "text":
            return None if value is None else Strict(value, frozenset(), "model.text")
        if callable(value) and not isinstance(value, type):
            def method(*args: Any, **kwargs: Any) -> Any:  # a plain function: no module behind it to reach into
                out = value(*args, **kwargs)
                return self if out is self._target else out
            return method
        return value

    def __getattr__(self, name: str) -> Any:
        if name not in self._allowed:
            raise AttributeError(f"{self._label}.{name} is not part of the declared surface")
        return self._wrap(name, getattr(self._target, name))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{self._label}.{name}: plugins do not set attributes of the model")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # a class attribute, for code that checks ``type(model).forward``; the call goes through
        # nn.Module.__call__ of the target (hooks, autocast state) when forward is declared
        if "forward" not in self._allowed:
            raise AttributeError(f"{self._label}.forward is not part of the declared surface")
        out = self._target(*args, **kwargs)
        return self if out is self._target else out
