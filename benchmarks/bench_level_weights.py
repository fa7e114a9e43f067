"""Level weighting of a trained model: the method's plain average of the two levels' maps
against weights chosen on validation images with planted anomalies (`--level-weights
synthetic`). The choice sees only the model's validation split; test metrics of both are
reported side by side.

    python benchmarks/bench_level_weights.py --model runs/bench/lite0_e40/model \\
        --data ../shared/data/mvtec_ad --category bottle --out runs/bench/lite0_e40_weights
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from fod_core.artifact import read_manifest
from fod_core.calibration import calibrate_model
from fod_core.evaluate import evaluate_model
from fod_core.level_weights import LevelWeighting

KEYS = ("image_auroc", "pixel_auroc", "aupro", "f1_max", "per_defect_type")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="a trained model directory")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--format", default="mvtec")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    report: dict = {
        "command": "python benchmarks/bench_level_weights.py "
        + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
        "model_training": read_manifest(args.model).get("training", {}).get("config"),
    }
    retrieval = bool(read_manifest(args.model).get("model", {}).get("retrieval_window"))
    if retrieval:  # its distance and FOD's scores have no meaningful plain average
        report["equal"] = "not applicable: the model has a retrieval branch"
    for weighting in LevelWeighting:
        if retrieval and weighting is LevelWeighting.EQUAL:
            continue
        model_dir = args.out / f"model_{weighting.value}"
        shutil.rmtree(model_dir, ignore_errors=True)
        shutil.copytree(args.model, model_dir)
        started = time.perf_counter()
        threshold = calibrate_model(
            model_dir, args.data, args.category, format=args.format, level_weighting=weighting
        )
        seconds = time.perf_counter() - started
        metrics = evaluate_model(
            model_dir,
            args.data,
            args.category,
            args.out / f"eval_{weighting.value}",
            format=args.format,
            max_overlays=12,
        )
        manifest = read_manifest(model_dir)
        report[weighting.value] = {
            "level_weights": manifest["postprocessing"].get("level_weights"),
            "choice": manifest.get("level_weights"),
            "calibration_seconds": round(seconds, 1),
            "threshold": threshold.value,
            "metrics": {k: metrics[k] for k in KEYS},
            "confusion_at_threshold": metrics.get("confusion"),
        }
        print(weighting.value, json.dumps({k: metrics[k] for k in KEYS[:4]}), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "level_weights.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
