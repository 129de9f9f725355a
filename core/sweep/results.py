"""Reading a study's results for the report: which study a command line means, the per-trial
records, which seeds each cell actually has, and how the config differs from the experiment file."""
from __future__ import annotations

import json
from typing import Any, Sequence

from core.errors import ConfigError
from core.sweep import study as st
from core.sweep.record import TrialView
from core.sweep.space import SweepConfig


def find_study(exp: Any, sw: SweepConfig, overrides: Sequence[str] = ()) -> Any:
    """The study this experiment config (file and overrides) ran as; when there is none, one error
    naming the studies of this experiment that do exist and the overrides that tell them apart."""
    url = sw.storage_url()
    st.check_storage(url, must_exist=True)
    if st.study_exists(exp, sw):
        return st.open_study(exp, sw, create=False)
    name = st.study_name(exp, sw)
    mine = st.identity(exp)
    others = [f"'{n}' ({st.differences(mine, ident, limit=4)})" for n, ident in st.studies_like(exp, sw)]
    hint = (f"; studies of '{exp.name}' there differ from this config: {'; '.join(others)} — give the overrides "
            "the sweep ran with") if others else ": run the sweep first (python -m core.run EXP.yaml)"
    raise ConfigError("sweep.study_name" if sw.study_name else "sweep", f"no study '{name}' in {st.display_storage(url)}{hint}")


def load_named(sw: SweepConfig) -> Any:
    """The study named ``sw.study_name``, read as it was recorded (no identity check: used when the
    config can no longer be validated here, e.g. a plugin the sweep used was uninstalled)."""
    import optuna

    url = sw.storage_url()
    st.check_storage(url, must_exist=True)
    storage = st.make_storage(url)
    if sw.study_name not in optuna.get_all_study_names(storage):
        raise ConfigError("sweep.study_name", f"no study '{sw.study_name}' in {st.display_storage(url)}")
    return optuna.load_study(study_name=sw.study_name, storage=storage)


def config_changes(file_raw: dict[str, Any], raw: dict[str, Any]) -> list[str]:
    """``train.steps=20`` for every value the command line changed against the experiment file."""
    from core.config import flatten

    a, b = flatten(file_raw), flatten(raw)
    out = []
    for k in list(b) + [k for k in a if k not in b]:
        if a.get(k, _MISSING) != b.get(k, _MISSING):
            out.append(f"{k}={json.dumps(b[k], separators=(',', ':')) if k in b and not isinstance(b[k], str) else b.get(k, '(removed)')}")
    return out


_MISSING = object()


def collect(trials: list[TrialView], sampler: str) -> tuple[dict[str, dict[str, dict[int, float]]], list[dict[str, Any]], dict[str, Any], dict[str, list[int]]]:
    """(values[cell][metric] -> {seed: value}, failed trials, timing, seeds[cell]) from the records.
    Grid cells are named by their label, TPE trials ``#<number>``. Values are keyed by seed so the
    report pairs cells on the seeds they share (``core.stats``)."""
    values: dict[str, dict[str, dict[int, float]]] = {}
    seeds: dict[str, list[int]] = {}
    failed, starts, ends, busy = [], [], [], 0.0
    done_keys = {t.record.key for t in trials if t.state == "COMPLETE"}
    for t in trials:
        rec = t.record
        if t.state == "COMPLETE":
            label = rec.cell or str(t.number) if sampler == "grid" else f"#{t.number}"
            for seed, metrics in sorted(rec.metrics.items()):
                seeds.setdefault(label, []).append(seed)
                for k, v in metrics.items():
                    values.setdefault(label, {}).setdefault(k, {})[int(seed)] = float(v)
            if t.started and t.finished:
                starts.append(t.started)
                ends.append(t.finished)
                busy += t.finished - t.started
        elif t.state == "FAIL" and not rec.not_run and not (sampler == "grid" and rec.key in done_keys):
            failed.append({"trial": t.number, "cell": rec.cell or "?", "seed": ",".join(map(str, rec.seeds)),
                           "error": rec.error})
    wall = (max(ends) - min(starts)) if starts else 0.0
    return values, failed, {"wall_s": wall, "busy_s": busy, "runs": len(starts)}, {c: sorted(s) for c, s in seeds.items()}


def seeds_line(order: list[str], seeds: dict[str, list[int]], planned: list[int], up_to: int | None = None) -> str:
    """``Seeds per cell: a: 0, 1, 2; b: 0 (missing 1, 2)`` — what each cell actually has. ``up_to``:
    a seed range's max (seeds below it that were added are expected, not extra)."""
    parts = []
    for c in order:
        have = seeds.get(c, [])
        missing = [s for s in planned if s not in have]
        extra = [s for s in have if s not in planned and not (up_to is not None and 0 <= s < up_to)]
        text = ", ".join(map(str, have)) or "none"
        if missing:
            text += f" (missing {', '.join(map(str, missing))})"
        if extra:
            text += f" (also {', '.join(map(str, extra))}, not in sweep.seeds)"
        parts.append(f"{c}: {text}")
    return "Seeds per cell: " + "; ".join(parts) + "."
