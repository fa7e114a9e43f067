"""A user's own data on MVTec bottle: the same images in three layouts, side by side.

    python benchmarks/bench_user_data.py --data ../shared/data/mvtec_ad --category bottle \
        --epochs 10 --out benchmarks/results/user_data_bottle.json

1. ``folder``: ``good/`` = train/good, ``defects/<type>/`` = the test defects, no masks
   (the test normals are held out of ``good/``);
2. ``mvtec`` without ``ground_truth/``: image labels only;
3. ``mvtec`` with masks, as published.
Layouts 1 and 2 are built from symbolic links in a temporary folder; nothing is copied.
Each is trained with one seed and evaluated. Reported: split sizes, image AUROC, F1 at
the calibrated threshold, the false-alarm rate on the test normals against the rate the
threshold promised, and the planted-anomaly metrics a good-only product is gated on.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from fod_core.cache import LocalStore
from fod_core.config import TrainConfig, model_config_for
from fod_core.data import NORMAL, list_images
from fod_core.evaluate import evaluate_model
from fod_core.train import train_model

try:
    from bench_fod import cpu_flags, cpu_model
except ImportError:  # run as a module
    from benchmarks.bench_fod import cpu_flags, cpu_model


def build_layouts(source: Path, category: str, work: Path) -> dict[str, tuple[Path, str]]:
    """{name: (dataset root, format)} for the three layouts, linked from ``source``."""
    base = source / category
    folder = work / "folder" / category
    for image in list_images(base / "train" / "good"):
        (folder / "good").mkdir(parents=True, exist_ok=True)
        (folder / "good" / image.name).symlink_to(image)
    for type_dir in sorted(p for p in (base / "test").iterdir() if p.is_dir()):
        if type_dir.name == NORMAL:
            continue
        (folder / "defects" / type_dir.name).mkdir(parents=True)
        for image in list_images(type_dir):
            (folder / "defects" / type_dir.name / image.name).symlink_to(image)
    unmasked = work / "mvtec_no_masks" / category
    unmasked.mkdir(parents=True)
    for part in ("train", "test"):
        (unmasked / part).symlink_to(base / part, target_is_directory=True)
    return {
        "folder, no masks": (work / "folder", "folder"),
        "mvtec, no ground_truth/": (work / "mvtec_no_masks", "mvtec"),
        "mvtec with masks": (source, "mvtec"),
    }


def f1_at_threshold(confusion: dict) -> float | None:
    tp, fp, fn = confusion.get("tp", 0), confusion.get("fp", 0), confusion.get("fn", 0)
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None


def run(args: argparse.Namespace) -> dict:
    model_config = model_config_for(
        args.model_size, image_size=args.image_size, backbone=args.backbone
    )
    train_config = replace(
        TrainConfig(), epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed
    )
    results = {
        "command": args.command,
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "model": {"backbone": args.backbone, "size": args.model_size, "image": args.image_size},
        "training": train_config.to_dict(),
        "target_false_alarm_rate": args.target_far,
        "layouts": {},
    }
    print(f"cpu: {results['cpu']} flags: {' '.join(results['cpu_flags'])}", flush=True)
    with tempfile.TemporaryDirectory(prefix="fod-layouts-") as tmp:
        layouts = build_layouts(Path(args.data).resolve(), args.category, Path(tmp))
        for name, (root, data_format) in layouts.items():
            if args.only and not any(o in name for o in args.only):
                continue
            model_dir = Path(tmp) / "models" / name.replace(" ", "_").replace("/", "")
            started = time.perf_counter()
            outcome = train_model(
                root,
                args.category,
                model_dir,
                format=data_format,
                model_config=model_config,
                train_config=train_config,
                cache_store=LocalStore(args.cache_dir),
                target_false_alarm_rate=args.target_far,
                progress=not args.quiet,
            )
            train_s = time.perf_counter() - started
            metrics = evaluate_model(
                model_dir,
                root,
                args.category,
                model_dir / "eval",
                format=data_format,
                max_overlays=0,
                progress=not args.quiet,
            )
            entry = {
                "format": data_format,
                "splits": outcome.splits,
                "image_auroc": metrics["image_auroc"],
                "pixel_auroc": metrics["pixel_auroc"],
                "aupro": metrics["aupro"],
                "f1_at_threshold": f1_at_threshold(metrics.get("confusion", {})),
                "confusion": metrics.get("confusion"),
                "threshold": outcome.threshold.to_dict(),
                "false_alarm_rate": metrics["false_alarm_rate"],
                "false_alarms": metrics["false_alarms"],
                "promised_false_alarm_rate": metrics["promised_false_alarm_rate"],
                "false_alarm_p_value": metrics["false_alarm_p_value"],
                "planted_image_auroc": metrics["planted_image_auroc"],
                "planted_aupro": metrics["planted_aupro"],
                "planted_detected": metrics["planted_detected"],
                "notes": metrics["notes"],
                "best_epoch": outcome.result.best_epoch,
                "train_seconds": round(train_s, 1),
            }
            results["layouts"][name] = entry
            print(json.dumps({name: entry}), flush=True)
    return results


def markdown(results: dict) -> str:
    def fmt(value) -> str:
        return (
            "n/a" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)
        )

    lines = [
        "| layout | train / val / test normal / test defect | image AUROC | pixel AUROC | "
        "F1 at threshold | false alarms on test normals | promised | planted AUROC / AUPRO |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, e in results["layouts"].items():
        s = e["splits"]
        lines.append(
            f"| {name} | {s['train']} / {s['validation']} / {s['test_normal']} / "
            f"{s['test_anomalous']} | {fmt(e['image_auroc'])} | {fmt(e['pixel_auroc'])} | "
            f"{fmt(e['f1_at_threshold'])} | {e['false_alarms']}/{s['test_normal']} = "
            f"{fmt(e['false_alarm_rate'])} | {fmt(e['promised_false_alarm_rate'])} | "
            f"{fmt(e['planted_image_auroc'])} / {fmt(e['planted_aupro'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    import sys

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--model-size", default="method", choices=["method", "compact"])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=3407)
    parser.add_argument("--target-far", type=float, default=0.01)
    parser.add_argument("--cache-dir", type=Path, default=Path("runs/bench/cache"))
    parser.add_argument("--only", nargs="*", help="layouts whose name contains one of these")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    args.command = "python " + " ".join(sys.argv)
    results = run(args)
    table = markdown(results)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results | {"table": table}, indent=2))


if __name__ == "__main__":
    main()
