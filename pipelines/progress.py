"""What a person sees while the pipeline runs locally: one line per step, a training bar, and
the KFP runner's raw logs in a file (``-v`` shows them live too).

The KFP local runner prints everything (its own logs, each step's executor input and the
step's output) to ``sys.stdout``. ``StepReport`` stands in for it during a run: every line
goes to the log file, and the lines that say a step started, hit the cache, finished or was
skipped become one line each on the console.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from components.kfp_io import SUMMARY_MARKER

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STARTED = re.compile(r"Executing task '?(?P<task>[\w.-]+)'?")
_CACHED = re.compile(r"Task '?(?P<task>[\w.-]+)'? cache hit")
_FINISHED = re.compile(r"Task '?(?P<task>[\w.-]+)'? finished with status (?P<status>\w+)")
_SKIPPED = re.compile(r"Skipping (?P<conditional>conditional )?task '?(?P<task>[\w.-]+)'?")
_EPOCH = re.compile(r"epoch (?P<epoch>\d+)/(?P<epochs>\d+)")
# the last line of a Python traceback: "package.module.SomeError: what went wrong"
_RAISED = re.compile(r"^(?P<type>[A-Za-z_][\w.]*)(?:: (?P<text>.*))?$")
TRAINING_STEP = "train-fod"
FAILURE_TAIL = 60  # lines of a failed step's output kept, to find its error in
FALLBACK_LINES = 8  # shown when a failed step printed no Python error
BAR_WIDTH = 24


def plain(text: str) -> str:
    """``text`` without terminal colour codes (the KFP runner colours its messages)."""
    return _ANSI.sub("", text)


def log_path_for(pipeline_root: str | Path) -> Path:
    """Where a run's raw logs go: ``<pipeline root's parent>/logs/pipeline-<UTC time>.log``."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return Path(pipeline_root).resolve().parent / "logs" / f"pipeline-{stamp}.log"


@dataclass
class _Step:
    name: str
    started: float = field(default_factory=time.perf_counter)
    tail: deque = field(default_factory=lambda: deque(maxlen=FAILURE_TAIL))
    epoch: int = 0
    error: str | None = None  # the exception its traceback ended with (and its lines)
    in_traceback: bool = False
    in_error: bool = False  # reading the indented lines of a multi-line message


