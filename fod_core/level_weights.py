"""Level weights: how the levels' maps (and a retrieval branch) are weighted into one
anomaly map, chosen after training on anomalies planted into the validation's choice
part, so the choice needs no labels (``--level-weights synthetic``)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fod_core.metrics import aupro, pixel_auroc
from fod_core.synthetic import Planting

if TYPE_CHECKING:
    from fod_core.inference import AnomalyDetector

log = logging.getLogger(__name__)


class LevelWeighting(str, Enum):
    """How the levels' maps are combined into the anomaly map."""

    EQUAL = "equal"  # the method: the plain average
    SYNTHETIC = "synthetic"  # weights with the best AUPRO on anomalies planted in validation


@dataclass(frozen=True)
class LevelWeightChoice:
    weights: tuple[float, ...]
    n_normal: int
    n_anomalous: int
    criterion: str = "aupro on synthetic anomalies, then pixel auroc"
    candidates: list[dict] = field(default_factory=list)
    scales: tuple[float, ...] | None = None  # PostProcessing.branch_scales, if any

    def to_dict(self) -> dict:
        data = asdict(self) | {"weights": list(self.weights)}
        if self.scales is None:
            del data["scales"]
        else:
            data["scales"] = list(self.scales)
        return data

    def save_plot(self, path: Path) -> None:
        """The metrics against the finer level's weight (two branches), else the best
        weightings ranked."""
        from fod_core.visualize import plot_branch_weights, plot_level_weights

        if not self.candidates:
            return
        if len(self.weights) == 2:
            plot_level_weights(self.candidates, path)
        else:
            plot_branch_weights(self.candidates, self.weights, path)


def weight_grid(n_levels: int, step: float = 0.1) -> list[tuple[float, ...]]:
    """Every weight vector on the simplex whose entries are multiples of ``step``."""
    parts = round(1 / step)
    grid = []
    for counts in itertools.product(range(parts + 1), repeat=n_levels - 1):
        if sum(counts) <= parts:
            grid.append(tuple(c / parts for c in (*counts, parts - sum(counts))))
    return grid


def branch_step(n_branches: int) -> float:
    """The weight grid's step: 0.1 for two levels (11 candidates), 0.2 with a third
    branch (21 candidates; 0.1 would be 66, each an AUPRO over every image) or a fourth
    (56)."""
    return 0.1 if n_branches <= 2 else 0.2


def typical_maxima(level_maps: Sequence[np.ndarray], normal: np.ndarray) -> tuple[float, ...]:
    """Per branch, the mean over the ``normal`` images of each map's maximum: the scale
    that puts every branch near 1 on a normal image (``PostProcessing.branch_scales``)."""
    scales = []
    for maps in level_maps:
        peak = float(np.asarray(maps)[normal].reshape(int(normal.sum()), -1).max(1).mean())
        scales.append(peak if peak > 0 else 1.0)
    return tuple(scales)


def choose_level_weights(
    level_maps: Sequence[np.ndarray],
    masks: np.ndarray,
    *,
    step: float = 0.1,
    scales: Sequence[float] | None = None,
) -> LevelWeightChoice:
    """The weights (on a ``step`` grid) whose combined map has the best AUPRO, ties broken
    by pixel AUROC, then by closeness to the method's equal weights, over images with known
    anomaly ``masks`` (N, S, S). ``scales``: each branch's map is divided by its own first."""
    import torch

    from fod_core.processing import PostProcessing

    masks = np.asarray(masks).astype(bool)
    if not masks.any() or masks.all():
        raise ValueError("level weights need images with both normal and anomalous pixels")
    maps = [torch.as_tensor(np.asarray(m)) for m in level_maps]
    scales = tuple(float(s) for s in scales) if scales is not None else None
    candidates = []
    for weights in weight_grid(len(level_maps), step):
        # combined as the detector combines them (PostProcessing.combine)
        post = PostProcessing(masks.shape[-1], level_weights=weights, branch_scales=scales)
        combined = post.combine(maps).numpy()
        candidates.append(
            {
                "weights": list(weights),
                "aupro": aupro(masks, combined),
                "pixel_auroc": pixel_auroc(masks, combined),
            }
        )
    equal = 1 / len(level_maps)

    def rank(candidate: dict) -> tuple:
        closeness = -sum(abs(w - equal) for w in candidate["weights"])
        return candidate["aupro"], candidate["pixel_auroc"], closeness

    best = max(candidates, key=rank)
    n_anomalous = int(masks.any(axis=(1, 2)).sum())
    return LevelWeightChoice(
        tuple(best["weights"]),
        len(masks) - n_anomalous,
        n_anomalous,
        candidates=candidates,
        scales=scales,
    )


