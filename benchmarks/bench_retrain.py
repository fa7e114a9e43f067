"""Cost of a retrain after 10% new good images, against the first training.

On a fresh embedded stack (S3 + MLflow on loopback, temporary folder), with the dataset
versioned by DVC: the first ``fod retrain`` trains on 90% of the good training images (no
champion yet); then the held-back 10% are added and the check runs again (new data
version: the feature cache extracts only the new images); then, optionally, once more
with a warm start from the champion and fewer epochs. Every run goes through the whole
pipeline with the KFP local runner, registration and the local model server.

    python benchmarks/bench_retrain.py --out benchmarks/results/retrain_demo.json
    python benchmarks/bench_retrain.py --data ../shared/data/mvtec_ad --category bottle \
        --image-size 256 --model-size method --epochs 4
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="dataset root (default: generated demo data)")
    parser.add_argument("--category", default="widget")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--model-size", default="compact")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warm-epochs", type=int, default=5, help="0: no warm-start run")
    parser.add_argument("--new-fraction", type=float, default=0.1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from mlflow import MlflowClient

    from components.local.stack import EmbeddedStack
    from fod_core.synthetic import make_synthetic_dataset
    from pipelines.retrain import retrain_once

    work = Path(tempfile.mkdtemp(prefix="fod-bench-retrain-"))
    repo = work / "repo"
    category_dir = repo / "data" / args.category
    if args.data:
        shutil.copytree(args.data / args.category, category_dir)
    else:
        make_synthetic_dataset(repo / "data", args.category, n_train=40, size=args.image_size)
    good = sorted((category_dir / "train" / "good").iterdir())
    count = max(1, round(len(good) * args.new_fraction))
    held, held_for_warm = good[-count - 1 : -1], good[-1:]  # the last one: the warm run's
    holdout = work / "holdout"
    holdout.mkdir()
    for path in held + held_for_warm:
        shutil.move(path, holdout / path.name)

    stack = EmbeddedStack(work / "home", s3_port=0, mlflow_port=0)
    settings = stack.up()
    settings.export()
    os.environ["FOD_HOME"] = str(stack.home)
    arguments = {
        "image_size": args.image_size,
        "model_size": args.model_size,
        "epochs": args.epochs,
        "batch_size": 8,
        "learning_rate": args.lr,
        "val_fraction": "0.15",
        "min_image_auroc": 0.0,
        "promotion_tolerance": 1.0,
    }

    def check(label: str, **overrides) -> dict:
        started = time.perf_counter()
        report = retrain_once(
            [args.category],
            repo_root=repo,
            track="data",
            pipeline_root=work / "runs",
            arguments=arguments | overrides,
            home=stack.home,
        )
        seconds = time.perf_counter() - started
        result = report["results"][args.category]
        run = MlflowClient().get_run(
            MlflowClient().get_model_version(f"fod-{args.category}", result["new_version"]).run_id
        )
        row = {
            "run": label,
            "train_images": len(list((category_dir / "train" / "good").iterdir())),
            "seconds_total": round(seconds, 1),
            "seconds_pipeline": report["pipeline_seconds"],
            "seconds_training": run.data.metrics.get("train_s"),
            "epochs": (arguments | overrides)["epochs"],
            "version": result["new_version"],
            "promoted": result["promoted"],
            "test_image_auroc": run.data.metrics.get("test_image_auroc"),
            "test_pixel_auroc": run.data.metrics.get("test_pixel_auroc"),
        }
        print(json.dumps(row), flush=True)
        return row

    rows = []
    try:
        rows.append(check("first training"))
        cached_before = _cache_objects(settings)
        for path in held:
            shutil.move(holdout / path.name, category_dir / "train" / "good" / path.name)
        rows.append(check(f"retrain after adding {len(held)} new images (cold start)"))
        rows[-1]["cache_objects_added"] = _cache_objects(settings) - cached_before
        rows[-1]["new_images"] = len(held)
        if args.warm_epochs:
            for path in held_for_warm:  # one more image: a new data version again
                shutil.move(holdout / path.name, category_dir / "train" / "good" / path.name)
            rows.append(
                check(
                    f"retrain, warm start from the champion, {args.warm_epochs} epochs",
                    warm_start=True,
                    epochs=args.warm_epochs,
                )
            )
    finally:
        stack.down()
    report = {
        "command": "python benchmarks/bench_retrain.py " + " ".join(sys.argv[1:]),
        "runs": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    shutil.rmtree(work, ignore_errors=True)


def _cache_objects(settings) -> int:
    pages = settings.s3_client().get_paginator("list_objects_v2")
    return sum(
        page.get("KeyCount", 0)
        for page in pages.paginate(Bucket=settings.bucket, Prefix="features/")
    )


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
