"""The one pre- and post-processing path, shared by training, evaluation, export and
serving: decoding, resize, normalisation, anomaly-map assembly, smoothing, image score
and threshold. Nothing else in the project resizes an image or builds a map.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass
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


@dataclass(frozen=True)
class PreProcessing:
    """Image -> normalised tensor: antialiased resize to a square, per-channel mean/std."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PreProcessing:
        return cls(data["image_size"], tuple(data["mean"]), tuple(data["std"]))

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

    def normalize(self, tensor: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=tensor.dtype, device=tensor.device)[:, None, None]
        std = torch.tensor(self.std, dtype=tensor.dtype, device=tensor.device)[:, None, None]
        return (tensor - mean) / std

    def __call__(self, source: str | Path | bytes | Image.Image) -> torch.Tensor:
        image = source if isinstance(source, Image.Image) else read_image(source)
        return self.normalize(self.resize(image.convert("RGB")))


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
    # to 1), chosen on validation data (see fod_core.calibration.LevelWeighting).
    level_weights: tuple[float, ...] | None = None

    def to_dict(self) -> dict:
        data = asdict(self)
        if self.level_weights is None:
            del data["level_weights"]  # what format-1 readers know
        return data

    @classmethod
    def from_dict(cls, data: dict) -> PostProcessing:
        data = dict(data)
        if data.get("level_weights") is not None:
            data["level_weights"] = tuple(float(w) for w in data["level_weights"])
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
        if self.level_weights is None:
            return torch.stack(list(upsampled)).mean(0)
        weighted = [w * m for w, m in zip(self.level_weights, upsampled, strict=True) if w > 0]
        return torch.stack(weighted).sum(0)

    def anomaly_map(self, level_maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """Level grids -> (N, S, S) anomaly map at the input size."""
        return self.combine(self.upsample(level_maps))

    def image_score(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        """Max of the Gaussian-smoothed map; (N,)."""
        return gaussian_blur(anomaly_map, self.score_sigma).flatten(1).max(dim=1).values

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
