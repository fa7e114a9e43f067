"""Does a larger retrieval bank help once every choice is made? A trained model's bank
(its training normals) grown by its choice images, the threshold set again on the same
calibration normals (never in the bank), the test set scored before and after.

    python benchmarks/bench_grown_bank.py --model runs/products/auto/bottle \
        --data ../shared/data/mvtec_ad --category bottle

The choice images chose the recipe, the epoch and the branch weights; added to the bank
after those choices, they change no choice, and the calibration normals stay unseen, so
the false-alarm promise would hold. This measures whether the idea is worth building.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from fod_core.artifact import load_detector, read_manifest
from fod_core.cache import FeatureCache, LocalStore
from fod_core.calibration import calibrate_threshold, model_split
from fod_core.config import ModelConfig
from fod_core.data import load_category
from fod_core.metrics import image_auroc
from fod_core.roofline import machine
from fod_core.train import default_cache_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--category", required=True)
    parser.add_argument("--format", default="mvtec")
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args()

    manifest = read_manifest(args.model)
    data = load_category(args.data, args.category, args.format)
    split = model_split(manifest, data)
    detector = load_detector(args.model)
    config = ModelConfig.from_dict(manifest["model"])
    store = LocalStore(args.cache_dir or default_cache_dir())
    cache = FeatureCache.for_backbone(
        store, config.backbone, config.image_size, detector.pre.alignment
    )
    labels = np.array([r.label for r in data.test])
    print(machine().describe())

    def report(bank: str) -> None:
        calibration = [p.score for p in detector.predict([r.path for r in split.calibration])]
        threshold = calibrate_threshold(calibration)
        scores = np.array([p.score for p in detector.predict([r.path for r in data.test])])
        print(
            f"bank {bank}: {detector.model.levels[0].bank.shape[0]} normals, test image AUROC "
            f"{image_auroc(labels, scores):.4f}, caught "
            f"{int((scores[labels == 1] >= threshold.value).sum())}/{int(labels.sum())}, "
            f"false alarms {int((scores[labels == 0] >= threshold.value).sum())}/"
            f"{int((labels == 0).sum())} ({threshold.describe()})",
            flush=True,
        )

    report("as trained")
    train, _ = cache.features(split.train, progress=False)
    choice, _ = cache.features(split.choice, progress=False)
    detector.model.fit_references([torch.cat([t, c]) for t, c in zip(train, choice, strict=True)])
    report("grown by the choice images")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
