"""What a researcher sees: MLflow names, tags and params, pictures, report figures, sweep progress,
overrides that switch types or extend runs (issue 18)."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import ROOT, tiny_experiment
from core.config import apply_overrides, config_hash, validate


# ---- MLflow ---------------------------------------------------------------------------------------


def test_param_values_are_yaml_not_python_reprs():
    from core.tracking import param_value

    assert [param_value(v) for v in (None, False, True, 3, 0.0003, "vq", [0.9, 0.95], (1, 2))] == \
        ["null", "false", "true", "3", "0.0003", "vq", "[0.9, 0.95]", "[1, 2]"]


def test_run_name_says_what_the_overrides_changed():
    from core.tracking import override_label, run_name

    assert run_name("quickstart", ["train.steps=300", "model.quantizer.codebook_size=256", "train.progress=false",
                                   "tracking.uri=x"]) == "quickstart codebook_size=256 steps=300"
    assert run_name("quickstart", []) == "quickstart"
    # the same last component twice: enough of the path to tell them apart
    assert override_label(["model.encoder.width=8", "model.decoder.width=16"]) == "encoder.width=8 decoder.width=16"
    assert len(run_name("x", [f"a.k{i}={'v' * 20}" for i in range(20)])) <= 120


def test_single_run_in_mlflow_named_tagged_with_plain_params_and_counts(in_tmp, capsys):
    from mlflow.tracking import MlflowClient

    from core.run import main
    from core.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, resolve_uri

    code = main([str(ROOT / "experiments" / "quickstart.yaml"), "train.steps=2", "train.eval_size=16", "train.progress=false",
                 "data.train_size=64", "model.quantizer.codebook_size=32"])
    out = capsys.readouterr().out
    assert code == 0
    client = MlflowClient(resolve_uri(None))
    exp = client.get_experiment_by_name("quickstart")
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND  # MLflow 3 opens the runs table, not GenAI pages
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "quickstart codebook_size=32 train_size=64 steps=2 eval_size=16"  # model first; no progress
    assert run.data.tags["vtok.overrides"].split() == ["train.steps=2", "train.eval_size=16", "train.progress=false",
                                                       "data.train_size=64", "model.quantizer.codebook_size=32"]
    p = run.data.params
    assert p["train.progress"] == "false" and p["model.text"] == "null" and p["train.optimizer.betas"] == "[0.9, 0.95]"
    assert not any(v in ("None", "False", "True") for v in p.values())
    assert int(p["n_params.encoder"]) > 0 and int(p["n_params.total"]) >= int(p["n_params.encoder"])
    assert not any(k.startswith("params/") for k in run.data.metrics)
    assert len(run.data.tags["vtok.git_sha"]) == 40 and run.data.tags["vtok.git_dirty"] in ("true", "false")
    assert run.data.tags["mlflow.source.git.commit"] == run.data.tags["vtok.git_sha"]
    hint = next(line for line in out.splitlines() if line.startswith("mlflow run:"))
    assert f"--backend-store-uri sqlite:///{in_tmp / 'mlflow.db'}" in hint
    assert hint.endswith(f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning")
    assert "dead_codes: " in out and "dead_codes: " + str(int(run.data.metrics["dead_codes"])) in out  # a count, not 3.0000


def test_hint_honours_mlflow_tracking_uri(in_tmp, monkeypatch):
    from core.tracking import ui_hint

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    assert ui_hint(None, "7") == (f"mlflow ui --backend-store-uri sqlite:///{in_tmp / 'elsewhere.db'} --host 127.0.0.1 --port 5000, "
                                  "then open http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert ui_hint(None, "3") == "http://tracking.example:5000/#/experiments/3/runs?workflowType=machine_learning"


def test_only_rank_zero_prints_the_run_directory(in_tmp, monkeypatch, capsys):
    """Under torchrun the process group is torn down before printing: the rank must be read before."""
    from core import dist, run

    state = {"rank": 1}
    monkeypatch.setattr(dist, "setup_from_env", lambda: None)
    monkeypatch.setattr(dist, "rank", lambda: state["rank"])
    monkeypatch.setattr(dist, "teardown", lambda: state.update(rank=0))  # after teardown every process is "rank 0"
    exp = validate(tiny_experiment(**{"train.steps": 1}))
    assert run.train_once(exp) == 0
    assert "run directory" not in capsys.readouterr().out


# ---- pictures -------------------------------------------------------------------------------------


def test_recon_grid_is_originals_above_nearest_upscaled_reconstructions():
    from core.figures import recon_grid_tensor, upscale_factor

    x = torch.rand(3, 3, 16, 16) * 2 - 1
    y = torch.rand(3, 3, 16, 16) * 2 - 1
    g = recon_grid_tensor(x, y, min_tile=64, pad=2)
    s = upscale_factor(16, 64)
    assert s == 4 and g.shape == (3, 2 + 2 * (64 + 2), 2 + 3 * (64 + 2))
    tile = lambda row, col: g[:, 2 + row * 66 : 2 + row * 66 + 64, 2 + col * 66 : 2 + col * 66 + 64]
    for i in range(3):
        assert torch.allclose(tile(0, i), (x[i] * 0.5 + 0.5).repeat_interleave(4, 1).repeat_interleave(4, 2))
        assert torch.allclose(tile(1, i), (y[i] * 0.5 + 0.5).repeat_interleave(4, 1).repeat_interleave(4, 2))


def test_figures_logged_at_every_evaluation(in_tmp):
    from mlflow.tracking import MlflowClient
    from PIL import Image

    from core.tracking import resolve_uri
    from core.trainer import train

    exp = validate(tiny_experiment(**{"tracking.enabled": True, "train.steps": 4, "train.eval_every": 2,
                                      "model.quantizer": {"type": "mcq", "codes_per_token": 2, "codebook_size": 8, "code_dim": 4}}))
    result = train(exp)
    client = MlflowClient(resolve_uri(None))
    recon = sorted(a.path for a in client.list_artifacts(result.run_id, "reconstructions"))
    assert recon == ["reconstructions/recon_00000002.png", "reconstructions/recon_00000004.png"]
    codebook = {a.path for a in client.list_artifacts(result.run_id, "codebook")}
    assert codebook == {"codebook/usage_00000002.png", "codebook/usage_00000004.png", "codebook/usage_over_time.png"}
    w, h = Image.open(result.run_dir / "recon_00000004.png").size
    assert w >= 8 * 128 and h >= 2 * 128  # 16 px images shown at 128 px
    for k in (0, 1):
        hist = client.get_metric_history(result.run_id, f"codebook/used_pct_{k}")
        assert [m.step for m in hist] == [2, 4] and all(0 < m.value <= 100 for m in hist)


def test_code_counts_match_a_brute_force_count():
    from core.figures import code_counts, used_pct
    from core.trainer import build, eval_loader

    exp = validate(tiny_experiment(**{"model.quantizer": {"type": "mcq", "codes_per_token": 2, "codebook_size": 8, "code_dim": 4}}))
    built = build(exp)
    loader = eval_loader(built.eval_set, exp.train)
    counts = code_counts(built.model, loader)
    ref = [[0] * 8, [0] * 8]
    with torch.no_grad():
        for batch in loader:
            for row in built.model.encode(batch["image"]).reshape(-1, 2).tolist():
                for k, code in enumerate(row):
                    ref[k][code] += 1
    assert [c.tolist() for c in counts] == ref
    assert used_pct(counts) == [100.0 * sum(v > 0 for v in r) / 8 for r in ref]


# ---- report ---------------------------------------------------------------------------------------


def test_direction_table():
    from core.report_plots import direction

    assert direction("dead_codes") == "lower" and direction("skipped_steps") == "lower"
    assert direction("bits_capacity") is None and direction("fd_refnet") == "lower" and direction("lpips_vgg") == "lower"
    assert direction("psnr") == "higher" and direction("usage_3") == "higher"


def test_report_table_marks_directions_and_defaults_to_a_readable_subset():
    from core.report import parse_paper, render

    every = ["psnr", "ssim", "psnr_mean_image", "usage", "usage_min", "perplexity", "dead_codes", "bits_used", "bits_capacity",
             "fd_refnet", "zero_shot_top1", "zero_shot_top5", "linear_probe_top1", "linear_probe_fit_s"] + \
            [f"usage_{k}" for k in range(6)] + [f"perplexity_{k}" for k in range(6)]
    assert len(every) == 26
    values = {c: {m: [1.0 + i, 2.0 + i] for i, m in enumerate(every)} for c in ("a", "b")}
    md, _ = render("t", parse_paper({}), values, ["a", "b"], [], {"wall_s": 0.0, "busy_s": 0.0, "runs": 4}, objective="zero_shot_top1")
    header = next(line for line in md.splitlines() if line.startswith("| cell"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols[:3] == ["cell", "seeds", "zero_shot_top1 ↑"] and len(cols) <= 2 + 8
    assert "dead_codes ↓" in cols and "fd_refnet ↓" in cols and not any(c.startswith("usage_") for c in cols)
    md2, _ = render("t", parse_paper({"metrics": {"bits_capacity": "higher"}}), values, ["a"], [], {"wall_s": 0.0, "busy_s": 0.0, "runs": 2})
    assert "bits_capacity ↑" in md2  # paper.metrics overrides the table


def test_report_plot_stays_readable_with_many_metrics(tmp_path):
    from PIL import Image

    from core.report_plots import COLS, DPI, PANEL, interval, paper_key, plot

    metrics = [f"m{i}" for i in range(26)]
    values = {c: {m: [float(i), float(i) + 0.5] for i, m in enumerate(metrics)} for c in ("a", "b", "c")}
    png = plot(values, ["a", "b", "c"], metrics, tmp_path / "r.png", "t")
    w, h = Image.open(png).size
    assert w <= COLS * PANEL[0] * DPI + 1 and h <= math.ceil(26 / COLS) * PANEL[1] * DPI + 0.6 * DPI + 1
    # one seed: a point and no interval; two: mean ± t(0.975, 1) * s / sqrt(2)
    assert math.isnan(interval([3.0])[1])
    assert interval([1.0, 3.0]) == pytest.approx((2.0, 12.706 * math.sqrt(2) / math.sqrt(2)))
    assert paper_key("fd_refnet", {"a": {"rFID": 1.5}}) == "rFID" and paper_key("zero_shot_top1", {"a": {"zero-shot": 4}}) == "zero-shot"
    assert paper_key("psnr", {"a": {"rFID": 1.5}}) is None


# ---- sweep progress -------------------------------------------------------------------------------


def test_sweep_progress_lines_and_eta_from_a_fake_clock():
    from core.progress import SweepProgress, fmt_duration

    now = [100.0]
    out = io.StringIO()
    p = SweepProgress(total=5, done=1, objective="psnr", bar=False, stream=out, clock=lambda: now[0])
    assert p.eta() is None
    now[0] = 130.0
    line = p.landed("vq16 seed 0", 17.23456, 29.6)
    assert line == "[2/5] vq16 seed 0: psnr 17.23 in 30s; 3 left, about 1m30s"  # 30 s per run, 3 left
    now[0] = 140.0
    assert p.landed("fsq seed 0", None, 10.0, state="FAIL") == "[3/5] fsq seed 0: fail in 10s; 2 left, about 40s"
    assert out.getvalue().splitlines() == [line, "[3/5] fsq seed 0: fail in 10s; 2 left, about 40s"]
    assert fmt_duration(3725) == "1h02m" and fmt_duration(None) == "?"


def test_sweep_progress_grows_its_total_without_restarting():
    """A seed range adds runs: the same bar, a larger total, the ETA over the runs still left."""
    from core.progress import SweepProgress

    now = [0.0]
    out = io.StringIO()
    p = SweepProgress(total=2, objective="psnr", bar=True, stream=out, clock=lambda: now[0])
    now[0] = 10.0
    p.landed("a seed 0", 1.0)
    now[0] = 20.0
    p.landed("b seed 0", 2.0)
    assert p.eta() == 0.0
    bar = p.bar
    p.grow(4)
    p.write("vtok sweep: claims still open: 2 more runs")
    assert p.bar is bar and (p.total, p.done, bar.total, bar.n) == (4, 2, 4, 2)
    assert p.eta() == pytest.approx(20.0)  # 10 s per run since the start, 2 left
    now[0] = 30.0
    assert p.landed("a seed 1", 3.0) == "[3/4] a seed 1: psnr 3; 1 left, about 10s"
    p.close()
    text = out.getvalue()
    assert "vtok sweep: claims still open: 2 more runs\n" in text and "4/4 runs" not in text and "3/4 runs" in text


def test_study_watcher_reports_each_finished_trial_once():
    import optuna

    from core.progress import StudyWatcher, SweepProgress

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    old = study.ask()
    study.tell(old, 1.0)  # finished before the watcher: not reported again
    out = io.StringIO()
    w = StudyWatcher(study, SweepProgress(3, 1, "psnr", bar=False, stream=out), lambda t: f"cell{t.number}")
    t1, t2 = study.ask(), study.ask()
    study.tell(t1, 15.5)
    assert w.poll() == 1 and w.poll() == 0
    study.tell(t2, state=optuna.trial.TrialState.FAIL)
    assert w.poll() == 1
    lines = out.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == ["[2/3] cell1", "[3/3] cell2"]
    assert "psnr 15.5" in lines[0] and "fail" in lines[1]


# ---- overrides ------------------------------------------------------------------------------------


def test_switching_the_quantizer_type_drops_the_old_fields(capsys):
    from core.config import read_yaml

    raw = apply_overrides(read_yaml(ROOT / "experiments" / "quickstart.yaml"), ["model.quantizer.type=fsq"])
    exp = validate(raw)
    assert exp.model.quantizer.type == "fsq"
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["vtok: model.quantizer.type=fsq: dropped codebook_size, code_dim, kmeans_init, dead_code_threshold "
                   "('fsq' has no such fields)"]
    # a field the new type shares is kept; an unknown type is left for validation to name
    raw2 = apply_overrides({"losses": [{"type": "pixel", "l1": 0.5}]}, ["losses.0.type=nosuchloss"])
    assert raw2["losses"][0] == {"type": "nosuchloss", "l1": 0.5}


def test_steps_are_not_in_the_run_hash():
    a = validate(tiny_experiment(**{"train.steps": 2}))
    b = validate(tiny_experiment(**{"train.steps": 6}))
    assert config_hash(a) == config_hash(b)


def test_raising_steps_continues_a_finished_run(in_tmp, capsys):
    """With a constant schedule, 2 steps then raised to 4 equals 4 steps in one go (batches and RNG
    are functions of the step)."""
    from core.checkpoint import list_checkpoints, load_checkpoint
    from core.trainer import train

    over = {"train.schedule": "constant", "train.warmup": 0, "train.ckpt_every": 0}
    first = train(validate(tiny_experiment(**over, **{"train.steps": 2})))
    longer = train(validate(tiny_experiment(**over, **{"train.steps": 4})))
    assert longer.run_dir == first.run_dir
    assert "resuming" in capsys.readouterr().err
    assert json.loads((longer.run_dir / "final_metrics.json").read_text())["metrics"] == longer.metrics
    continued = load_checkpoint(list_checkpoints(longer.run_dir)[-1])
    straight = train(validate(tiny_experiment(**over, **{"train.steps": 4, "train.out_dir": "other"})))
    ref = load_checkpoint(list_checkpoints(straight.run_dir)[-1])
    assert continued["step"] == ref["step"] == 4
    for k in ref["model"]:
        assert torch.allclose(continued["model"][k], ref["model"][k], atol=1e-6), k
    from core.errors import ConfigError

    with pytest.raises(ConfigError, match="train.steps: 3 is below the 4 steps already trained"):
        train(validate(tiny_experiment(**over, **{"train.steps": 3})))


# ---- a sweep as MLflow and the report show it ------------------------------------------------------


def test_sweep_parent_named_after_study_carries_means_and_report_even_after_plugin_removal(tmp_path, monkeypatch, capsys):
    import yaml
    from mlflow.tracking import MlflowClient

    from core import report
    from core.tracking import resolve_uri
    from sweep_helpers import run_sweep, write_tiny

    monkeypatch.chdir(tmp_path)
    path = write_tiny(tmp_path, **{"train.steps": 2, "sweep.seeds": [0], "sweep.study_name": "codebooks_study",
                                   "sweep.space": {"model.quantizer": {"vq16": {"type": "vq", "codebook_size": 16, "code_dim": 4},
                                                                       "fsq": {"type": "fsq", "levels": [5, 3]}}}})
    assert run_sweep(path) == 0
    err = capsys.readouterr().err
    assert "[1/2] vq16 seed 0: psnr " in err and "[2/2] fsq seed 0: psnr " in err
    client = MlflowClient(resolve_uri(f"sqlite:///{tmp_path / 'mlflow.db'}"))
    runs = client.search_runs([client.get_experiment_by_name("tiny_sweep").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("vtok.sweep") == "parent"]
    children = {r.info.run_name for r in runs if r.data.tags.get("vtok.sweep") == "child"}
    assert parent.info.run_name == "codebooks_study (sweep)" and children == {"vq16 seed 0", "fsq seed 0"}
    psnr = {r.info.run_name.split()[0]: r.data.metrics["psnr"] for r in runs if r.data.tags.get("vtok.sweep") == "child"}
    history = {m.step: m.value for m in client.get_metric_history(parent.info.run_id, "cells/psnr")}
    assert parent.data.tags["vtok.cell_steps"] == "0: vq16, 1: fsq"  # the report's (grid) order
    assert history == pytest.approx({0: psnr["vq16"], 1: psnr["fsq"]})
    assert "psnr" not in parent.data.metrics  # the parent does not pose as a run in the children's charts
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "report")} == {"report/tiny_sweep.md", "report/tiny_sweep.png", "report/tiny_sweep.json"}
    # the quantizer plugins are gone (an unknown type everywhere): the stored study is still reported
    raw = yaml.safe_load(path.read_text())
    raw["model"]["quantizer"]["type"] = "uninstalled"
    for choice in raw["sweep"]["space"]["model.quantizer"].values():
        choice["type"] = "uninstalled"
    path.write_text(yaml.safe_dump(raw))
    assert report.main([str(path), "--out", str(tmp_path / "again"), "--no-mlflow"]) == 0
    md = (tmp_path / "again" / "tiny_sweep.md").read_text()
    assert "| vq16 | 1 |" in md and "| fsq | 1 |" in md


# ---- core.tokenize ---------------------------------------------------------------------------------


def test_tokenize_help_examples_run_and_default_to_the_eval_images(in_tmp, capsys):
    import shlex

    from safetensors import safe_open

    from core import tokenize
    from core.trainer import train

    run_dir = train(validate(tiny_experiment(**{"train.steps": 1, "data.train_size": 64}))).run_dir
    examples = [line.strip() for line in tokenize.EXAMPLES.splitlines() if line.strip().startswith("python -m core.tokenize")]
    assert len(examples) == 4
    for ex in examples:
        argv = [str(run_dir) if a == "RUN" else a for a in shlex.split(ex)[3:]]
        assert tokenize.main(argv) == 0, ex
    err = capsys.readouterr().err
    assert "encoding 16 eval image(s) (--limit 16; --limit all for the whole split)" in err  # train.eval_size, not 64
    with safe_open("tokens.safetensors", framework="pt") as f:  # the last encode: --limit all train_size=1000
        assert f.get_tensor("indices").shape[0] == 1000
    with safe_open("train_tokens.safetensors", framework="pt") as f:
        assert f.get_tensor("indices").shape[0] == 64  # --limit 5000 of a 64-image train split
    assert len(list(Path("images").glob("*.png"))) == 1000
    assert tokenize.main(["--run", str(run_dir), "--out", "x.safetensors", "--limit", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: --limit: a positive number of images or 'all', got '0'"]


def test_help_texts_have_no_rst_markup_and_bench_is_whole():
    import subprocess
    import sys

    for mod in ("core.run", "core.report", "core.tokenize", "core.bench"):
        out = subprocess.run([sys.executable, "-m", mod, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120).stdout
        assert "``" not in out and ":func:" not in out, mod
    bench = subprocess.run([sys.executable, "-m", "core.bench", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120).stdout
    assert "python -m core.bench train" in " ".join(bench.split())


def test_dataset_errors_are_not_doubly_prefixed(in_tmp, capsys):
    from core.run import main

    (in_tmp / "e.yaml").write_text(
        "name: e\ndata: {type: image_folder, root: nowhere, image_size: 16}\n"
        "model: {encoder: {type: conv, width: 8, downsample: 4}, quantizer: {type: vq, codebook_size: 8, code_dim: 8},"
        " decoder: {type: conv, width: 8}}\nlosses: [{type: pixel}]\ntracking: {enabled: false}\n")
    assert main(["e.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data.root: ") and "data.data" not in err


def test_usage_over_time_keeps_the_evaluations_before_a_resume(in_tmp):
    from mlflow.tracking import MlflowClient

    from core.figures import _logged_history
    from core.tracking import resolve_uri
    from core.trainer import train

    over = {"tracking.enabled": True, "train.eval_every": 2}
    train(validate(tiny_experiment(**over, **{"train.steps": 2})))
    result = train(validate(tiny_experiment(**over, **{"train.steps": 4})))  # continued: evaluations at 2 and 4
    client = MlflowClient(resolve_uri(None))
    hist = client.get_metric_history(result.run_id, "codebook/used_pct_0")
    assert sorted(m.step for m in hist) == [2, 4]

    class T:
        pass
    t = T()
    t.client, t.run_id = client, result.run_id
    assert [s for s, _ in _logged_history(t, 1, 4)] == [2]
