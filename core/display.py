"""Small text helpers for what the command line prints (numbers, ``--help`` texts)."""
from __future__ import annotations

import math
import re
from typing import Any


def fmt_value(v: Any, digits: int = 4) -> str:
    """A metric for a terminal line: counts as ints (``12``, not ``12.0000``), the rest with ``digits``."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return str(v)
    v = float(v)
    if math.isfinite(v) and v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return f"{v:.{digits}f}"


_ROLE = re.compile(r":(?:func|class|mod|meth|attr):`~?([^`]+)`")
_LITERAL = re.compile(r"``([^`]+)``")


def plain(text: str) -> str:
    """A module docstring as ``--help`` text: RST roles and double backticks become plain text."""
    return _LITERAL.sub(r"\1", _ROLE.sub(r"\1", text)).replace("::\n", ":\n")
