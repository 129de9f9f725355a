"""core.rundir: run-directory naming, resume resolution, the completion marker, lookup by path /
run-name prefix / MLflow run id, and loading a trained tokenizer for inference."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_experiment
from core import rundir, trainer
from core.checkpoint import list_checkpoints, save_checkpoint
from core.config import config_hash, to_dict, validate
from core.errors import ConfigError
from core.rundir import (find_run_dir, load_for_inference, read_complete, resolve_checkpoint, resolve_resume, run_dir_for,
                         step_of)
from core.trainer import train
from test_trainer import StopAfter


def _ckpt(run_dir: Path, step: int, mtime: float | None = None) -> Path:
    """A small whole checkpoint (the lookup and resume tests need files, not a model)."""
    ckpt = save_checkpoint(run_dir, step, {"w": torch.full((2,), float(step))}, {}, {}, keep=10)
    if mtime is not None:
        os.utime(ckpt, (mtime, mtime))
    return ckpt


# ---- naming ------------------------------------------------------------------------------------------


def test_run_dir_is_out_dir_name_and_config_hash():
    exp = validate(tiny_experiment(**{"train.out_dir": "somewhere/runs"}))
    d = run_dir_for(exp)
    assert d == Path("somewhere/runs") / f"tiny-{config_hash(exp)}"
    assert re.fullmatch(r"tiny-[0-9a-f]{12}", d.name)
    assert run_dir_for(validate(tiny_experiment(**{"train.out_dir": "somewhere/runs", "train.steps": 99}))) == d
    assert run_dir_for(validate(tiny_experiment(**{"train.out_dir": "somewhere/runs", "model.quantizer.codebook_size": 64}))) != d


def test_step_of_a_checkpoint_directory():
    assert step_of(Path("x/checkpoints/step_00000100")) == 100
    assert step_of(None) is None and step_of(Path("x/not_a_step")) is None


# ---- resume --------------------------------------------------------------------------------------------


def test_resume_auto_takes_the_newest_whole_checkpoint(in_tmp, capsys):
    exp = validate(tiny_experiment(**{"train.steps": 6}))
    d = run_dir_for(exp)
    r = resolve_resume(exp)
    assert (r.run_dir, r.ckpt, r.step, r.finished, r.complete) == (d, None, None, None, False)
    _ckpt(d, 2)
    newest = _ckpt(d, 4)
    r = resolve_resume(exp)
    assert (r.run_dir, r.ckpt, r.step) == (d, newest, 4)
    (newest / "model.safetensors").write_bytes(b"damaged")
    r = resolve_resume(exp)
    assert r.ckpt == d / "checkpoints" / "step_00000002" and r.step == 2
    assert "step_00000004 is damaged" in capsys.readouterr().err


def test_resume_never_starts_a_new_directory(in_tmp):
    exp = validate(tiny_experiment(**{"train.resume": "never"}))
    d = run_dir_for(exp)
    assert resolve_resume(exp).run_dir == d  # nothing there yet: the usual name
    _ckpt(d, 2)
    r = resolve_resume(exp)
    assert r.ckpt is None and r.run_dir.parent == d.parent
    assert re.fullmatch(re.escape(d.name) + r"-\d{8}-\d{6}", r.run_dir.name)


def test_resume_from_an_explicit_checkpoint_or_run_directory(in_tmp):
    elsewhere = in_tmp / "elsewhere-0123"
    old, new = _ckpt(elsewhere, 2), _ckpt(elsewhere, 4)

    def resolve(path):
        return resolve_resume(validate(tiny_experiment(**{"train.resume": str(path)})))

    r = resolve(old)
    assert (r.ckpt, r.step, r.run_dir) == (old, 2, run_dir_for(validate(tiny_experiment())))  # trains on in its own directory
    assert resolve(elsewhere).ckpt == new  # a run directory: its newest checkpoint
    with pytest.raises(ConfigError, match=r"^train.resume: no checkpoint directory at .*missing"):
        resolve(in_tmp / "missing")
    (new / "model.safetensors").write_bytes(b"damaged")
    with pytest.raises(ConfigError, match=r"^train.resume: checkpoint .*step_00000004 is damaged: model.safetensors checksum mismatch"):
        resolve(new)


def test_a_checkpoint_past_the_steps_is_an_error(in_tmp):
    exp = validate(tiny_experiment(**{"train.steps": 3}))
    _ckpt(run_dir_for(exp), 4)
    with pytest.raises(ConfigError, match=r"^train.steps: 3 is below the 4 steps already trained"):
        resolve_resume(exp)


# ---- the completion marker -----------------------------------------------------------------------------


def test_marker_round_trip_and_unreadable_marker(tmp_path):
    assert read_complete(tmp_path) is None
    rundir.write_complete(tmp_path, {"psnr": 20.5}, "abc")
    assert read_complete(tmp_path) == {"metrics": {"psnr": 20.5}, "run_id": "abc"}
    (tmp_path / rundir.COMPLETE).write_text("{not json")
    assert read_complete(tmp_path) is None  # the run finishes again rather than failing
    rundir.clear_complete(tmp_path)
    assert not (tmp_path / rundir.COMPLETE).exists()
    rundir.clear_complete(tmp_path)  # no marker: nothing to do


def test_marker_written_at_the_end_and_dropped_when_a_finished_run_is_continued(in_tmp, monkeypatch):
    over = {"train.schedule": "constant", "train.warmup": 0}
    two, four = validate(tiny_experiment(**over, **{"train.steps": 2})), validate(tiny_experiment(**over, **{"train.steps": 4}))
    first = train(two)
    assert read_complete(first.run_dir) == {"metrics": first.metrics, "run_id": None}
    assert resolve_resume(two).complete and not resolve_resume(two).continued
    r = resolve_resume(four)
    assert not r.complete and r.continued and r.step == 2
    monkeypatch.setattr(trainer, "StopFlag", StopAfter(1))  # Ctrl-C after the continuation's first step
    with pytest.raises(KeyboardInterrupt):
        train(four)
    monkeypatch.undo()
    monkeypatch.chdir(in_tmp)
    assert read_complete(first.run_dir) is None  # unfinished again
    r = resolve_resume(four)
    assert (r.step, r.finished, r.complete) == (3, None, False)
    last = train(four)
    assert last.run_dir == first.run_dir and last.metrics != first.metrics
    assert read_complete(first.run_dir) == {"metrics": last.metrics, "run_id": None}


# ---- lookup --------------------------------------------------------------------------------------------


def test_lookup_by_run_dir_checkpoint_dir_and_run_name_prefix(tmp_path):
    runs = tmp_path / "runs"
    a = runs / "clip_teacher-aaaa00000000"
    b = runs / "clip_teacher-bbbb00000000"
    never = runs / "clip_teacher-aaaa00000000-20260101-120000"  # train.resume=never's directory
    big = runs / "clip_teacher_big-cccc00000000"
    quick = runs / "quickstart-0123abcd4567"
    _ckpt(a, 1, mtime=1000)
    b_ckpt = _ckpt(b, 1, mtime=3000)
    _ckpt(never, 1, mtime=2000)
    _ckpt(big, 1, mtime=4000)  # newest of all, but another experiment
    quick_ckpt = _ckpt(quick, 5)
    (runs / "clip_teacher-empty").mkdir()  # no checkpoint: never chosen
    assert find_run_dir(runs / "clip_teacher") == b  # an experiment name: its newest run
    os.utime(never / "checkpoints" / "step_00000001", (5000, 5000))
    assert find_run_dir(runs / "clip_teacher") == never
    assert find_run_dir(runs / "quickstart-0123") == quick  # a prefix of one run
    assert find_run_dir(runs / "quick") == quick
    assert find_run_dir(a) == a  # a directory is itself
    with pytest.raises(ConfigError, match=r"ambiguous run-name prefix: it matches 4 runs \(clip_teacher-aaaa00000000, "):
        find_run_dir(runs / "clip")
    assert find_run_dir(runs / "nothing") is None and find_run_dir(tmp_path / "no_dir" / "x") is None
    assert resolve_checkpoint(str(runs / "quickstart")) == (quick, quick_ckpt)
    assert resolve_checkpoint(str(b_ckpt)) == (b, b_ckpt)
    assert resolve_checkpoint(str(b)) == (b, b_ckpt)
    with pytest.raises(ConfigError, match="no valid checkpoint in this run directory"):
        resolve_checkpoint(str(runs / "clip_teacher-empty"))
    with pytest.raises(ConfigError, match="not a run directory, a checkpoint directory or an MLflow run id"):
        resolve_checkpoint(str(runs / "nothing"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A tiny 2-step run tracked in its own SQLite store: (result, exp, tracking URI)."""
    d = tmp_path_factory.mktemp("finished")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    exp = validate(tiny_experiment(**{"train.steps": 2, "train.out_dir": str(d / "runs"), "tracking.enabled": True,
                                      "tracking.uri": uri}))
    return train(exp), exp, uri


