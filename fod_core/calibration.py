"""The alarm threshold, set after training on the validation's calibration part (never on
test labels), the split that says which images a model may calibrate on, and the
lifecycle stage 'calibrate' (``fod calibrate``: the threshold again, and the level weights
when asked). How the level weights are chosen is ``fod_core.level_weights``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fod_core.level_weights import LevelWeighting, apply_level_weighting
from fod_core.metrics import f1_max
from fod_core.promise import DEFAULT_DELTA, Promise, normals_needed, rank_for, rate_bound
from fod_core.synthetic import Planting

if TYPE_CHECKING:
    from fod_core.data import CategoryData

log = logging.getLogger(__name__)


class ThresholdMode(str, Enum):
    FALSE_ALARM_RATE = "false_alarm_rate"  # quantile of normal scores; needs no anomalies
    F1 = "f1"  # F1-optimal on labelled validation anomalies


@dataclass(frozen=True)
class Threshold:
    """The alarm threshold and, for the false-alarm mode, what it promises for this model:
    with the ``rank``-th largest of ``n_normal`` held-out normal scores as threshold, the
    model's false-alarm rate exceeds ``guaranteed_false_alarm_rate`` with probability at
    most ``delta`` (`fod_core.promise`; exchangeable scores without ties).
    ``held_out`` False: the normals were trained or chosen on, and nothing is promised."""

    value: float
    mode: ThresholdMode
    target_false_alarm_rate: float | None = None
    n_normal: int = 0
    n_anomalous: int = 0
    rank: int | None = None
    guaranteed_false_alarm_rate: float | None = None
    delta: float | None = None
    held_out: bool = True

    @property
    def promise(self) -> Promise | None:
        """None for F1 thresholds and artefacts from before training-conditional promises."""
        if self.mode is not ThresholdMode.FALSE_ALARM_RATE or self.rank is None:
            return None
        if self.delta is None:
            return None
        return Promise(
            self.n_normal, self.rank, self.delta, self.target_false_alarm_rate, self.held_out
        )

    @property
    def supports_target(self) -> bool:
        return (
            self.guaranteed_false_alarm_rate is None
            or self.guaranteed_false_alarm_rate <= self.target_false_alarm_rate + 1e-12
        )

    def to_dict(self) -> dict:
        promise = self.promise
        return {
            "threshold": self.value,
            "threshold_mode": self.mode.value,
            "target_false_alarm_rate": self.target_false_alarm_rate,
            "guaranteed_false_alarm_rate": self.guaranteed_false_alarm_rate,
            "expected_false_alarm_rate": promise.expected_rate if promise else None,
            "confidence": None if self.delta is None else 1 - self.delta,
            "delta": self.delta,
            "threshold_rank": self.rank,
            "n_normal": self.n_normal,
            "n_anomalous": self.n_anomalous,
            "held_out": self.held_out,
            "promise": self.describe(),
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
            delta=data.get("delta"),
            held_out=data.get("held_out", True),
        )

    def describe(self) -> str:
        if self.mode is ThresholdMode.F1:
            return (
                f"F1-optimal on {self.n_normal} normal and {self.n_anomalous} anomalous "
                "validation images (no false-alarm promise)"
            )
        if self.promise is not None:
            return self.promise.in_words()
        return (  # an artefact from before training-conditional promises
            f"false-alarm rate at most {self.guaranteed_false_alarm_rate:.4g} on average "
            f"(target {self.target_false_alarm_rate:g}; score rank {self.rank} of "
            f"{self.n_normal} validation normals)"
        )


def promise_of(manifest: dict) -> str | None:
    """What a model's threshold promises, in words, as its calibration states it (None:
    not calibrated). One reading for `fod predict`, the model server and the registry."""
    calibration = manifest.get("calibration") or {}
    if "threshold" not in calibration:
        return None
    return Threshold.from_dict(calibration).describe()


def calibrate_threshold(
    normal_scores: Sequence[float],
    anomalous_scores: Sequence[float] = (),
    *,
    target_false_alarm_rate: float = 0.01,
    mode: ThresholdMode | str | None = None,
    delta: float = DEFAULT_DELTA,
    held_out: bool = True,
) -> Threshold:
    """An order statistic of the normal calibration scores by default: the largest rank
    whose false-alarm rate stays below the target with confidence 1 - ``delta``, for any
    score distribution (`fod_core.promise`); F1-optimal when anomalies exist (or when
    asked). With too few normals the threshold is their maximum, and the promise says
    what they support and how many normals the target needs. ``held_out``: whether the
    normals were kept from training and from every choice (else nothing is promised)."""
    normal = np.asarray(normal_scores, dtype=np.float64)
    anomalous = np.asarray(anomalous_scores, dtype=np.float64)
    if normal.size == 0:
        raise ValueError("threshold calibration needs validation scores of normal images")
    if not 0 < target_false_alarm_rate < 1:
        raise ValueError("target false-alarm rate must be in (0, 1)")
    if not 0 < delta < 1:
        raise ValueError("delta (1 - confidence) must be in (0, 1)")
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
    rank = rank_for(n, target_false_alarm_rate, delta) or 1
    value = float(np.sort(normal)[::-1][rank - 1])
    threshold = Threshold(
        value,
        mode,
        target_false_alarm_rate,
        n,
        0,
        rank,
        rate_bound(n, rank, delta),
        delta,
        held_out,
    )
    if not held_out:
        log.warning("threshold calibrated on images the model trained on: %s", threshold.describe())
    elif not threshold.supports_target:
        log.warning(
            "%d calibration normals cannot promise a %g false-alarm rate with %g confidence: "
            "the threshold (their maximum) promises %.4g; %d are needed",
            n,
            target_false_alarm_rate,
            1 - delta,
            threshold.guaranteed_false_alarm_rate,
            normals_needed(target_false_alarm_rate, delta),
        )
    return threshold


CALIBRATION_PART = "validation calibration part"


def require_calibration_images(n_validation: int, n_calibration: int) -> None:
    """Validation images exist but none was left to calibrate on: the threshold would be
    set on images a choice was made on, and its promise would not hold."""
    from fod_core.data import DatasetError

    if n_validation and not n_calibration:
        raise DatasetError(
            f"all {n_validation} validation images fell into the choice part, none is left "
            "to calibrate the threshold on: add normal images, raise the validation "
            "fraction or lower the choice fraction"
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


@dataclass(frozen=True)
class ModelSplit:
    """The normal images of a model's split: what it trained on, chose on (epoch, level
    weights, recipe) and may calibrate on (neither trained nor chosen on)."""

    train: list
    choice: list
    calibration: list

    @property
    def validation(self) -> list:
        return self.choice + [r for r in self.calibration if r not in self.choice]

    @property
    def calibration_held_out(self) -> bool:
        """Whether the calibration images are neither trained nor chosen on."""
        return bool(self.calibration) and not set(self.calibration) & set(self.choice)


def require_unseen(images: Sequence[Path], seen: Sequence) -> None:
    """Extra calibration normals must be new to the model and to its evaluation: an image
    it trained or chose on (or a copy) scores low and would make the promise optimistic;
    one already in the calibration part would count twice; a test image would let the
    evaluation grade the threshold on its own images."""
    from fod_core.cache import file_sha256
    from fod_core.data import DatasetError

    seen_hashes = {file_sha256(r.path) for r in seen}
    repeated = [str(p) for p in images if file_sha256(p) in seen_hashes]
    if repeated:
        shown = "\n  ".join(repeated[:10])
        raise DatasetError(
            f"{len(repeated)} of the extra normals are images this model trained, chose or "
            f"calibrated on, or its test images (same content): give good parts it has not "
            f"seen:\n  {shown}"
        )


def model_split(manifest: dict, data: CategoryData) -> ModelSplit:
    """The split a model was trained with: no image the model trained or chose on is used
    to calibrate it (the threshold), and none it trained on to judge it (export parity)."""
    from fod_core.data import split_roles, split_validation

    recorded = manifest.get("data", {})
    if recorded.get("calibration_images") is not None:  # identities: the split exactly
        choice, calibration = set(recorded["choice_images"]), set(recorded["calibration_images"])
        return ModelSplit(
            [r for r in data.train if r.identity not in choice | calibration],
            [r for r in data.train if r.identity in choice],
            [r for r in data.train if r.identity in calibration],
        )
    if recorded.get("validation_images") is not None:
        # an artefact from before the choice part: every validation image made choices
        # (its file names, as then recorded), none is left that a choice did not see
        names = set(recorded["validation_images"])
        log.warning(
            "this model chose its epoch (and level weights) on the images it calibrates on: "
            "retrain it for a threshold whose promise holds"
        )
        validation = [r for r in data.train if r.path.name in names or r.identity in names]
        train = [r for r in data.train if r not in validation]
        return ModelSplit(train, validation, validation)
    settings = manifest.get("training", {}).get("config", {})
    train, val = split_validation(data.train, settings.get("val_fraction", 0.1))
    return ModelSplit(train, *split_roles(val, settings.get("choice_fraction", 0.3)))


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
    delta: float = DEFAULT_DELTA,
    extra_normals: Sequence[str | Path] = (),
) -> Threshold:
    """Lifecycle stage 'calibrate': re-derive a model's threshold (and, when
    ``level_weighting`` is given, its level weights) and store them in the artefact.
    ``planting``: how anomalies are planted for the level weights, stored with them (the
    evaluation's planted metrics follow it); None: the artefact's, else ANYWHERE.

    Level weights are chosen on the validation's choice part, the threshold set on its
    calibration part (the split the model was trained with: no image the model trained or
    chose on); ``delta``: the chance the false-alarm promise may fail. Labelled anomalies,
    when given, are validation anomalies supplied by the user, never the test set.
    ``extra_normals``: more good parts for the threshold alone (``fod calibrate
    --normals DIR``), without retraining: a larger calibration set, a tighter promise.
    Images the model trained or chose on are refused (by content, so copies are too).
    """
    from fod_core.artifact import load_detector, read_manifest, update_manifest
    from fod_core.data import load_category

    manifest = read_manifest(model_dir)
    train_settings = manifest.get("training", {}).get("config", {})
    data = load_category(data_root, category, format)
    split = model_split(manifest, data)
    train_records = split.train
    nearest = manifest.get("model", {}).get("reference", "class") == "nearest"
    more_normals = [Path(p) for p in extra_normals]
    if more_normals:
        require_unseen(more_normals, split.train + split.validation + data.test)
    require_held_out_normals(nearest, len(split.calibration) + len(more_normals))
    calibration_records = split.calibration or train_records
    detector = load_detector(model_dir)
    planting = Planting(planting or manifest.get("planting", Planting.ANYWHERE.value))
    unweighted_retrieval = (
        detector.model.n_branches > len(detector.model.levels)
        and detector.post.branch_scales is None
    )
    if level_weighting is None and unweighted_retrieval:
        # trained with calibrate=False (the pipeline's training step): its branches were
        # never put on one scale, and equal weights over them would mean nothing
        level_weighting = LevelWeighting.SYNTHETIC
        log.info("a retrieval branch with no weights yet: weighting on planted anomalies")
    extra = {}
    if level_weighting is not None:
        extra["planting"] = planting.value  # what the weights were chosen on
        choice = apply_level_weighting(
            detector,
            level_weighting,
            [r.path for r in split.choice],
            [r.path for r in train_records],
            seed=train_settings.get("seed", 0),
            planting=planting,
        )
        extra["level_weights"] = choice.to_dict() if choice else {"weighting": "equal"}
        plot = Path(model_dir) / "level_weights.png"
        plot.unlink(missing_ok=True)  # a plot of an earlier choice would mislead
        if choice:
            choice.save_plot(plot)
    if more_normals and not split.calibration:
        scored = more_normals  # training images promise nothing: the new normals alone
    else:
        scored = [r.path for r in calibration_records] + more_normals
    normal = [p.score for p in detector.predict(scored)]
    anomalous = (
        [p.score for p in detector.predict(list(anomalous_images))] if anomalous_images else []
    )
    held_out = split.calibration_held_out or (bool(more_normals) and not split.calibration)
    threshold = calibrate_threshold(
        normal,
        anomalous,
        target_false_alarm_rate=target_false_alarm_rate,
        mode=mode,
        delta=delta,
        held_out=held_out,
    )
    detector.with_threshold(threshold.value, threshold.mode.value)
    if not split.calibration:
        calibrated_on = "training images" if not more_normals else "no validation"
    elif held_out:
        calibrated_on = CALIBRATION_PART
    else:
        calibrated_on = "validation images a choice was made on"
    if more_normals:
        calibrated_on += f" + {len(more_normals)} more normals (fod calibrate --normals)"
    update_manifest(
        model_dir,
        postprocessing=detector.post.to_dict(),
        calibration={
            **threshold.to_dict(),
            "validation_scores": normal,
            "anomalous_scores": anomalous,
            "calibrated_on": calibrated_on,
            "extra_normals": len(more_normals),
        },
        **extra,
    )
    return threshold
