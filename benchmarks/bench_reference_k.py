"""How many nearest normals make a reference, chosen without test labels (issue 13).

    python benchmarks/bench_reference_k.py --data ../shared/data/screw_512 --category screw \
        --alignment principal_axis --planting part \
        --out benchmarks/results/reference_k_screw.json

Before any training: each image's reference is the mean of the K training normals nearest
to it (finer level, whole-map distance, as ``--reference nearest`` retrieves), and its
score the largest squared distance of a position to that reference. K is judged by the
image AUROC of the **validation normals against copies of them with planted anomalies**
(``--planting``), which needs no label; the test set's AUROC per K is printed beside it
for the record only. ``--bank-rotations N`` adds N-1 turned copies of every training image
to the bank (augmentation by rotation, the alternative to ``--alignment``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch

from fod_core.backbone import BackboneSpec, FeatureExtractor
from fod_core.data import load_category, split_validation
from fod_core.metrics import image_auroc
from fod_core.processing import Alignment, PreProcessing, read_image
from fod_core.roofline import machine
from fod_core.runtime import configure_cpu_numerics
from fod_core.synthetic import PLANTED_SEED, Planting, planted_copies

CANDIDATES = (1, 3, 5, 10, 20)


@torch.no_grad()
def finer_level(extractor, pre, images, batch: int = 16) -> torch.Tensor:
    """(N, C, H, W) pooled features of the finer level for images (paths or PIL)."""
    parts = []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        inputs = [
            pre.transform(i if not isinstance(i, str | Path) else read_image(i))[0] for i in chunk
        ]
        parts.append(extractor(torch.stack(inputs))[0])
    return torch.cat(parts)


def turned(paths: list[Path], copies: int) -> list:
    """The images (as paths), and for copies > 1 each also turned by 360/copies steps, the
    corners filled with the photo's border grey."""
    if copies <= 1:
        return [str(p) for p in paths]
    images = []
    for path in paths:
        image = read_image(path)
        array = np.asarray(image)
        border = np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]])
        fill = tuple(int(v) for v in np.median(border, axis=0))
        images += [image.rotate(360 * i / copies, fillcolor=fill) for i in range(copies)]
    return images


def nearest_scores(bank: torch.Tensor, queries: torch.Tensor, ks=CANDIDATES) -> dict:
    """Per K: each query's largest per-position squared distance to its K-nearest mean."""
    flat = bank.flatten(2)  # (M, C, L)
    scores: dict[int, list[float]] = {k: [] for k in ks}
    for image in queries.flatten(2):
        order = ((flat - image[None]) ** 2).sum((1, 2)).argsort()
        for k in ks:
            reference = flat[order[:k]].mean(0)
            scores[k].append(((image - reference) ** 2).sum(0).max().item())
    return {k: np.asarray(v) for k, v in scores.items()}


def main() -> None:
    configure_cpu_numerics()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--category", required=True)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument(
        "--alignment", default="principal_axis", choices=[a.value for a in Alignment]
    )
    parser.add_argument("--planting", default="part", choices=[p.value for p in Planting])
    parser.add_argument("--per-image", type=int, default=3, help="planted copies per normal")
    parser.add_argument(
        "--bank-rotations", type=int, default=1, help="copies of each training image, turned"
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    data = load_category(args.data, args.category)
    train, validation = split_validation(data.train, 0.1)
    extractor = FeatureExtractor(spec=BackboneSpec(name=args.backbone)).eval()
    pre = PreProcessing(args.image_size, extractor.mean, extractor.std, Alignment(args.alignment))
    normals, draws = planted_copies(
        [r.path for r in validation],
        per_image=args.per_image,
        seed=PLANTED_SEED,
        planting=Planting(args.planting),
    )
    planted = [image for image, _ in draws]
    bank = finer_level(extractor, pre, turned([r.path for r in train], args.bank_rotations))
    label_free = nearest_scores(bank, finer_level(extractor, pre, normals + planted))
    planted_labels = np.r_[np.zeros(len(normals)), np.ones(len(planted))]
    test = nearest_scores(bank, finer_level(extractor, pre, [str(r.path) for r in data.test]))
    test_labels = np.array([r.label for r in data.test])
    rows = {
        k: {
            "planted_image_auroc": round(image_auroc(planted_labels, label_free[k]), 4),
            "test_image_auroc_record_only": round(image_auroc(test_labels, test[k]), 4),
        }
        for k in CANDIDATES
    }
    chosen = max(CANDIDATES, key=lambda k: (rows[k]["planted_image_auroc"], -abs(k - 5)))
    where = machine(torch.device("cpu"))
    report = {
        "command": "python benchmarks/bench_reference_k.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "machine": {"name": where.name, "isa": list(where.isa)},
        "bank": len(bank),
        "validation_normals": len(normals),
        "planted": len(planted),
        "test": {"normal": int((test_labels == 0).sum()), "anomalous": int(test_labels.sum())},
        "by_k": rows,
        "chosen_on_planted": chosen,
    }
    print(json.dumps(report, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
