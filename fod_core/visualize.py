"""Pictures a person would rather look at than read: heatmap overlays, ROC, histograms."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from PIL import Image
from scipy import ndimage


def heatmap_rgb(anomaly_map: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """Map values to 'jet' colours, (H, W, 3) uint8; vmin/vmax fixed across a set."""
    scaled = np.clip((anomaly_map - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    return (colormaps["jet"](scaled)[..., :3] * 255).astype(np.uint8)


def overlay(
    image: Image.Image,
    anomaly_map: np.ndarray,
    *,
    vmin: float,
    vmax: float,
    mask: np.ndarray | None = None,
    alpha: float = 0.45,
) -> Image.Image:
    """Image | heatmap blended over it (mask outline in white where known)."""
    size = anomaly_map.shape[::-1]
    base = np.asarray(image.convert("RGB").resize(size, Image.Resampling.BILINEAR))
    blended = (1 - alpha) * base + alpha * heatmap_rgb(anomaly_map, vmin, vmax)
    blended = blended.astype(np.uint8)
    if mask is not None and mask.any():
        edge = mask.astype(bool) & ~ndimage.binary_erosion(mask.astype(bool), iterations=1)
        blended[edge] = 255
    return Image.fromarray(np.concatenate([base, blended], axis=1))


def prediction_overlay(
    image: Image.Image, anomaly_map: np.ndarray, threshold: float | None
) -> Image.Image:
    """The picture `fod predict --heatmaps` writes and the server returns: colours run from
    0 to twice the alarm threshold, so red means well above it in every picture."""
    vmax = threshold or float(anomaly_map.max())
    return overlay(image, anomaly_map, vmin=0.0, vmax=vmax * 2)


def plot_roc(
    fpr: np.ndarray,
    tpr: np.ndarray,
    auroc: float | None,
    path: Path,
    title: str,
    shipped: tuple[float, float] | None = None,
) -> None:
    """Catch rate against false-alarm rate; ``shipped``: (false-alarm rate, catch rate) at
    the threshold the model ships with, marked on the curve."""
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.subplots()
    ax.plot(fpr, tpr, lw=2, label=f"AUROC {auroc:.4f}" if auroc is not None else None)
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    if shipped is not None:
        label = f"shipped threshold: catches {shipped[1]:.0%}, {shipped[0]:.1%} false alarms"
        ax.plot(*shipped, "o", color="tab:red", ms=8, label=label)
    ax.set(
        xlabel="false-alarm rate (test normals)",
        ylabel="catch rate (labelled defects)",
        title=title,
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    if auroc is not None or shipped is not None:
        ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_score_histogram(
    scores: Sequence[float],
    labels: Sequence[int],
    threshold: float | None,
    path: Path,
    title: str,
    names: tuple[str, str] = ("normal", "anomalous"),
) -> None:
    scores, labels = np.asarray(scores), np.asarray(labels)
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    bins = np.linspace(scores.min(), scores.max(), 30) if scores.size else 10
    ax.hist(scores[labels == 0], bins=bins, alpha=0.6, label=names[0], color="tab:green")
    ax.hist(scores[labels == 1], bins=bins, alpha=0.6, label=names[1], color="tab:red")
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", label=f"threshold {threshold:.4g}")
    ax.set(xlabel="image anomaly score", ylabel="images", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_training_curves(history: Sequence[dict], path: Path) -> None:
    """Reconstruction loss per epoch (train per level, validation)."""
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    keys = sorted({k for h in history for k in h["train"] if k.endswith("/reconstruction")})
    for key in keys:
        ax.plot(epochs, [h["train"][key] for h in history], label=f"train {key.split('/')[0]}")
    val = [h["val_loss"] for h in history]
    if any(v is not None for v in val):
        ax.plot(epochs, val, "k-o", ms=3, label="validation (sum of levels)")
    ax.set(xlabel="epoch", ylabel="reconstruction loss", yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_level_weights(candidates: Sequence[dict], path: Path) -> None:
    """AUPRO and pixel AUROC on the synthetic anomalies against the first level's weight."""
    x = [c["weights"][0] for c in candidates]
    best = max(candidates, key=lambda c: (c["aupro"], c["pixel_auroc"]))
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.plot(x, [c["aupro"] for c in candidates], "o-", label="AUPRO")
    ax.plot(x, [c["pixel_auroc"] for c in candidates], "s-", label="pixel AUROC")
    ax.axvline(0.5, color="grey", ls=":", label="equal (the method)")
    ax.axvline(best["weights"][0], color="k", ls="--", label=f"chosen {best['weights'][0]:.1f}")
    ax.set(
        xlabel="weight of the finer level",
        ylabel="on validation + planted anomalies",
        title="level weights",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_branch_weights(
    candidates: Sequence[dict], chosen: Sequence[float], path: Path, top: int = 12
) -> None:
    """The best weightings of three or more branches (a simplex has no one axis), ranked by
    AUPRO on the synthetic anomalies; the chosen one in orange."""
    ranked = sorted(candidates, key=lambda c: (c["aupro"], c["pixel_auroc"]), reverse=True)
    shown = ranked[:top][::-1]  # barh draws bottom-up: the best on top
    labels = ["(" + ", ".join(f"{w:.1f}" for w in c["weights"]) + ")" for c in shown]
    fig = Figure(figsize=(7, 0.32 * len(shown) + 1.6))
    ax = fig.subplots()
    y = np.arange(len(shown))
    picked = [round(w, 6) for w in chosen]
    colors = [
        "tab:orange" if [round(w, 6) for w in c["weights"]] == picked else "tab:blue" for c in shown
    ]
    ax.barh(y, [c["aupro"] for c in shown], color=colors, label="AUPRO (orange: chosen)")
    ax.plot([c["pixel_auroc"] for c in shown], y, "ks", ms=4, label="pixel AUROC")
    ax.set_yticks(y, labels, fontsize=8)
    low = min(min(c["aupro"], c["pixel_auroc"]) for c in shown)
    ax.set_xlim(max(0.0, low - 0.05), 1.0)
    ax.set(
        xlabel="on validation + planted anomalies",
        title=f"branch weights: best {len(shown)} of {len(candidates)} "
        "(FOD's levels, then the retrieval branches)",
    )
    ax.title.set_fontsize(9)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_drift(
    calibration_scores: Sequence[float],
    served_scores: Sequence[float],
    served_times: Sequence[float],
    served_alarms: Sequence[bool],
    threshold: float | None,
    promised_rate: float | None,
    path: Path,
    title: str,
) -> None:
    """Served scores against the validation normals', and the alarm rate over time."""
    served = np.asarray(served_scores, float)
    calibration = np.asarray(calibration_scores, float)
    fig = Figure(figsize=(11, 3.8))
    left, right = fig.subplots(1, 2)
    everything = np.concatenate([served, calibration]) if served.size else calibration
    bins = np.linspace(everything.min(), everything.max(), 30) if everything.size else 10
    left.hist(calibration, bins=bins, density=True, alpha=0.6, label="validation normals",
              color="tab:green")  # fmt: skip
    left.hist(served, bins=bins, density=True, alpha=0.6, label="served", color="tab:blue")
    if threshold is not None:
        left.axvline(threshold, color="k", ls="--", label=f"threshold {threshold:.4g}")
    left.set(xlabel="image anomaly score", ylabel="density", title=f"{title}: scores")
    left.legend()
    order = np.argsort(np.asarray(served_times, float))
    alarms = np.asarray(served_alarms, float)[order]
    if alarms.size:
        window = max(1, min(50, alarms.size // 5))
        rate = np.convolve(alarms, np.ones(window) / window, mode="valid")
        right.plot(np.arange(rate.size) + window, rate, label=f"alarm rate (last {window})")
    if promised_rate is not None:
        promise = f"promised {promised_rate:.3g}"
        right.axhline(promised_rate, color="tab:red", ls="--", label=promise)
    right.set(xlabel="decision", ylabel="alarm rate", title=f"{title}: alarms over time")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
