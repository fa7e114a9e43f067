"""The map and the image score weighted apart, on a trained model: what a second retrieval
branch on every level's local features would add, before the product is changed.

    python benchmarks/bench_image_weights.py --model runs/products/auto/bottle \
        --data ../shared/data/mvtec_ad --category bottle \
        --out benchmarks/results/image_weights_bottle.json

The model's branches (FOD's levels, its retrieval branch) plus the retrieval distance on
every level's local features (``RetrievalFeatures.LOCAL``, same K and window) are scored on
the choice images and their planted copies, as training weights the levels
(``fod_core.level_weights``). The map's weights are chosen as training chooses them
(planted AUPRO); the image score's weights by the recipe's image evidence (planted copies
above every clean choice image, then planted image AUROC). The test labels are read only
for the report, never by a choice.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch

from fod_core.artifact import load_detector, read_manifest
from fod_core.calibration import model_split
from fod_core.data import load_category
from fod_core.level_weights import (
    branch_step,
    choose_level_weights,
    typical_maxima,
    weight_grid,
)
from fod_core.metrics import aupro, image_auroc, pixel_auroc
from fod_core.processing import PostProcessing, read_mask, resize_mask
from fod_core.recipe import caught_above_normals
from fod_core.retrieval import RetrievalFeatures
from fod_core.roofline import machine
from fod_core.synthetic import Planting, planted_copies


def branch_maps(detector, images, batch_size: int = 8) -> list[np.ndarray]:
    """Per branch (the model's, then the local retrieval distance) the maps at the input
    size, in the photos' frame."""
    model = detector.model
    if model.retrieval_branches != (RetrievalFeatures.FINER,):
        raise SystemExit(
            "this compares a model with the finer retrieval branch alone against the same "
            f"model with a local one added; this model has {model.retrieval_branches}"
        )
    per_branch: list[list[np.ndarray]] = []
    for start in range(0, len(images), batch_size):
        batch, poses = detector.preprocess(images[start : start + batch_size])
        with torch.no_grad():
            features = detector.extractor(batch.to(detector.device))
            grids = model.score_maps(features)
            grids.append(model.retrieval_map(features, kind=RetrievalFeatures.LOCAL))
        for index, grid in enumerate(detector.post.upsample(grids)):
            if index == len(per_branch):
                per_branch.append([])
            per_branch[index].append(detector.post.to_input_frame(grid.cpu(), poses).numpy())
    return [np.concatenate(maps) for maps in per_branch]


def image_scores(maps, weights, scales, size, sigma) -> np.ndarray:
    post = PostProcessing(size, sigma, level_weights=tuple(weights), branch_scales=scales)
    combined = post.combine([torch.as_tensor(m) for m in maps])
    return post.image_score(combined).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--category", required=True)
    parser.add_argument("--format", default="mvtec")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    manifest = read_manifest(args.model)
    detector = load_detector(args.model)
    data = load_category(args.data, args.category, args.format)
    split = model_split(manifest, data)
    size, sigma = detector.pre.image_size, detector.post.score_sigma
    seed = manifest["training"]["config"].get("seed", 0)
    normals, draws = planted_copies(
        [r.path for r in split.choice][:64],
        [r.path for r in split.train],
        per_image=3,
        seed=seed,
        planting=Planting(manifest.get("planting", "anywhere")),
    )
    draws = list(draws)  # drawn lazily; used for the images and for their masks
    samples = list(itertools.chain(normals, (image for image, _ in draws)))
    masks = np.stack(
        [np.zeros((size, size), bool)] * len(normals)
        + [resize_mask(mask, size) > 0 for _, mask in draws]
    )
    maps = branch_maps(detector, samples)
    labels = np.r_[np.zeros(len(normals)), np.ones(len(draws))]
    scales = typical_maxima(maps, labels == 0)

    test = data.test
    test_labels = np.array([r.label for r in test])
    test_maps = branch_maps(detector, [r.path for r in test])
    with_masks = [r for r in test if r.mask_path]
    test_masks = None
    if with_masks and len(with_masks) == int(test_labels.sum()):
        test_masks = np.stack(
            [
                read_mask(r.mask_path, size) > 0 if r.mask_path else np.zeros((size, size), bool)
                for r in test
            ]
        )

    n_model = len(maps) - 1
    names = [f"fod_level_{i}" for i in range(n_model - 1)] + ["retrieval_finer", "retrieval_local"]
    report = {"branches": names, "shipped_weights": manifest["postprocessing"]["level_weights"]}

    def test_row(map_weights, score_weights, used) -> dict:
        used_scales = tuple(scales[i] for i in used)
        chosen = [test_maps[i] for i in used]
        row = {
            "test_image_auroc": round(
                image_auroc(
                    test_labels, image_scores(chosen, score_weights, used_scales, size, sigma)
                ),
                4,
            )
        }
        if test_masks is not None:
            post = PostProcessing(
                size, sigma, level_weights=tuple(map_weights), branch_scales=used_scales
            )
            combined = post.combine([torch.as_tensor(m) for m in chosen]).numpy()
            row["test_pixel_auroc"] = round(pixel_auroc(test_masks, combined), 4)
            row["test_aupro"] = round(aupro(test_masks, combined), 4)
        return row

    for label, used in (("model", list(range(n_model))), ("with_local", list(range(n_model + 1)))):
        used_maps = [maps[i] for i in used]
        used_scales = tuple(scales[i] for i in used)
        step = branch_step(len(used))
        mapped = choose_level_weights(used_maps, masks, step=step, scales=used_scales)
        rows = []
        for weights in weight_grid(len(used), step):
            scores = image_scores(used_maps, weights, used_scales, size, sigma)
            rows.append(
                {
                    "weights": list(weights),
                    "planted_caught_above_normals": round(caught_above_normals(labels, scores), 4),
                    "planted_image_auroc": round(image_auroc(labels, scores), 4),
                }
            )
        closeness = {
            tuple(r["weights"]): -sum(
                abs(a - b) for a, b in zip(r["weights"], mapped.weights, strict=True)
            )
            for r in rows
        }
        best = max(
            rows,
            key=lambda r: (
                r["planted_caught_above_normals"],
                r["planted_image_auroc"],
                closeness[tuple(r["weights"])],
            ),
        )
        same = next(r for r in rows if tuple(r["weights"]) == tuple(mapped.weights))
        report[label] = {
            "map_weights": list(mapped.weights),
            "map_weights_evidence": same,
            "map_weights_test": test_row(mapped.weights, mapped.weights, used),
            "image_weights": best,
            "image_weights_test": test_row(mapped.weights, best["weights"], used),
        }
        print(label, json.dumps(report[label]), flush=True)
    # each branch alone, for the record (a diagnostic, not a choice)
    report["each_branch_alone_test_image_auroc"] = {
        name: round(
            image_auroc(test_labels, image_scores([test_maps[i]], (1.0,), (1.0,), size, sigma)), 4
        )
        for i, name in enumerate(names)
    }
    print(report["each_branch_alone_test_image_auroc"])
    if args.out:
        report = {
            "command": "python benchmarks/bench_image_weights.py " + " ".join(sys.argv[1:]),
            "machine": machine().describe(),
            "n_choice_images": len(normals),
            "n_planted": len(draws),
            "n_test": len(test),
        } | report
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
