"""Plugin manager: registry.yaml agreement, failures, blocking, duplicates, third-party entry points."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from core import hookspecs
from core.errors import ConfigError
from core.plugins import build_registry, get_registry, read_registry_file


def test_registry_yaml_agrees_with_registered_components():
    reg = get_registry()
    assert not reg.failed, reg.failed
    declared = {(kind, name, mod) for mod, kinds in read_registry_file().items() for kind, names in kinds.items() for name in names}
    registered = {(kind, e.name, e.provider) for kind in hookspecs.KINDS for e in reg.components[kind].values()
                  if e.provider in read_registry_file()}
    assert declared == registered, f"only in registry.yaml: {declared - registered}; only registered: {registered - declared}"


def test_every_hook_is_exercised_by_a_builtin():
    reg = get_registry()
    for kind in hookspecs.KINDS:
        assert reg.components[kind], f"no built-in registers {kind}"


def _write_registry(tmp_path: Path, extra: dict) -> Path:
    data = read_registry_file()
    data.update(extra)
    f = tmp_path / "registry.yaml"
    f.write_text(yaml.safe_dump(data))
    return f


def test_broken_plugin_is_reported_and_others_still_load(tmp_path, monkeypatch, capsys):
    (tmp_path / "broken_vtok_plugin.py").write_text("raise ImportError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = build_registry(_write_registry(tmp_path, {"broken_vtok_plugin": {"quantizers": ["x"]}}), entry_points=False)
    assert "broken_vtok_plugin" in reg.failed and "boom" in reg.failed["broken_vtok_plugin"]
    assert "vq" in reg.components["quantizers"]
    assert "broken_vtok_plugin failed to load" in capsys.readouterr().err


def test_duplicate_name_names_both_providers(tmp_path, monkeypatch):
    (tmp_path / "dup_vtok_plugin.py").write_text(textwrap.dedent("""
        from core.hookspecs import hookimpl
        from plugins.quantizers.vq import VQ
        @hookimpl
        def register_quantizers(register):
            register("vq", VQ)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as e:
        build_registry(_write_registry(tmp_path, {"dup_vtok_plugin": {"quantizers": ["vq"]}}), entry_points=False)
    assert "plugins.quantizers.vq" in str(e.value) and "dup_vtok_plugin" in str(e.value)


def test_misspelled_hook_is_reported_and_only_that_plugin_skipped(tmp_path, monkeypatch, capsys):
    (tmp_path / "typo_vtok_plugin.py").write_text(textwrap.dedent("""
        from core.hookspecs import hookimpl
        @hookimpl
        def register_quantizer(register):
            pass
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = build_registry(_write_registry(tmp_path, {"typo_vtok_plugin": {}}), entry_points=False)
    assert "unknown hook register_quantizer" in reg.failed["typo_vtok_plugin"]
    assert "vq" in reg.components["quantizers"]  # the other plugins still work
    assert "plugin typo_vtok_plugin skipped: unknown hook register_quantizer" in capsys.readouterr().err


@pytest.mark.parametrize("body, expect", [
    ("raise RuntimeError('hook exploded')", "RuntimeError: hook exploded"),
    ("from pydantic import BaseModel\n    from core.interfaces import Quantizer\n"
     "    class Q(Quantizer):\n        class Config(BaseModel):\n            levels: int = 3\n    register('q3', Q)",
     "whose Config lacks type: Literal['q3']"),
])
def test_a_plugin_whose_hook_fails_is_skipped_alone(tmp_path, monkeypatch, capsys, body, expect):
    module = f"bad_hook_{abs(hash(body))}_vtok_plugin"  # a fresh module per case (sys.modules caches)
    (tmp_path / f"{module}.py").write_text(
        "from core.hookspecs import hookimpl\n@hookimpl\ndef register_quantizers(register):\n    " + body + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = build_registry(_write_registry(tmp_path, {module: {"quantizers": ["q3"]}}), entry_points=False)
    assert expect in reg.failed[module]
    assert "q3" not in reg.components["quantizers"] and "vq" in reg.components["quantizers"]
    assert module in capsys.readouterr().err


def test_disable_plugins_blocks_a_module(monkeypatch):
    monkeypatch.setenv("VTOK_DISABLE_PLUGINS", "plugins.losses.pixel")
    reg = build_registry(entry_points=False)
    assert "pixel" not in reg.components["losses"]
    assert "quantizer" in reg.components["losses"]


# ---- a third-party package, discovered through its entry point -----------------------------------

PLUGIN_SRC = '''
"""A third-party quantizer: scalar rounding to a few levels (no core edits needed)."""
from typing import Literal
import torch
from core.hookspecs import hookimpl
from core.interfaces import Quantizer, QuantizerConfig, QuantizerOutput


class RoundConfig(QuantizerConfig):
    type: Literal["round3p"] = "round3p"
    code_dim: int = 8

    @property
    def latent_dim(self):
        return self.code_dim


class Round(Quantizer):
    """Rounds tanh(z) to {-1, 0, 1} per channel (third-party example)."""
    Config = RoundConfig

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.codes_per_token = cfg.code_dim
        self.codebook_sizes = [3] * cfg.code_dim
        self.bits_per_token = cfg.code_dim * 1.585

    def quantize(self, z):
        t = torch.tanh(z)
        q = t + (torch.round(t) - t).detach()
        return QuantizerOutput(q, (torch.round(t) + 1).long(), {}, {})

    def indices_to_codes(self, indices):
        return indices.float() - 1


@hookimpl
def register_quantizers(register):
    register("round3p", Round)
'''


def make_site(tmp_path: Path) -> Path:
    """A directory importlib.metadata treats like site-packages: the package and its dist-info
    with an entry point in group 'vtok' (exactly what pip install would write)."""
    site = tmp_path / "site"
    (site / "vtok_round3p").mkdir(parents=True)
    (site / "vtok_round3p" / "__init__.py").write_text(PLUGIN_SRC)
    info = site / "vtok_round3p-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vtok-round3p\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[vtok]\nround3p = vtok_round3p\n")
    return site


def test_third_party_plugin_trains_without_core_edits(tmp_path):
    site = make_site(tmp_path)
    exp = tmp_path / "exp.yaml"
    from conftest import tiny_experiment

    cfg = tiny_experiment()
    cfg["model"]["quantizer"] = {"type": "round3p", "code_dim": 8}
    cfg["losses"] = [{"type": "pixel"}]
    exp.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    env.pop("MLFLOW_TRACKING_URI", None)
    listing = subprocess.run([sys.executable, "-m", "core.run", "--list-plugins"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    line = next(l for l in listing.stdout.splitlines() if " round3p " in l)
    assert line.split()[0] == "quantizer" and "vtok_round3p" in line and "vtok-round3p" in line and "third-party example" in line
    run = subprocess.run([sys.executable, "-m", "core.run", str(exp), "train.steps=3"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "psnr:" in run.stdout
