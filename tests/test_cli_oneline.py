"""Every entry point reports a bad command line as one ``error:`` line with exit status 2."""
from __future__ import annotations

import importlib

import pytest


@pytest.mark.parametrize("module", ["core.run", "core.report", "core.tokenize", "core.bench", "core.convert", "core.generate",
                                    "core.reproduce"])
def test_unknown_option_is_one_line_exit_2(module, capsys):
    argv = {"core.run": ["x.yaml"], "core.report": ["x.yaml"], "core.bench": ["quantizers"],
            "core.tokenize": ["--run", "r", "--out", "o.safetensors"], "core.convert": ["c.pth", "--config", "x.yaml", "--out", "o"],
            "core.generate": ["--run", "r", "--class", "a", "--out", "g.png"], "core.reproduce": ["--dry-run"]}[module]
    assert importlib.import_module(module).main([*argv, "--no-such-flag"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--no-such-flag" in err[0], err
