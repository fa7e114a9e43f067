"""What pose normalisation changes before any training: how far the backbone's features
of each test image are from the class reference, with and without ``--alignment``.

    python benchmarks/bench_alignment.py --data ../shared/data/screw_512 --category screw \
        --out benchmarks/results/alignment_screw.json

Per level, three label-free scores of a test image (the max over its positions), each
judged by image AUROC on the test labels (for the record: nothing here chooses):
- ``mean_ref``: squared distance to the per-position mean of the normal features, the
  method's class reference (FOD's inter branch compares against it);
- ``gauss``: the same, per channel in units of the per-position standard deviation;
- ``knn``: distance to the nearest feature anywhere in the normal images (PatchCore's
  score without its coreset): an anchor that needs no alignment;
- ``mean_of_K_nearest``: as ``mean_ref``, but the reference is the mean of the K normal
  images nearest to this one (whole-map distance) instead of the mean of all of them.
Also: how many images had a clear axis (a pose).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from fod_core.backbone import BackboneSpec, FeatureExtractor
from fod_core.data import load_category
from fod_core.metrics import image_auroc
from fod_core.processing import Alignment, PreProcessing, read_image
from fod_core.roofline import machine
from fod_core.runtime import configure_cpu_numerics


@torch.no_grad()
def pooled_features(extractor, pre, records, batch: int = 16):
    """[(N, C, H, W) per level] of the pooled features FOD tokenises, and the pose count."""
    levels, poses = None, 0
    for start in range(0, len(records), batch):
        inputs = []
        for record in records[start : start + batch]:
            tensor, pose = pre.transform(read_image(record.path))
            inputs.append(tensor)
            poses += pose is not None
        maps = extractor(torch.stack(inputs))  # pooled as FOD's tokens are
        if levels is None:
            levels = [[] for _ in maps]
        for parts, level_map in zip(levels, maps, strict=True):
            parts.append(level_map)
    return [torch.cat(parts) for parts in levels], poses


NEAREST = (1, 5, 20)


def nearest_feature_distance(
    query: torch.Tensor, bank: torch.Tensor, chunk: int = 1 << 16
) -> float:
    """Max over the query's positions of the distance to the nearest bank feature, the bank
    taken in chunks (at 512 px the whole distance matrix would not fit in memory)."""
    best = torch.full((len(query),), float("inf"))
    for start in range(0, len(bank), chunk):
        best = torch.minimum(best, torch.cdist(query, bank[start : start + chunk]).min(1).values)
    return best.max().item()


def scores(train: torch.Tensor, test: torch.Tensor, knn: bool = True) -> dict[str, np.ndarray]:
    mean, std = train.mean(0, keepdim=True), train.std(0, keepdim=True) + 1e-3
    channels = train.shape[1]
    bank = train.permute(0, 2, 3, 1).reshape(-1, channels)
    queries = test.permute(0, 2, 3, 1).reshape(len(test), -1, channels)
    nearest_feature = [nearest_feature_distance(q, bank) for q in queries] if knn else None
    # A reference per image: the mean of the k normal images nearest to it (whole-map
    # distance), compared position by position as the class reference is.
    flat = train.flatten(2)  # (N, C, L)
    nearest: dict[str, list[float]] = {f"mean_of_{k}_nearest": [] for k in NEAREST}
    for image in test.flatten(2):
        per_position = ((flat - image[None]) ** 2).sum(1)  # (N, L)
        order = per_position.sum(1).argsort()
        for k in NEAREST:
            reference = flat[order[:k]].mean(0)
            nearest[f"mean_of_{k}_nearest"].append(((image - reference) ** 2).sum(0).max().item())
    return (
        {
            "mean_ref": ((test - mean) ** 2).sum(1).flatten(1).max(1).values.numpy(),
            "gauss": (((test - mean) / std) ** 2).mean(1).flatten(1).max(1).values.numpy(),
        }
        | ({"knn": np.asarray(nearest_feature)} if knn else {})
        | {name: np.asarray(values) for name, values in nearest.items()}
    )


def main() -> None:
    configure_cpu_numerics()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--category", required=True)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--out-indices", default="2,3", help="backbone stages (FOD's levels)")
    parser.add_argument(
        "--alignments",
        default=",".join(a.value for a in Alignment),
        help="which pose normalisations to measure (comma-separated)",
    )
    parser.add_argument(
        "--skip-knn", action="store_true", help="no nearest-feature score (slow at 512 px)"
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    data = load_category(args.data, args.category)
    labels = np.array([r.label for r in data.test])
    stages = tuple(int(i) for i in args.out_indices.split(","))
    spec = BackboneSpec(name=args.backbone, out_indices=stages)
    extractor = FeatureExtractor(spec=spec).eval()
    where = machine(torch.device("cpu"))
    report = {
        "command": "python benchmarks/bench_alignment.py "
        f"--data {args.data} --category {args.category} --backbone {args.backbone} "
        f"--image-size {args.image_size} --out-indices {args.out_indices} "
        f"--alignments {args.alignments}{' --skip-knn' if args.skip_knn else ''} "
        f"--out {args.out}",
        "machine": {"name": where.name, "isa": list(where.isa)},
        "test": {"normal": int((labels == 0).sum()), "anomalous": int(labels.sum())},
    }
    for alignment in [Alignment(a) for a in args.alignments.split(",")]:
        started = time.perf_counter()
        pre = PreProcessing(args.image_size, extractor.mean, extractor.std, alignment)
        train, train_poses = pooled_features(extractor, pre, data.train)
        test, test_poses = pooled_features(extractor, pre, data.test)
        result = {"posed_images": {"train": train_poses, "test": test_poses}}
        for level, (a, b) in enumerate(zip(train, test, strict=True), start=1):
            for name, values in scores(a, b, knn=not args.skip_knn).items():
                result[f"L{level} {name}"] = round(image_auroc(labels, values), 4)
        result["seconds"] = round(time.perf_counter() - started, 1)
        report[alignment.value] = result
        print(alignment.value, json.dumps(result), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
