"""The retrieval distance: a score branch beside FOD's levels, not part of the method.

Each position of an image's finer feature level is compared with the same neighbourhood
(``window`` x ``window`` positions) of its reference rows: the K training normals nearest
to the image (``ReferenceMode.NEAREST``), or the class reference. The branch's map is the
smallest squared distance found. Small shifts of a part (a screw's thread phase, a turn
that alignment left) find their match a position away instead of raising an alarm; a
defect matches nothing nearby. It needs no training: what FOD's transformers learn is
added to it, weighted on planted anomalies (``fod_core.level_weights``), and the recipe
that uses it is chosen without labels (``fod_core.recipe``).

``ANY_POSITION`` drops the neighbourhood: each position is compared with every position of
the K rows, as SPADE does among an image's nearest normals (Cohen and Hoshen, 2020). A part
whose patterns recur anywhere (a bottle's rim turned, a cell's grain) finds its match
wherever it lies, at K x H x W comparisons per position.

``RetrievalFeatures.LOCAL`` compares richer features than the finer level alone: every
level averaged over its 3 x 3 neighbourhood and brought to the finer grid, concatenated
(PatchCore's locally aware patch features, Roth et al., 2022). A position then carries its
surroundings and the coarser level's context; its neighbours are still found as before.
``RetrievalFeatures.BOTH`` keeps both as two branches of the score: the finer level's
localises a bottle's defects best, the local features' ranks its images best, and the
weights chosen on planted anomalies take from each what it gives
(BENCHMARKS.md, "Both retrieval branches").
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

import torch
import torch.nn.functional as F

NO_RETRIEVAL = 0  # ``ModelConfig.retrieval_window`` 0: the method's score, no such branch
ANY_POSITION = -1  # ``ModelConfig.retrieval_window`` -1: every position of the K rows


class RetrievalFeatures(str, Enum):
    """What the retrieval distance compares at each position."""

    FINER = "finer"  # the finer level's features as they are
    LOCAL = "local"  # every level over its 3 x 3 neighbourhood, on the finer grid
    BOTH = "both"  # two branches: the finer level's distance, then the local features'

    def branches(self) -> tuple[RetrievalFeatures, ...]:
        """The retrieval branches this setting adds to the score, in their order."""
        if self is RetrievalFeatures.BOTH:
            return (RetrievalFeatures.FINER, RetrievalFeatures.LOCAL)
        return (self,)


def local_features(levels: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per level (N, C_l, H_l, W_l), finer first -> (N, sum C_l, H_0, W_0): each level
    averaged over 3 x 3 positions (zeros beyond the edge, as PatchCore pools), the coarser
    ones upsampled bilinearly to the finer grid, concatenated."""
    size = levels[0].shape[-2:]
    pooled = [F.avg_pool2d(f.float(), 3, stride=1, padding=1) for f in levels]
    upsampled = [
        F.interpolate(p, size=size, mode="bilinear", align_corners=False) for p in pooled[1:]
    ]
    return torch.cat([pooled[0], *upsampled], 1)


def retrieval_features(
    levels: Sequence[torch.Tensor], kind: RetrievalFeatures | str = RetrievalFeatures.FINER
) -> torch.Tensor:
    """The features the retrieval distance compares, from every level's (finer first)."""
    kind = RetrievalFeatures(kind)
    if kind is RetrievalFeatures.BOTH:
        raise ValueError("'both' names two branches: compute each of its branches() apart")
    if kind is RetrievalFeatures.LOCAL:
        return local_features(levels)
    return levels[0]


def is_window(window: int) -> bool:
    """A retrieval window: an odd number of positions, or ``ANY_POSITION``."""
    return window == ANY_POSITION or (window >= 1 and window % 2 == 1)


def window_reach(window: int) -> float:
    """How far a window looks, for ordering candidates: ``ANY_POSITION`` farthest."""
    return float("inf") if window == ANY_POSITION else float(window)


def describe_window(window: int) -> str:
    return "any position" if window == ANY_POSITION else f"{window}x{window}"


def any_position_min_distance(features: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """features (N, C, H, W), rows (N or 1, K, C, H, W) -> (N, H, W): per position the
    smallest squared distance to any position of any of the K rows. One row at a time,
    as |f|^2 + |r|^2 - 2 f.r, so memory stays at (N, H*W, H*W) whatever K is."""
    height, width = features.shape[-2:]
    queries = features.float().flatten(2).transpose(1, 2)  # (N, HW, C)
    keys = rows.float().flatten(3).transpose(2, 3)  # (N or 1, K, HW, C)
    query_norms = (queries**2).sum(-1, keepdim=True)  # (N, HW, 1)
    best = None
    for k in range(keys.shape[1]):
        key = keys[:, k]
        distance = query_norms + (key**2).sum(-1)[:, None, :] - 2 * queries @ key.transpose(1, 2)
        nearest = distance.amin(-1)
        best = nearest if best is None else torch.minimum(best, nearest)
    return best.clamp_min(0).view(features.shape[0], height, width)


def window_min_distance(features: torch.Tensor, rows: torch.Tensor, window: int) -> torch.Tensor:
    """features (N, C, H, W), rows (N or 1, K, C, H, W) -> (N, H, W): per position the
    smallest squared distance to any of the K rows within ``window`` x ``window``
    positions (edges repeated). ``window`` 1 compares position with position;
    ``ANY_POSITION`` with every position (``any_position_min_distance``)."""
    if window == ANY_POSITION:
        return any_position_min_distance(features, rows)
    if not is_window(window):
        raise ValueError(
            f"the retrieval window must be an odd number >= 1 or {ANY_POSITION} (any "
            f"position), got {window}"
        )
    features = features.float()
    rows = rows.float()
    height, width = features.shape[-2:]
    radius = window // 2
    if radius:
        flat = rows.flatten(0, 1)
        flat = F.pad(flat, (radius, radius, radius, radius), mode="replicate")
        rows = flat.view(*rows.shape[:3], height + 2 * radius, width + 2 * radius)
    best = None
    for dy in range(window):
        for dx in range(window):
            shifted = rows[..., dy : dy + height, dx : dx + width]
            distance = ((features[:, None] - shifted) ** 2).sum(2).amin(1)
            best = distance if best is None else torch.minimum(best, distance)
    return best
