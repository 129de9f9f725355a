"""Live sweep progress: one line per landed (cell, seed) with its objective, and a whole-sweep
progress bar with an estimate of the time left.

One display for a whole sweep: when a seed range adds runs its total grows (``grow``), the count
and the bar go on. ``SweepProgress`` is the display (no Optuna inside: testable with a fake clock); ``StudyWatcher``
polls the study's storage from a thread of the launching process and feeds it every trial that
finished since, whichever worker (process or machine) ran it.
"""
from __future__ import annotations

import math
import sys
import threading
import time
from typing import Any, Callable, TextIO


def fmt_duration(seconds: float | None) -> str:
    """``1h02m``, ``4m05s``, ``12s``; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(max(0.0, seconds)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class SweepProgress:
    """``total`` runs of which ``done`` had landed before this process started."""

    def __init__(self, total: int, done: int = 0, objective: str = "", bar: bool = True, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.done, self.start_done = total, done, done
        self.objective = objective
        self.stream = stream or sys.stderr
        self.clock = clock
        self.t0 = clock()
        self.failed = 0
        self.bar = None
        if bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="run", desc="sweep", dynamic_ncols=True, file=self.stream,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} runs [{elapsed}{postfix}]")
            self._postfix()

    def eta(self) -> float | None:
        """Seconds left at the rate runs have landed since this process started (None before the first)."""
        landed = self.done - self.start_done
        left = self.total - self.done
        if left <= 0:
            return 0.0
        if landed <= 0:
            return None
        return (self.clock() - self.t0) / landed * left

    def line(self, label: str, value: float | None, seconds: float | None = None, state: str = "COMPLETE") -> str:
        width = len(str(self.total))
        head = f"[{self.done:>{width}}/{self.total}] {label}"
        if state == "COMPLETE" and value is not None:
            body = f"{self.objective} {value:.4g}" if self.objective else f"{value:.4g}"
        else:
            body = state.lower()
        took = f" in {fmt_duration(seconds)}" if seconds is not None else ""
        return f"{head}: {body}{took}; {self.total - self.done} left, about {fmt_duration(self.eta())}"

    def landed(self, label: str, value: float | None, seconds: float | None = None, state: str = "COMPLETE", runs: int = 1) -> str:
        """One finished trial (``runs`` seeds of it): print its line, move the bar."""
        self.done = min(self.total, self.done + runs)
        self.failed += state == "FAIL"
        text = self.line(label, value, seconds, state)
        if self.bar is not None:
            self._postfix()
            self.bar.update(runs)
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)
        return text

    def grow(self, total: int) -> None:
        """The sweep planned more runs (a seed range added seeds): the same bar, a larger total."""
        self.total = max(total, self.done)
        if self.bar is not None:
            self.bar.total = self.total
            self._postfix()
            self.bar.refresh()

    def write(self, text: str) -> None:
        """A message line above the bar (or a plain line without one)."""
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def _postfix(self) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"ETA {fmt_duration(self.eta())}" + (f", {self.failed} failed" if self.failed else ""))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class StudyWatcher:
    """Polls ``study`` every ``interval`` s; each trial that reached COMPLETE / FAIL / PRUNED since
    the watcher started is reported to ``progress`` once. ``label_of(trial)`` names it, ``runs_of``
    counts its runs (a TPE trial runs every seed)."""

    def __init__(self, study: Any, progress: SweepProgress, label_of: Callable[[Any], str],
                 runs_of: Callable[[Any], int] = lambda t: 1, interval: float = 2.0,
                 on_landed: Callable[[], None] | None = None) -> None:
        from optuna.trial import TrialState

        self.study, self.progress, self.label_of, self.runs_of = study, progress, label_of, runs_of
        self.interval = interval
        self.on_landed = on_landed  # called after a poll that reported trials (e.g. to record spent time)
        self._lock = threading.Lock()  # the thread's polls and the caller's never report a trial twice
        self.finished = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
        self.seen = {t.number for t in study.get_trials(deepcopy=False) if t.state in self.finished}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def poll(self) -> int:
        """Report newly finished trials; returns how many."""
        n = 0
        with self._lock:
            for t in self.study.get_trials(deepcopy=False):
                if t.state not in self.finished or t.number in self.seen:
                    continue
                self.seen.add(t.number)
                runs = self.runs_of(t)
                if runs <= 0:  # not a run (a dropped duplicate)
                    continue
                secs = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_start and t.datetime_complete else None
                value = t.value if t.state.name == "COMPLETE" else None
                self.progress.landed(self.label_of(t), value, secs, t.state.name, runs)
                n += 1
        if n and self.on_landed is not None:
            self.on_landed()
        return n

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - a display must never stop the sweep
                pass

    def __enter__(self) -> "StudyWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.poll()  # the last runs
        except Exception:  # noqa: BLE001
            pass
        self.progress.close()
