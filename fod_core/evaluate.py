"""Lifecycle stage 'evaluate': test metrics, plots and heatmap overlays of a model."""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from fod_core.artifact import read_manifest
from fod_core.data import DatasetError, DatasetFormat, ImageRecord, load_category, test_sizes
from fod_core.inference import Detector
from fod_core.memory import PhaseMeter
from fod_core.metrics import alarms, aupro, compute_metrics, image_auroc, roc_points
from fod_core.processing import read_image, read_mask, resize_mask
from fod_core.runtime import release_free_memory
from fod_core.visualize import overlay, plot_roc, plot_score_histogram

log = logging.getLogger(__name__)


def score_records(
    detector: Detector,
    sources: Sequence[str | Path | Image.Image],
    *,
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "scoring",
) -> tuple[np.ndarray, np.ndarray]:
    """(image scores (N,), anomaly maps (N, S, S)) of image files or decoded images,
    through the shared inference path."""
    scores, maps = [], []
    bar = tqdm(total=len(sources), desc=desc, unit="img", disable=not progress)
    for start in range(0, len(sources), batch_size):
        chunk = sources[start : start + batch_size]
        for prediction in detector.predict(chunk, batch_size=batch_size):
            scores.append(prediction.score)
            maps.append(prediction.anomaly_map)
        bar.update(len(chunk))
    bar.close()
    return np.asarray(scores, dtype=np.float64), np.stack(maps).astype(np.float32)


def ground_truth_masks(records: list[ImageRecord], size: int) -> np.ndarray | None:
    """(N, S, S) masks, zeros for normal images; None when an anomaly has no mask. A mask
    whose size differs from its image is an error that names the files."""
    if any(r.label == 1 and r.mask_path is None for r in records):
        return None
    masks, wrong = [], []
    for r in records:
        if r.mask_path is None:
            masks.append(np.zeros((size, size), np.uint8))
            continue
        with Image.open(r.path) as image, Image.open(r.mask_path) as mask:
            if image.size != mask.size:
                wrong.append(
                    f"{r.mask_path} ({mask.size[0]}x{mask.size[1]}) for {r.path} "
                    f"({image.size[0]}x{image.size[1]})"
                )
        if not wrong:
            masks.append(read_mask(r.mask_path, size))
    if wrong:
        shown = "\n  ".join(wrong[:10]) + (
            f"\n  ... and {len(wrong) - 10} more" if len(wrong) > 10 else ""
        )
        raise DatasetError(
            f"{len(wrong)} mask(s) differ in size from their image (a mask must match its "
            f"image pixel for pixel):\n  {shown}"
        )
    return np.stack(masks)


def false_alarms(
    normal_decisions: np.ndarray, promised: float | None, calibration: dict | None = None
) -> dict:
    """The false-alarm rate on held-out normals (their decisions at the threshold) against
    the calibration: the p-value of this many alarms or more for a model calibrated as
    promised. With the threshold's rank among n calibration normals the count is
    beta-binomial (the model's own rate varies with its calibration set); an artefact
    from before ranks were kept falls back to the binomial at the promised rate."""
    from scipy.stats import binom

    from fod_core.promise import false_alarm_p_value

    n = int(normal_decisions.size)
    alarms = int(normal_decisions.sum())
    calibration = calibration or {}
    rank, n_cal = calibration.get("threshold_rank"), calibration.get("n_normal")
    p_value = None
    if n and rank and n_cal and calibration.get("threshold_mode") == "false_alarm_rate":
        p_value = false_alarm_p_value(alarms, n, n_cal, rank)
    elif n and promised is not None:
        p_value = float(binom.sf(alarms - 1, n, promised))
    return {
        "false_alarm_rate": alarms / n if n else None,
        "false_alarms": alarms,
        "n_normal": n,
        "promised_false_alarm_rate": promised,
        "false_alarm_p_value": p_value,
    }


