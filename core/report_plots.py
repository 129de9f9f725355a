"""What a sweep report shows: which metrics, which way is better, and the figure.

- ``DIRECTIONS``: the FALLBACK table of which way each known metric is better (``None``: a
  property, not a quality, e.g. ``bits_capacity``; a metric not in it counts as higher-is-better),
  used only when the evaluators' declarations (``Evaluator.declared_metrics``) are not at hand: a
  report from the stored study whose config does not validate here. ``paper.metrics`` and a
  claim's ``direction`` come first, then the declarations (``core.report.metric_direction``).
- ``default_metrics`` picks a readable subset when ``paper.metrics`` does not say which to show.
- ``plot`` draws one small panel per metric in a grid (at most ``COLS`` wide, so the figure stays
  readable whatever the number of metrics): every seed as a point, the mean with its 95% interval
  (Student t; none for a single seed), the paper's figure for the cell on a second axis where it has
  one, axes scaled to the data (differences visible, not bars from zero).
"""
from __future__ import annotations

import math
import re
import statistics
from pathlib import Path
from typing import Any, Literal, Optional

Direction = Optional[Literal["higher", "lower"]]

# which way is better, per metric name (exact), then per prefix
DIRECTIONS: dict[str, Direction] = {
    "psnr": "higher", "ssim": "higher", "psnr_mean_image": "higher",
    "rfid": "lower", "fd_refnet": "lower",
    "zero_shot_top1": "higher", "zero_shot_top5": "higher", "linear_probe_top1": "higher",
    "usage": "higher", "usage_min": "higher", "perplexity": "higher", "bits_used": "higher",
    "dead_codes": "lower", "skipped_steps": "lower",
    "bits_capacity": None,  # set by the configuration (sum of log2 codebook sizes): no better side
}
PREFIX_DIRECTIONS: dict[str, Direction] = {
    "lpips_": "lower", "loss": "lower", "usage_": "higher", "perplexity_": "higher", "linear_probe_fit": None,
}

# the headline metrics, in the order a default report shows them (when present)
HEADLINE = ["psnr", "ssim", "rfid", "fd_refnet", "lpips_vgg", "lpips_alex", "zero_shot_top1", "linear_probe_top1",
            "usage", "dead_codes", "perplexity", "bits_used"]
MAX_DEFAULT = 8

# names papers print for our metrics (compared case- and punctuation-insensitively)
PAPER_NAMES: dict[str, tuple[str, ...]] = {
    "rfid": ("rFID",), "fd_refnet": ("rFID",), "psnr": ("PSNR",), "ssim": ("SSIM",),
    "lpips_vgg": ("LPIPS",), "lpips_alex": ("LPIPS",),
    "zero_shot_top1": ("zero-shot", "zero-shot top1", "zero-shot top-1", "ImageNet zero-shot"),
    "linear_probe_top1": ("linear probe", "linear-probe", "linear probe top1"),
    "usage": ("usage", "codebook usage"),
}
COLS = 4
PANEL = (3.1, 2.7)  # inches per panel
DPI = 100


def direction(metric: str) -> Direction:
    """From the tables above; a metric they do not know is taken as higher-is-better."""
    if metric in DIRECTIONS:
        return DIRECTIONS[metric]
    for prefix, d in PREFIX_DIRECTIONS.items():
        if metric.startswith(prefix):
            return d
    return "higher"


def arrow(d: Direction) -> str:
    return {"higher": "↑", "lower": "↓"}.get(d or "", "")


def default_metrics(values: dict[str, dict[str, list[float]]], objective: str | None = None,
                    extra: list[str] | None = None, limit: int = MAX_DEFAULT) -> list[str]:
    """The objective, the metrics claims are about, then the headline metrics present, up to ``limit``."""
    present = {k for cell in values.values() for k in cell}
    names = [m for m in [objective, *(extra or [])] if m]
    names += [m for m in HEADLINE if m in present]
    names = list(dict.fromkeys(names))
    return names[: max(limit, len([m for m in [objective, *(extra or [])] if m]))]


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


def paper_key(metric: str, figures: dict[str, dict[str, Any]]) -> str | None:
    """The paper's figure name for our ``metric`` (same name, or a known alias), if it has one."""
    keys = {_norm(k): k for f in figures.values() for k in f}
    for cand in (metric, *PAPER_NAMES.get(metric, ())):
        if _norm(cand) in keys:
            return keys[_norm(cand)]
    return None


T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       15: 2.131, 20: 2.086, 30: 2.042}


def t95(dof: int) -> float:
    """Two-sided 95% Student t quantile (table; 1.96 beyond 30 degrees of freedom)."""
    if dof in T95:
        return T95[dof]
    below = [d for d in T95 if d < dof]
    return T95[max(below)] if dof <= 30 else 1.96


