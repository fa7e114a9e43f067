"""The one pre- and post-processing path, shared by training, evaluation, export and
serving: decoding, resize, normalisation, anomaly-map assembly, smoothing, image score
and threshold. Nothing else in the project resizes an image or builds a map.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

# Refuse decompression bombs early; a 900x900 MVTec image is 0.8 MPixel.
MAX_IMAGE_PIXELS = 64_000_000


class ImageDecodeError(ValueError):
    """An input that is not a readable image; the message says which and why."""


def read_image(source: str | Path | bytes, *, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode a file or bytes into an RGB PIL image (grayscale is replicated to 3 channels)."""
    if isinstance(source, bytes | bytearray):
        name, data = "<bytes>", bytes(source)
    else:
        name = str(source)
        try:
            data = Path(source).read_bytes()
        except OSError as err:
            raise ImageDecodeError(f"{name}: cannot open ({err.strerror or err})") from err
    if not data:
        raise ImageDecodeError(f"{name}: empty input")
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > max_pixels:
            raise ImageDecodeError(
                f"{name}: {image.width}x{image.height} exceeds {max_pixels} pixels"
            )
        image.load()
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(f"{name}: {err}") from err
    except UnidentifiedImageError as err:
        raise ImageDecodeError(
            f"{name}: not a readable image (unknown format or damaged header)"
        ) from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageDecodeError(f"{name}: not a readable image ({err})") from err
    if image.mode != "RGB":
        image = (
            image.convert("L").convert("RGB")
            if image.mode in ("L", "I", "I;16", "1", "LA")
            else image.convert("RGB")
        )
    return image


