"""The bad-input corpus (tests/bad_inputs/cases.yaml): every case exits 2 with one line naming the
problem, no traceback, no MLflow run, no files left behind. Cases of the ``data`` family only show
during a run: they exit 1 with one line naming the file or the step, and the run is FAILED (none is
left RUNNING).

Families (issue 17 added all but ``config``): config (keys, types, ranges, combinations), files,
values (validate but cannot train), devices, environment, storage (run directories, checkpoints,
tokenize inputs and outputs), command_line (core.run, core.tokenize, core.bench, core.report) and
data. Each case calls the command's ``main`` in this process (fast); a few run in a fresh process
too, and plugins failing to load are a subprocess test here (the rest is tests/test_plugins.py).
"""
from __future__ import annotations

import io
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tarfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml

from conftest import ROOT, tiny_experiment
from core.run import main

HERE = Path(__file__).parent / "bad_inputs"
CASES = yaml.safe_load((HERE / "cases.yaml").read_text())
FAMILIES = {"config", "files", "values", "devices", "environment", "storage", "command_line", "data"}


def test_corpus_is_large_enough():
    assert len(CASES) >= 30
    families = {c.get("family", "config") for c in CASES}
    assert families == FAMILIES, families
    assert all(sum(c.get("family", "config") == f for c in CASES) >= 4 for f in FAMILIES)


# ---- setups: files a case needs, made before the "nothing left behind" snapshot -----------------------

SETUPS: dict[str, Callable[..., dict[str, str]]] = {}


def setup(fn: Callable[..., dict[str, str]]) -> Callable[..., dict[str, str]]:
    SETUPS[fn.__name__] = fn
    return fn


@setup
def unreadable(tmp: Path, monkeypatch, stack, trained) -> dict[str, str]:
    # tests run as root here, where chmod 000 does not stop reading: the OS refusal is simulated
    target = tmp / "exp.yaml"
    shutil.copy(HERE / "_base.yaml", target)
    real = pathlib.Path.read_bytes

    def read_bytes(self):
        if self.resolve() == target.resolve():
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(pathlib.Path, "read_bytes", read_bytes)
    return {}


@setup
def deep_yaml(tmp, monkeypatch, stack, trained):
    lines = [("  " * i) + "a:" for i in range(1000)]
    (tmp / "deep.yaml").write_text("\n".join(lines) + " 1\n")
    return {}


@setup
def deep_flow_yaml(tmp, monkeypatch, stack, trained):
    (tmp / "deep_flow.yaml").write_text("name: x\nmodel: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n")
    return {}


@setup
def a_file(tmp, monkeypatch, stack, trained):
    (tmp / "afile").write_text("a file, not a directory\n")
    return {}


@setup
def a_dir(tmp, monkeypatch, stack, trained):
    (tmp / "adir").mkdir()
    return {}


@setup
def no_cuda(tmp, monkeypatch, stack, trained):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    return {}


@setup
def no_torchrun(tmp, monkeypatch, stack, trained):
    for v in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(v, raising=False)
    return {}


@setup
def closed_port(tmp, monkeypatch, stack, trained):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    return {"closed_port": str(port)}


