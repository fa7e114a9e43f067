"""The GPU check is ready to run: on a machine without a GPU its dry run collects the
CUDA tests and parses its arguments."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_check_dry_run_collects_the_cuda_tests(tmp_path) -> None:
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(
        [
            "bash",
            "benchmarks/gpu_check.sh",
            "--dry-run",
            "--out",
            str(out),
            "--hard-products",
            "screw",
            "bottle",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert report["dry_run"] is True
    collected = report["cuda_tests_collected"]
    assert collected["returncode"] == 0 and "2 tests collected" in collected["summary"]
    hard = report["hard_recipe_command"]  # the hard-products recipe on CUDA, longer schedule
    assert "--preset auto" in hard and "--device cuda --epochs 30" in hard
    assert "--product screw=" in hard and "--product bottle=" in hard


def test_the_gpu_check_refuses_unknown_arguments() -> None:
    done = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--dry-run", "--gpus", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "unrecognized arguments" in done.stderr