def resize_mask(mask: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """A binary mask at the model's square size, (size, size) uint8 (nearest neighbour)."""
    if isinstance(mask, np.ndarray):
        mask = Image.fromarray((mask > 0).astype(np.uint8) * 255)
    resized = mask.convert("L").resize((size, size), Image.Resampling.NEAREST)
    return (np.asarray(resized) > 0).astype(np.uint8)


def read_mask(path: str | Path, size: int) -> np.ndarray:
    """Binary ground-truth mask resized to the model's square size, (size, size) uint8."""
    try:
        with Image.open(path) as mask:
            return resize_mask(mask, size)
    except (OSError, UnidentifiedImageError) as err:
        raise ImageDecodeError(f"{path}: not a readable mask ({err})") from err


class Alignment(str, Enum):
    """Pose normalisation before the model. NONE is the method's (the product lies the same
    way in every photo); PRINCIPAL_AXIS turns an elongated part lying at any angle (a
    screw) so that its long axis is horizontal, its heavier end right and its extent
    centred. A round part (a bottle seen from above) has no axis and is left as it is."""

    NONE = "none"
    PRINCIPAL_AXIS = "principal_axis"


# A part is elongated when its long axis' variance is at least this times the short one's.
MIN_ELONGATION = 2.0


def _otsu_threshold(values: torch.Tensor, bins: int = 64) -> float:
    """The threshold that best separates two classes of ``values`` (Otsu, 1979)."""
    low, high = float(values.min()), float(values.max())
    if high - low < 1e-6:
        return high
    histogram = torch.histc(values, bins=bins, min=low, max=high).double()
    p = histogram / histogram.sum()
    centres = low + (torch.arange(bins, dtype=torch.float64) + 0.5) * (high - low) / bins
    weight = p.cumsum(0)
    mass = (p * centres).cumsum(0)
    between = (mass[-1] * weight - mass) ** 2 / (weight * (1 - weight)).clamp_min(1e-12)
    return float(centres[int(between.argmax())])


def part_pixels(gray: torch.Tensor) -> torch.Tensor | None:
    """(H, W) grey image -> boolean (H, W): the part, what differs from the border's median
    grey by more than Otsu's threshold. None when that is under 0.5 % or over 60 % of the
    picture (empty, or no plain background)."""
    border = torch.cat([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    difference = (gray - border.median()).abs()
    part = difference > _otsu_threshold(difference)
    return part if 0.005 <= float(part.float().mean()) <= 0.6 else None


class ScoreRegion(str, Enum):
    """Where the image score looks. WHOLE is the method's: the smoothed map's largest value
    anywhere. PART: its largest value on the part alone (``part_region``), for a part on a
    plain background whose normals' peaks lie off the part (specks on screw's table, the
    corners an alignment turn fills). Anything beside the part is then not scored: a
    product whose defects can lie off the part (debris on a tray) keeps WHOLE."""

    WHOLE = "whole"
    PART = "part"


def part_region(image: torch.Tensor) -> torch.Tensor:
    """(3, S, S) image in [0, 1] -> boolean (S, S): the part (``part_pixels``), specks under
    5 px opened away, grown by S/64 px (4 at 256) so that a defect on its edge is kept.
    The whole picture where no part stands out (``part_pixels`` None)."""
    part = part_pixels(image.float().mean(0))
    if part is None:
        return torch.ones(image.shape[-2:], dtype=torch.bool, device=image.device)
    grow = max(1, image.shape[-1] // 64)
    mask = part.float()[None, None]
    opened = F.max_pool2d(-F.max_pool2d(-mask, 5, 1, 2), 5, 1, 2)  # erode, dilate back
    grown = F.max_pool2d(opened, 2 * grow + 1, 1, grow)[0, 0] > 0
    return grown if bool(grown.any()) else torch.ones_like(grown)


def principal_axis_pose(image: torch.Tensor) -> torch.Tensor | None:
    """(3, S, S) image in [0, 1] -> the 2x3 affine (``F.affine_grid``'s theta, normalised
    coordinates) that samples the aligned image from it; None when there is no clear axis
    (a round part, an empty or a cluttered picture). The part is what differs from the
    border's median grey (Otsu's threshold); its axis is that of its pixels' covariance."""
    gray = image.float().mean(0)
    size = gray.shape[-1]
    part = part_pixels(gray)
    if part is None:
        return None
    ys, xs = torch.nonzero(part, as_tuple=True)
    xs, ys = xs.double(), ys.double()
    cx, cy = xs.mean(), ys.mean()
    variances, vectors = torch.linalg.eigh(torch.cov(torch.stack([xs - cx, ys - cy])))
    if variances[1] < MIN_ELONGATION * variances[0]:
        return None
    vx, vy = vectors[0, 1], vectors[1, 1]
    along = (xs - cx) * vx + (ys - cy) * vy
    if (along**3).mean() > 0:  # the long tail points away from the heavy end: heavy end right
        vx, vy, along = -vx, -vy, -along
    low, high = torch.quantile(along.float(), torch.tensor([0.01, 0.99])).double()
    middle = (low + high) / 2  # centre the part's extent, not its mass
    cx, cy = cx + middle * vx, cy + middle * vy
    to_normalised = lambda c: (2 * c + 1) / size - 1  # noqa: E731 (align_corners=False)
    return torch.tensor(
        [[vx, -vy, to_normalised(cx)], [vy, vx, to_normalised(cy)]], dtype=torch.float32
    )


def invert_pose(theta: torch.Tensor) -> torch.Tensor:
    """The 2x3 affine that undoes ``theta`` (maps the aligned frame back to the photo's)."""
    full = torch.eye(3, dtype=torch.float64)
    full[:2] = theta.double()
    return torch.linalg.inv(full)[:2].float()


def warp(
    images: torch.Tensor, theta: torch.Tensor, fill: torch.Tensor | None = None
) -> torch.Tensor:
    """(C, S, S) or (S, S) sampled through ``theta``. Outside the picture: ``fill`` (one
    value per channel), else the picture's own border."""
    batch = images[None] if images.dim() == 3 else images[None, None]
    grid = F.affine_grid(theta[None].to(batch), list(batch.shape), align_corners=False)
    if fill is None:
        out = F.grid_sample(batch, grid, padding_mode="border", align_corners=False)
    else:
        inside = F.grid_sample(torch.ones_like(batch[:, :1]), grid, align_corners=False)
        out = F.grid_sample(batch, grid, padding_mode="zeros", align_corners=False)
        out = out + (1 - inside) * fill.to(batch).view(1, -1, 1, 1)
    return out[0] if images.dim() == 3 else out[0, 0]


@dataclass(frozen=True)
class PreProcessing:
    """Image -> normalised tensor: antialiased resize to a square, optional pose
    normalisation (``Alignment``), per-channel mean/std."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    alignment: Alignment = Alignment.NONE

    def __post_init__(self) -> None:
        object.__setattr__(self, "alignment", Alignment(self.alignment))

    def to_dict(self) -> dict:
        data = asdict(self) | {"alignment": self.alignment.value}
        if self.alignment is Alignment.NONE:
            del data["alignment"]  # what earlier readers (and cache keys) know
        return data

    @classmethod
    def from_dict(cls, data: dict) -> PreProcessing:
        return cls(
            data["image_size"],
            tuple(data["mean"]),
            tuple(data["std"]),
            Alignment(data.get("alignment", Alignment.NONE.value)),
        )

    def resize(self, image: Image.Image) -> torch.Tensor:
        """uint8 RGB image -> float tensor (3, S, S) in [0, 1], antialiased."""
        array = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))
        tensor = array.permute(2, 0, 1)[None].float() / 255.0
        size = (self.image_size, self.image_size)
        if tuple(tensor.shape[-2:]) != size:
            tensor = F.interpolate(
                tensor, size=size, mode="bilinear", antialias=True, align_corners=False
            ).clamp_(0, 1)
        return tensor[0]

    def align(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Resized image -> (aligned image, its pose, None when left as it is)."""
        if self.alignment is Alignment.NONE:
            return tensor, None
        theta = principal_axis_pose(tensor)
        if theta is None:
            return tensor, None
        edges = torch.cat([tensor[:, 0], tensor[:, -1], tensor[:, :, 0], tensor[:, :, -1]], 1)
        return warp(tensor, theta, fill=edges.median(dim=1).values), theta

    def _channel_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        def as_tensor(values):
            return torch.tensor(values, dtype=like.dtype, device=like.device)[:, None, None]

        return as_tensor(self.mean), as_tensor(self.std)

    def normalize(self, tensor: torch.Tensor) -> torch.Tensor:
        mean, std = self._channel_stats(tensor)
        return (tensor - mean) / std

    def denormalize(self, tensor: torch.Tensor) -> torch.Tensor:
        mean, std = self._channel_stats(tensor)
        return tensor * std + mean

    def part_regions(self, batch: torch.Tensor) -> torch.Tensor:
        """Model inputs (N, 3, S, S), aligned and normalised -> (N, S, S) boolean: where
        ``ScoreRegion.PART`` scores each, in the frame of its anomaly map."""
        return torch.stack([part_region(self.denormalize(image.cpu())) for image in batch])

    def transform(
        self, source: str | Path | bytes | Image.Image
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(model input, pose): a pose is what ``PostProcessing.to_input_frame`` needs to
        put the anomaly map back onto the photo."""
        image = source if isinstance(source, Image.Image) else read_image(source)
        aligned, theta = self.align(self.resize(image.convert("RGB")))
        return self.normalize(aligned), theta

    def __call__(self, source: str | Path | bytes | Image.Image) -> torch.Tensor:
        return self.transform(source)[0]


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = int(4.0 * sigma + 0.5)  # scipy.ndimage's default truncate=4.0
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).float()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian filter of (N, H, W) maps, 'reflect' borders as scipy.ndimage."""
    if sigma <= 0:
        return maps
    kernel = _gaussian_kernel(sigma).to(maps.device)
    radius = kernel.numel() // 2
    x = maps[:, None].float()

    def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
        # scipy's 'reflect' (d c b a | a b c d | d c b a), any pad width.
        size = t.shape[dim]
        index = torch.arange(-radius, size + radius, device=t.device) % (2 * size)
        index = torch.where(index >= size, 2 * size - 1 - index, index)
        return t.index_select(dim, index)

    x = F.conv2d(pad(x, 3), kernel.view(1, 1, 1, -1))
    x = F.conv2d(pad(x, 2), kernel.view(1, 1, -1, 1))
    return x[:, 0]


@dataclass(frozen=True)
class PostProcessing:
    """Level score grids -> anomaly map -> image score -> decision."""

    image_size: int
    score_sigma: float = 4.0
    threshold: float | None = None
    threshold_mode: str | None = None
    # None: the method's plain average of the levels; else one weight per level (summing
    # to 1), chosen on validation data (see fod_core.level_weights.LevelWeighting).
    level_weights: tuple[float, ...] | None = None
    # None: the maps as they are. Else one scale per branch, each map divided by its own
    # before weighting: a model with a retrieval branch adds a squared feature distance to
    # FOD's scores, and the weights compare like with like only on one scale (each
    # branch's typical maximum on normal validation images, fod_core.level_weights).
    branch_scales: tuple[float, ...] | None = None
    # where the image score looks (ScoreRegion): the whole map, or the part alone
    score_region: ScoreRegion = ScoreRegion.WHOLE

    def __post_init__(self) -> None:
        object.__setattr__(self, "score_region", ScoreRegion(self.score_region))

    def to_dict(self) -> dict:
        data = asdict(self) | {"score_region": self.score_region.value}
        if self.level_weights is None:
            del data["level_weights"]  # what format-1 readers know
        if self.branch_scales is None:
            del data["branch_scales"]  # what format-4 readers know
        if self.score_region is ScoreRegion.WHOLE:
            del data["score_region"]  # what earlier readers know
        return data

    @classmethod
    def from_dict(cls, data: dict) -> PostProcessing:
        data = dict(data)
        for key in ("level_weights", "branch_scales"):
            if data.get(key) is not None:
                data[key] = tuple(float(w) for w in data[key])
        return cls(**data)

    def used_levels(self, n_levels: int) -> list[bool]:
        """Which levels the map depends on: a level weighted 0 need not be scored."""
        if self.level_weights is None:
            return [True] * n_levels
        if len(self.level_weights) != n_levels:
            raise ValueError(f"{len(self.level_weights)} level weights for {n_levels} levels")
        return [w > 0 for w in self.level_weights]

    def upsample(self, level_maps: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """Each level's (N, H_l, W_l) grid bilinearly upsampled (align_corners=True); a
        level that was not scored (None) stays None."""
        size = (self.image_size, self.image_size)

        def up(grid: torch.Tensor) -> torch.Tensor:
            return F.interpolate(grid[:, None].float(), size, mode="bilinear", align_corners=True)

        return [None if m is None else up(m)[:, 0] for m in level_maps]

    def combine(self, upsampled: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """The levels' upsampled maps -> one anomaly map (average, or weighted average).
        Only a level weighted 0 may be missing (None)."""
        used = self.used_levels(len(upsampled))
        missing = [i for i, m in enumerate(upsampled) if m is None and used[i]]
        if missing:
            raise ValueError(f"level(s) {missing} were not scored but the map needs them")
        if self.branch_scales is not None:
            upsampled = [
                None if m is None else m / s
                for m, s in zip(upsampled, self.branch_scales, strict=True)
            ]
        if self.level_weights is None:
            return torch.stack(list(upsampled)).mean(0)
        weighted = [w * m for w, m in zip(self.level_weights, upsampled, strict=True) if w > 0]
        return torch.stack(weighted).sum(0)

    @staticmethod
    def to_input_frame(maps: torch.Tensor, poses: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """(N, S, S) maps of aligned images -> the same maps on the photos as they were
        (``PreProcessing.transform``'s poses; None: not aligned, left as it is)."""
        if all(p is None for p in poses):
            return maps
        return torch.stack(
            [m if p is None else warp(m, invert_pose(p)) for m, p in zip(maps, poses, strict=True)]
        )

    def anomaly_map(self, level_maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """Level grids -> (N, S, S) anomaly map at the input size."""
        return self.combine(self.upsample(level_maps))

    def image_score(
        self, anomaly_map: torch.Tensor, regions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Max of the Gaussian-smoothed map; (N,). ``regions`` (N, S, S) boolean, in the
        map's frame: the max within each alone (``ScoreRegion.PART``)."""
        smoothed = gaussian_blur(anomaly_map, self.score_sigma)
        if regions is not None:
            regions = regions.to(smoothed.device, torch.bool)
            smoothed = smoothed.masked_fill(~regions, float("-inf"))
        return smoothed.flatten(1).max(dim=1).values

    def needs_regions(self) -> bool:
        """Whether the image score needs ``PreProcessing.part_regions`` of its inputs."""
        return self.score_region is ScoreRegion.PART

    @staticmethod
    def grid(anomaly_map: np.ndarray | torch.Tensor, size: int) -> np.ndarray:
        """The map averaged over size x size cells: a compact map for clients (serving)."""
        tensor = torch.as_tensor(np.asarray(anomaly_map), dtype=torch.float32)[None, None]
        return F.adaptive_avg_pool2d(tensor, size)[0, 0].numpy()

    def is_anomalous(self, scores: torch.Tensor | np.ndarray) -> np.ndarray:
        if self.threshold is None:
            raise ValueError("the model has no calibrated threshold; run calibration first")
        from fod_core.metrics import alarms

        return alarms(scores, self.threshold)