def planted_metrics(
    detector: Detector,
    normal_paths: list[Path],
    out_dir: Path | None = None,
    *,
    batch_size: int = 16,
    progress: bool = False,
    planting: str = "anywhere",
) -> dict:
    """Image AUROC and AUPRO on anomalies planted into held-out normal images (a fixed
    seed: every model of a product is scored on the same set). Evidence for products
    without labelled defects, and a second opinion for those with them. ``planting``:
    ``fod_core.synthetic.Planting``, the model's."""
    from fod_core.synthetic import PLANTED_SEED, Planting, planted_test_set

    if not normal_paths:
        return {}
    planting = Planting(planting)
    normals, planted, masks = planted_test_set(normal_paths, planting=planting)
    scores, maps = score_records(
        detector, normals + planted, batch_size=batch_size, progress=progress, desc="planted"
    )
    size = detector.pre.image_size
    resized = [resize_mask(m, size).astype(bool) for m in masks]
    all_masks = np.stack([np.zeros((size, size), bool)] * len(normals) + resized)
    labels = np.r_[np.zeros(len(normals)), np.ones(len(planted))]
    if out_dir is not None:
        plot_score_histogram(
            scores,
            labels,
            detector.post.threshold,
            out_dir / "planted_histogram.png",
            "held-out normals vs planted anomalies",
            names=("held-out normal", "planted anomaly"),
        )
    return {
        "planted_image_auroc": image_auroc(labels, scores),
        "planted_aupro": aupro(all_masks, maps),
        "planted_detected": (
            float(np.mean(detector.post.is_anomalous(scores[len(normals) :])))
            if detector.post.threshold is not None
            else None
        ),  # the planted catch rate at the shipped threshold (named as planted)
        "n_planted": len(planted),
        "planted_seed": PLANTED_SEED,
        "planting": planting.value,
    }


def more_normals(calibration: dict | None, defect_scores: np.ndarray) -> list[dict]:
    """How more good parts behind the threshold would move it, and the catch rate on these
    labelled defects: ``promise.more_normals_forecast`` for the asked rate and, when today's
    normals cannot promise it, for today's promise. [] without a held-out false-alarm
    calibration (an F1 threshold, normals trained or chosen on, an old artefact)."""
    from fod_core.promise import more_normals_forecast

    calibration = calibration or {}
    normals = calibration.get("validation_scores")
    if (
        not normals
        or calibration.get("threshold_mode") != "false_alarm_rate"
        or not calibration.get("held_out", True)
        or calibration.get("delta") is None
    ):
        return []
    delta, asked = calibration["delta"], calibration.get("target_false_alarm_rate")
    promised = calibration.get("guaranteed_false_alarm_rate")
    rates = [asked] + ([promised] if promised and asked and promised > asked + 1e-12 else [])
    today = (
        float(np.mean(alarms(defect_scores, calibration["threshold"])))
        if len(defect_scores)
        else None
    )
    rows = []
    for rate in (r for r in rates if r):
        for row in more_normals_forecast(normals, rate, delta):
            caught = None
            if len(defect_scores) and row.threshold is not None:
                caught = float(np.mean(alarms(defect_scores, row.threshold)))
            rows.append({
                "asked_rate": rate, "n_normal": row.n, "more": row.n - len(normals),
                "rank": row.rank, "promise": row.rate, "threshold": row.threshold,
                # above today's normals: the threshold would not fall, nor the catch rise
                "catch_rate": caught, "catch_rate_at_most": today if caught is None else None,
            })  # fmt: skip
    return rows


