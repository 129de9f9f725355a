"""Per-component random streams: the paired design of a sweep.

Seed s must mean the same thing in every cell of a sweep, so a paired comparison of two cells at
seed s differs only by what the cells differ in. A single global stream does not give that: a cell
with another quantizer draws a different number of numbers while building it and shifts the
initial weights of every module built after it. Each component is therefore built under its own
stream, seeded from (seed, component path) only — e.g. ``"model.encoder"``, ``"losses.gan"`` — and
the global stream is restored afterwards, so what follows the build does not depend on which
components were built either.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def component_seed(seed: int, path: str) -> int:
    """A 63-bit seed that depends only on ``(seed, path)`` (stable across processes and versions)."""
    digest = hashlib.sha256(f"{int(seed)}:{path}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@contextmanager
def seeded(seed: int | None, path: str) -> Iterator[None]:
    """Run the block on the CPU stream seeded by :func:`component_seed`; the global CPU stream is
    restored on exit. ``seed=None`` leaves the stream alone (models built outside training)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(component_seed(seed, path))
        yield
