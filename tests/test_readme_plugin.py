"""The README's plugin package, exactly as printed: built, installed (offline, into a temporary
target), found through its entry point, trained briefly; it must beat the mean-image baseline."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_blocks() -> dict[str, str]:
    """The README's fenced blocks of the plugin section, by their first-line file comment or language."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Writing a plugin"):text.index("## Sweeps")]
    blocks = {}
    for lang, body in re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S):
        first = body.splitlines()[0]
        key = first.lstrip("# ").strip() if first.startswith("#") else lang
        blocks[key] = body
    return blocks


def test_readme_plugin_package_installs_and_trains(tmp_path):
    blocks = readme_blocks()
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "my_quantizer.py").write_text(blocks["my_quantizer.py"])
    (pkg / "pyproject.toml").write_text(blocks["pyproject.toml"])
    site = tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index",
                            "--target", str(site), str(pkg)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert build.returncode == 0, build.stderr[-2000:]
    assert list(site.glob("vtok_myround-*.dist-info"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    listed = subprocess.run([sys.executable, "-m", "core.run", "--list-plugins"], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=300)
    assert re.search(r"myround.*vtok-myround", listed.stdout), listed.stdout[-2000:]
    (cmd,) = [line for line in blocks["bash"].splitlines() if line.startswith("python -m core.run")]
    argv = shlex.split(cmd)[3:]
    argv[0] = str(ROOT / argv[0])
    run = subprocess.run([sys.executable, "-m", "core.run", *argv, "train.steps=100", "train.eval_every=0",
                          "train.progress=false", "tracking.enabled=false", "data.train_size=2048"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    metrics = dict(line.split(": ", 1) for line in run.stdout.splitlines() if re.match(r"^[a-z_0-9]+: [-0-9.]+$", line))
    psnr, baseline = float(metrics["psnr"]), float(metrics["psnr_mean_image"])
    print(f"psnr {psnr:.2f} vs mean image {baseline:.2f}, usage {metrics['usage']}")
    assert psnr > baseline + 1.0, (psnr, baseline)
    assert float(metrics["usage"]) > 50  # no collapse: most of each channel's levels are used


def test_every_hook_has_a_docstring_and_is_documented_in_the_readme():
    """Each hookspec in core/hookspecs.py (one per kind) has a docstring and is named in the README's
    plugin section; a new hook without both fails here."""
    import inspect

    from core import hookspecs

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Writing a plugin"):text.index("## Sweeps")]
    specs = {name: fn for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
             if hasattr(fn, hookspecs.PROJECT + "_spec")}
    assert set(specs) == {f"register_{kind}" for kind in hookspecs.KINDS}
    for name, fn in specs.items():
        assert (fn.__doc__ or "").strip(), f"{name} has no docstring"
        assert f"`{name}`" in section, f"{name} is not documented in the README's plugin section"


def test_readme_loss_example_runs_in_a_trainer_step():
    """The README's loss example, as printed: registered, built into a tiny experiment beside the
    pixel loss, one trainer step; the total is the hand-computed weighted sum of the terms (the
    metric is logged and not in it)."""
    import types

    import torch

    from core.config import validate
    from core.interfaces import Loss
    from core.plugins import _add, build_registry
    from core.trainer import TrainStep, build
    from conftest import tiny_experiment

    mod = types.ModuleType("my_loss")
    exec(compile(readme_blocks()["my_loss.py"], "README.md:my_loss.py", "exec", dont_inherit=True), mod.__dict__)
    reg = build_registry()
    _add(reg, "losses", "myedges", mod.EdgeLoss, "README", Loss)
    cfg = tiny_experiment()
    cfg["losses"] = [{"type": "pixel"}, {"type": "myedges", "vertical": 0.5, "weight": 2.0}]
    built = build(validate(cfg, reg), reg)
    batch = torch.utils.data.default_collate([built.train_set[i] for i in range(4)])
    total, out, logs = TrainStep(built.model, built.losses, built.labels)(batch, 0)
    x, y = out["images"].float(), out["recon"].float()
    dx = (y[..., 1:] - y[..., :-1] - x[..., 1:] + x[..., :-1]).abs().mean()
    dy = (y[..., 1:, :] - y[..., :-1, :] - x[..., 1:, :] + x[..., :-1, :]).abs().mean()
    pixel = 0.2 * (y - x).abs().mean() + (y - x).pow(2).mean()
    assert total.item() == pytest.approx((pixel + 2.0 * (dx + 0.5 * dy)).item(), rel=1e-5)
    assert logs["loss_w/myedges/dy"].item() == pytest.approx(dy.item(), rel=1e-5)
    assert "loss/myedges/sharpness" in logs and "loss_w/myedges/sharpness" not in logs