@setup
def silent_server(tmp, monkeypatch, stack, trained):
    """A port that accepts connections and never answers (a hung or firewalled server)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    stack.callback(s.close)
    return {"silent_port": str(s.getsockname()[1])}


@setup
def trained_run(tmp, monkeypatch, stack, trained):
    return trained


def _image_experiment(tmp: Path, data: dict[str, Any]) -> None:
    exp = tiny_experiment(**{"train.steps": 4, "train.eval_size": 8, "tracking.enabled": True})
    exp["name"] = "data-case"
    exp["data"] = data
    (tmp / "exp.yaml").write_text(yaml.safe_dump(exp))


def _png(seed: int) -> bytes:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(20, 20, 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _image_folder(tmp: Path) -> None:
    for d in ("train/a", "train/b", "val/a"):
        (tmp / "imgs" / d).mkdir(parents=True)
        for i in range(8):
            (tmp / "imgs" / d / f"{i}.png").write_bytes(_png(i))
    _image_experiment(tmp, {"type": "image_folder", "image_size": 16, "root": "imgs"})


@setup
def corrupt_image_folder(tmp, monkeypatch, stack, trained):
    _image_folder(tmp)
    (tmp / "imgs/train/b/3.png").write_bytes(b"not an image at all")
    return {}


@setup
def truncated_image_folder(tmp, monkeypatch, stack, trained):
    _image_folder(tmp)
    p = tmp / "imgs/train/a/5.png"
    p.write_bytes(p.read_bytes()[:200])
    return {}


def _shards(tmp: Path, bad_member: bytes | None) -> None:
    (tmp / "shards").mkdir()
    for s in range(2):
        with tarfile.open(tmp / "shards" / f"{s:03d}.tar", "w") as tar:
            for i in range(8):
                for ext, data in (("png", bad_member if (s, i) == (0, 3) and bad_member else _png(i)), ("txt", b"a shape")):
                    info = tarfile.TarInfo(f"{s * 8 + i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    _image_experiment(tmp, {"type": "webdataset", "image_size": 16, "shards": "shards/{000..001}.tar",
                            "eval_shards": "shards/000.tar", "shuffle_buffer": 0})


@setup
def corrupt_shard_member(tmp, monkeypatch, stack, trained):
    _shards(tmp, b"garbage bytes")
    return {}


@setup
def truncated_shard(tmp, monkeypatch, stack, trained):
    _shards(tmp, None)
    p = tmp / "shards" / "001.tar"
    p.write_bytes(p.read_bytes()[:3000])
    return {}


# ---- a trained run and damaged variants of it (built once per module) -----------------------------------


def _rewrite(ckpt: Path, name: str, tensors: dict[str, torch.Tensor] | None = None, state: Any = None) -> None:
    """Replace a checkpoint file and fix the checksums, so only its content is wrong."""
    import json

    from safetensors.torch import save_file

    from core.checkpoint import STATE, _sha256

    if tensors is not None:
        save_file(tensors, str(ckpt / name))
    old = json.loads((ckpt / STATE).read_text())
    files = {f: _sha256(ckpt / f) for f in old["files"]}
    new = state if state is not None else {**old, "files": files}
    if isinstance(new, dict) and "files" in new:
        new["files"] = files
    (ckpt / STATE).write_text(json.dumps(new))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, str]:
    from safetensors.torch import load_file, save_file

    from core.checkpoint import list_checkpoints
    from core.config import validate
    from core.trainer import train

    d = tmp_path_factory.mktemp("trained")
    run = train(validate(tiny_experiment(**{"train.steps": 2, "train.out_dir": str(d / "runs")}))).run_dir
    other = train(validate(tiny_experiment(**{"train.steps": 2, "train.out_dir": str(d / "other"),
                                              "model.quantizer.codebook_size": 64}))).run_dir
    ckpt = list_checkpoints(run)[-1]

    def variant(name: str) -> Path:
        dst = d / name
        shutil.copytree(run, dst)
        return dst

    wrong_state = variant("wrong_state")
    c = list_checkpoints(wrong_state)[-1]
    _rewrite(c, "model.safetensors", state={"step": 2, "files": {}, "optimizers": [1, 2], "extra": None})
    wrong_rng = variant("wrong_rng")
    c = list_checkpoints(wrong_rng)[-1]
    rng = load_file(str(c / "rng.safetensors"))
    rng["torch"] = rng["torch"][:10].clone()
    _rewrite(c, "rng.safetensors", rng)
    damaged = variant("damaged")
    c = list_checkpoints(damaged)[-1]
    data = bytearray((c / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (c / "model.safetensors").write_bytes(bytes(data))
    garbage = variant("garbage")
    c = list_checkpoints(garbage)[-1]
    _rewrite(c, "model.safetensors", {k: torch.randn(3, 3) for k in load_file(str(c / "model.safetensors"))})
    nan = variant("nan")
    c = list_checkpoints(nan)[-1]
    _rewrite(c, "model.safetensors", {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                                      for k, v in load_file(str(c / "model.safetensors")).items()})
    nonutf8 = variant("nonutf8")
    (nonutf8 / "config.yaml").write_bytes(b"name: caf\xe9\n" + (run / "config.yaml").read_bytes())
    save_file({"indices": torch.rand(2, 16, 1)}, str(d / "float_tokens.safetensors"), metadata={"grid": "4,4"})
    save_file({"indices": torch.zeros(2, 16, 1, dtype=torch.int64)}, str(d / "tokens.safetensors"), metadata={"grid": "4,4"})
    return {"run": str(run), "other_arch_ckpt": str(list_checkpoints(other)[-1]), "wrong_state_ckpt": str(list_checkpoints(wrong_state)[-1]),
            "wrong_rng_ckpt": str(list_checkpoints(wrong_rng)[-1]), "damaged_ckpt": str(list_checkpoints(damaged)[-1]),
            "garbage_run": str(garbage), "nan_run": str(nan), "nonutf8_run": str(nonutf8),
            "float_tokens": str(d / "float_tokens.safetensors"), "tokens": str(d / "tokens.safetensors"), "ckpt": str(ckpt)}


# ---- the corpus ---------------------------------------------------------------------------------------


def _sub(value: str, names: dict[str, str]) -> str:
    for k, v in names.items():
        value = value.replace("{" + k + "}", v)
    return value


def _entry(command: str):
    if command == "run":
        return main
    if command == "tokenize":
        from core.tokenize import main as m
    elif command == "bench":
        from core.bench import main as m
    else:
        from core.report import main as m
    return m


@pytest.fixture(scope="module")
def shared_mlflow(tmp_path_factory) -> str:
    """One SQLite store for the runs that fail during training (its tables are created once)."""
    from mlflow.tracking import MlflowClient

    import logging

    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # as core.run does
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()
    return uri


def _mlflow_runs(uri: str) -> dict[str, str]:
    """run id -> status of every run in the store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    return {r.info.run_id: r.info.status for r in client.search_runs(exps)}


