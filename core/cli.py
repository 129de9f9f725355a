"""Command-line plumbing shared by the entry points: argparse that reports a bad command line as one
``error: <option>: <what>`` line with exit status 2 (not a usage block), and the one place that turns
a :class:`ConfigError` into that line."""
from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from core.errors import ConfigError

EXIT_BAD_INPUT = 2


class OneLineParser(argparse.ArgumentParser):
    """``--help`` is unchanged; a bad command line is one line naming the option, exit status 2."""

    def error(self, message: str) -> NoReturn:
        where = self.prog.split()[-1] if " " in self.prog else self.prog
        if message.startswith("unrecognized arguments:"):
            args = message.split(":", 1)[1].strip()
            message = f"{args}: unknown option or argument (see {self.prog} --help)"
        elif message.startswith("argument "):  # "argument --tokens: invalid int value: 'x'"
            head, _, rest = message[len("argument "):].partition(": ")
            message = f"{head.split('/')[0]}: {rest}"
        raise SystemExit(_print_error(f"{where}: {message}" if not message.startswith("-") else message))


def _print_error(line: str) -> int:
    print(f"error: {line}", file=sys.stderr)
    return EXIT_BAD_INPUT


def report(e: ConfigError) -> int:
    """Print ``e`` as the one error line; the exit status for bad input."""
    return _print_error(str(e))


def positive(value: int | float, option: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(option, f"must be {'>= 0' if allow_zero else 'positive'}, got {value}")
