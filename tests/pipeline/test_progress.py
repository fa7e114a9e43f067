"""The local run's console report: one line per step, a bounded training bar, failures shown."""

from __future__ import annotations

import io
import logging

import pytest

from pipelines.progress import StepReport, reported

GREEN, RESET = "\x1b[92m", "\x1b[0m"


def kfp_lines(train_status: str = "SUCCESS") -> str:
    """What the KFP local runner prints for a run, shortened."""
    lines = [
        f"13:08:32.421 - INFO - Executing task {GREEN}'fetch-data'{RESET}",
        "    [KFP Executor 2026-11-30 13:08:33,000 INFO]: Looking for component `fetch_data`",
        '    {"inputs": {"parameterValues": {"data_version": "f15cf7e677c4"}}}',
        f"13:08:33.747 - INFO - Task {GREEN}'fetch-data'{RESET} finished with status "
        f"{GREEN}SUCCESS{RESET}",
        "Task validate-data cache hit (key=0123456789ab); skipping execution.",
        "Skipping conditional task condition-1 (condition evaluated to False)",
        "13:09:00.000 - INFO - Executing task 'train-fod'",
    ]
    lines += [
        f"    epoch {e}/20:  50%|#####     | 1/2 [00:01<00:01, rec=0.1]\r" for e in range(1, 21)
    ]
    lines += ["    Traceback (most recent call last):", "    ValueError: out of memory"]
    lines.append(f"13:10:00.000 - INFO - Task 'train-fod' finished with status {train_status}")
    return "\n".join(lines) + "\n"


def test_the_console_gets_one_line_per_step_and_the_file_everything() -> None:
    console, log = io.StringIO(), io.StringIO()
    report = StepReport(log, console)
    report.write(kfp_lines())
    report.close_report()
    shown = console.getvalue().splitlines()
    assert shown[0].split() == ["▸", "fetch-data", "running"]
    assert shown[1].split()[:3] == ["✓", "fetch-data", "success"]
    assert "validate-data" in shown[2] and "cache hit" in shown[2]
    assert "condition-1" in shown[3] and "skipped" in shown[3]
    bars = [line for line in shown if "epoch" in line]
    assert [b.split()[-1] for b in bars] == ["5/20", "10/20", "15/20", "20/20"]  # not 20 lines
    assert shown[-1].split()[:3] == ["✓", "train-fod", "success"]
    assert len(shown) == 10
    assert "parameterValues" in log.getvalue() and "\x1b[" not in log.getvalue()
    assert report.finished == [
        ("fetch-data", "success"),
        ("validate-data", "cached"),
        ("condition-1", "skipped"),
        ("train-fod", "success"),
    ]


def test_a_failed_step_shows_its_own_error_first() -> None:
    """Its exception's text under its line and as the command's last line; the executor's
    input JSON and the traceback stay in the raw log."""
    from pathlib import Path

    from pipelines.runner import failure_message

    console, log = io.StringIO(), io.StringIO()
    report = StepReport(log, console)
    report.write(kfp_lines("FAILURE").replace(
        "    ValueError: out of memory",
        '    {"inputs": {"parameterValues": {"epochs": 21}}}\n'
        '      File "/x/components/steps.py", line 9, in train_fod\n'
        "    components.errors.StorageError: S3 at http://127.0.0.1:8333 is unreachable\n"
        "\n    The above exception was the direct cause of the following exception:\n\n"
        "    Traceback (most recent call last):\n"
        "    components.errors.TrackingError: MLflow at http://127.0.0.1:5055 is down; "
        "is the stack up? `fod stack up`",
    ))  # fmt: skip
    report.close_report()
    shown = console.getvalue()
    error = (
        "TrackingError: MLflow at http://127.0.0.1:5055 is down; is the stack up? `fod stack up`"
    )
    assert "✗ train-fod" in shown and f"    error: {error}" in shown
    assert "parameterValues" not in shown and "Traceback" not in shown
    assert "parameterValues" in log.getvalue() and "Traceback" in log.getvalue()
    assert report.failure == ("train-fod", error)
    last = failure_message(report.failure, RuntimeError("x"), Path("runs/logs/p.log"))
    assert last == f"step train-fod failed: {error} (the run's raw logs: runs/logs/p.log)"


def test_a_failure_without_a_python_error_shows_its_last_lines_without_colours() -> None:
    from pathlib import Path

    from pipelines.runner import failure_message

    console = io.StringIO()
    report = StepReport(io.StringIO(), console)
    lines = kfp_lines("FAILURE").replace("    Traceback (most recent call last):\n", "")
    report.write(lines.replace("    ValueError: out of memory", "    Killed"))
    report.close_report()
    shown = console.getvalue()
    assert "(no Python error in it)" in shown and "| Killed" in shown
    assert report.failure == ("train-fod", "Killed")
    coloured = RuntimeError(
        "Task \x1b[95m'fod-training'\x1b[0m finished with \x1b[91mFAILURE\x1b[0m"
    )
    message = failure_message(None, coloured, Path("p.log"))
    assert "\x1b" not in message and "'fod-training' finished with FAILURE" in message


def test_verbose_shows_the_raw_lines_live(tmp_path) -> None:
    console = io.StringIO()
    with reported(tmp_path / "logs/run.log", verbose=True, console=console):
        print(kfp_lines(), end="")
        logging.getLogger("kfp").info("Task deploy-model cache hit (key=x)")
    assert "parameterValues" in console.getvalue()
    assert "Task deploy-model cache hit" in (tmp_path / "logs/run.log").read_text()


def test_the_logging_set_up_is_restored_after_a_run(tmp_path) -> None:
    root = logging.getLogger()
    before = root.handlers[:]
    with pytest.raises(RuntimeError), reported(tmp_path / "run.log", console=io.StringIO()):
        raise RuntimeError("a step failed")
    assert root.handlers == before


def test_a_steps_own_result_line_is_shown_under_it() -> None:
    console = io.StringIO()
    report = StepReport(io.StringIO(), console)
    report.write(
        "Executing task 'register-model'\n"
        '    fod-summary: {"version": "2", "promoted": false, "evidence": "planted"}\n'
        '    {"not": "a summary"}\n'
        "Task 'register-model' finished with status SUCCESS\n"
    )
    shown = console.getvalue().splitlines()
    assert shown[1] == '    {"version": "2", "promoted": false, "evidence": "planted"}'
    assert len(shown) == 3


def test_a_multi_line_error_is_shown_whole() -> None:
    """A data-validation failure's message lists its expectations and files on the lines
    after the exception's: they are part of the error, not of the traceback."""
    console = io.StringIO()
    report = StepReport(io.StringIO(), console)
    report.write(kfp_lines("FAILURE").replace(
        "    ValueError: out of memory",
        "    RuntimeError: data validation FAILED (1 expectation(s)):\n"
        "      - images_decode: 1 image cannot be read\n"
        "          files: broken/train/good/002.png\n"
        "    [KFP Executor 2026-11-30 13:08:33,000 INFO]: done",
    ))  # fmt: skip
    report.close_report()
    shown = console.getvalue()
    assert "    error: RuntimeError: data validation FAILED (1 expectation(s)):" in shown
    assert "      - images_decode: 1 image cannot be read" in shown
    assert "files: broken/train/good/002.png" in shown and "KFP Executor" not in shown
    assert report.failure[1].endswith("files: broken/train/good/002.png")
