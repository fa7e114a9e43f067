"""Faults on real processes (issue 27): a private embedded stack per module, whose SeaweedFS
and MLflow the tests stop, kill and restart on the same ports and data, as a machine's
outage would. Each test adds its row to the fault table: with FOD_FAULT_TABLE set (a
JSON-lines file), ``benchmarks/fault_table.py`` renders the rows into BENCHMARKS.md."""

from __future__ import annotations

import json
import os
from dataclasses import asdict

import pytest
from fault_kit import FaultRow

from components.local.processes import free_port


@pytest.fixture(scope="session")
def fault_table():
    """Call it with a FaultRow: appended to FOD_FAULT_TABLE when set (workers append)."""
    target = os.environ.get("FOD_FAULT_TABLE")

    def record(row: FaultRow) -> None:
        if target:
            with open(target, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(asdict(row)) + "\n")

    return record


@pytest.fixture(scope="module")
def fault_stack(tmp_path_factory):
    """A stack of its own, on fixed ports, so that a restarted service keeps its address."""
    from components.local.stack import EmbeddedStack

    stack = EmbeddedStack(
        tmp_path_factory.mktemp("fault-home"), s3_port=free_port(), mlflow_port=free_port()
    )
    stack.up()
    yield stack
    stack.down()
