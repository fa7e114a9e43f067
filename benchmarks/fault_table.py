"""The fault table in BENCHMARKS.md, produced by the fault tests (issue 27): runs
``tests/faults`` with FOD_FAULT_TABLE set, then writes their rows (fault, point, time to
fail, the message a user reads, what survived) between the table's markers.

    python benchmarks/fault_table.py            # runs the tests (about 7 min on 2 cores)
    python benchmarks/fault_table.py --rows F   # renders rows a test run already wrote
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- fault-table:begin -->", "<!-- fault-table:end -->"
COMMAND = "python benchmarks/fault_table.py"
MAX_CELL = 260  # characters of a message shown; the tests check the whole


def cpu() -> str:
    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")), platform.processor(),
    )  # fmt: skip
    flags = Path("/proc/cpuinfo").read_text()
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f" {f}" in flags]
    return f"{model}, {os.cpu_count()} cores, {' '.join(isa)}"


def render(rows: list[dict], seconds: float | None) -> str:
    def cell(text) -> str:
        text = re.sub(r"/tmp/\S*/", ".../", str(text))  # the tests' folders
        text = text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [
        BEGIN,
        f"Produced by `{COMMAND}` on {datetime.now(UTC):%Y-%m-%d} ({cpu()})"
        + (f"; the tests took {seconds:.0f} s." if seconds else "."),
        "Time to fail: from the fault (or from the command's start when the service was "
        "down before it) to the error; '-' where nothing failed.",
        "",
        "| fault | point | time to fail | what the user reads | what survived |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        took = "-" if row["seconds"] is None else f"{row['seconds']:.1f} s"
        lines.append(
            f"| {cell(row['fault'])} | {cell(row['point'])} | {took} | "
            f"{cell(row['message'])} | {cell(row['survived'])} |"
        )
    return "\n".join([*lines, END])


def splice(text: str, table: str) -> str:
    if BEGIN in text and END in text:
        return text[: text.index(BEGIN)] + table + text[text.index(END) + len(END) :]
    return (
        text.rstrip()
        + "\n\n## Faults: what breaks, what the user reads, what survives\n\n"
        + table
        + "\n"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=Path, help="a JSON-lines file the tests wrote")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    seconds = None
    rows_file = args.rows
    if rows_file is None:
        rows_file = Path(tempfile.mkdtemp(prefix="fod-faults-")) / "rows.jsonl"
        started = datetime.now(UTC)
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/faults"],
            cwd=ROOT,
            env=os.environ | {"FOD_FAULT_TABLE": str(rows_file), "HF_HUB_OFFLINE": "1"},
        )
        seconds = (datetime.now(UTC) - started).total_seconds()
        if result.returncode != 0:
            print("the fault tests failed: the table is not written", file=sys.stderr)
            return result.returncode
    rows = [json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()]
    args.out.write_text(splice(args.out.read_text(), render(rows, seconds)))
    print(f"{len(rows)} faults written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
