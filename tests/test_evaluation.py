"""Declared metrics (every registered evaluator), validation and report directions from them, and the
one shared evaluation pass against each evaluator's own pass and hand-written old-style references."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from core.evaluation import EvalOutputs, declared_metrics, direction_of, run_evaluators
from core.interfaces import Evaluator
from core.plugins import get_registry

ROOT = Path(__file__).resolve().parents[1]
DIRECTIONS = {"higher", "lower", None}

# per registered evaluator: (config fields, names that must be declared, names that must not be)
CASES = {
    "psnr_ssim": [({}, {"psnr", "ssim"}, {"psnr_mean_image"}), ({"baseline": True}, {"psnr", "ssim", "psnr_mean_image"}, set())],
    "lpips": [({"net": "alex"}, {"lpips_alex"}, {"lpips_vgg", "lpips"}), ({"net": "vgg"}, {"lpips_vgg"}, {"lpips_alex"})],
    "fd": [({"extractor": "reference"}, {"fd_refnet"}, {"rfid"}), ({"extractor": "inception"}, {"rfid"}, {"fd_refnet"}),
           ({"extractor": "auto"}, {"rfid", "fd_refnet"}, set())],
    "usage": [({}, {"usage", "usage_min", "usage_freq", "perplexity", "dead_codes", "bits_used", "bits_capacity",
                    "usage_0", "usage_freq_7", "perplexity_3"}, {"usage_x_y"}),
              ({"per_codebook_max": 0}, {"usage", "dead_codes"}, {"usage_0", "usage_freq_1"})],
    "zero_shot": [({}, {"zero_shot_top1", "zero_shot_top5"}, {"zero_shot_colour_top1"}),
                  ({"attributes": ["colour"]}, {"zero_shot_top1", "zero_shot_colour_top1", "zero_shot_colour_top5"}, {"zero_shot_shape_top1"})],
    "linear_probe": [({}, {"linear_probe_top1", "linear_probe_fit_top1"}, {"linear_probe"})],
    "generation": [({"extractor": "reference"}, {"gfd_refnet", "gfd_refnet_nocfg", "prior_bits_per_image", "prior_bits_per_token"}, {"gfid"}),
                   ({"extractor": "auto"}, {"gfid", "gfid_nocfg", "gfd_refnet", "gfd_refnet_nocfg"}, set())],
}
EXPECTED_DIRECTIONS = {"psnr": "higher", "ssim": "higher", "lpips_alex": "lower", "fd_refnet": "lower", "rfid": "lower",
                       "dead_codes": "lower", "usage_3": "higher", "bits_capacity": None, "zero_shot_top1": "higher",
                       "linear_probe_top1": "higher", "gfd_refnet": "lower", "prior_bits_per_image": "lower"}


def _cfg(kind, **fields):
    cls = get_registry().get("evaluators", kind)
    # model_construct: the lpips config checks that weight files exist, which is not what is tested here
    return cls, cls.Config.model_construct(**{**cls.Config.model_construct().__dict__, "type": kind, **fields})


def test_the_declaration_table_covers_the_registry():
    assert set(CASES) == set(get_registry().names("evaluators"))


@pytest.mark.parametrize("kind", sorted(get_registry().names("evaluators")))
def test_every_registered_evaluator_declares_its_metrics(kind):
    assert kind in CASES, f"evaluator '{kind}' has no case in CASES"
    for fields, present, absent in CASES[kind]:
        cls, cfg = _cfg(kind, **fields)
        d = cls.declared_metrics(cfg)
        assert d and set(d.values()) <= DIRECTIONS
        assert d == cls.declared_metrics(cfg), "a pure function of the config"
        for name in present:
            found, direction = direction_of(name, d)
            assert found, (kind, fields, name)
            if name in EXPECTED_DIRECTIONS:
                assert direction == EXPECTED_DIRECTIONS[name], name
        for name in absent:
            assert not direction_of(name, d)[0], (kind, fields, name)


def test_skipped_steps_is_the_trainers_and_lower_is_better():
    from types import SimpleNamespace

    d = declared_metrics(SimpleNamespace(eval=[]), get_registry())
    assert d == {"skipped_steps": "lower"}


# ---- validation ---------------------------------------------------------------------------------


def _write(tmp_path, mutate):
    raw = yaml.safe_load((ROOT / "experiments" / "ablate_codebooks.yaml").read_text())
    mutate(raw)
    p = tmp_path / "exp.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


@pytest.mark.parametrize("where,mutate", [
    ("sweep.objective.metric", lambda r: r["sweep"]["objective"].update(metric="zero_shot_top")),
    ("paper.claims.1.metric", lambda r: r["paper"]["claims"][1].update(metric="zeroshot_top1")),
    ("paper.metrics.lpips_vgg", lambda r: r["paper"]["metrics"].update(lpips_vgg="lower")),
])
def test_a_metric_typo_is_one_error_line_and_exit_2_in_seconds(tmp_path, where, mutate):
    path = _write(tmp_path, mutate)
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "core.run", str(path), "--dry-run"], capture_output=True, text=True, cwd=tmp_path,
                       env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    elapsed = time.perf_counter() - t
    assert r.returncode == 2, r.stderr + r.stdout
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"error: {where}:"), r.stderr
    assert "no evaluator" in err[0]
    assert elapsed < 60
    assert not list(tmp_path.glob("runs*")) and not (tmp_path / "mlruns").exists()


def test_the_unchanged_experiment_validates(tmp_path):
    from core.config import read_yaml, validate

    validate(read_yaml(str(_write(tmp_path, lambda r: None))))


# ---- the report's directions -----------------------------------------------------------------


def test_report_directions_come_from_the_declarations():
    from types import SimpleNamespace

    from core.report import metric_direction, with_declared
    from core.report_plots import direction as table
    from core.sweep.paper import Claim, Paper

    reg = get_registry()
    evals = [reg.get("evaluators", t).Config.model_construct(type=t) for t in ("usage", "generation", "psnr_ssim")]
    for e, t in zip(evals, ("usage", "generation", "psnr_ssim")):
        e.__dict__.update({k: v for k, v in reg.get("evaluators", t).Config.model_construct().__dict__.items() if k not in e.__dict__})
    exp = SimpleNamespace(eval=evals)
    paper = with_declared(Paper(), exp)
    # the fallback table does not know these; the declaration decides
    assert table("prior_bits_per_image") == "higher" and metric_direction("prior_bits_per_image", paper) == "lower"
    assert table("gfd_refnet_nocfg") == "higher" and metric_direction("gfd_refnet_nocfg", paper) == "lower"
    assert metric_direction("dead_codes", paper) == "lower" and metric_direction("skipped_steps", paper) == "lower"
    assert metric_direction("bits_capacity", paper) is None and metric_direction("usage_freq_2", paper) == "higher"
    # paper.metrics and a claim still override; a stored view (no evaluators) falls back to the table
    assert metric_direction("psnr", with_declared(Paper(metrics={"psnr": "lower"}), exp)) == "lower"
    assert metric_direction("psnr", paper, Claim(metric="psnr", better="a", than="b", direction="lower")) == "lower"
    stored = with_declared(Paper(), SimpleNamespace(stored=True))
    assert metric_direction("prior_bits_per_image", stored) == "higher"


# ---- one pass ------------------------------------------------------------------------------------

TINY = {
    "name": "tiny", "seed": 0, "data": {"type": "shapes", "image_size": 16},
    "model": {"encoder": {"type": "conv", "width": 8, "downsample": 4, "channel_mult": [1, 1]},
              "pre_projector": {"type": "linear"},
              "quantizer": {"type": "mcq", "codes_per_token": 2, "codebook_size": 16, "code_dim": 4},
              "post_projector": {"type": "linear"},
              "decoder": {"type": "conv", "width": 8, "channel_mult": [1, 1]},
              "text": {"width": 16, "depth": 1, "heads": 2, "context_length": 16}},
    "losses": [{"type": "pixel"}, {"type": "quantizer"}, {"type": "contrastive"}],
    "train": {"steps": 1, "batch_size": 8, "eval_size": 48},
    "eval": [{"type": "psnr_ssim", "baseline": True}, {"type": "fd", "extractor": "reference", "reference": {"steps": 5, "width": 8}},
             {"type": "zero_shot"}, {"type": "linear_probe"}, {"type": "usage"}],
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import os

    from core.config import validate
    from core.trainer import build, eval_loader

    os.environ["VTOK_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    torch.manual_seed(0)
    exp = validate(TINY)
    built = build(exp)
    model = built.model.eval()
    return exp, built, model, eval_loader(built.eval_set, exp.train)


@torch.no_grad()
def _old_style_references(model, loader, probe_cfg, usage_cfg):
    """The metrics as each evaluator computed them before the shared pass, written out here."""
    from plugins.evaluators._common import pooled_discrete_features
    from plugins.evaluators.linear_probe import probe_accuracy
    from plugins.evaluators.psnr_ssim import psnr, ssim
    from plugins.evaluators.usage import code_counts, usage_stats

    p = s = n = 0.0
    totals = [torch.zeros(k, dtype=torch.long) for k in model.quantizer.codebook_sizes]
    feats, labels = [], []
    for batch in loader:
        x = batch["image"]
        y = model(x)["recon"].float().clamp(-1, 1)
        p += psnr((x + 1) / 2, (y + 1) / 2).sum().item()
        s += ssim((x + 1) / 2, (y + 1) / 2).sum().item()
        n += len(x)
        for t, c in zip(totals, code_counts(model.encode(x), list(model.quantizer.codebook_sizes))):
            t += c
        feats.append(pooled_discrete_features(model, x, "post").numpy().astype(np.float64))
        labels.append(np.asarray(batch["label"]))
    out = {"psnr": p / n, "ssim": s / n, **usage_stats(totals, usage_cfg.freq_threshold, usage_cfg.per_codebook_max)}
    out.update(probe_accuracy(np.concatenate(feats), np.concatenate(labels), probe_cfg))
    return out


def test_one_pass_equals_each_evaluators_own_pass_and_the_old_computation(tiny):
    exp, built, model, loader = tiny
    one = run_evaluators(model, built.evaluators, loader)
    own = {}
    for ev in built.evaluators:
        own.update(ev.evaluate(model, loader))
    assert one.keys() == own.keys()
    for k in one:
        assert one[k] == pytest.approx(own[k], rel=1e-6, abs=1e-9), k
    ref = _old_style_references(model, loader, exp.eval[3], exp.eval[4])
    for k, v in ref.items():
        assert one[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
    # zero-shot on the discrete path, as the old evaluator read it (model.image_embed_discrete)
    from plugins.evaluators.zero_shot import class_weights

    ds = built.eval_set
    w = class_weights(model, list(ds.class_names), list(ds.templates))
    hit = seen = 0
    with torch.no_grad():
        for batch in loader:
            logits = 100.0 * model.image_embed_discrete(batch["image"]).float() @ w.T
            hit += int((logits.argmax(1) == torch.as_tensor(batch["label"])).sum())
            seen += len(logits)
    assert one["zero_shot_top1"] == pytest.approx(100.0 * hit / seen)
    # every reported metric is declared
    declared = declared_metrics(exp, get_registry())
    assert all(direction_of(k, declared)[0] for k in one), sorted(one)


def test_one_pass_runs_the_encoder_once_per_batch(tiny):
    exp, built, model, loader = tiny
    calls = []
    h = model.encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        run_evaluators(model, built.evaluators, loader)
        n_batches = len(list(loader))
        one = len(calls)
        calls.clear()
        for ev in built.evaluators:
            ev.evaluate(model, loader)
    finally:
        h.remove()
    assert one == n_batches  # the fd reference network and zero-shot texts do not use the encoder
    assert len(calls) == 5 * n_batches


class OnlyEvaluate(Evaluator):
    """A third-party evaluator written against the older contract: ``evaluate`` only."""

    def evaluate(self, model, loader):
        return {"n_images": float(sum(len(b["image"]) for b in loader))}


class Neither(Evaluator):
    pass


def test_evaluate_only_evaluators_still_work_and_neither_is_an_error(tiny):
    exp, built, model, loader = tiny
    out = run_evaluators(model, [OnlyEvaluate(None), built.evaluators[0]], loader)
    assert out["n_images"] == 48.0 and "psnr" in out
    with pytest.raises(TypeError, match="neither"):
        run_evaluators(model, [Neither(None)], loader)


def test_eval_outputs_are_computed_once_and_lazily(tiny):
    exp, built, model, loader = tiny
    calls = []
    h = model.decoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        out = EvalOutputs(model, next(iter(loader))["image"])
        _ = out["indices"], out["recon"], out["post"], out["image_embed"], out["recon"]
    finally:
        h.remove()
    assert len(calls) == 1
    with torch.no_grad():
        assert torch.equal(out["indices"], model.encode(out["images"]))
        assert torch.allclose(out["image_embed"], model.image_embed_discrete(out["images"]))


def test_report_directions_union_over_the_sweep_cells():
    """A metric only a cell's evaluator declares (the base config lacks it) still gets its direction."""
    from types import SimpleNamespace

    from core.report import metric_direction, with_declared
    from core.sweep.paper import Paper

    reg = get_registry()
    gen = reg.get("evaluators", "generation").Config.model_construct(type="generation")
    gen.__dict__.update({k: v for k, v in reg.get("evaluators", "generation").Config.model_construct().__dict__.items() if k not in gen.__dict__})
    base = SimpleNamespace(eval=[])
    assert metric_direction("prior_bits_per_token", with_declared(Paper(), base)) == "higher"  # the fallback
    assert metric_direction("prior_bits_per_token", with_declared(Paper(), base, [SimpleNamespace(eval=[gen])])) == "lower"