def test_load_for_inference_from_a_finished_run(finished):
    result, exp, _ = finished
    for where in (result.run_dir, result.run_dir.parent / "tiny", list_checkpoints(result.run_dir)[-1]):
        loaded_exp, model = load_for_inference(str(where))
        assert to_dict(loaded_exp) == to_dict(exp) and not model.training
        trained = {k: v.cpu() for k, v in result.model.state_dict().items()}
        assert model.state_dict().keys() == trained.keys()
        assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    saved = load_file(str(list_checkpoints(result.run_dir)[-1] / "model.safetensors"))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x)["recon"], result.model(x)["recon"], rtol=0, atol=0)
    assert all(torch.equal(saved[f"model.{k}"], v) for k, v in model.state_dict().items())


def test_lookup_by_mlflow_run_id(finished, monkeypatch, tmp_path):
    from mlflow.tracking import MlflowClient

    result, exp, uri = finished
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert result.run_id and re.fullmatch(r"[0-9a-f]{32}", result.run_id)
    run_dir, ckpt = resolve_checkpoint(result.run_id)
    assert run_dir == result.run_dir.resolve() and ckpt == run_dir / "checkpoints" / "step_00000002"
    assert to_dict(load_for_inference(result.run_id)[0]) == to_dict(exp)
    with pytest.raises(ConfigError, match=r"^0{32}: MLflow run not found"):
        resolve_checkpoint("0" * 32)
    client = MlflowClient(tracking_uri=uri)
    untagged = client.create_run(client.get_experiment_by_name("tiny").experiment_id).info.run_id
    client.set_terminated(untagged)
    with pytest.raises(ConfigError, match="this MLflow run has no vtok.run_dir tag"):
        resolve_checkpoint(untagged)


def test_load_for_inference_needs_the_config(finished, tmp_path):
    import shutil

    result, _, _ = finished
    copy = tmp_path / "copy"
    shutil.copytree(result.run_dir, copy)
    (copy / "config.yaml").unlink()
    with pytest.raises(ConfigError, match=r"copy: config.yaml missing from the run directory"):
        load_for_inference(str(copy))