def case_id(c: dict[str, Any]) -> str:
    what = c.get("file") or c.get("command")
    extra = " ".join(c.get("args", c.get("argv", [])))
    env = " ".join(f"{k}={v}" for k, v in c.get("env", {}).items())
    return f"{c.get('family', 'config')}:{what}{'+' + extra if extra else ''}{'+' + env if env else ''}{'+' + c['setup'] if c.get('setup') else ''}"[:150]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bad_input_exits_2_with_one_line(case, in_tmp, capsys, monkeypatch, request):
    names = {"tmp": str(in_tmp), "here": str(HERE)}
    with ExitStack() as stack:
        if case.get("setup"):
            trained = request.getfixturevalue("trained") if case["setup"] == "trained_run" else {}
            names.update(SETUPS[case["setup"]](in_tmp, monkeypatch, stack, trained))
        for k, v in case.get("env", {}).items():
            monkeypatch.setenv(k, _sub(str(v), names))
        if case.get("exit", 2) == 1:  # a run that starts: its MLflow run goes to the shared store
            uri = request.getfixturevalue("shared_mlflow")
            monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
            runs_before = _mlflow_runs(uri)
        before = sorted(p.name for p in in_tmp.iterdir())
        command = case.get("command", "run")
        if command == "run":
            argv = [str(HERE / _sub(case["file"], names)), *(_sub(a, names) for a in case.get("args", []))]
        else:
            argv = [_sub(a, names) for a in case["argv"]]
        code = _entry(command)(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    expected_code = case.get("exit", 2)
    assert code == expected_code, captured.err[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err[-3000:]
    assert _sub(case["expect"], names) in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out
    if expected_code == 2:
        assert sorted(p.name for p in in_tmp.iterdir()) == before  # no runs/, no mlflow.db, nothing
    else:  # a run that failed during training: recorded FAILED, nothing left RUNNING
        statuses = [st for run_id, st in _mlflow_runs(uri).items() if run_id not in runs_before]
        assert statuses == ["FAILED"], statuses


# ---- in a fresh process: what only a real process shows (imports, torch.distributed, a hung server) ----


def _fresh(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    full_env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=cwd, env=full_env, timeout=timeout)


@pytest.mark.parametrize("name", ["alias_bomb.yaml", "missing_teacher_file.yaml", "resume_from_missing_checkpoint.yaml"])
def test_bad_input_in_a_fresh_process(name, tmp_path):
    p = _fresh(["core.run", str(HERE / name)], tmp_path)
    assert p.returncode == 2
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    assert list(tmp_path.iterdir()) == []


def test_environment_in_a_fresh_process(tmp_path):
    """WORLD_SIZE without torchrun (torch.distributed would wait for a rendezvous) and a tracking
    server that accepts but never answers (MLflow would retry for minutes): both fail fast."""
    import time

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    try:
        t = time.perf_counter()
        runs = [_fresh(["core.run", str(HERE / "_base.yaml")], tmp_path, {"WORLD_SIZE": "2"}, timeout=60),
                _fresh(["core.run", str(HERE / "_base.yaml"), f"tracking.uri=http://127.0.0.1:{server.getsockname()[1]}"], tmp_path, timeout=60),
                _fresh(["core.run", str(HERE / "_base.yaml"), "--nope"], tmp_path, timeout=60)]
        elapsed = time.perf_counter() - t
    finally:
        server.close()
    for p, expect in zip(runs, ["error: WORLD_SIZE: set to 2", "does not answer HTTP within 3 s", "error: --nope: unknown option"]):
        assert p.returncode == 2, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and expect in p.stderr, p.stderr
    assert elapsed < 60
    assert list(tmp_path.iterdir()) == []


BROKEN_PLUGINS = {
    "no_type_literal": ("from pydantic import BaseModel\nfrom core.interfaces import Quantizer\n"
                        "class Q(Quantizer):\n    class Config(BaseModel):\n        levels: int = 3\n"
                        "@hookimpl\ndef register_quantizers(register):\n    register('q3', Q)\n"),
    "misspelled_hook": "@hookimpl\ndef register_quantizer(register):\n    pass\n",
    "raising_hook": "@hookimpl\ndef register_losses(register):\n    raise RuntimeError('hook exploded')\n",
}


def test_broken_third_party_plugins_do_not_break_vtok(tmp_path):
    """Three installed plugins (a Config without its type literal, a misspelled hook, a hook that
    raises): each is reported on one warning line; every vtok command still works."""
    site = tmp_path / "site"
    for name, src in BROKEN_PLUGINS.items():
        (site / f"vtok_{name}").mkdir(parents=True)
        (site / f"vtok_{name}" / "__init__.py").write_text("from core.hookspecs import hookimpl\n" + src)
        info = site / f"vtok_{name}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vtok-{name}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[vtok]\n{name} = vtok_{name}\n")
    env = {"PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    work = tmp_path / "work"
    work.mkdir()
    listing = _fresh(["core.run", "--list-plugins"], work, env)
    assert listing.returncode == 0, listing.stderr
    warnings = listing.stderr.strip().splitlines()
    assert len(warnings) == 3 and all(w.startswith("vtok: warning: plugin ") for w in warnings), listing.stderr
    for name in BROKEN_PLUGINS:
        assert f"FAILED {name}:" in listing.stdout
    planned = _fresh(["core.run", str(HERE / "_base.yaml"), "--dry-run"], work, env)
    assert planned.returncode == 0 and "# tokens:" in planned.stdout, planned.stderr
    uses_it = _fresh(["core.run", str(HERE / "_base.yaml"), "model.quantizer={type: q3}"], work, env)
    assert uses_it.returncode == 2 and uses_it.stderr.strip().splitlines()[-1].startswith("error: model.quantizer.type: unknown quantizer 'q3'")
    assert list(work.iterdir()) == []


# ---- dry runs plan on a fresh machine ----------------------------------------------------------------

SHIPPED = sorted((ROOT / "experiments").glob("*.yaml")) + sorted((ROOT / "experiments" / "full").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_dry_run_plans_every_shipped_config_on_a_fresh_machine(path, in_tmp, capsys, monkeypatch):
    """No weights, no teacher runs, no data here: the dry run succeeds and lists what a real run needs."""
    monkeypatch.setenv("TORCH_HOME", str(in_tmp / "empty_torch_home"))  # no LPIPS weights cached
    assert main([str(path), "--dry-run"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "# a real run needs" in out
    raw = yaml.safe_load(path.read_text())
    text = path.read_text()
    if "path: runs/clip_teacher" in text:
        assert "distillation teacher run at runs/clip_teacher" in out and "python -m core.run experiments/clip_teacher.yaml" in out
    if "type: perceptual" in text or "type: lpips" in text:
        assert "LPIPS vgg backbone weights at" in out
    if isinstance(raw.get("data", {}).get("shards"), str):
        assert f"dataset '{raw['data']['type']}' shards at {raw['data']['shards']}" in out
    if raw.get("data", {}).get("root"):
        assert f"dataset '{raw['data']['type']}' directory at {raw['data']['root']}" in out
    assert sorted(p.name for p in in_tmp.iterdir()) == []
