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
from typing import TYPE_CHECKING

from fod_core.artifact import ArtifactError
from fod_core.backbone import BackboneSpec, BackboneWeightsError, WeightsSource
from fod_core.calibration import ThresholdMode
from fod_core.cli_data import fraction_or_auto
from fod_core.config import (
    PRESETS,
    Device,
    ModelConfig,
    ModelSize,
    Precision,
    Preset,
    ReferenceMode,
    SettingsError,
    TrainConfig,
    model_config_for,
)
from fod_core.data import DatasetError, DatasetFormat, list_images
from fod_core.export import ExportError, Runtime
from fod_core.level_weights import LevelWeighting
from fod_core.processing import Alignment, ImageDecodeError, ScoreRegion
from fod_core.promise import DEFAULT_DELTA
from fod_core.runtime import configure_cpu_numerics
from fod_core.synthetic import Planting
from fod_core.trainer import CheckpointMismatchError

if TYPE_CHECKING:
    from fod_core.recipe import RecipeSpace

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


def _add_planting_arg(parser: argparse.ArgumentParser, default_help: str) -> None:
    parser.add_argument(
        "--planting",
        choices=[p.value for p in Planting],
        help="anomalies planted for level weights and planted metrics: anywhere (0.3-3%% of "
        "the image) or part (0.05-0.5%%, on the part: small defects on a small part); "
        f"default: {default_help}",
    )


def _add_level_weights_arg(
    parser: argparse.ArgumentParser, default: str | None, *, train_default: str | None = None
) -> None:
    parser.add_argument(
        "--level-weights",
        default=default,
        choices=[w.value for w in LevelWeighting],
        help="equal: average the levels' maps (the method); synthetic: weights with the best "
        "AUPRO on anomalies planted into validation images (no labels needed)"
        + (f"; default: {train_default}" if train_default else "")
        + ("" if default or train_default else "; default: keep the model's"),
    )


TRAIN_DEFAULTS: dict[str, object] = {
    "alignment": ModelConfig().alignment.value,
    "reference": ModelConfig().reference.value,
    "reference_k": ModelConfig().reference_k,
    "retrieval_window": ModelConfig().retrieval_window,
    "score_region": ModelConfig().score_region.value,
    "val_fraction": TrainConfig().val_fraction,
    "auto_recipe": False,
    "epochs": TrainConfig().epochs,
    "lr": TrainConfig().lr,
    "level_weights": LevelWeighting.EQUAL.value,
    "planting": Planting.ANYWHERE.value,
}


def _setting(args: argparse.Namespace, name: str):
    """A training setting: its flag if given, else the preset's value, else the default."""
    given = getattr(args, name, None)
    if given is not None:
        return given
    return PRESETS[Preset(args.preset)].get(name, TRAIN_DEFAULTS[name])


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


def _add_train_args(parser: argparse.ArgumentParser) -> None:
    """Settings a preset may change default to None here and are resolved by ``_setting``:
    the flag if given, else the preset's value, else the method's default."""
    defaults_model, defaults_train = ModelConfig(), TrainConfig()
    parser.add_argument(
        "--preset",
        default=Preset.AUTO.value,
        choices=[p.value for p in Preset],
        help="auto (default): alignment, reference, K, retrieval window and planting chosen "
        "for the product before training on planted anomalies (no labels), the branches "
        "weighted on them, as many whole epochs as fit in 1,500 images seen; method: the published "
        "method; hard: parts at any angle with small defects (screws): "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in PRESETS[Preset.HARD].items())
        + ". A flag given as well wins over the preset (with auto, a part fixed by its flag "
        "is not chosen; the rest still is)",
    )
    parser.add_argument(
        "--backbone",
        default=defaults_model.backbone.name,
        help="any timm CNN with features_only (default: efficientnet_lite0)",
    )
    parser.add_argument(
        "--model-size",
        default=ModelSize.METHOD.value,
        choices=[m.value for m in ModelSize],
        help="method: the paper's widths (default); compact: half widths, 2 layers",
    )
    parser.add_argument(
        "--weights",
        default="auto",
        choices=[w.value for w in WeightsSource],
        help="backbone weights: auto = installed package, else hub",
    )
    parser.add_argument("--weights-file", help="local backbone weights (.pth/.pt)")
    parser.add_argument("--out-indices", default="2,3", help="backbone stages (default: 2,3)")
    parser.add_argument("--image-size", type=int, default=defaults_model.image_size)
    parser.add_argument(
        "--alignment",
        choices=[a.value for a in Alignment],
        help="none: the photos as they are (the method; default); principal_axis: turn an "
        "elongated part lying at any angle (a screw) onto one axis before the model",
    )
    parser.add_argument(
        "--reference",
        choices=[r.value for r in ReferenceMode],
        help="class: one reference pattern, the mean of all training normals (the method; "
        "default); nearest: per image, the mean of its --reference-k nearest training "
        "normals (kept in the model; for parts that are not aligned)",
    )
    parser.add_argument(
        "--reference-k",
        type=int,
        help="normals per nearest reference (default 0: chosen at training time on the "
        "validation's choice part, with planted anomalies; no labels)",
    )
    parser.add_argument(
        "--retrieval-window",
        type=int,
        help="not the method: add the retrieval distance (the finer level's distance to the "
        "reference within w x w positions) as a further branch of the score; odd w, 0 for "
        "none (default); needs --level-weights synthetic",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        help=f"training epochs (default: {defaults_train.epochs}; 0: as many whole epochs as "
        "fit in 1,500 images seen)",
    )
    parser.add_argument("--batch-size", type=int, default=defaults_train.batch_size)
    parser.add_argument("--lr", type=float, help=f"Adam's rate (default: {defaults_train.lr})")
    parser.add_argument("--seed", type=int, default=defaults_train.seed)
    parser.add_argument(
        "--val-fraction",
        type=fraction_or_auto,
        help="share of the normal images held out from training (0: no false-alarm "
        "guarantee), or auto: enough for the calibration part to promise --target-far, or 5%% "
        "where that needs more than a third of the normals (default: "
        f"{defaults_train.val_fraction}; auto with --preset auto)",
    )
    parser.add_argument(
        "--score-region",
        choices=[r.value for r in ScoreRegion],
        help="not the method: where the image score looks, whole (the method's) or part (the "
        "part alone, grown a few pixels: for a part on a plain background whose specks and "
        "fill would raise normals' scores; nothing beside the part is scored). Default: "
        "whole; chosen with --preset auto",
    )
    parser.add_argument(
        "--choice-fraction",
        type=float,
        default=defaults_train.choice_fraction,
        help="share of the validation images that make choices (epoch, level weights); "
        "the rest set the threshold alone",
    )
    parser.add_argument("--device", default="auto", choices=[d.value for d in Device])
    parser.add_argument("--precision", default="auto", choices=[p.value for p in Precision])
    parser.add_argument(
        "--lean-attention",
        action=argparse.BooleanOptionalAction,
        default=defaults_train.lean_attention,
        help="hold each attention map one block of query rows at a time (fp32): the same "
        "training in a quarter of the memory, about a fifth slower (default: on)",
    )
    parser.add_argument(
        "--micro-batch-size",
        type=int,
        default=defaults_train.micro_batch_size,
        help="images per forward/backward pass, their gradients summed into the batch's "
        "step (the same training in less memory; default 0: 4 on a CPU, the whole batch "
        "on a GPU)",
    )
    parser.add_argument(
        "--target-far",
        type=float,
        default=0.01,
        help="false-alarm rate the threshold is calibrated for",
    )
    _add_confidence_arg(parser)
    _add_level_weights_arg(parser, None, train_default=LevelWeighting.EQUAL.value)
    _add_planting_arg(parser, Planting.ANYWHERE.value)
    parser.add_argument("--cache-dir", type=Path, help="feature cache (default ~/.cache/fod)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("--keep-checkpoints", action="store_true")


def _add_confidence_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--confidence",
        type=float,
        default=1 - DEFAULT_DELTA,
        help="how sure the false-alarm promise is: P(this model's rate <= target) "
        f"(default {1 - DEFAULT_DELTA:g})",
    )


