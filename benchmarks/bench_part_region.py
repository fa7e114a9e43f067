"""Where the normals' tail comes from: the image score over the whole picture against the
score over the part alone (issue 31; the finding behind ``ScoreRegion.PART``, which is this
script's grow 4 at 256 px: ``fod_core.processing.part_region``).

    python benchmarks/bench_part_region.py --data ../shared/data/screw_512 --category screw \
        --alignment principal_axis --k 10 --window 5 --val-fractions 0.1,0.2 \
        --out benchmarks/results/part_region_screw.json

Training-free, the retrieval distance alone (what `--preset auto` scores screw with: its
branch weights are (0, 0, 1)): the bank is the training part of ``split_validation`` at
each validation fraction, the threshold is ``calibrate_threshold`` on the calibration part
(``split_roles``) for ``--target``, and the test set is scored once per variant. ``grow``
None is the shipped image score (the largest value of the smoothed map anywhere); a
number is the largest value within the part (``part_pixels`` of the aligned picture,
specks opened away) grown by that many pixels. The top calibration normals are listed with
where their map peaks.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fod_core.cache import FeatureCache, LocalStore
from fod_core.calibration import calibrate_threshold
from fod_core.config import ModelConfig, TrainConfig
from fod_core.data import load_category, split_roles, split_validation
from fod_core.metrics import image_auroc
from fod_core.processing import Alignment, PostProcessing, gaussian_blur, part_pixels, read_image
from fod_core.retrieval import window_min_distance
from fod_core.roofline import machine


def part_region(image: torch.Tensor, pre, grow: int) -> torch.Tensor:
    """(3, S, S) normalised image -> boolean (S, S): the part, specks opened away, grown."""
    mean = torch.tensor(pre.mean)[:, None, None]
    std = torch.tensor(pre.std)[:, None, None]
    part = part_pixels((image * std + mean).mean(0))
    if part is None:
        return torch.ones(image.shape[-2:], dtype=torch.bool)
    mask = part.float()[None, None]
    mask = F.max_pool2d(-F.max_pool2d(-mask, 5, 1, 2), 5, 1, 2)  # opening
    return F.max_pool2d(mask, 2 * grow + 1, 1, grow)[0, 0] > 0


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True)
    parser.add_argument("--category", required=True)
    parser.add_argument("--format", default="mvtec")
    parser.add_argument("--alignment", default="none")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--window", type=int, default=5)
    parser.add_argument("--val-fractions", default="0.1,0.2")
    parser.add_argument("--grow", default="none,4,8", help="pixels; none: the whole picture")
    parser.add_argument("--target", type=float, default=0.05)
    parser.add_argument("--cache-dir", default="runs/cache")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    model, choice_fraction = ModelConfig(), TrainConfig().choice_fraction
    data = load_category(args.data, args.category, args.format)
    cache = FeatureCache.for_backbone(
        LocalStore(args.cache_dir), model.backbone, model.image_size, Alignment(args.alignment)
    )
    features, _ = cache.features(data.train, device=torch.device("cpu"), progress=True)
    finer = features[0].float().cpu()
    index = {r.path: i for i, r in enumerate(data.train)}
    pre, post = cache.pre, PostProcessing(model.image_size, model.score_sigma)
    test_images = [pre(read_image(r.path)) for r in data.test]
    test_features = torch.cat(
        [
            cache.extractor(torch.stack(test_images[s : s + 8]))[0].float()
            for s in range(0, len(test_images), 8)
        ]
    )
    labels = np.array([r.label for r in data.test])
    grows = [None if g == "none" else int(g) for g in args.grow.split(",")]

    def smoothed_maps(bank: torch.Tensor, queries: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for query in queries:
            order = ((bank.flatten(1) - query.flatten()[None]) ** 2).sum(1).argsort()[: args.k]
            grid = window_min_distance(query[None], bank[order][None], args.window)
            maps.append(gaussian_blur(post.anomaly_map([grid]), post.score_sigma)[0])
        return maps

    def scores(maps, images, grow):
        if grow is None:
            return np.array([float(m.max()) for m in maps])
        return np.array(
            [float(m[part_region(x, pre, grow)].max()) for m, x in zip(maps, images, strict=True)]
        )

    rows, tails = [], {}
    for fraction in [float(v) for v in args.val_fractions.split(",")]:
        train, validation = split_validation(data.train, fraction)
        _, calibration = split_roles(validation, choice_fraction)
        bank = finer[[index[r.path] for r in train]]
        cal_maps = smoothed_maps(bank, finer[[index[r.path] for r in calibration]])
        cal_images = [pre(read_image(r.path)) for r in calibration]
        test_maps = smoothed_maps(bank, test_features)
        whole = scores(cal_maps, cal_images, None)
        tails[fraction] = [
            {
                "image": calibration[i].path.name,
                "score": round(float(whole[i]), 2),
                "peak_yx": [
                    int(v) for v in np.unravel_index(int(cal_maps[i].argmax()), cal_maps[i].shape)
                ],
                "peak_on_part": bool(
                    part_region(cal_images[i], pre, 4).flatten()[int(cal_maps[i].argmax())]
                ),
            }
            for i in np.argsort(whole)[::-1][:5]
        ]
        for grow in grows:
            cal, test = scores(cal_maps, cal_images, grow), scores(test_maps, test_images, grow)
            threshold = calibrate_threshold(cal, target_false_alarm_rate=args.target)
            alarm = test > threshold.value
            n_defects, n_normal = int((labels == 1).sum()), int((labels == 0).sum())
            row = {
                "val_fraction": fraction,
                "train": len(train),
                "calibration_normals": len(calibration),
                "grow": grow,
                "image_auroc": round(image_auroc(labels, test), 4),
                "promise": round(threshold.guaranteed_false_alarm_rate, 4),
                "caught": f"{int(alarm[labels == 1].sum())}/{n_defects}",
                "false_alarms": f"{int(alarm[labels == 0].sum())}/{n_normal}",
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = {
        "command": "python benchmarks/bench_part_region.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "machine": machine("cpu").describe(),
        "rows": rows,
        "top_calibration_normals": tails,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
