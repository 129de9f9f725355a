"""``paper.also_on``: a paper experiment's claims judged on more datasets by ``python -m core.reproduce``
(variants ``<name>_<dataset type>``: discovery, --only, running, results, the page, bad entries)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from core import reproduce as rp
from core.config import apply_overrides, config_hash, read_yaml, validate

ROOT = Path(__file__).resolve().parents[1]
FASHION = {"type": "fashion_mnist", "image_size": 32}
SHIPPED = ("ablate_codebooks", "supervision", "mcq_vs_rq")

try:
    from test_reproduce import ARGS, TINY, sample_record
except ImportError:  # run from another directory
    from tests.test_reproduce import ARGS, TINY, sample_record


# ------------------------------------------------------------------------------------------------
# discovery and --only
# ------------------------------------------------------------------------------------------------


def test_shipped_files_expand_into_fashion_mnist_variants_with_their_overrides():
    from core.sweep import study as st

    exps = rp.discover(ROOT / "experiments")
    order = list(exps)
    for name in SHIPPED:
        base, v = exps[name], exps[f"{name}_fashion_mnist"]
        assert base.base is None and base.overrides == [] and base.family == name
        assert v.base == name and v.family == name and v.paper and v.path == base.path
        assert v.overrides == [f"name={name}_fashion_mnist", "data={type: fashion_mnist, image_size: 32}", "paper.also_on=[]"]
        assert order.index(v.name) == order.index(name) + 1  # right after its base
        assert v.raw == apply_overrides(read_yaml(base.path), v.overrides)
        assert v.raw["data"] == FASHION and v.raw["name"] == v.name and v.raw["paper"]["also_on"] == []
        assert v.raw["paper"]["claims"] == base.raw["paper"]["claims"] and v.raw["sweep"] == base.raw["sweep"]
        # the whole data mapping is replaced (no shapes field survives) and the variant is its own study
        b_exp, v_exp = validate(base.raw), validate(v.raw)
        assert v_exp.data.type == "fashion_mnist" and v_exp.data.image_size == 32
        assert set(type(v_exp.data).model_fields) == {"type", "image_size", "root"}
        assert st.study_name(v_exp, v_exp.sweep) != st.study_name(b_exp, b_exp.sweep)
        assert st.study_name(v_exp, v_exp.sweep).startswith(f"{name}_fashion_mnist-")
        differ = {k for k in st.identity(b_exp).keys() | st.identity(v_exp).keys()
                  if st.identity(b_exp).get(k) != st.identity(v_exp).get(k)}
        assert differ and all(k == "name" or k.startswith("data.") for k in differ), differ
        # adding also_on to a file keeps its own study and run directories (the paper section is no part of them)
        without = json.loads(json.dumps(base.raw))
        del without["paper"]["also_on"]
        w_exp = validate(without)
        assert st.study_name(w_exp, w_exp.sweep) == st.study_name(b_exp, b_exp.sweep)
        assert config_hash(w_exp) == config_hash(b_exp)
    assert sum(e.base is not None for e in exps.values()) == len(SHIPPED)


def _write(d: Path, stem: str, cfg: dict) -> None:
    d.mkdir(exist_ok=True)
    (d / f"{stem}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


SWEEP = {"space": {"a": [1, 2]}, "objective": {"metric": "psnr"}}
DEMO_PAPER = {"source": "UniTok Table 8: demo", "also_on": [FASHION],
              "claims": [{"text": "a beats b", "better": "a", "than": "b", "metric": "psnr"},
                         {"text": "b beats a", "better": "b", "than": "a", "metric": "psnr"}]}


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """``demo`` (file demo.yaml, on shapes and Fashion-MNIST) and ``other`` (file other_file.yaml, a name of its own)."""
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "experiments"
    _write(d, "demo", {"name": "demo", "data": {"type": "shapes", "image_size": 32}, "sweep": SWEEP, "paper": DEMO_PAPER})
    _write(d, "other_file", {"name": "other", "sweep": SWEEP, "paper": {"source": "UniTok Table 9", "also_on": [FASHION]}})
    return rp.discover(d)


def names(plan):
    return [e.name for e, _ in plan]


def test_only_runs_exactly_the_named_experiments(toy):
    assert list(toy) == ["demo", "demo_fashion_mnist", "other", "other_fashion_mnist"]
    assert names(rp.resolve(None, toy)) == ["demo", "demo_fashion_mnist", "other", "other_fashion_mnist"]
    assert names(rp.resolve(["demo"], toy)) == ["demo"]  # the base alone
    assert names(rp.resolve(["demo_fashion_mnist"], toy)) == ["demo_fashion_mnist"]
    assert names(rp.resolve(["demo_fashion_mnist", "demo"], toy)) == ["demo", "demo_fashion_mnist"]
    assert names(rp.resolve(["other_file"], toy)) == ["other"]  # a file stem is its base experiment, not a variant


def test_dry_run_lists_the_variant_with_its_dataset(toy, capsys):
    assert rp.main(["--experiments-dir", "experiments", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "vtok reproduce: 4 experiment(s), no budget"
    assert out[1].startswith("1. demo (experiments/demo.yaml): grid 2 cells")
    assert out[2].startswith("2. demo_fashion_mnist (experiments/demo.yaml on fashion_mnist 32 px): grid 2 cells")
    assert out[2].endswith("; paper experiment; results results/demo_fashion_mnist.json")


def test_run_and_collect_use_the_variant_overrides(toy, tmp_path, monkeypatch):
    """run_plan hands the command's overrides (a budget) to run_experiment and collect, which put
    the experiment's own first: core.run gets the file, the variant's overrides, then the budget."""
    from core import run

    argvs = []
    monkeypatch.setattr(run, "main", lambda argv: argvs.append(argv) or 0)
    seen = []

    def collector(e, overrides):
        seen.append((e.name, overrides))
        return None

    v = toy["demo_fashion_mnist"]
    v.raw["sweep"]["seeds"] = {"min": 3, "max": 10}
    plan = rp.resolve(["demo", "demo_fashion_mnist"], toy)
    assert rp.run_plan(plan, tmp_path / "results", 30, rp.run_experiment, collector, lambda: 0.0) == 0
    budget = "sweep.seeds.budget_minutes=30.00"
    assert argvs == [[str(toy["demo"].path)], [str(v.path), *v.overrides, budget]]
    assert seen == [("demo", []), ("demo_fashion_mnist", [budget])]
    assert v.overrides == ["name=demo_fashion_mnist", "data={type: fashion_mnist, image_size: 32}", "paper.also_on=[]"]


# ------------------------------------------------------------------------------------------------
# the page
# ------------------------------------------------------------------------------------------------


def claim(index, text, verdict, mean, lo, hi):
    return {"index": index, "text": text, "kind": "better", "metric": "psnr", "cells": ["a", "b"] if index == 0 else ["b", "a"],
            "verdict": verdict, "test": "paired t", "n": 3, "mean_diff": mean, "ci": [lo, hi], "ci_level": 0.95, "p": 0.01}


def write_pair(results: Path, base_claims, variant_claims) -> None:
    rp.write_results(sample_record(experiment="demo", claims=base_claims), results)
    rp.write_results(sample_record(experiment="demo_fashion_mnist", study="demo_fashion_mnist-89abcdef",
                                   dataset=FASHION, claims=variant_claims), results)


def table_rows(page: str) -> list[str]:
    table = page.split("## Every claim")[1].split("\n## ")[0].split("\n### ")[0]
    return [r for r in table.splitlines() if r.startswith("| ") and not r.startswith("| paper |")]


def test_page_has_a_row_per_claim_and_dataset_and_lists_disagreements(toy, tmp_path):
    write_pair(tmp_path / "results",
               [claim(0, "a beats b", "holds", 1.5, 0.5, 2.5), claim(1, "b beats a", "inconclusive", 0.2, -1, 1.4)],
               [claim(0, "a beats b", "does not hold", -0.75, -1.25, -0.25), claim(1, "b beats a", "holds", 0.5, 0.1, 0.9)])
    page = rp.page_text(tmp_path / "experiments", tmp_path / "results")
    rows = table_rows(page)
    cells = [[x.strip() for x in r.strip("|").split("|")] for r in rows]
    # claim 0 on both datasets, then claim 1 on both; other's variant (no claims) adds no row
    assert [(c[2], c[6], c[7], c[8]) for c in cells] == [
        ("a beats b", "**holds**", "shapes 32 px", "[demo](#demo)"),
        ("a beats b", "**does not hold**", "fashion_mnist 32 px", "[demo_fashion_mnist](#demo_fashion_mnist)"),
        ("b beats a", "**inconclusive**", "shapes 32 px", "[demo](#demo)"),
        ("b beats a", "**holds**", "fashion_mnist 32 px", "[demo_fashion_mnist](#demo_fashion_mnist)")]
    assert cells[1][5] == "-0.75 [-1.25, -0.25]"
    assert "2 of 4 paper experiments (2 of them on another dataset: `paper.also_on`) have results; 4 claims: 3 decided" in page
    part = page.split("### Datasets disagree\n\n")[1].split("\n## ")[0]
    assert part.startswith("Claims judged on more than one dataset (`paper.also_on`): 2. Holding on one dataset and "
                           "not holding on another")
    lines = [x for x in part.splitlines() if x.startswith("- ")]
    assert lines == ["- UniTok Table 8: a beats b (psnr): **holds** on shapes 32 px (+1.5 [0.5, 2.5], [demo](#demo)); "
                     "**does not hold** on fashion_mnist 32 px (-0.75 [-1.25, -0.25], "
                     "[demo_fashion_mnist](#demo_fashion_mnist))"]  # claim 1: holds and inconclusive is no disagreement
    # each variant has its own section saying whose claims it judges and how it runs
    sec = page.split("\n## demo_fashion_mnist\n")[1].split("\n## ")[0]
    assert ("The claims of [demo](#demo) judged on fashion_mnist 32 px (its `paper.also_on`; everything else, the note "
            "above included, is the base's): `python -m core.run experiments/demo.yaml name=demo_fashion_mnist "
            "'data={type: fashion_mnist, image_size: 32}' 'paper.also_on=[]'`.") in sec
    assert "Data: fashion_mnist 32 px, 300 steps" in sec
    other = page.split("\n## other_fashion_mnist\n")[1]
    assert "**Not run.** Planned: grid 2 cells, fashion_mnist 32 px. Run it with " \
           "`python -m core.reproduce --only other_fashion_mnist`." in other


def test_page_says_when_the_datasets_agree(toy, tmp_path):
    write_pair(tmp_path / "results",
               [claim(0, "a beats b", "holds", 1.5, 0.5, 2.5), claim(1, "b beats a", "does not hold", -1.5, -2.5, -0.5)],
               [claim(0, "a beats b", "holds", 0.75, 0.25, 1.25), claim(1, "b beats a", "inconclusive", 0.5, -0.1, 0.9)])
    page = rp.page_text(tmp_path / "experiments", tmp_path / "results")
    part = page.split("### Datasets disagree\n\n")[1].split("\n## ")[0]
    assert part.strip() == ("Claims judged on more than one dataset (`paper.also_on`): 2. Holding on one dataset and not "
                            "holding on another: none (decided on two or more datasets and agreeing: 1; not yet decided "
                            "on two: 1).")
    assert len(table_rows(page)) == 4


def test_no_variant_no_disagreement_section(tmp_path):
    d = tmp_path / "experiments"
    _write(d, "solo", {"name": "solo", "sweep": SWEEP, "paper": {"source": "UniTok Table 8", "claims": DEMO_PAPER["claims"]}})
    page = rp.page_text(d, tmp_path / "results")
    assert "Datasets disagree" not in page and "paper.also_on" not in page
    assert "0 of 1 paper experiments have results" in page


# ------------------------------------------------------------------------------------------------
# end to end: a tiny experiment's Fashion-MNIST variant
# ------------------------------------------------------------------------------------------------


def test_tiny_variant_on_fashion_mnist_end_to_end(tmp_path, monkeypatch, capsys):
    from core import rundir
    from core.sweep import results, study as st

    monkeypatch.chdir(tmp_path)
    cfg = json.loads(json.dumps(TINY))
    cfg["tracking"] = {"enabled": False}
    cfg["train"]["out_dir"] = str(tmp_path / "runs")
    cfg["sweep"]["storage"] = str(tmp_path / "journal.log")
    cfg["paper"]["also_on"] = [{"type": "fashion_mnist", "image_size": 16}]
    (tmp_path / "experiments").mkdir()
    path = tmp_path / "experiments" / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert rp.main([*ARGS, "--only", "tiny_fashion_mnist"]) == 0
    err = capsys.readouterr().err
    assert "[1/1] tiny_fashion_mnist (experiments/tiny.yaml on fashion_mnist 16 px): grid 2 cells" in err
    assert "[1/1] tiny_fashion_mnist: 4/4 runs done, 0 failed" in err
    assert not (tmp_path / "results" / "tiny.json").exists()  # --only the variant: the base did not run
    data = json.loads((tmp_path / "results" / "tiny_fashion_mnist.json").read_text())
    assert data["experiment"] == "tiny_fashion_mnist" and data["file"] == "experiments/tiny.yaml"
    assert data["dataset"] == {"type": "fashion_mnist", "image_size": 16}
    assert data["seeds"] == {"vq16": [0, 1], "vq4": [0, 1]}
    base = validate(read_yaml(path))
    assert data["study"].startswith("tiny_fashion_mnist-") and data["study"] != st.study_name(base, base.sweep)
    # the numbers are the variant study's trials, and those runs trained on Fashion-MNIST
    variant = validate(apply_overrides(read_yaml(path), rp.discover("experiments")["tiny_fashion_mnist"].overrides))
    trials = st.read_trials(results.find_study(variant, variant.sweep))
    assert len(trials) == 4
    for t in trials:
        for seed, m in t.record.metrics.items():
            assert data["cells"][t.record.cell][str(seed)]["psnr"] == float(f"{m['psnr']:.6g}")
    runs = sorted(p for p in (tmp_path / "runs").rglob(rundir.CONFIG))
    assert len(runs) == 4
    for p in runs:
        ran = yaml.safe_load(p.read_text())
        assert ran["data"]["type"] == "fashion_mnist" and ran["data"]["image_size"] == 16 and ran["name"] == "tiny_fashion_mnist"
    # the page: the variant's row with its effect, the base's row not run, on their datasets
    page = (tmp_path / "docs" / "RESULTS.md").read_text()
    assert page == rp.page_text("experiments", "results")
    rows = table_rows(page)
    assert len(rows) == 2
    assert rows[0].endswith("| not run | shapes 16 px | [tiny](#tiny) |")
    assert "| fashion_mnist 16 px | [tiny_fashion_mnist](#tiny_fashion_mnist) |" in rows[1] and "not run" not in rows[1]
    assert (tmp_path / "docs" / "results" / "tiny_fashion_mnist.claims.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_variant_cell_trains_two_steps_on_fashion_mnist(tmp_path, monkeypatch, name):
    """The last cell of each shipped Fashion-MNIST variant (supervision's: the generation prior too;
    15-60 s each here, mostly that prior's sampling: slow)."""
    from core import sweep
    from core.trainer import train

    try:
        from test_experiments import tiny_overrides
    except ImportError:
        from tests.test_experiments import tiny_overrides

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VTOK_CACHE", str(tmp_path / "cache"))
    v = rp.discover(ROOT / "experiments")[f"{name}_fashion_mnist"]
    raw = apply_overrides(v.raw, tiny_overrides(v.raw, tmp_path))
    exp = validate(raw)
    sw = sweep.parse_sweep(exp.sweep)
    cell = sweep.validate_cell(raw, sw, sweep.grid_points(sw)[-1], 0)
    assert cell.data.type == "fashion_mnist" and cell.name == f"{name}_fashion_mnist"
    metrics = train(cell).metrics
    for c in v.raw["paper"]["claims"]:
        assert c["metric"] in metrics, (c["metric"], sorted(metrics))


# ------------------------------------------------------------------------------------------------
# bad entries: one line, exit status 2, nothing left behind
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("also_on, line", [
    ([{"type": "mnist"}], "error: paper.also_on.0.type: unknown dataset 'mnist' (registered: "),
    ([{"type": "fashion_mnist", "image_size": 4}], "error: paper.also_on.0.image_size: input should be greater than or equal to 8"),
    ([{"type": "fashion_mnist", "size": 32}], "error: paper.also_on.0.size: unknown key"),
    ([{"type": "fashion_mnist", "image_size": 18}],
     "error: paper.also_on.0: on fashion_mnist: model.encoder.downsample: 4 does not divide data.image_size 18"),
    ([{"type": "shapes", "image_size": 32}], "error: paper.also_on.0.type: 'shapes' is the experiment's own dataset"),
    ([FASHION, {"type": "fashion_mnist", "image_size": 16}], "error: paper.also_on.1.type: 'fashion_mnist' is already paper.also_on.0"),
    (["fashion_mnist"], "error: paper.also_on.0: input should be a valid dictionary"),
    ({"type": "fashion_mnist"}, "error: paper.also_on: input should be a valid list"),
])
def test_bad_also_on_entry_is_one_line_exit_2(tmp_path, monkeypatch, capsys, also_on, line):
    from core import run

    monkeypatch.chdir(tmp_path)
    cfg = json.loads(json.dumps(TINY))
    cfg["train"]["out_dir"] = "runs"
    cfg["sweep"]["storage"] = "journal.log"
    cfg["tracking"] = {"enabled": False}
    cfg["paper"]["also_on"] = also_on
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "tiny.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert run.main(["experiments/tiny.yaml", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(line), err
    # core.reproduce refuses before anything runs (its discovery, or the plan's validation: file named)
    assert rp.main(ARGS) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: experiments/tiny.yaml: paper.also_on"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["experiments"]


def test_missing_type_and_no_sweep(tmp_path, monkeypatch, capsys):
    from core import run

    monkeypatch.chdir(tmp_path)
    cfg = json.loads(json.dumps(TINY))
    cfg["paper"]["also_on"] = [{"image_size": 32}]
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "tiny.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert rp.main([*ARGS, "--dry-run"]) == 2
    assert capsys.readouterr().err == ("error: experiments/tiny.yaml: paper.also_on.0.type: missing (a dataset mapping "
                                       "such as {type: fashion_mnist, image_size: 32})\n")
    assert run.main(["experiments/tiny.yaml", "--dry-run"]) == 2
    assert capsys.readouterr().err.startswith("error: paper.also_on.0.type: missing; choose one of: ")
    del cfg["sweep"]
    cfg["paper"]["also_on"] = [FASHION]
    cfg["paper"]["claims"] = []
    (tmp_path / "experiments" / "tiny.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert run.main(["experiments/tiny.yaml", "--dry-run"]) == 2
    assert capsys.readouterr().err.startswith("error: paper.also_on: only a sweep's claims are judged on other datasets")
