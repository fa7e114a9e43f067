"""The ``fod`` command: train, calibrate, evaluate, predict, and a quickstart that needs no
stack."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from fod_core.artifact import ArtifactError
from fod_core.backbone import BackboneWeightsError
from fod_core.calibration import ThresholdMode
from fod_core.cli_train import (
    add_confidence_arg,
    add_level_weights_arg,
    add_planting_arg,
    add_train_args,
    configs_from_args,
    recipe_space_from_args,
    train_setting,
)
from fod_core.config import (
    ModelSize,
    Precision,
    SettingsError,
    TrainConfig,
    model_config_for,
)
from fod_core.data import DatasetError, DatasetFormat, list_images
from fod_core.export import ExportError, Runtime
from fod_core.processing import ImageDecodeError
from fod_core.runtime import configure_cpu_numerics
from fod_core.trainer import CheckpointMismatchError

log = logging.getLogger("fod")


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", required=True, type=Path, help="dataset root, the folder that holds <category>/"
    )
    parser.add_argument("--category", required=True, help="category (product) name")
    parser.add_argument(
        "--format",
        default="mvtec",
        choices=[f.value for f in DatasetFormat],
        help="dataset layout (default: mvtec)",
    )


def _add_runtime_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--runtime",
        default=Runtime.TORCH.value,
        choices=[r.value for r in Runtime],
        help="torch, or the model's export that passed its parity check (`fod export`)",
    )
    add_scoring_precision_arg(parser, Precision.FP32.value)


def add_scoring_precision_arg(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--precision",
        default=default,
        choices=[p.value for p in Precision],
        help="torch scoring: fp32 (default), bf16 (autocast; fast only with AMX, AVX512-BF16 "
        "or a GPU), or auto: bf16 where the device has it natively and the model passed its "
        "bf16 accuracy check (`fod export --format bf16`), else fp32",
    )


def cmd_train(args: argparse.Namespace) -> int:
    from fod_core.cache import LocalStore
    from fod_core.train import train_model

    model_config, train_config = configs_from_args(args)
    outcome = train_model(
        args.data,
        args.category,
        args.out,
        format=args.format,
        model_config=model_config,
        train_config=train_config,
        cache_store=LocalStore(args.cache_dir) if args.cache_dir else None,
        resume=args.resume,
        keep_checkpoints=args.keep_checkpoints,
        target_false_alarm_rate=args.target_far,
        delta=1 - args.confidence,
        level_weighting=train_setting(args, "level_weights"),
        planting=train_setting(args, "planting"),
        progress=not args.quiet,
        auto_recipe=bool(train_setting(args, "auto_recipe")),
        recipe_space=recipe_space_from_args(args),
    )
    print(
        json.dumps(
            {
                "model_dir": str(outcome.model_dir),
                "best_epoch": outcome.result.best_epoch,
                "best_val_loss": outcome.result.best_val_loss,
                "splits": outcome.splits,
                "threshold": outcome.threshold.value,
                "threshold_promise": outcome.threshold.describe(),
                "level_weights": outcome.level_weights.weights if outcome.level_weights else None,
                **({"recipe": outcome.recipe.describe()} if outcome.recipe else {}),
                "feature_cache": {k: v.to_dict() for k, v in outcome.cache.items()},
                "peak_memory_mb": {
                    **{p["name"]: p["peak_rss_mb"] for p in outcome.memory["phases"]},
                    "whole_command": outcome.memory["process_peak_rss_mb"],
                },
                **{k: round(v, 2) for k, v in outcome.seconds.items()},
            },
            indent=2,
        )
    )
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from fod_core.artifact import read_manifest
    from fod_core.calibration import calibrate_model

    if args.mode == ThresholdMode.F1.value and not args.anomalies:
        raise DatasetError("--mode f1 needs labelled validation anomalies (--anomalies IMG...)")
    if args.normals and not list_images(args.normals):
        raise DatasetError(f"--normals: no images in {args.normals}")
    if args.planting and not args.level_weights:
        raise DatasetError("--planting chooses the anomalies of --level-weights: give both")
    threshold = calibrate_model(
        args.model,
        args.data,
        args.category,
        format=args.format,
        mode=args.mode,
        target_false_alarm_rate=args.target_far,
        anomalous_images=args.anomalies,
        level_weighting=args.level_weights,
        planting=args.planting,
        delta=1 - args.confidence,
        extra_normals=list_images(args.normals) if args.normals else (),
    )
    post = read_manifest(args.model)["postprocessing"]
    print(json.dumps({**threshold.to_dict(), "level_weights": post.get("level_weights")}, indent=2))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fod_core.evaluate import evaluate_model

    metrics = evaluate_model(
        args.model,
        args.data,
        args.category,
        args.out,
        format=args.format,
        device=args.device,
        max_overlays=args.max_overlays,
        progress=not args.quiet,
        runtime=args.runtime,
        precision=args.precision,
    )
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from fod_core.predict import predict_images

    results = predict_images(
        args.model,
        args.images,
        heatmap_dir=args.heatmaps,
        device=args.device,
        runtime=args.runtime,
        precision=args.precision,
    )
    for result in results:
        print(json.dumps(result))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fod_core.artifact import read_manifest
    from fod_core.export import EXPORT_FORMATS, check_exports, export_model
    from fod_core.precision_check import check_precision
    from fod_core.roofline import machine

    data = dict(data_root=args.data, category=args.category, format=args.data_format)
    if args.check_only:
        manifest = read_manifest(args.model)
        graphs = list(manifest.get("export", {}))
        bf16 = Precision.BF16.value in manifest.get("precision_check", {})
        if not graphs and not bf16:
            raise ExportError(f"{args.model} holds no export to check: run `fod export` first")
        records = check_exports(args.model, **data) if graphs else {}
    else:
        wanted = [f.value for f in EXPORT_FORMATS] if args.format == "all" else [args.format]
        graphs = [f for f in wanted if f != Precision.BF16.value]
        # bf16 with "all" only where it is native: emulated, it is no faster than fp32
        bf16 = args.format == Precision.BF16.value or (
            args.format == "all" and machine().native_bf16
        )
        records = export_model(args.model, graphs, **data) if graphs else {}
    reports = {k: v["parity"] for k, v in records.items()}
    if bf16:
        reports[Precision.BF16.value] = check_precision(args.model, **data).to_dict()
    print(json.dumps(reports, indent=2))
    failed = [k for k, v in reports.items() if (k in graphs or k == "bf16") and not v["passed"]]
    if failed:
        print(
            f"fod export: check FAILED for {', '.join(failed)}: an export is kept for "
            "inspection and refused by `fod serve --runtime`; a failed bf16 check keeps "
            "`--precision auto` at fp32",
            file=sys.stderr,
        )
        return 3
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    """Generate a small dataset with planted defects, train on it and evaluate (no stack)."""
    from fod_core.cache import LocalStore
    from fod_core.evaluate import evaluate_model
    from fod_core.synthetic import make_synthetic_dataset
    from fod_core.train import train_model

    out = Path(args.out)
    data_root = make_synthetic_dataset(out / "data", "widget", size=args.image_size)
    model_config = model_config_for(args.model_size, image_size=args.image_size)
    train_config = replace(TrainConfig(), epochs=args.epochs, lr=args.lr)
    started = time.perf_counter()
    train_model(
        data_root,
        "widget",
        out / "model",
        model_config=model_config,
        train_config=train_config,
        cache_store=LocalStore(out / "cache"),
        progress=not args.quiet,
    )
    metrics = evaluate_model(
        out / "model", data_root, "widget", out / "eval", progress=not args.quiet
    )
    print(f"\nFOD demo on generated data ({time.perf_counter() - started:.0f} s)")
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max"):
        value = metrics[key]
        print(f"  {key:12s} {value:.4f}" if value is not None else f"  {key:12s} n/a")
    print(f"  model        {out / 'model'}\n  report       {out / 'eval'}")
    return 0


def build_parser(
    extra_commands: Callable[[argparse._SubParsersAction], None] | None = None,
) -> argparse.ArgumentParser:
    """The ``fod`` parser; ``pipelines.cli`` adds its commands through ``extra_commands``."""
    parser = argparse.ArgumentParser(prog="fod", description=__doc__)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train one category into a model directory")
    _add_data_args(train)
    train.add_argument("--out", required=True, type=Path, help="model directory to write")
    add_train_args(train)
    train.set_defaults(func=cmd_train)

    calibrate = sub.add_parser(
        "calibrate", help="re-derive a model's threshold (and level weights) on validation data"
    )
    calibrate.add_argument("--model", required=True, type=Path)
    _add_data_args(calibrate)
    calibrate.add_argument(
        "--mode",
        choices=[m.value for m in ThresholdMode],
        help="default: F1-optimal with --anomalies, else the false-alarm quantile",
    )
    calibrate.add_argument("--target-far", type=float, default=0.01)
    add_confidence_arg(calibrate)
    calibrate.add_argument(
        "--normals",
        type=Path,
        help="a folder of more good parts the model never saw: they join the calibration "
        "part for a tighter false-alarm promise (no retraining)",
    )
    calibrate.add_argument(
        "--anomalies", nargs="*", type=Path, default=[], help="labelled validation anomalies"
    )
    add_level_weights_arg(calibrate, None)
    add_planting_arg(calibrate, "the model's")
    calibrate.set_defaults(func=cmd_calibrate)

    evaluate = sub.add_parser("evaluate", help="test metrics, plots and heatmaps of a model")
    evaluate.add_argument("--model", required=True, type=Path)
    _add_data_args(evaluate)
    evaluate.add_argument("--out", required=True, type=Path, help="folder for the report")
    evaluate.add_argument("--device", default="cpu")
    evaluate.add_argument("--max-overlays", type=int, help="limit the heatmap overlays written")
    _add_runtime_arg(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)

    predict = sub.add_parser("predict", help="score images (JSON line per image)")
    predict.add_argument("--model", required=True, type=Path)
    predict.add_argument("images", nargs="+", type=Path)
    predict.add_argument("--heatmaps", type=Path, help="write a heatmap overlay per image here")
    predict.add_argument("--device", default="cpu")
    _add_runtime_arg(predict)
    predict.set_defaults(func=cmd_predict)

    export = sub.add_parser(
        "export",
        help="write the scoring graph as ONNX / OpenVINO into the model directory and check "
        "it against PyTorch; check PyTorch's bf16 scoring against fp32 (exit 3 on a failure)",
    )
    export.add_argument("--model", required=True, type=Path)
    export.add_argument(
        "--format",
        default="all",
        choices=["onnx", "openvino", "bf16", "all"],
        help="bf16: no file, PyTorch with bf16 autocast, checked on planted anomalies "
        "(accuracy within 0.002 of fp32). all: onnx, openvino, and bf16 where it is native",
    )
    export.add_argument(
        "--data", type=Path, help="dataset root for the parity check (default: the manifest's)"
    )
    export.add_argument("--category", help="default: the model's category")
    export.add_argument("--data-format", default="mvtec", choices=[f.value for f in DatasetFormat])
    export.add_argument(
        "--check-only",
        action="store_true",
        help="run the parity check again on the exports the model holds",
    )
    export.set_defaults(func=cmd_export)

    quick = sub.add_parser(
        "quickstart", help="generate data with planted defects, train, evaluate (no stack)"
    )
    quick.add_argument("--out", default=Path("runs/quickstart"), type=Path)
    quick.add_argument("--epochs", type=int, default=16)
    quick.add_argument(
        "--lr",
        type=float,
        default=5e-4,
        help="higher than the method's 1e-4: the quickstart trains few steps",
    )
    quick.add_argument("--image-size", type=int, default=128)
    quick.add_argument("--model-size", default=ModelSize.COMPACT.value)
    quick.set_defaults(func=cmd_quickstart)
    from fod_core.cli_data import add_data_commands

    add_data_commands(sub)
    if extra_commands is not None:
        extra_commands(sub)
    return parser


def main(
    argv: list[str] | None = None,
    *,
    parser: argparse.ArgumentParser | None = None,
    user_errors: tuple[type[Exception], ...] = (),
) -> int:
    args = (parser or build_parser()).parse_args(argv)
    configure_cpu_numerics()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (
        DatasetError,
        BackboneWeightsError,
        ImageDecodeError,
        ArtifactError,
        CheckpointMismatchError,
        ExportError,
        SettingsError,
        FileNotFoundError,
        *user_errors,
    ) as err:
        print(f"fod {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; `fod train --resume` continues from the last epoch", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