def interval(seeds: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% interval of the mean); half-width nan for a single seed."""
    if not seeds:
        return math.nan, math.nan
    m = statistics.fmean(seeds)
    if len(seeds) < 2:
        return m, math.nan
    return m, t95(len(seeds) - 1) * statistics.stdev(seeds) / math.sqrt(len(seeds))


def figure_size(n_metrics: int) -> tuple[float, float]:
    cols = max(1, min(COLS, n_metrics))
    rows = max(1, math.ceil(n_metrics / cols))
    return PANEL[0] * cols, PANEL[1] * rows + 0.6


def plot(values: dict[str, dict[str, list[float]]], cells: list[str], metrics: list[str], path: Path, title: str,
         figures: dict[str, dict[str, Any]] | None = None, directions: dict[str, Direction] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = figures or {}
    directions = directions or {}
    metrics = [m for m in metrics if any(values.get(c, {}).get(m) for c in cells)]
    n = max(1, len(metrics))
    cols = min(COLS, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=figure_size(n), squeeze=False)
    xs = range(len(cells))
    for ax, m in zip(axes.flat, metrics):
        for i, c in enumerate(cells):
            seeds = values.get(c, {}).get(m, [])
            seeds = list(seeds.values()) if isinstance(seeds, dict) else seeds  # {seed: value}
            if not seeds:
                continue
            jitter = [(j - (len(seeds) - 1) / 2) * 0.08 for j in range(len(seeds))]
            ax.scatter([i + d for d in jitter], seeds, s=12, color="tab:blue", alpha=0.55, zorder=3,
                       label="seed" if i == 0 else None)
            mean, half = interval(seeds)
            ax.errorbar([i + 0.22], [mean], yerr=None if math.isnan(half) else [[half], [half]], fmt="D",
                        ms=5, color="black", capsize=3, zorder=4, label="mean ± 95% CI" if i == 0 else None)
        pk = paper_key(m, figures)
        if pk is not None:
            pv = [(i, figures.get(c, {}).get(pk)) for i, c in enumerate(cells)]
            pv = [(i, float(v)) for i, v in pv if isinstance(v, (int, float))]
            if pv:
                twin = ax.twinx()
                twin.plot([i for i, _ in pv], [v for _, v in pv], "s--", color="tab:orange", ms=5, lw=1,
                          label=f"paper {pk} (right)")
                twin.tick_params(labelsize=6, colors="tab:orange")
                twin.margins(y=0.25)
        d = directions.get(m, direction(m))
        ax.set_title(f"{m} {arrow(d)}".strip() + ("  (better: up)" if d == "higher" else "  (better: down)" if d == "lower" else ""),
                     fontsize=8)
        ax.set_xticks(list(xs), cells, rotation=30, ha="right", fontsize=7)
        ax.set_xlim(-0.5, len(cells) - 0.5)
        ax.tick_params(axis="y", labelsize=6)
        ax.margins(y=0.2)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    if not metrics:
        axes.flat[0].text(0.5, 0.5, "no results", ha="center", va="center")
    handles, labels = [], []
    for ax in fig.axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def claim_plot(res: Any, path: Path) -> Path:
    """One claim (a ``core.stats.ClaimResult``): the paired differences a − b per seed as points, the
    mean difference with its interval as a line and a band, 0 (and ±tolerance for ``matches``) as
    reference lines; an ``order`` claim gets one panel per neighbouring pair. Unpaired comparisons
    (Welch) have no per-seed differences: the panel shows the mean and interval only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = list(res.pairs) if res.kind == "order" and res.pairs else [res]
    fig, axes = plt.subplots(1, len(parts), figsize=(3.6 * len(parts), 3.0), squeeze=False)
    for ax, r in zip(axes.flat, parts):
        seeds = sorted(r.diffs, key=lambda s: int(s) if str(s).lstrip("-").isdigit() else str(s))
        ax.scatter(range(len(seeds)), [r.diffs[s] for s in seeds], s=16, color="tab:blue", zorder=3, label="a − b per seed")
        lo, hi = r.ci
        x = (-0.5, max(len(seeds), 1) - 0.5)
        if math.isfinite(r.mean_diff):
            ax.plot(x, [r.mean_diff] * 2, color="tab:red", lw=1.2, label="mean")
        if math.isfinite(lo) and math.isfinite(hi):
            ax.fill_between(x, lo, hi, color="tab:red", alpha=0.15, lw=0, label=f"{r.ci_level:.0%} interval")
        ax.axhline(0, color="black", lw=0.8)
        if r.tolerance is not None and math.isfinite(r.tolerance):
            for t in (-r.tolerance, r.tolerance):
                ax.axhline(t, color="gray", lw=0.8, ls="--")
        ax.set_xticks(range(len(seeds)), [str(s) for s in seeds], fontsize=7)
        ax.set_xlabel("seed", fontsize=8)
        ax.set_ylabel(f"{r.metric}: {r.cells[0]} − {r.cells[1]}", fontsize=8)
        ax.set_title(f"{r.verdict} ({r.test or 'no test'}, n={r.n})", fontsize=8)
        ax.tick_params(labelsize=7)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=3, frameon=False)
    fig.suptitle(res.statement, fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
