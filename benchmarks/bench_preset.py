"""One training recipe on several products, in one command: `fod train --preset ...` then
`fod evaluate` for each, exactly as a user runs them (issue 13: screw and bottle with the
same recipe).

    python benchmarks/bench_preset.py --preset hard \
        --product screw=../shared/data/screw_512 --product bottle=../shared/data/mvtec_ad \
        --out benchmarks/results/preset_hard.json

Each product is a category folder under a dataset root (``name=root``; the category is
the name). Reported per product: the test metrics (image AUROC; pixel AUROC and AUPRO
where the product has masks), the epoch chosen on the validation normals, seconds per
epoch, wall time and peak memory (RSS of the training process), with the machine's CPU
and ISA; and what the line sees at the shipped threshold (issue 31): defects caught, false
alarms, the threshold's promise, the catch rate at test false-alarm rates 1% and 5% (for
the record) and what more calibration normals would change. The test set is read by `fod
evaluate` only, after every choice was made.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from fod_core.roofline import machine

METRICS = ("image_auroc", "pixel_auroc", "aupro", "f1_max", "false_alarm_rate")


def run(command: list[str], log: Path) -> tuple[float, float]:
    """Run a command, its output into ``log``; (seconds, peak RSS in GB). Raises on failure."""
    started = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise RuntimeError(f"{shlex.join(command)} failed ({process.returncode}); see {log}")
    return time.perf_counter() - started, usage.ru_maxrss / 1024**2  # KiB on Linux


def shipped(metrics: dict, calibration: dict) -> dict:
    """What the line sees at the threshold the model ships with (issue 31): defects caught
    and false alarms on the test set, and what the threshold promised."""
    keys = ("catch_rate", "defects_caught", "n_anomalous", "false_alarms", "n_normal")
    return {k: metrics.get(k) for k in keys} | {
        "per_defect_type": {
            name: {k: entry.get(k) for k in ("caught", "n_images", "catch_rate")}
            for name, entry in (metrics.get("per_defect_type") or {}).items()
        },
        "threshold": calibration.get("threshold"),
        "calibration_normals": calibration.get("n_normal"),
        "promised_false_alarm_rate": calibration.get("guaranteed_false_alarm_rate"),
        "confidence": calibration.get("confidence"),
        "promise": calibration.get("promise"),
    }


def new_report(script: str, **extra) -> dict:
    """A results file's head: the exact command and the machine (CPU, ISA, cores)."""
    where = machine()
    return {
        "command": f"python benchmarks/{script} " + shlex.join(sys.argv[1:]),
        "machine": {"name": where.name, "isa": list(where.isa), "cpus": os.cpu_count()},
        **extra,
        "products": {},
    }


def parse_product(spec: str) -> tuple[str, str, str]:
    """``name=root`` or ``name=root:format`` (``folder`` for a good/defects layout)."""
    name, _, rest = spec.partition("=")
    root, _, fmt = rest.partition(":")
    return name, root, fmt or "mvtec"


def train_and_evaluate(
    name: str,
    root: str,
    fmt: str = "mvtec",
    *,
    preset: str,
    work: Path,
    cache_dir: Path,
    evaluate_device: str = "cpu",
    train_args: list[str] = (),
    reuse: bool = False,
) -> dict:
    """`fod train --preset ...` then `fod evaluate`, as a user runs them; the results (kept
    beside the model: ``reuse`` reads them instead of training again)."""
    fod = [sys.executable, "-m", "fod_core.cli", "-q"]
    model = work / preset / name
    kept = model / "bench_result.json"
    if reuse and kept.is_file():
        print(f"{name}: the results of {model} (--reuse)", flush=True)
        return json.loads(kept.read_text())
    model.mkdir(parents=True, exist_ok=True)
    common = ["--data", root, "--category", name, "--format", fmt]
    train = [*fod, "train", *common, "--out", str(model), "--preset", preset]
    train += ["--cache-dir", str(cache_dir), *train_args]
    print(f"{name}: {shlex.join(train)}", flush=True)
    train_s, peak_gb = run(train, model / "train.log")
    evaluate = [*fod, "evaluate", "--model", str(model), *common]
    evaluate += ["--out", str(model / "evaluation"), "--device", evaluate_device]
    evaluate_s, _ = run(evaluate, model / "evaluate.log")
    manifest = json.loads((model / "fod.json").read_text())
    metrics = json.loads((model / "evaluation" / "metrics.json").read_text())
    history = manifest["training"]["history"]
    result = {
        "model_dir": str(model),
        "test": {k: round(metrics[k], 4) for k in METRICS if metrics.get(k) is not None},
        "n_test": {"normal": metrics.get("n_normal"), "anomalous": metrics.get("n_anomalous")},
        "model": manifest["model"],
        "alignment": manifest["preprocessing"].get("alignment", "none"),
        "level_weights": manifest["postprocessing"].get("level_weights"),
        "branch_scales": manifest["postprocessing"].get("branch_scales"),
        "recipe": manifest.get("recipe"),
        "phase_seconds": {
            k: round(v, 1) for k, v in manifest["training"].items() if k.endswith("_s")
        },
        "epochs": len(history),
        "best_epoch_on_validation": manifest["training"]["best_epoch"],
        "seconds_per_epoch": [round(r["seconds"], 1) for r in history],
        "train_images": manifest["data"]["train_images"],
        "train_wall_s": round(train_s, 1),
        "evaluate_wall_s": round(evaluate_s, 1),
        "train_peak_rss_gb": round(peak_gb, 2),
        "at_shipped_threshold": shipped(metrics, manifest.get("calibration") or {}),
        "catch_rate_at_test_far": metrics.get("catch_rate_at_test_far"),
        "more_normals": metrics.get("more_normals"),
    }
    kept.write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="hard")
    parser.add_argument(
        "--product", action="append", required=True, help="name=dataset root (repeatable)"
    )
    parser.add_argument("--out", type=Path, required=True, help="results JSON")
    parser.add_argument("--work", type=Path, default=Path("runs/preset"), help="models, logs")
    parser.add_argument("--cache-dir", type=Path, default=Path("runs/cache"))
    parser.add_argument("--evaluate-device", default="cpu", help="`fod evaluate --device`")
    parser.add_argument(
        "train_args", nargs="*", help="after --: more `fod train` flags (e.g. --epochs 2)"
    )
    args = parser.parse_args()

    report = new_report("bench_preset.py", preset=args.preset)
    for product in args.product:
        name, root, fmt = parse_product(product)
        result = train_and_evaluate(
            name,
            root,
            fmt,
            preset=args.preset,
            work=args.work,
            cache_dir=args.cache_dir,
            evaluate_device=args.evaluate_device,
            train_args=args.train_args,
        )
        report["products"][name] = result
        print(json.dumps({name: result["test"], "train_wall_s": result["train_wall_s"]}))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
