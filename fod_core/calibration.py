"""Choices made after training, on validation data, never on test labels: the alarm
threshold, and optionally how the levels' maps are weighted into one anomaly map."""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fod_core.metrics import aupro, f1_max, pixel_auroc
from fod_core.synthetic import Planting

if TYPE_CHECKING:
    from fod_core.data import CategoryData
    from fod_core.inference import AnomalyDetector

log = logging.getLogger(__name__)


class ThresholdMode(str, Enum):
    FALSE_ALARM_RATE = "false_alarm_rate"  # quantile of normal scores; needs no anomalies
    F1 = "f1"  # F1-optimal on labelled validation anomalies


@dataclass(frozen=True)
class Threshold:
    """The alarm threshold and, for the false-alarm mode, what it promises: with ``n_normal``
    validation normals and the ``rank``-th largest score as threshold, a new normal image
    scores at or above it with probability at most ``rank / (n_normal + 1)``
    (``guaranteed_false_alarm_rate``, exchangeable scores without ties)."""

    value: float
    mode: ThresholdMode
    target_false_alarm_rate: float | None = None
    n_normal: int = 0
    n_anomalous: int = 0
    rank: int | None = None
    guaranteed_false_alarm_rate: float | None = None

    @property
    def supports_target(self) -> bool:
        return (
            self.guaranteed_false_alarm_rate is None
            or self.guaranteed_false_alarm_rate <= self.target_false_alarm_rate + 1e-12
        )

    def to_dict(self) -> dict:
        return {
            "threshold": self.value,
            "threshold_mode": self.mode.value,
            "target_false_alarm_rate": self.target_false_alarm_rate,
            "guaranteed_false_alarm_rate": self.guaranteed_false_alarm_rate,
            "threshold_rank": self.rank,
            "n_normal": self.n_normal,
            "n_anomalous": self.n_anomalous,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Threshold:
        return cls(
            value=data["threshold"],
            mode=ThresholdMode(data.get("threshold_mode", ThresholdMode.FALSE_ALARM_RATE)),
            target_false_alarm_rate=data.get("target_false_alarm_rate"),
            n_normal=data.get("n_normal", 0),
            n_anomalous=data.get("n_anomalous", 0),
            rank=data.get("threshold_rank"),
            guaranteed_false_alarm_rate=data.get("guaranteed_false_alarm_rate"),
        )

    def describe(self) -> str:
        if self.mode is ThresholdMode.F1:
            return (
                f"F1-optimal on {self.n_normal} normal and {self.n_anomalous} anomalous "
                "validation images"
            )
        return (
            f"false-alarm rate at most {self.guaranteed_false_alarm_rate:.4g} "
            f"(target {self.target_false_alarm_rate:g}; score rank {self.rank} of "
            f"{self.n_normal} validation normals)"
        )


def conformal_rank(n_normal: int, target_false_alarm_rate: float) -> int:
    """The largest k with k / (n + 1) <= target, at least 1: the k-th largest of n normal
    scores as threshold bounds the expected false-alarm rate by k / (n + 1)."""
    return max(1, math.floor(target_false_alarm_rate * (n_normal + 1) + 1e-9))


def normals_needed(target_false_alarm_rate: float) -> int:
    """How many validation normals can promise ``target``: 1 / (n + 1) <= target."""
    return max(1, math.ceil(1 / target_false_alarm_rate - 1 - 1e-9))


def calibrate_threshold(
    normal_scores: Sequence[float],
    anomalous_scores: Sequence[float] = (),
    *,
    target_false_alarm_rate: float = 0.01,
    mode: ThresholdMode | str | None = None,
) -> Threshold:
    """An order statistic of the normal validation scores by default (conformal: the
    promise holds for any score distribution); F1-optimal when anomalies exist (or when
    asked). Warns when there are too few normals for the target rate."""
    normal = np.asarray(normal_scores, dtype=np.float64)
    anomalous = np.asarray(anomalous_scores, dtype=np.float64)
    if normal.size == 0:
        raise ValueError("threshold calibration needs validation scores of normal images")
    if not 0 < target_false_alarm_rate < 1:
        raise ValueError("target false-alarm rate must be in (0, 1)")
    if mode is None:
        mode = ThresholdMode.F1 if anomalous.size else ThresholdMode.FALSE_ALARM_RATE
    mode = ThresholdMode(mode)
    if mode is ThresholdMode.F1:
        if anomalous.size == 0:
            raise ValueError("F1 calibration needs labelled anomalous validation images")
        labels = np.r_[np.zeros(normal.size), np.ones(anomalous.size)]
        _, value = f1_max(labels, np.r_[normal, anomalous])
        return Threshold(float(value), mode, None, int(normal.size), int(anomalous.size))
    n = int(normal.size)
    rank = min(conformal_rank(n, target_false_alarm_rate), n)
    value = float(np.sort(normal)[::-1][rank - 1])
    threshold = Threshold(value, mode, target_false_alarm_rate, n, 0, rank, rank / (n + 1))
    if not threshold.supports_target:
        log.warning(
            "%d validation normals cannot promise a %g false-alarm rate: the threshold (their "
            "maximum) guarantees %.4g; %d validation normals are needed for %g",
            n,
            target_false_alarm_rate,
            threshold.guaranteed_false_alarm_rate,
            normals_needed(target_false_alarm_rate),
            target_false_alarm_rate,
        )
    return threshold


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

    def to_dict(self) -> dict:
        return asdict(self) | {"weights": list(self.weights)}

    def save_plot(self, path: Path) -> None:
        """The metrics against the finer level's weight (two-level models only)."""
        from fod_core.visualize import plot_level_weights

        if len(self.weights) == 2 and self.candidates:
            plot_level_weights(self.candidates, path)


def weight_grid(n_levels: int, step: float = 0.1) -> list[tuple[float, ...]]:
    """Every weight vector on the simplex whose entries are multiples of ``step``."""
    parts = round(1 / step)
    grid = []
    for counts in itertools.product(range(parts + 1), repeat=n_levels - 1):
        if sum(counts) <= parts:
            grid.append(tuple(c / parts for c in (*counts, parts - sum(counts))))
    return grid


def choose_level_weights(
    level_maps: Sequence[np.ndarray], masks: np.ndarray, *, step: float = 0.1
) -> LevelWeightChoice:
    """The weights (on a ``step`` grid) whose combined map has the best AUPRO, ties broken
    by pixel AUROC, then by closeness to the method's equal weights, over images with known
    anomaly ``masks`` (N, S, S)."""
    import torch

    from fod_core.processing import PostProcessing

    masks = np.asarray(masks).astype(bool)
    if not masks.any() or masks.all():
        raise ValueError("level weights need images with both normal and anomalous pixels")
    maps = [torch.as_tensor(np.asarray(m)) for m in level_maps]
    candidates = []
    for weights in weight_grid(len(level_maps), step):
        # combined as the detector combines them (PostProcessing.combine)
        combined = PostProcessing(masks.shape[-1], level_weights=weights).combine(maps).numpy()
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
        tuple(best["weights"]), len(masks) - n_anomalous, n_anomalous, candidates=candidates
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
    choice = choose_level_weights(
        [np.concatenate(m) for m in per_level], np.stack(masks), step=step
    )
    log.info(
        "level weights %s chosen on %d validation images and %d with planted anomalies",
        choice.weights,
        choice.n_normal,
        choice.n_anomalous,
    )
    return choice


def require_validation_images(weighting: LevelWeighting | str, n_validation: int) -> None:
    """Fail before any work when the weighting cannot be chosen (before training, too)."""
    from fod_core.data import DatasetError

    if LevelWeighting(weighting) is LevelWeighting.SYNTHETIC and n_validation == 0:
        raise DatasetError(
            "level weighting 'synthetic' needs validation images: use a validation fraction "
            "above 0 (or level weighting 'equal')"
        )


def require_held_out_normals(nearest_reference: bool, n_validation: int) -> None:
    """A nearest-normal reference cannot be calibrated on training images: each would
    find itself among its nearest normals and score too low (a threshold that breaks its
    promise). Fail before any work."""
    from fod_core.data import DatasetError

    if nearest_reference and n_validation == 0:
        raise DatasetError(
            "a nearest-normal reference (--reference nearest) needs validation images to "
            "calibrate on: use a validation fraction above 0"
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
    if weighting is LevelWeighting.EQUAL or len(detector.model.levels) == 1:
        detector.post = replace(detector.post, level_weights=None)
        return None
    require_validation_images(weighting, len(validation_images))
    choice = synthetic_level_weights(
        detector, validation_images, donor_images, seed=seed, planting=planting
    )
    detector.post = replace(detector.post, level_weights=choice.weights)
    return choice


def model_split(manifest: dict, data: CategoryData) -> tuple[list, list]:
    """(training, validation) records of the split a model was trained with: no image the
    model trained on is used to judge it (calibration, export parity)."""
    from fod_core.data import split_validation

    recorded = manifest.get("data", {}).get("validation_images")
    if recorded is not None:  # the split the model was trained with, exactly
        names = set(recorded)
        val_records = [r for r in data.train if r.path.name in names]
        train_records = [r for r in data.train if r.path.name not in names]
        return train_records, val_records
    # a model from before the names were kept: the same rule again
    settings = manifest.get("training", {}).get("config", {})
    return split_validation(data.train, settings.get("val_fraction", 0.1))


def calibrate_model(
    model_dir,
    data_root,
    category: str,
    *,
    format: str = "mvtec",
    mode: ThresholdMode | str | None = None,
    target_false_alarm_rate: float = 0.01,
    anomalous_images: Sequence = (),
    level_weighting: LevelWeighting | str | None = None,
    planting: Planting | str | None = None,
    progress: bool = False,
) -> Threshold:
    """Lifecycle stage 'calibrate': re-derive a model's threshold (and, when
    ``level_weighting`` is given, its level weights) and store them in the artefact.
    ``planting``: how anomalies are planted for the level weights, stored with them (the
    evaluation's planted metrics follow it); None: the artefact's, else ANYWHERE.

    Normal scores come from the validation split the model was trained with (the same
    file-name hash split, so no image the model trained on is used); labelled anomalies,
    when given, are validation anomalies supplied by the user, never the test set.
    """
    from fod_core.artifact import load_detector, read_manifest, update_manifest
    from fod_core.data import load_category

    manifest = read_manifest(model_dir)
    train_settings = manifest.get("training", {}).get("config", {})
    train_records, val_records = model_split(manifest, load_category(data_root, category, format))
    nearest = manifest.get("model", {}).get("reference", "class") == "nearest"
    require_held_out_normals(nearest, len(val_records))
    calibration_records = val_records or train_records
    detector = load_detector(model_dir)
    planting = Planting(planting or manifest.get("planting", Planting.ANYWHERE.value))
    extra = {}
    if level_weighting is not None:
        extra["planting"] = planting.value  # what the weights were chosen on
        choice = apply_level_weighting(
            detector,
            level_weighting,
            [r.path for r in val_records],
            [r.path for r in train_records],
            seed=train_settings.get("seed", 0),
            planting=planting,
        )
        extra["level_weights"] = choice.to_dict() if choice else {"weighting": "equal"}
        plot = Path(model_dir) / "level_weights.png"
        plot.unlink(missing_ok=True)  # a plot of an earlier choice would mislead
        if choice:
            choice.save_plot(plot)
    normal = [p.score for p in detector.predict([r.path for r in calibration_records])]
    anomalous = (
        [p.score for p in detector.predict(list(anomalous_images))] if anomalous_images else []
    )
    threshold = calibrate_threshold(
        normal, anomalous, target_false_alarm_rate=target_false_alarm_rate, mode=mode
    )
    detector.with_threshold(threshold.value, threshold.mode.value)
    update_manifest(
        model_dir,
        postprocessing=detector.post.to_dict(),
        calibration={
            **threshold.to_dict(),
            "validation_scores": normal,
            "anomalous_scores": anomalous,
            "calibrated_on": "validation split" if val_records else "training images",
        },
        **extra,
    )
    return threshold