def evaluate_detector(
    detector: Detector,
    records: list[ImageRecord],
    out_dir: str | Path,
    *,
    title: str = "",
    max_overlays: int | None = None,
    batch_size: int = 16,
    progress: bool = True,
    promised_false_alarm_rate: float | None = None,
    splits: dict | None = None,
    calibration: dict | None = None,
    planting: str = "anywhere",
    recipe: dict | None = None,
) -> dict:
    """Score ``records`` and write metrics.json, predictions.csv, plots and overlays.
    ``recipe``: what ``--preset auto`` chose (the artefact's ``recipe.auto``), reported.

    Labelled defects give image metrics, masks add pixel metrics; held-out normals alone
    give the false-alarm rate and the planted-anomaly metrics, so a product with good
    images only is evaluated too."""
    if not records:
        raise DatasetError(
            "nothing to evaluate: the test split is empty (no held-out normal images)"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = detector.pre.image_size
    meter = PhaseMeter(getattr(detector, "device", None))
    with meter.phase("scoring"):
        scores, maps = score_records(
            detector, [r.path for r in records], batch_size=batch_size, progress=progress
        )
    release_free_memory()  # the decoded images' buffers, between phases
    labels = np.array([r.label for r in records])
    types = [r.defect_type for r in records]
    threshold = detector.post.threshold
    decisions = detector.post.is_anomalous(scores) if threshold is not None else None
    with meter.phase("metrics"):
        masks = ground_truth_masks(records, size)
        metrics = compute_metrics(labels, scores, types, masks, maps, threshold=threshold)
    n_anomalous = int(labels.sum())
    without_mask = sum(r.label == 1 and r.mask_path is None for r in records)
    notes = []
    if n_anomalous == 0:
        notes.append(
            "no labelled defects: image metrics need anomalous test images; the evidence is "
            "the false-alarm rate on held-out normals and the planted anomalies"
        )
    elif without_mask:
        notes.append(
            f"pixel metrics (pixel AUROC, AUPRO) need masks: {without_mask} of {n_anomalous} "
            "anomalous test images have none; image metrics only"
        )
        log.warning(notes[-1])
    metrics["evidence"] = "labelled" if n_anomalous else "planted"
    metrics["notes"] = notes
    if splits:
        metrics["splits"] = splits
    if calibration:  # what the threshold promised, beside what the held-out normals show
        keys = ("threshold_mode", "target_false_alarm_rate", "guaranteed_false_alarm_rate")
        metrics["calibration"] = {
            k: calibration.get(k)
            for k in (*keys, "threshold_rank", "n_normal", "confidence", "held_out", "promise")
        }
    if decisions is not None:
        metrics |= false_alarms(decisions[labels == 0], promised_false_alarm_rate, calibration)
    if forecast := more_normals(calibration, scores[labels == 1]):
        metrics["more_normals"] = forecast
    with meter.phase("planted"):
        metrics |= planted_metrics(
            detector,
            [r.path for r in records if r.label == 0],
            out_dir,
            batch_size=batch_size,
            progress=progress,
            planting=planting,
        )
    if recipe:
        metrics["recipe"] = recipe_summary(recipe)
    metrics["memory"] = meter.to_dict()
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    with meter.phase("report"):
        with open(out_dir / "predictions.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "defect_type", "label", "score", "is_anomalous"])
            for i, (r, s) in enumerate(zip(records, scores, strict=True)):
                decision = "" if decisions is None else int(decisions[i])
                writer.writerow([str(r.path), r.defect_type, r.label, f"{s:.8g}", decision])
        _write_plots(metrics, labels, scores, threshold, out_dir, title)
        _write_overlays(records, scores, maps, masks, out_dir / "overlays", max_overlays)
    metrics["memory"] = meter.to_dict()
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log.info("%s", meter.describe())
    return metrics


def _write_plots(metrics: dict, labels, scores, threshold, out_dir: Path, title: str) -> None:
    """The ROC with the shipped point marked, and the test scores against the threshold."""
    fpr, tpr = roc_points(labels, scores) if metrics["image_auroc"] is not None else ([], [])
    if len(fpr):
        shipped = None
        if metrics.get("catch_rate") is not None and metrics.get("false_alarm_rate") is not None:
            shipped = (metrics["false_alarm_rate"], metrics["catch_rate"])
        plot_roc(
            fpr, tpr, metrics["image_auroc"], out_dir / "roc.png", f"{title} image ROC", shipped
        )
    plot_score_histogram(
        scores, labels, threshold, out_dir / "score_histogram.png", f"{title} test scores"
    )


def _write_overlays(records, scores, maps, masks, folder: Path, limit: int | None) -> None:
    """One image per test image: input | heatmap, on one colour scale for the whole set."""
    vmin, vmax = float(np.percentile(maps, 1)), float(np.percentile(maps, 99.9))
    chosen = range(len(records)) if limit is None else _spread(records, limit)
    for i in chosen:
        record = records[i]
        target = folder / record.defect_type / f"{record.path.stem}_{scores[i]:.4g}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        mask = masks[i] if masks is not None else None
        overlay(read_image(record.path), maps[i], vmin=vmin, vmax=vmax, mask=mask).save(target)


def _spread(records: list[ImageRecord], limit: int) -> list[int]:
    """Up to ``limit`` images spread over the defect types."""
    by_type: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_type.setdefault(r.defect_type, []).append(i)
    chosen: list[int] = []
    while len(chosen) < limit and any(by_type.values()):
        for indices in by_type.values():
            if indices and len(chosen) < limit:
                chosen.append(indices.pop(0))
    return sorted(chosen)


def recipe_summary(recipe: dict) -> dict:
    """The auto recipe's choice and its label-free evidence, short (the candidates stay in
    the artefact): for the report, MLflow and the registry."""
    candidates = recipe.get("candidates", [])
    region = recipe.get("score_region", "whole")  # earlier artefacts scored the whole picture
    names = (
        "alignment",
        "reference",
        "reference_k",
        "retrieval_window",
        "retrieval_features",
        "planting",
    )
    features = recipe.get("retrieval_features", "finer")  # earlier artefacts: the finer level
    chosen = [
        c
        for c in candidates
        if (c["alignment"], c["k"], c["window"], c.get("score_region", "whole"))
        == (
            recipe.get("alignment"),
            recipe.get("reference_k"),
            recipe.get("retrieval_window"),
            region,
        )
        and c.get("features", "finer") == features
    ]
    evidence = chosen[0] if chosen else {}
    return {
        "chosen": {k: recipe.get(k) for k in names}
        | {"retrieval_features": features, "score_region": region},
        "rule": recipe.get("rule"),
        "planted_image_auroc": evidence.get("planted_image_auroc"),
        "planted_caught_above_normals": evidence.get("planted_caught_above_normals"),
        "candidates": len(candidates),
        "choice_images": recipe.get("n_choice_images"),
        "tail_normals": recipe.get("n_tail_normals", 0),
        "planted_images": recipe.get("n_planted"),
    }


def evaluate_model(
    model_dir: str | Path,
    data_root: str | Path,
    category: str,
    out_dir: str | Path,
    *,
    format: DatasetFormat | str = DatasetFormat.MVTEC,
    device: str = "cpu",
    max_overlays: int | None = None,
    progress: bool = True,
    runtime: str = "torch",
    precision: str = "fp32",
    planting: str | None = None,
) -> dict:
    """``runtime``: torch, or the model's checked export (onnx, openvino), and
    ``precision`` (torch: fp32, bf16, auto): the same metrics through what serves it.
    ``planting``: how the planted metrics plant (None: as the model was calibrated), so
    that two models planted differently can be compared on one planted set."""
    from fod_core.export import load_runtime

    detector = load_runtime(model_dir, runtime, device=device, precision=precision)
    manifest = read_manifest(model_dir)
    data = load_category(data_root, category, format)
    splits = {**(manifest.get("data", {}).get("splits") or {}), **test_sizes(data)}
    return evaluate_detector(
        detector,
        data.test,
        out_dir,
        title=category,
        max_overlays=max_overlays,
        progress=progress,
        promised_false_alarm_rate=manifest.get("calibration", {}).get(
            "guaranteed_false_alarm_rate"
        ),
        splits=splits,
        calibration=manifest.get("calibration"),
        planting=planting or manifest.get("planting", "anywhere"),
        recipe=manifest.get("recipe", {}).get("auto"),
    )
