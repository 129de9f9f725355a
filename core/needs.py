"""What a real run will need that this machine lacks (weight files, teacher runs, a GPU).

A check for something outside the config (a file, a run, a device) calls :func:`missing`: during a
normal run that raises (one ``ValueError`` line, which config validation reports with the path); while
planning (``python -m core.run --dry-run``, inside :func:`planning`) it records what is missing and
how to get it, and validation goes on, so a dry run plans any shipped config on a fresh machine.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True)
class Need:
    what: str  # e.g. "LPIPS vgg backbone weights /root/.cache/.../vgg16-397923af.pth"
    how: str  # how a real run gets it (a command, a download, a config key)


_PLANNING: ContextVar[list[Need] | None] = ContextVar("vtok_planning", default=None)


def missing(what: str, how: str, at: object = None) -> None:
    """Report that ``what`` (at path ``at``) is absent; ``how`` tells the user how to provide it.
    Raises ValueError (``"<what> not found at <at>: <how>"``) unless planning, in which case it is
    recorded and returns."""
    where = f" at {at}" if at is not None else ""
    needs = _PLANNING.get()
    if needs is None:
        raise ValueError(f"{what} not found{where}: {how}")
    need = Need(f"{what}{where}", how)
    if need not in needs:
        needs.append(need)


def is_planning() -> bool:
    return _PLANNING.get() is not None


@contextmanager
def planning() -> Iterator[list[Need]]:
    """Within this block :func:`missing` records instead of raising; yields the list it fills."""
    needs: list[Need] = []
    token = _PLANNING.set(needs)
    try:
        yield needs
    finally:
        _PLANNING.reset(token)


def format_needs(needs: list[Need]) -> str:
    if not needs:
        return "# a real run needs nothing this machine lacks"
    lines = [f"# a real run needs {len(needs)} thing(s) this machine lacks:"]
    lines += [f"#   - {n.what}\n#     how: {n.how}" for n in needs]
    return "\n".join(lines)
