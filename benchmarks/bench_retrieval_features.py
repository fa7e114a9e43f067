"""The retrieval branch alone, training-free, on a trained model's own split: what each
retrieval-features x K x window candidate scores, label-free and on the test labels.

    python benchmarks/bench_retrieval_features.py --model runs/products/auto/bottle \
        --data ../shared/data/mvtec_ad --category bottle \
        --out benchmarks/results/retrieval_features_bottle.json

Per candidate: the label-free evidence `--preset auto` ranks by (planted copies of the
choice images above every normal, planted image AUROC; the clean choice images and 50
training normals left out of the bank in turn: ``fod_core.recipe``), and, for the record,
the test set's image AUROC of the branch alone. The test column is a diagnostic of the
candidates, never an input to a choice: the product chooses on the first two columns only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fod_core.artifact import read_manifest
from fod_core.cache import FeatureCache, LocalStore
from fod_core.calibration import model_split
from fod_core.config import ModelConfig
from fod_core.data import load_category
from fod_core.metrics import image_auroc
from fod_core.processing import PostProcessing
from fod_core.recipe import (
    _levels_and_regions,
    _tail_index,
    candidate_scores,
    caught_above_normals,
    leave_one_out_scores,
)
from fod_core.retrieval import RetrievalFeatures, describe_window, retrieval_features
from fod_core.roofline import machine
from fod_core.synthetic import PLANTED_SEED, Planting, planted_copies
from fod_core.train import default_cache_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="a trained model's folder (its split)")
    parser.add_argument("--data", required=True)
    parser.add_argument("--category", required=True)
    parser.add_argument("--format", default="mvtec")
    parser.add_argument("--ks", type=int, nargs="+", default=[5, 20])
    parser.add_argument("--windows", type=int, nargs="+", default=[1, 3, -1])
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    manifest = read_manifest(args.model)
    data = load_category(args.data, args.category, args.format)
    split = model_split(manifest, data)
    config = ModelConfig.from_dict(manifest["model"])
    alignment = manifest["preprocessing"].get("alignment", "none")
    store = LocalStore(args.cache_dir or default_cache_dir())
    cache = FeatureCache.for_backbone(store, config.backbone, config.image_size, alignment)
    post = PostProcessing(config.image_size, config.score_sigma)
    planting = Planting(manifest.get("planting", "anywhere"))

    bank_levels = [level.float() for level in cache.features(split.train, progress=False)[0]]
    normals, draws = planted_copies(
        [r.path for r in split.choice], per_image=3, seed=PLANTED_SEED, planting=planting
    )
    planted = [image for image, _ in draws]
    query_levels, _ = _levels_and_regions(
        cache.extractor, cache.pre, list(normals) + planted, regions=False
    )
    test_levels, _ = _levels_and_regions(
        cache.extractor, cache.pre, [r.path for r in data.test], regions=False
    )
    test_labels = np.array([r.label for r in data.test])
    tail = _tail_index(len(bank_levels[0]), split.train)
    rows = []
    for kind in RetrievalFeatures:
        started = time.perf_counter()
        bank = retrieval_features(bank_levels, kind)
        finer = bank_levels[0]
        choice = candidate_scores(
            bank,
            retrieval_features(query_levels, kind),
            args.ks,
            args.windows,
            post,
            finer=(finer, query_levels[0]),
        )
        left_out = leave_one_out_scores(bank, tail, args.ks, args.windows, post, finer=finer)
        test = candidate_scores(
            bank,
            retrieval_features(test_levels, kind),
            args.ks,
            args.windows,
            post,
            finer=(finer, test_levels[0]),
        )
        for key, values in choice.items():
            k, window, _ = key
            clean = np.r_[values[: len(normals)], left_out[key]]
            labels = np.r_[np.zeros(len(clean)), np.ones(len(planted))]
            ranked = np.r_[clean, values[len(normals) :]]
            rows.append(
                {
                    "features": kind.value,
                    "k": k,
                    "window": window,
                    "planted_caught_above_normals": round(caught_above_normals(labels, ranked), 4),
                    "planted_image_auroc": round(image_auroc(labels, ranked), 4),
                    "test_image_auroc": round(image_auroc(test_labels, test[key]), 4),
                }
            )
            print(
                f"{kind.value:>6} K {k:>3} {describe_window(window):>12}  planted above normals "
                f"{rows[-1]['planted_caught_above_normals']:.4f}  planted AUROC "
                f"{rows[-1]['planted_image_auroc']:.4f}  | test AUROC "
                f"{rows[-1]['test_image_auroc']:.4f}",
                flush=True,
            )
        print(f"{kind.value}: {time.perf_counter() - started:.0f} s", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "command": "python benchmarks/bench_retrieval_features.py " + " ".join(sys.argv[1:]),
            "machine": machine().describe(),
            "splits": {
                "train": len(split.train),
                "choice": len(split.choice),
                "tail_normals": len(tail),
                "test": len(data.test),
            },
            "rows": rows,
        }
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
