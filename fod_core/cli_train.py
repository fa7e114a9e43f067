"""The training settings of ``fod train`` (and the flags ``fod calibrate`` shares): flags,
presets and defaults resolved into the configs, in one place."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from fod_core.backbone import BackboneSpec, WeightsSource
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
from fod_core.level_weights import LevelWeighting
from fod_core.processing import Alignment, ScoreRegion
from fod_core.promise import DEFAULT_DELTA
from fod_core.retrieval import RetrievalFeatures
from fod_core.synthetic import Planting

if TYPE_CHECKING:
    from fod_core.recipe import RecipeSpace


def add_planting_arg(parser: argparse.ArgumentParser, default_help: str) -> None:
    parser.add_argument(
        "--planting",
        choices=[p.value for p in Planting],
        help="anomalies planted for level weights and planted metrics: anywhere (0.3-3%% of "
        "the image) or part (0.05-0.5%%, on the part: small defects on a small part); "
        f"default: {default_help}",
    )


def add_level_weights_arg(
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
    "retrieval_features": ModelConfig().retrieval_features.value,
    "score_region": ModelConfig().score_region.value,
    "val_fraction": TrainConfig().val_fraction,
    "auto_recipe": False,
    "epochs": TrainConfig().epochs,
    "lr": TrainConfig().lr,
    "level_weights": LevelWeighting.EQUAL.value,
    "planting": Planting.ANYWHERE.value,
}


def train_setting(args: argparse.Namespace, name: str):
    """A training setting: its flag if given, else the preset's value, else the default."""
    given = getattr(args, name, None)
    if given is not None:
        return given
    return PRESETS[Preset(args.preset)].get(name, TRAIN_DEFAULTS[name])


def add_train_args(parser: argparse.ArgumentParser) -> None:
    """Settings a preset may change default to None here and are resolved by ``train_setting``:
    the flag if given, else the preset's value, else the method's default."""
    defaults_model, defaults_train = ModelConfig(), TrainConfig()
    parser.add_argument(
        "--preset",
        default=Preset.AUTO.value,
        choices=[p.value for p in Preset],
        help="auto (default): alignment, reference, K, retrieval window, planting and score "
        "region chosen "
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
        help="not the method: add the retrieval distance (the distance of --retrieval-features "
        "to the reference within w x w positions) as a further branch of the score; odd w, -1 for "
        "any position of the reference, 0 for none (default); needs --level-weights synthetic",
    )
    parser.add_argument(
        "--retrieval-features",
        choices=[f.value for f in RetrievalFeatures],
        help="not the method: what the retrieval distance compares; finer: the finer level's "
        "features (default); local: every level's, each averaged over 3x3 positions, on the "
        "finer grid (PatchCore's patch features); both: one branch of each, weighted apart; "
        "--preset auto tries only what this flag names, both without it",
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
    add_confidence_arg(parser)
    add_level_weights_arg(parser, None, train_default=LevelWeighting.EQUAL.value)
    add_planting_arg(parser, Planting.ANYWHERE.value)
    parser.add_argument("--cache-dir", type=Path, help="feature cache (default ~/.cache/fod)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("--keep-checkpoints", action="store_true")


def add_confidence_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--confidence",
        type=float,
        default=1 - DEFAULT_DELTA,
        help="how sure the false-alarm promise is: P(this model's rate <= target) "
        f"(default {1 - DEFAULT_DELTA:g})",
    )


def configs_from_args(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig]:
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
        alignment=Alignment(train_setting(args, "alignment")),
        reference=ReferenceMode(train_setting(args, "reference")),
        reference_k=int(train_setting(args, "reference_k")),
        retrieval_window=int(train_setting(args, "retrieval_window")),
        retrieval_features=RetrievalFeatures(train_setting(args, "retrieval_features")),
        score_region=ScoreRegion(train_setting(args, "score_region")),
    )
    val_fraction = train_setting(args, "val_fraction")
    train_config = TrainConfig(
        epochs=int(train_setting(args, "epochs")),
        batch_size=args.batch_size,
        lr=float(train_setting(args, "lr")),
        seed=args.seed,
        val_fraction=None if val_fraction == "auto" else float(val_fraction),
        choice_fraction=args.choice_fraction,
        device=Device(args.device),
        precision=Precision(args.precision),
        lean_attention=args.lean_attention,
        micro_batch_size=args.micro_batch_size,
    )
    return model_config, train_config


def recipe_space_from_args(args: argparse.Namespace) -> RecipeSpace | None:
    """With ``--preset auto``, the parts of the recipe the user fixed with their flags."""
    from fod_core.recipe import RecipeSpace

    if not train_setting(args, "auto_recipe"):
        return None
    names = (
        "alignment",
        "reference",
        "reference_k",
        "retrieval_window",
        "retrieval_features",
        "planting",
        "score_region",
    )
    return RecipeSpace.from_flags(**{name: getattr(args, name, None) for name in names})