def _configs(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig]:
    """The flags as configs; settings that cannot go together are a user's error."""
    try:
        return _build_configs(args)
    except SettingsError:
        raise
    except ValueError as err:  # a config's own check (an even window, K < 0, ...)
        raise SettingsError(str(err)) from err


def _build_configs(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig]:
    backbone = BackboneSpec(
        name=args.backbone,
        out_indices=tuple(int(i) for i in args.out_indices.split(",")),
        weights=WeightsSource(args.weights),
        weights_file=args.weights_file,
    )
    model_config = replace(
        model_config_for(args.model_size, image_size=args.image_size),
        backbone=backbone,
        alignment=Alignment(_setting(args, "alignment")),
        reference=ReferenceMode(_setting(args, "reference")),
        reference_k=int(_setting(args, "reference_k")),
        retrieval_window=int(_setting(args, "retrieval_window")),
        score_region=ScoreRegion(_setting(args, "score_region")),
    )
    val_fraction = _setting(args, "val_fraction")
    train_config = TrainConfig(
        epochs=int(_setting(args, "epochs")),
        batch_size=args.batch_size,
        lr=float(_setting(args, "lr")),
        seed=args.seed,
        val_fraction=None if val_fraction == "auto" else float(val_fraction),
        choice_fraction=args.choice_fraction,
        device=Device(args.device),
        precision=Precision(args.precision),
        lean_attention=args.lean_attention,
        micro_batch_size=args.micro_batch_size,
    )
    return model_config, train_config


def _recipe_space(args: argparse.Namespace) -> RecipeSpace | None:
    """With ``--preset auto``, the parts of the recipe the user fixed with their flags."""
    from fod_core.recipe import RecipeSpace

    if not _setting(args, "auto_recipe"):
        return None
    names = (
        "alignment",
        "reference",
        "reference_k",
        "retrieval_window",
        "planting",
        "score_region",
    )
    return RecipeSpace.from_flags(**{name: getattr(args, name, None) for name in names})


def cmd_train(args: argparse.Namespace) -> int:
    from fod_core.cache import LocalStore
    from fod_core.train import train_model

    model_config, train_config = _configs(args)
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
        level_weighting=_setting(args, "level_weights"),
        planting=_setting(args, "planting"),
        progress=not args.quiet,
        auto_recipe=bool(_setting(args, "auto_recipe")),
        recipe_space=_recipe_space(args),
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
    _add_train_args(train)
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
    _add_confidence_arg(calibrate)
    calibrate.add_argument(
        "--normals",
        type=Path,
        help="a folder of more good parts the model never saw: they join the calibration "
        "part for a tighter false-alarm promise (no retraining)",
    )
    calibrate.add_argument(
        "--anomalies", nargs="*", type=Path, default=[], help="labelled validation anomalies"
    )
    _add_level_weights_arg(calibrate, None)
    _add_planting_arg(calibrate, "the model's")
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
