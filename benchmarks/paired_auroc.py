"""How sure is "FOD's image AUROC >= the peer's"? A paired, stratified bootstrap of the
difference on one product's test images.

Both models scored the same test images (``bench_products.py``: FOD's
``evaluation/predictions.csv``, a peer's ``test_scores``). Each resample draws the normal
and the anomalous images with replacement, apart (their counts stay fixed), and takes both
models' AUROC on the same draw, so what the two share (a hard image) cancels out. A gap of
0.002 on 109 normals and 313 defects is a few dozen of 34,000 pairs: this says whether such
a gap is a finding or the draw of test images.

    python benchmarks/paired_auroc.py --results benchmarks/results/products.json
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from bench_products import PEERS


def auroc(normal: np.ndarray, anomalous: np.ndarray) -> np.ndarray:
    """AUROC per row (Mann-Whitney, ties count half): normal (B, n), anomalous (B, m)."""
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([normal, anomalous], axis=1), axis=1)
    n, m = normal.shape[1], anomalous.shape[1]
    return (ranks[:, n:].sum(axis=1) - m * (m + 1) / 2) / (n * m)


@dataclass(frozen=True)
class PairedDifference:
    """FOD's AUROC minus the peer's, on the test images, and its bootstrap interval."""

    fod: float
    peer: float
    difference: float
    low: float  # the 2.5% quantile of the resampled differences
    high: float  # the 97.5% quantile
    share_fod_not_behind: float  # resamples where FOD's AUROC >= the peer's (ties too)
    n_normal: int
    n_anomalous: int

    def describe(self) -> str:
        return (
            f"{self.difference:+.4f} [{self.low:+.4f}, {self.high:+.4f}], "
            f"FOD >= peer in {self.share_fod_not_behind:.0%} of resamples"
        )


def paired_difference(
    labels: np.ndarray,
    fod_scores: np.ndarray,
    peer_scores: np.ndarray,
    *,
    resamples: int = 2000,
    seed: int = 0,
) -> PairedDifference:
    labels = np.asarray(labels).astype(bool)
    fod_scores, peer_scores = np.asarray(fod_scores, float), np.asarray(peer_scores, float)
    if not (labels.any() and (~labels).any()):
        raise ValueError("a paired AUROC needs normal and anomalous test images")
    normal, anomalous = np.flatnonzero(~labels), np.flatnonzero(labels)
    rng = np.random.default_rng(seed)
    draw_n = rng.choice(normal, (resamples, len(normal)))
    draw_a = rng.choice(anomalous, (resamples, len(anomalous)))
    fod = auroc(fod_scores[draw_n], fod_scores[draw_a])
    peer = auroc(peer_scores[draw_n], peer_scores[draw_a])
    differences = fod - peer
    whole_fod = float(auroc(fod_scores[normal][None], fod_scores[anomalous][None])[0])
    whole_peer = float(auroc(peer_scores[normal][None], peer_scores[anomalous][None])[0])
    return PairedDifference(
        fod=whole_fod,
        peer=whole_peer,
        difference=whole_fod - whole_peer,
        low=float(np.quantile(differences, 0.025)),
        high=float(np.quantile(differences, 0.975)),
        share_fod_not_behind=float(np.mean(differences >= 0)),
        n_normal=len(normal),
        n_anomalous=len(anomalous),
    )


def fod_test_scores(model_dir: str | Path) -> dict[str, tuple[int, float]]:
    """FOD's test predictions, by path: (label, score)."""
    with open(Path(model_dir) / "evaluation" / "predictions.csv", newline="") as handle:
        return {
            row["path"]: (int(row["label"]), float(row["score"])) for row in csv.DictReader(handle)
        }


def matched(fod: dict[str, tuple[int, float]], peer: dict[str, float]):
    """Labels and both models' scores for the same images: a peer names an image by its
    identity (its path relative to the category folder), FOD by its path."""
    labels, fod_scores, peer_scores, used = [], [], [], set()
    for path, (label, score) in fod.items():
        keys = [k for k in peer if path == k or path.endswith("/" + k)]
        if len(keys) != 1:
            raise ValueError(f"{path}: {len(keys)} images of the peer's match it")
        if keys[0] in used:
            raise ValueError(f"{keys[0]}: the peer's image matches two of FOD's")
        used.add(keys[0])
        labels.append(label)
        fod_scores.append(score)
        peer_scores.append(peer[keys[0]])
    if used != set(peer):
        raise ValueError(f"FOD scored {len(labels)} test images, the peer {len(peer)}")
    return np.array(labels), np.array(fod_scores), np.array(peer_scores)


def compare(
    results: dict, resamples: int = 2000, products: Sequence[str] = ()
) -> list[tuple[str, str, PairedDifference]]:
    """Every product (or those named) whose FOD predictions are on this machine; a product
    whose model folder is gone (another machine, a fresh clone) is named and skipped."""
    rows = []
    for name, entry in results["products"].items():
        if "fod" not in entry or (products and name not in products):
            continue
        predictions = Path(entry["fod"]["model_dir"]) / "evaluation" / "predictions.csv"
        if not predictions.is_file():
            print(
                f"{name}: skipped, FOD's per-image scores are not here ({predictions})",
                file=sys.stderr,
            )
            continue
        fod = fod_test_scores(entry["fod"]["model_dir"])
        for peer in PEERS:
            scores = entry.get(peer, {}).get("test_scores")
            if scores:
                rows.append(
                    (name, peer, paired_difference(*matched(fod, scores), resamples=resamples))
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/products.json"))
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--product", action="append", default=[], help="only these (repeatable)")
    args = parser.parse_args()
    print("| product | peer | FOD | peer | FOD - peer [95% interval] | FOD >= peer |")
    print("|---|---|---|---|---|---|")
    for name, peer, d in compare(
        json.loads(args.results.read_text()), args.resamples, args.product
    ):
        print(
            f"| {name} | {peer} | {d.fod:.4f} | {d.peer:.4f} | {d.difference:+.4f} "
            f"[{d.low:+.4f}, {d.high:+.4f}] | {d.share_fod_not_behind:.0%} of resamples |"
        )


if __name__ == "__main__":
    main()