class StepReport:
    """A line-oriented ``sys.stdout`` stand-in: the log file gets everything, the console
    gets a progress report (or everything, when ``verbose``)."""

    def __init__(self, log: TextIO, console: TextIO, *, verbose: bool = False) -> None:
        self.log = log
        self.console = console
        self.verbose = verbose
        self.interactive = console.isatty()
        self.steps: dict[str, _Step] = {}
        self.current: _Step | None = None
        self.finished: list[tuple[str, str]] = []  # (step, status) in order
        self.failure: tuple[str, str] | None = None  # (step, its error) of the first failure
        self._partial = ""
        self._bar_shown = False
        self._quarters_shown = 0

    # -- the file protocol the runner and ``print`` use ----------------------------------
    def write(self, text: str) -> int:
        self._partial += text
        *lines, self._partial = re.split(r"\r\n|\r|\n", self._partial)
        for line in lines:
            self._line(line)
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    encoding = "utf-8"

    def flush(self) -> None:
        self.log.flush()
        self.console.flush()

    def isatty(self) -> bool:
        return False  # the runner's own colours and bars are for the file, not a terminal

    def close_report(self) -> None:
        if self._partial:
            self._line(self._partial)
            self._partial = ""
        self._end_bar()
        self.flush()

    # -- one line ------------------------------------------------------------------------
    def _line(self, raw: str) -> None:
        line = _ANSI.sub("", raw)
        self.log.write(line + "\n")
        if self.verbose:
            self._end_bar()
            self.console.write(raw + "\n")
        if match := _STARTED.search(line):
            self._start(match["task"])
        elif match := _CACHED.search(line):
            self._say(f"  ✓ {match['task']:<22} cache hit, not run")
            self.finished.append((match["task"], "cached"))
        elif match := _FINISHED.search(line):
            self._finish(match["task"], match["status"])
        elif match := _SKIPPED.search(line):
            why = "condition false" if match["conditional"] else "upstream step failed"
            self._say(f"  - {match['task']:<22} skipped ({why})")
            self.finished.append((match["task"], "skipped"))
        elif self.current is not None and SUMMARY_MARKER in line:
            self._say("    " + line.split(SUMMARY_MARKER, 1)[1])  # the step's own result
        elif self.current is not None:
            if match := _EPOCH.search(line):  # a progress bar: shown as ours, not in the tail
                if self.current.name == TRAINING_STEP:
                    self._progress(int(match["epoch"]), int(match["epochs"]))
            elif line.strip():
                self._output(self.current, line.removeprefix("    "))  # the runner's indent

    def _output(self, step: _Step, line: str) -> None:
        step.tail.append(line)
        if step.in_error and line.startswith(" ") and not line.lstrip().startswith("File "):
            step.error += "\n" + line  # the message goes on (a validation report, say)
            return
        step.in_error = False
        if line.startswith("Traceback (most recent call last):"):
            step.in_traceback = True
        elif step.in_traceback and (match := _RAISED.match(line)):
            kind = match["type"].rsplit(".", 1)[-1]
            step.error = f"{kind}: {match['text']}" if match["text"] else kind
            step.in_traceback = False  # a chained one starts with its own header
            step.in_error = True

    def _start(self, name: str) -> None:
        self.current = self.steps[name] = _Step(name)
        self._quarters_shown = 0
        self._say(f"  ▸ {name:<22} running")

    def _finish(self, name: str, status: str) -> None:
        step = self.steps.get(name) or _Step(name)
        seconds = time.perf_counter() - step.started
        ok = status.upper() == "SUCCESS"
        self._say(f"  {'✓' if ok else '✗'} {name:<22} {status.lower()} in {seconds:.1f}s")
        self.finished.append((name, status.lower()))
        if not ok:
            error = step.error or next(
                (line for line in reversed(step.tail) if not line.lstrip().startswith("{")),
                "no output",
            )
            self.failure = self.failure or (name, error)
            if step.error:  # its own message; the executor's JSON and traceback: the log
                first, *rest = step.error.splitlines()
                self._say(f"    error: {first}")
                for line in rest:
                    self._say(f"    {line}")
            else:
                self._say(f"    last lines of {name}'s output (no Python error in it):")
                for line in list(step.tail)[-FALLBACK_LINES:]:
                    self._say(f"    | {line}")
        self.current = None

    def _progress(self, epoch: int, epochs: int) -> None:
        step = self.current
        if step is None or epoch == step.epoch:
            return
        step.epoch = epoch
        if self.verbose:
            return
        done = BAR_WIDTH * epoch // epochs
        bar = f"    [{'#' * done}{'.' * (BAR_WIDTH - done)}] epoch {epoch}/{epochs}"
        if self.interactive:
            self.console.write("\r" + bar)
            self.console.flush()
            self._bar_shown = True
        elif 4 * epoch // epochs > self._quarters_shown:  # a log file or CI: four lines at most
            self._quarters_shown = 4 * epoch // epochs
            self._say(bar)

    def _end_bar(self) -> None:
        if self._bar_shown:
            self.console.write("\r\x1b[K")
            self._bar_shown = False

    def _say(self, text: str) -> None:
        if self.verbose:
            return
        self._end_bar()
        try:
            self.console.write(text + "\n")
        except UnicodeEncodeError:  # a console without UTF-8: the marks become '?'
            self.console.write(text.encode("ascii", "replace").decode() + "\n")
        self.console.flush()


@contextlib.contextmanager
def reported(log_path: Path, *, verbose: bool = False, console: TextIO | None = None):
    """Run the body with stdout and stderr going to a ``StepReport`` on ``log_path``."""
    console = console or sys.stdout
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        report = StepReport(log, console, verbose=verbose)
        if not verbose:
            console.write(f"  raw logs: {log_path}\n")
        # The runner logs through the root logger too (cache hits, skipped conditions), whose
        # handlers hold the streams they were made with: they get the report instead.
        root = logging.getLogger()
        saved = root.handlers[:], root.level
        root.handlers = [logging.StreamHandler(report)]
        root.setLevel(logging.INFO)
        try:
            with contextlib.redirect_stdout(report), contextlib.redirect_stderr(report):
                yield report
        finally:
            root.handlers, level = saved
            root.setLevel(level)
            report.close_report()
