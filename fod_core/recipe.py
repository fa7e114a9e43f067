"""Recipe settings chosen at training time by a stated, label-free rule, never fixed after
looking at test labels.

The nearest-normal reference's K (how many training normals are averaged into an image's
reference): before training, each candidate K scores the validation's *choice* images and
copies of them with planted anomalies by the training-free retrieval distance (the largest
per-position squared distance of the finer level's features to the mean of the K nearest
training normals, found as ``FODModel.neighbours`` finds them). The K with the best image
AUROC of planted against clean wins; ties go to the smaller K (cheaper, closer to the
image itself). The calibration images take no part, so the threshold's promise holds.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from fod_core.metrics import image_auroc
from fod_core.processing import read_image
from fod_core.synthetic import PLANTED_SEED, Planting, planted_copies

log = logging.getLogger(__name__)

K_CANDIDATES = (1, 3, 5, 10)
AUTO = 0  # ``ModelConfig.reference_k`` 0: choose K by this rule at training time


@dataclass(frozen=True)
class ReferenceKChoice:
    k: int
    rule: str
    n_choice_images: int
    n_planted: int
    candidates: list[dict] = field(default_factory=list)  # per K: its planted image AUROC

    def to_dict(self) -> dict:
        return asdict(self)


def require_choice_images(n_choice: int) -> None:
    """Fail before any work when K cannot be chosen."""
    from fod_core.data import DatasetError

    if n_choice == 0:
        raise DatasetError(
            "choosing the reference K needs validation images to choose on (the choice part "
            "is empty): add normal images, raise the validation or choice fraction, or give "
            "--reference-k"
        )


@torch.no_grad()
def _finer_level(extractor, pre, images: Sequence, batch_size: int = 8) -> torch.Tensor:
    parts = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        batch = torch.stack([pre(read_image(i) if isinstance(i, str | Path) else i) for i in chunk])
        parts.append(extractor(batch)[0].float().cpu())
    return torch.cat(parts)


def retrieval_scores(bank: torch.Tensor, queries: torch.Tensor, ks: Sequence[int]) -> dict:
    """Per K: each query's largest per-position squared distance to the mean of its K
    nearest bank maps (whole-map squared distance, as the model retrieves)."""
    flat_bank = bank.flatten(2)  # (M, C, L)
    flat = flat_bank.flatten(1)
    scores: dict[int, list[float]] = {k: [] for k in ks}
    for image in queries.flatten(2):
        order = ((flat - image.flatten()[None]) ** 2).sum(1).argsort()
        for k in ks:
            reference = flat_bank[order[:k]].mean(0)
            scores[k].append(float(((image - reference) ** 2).sum(0).max()))
    return {k: np.asarray(v) for k, v in scores.items()}


def choose_reference_k(
    extractor,
    pre,
    train_level0: torch.Tensor,
    choice_images: Sequence[str | Path],
    *,
    planting: Planting | str = Planting.ANYWHERE,
    per_image: int = 3,
    candidates: Sequence[int] = K_CANDIDATES,
) -> ReferenceKChoice:
    """K for the nearest-normal reference, by the module's rule, on the choice images."""
    require_choice_images(len(choice_images))
    ks = [k for k in candidates if k <= train_level0.shape[0]] or [1]
    normals, draws = planted_copies(
        list(choice_images), per_image=per_image, seed=PLANTED_SEED, planting=Planting(planting)
    )
    planted = [image for image, _ in draws]
    queries = _finer_level(extractor, pre, list(normals) + planted)
    scores = retrieval_scores(train_level0.float(), queries, ks)
    labels = np.r_[np.zeros(len(normals)), np.ones(len(planted))]
    rows = [{"k": k, "planted_image_auroc": round(image_auroc(labels, scores[k]), 4)} for k in ks]
    best = max(rows, key=lambda r: (r["planted_image_auroc"], -r["k"]))
    choice = ReferenceKChoice(
        best["k"],
        "best planted image AUROC of the training-free retrieval distance on the choice "
        "images, ties to the smaller K",
        len(normals),
        len(planted),
        rows,
    )
    log.info("reference K %d chosen on %d choice images: %s", choice.k, len(normals), rows)
    return choice