def synthetic_level_weights(
    detector: AnomalyDetector,
    normal_images: Sequence[str | Path],
    donor_images: Sequence[str | Path] = (),
    *,
    per_image: int = 3,
    max_images: int = 64,
    seed: int = 0,
    step: float = 0.1,
    batch_size: int = 8,
    planting: Planting | str = Planting.ANYWHERE,
) -> LevelWeightChoice:
    """Level weights chosen on held-out normal images and copies of them with planted
    anomalies (`fod_core.synthetic.plant_anomaly`, texture from ``donor_images``): real
    defect types are unknown when a model is trained, so the choice needs no labels."""

    from fod_core.processing import resize_mask
    from fod_core.synthetic import planted_copies

    if not normal_images:
        raise ValueError("synthetic level weights need validation images")
    size = detector.pre.image_size
    normals, draws = planted_copies(
        list(normal_images)[:max_images],
        donor_images,
        per_image=per_image,
        seed=seed,
        planting=Planting(planting),
    )
    # Photos go through the model's own pre-processing, masks through the ground truth's
    # resize; the planted copies are drawn batch by batch (large photos add up).
    samples = itertools.chain(
        ((image, np.zeros((size, size), bool)) for image in normals),
        ((image, resize_mask(mask, size) > 0) for image, mask in draws),
    )
    masks, per_level = [], []
    while chunk := list(itertools.islice(samples, batch_size)):
        batch, poses = detector.preprocess([image for image, _ in chunk])
        for level, level_map in enumerate(detector.level_maps(batch)):
            if level == len(per_level):
                per_level.append([])
            per_level[level].append(detector.post.to_input_frame(level_map, poses).numpy())
        masks += [mask for _, mask in chunk]
    maps, masks = [np.concatenate(m) for m in per_level], np.stack(masks)
    scales = None
    if detector.model.n_branches > len(detector.model.levels):  # a retrieval branch
        scales = typical_maxima(maps, ~masks.any(axis=(1, 2)))
        step = max(step, branch_step(len(maps)))
    choice = choose_level_weights(maps, masks, step=step, scales=scales)
    log.info(
        "level weights %s chosen on %d validation images and %d with planted anomalies",
        choice.weights,
        choice.n_normal,
        choice.n_anomalous,
    )
    return choice


def require_validation_images(weighting: LevelWeighting | str, n_choice: int) -> None:
    """Fail before any work when the weighting cannot be chosen (before training, too):
    it is chosen on the validation's choice part."""
    from fod_core.data import DatasetError

    if LevelWeighting(weighting) is LevelWeighting.SYNTHETIC and n_choice == 0:
        raise DatasetError(
            "level weighting 'synthetic' needs validation images to choose on (the choice "
            "part is empty): use a validation fraction above 0, a larger choice fraction, "
            "more normal images, or level weighting 'equal'"
        )


def apply_level_weighting(
    detector: AnomalyDetector,
    weighting: LevelWeighting | str,
    validation_images: Sequence[str | Path],
    donor_images: Sequence[str | Path] = (),
    *,
    seed: int = 0,
    planting: Planting | str = Planting.ANYWHERE,
) -> LevelWeightChoice | None:
    """Set ``detector``'s level weights; returns the choice (None: the plain average, for
    EQUAL and for one-level models, which have nothing to weight)."""
    from dataclasses import replace

    weighting = LevelWeighting(weighting)
    require_weighted_branches(weighting, detector.model.n_branches > len(detector.model.levels))
    if weighting is LevelWeighting.EQUAL or detector.model.n_branches == 1:
        detector.post = replace(detector.post, level_weights=None, branch_scales=None)
        return None
    require_validation_images(weighting, len(validation_images))
    choice = synthetic_level_weights(
        detector, validation_images, donor_images, seed=seed, planting=planting
    )
    detector.post = replace(
        detector.post, level_weights=choice.weights, branch_scales=choice.scales
    )
    return choice


def require_weighted_branches(weighting: LevelWeighting | str, retrieval_branch: bool) -> None:
    """A retrieval branch is a squared feature distance, FOD's levels are scores of another
    kind: their plain average means nothing; the weights and scales come from planted
    anomalies."""
    from fod_core.config import SettingsError

    if retrieval_branch and LevelWeighting(weighting) is LevelWeighting.EQUAL:
        raise SettingsError(
            "a retrieval branch (--retrieval-window) needs --level-weights synthetic: its "
            "distance and FOD's scores are put on one scale and weighted on planted anomalies"
        )
