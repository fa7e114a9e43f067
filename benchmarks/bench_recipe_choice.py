"""What `fod train --preset auto` would choose for a product, without training it.

Runs the first steps of `fod train` as they are (the same flags, the validation fraction, the
split into training, choice and calibration images, the feature cache, `choose_recipe`) and
stops before training. No test image is read and no label is used: this is how a change to
the candidates is looked at across products in a minute or two instead of half an hour a
product, before any product is trained again.

    python benchmarks/bench_recipe_choice.py --data ../shared/data/mvtec_ad --category bottle \
        --out benchmarks/results/recipe_choice_bottle.json [any `fod train` flag]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from fod_core.cache import LocalStore
from fod_core.cli import build_parser
from fod_core.cli_train import configs_from_args, recipe_space_from_args
from fod_core.data import load_category
from fod_core.retrieval import describe_window
from fod_core.roofline import machine
from fod_core.train import auto_recipe_choice, default_cache_dir, training_split
from fod_core.trainer import resolve_device


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    out = None
    if "--out" in argv:
        at = argv.index("--out")
        out = Path(argv[at + 1])
        del argv[at : at + 2]
    args = build_parser().parse_args(["train", *argv, "--out", "unused"])
    model_config, train_config = configs_from_args(args)
    space = recipe_space_from_args(args)
    if space is None:
        raise SystemExit("the recipe is chosen with --preset auto only")
    data = load_category(args.data, args.category, args.format)
    train_config, split = training_split(
        data.train, train_config, args.target_far, 1 - args.confidence
    )
    train_records, choice_records = split.train, split.choice
    calibration_records = split.calibration
    store = LocalStore(args.cache_dir) if args.cache_dir else LocalStore(default_cache_dir())
    started = time.perf_counter()
    choice = auto_recipe_choice(
        store,
        model_config,
        train_records,
        choice_records,
        resolve_device(train_config.device),
        not args.quiet,
        space,
    )
    seconds = time.perf_counter() - started
    region = choice.score_region
    rows = sorted(
        (c for c in choice.candidates if c["score_region"] == region),
        key=lambda c: (-c["planted_caught_above_normals"], -c["planted_image_auroc"]),
    )
    print(f"{args.category}: {choice.describe()}  ({seconds:.0f} s)")
    print(
        f"{'alignment':>15} {'features':>8} {'K':>3} {'window':>12}  caught above normals  "
        "planted AUROC"
    )
    for c in rows[:12]:
        print(
            f"{c['alignment']:>15} {c['features']:>8} {c['k']:>3} "
            f"{describe_window(c['window']):>12}  "
            f"{c['planted_caught_above_normals']:>20.4f}  {c['planted_image_auroc']:>13.4f}"
        )
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "command": "python benchmarks/bench_recipe_choice.py " + " ".join(sys.argv[1:]),
            "machine": machine().describe(),
            "splits": {
                "train": len(train_records),
                "choice": len(choice_records),
                "calibration": len(calibration_records),
            },
            "seconds": round(seconds, 1),
            "choice": choice.to_dict(),
        }
        out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
