"""``fod data``: what the data holds, as the model will see it. ``fod data splits`` prints
each image's split, by identity (its path relative to the category folder), so a user can
see what a model trains, chooses, calibrates and is tested on, and that adding images
moves none of the others."""

from __future__ import annotations

import argparse
import json

from fod_core.config import TrainConfig
from fod_core.data import DatasetFormat, describe_splits, load_category


def fraction_or_auto(text: str) -> float | str:
    """``--val-fraction``'s value: a number, or auto."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a fraction or auto, not {text!r}") from None


def cmd_splits(args: argparse.Namespace) -> int:
    data = load_category(args.data, args.category, args.format)
    if args.val_fraction == "auto":  # as `fod train --val-fraction auto` resolves it
        from fod_core.promise import DEFAULT_DELTA
        from fod_core.train import auto_val_fraction

        config = TrainConfig(val_fraction=None, choice_fraction=args.choice_fraction)
        args.val_fraction = auto_val_fraction(data.train, config, args.target_far, DEFAULT_DELTA)
    splits = describe_splits(data, args.val_fraction, args.choice_fraction)
    if args.json:
        print(json.dumps(splits, indent=2))
        return 0
    parts = {
        "train": splits["train"],
        "validation/choice": splits["validation"]["choice"],
        "validation/calibration": splits["validation"]["calibration"],
        "test_normal": splits["test_normal"],
        "test_anomalous": splits["test_anomalous"],
    }
    roles = {
        "train": "the model learns from these",
        "validation/choice": "best epoch, level weights and recipe are chosen on these",
        "validation/calibration": "the threshold alone is set on these (its promise)",
        "test_normal": "false alarms are measured on these",
        "test_anomalous": "catches are measured on these",
    }
    print(
        f"{data.name} ({data.format.value}, val_fraction {args.val_fraction:g}, "
        f"choice_fraction {args.choice_fraction:g})"
    )
    for name, images in parts.items():
        print(f"  {name:24s} {len(images):5d}  {roles[name]}")
    print("each image's split depends on its own path alone: adding images moves no other")
    return 0


def add_data_commands(sub: argparse._SubParsersAction) -> None:
    defaults = TrainConfig()
    data = sub.add_parser("data", help="the data as training sees it (fod data splits)")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    splits = data_sub.add_parser(
        "splits", help="each image's split: train, validation (choice, calibration), test"
    )
    splits.add_argument("--data", required=True, help="dataset root, the folder of <category>/")
    splits.add_argument("--category", required=True)
    splits.add_argument("--format", default="mvtec", choices=[f.value for f in DatasetFormat])
    splits.add_argument(
        "--val-fraction",
        type=fraction_or_auto,
        default=defaults.val_fraction,
        help="a fraction, or auto as `fod train --val-fraction auto` (for --target-far)",
    )
    splits.add_argument("--target-far", type=float, default=0.01, help="with auto")
    splits.add_argument("--choice-fraction", type=float, default=defaults.choice_fraction)
    splits.add_argument("--json", action="store_true", help="every image's relative path")
    splits.set_defaults(func=cmd_splits)
