"""The retrieval distance: a score branch beside FOD's levels, not part of the method.

Each position of an image's finer feature level is compared with the same neighbourhood
(``window`` x ``window`` positions) of its reference rows: the K training normals nearest
to the image (``ReferenceMode.NEAREST``), or the class reference. The branch's map is the
smallest squared distance found. Small shifts of a part (a screw's thread phase, a turn
that alignment left) find their match a position away instead of raising an alarm; a
defect matches nothing nearby. It needs no training: what FOD's transformers learn is
added to it, weighted on planted anomalies (``fod_core.level_weights``), and the recipe
that uses it is chosen without labels (``fod_core.recipe``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NO_RETRIEVAL = 0  # ``ModelConfig.retrieval_window`` 0: the method's score, no such branch


def window_min_distance(features: torch.Tensor, rows: torch.Tensor, window: int) -> torch.Tensor:
    """features (N, C, H, W), rows (N or 1, K, C, H, W) -> (N, H, W): per position the
    smallest squared distance to any of the K rows within ``window`` x ``window``
    positions (edges repeated). ``window`` 1 compares position with position."""
    if window < 1 or window % 2 == 0:
        raise ValueError(f"the retrieval window must be an odd number >= 1, got {window}")
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
