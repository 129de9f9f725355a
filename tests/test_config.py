"""Config: overrides, validation errors (one line, dotted path, exit 2), cross-field checks, dry run."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, tiny_experiment
from core.config import apply_overrides, flatten, parse_override, validate
from core.errors import ConfigError
from core.run import main


def test_override_values_are_yaml():
    data = apply_overrides({"train": {"optimizer": {"lr": 1.0}}, "losses": [{"type": "pixel"}]},
                           ["train.optimizer.lr=3e-4", "train.optimizer.betas=[0.5, 0.9]", "losses.0.l1=0", "model.text={width: 64}"])
    assert data["train"]["optimizer"] == {"lr": 3e-4, "betas": [0.5, 0.9]}
    assert data["losses"][0]["l1"] == 0 and data["model"]["text"] == {"width": 64}
    assert parse_override("name=a:b")[1] == "a:b"


def test_valid_config_round_trips():
    exp = validate(tiny_experiment())
    assert exp.model.quantizer.codebook_size == 32
    assert flatten(exp.model_dump(mode="json"))["losses.0.type"] == "pixel"


@pytest.mark.parametrize("overrides, path, words", [
    ({"model.quantizer.type": "nope"}, "model.quantizer.type", "unknown quantizer 'nope'"),
    ({"model.quantizer.codebok_size": 5}, "model.quantizer.codebok_size", "unknown key"),
    ({"train.steps": "many"}, "train.steps", "integer"),
    ({"train.steps": -3}, "train.steps", "greater than 0"),
    ({"model.encoder.out_dim": 12}, "model.encoder.out_dim", "does not equal the quantizer's input width 8"),
    ({"model.encoder.downsample": 3}, "model.encoder", "downsample must be a power of two"),
    ({"losses.1.type": "nope"}, "losses.1.type", "unknown loss 'nope'"),
    ({"train.precision": "fp8"}, "train.precision", "fp32"),
])
def test_config_errors_name_the_path(overrides, path, words):
    data = tiny_experiment(**overrides)
    with pytest.raises(ConfigError) as e:
        validate(data)
    assert e.value.path == path, str(e.value)
    assert words in e.value.message, str(e.value)


def test_projector_width_mismatch():
    data = tiny_experiment()
    data["model"]["pre_projector"] = {"type": "linear", "out_dim": 16}
    with pytest.raises(ConfigError, match=r"model.pre_projector.out_dim: 16 does not equal the quantizer's input width 8"):
        validate(data)


def _write(tmp_path, data, name="exp.yaml"):
    f = tmp_path / name
    f.write_text(yaml.safe_dump(data))
    return str(f)


@pytest.mark.parametrize("args, expect", [
    (["missing.yaml"], "missing.yaml: experiment file not found"),
    (["{exp}", "train.stepz=4"], "train.stepz: unknown key"),
    (["{exp}", "losses.7.weight=1"], "losses.7: no list element 7"),
    (["{exp}", "model.quantizer.code_dim=0"], "model.quantizer.code_dim: input should be greater than 0"),
    (["{exp}", "train"], "train: override must be key=value"),
])
def test_cli_errors_exit_2_with_one_line(in_tmp, capsys, args, expect):
    exp = _write(in_tmp, tiny_experiment())
    code = main([a.format(exp=exp) for a in args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and expect in err, err
    assert not (in_tmp / "runs").exists() and not (in_tmp / "mlflow.db").exists()


def test_truncated_and_binary_yaml(in_tmp, capsys):
    (in_tmp / "t.yaml").write_text("model:\n  encoder: {type: conv, width: [1, 2\n")
    (in_tmp / "b.yaml").write_bytes(b"name: \xff\xfe\n")
    assert main([str(in_tmp / "t.yaml")]) == 2 and "invalid YAML (line" in capsys.readouterr().err
    assert main([str(in_tmp / "b.yaml")]) == 2 and "not UTF-8" in capsys.readouterr().err


def test_subprocess_error_has_no_traceback(in_tmp):
    exp = _write(in_tmp, tiny_experiment())
    p = subprocess.run([sys.executable, "-m", "core.run", exp, "model.quantizer.codebook_size=abc"],
                       capture_output=True, text=True, cwd=in_tmp, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == ["error: model.quantizer.codebook_size: input should be a valid integer, unable to parse string as an integer (got 'abc')"]


def test_dry_run_prints_config_and_counts(in_tmp, capsys):
    exp = _write(in_tmp, tiny_experiment())
    assert main([exp, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "codebook_size: 32" in out and "quantizer:" in out and "total:" in out
    assert "256" in out.split("quantizer:")[-1].splitlines()[0] or "        256" in out  # 32 x 8 codebook
    assert not (in_tmp / "runs").exists()


def test_flags_may_follow_overrides(in_tmp, capsys):
    exp = _write(in_tmp, tiny_experiment())
    assert main([exp, "train.steps=3", "--dry-run"]) == 0
    assert "steps: 3" in capsys.readouterr().out
