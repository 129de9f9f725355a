"""Pictures logged at every evaluation: reconstructions, codebook usage, usage over time.

- ``reconstructions/recon_<step>.png``: originals (top row) above their reconstructions (bottom
  row), upscaled by an integer factor with nearest-neighbour sampling (no smoothing hides the
  pixels) so a 32 px image is at least ``MIN_TILE`` px wide.
- ``codebook/usage_<step>.png``: per sub-codebook, how often each code is used on the eval
  images, codes sorted from most to least used (log scale), with used/size and perplexity.
- ``codebook/usage_over_time.png``: the share of each sub-codebook's codes in use at every
  evaluation so far (the same numbers are the metrics ``codebook/used_pct_<k>``).

matplotlib is imported lazily (only when a run is tracked).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

MIN_TILE = 128  # smallest displayed image side in px
MAX_PANELS = 16  # sub-codebooks drawn in the histogram (the rest are summarised by usage_over_time)
MAX_CODES = 1 << 20  # implicit codebooks larger than this are not histogrammed
MAX_IMAGES = 2048  # eval images encoded for the histogram


def upscale_factor(side: int, min_tile: int = MIN_TILE) -> int:
    return max(1, math.ceil(min_tile / max(1, side)))


def recon_grid_tensor(x: Tensor, y: Tensor, min_tile: int = MIN_TILE, pad: int = 2) -> Tensor:
    """(n, 3, H, W) originals and reconstructions in [-1, 1] -> one (3, H', W') image in [0, 1]:
    the originals' row above the reconstructions' row, each image upscaled ``s`` times (nearest)."""
    from torchvision.utils import make_grid

    s = upscale_factor(x.shape[-1], min_tile)
    both = torch.cat([x, y]).float().clamp(-1, 1) * 0.5 + 0.5
    if s > 1:
        both = F.interpolate(both, scale_factor=s, mode="nearest")
    return make_grid(both, nrow=x.shape[0], padding=pad, pad_value=1.0)


@torch.no_grad()
def save_recon_grid(model: Any, loader: Any, path: Path, n: int = 8) -> Path:
    from torchvision.utils import save_image

    was_training = model.training
    model.eval()
    try:
        x = next(iter(loader))["image"][:n].to(next(model.parameters()).device)
        y = model(x)["recon"]
    finally:
        model.train(was_training)
    save_image(recon_grid_tensor(x.cpu(), y.cpu()), str(path))
    return path


@torch.no_grad()
def code_counts(model: Any, loader: Any, max_images: int = MAX_IMAGES) -> list[Tensor] | None:
    """Per sub-codebook counts of each code over (up to ``max_images``) eval images; None for a
    continuous quantizer or codebooks too large to count."""
    q = model.quantizer
    sizes = [int(n) for n in q.codebook_sizes]
    if getattr(q, "continuous", False) or not sizes or max(sizes) > MAX_CODES:
        return None
    was_training = model.training
    model.eval()
    totals = [torch.zeros(n, dtype=torch.long) for n in sizes]
    seen = 0
    device = next(model.parameters()).device
    try:
        for batch in loader:
            idx = model.encode(batch["image"].to(device))
            flat = idx.reshape(-1, idx.shape[-1]).long().cpu()
            for k, n in enumerate(sizes):
                totals[k] += torch.bincount(flat[:, k].clamp(0, n - 1), minlength=n)[:n]
            seen += batch["image"].shape[0]
            if seen >= max_images:
                break
    finally:
        model.train(was_training)
    return totals


def used_pct(counts: list[Tensor]) -> list[float]:
    return [100.0 * float((c > 0).sum()) / c.numel() for c in counts]


def _grid_shape(n: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


def save_usage_histogram(counts: list[Tensor], path: Path, step: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = counts[:MAX_PANELS]
    rows, cols = _grid_shape(len(shown))
    w, h = (3.2, 2.4) if cols > 2 else (4.8, 3.2)
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols, h * rows + 0.4), squeeze=False)
    for k, (ax, c) in enumerate(zip(axes.flat, shown)):
        total = max(1, int(c.sum()))
        freq = (c.double() / total).sort(descending=True).values.numpy()
        used = int((c > 0).sum())
        p = freq[freq > 0]
        perplexity = math.exp(float(-(p * torch.from_numpy(p).log().numpy()).sum())) if len(p) else 0.0
        ax.fill_between(range(1, len(freq) + 1), freq, step="post", color="tab:blue", alpha=0.8)
        ax.set_yscale("log")
        ax.set_xlim(1, max(2, len(freq)))
        if len(p):
            ax.set_ylim(p.min() * 0.5, p.max() * 2)
        ax.set_title(f"codebook {k}: {used}/{c.numel()} used, ppl {perplexity:.0f}", fontsize=8)
        ax.set_xlabel("code rank (most used first)", fontsize=7)
        ax.set_ylabel("frequency", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    more = f" (first {MAX_PANELS} of {len(counts)} sub-codebooks)" if len(counts) > MAX_PANELS else ""
    fig.suptitle(f"codebook usage at step {step}{more}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_usage_over_time(history: list[tuple[int, list[float]]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 3.4))
    steps = [s for s, _ in history]
    k_max = max(len(u) for _, u in history)
    for k in range(min(k_max, MAX_PANELS)):
        ax.plot(steps, [u[k] if k < len(u) else math.nan for _, u in history], marker="o", ms=3, label=f"codebook {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("codes in use (%)")
    ax.set_ylim(0, 105)
    if k_max > 1:
        ax.legend(fontsize=7, ncol=min(4, k_max))
    ax.set_title("codebook usage over training", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _logged_history(tracker: Any, k: int, before: int) -> list[tuple[int, list[float]]]:
    """(step, used % per sub-codebook) logged by this run's earlier evaluations (before a resume)."""
    client, run_id = getattr(tracker, "client", None), getattr(tracker, "run_id", None)
    if client is None or run_id is None:
        return []
    try:
        per_k = [{m.step: m.value for m in client.get_metric_history(run_id, f"codebook/used_pct_{j}")}
                 for j in range(min(k, MAX_PANELS))]
    except Exception:  # noqa: BLE001 - a picture must not fail the run
        return []
    steps = sorted(s for s in per_k[0] if s < before) if per_k else []
    return [(s, [h.get(s, math.nan) for h in per_k]) for s in steps]


def log_eval_figures(tracker: Any, model: Any, loader: Any, run_dir: Path, step: int,
                     history: list[tuple[int, list[float]]]) -> None:
    """Write and log the evaluation's pictures (``history`` collects usage per evaluation)."""
    grid = save_recon_grid(model, loader, run_dir / f"recon_{step:08d}.png")
    tracker.log_artifact(grid, "reconstructions")
    counts = code_counts(model, loader)
    if counts is None:
        return
    pct = used_pct(counts)
    if not history:  # a resumed run: the evaluations before the resume are in MLflow
        history.extend(_logged_history(tracker, len(pct), step))
    history.append((step, pct))
    tracker.log_metrics({f"codebook/used_pct_{k}": v for k, v in enumerate(pct[:MAX_PANELS])}, step)
    fig_dir = run_dir / "figures"
    fig_dir.mkdir(exist_ok=True)
    tracker.log_artifact(save_usage_histogram(counts, fig_dir / f"usage_{step:08d}.png", step), "codebook")
    tracker.log_artifact(save_usage_over_time(history, fig_dir / "usage_over_time.png"), "codebook")
