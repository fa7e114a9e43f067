"""Anomaly-detection metrics: image and pixel AUROC, AUPRO, F1-max, per-defect breakdown.

scikit-learn and SciPy are imported where used: every pipeline step imports this module
(the decision rule), and those two cost a step's process seconds it mostly does not need.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

EIGHT_CONNECTED = np.ones((3, 3), dtype=int)


def _both_classes(labels: np.ndarray) -> bool:
    return labels.size > 0 and labels.min() != labels.max()


def image_auroc(labels: Sequence[int], scores: Sequence[float]) -> float | None:
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    return float(roc_auc_score(labels, scores)) if _both_classes(labels) else None


def f1_max(labels: Sequence[int], scores: Sequence[float]) -> tuple[float | None, float | None]:
    """Best F1 over all thresholds, and that threshold."""
    labels = np.asarray(labels)
    if not _both_classes(labels):
        return None, None
    from sklearn.metrics import precision_recall_curve

    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1[:-1])) if len(thresholds) else 0
    return float(f1[best]), float(thresholds[best])


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(masks).reshape(-1).astype(bool)
    if not _both_classes(labels):
        return None
    return float(roc_auc_score(labels, np.asarray(maps, dtype=np.float32).reshape(-1)))


def pro_curve(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact (FPR, PRO) at every distinct threshold, from one sort of all pixels.

    FPR counts normal pixels over all images; PRO is the mean, over the connected
    components (8-connected) of every mask, of the component's share above threshold.
    """
    from scipy import ndimage

    masks = np.asarray(masks).astype(bool)
    maps = np.asarray(maps, dtype=np.float64)
    fpr_weight = np.zeros(masks.shape, dtype=np.float64)
    pro_weight = np.zeros(masks.shape, dtype=np.float64)
    n_normal = int((~masks).sum())
    if n_normal == 0:
        raise ValueError("AUPRO needs normal pixels")
    fpr_weight[~masks] = 1.0 / n_normal
    regions = []
    for i in range(masks.shape[0]):
        labelled, count = ndimage.label(masks[i], structure=EIGHT_CONNECTED)
        for region in range(1, count + 1):
            regions.append((i, labelled == region))
    if not regions:
        raise ValueError("AUPRO needs at least one anomalous region")
    for i, region in regions:
        pro_weight[i][region] = 1.0 / (region.sum() * len(regions))
    order = np.argsort(-maps.reshape(-1), kind="stable")
    scores = maps.reshape(-1)[order]
    fpr = np.cumsum(fpr_weight.reshape(-1)[order])
    pro = np.cumsum(pro_weight.reshape(-1)[order])
    last_of_tie = np.r_[scores[1:] != scores[:-1], True]
    return np.r_[0.0, fpr[last_of_tie]], np.r_[0.0, pro[last_of_tie]]


def area_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under y(x) for x in [0, x_max], interpolating at x_max."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    inside = x <= x_max
    xs, ys = x[inside], y[inside]
    if xs[-1] < x_max and inside.sum() < len(x):
        nxt = int(np.argmax(~inside))
        x0, x1, y0, y1 = x[nxt - 1], x[nxt], y[nxt - 1], y[nxt]
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0) if x1 > x0 else y1
        xs, ys = np.r_[xs, x_max], np.r_[ys, y_at]
    return float(np.trapezoid(ys, xs))


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float | None:
    """Area under the PRO curve up to ``fpr_limit`` FPR, divided by ``fpr_limit``."""
    masks = np.asarray(masks).astype(bool)
    if not masks.any() or masks.all():
        return None
    fpr, pro = pro_curve(masks, maps)
    return area_to(fpr, pro, fpr_limit) / fpr_limit


def roc_points(labels: Sequence[int], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(np.asarray(labels), np.asarray(scores))
    return fpr, tpr


def alarms(scores, threshold: float) -> np.ndarray:
    """The decision rule, in its one home: a score at or above the threshold is an alarm."""
    return np.asarray(scores) >= threshold


def confusion_at(labels: Sequence[int], scores: Sequence[float], threshold: float) -> dict:
    labels = np.asarray(labels).astype(bool)
    predicted = alarms(scores, threshold)
    return {
        "tp": int((predicted & labels).sum()),
        "fp": int((predicted & ~labels).sum()),
        "tn": int((~predicted & ~labels).sum()),
        "fn": int((~predicted & labels).sum()),
    }


def catch_rate_at_false_alarm_rate(
    labels: Sequence[int], scores: Sequence[float], rate: float
) -> float | None:
    """For the record: the share of defects caught at the lowest threshold whose false-alarm
    rate on these normals is at most ``rate`` (read from the test set's own curve, so it is
    not a rate the model can promise)."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    if not labels.any() or labels.all():
        return None
    normal = np.sort(scores[~labels])[::-1]
    allowed = int(np.floor(rate * normal.size + 1e-9))  # normals that may score above it
    # strictly above the (allowed + 1)-th highest normal score, so at most `allowed` alarm
    threshold = normal[allowed] if allowed < normal.size else -np.inf
    return float(np.mean(scores[labels] > threshold))


def compute_metrics(
    labels: Sequence[int],
    scores: Sequence[float],
    defect_types: Sequence[str],
    masks: np.ndarray | None = None,
    maps: np.ndarray | None = None,
    threshold: float | None = None,
) -> dict:
    """All metrics of one evaluation, with a per-defect-type breakdown (each type vs good)."""
    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=np.float64)
    types = np.asarray(defect_types)
    f1, f1_threshold = f1_max(labels, scores)
    result: dict = {
        "image_auroc": image_auroc(labels, scores),
        "pixel_auroc": pixel_auroc(masks, maps) if masks is not None else None,
        "aupro": aupro(masks, maps) if masks is not None else None,
        "f1_max": f1,
        "f1_max_threshold": f1_threshold,
        "n_images": len(labels),
        "n_anomalous": int(labels.sum()),
    }
    if threshold is not None:
        result["threshold"] = float(threshold)
        result["confusion"] = confusion_at(labels, scores, threshold)
        if labels.any():  # what the line sees: defects caught at the shipped threshold
            caught = int(alarms(scores[labels == 1], threshold).sum())
            result |= {
                "defects_caught": caught,
                "catch_rate": caught / int(labels.sum()),
            }
    if labels.any() and not labels.all():
        result["catch_rate_at_test_far"] = {
            str(rate): catch_rate_at_false_alarm_rate(labels, scores, rate) for rate in (0.01, 0.05)
        }
    per_type = {}
    normal = labels == 0
    for defect in sorted(set(types[labels == 1])):
        subset = normal | (types == defect)
        entry = {
            "n_images": int((types == defect).sum()),
            "image_auroc": image_auroc(labels[subset], scores[subset]),
        }
        if threshold is not None:
            caught = int(alarms(scores[types == defect], threshold).sum())
            entry |= {"caught": caught, "catch_rate": caught / entry["n_images"]}
        if masks is not None:
            entry["pixel_auroc"] = pixel_auroc(masks[subset], maps[subset])
            entry["aupro"] = aupro(masks[subset], maps[subset])
        per_type[defect] = entry
    result["per_defect_type"] = per_type
    return result
