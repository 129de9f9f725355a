"""Plugin manager: built-ins from registry.yaml, third-party packages from the ``vtok`` entry points.

Built-in modules are registered exactly like third-party ones. Each plugin's ``register_<kind>``
hook is called on its own so every component knows its provider; a name registered twice is an
error naming both providers. A module that fails to import is reported by name and skipped.
``VTOK_DISABLE_PLUGINS=a,b`` blocks plugins by module name, entry-point name or distribution name.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import pluggy
import yaml

from core import hookspecs
from core.errors import ConfigError

REGISTRY_FILE = Path(__file__).resolve().parent.parent / "registry.yaml"
ENTRY_POINT_GROUP = "vtok"

# kind -> the base class a registered component must subclass (imported lazily to keep the
# module import cheap for --help)
_BASES = {
    "quantizers": "Quantizer",
    "projectors": "Projector",
    "encoders": "Encoder",
    "decoders": "Decoder",
    "losses": "Loss",
    "evaluators": "Evaluator",
    "datasets": "Dataset",
}


SINGULAR = {"quantizers": "quantizer", "projectors": "projector", "encoders": "encoder", "decoders": "decoder",
            "losses": "loss", "evaluators": "evaluator", "datasets": "dataset"}


@dataclass
class Entry:
    kind: str
    name: str
    cls: type
    provider: str  # module or "dist:entry-point"

    @property
    def summary(self) -> str:
        return self.cls.summary()


@dataclass
class Registry:
    components: dict[str, dict[str, Entry]] = field(default_factory=lambda: {k: {} for k in hookspecs.KINDS})
    failed: dict[str, str] = field(default_factory=dict)  # plugin name -> error

    def get(self, kind: str, name: str) -> type:
        try:
            return self.components[kind][name].cls
        except KeyError:
            known = ", ".join(sorted(self.components[kind])) or "none"
            raise ConfigError("", f"unknown {SINGULAR[kind]} '{name}' (registered: {known})") from None

    def names(self, kind: str) -> list[str]:
        return sorted(self.components[kind])


def read_registry_file(path: Path = REGISTRY_FILE) -> dict[str, dict[str, list[str]]]:
    """registry.yaml: ``{module: {kind: [names]}}``."""
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    return {mod: {k: list(v) for k, v in (kinds or {}).items()} for mod, kinds in data.items()}


def _disabled() -> set[str]:
    return {s.strip() for s in os.environ.get("VTOK_DISABLE_PLUGINS", "").split(",") if s.strip()}


def _warn(msg: str) -> None:
    print(f"vtok: warning: {msg}", file=sys.stderr)


def build_registry(registry_file: Path = REGISTRY_FILE, entry_points: bool = True) -> Registry:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    reg = Registry()
    dists: dict[str, str] = {}  # entry-point name -> "module (distribution)"
    disabled = _disabled()
    for name in disabled:
        pm.set_blocked(name)

    for module in read_registry_file(registry_file):
        if module in disabled:
            continue
        try:
            pm.register(importlib.import_module(module), name=module)
        except Exception as e:  # a broken plugin must not take the others down
            reg.failed[module] = f"{type(e).__name__}: {e}"
            _warn(f"plugin {module} failed to load: {reg.failed[module]}")

    # pluggy's load_setuptools_entrypoints stops at the first broken plugin; we load each entry
    # point on its own so one bad package is reported and the rest still work.
    if entry_points:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist else ""
            if {ep.name, dist, ep.value} & disabled or pm.is_registered(ep.name) or pm.is_blocked(ep.name):
                continue
            try:
                pm.register(ep.load(), name=ep.name)
            except Exception as e:
                reg.failed[ep.name] = f"{type(e).__name__}: {e}"
                _warn(f"plugin {ep.name} ({dist}) failed to load: {reg.failed[ep.name]}")
            else:
                dists[ep.name] = f"{ep.value} ({dist})"

    _drop_pending(pm, reg)  # a misspelled register_* hook: that plugin is reported and skipped
    from core import interfaces

    for kind in hookspecs.KINDS:
        hook = getattr(pm.hook, f"register_{kind}")
        base = getattr(interfaces, _BASES[kind])
        for impl in hook.get_hookimpls():
            provider = dists.get(impl.plugin_name, impl.plugin_name)
            if impl.plugin_name in reg.failed:
                continue
            added: list[tuple[str, type]] = []
            try:
                impl.function(register=lambda name, cls: added.append((name, cls)))
                for name, cls in added:
                    _check(kind, name, cls, provider, base)
            except Exception as e:  # a hook that raises, a component without its type literal: skip that plugin
                reg.failed[impl.plugin_name] = f"{type(e).__name__}: {e}"
                _warn(f"plugin {provider} failed to register its {kind}: {reg.failed[impl.plugin_name]}")
                _forget(reg, provider)
                continue
            for name, cls in added:
                _add(reg, kind, name, cls, provider, base)
    return reg


def _drop_pending(pm: pluggy.PluginManager, reg: Registry) -> None:
    """pluggy's ``check_pending`` for each plugin: one whose hook names no hookspec (a typo such as
    ``register_quantizer``) is unregistered, recorded in ``reg.failed`` and warned about by name."""
    for name, plugin in list(pm.list_name_plugin()):
        for hook_name, callers in pm.hook.__dict__.items():
            if hook_name.startswith("_") or callers.spec is not None:
                continue
            if any(impl.plugin is plugin for impl in callers.get_hookimpls()):
                reg.failed[name] = f"unknown hook {hook_name} (hooks: {', '.join('register_' + k for k in hookspecs.KINDS)})"
                _warn(f"plugin {name} skipped: {reg.failed[name]}")
                pm.unregister(plugin)
                break
    pm.check_pending()


def _forget(reg: Registry, provider: str) -> None:
    """Remove what ``provider`` registered for other kinds before one of its hooks failed."""
    for kind in reg.components:
        for name in [n for n, e in reg.components[kind].items() if e.provider == provider]:
            del reg.components[kind][name]


def _check(kind: str, name: str, cls: type, provider: str, base: type) -> None:
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise TypeError(f"{provider} registered {SINGULAR[kind]} '{name}' that is not a {base.__name__}")
    literal = getattr(getattr(cls, "Config", None), "model_fields", {}).get("type")
    if literal is None or getattr(literal.annotation, "__args__", ()) != (name,):
        raise TypeError(f"{provider} registered {SINGULAR[kind]} '{name}' whose Config lacks type: Literal['{name}']")


def _add(reg: Registry, kind: str, name: str, cls: type, provider: str, base: type) -> None:
    _check(kind, name, cls, provider, base)
    if name in reg.components[kind]:
        other = reg.components[kind][name].provider
        raise ConfigError("", f"duplicate {SINGULAR[kind]} '{name}' registered by {other} and by {provider}")
    reg.components[kind][name] = Entry(kind, name, cls, provider)


@lru_cache(maxsize=1)
def get_registry() -> Registry:
    """The process-wide registry (built once)."""
    return build_registry()


def format_plugin_list(reg: Registry) -> str:
    rows = [(SINGULAR[kind], e.name, e.provider, e.summary) for kind in hookspecs.KINDS for e in reg.components[kind].values()]
    widths = [max([len(r[i]) for r in rows] + [len(h)]) for i, h in enumerate(("kind", "name", "provider"))]
    lines = [f"{'kind':<{widths[0]}}  {'name':<{widths[1]}}  {'provider':<{widths[2]}}  summary"]
    lines += [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d}" for a, b, c, d in rows]
    for name, err in reg.failed.items():
        lines.append(f"FAILED {name}: {err}")
    return "\n".join(lines)
