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


def test_a_failed_step_shows_its_last_lines() -> None:
    console = io.StringIO()
    report = StepReport(io.StringIO(), console)
    report.write(kfp_lines("FAILURE"))
    report.close_report()
    shown = console.getvalue()
    assert "✗ train-fod" in shown and "failure" in shown
    assert "| ValueError: out of memory" in shown


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
