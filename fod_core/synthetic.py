"""Generated data: a small dataset in the MVTec AD layout with planted defects and masks
(the demo job and the tests need no download, and a working model must find its known
defects), and synthetic anomalies planted into real normal images, which let choices
about anomaly maps be made on validation data without any labelled defect.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from enum import Enum
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from scipy import ndimage

DEFECT_TYPES = ("scratch", "stain")


class Planting(str, Enum):
    """Where planted anomalies go and how large they are. ANYWHERE: 0.3-3 % of the image,
    centred anywhere but the outer eighth (a product that fills the photo: bottle). PART:
    0.05-0.5 %, centred on the part (``fod_core.processing.part_pixels``), for small defects
    on a part that fills little of the photo (screw); anywhere when no part stands out."""

    ANYWHERE = "anywhere"
    PART = "part"


PLANTED_AREA = {Planting.ANYWHERE: (0.003, 0.03), Planting.PART: (0.0005, 0.005)}


def _normal_image(rng: np.random.Generator, size: int) -> Image.Image:
    """A textured plate with a round part on it, slightly jittered in place and light."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = 0.45 + 0.1 * xx + 0.05 * yy + rng.normal(0, 0.015, (size, size))
    weave = 0.04 * np.sin(2 * np.pi * 12 * xx) * np.sin(2 * np.pi * 12 * yy)
    gray = np.clip(base + weave, 0, 1)
    rgb = np.stack([gray * 0.9, gray * 0.95, gray], axis=-1) * rng.uniform(0.95, 1.05)
    image = Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    cx, cy = size / 2 + rng.normal(0, size * 0.01, 2)
    radius = size * 0.3
    draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=(150, 160, 175))
    inner = radius * 0.45
    draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=(95, 100, 110))
    return image.filter(ImageFilter.GaussianBlur(0.6))


def _plant_defect(
    image: Image.Image, rng: np.random.Generator, kind: str
) -> tuple[Image.Image, Image.Image]:
    size = image.width
    mask = Image.new("L", image.size, 0)
    draw_mask = ImageDraw.Draw(mask)
    draw = ImageDraw.Draw(image)
    cx, cy = rng.uniform(0.3, 0.7, 2) * size
    if kind == "scratch":
        angle = rng.uniform(0, np.pi)
        half = rng.uniform(0.15, 0.25) * size
        dx, dy = np.cos(angle) * half, np.sin(angle) * half
        width = max(3, int(size * 0.045))
        line = [(cx - dx, cy - dy), (cx + dx, cy + dy)]
        draw.line(line, fill=(235, 225, 90), width=width)
        draw_mask.line(line, fill=255, width=width)
    else:
        r = rng.uniform(0.09, 0.14) * size
        box = [cx - r, cy - r * 0.7, cx + r, cy + r * 0.7]
        draw.ellipse(box, fill=(60, 30, 25))
        draw_mask.ellipse(box, fill=255)
    return image, mask


def make_synthetic_dataset(
    root: str | Path,
    category: str = "widget",
    *,
    n_train: int = 40,
    n_test_good: int = 10,
    n_test_defect: int = 6,
    size: int = 128,
    seed: int = 0,
) -> Path:
    """Write ``root/category`` in the MVTec AD layout; returns the dataset root."""
    rng = np.random.default_rng(seed)
    base = Path(root) / category
    folders = {
        "train": base / "train" / "good",
        "good": base / "test" / "good",
        **{kind: base / "test" / kind for kind in DEFECT_TYPES},
        **{f"gt_{kind}": base / "ground_truth" / kind for kind in DEFECT_TYPES},
    }
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        _normal_image(rng, size).save(folders["train"] / f"{i:03d}.png")
    for i in range(n_test_good):
        _normal_image(rng, size).save(folders["good"] / f"{i:03d}.png")
    for kind in DEFECT_TYPES:
        for i in range(n_test_defect):
            image, mask = _plant_defect(_normal_image(rng, size), rng, kind)
            image.save(folders[kind] / f"{i:03d}.png")
            mask.save(folders[f"gt_{kind}"] / f"{i:03d}_mask.png")
    return Path(root)


def make_good_only_folder(
    root: str | Path, category: str = "widget", *, n_good: int = 40, size: int = 128, seed: int = 0
) -> Path:
    """Write ``root/category/good/`` with normal images only, the folder layout a factory
    starts with; returns the dataset root."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / category / "good"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_good):
        _normal_image(rng, size).save(folder / f"part_{i:03d}.png")
    return Path(root)


def rotated_part(
    angle_degrees: float,
    *,
    size: int = 96,
    centre: tuple[float, float] | None = None,
    seed: int = 0,
) -> Image.Image:
    """A dark bar with a wide head at one end on a light, noisy background, turned by
    ``angle_degrees``: a part that lies at any angle (a screw), for pose normalisation."""
    rng = np.random.default_rng(seed)
    cx, cy = centre or (size / 2, size / 2)
    ys, xs = np.mgrid[0:size, 0:size].astype(float)
    t = np.radians(angle_degrees)
    along = (xs - cx) * np.cos(t) + (ys - cy) * np.sin(t)
    across = -(xs - cx) * np.sin(t) + (ys - cy) * np.cos(t)
    length, width = 0.31 * size, 0.042 * size
    bar = (np.abs(along) < length) & (np.abs(across) < width)
    head = (np.abs(along + 0.9 * length) < width) & (np.abs(across) < 2.75 * width)
    gray = np.full((size, size), 200.0) + rng.normal(0, 3, (size, size))
    gray[bar | head] = 70
    return Image.fromarray(np.clip(gray, 0, 255).astype(np.uint8), mode="L")


def make_rotated_parts_folder(
    root: str | Path,
    category: str = "screwlike",
    *,
    n_good: int = 24,
    size: int = 96,
    seed: int = 0,
) -> Path:
    """``root/category/good/``: the same part at random angles and places (folder layout)."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / category / "good"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_good):
        centre = tuple(size / 2 + rng.uniform(-0.08, 0.08, 2) * size)
        rotated_part(rng.uniform(0, 360), size=size, centre=centre, seed=i).save(
            folder / f"part_{i:03d}.png"
        )
    return Path(root)


def _blob_mask(
    rng: np.random.Generator,
    height: int,
    width: int | None = None,
    *,
    area_range: tuple[float, float] = PLANTED_AREA[Planting.ANYWHERE],
    centres: np.ndarray | None = None,
) -> np.ndarray:
    """One irregular connected region covering ``area_range`` of the image (0.3-3 %),
    centred on one of ``centres`` (a boolean image) when given."""
    width = height if width is None else width
    candidates = None if centres is None else np.argwhere(centres)
    for _ in range(100):
        area = rng.uniform(*area_range) * height * width
        raw = rng.normal(size=(height, width))  # drawn before sigma, as it always was
        sigma = rng.uniform(4, 10) * (1.0 if centres is None else 0.3)  # small: finer edges
        noise = ndimage.gaussian_filter(raw, sigma=sigma)
        if candidates is not None:
            cy, cx = candidates[rng.integers(len(candidates))]
        elif height == width:  # one draw for both, as square images always had
            cy, cx = rng.integers(height // 8, height - height // 8, 2)
        else:
            cy = rng.integers(height // 8, height - height // 8)
            cx = rng.integers(width // 8, width - width // 8)
        yy, xx = np.mgrid[:height, :width]
        distance = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) / np.sqrt(area / np.pi)
        labelled, count = ndimage.label(1 - distance + 0.6 * noise / noise.std() > 0)
        if count:
            keep = labelled[cy, cx] or int(np.argmax(np.bincount(labelled.ravel())[1:])) + 1
            return labelled == keep
    raise RuntimeError("could not draw an anomaly region")  # pragma: no cover


def _fit(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A donor image resized to the image it is planted into, when the sizes differ."""
    if array.shape == shape:
        return array
    image = Image.fromarray((np.clip(array, 0, 1) * 255).astype(np.uint8))
    resized = image.resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32) / 255.0


def part_mask(image: np.ndarray) -> np.ndarray | None:
    """(H, W, 3) floats -> where the part is (boolean), or None when none stands out."""
    import torch

    from fod_core.processing import part_pixels

    part = part_pixels(torch.from_numpy(np.ascontiguousarray(image, np.float32)).mean(-1))
    return None if part is None else part.numpy()


def plant_anomaly(
    image: np.ndarray,
    donor: np.ndarray | Callable[[], np.ndarray],
    rng: np.random.Generator,
    planting: Planting = Planting.ANYWHERE,
) -> tuple[np.ndarray, np.ndarray]:
    """Replace an irregular region of ``image`` (H, W, 3 floats in [0, 1]) by foreign
    texture (a shifted region of another normal image ``donor``, or a function that loads
    it: only one kind of anomaly in three needs it), a colour change or noise, partly
    blended. Returns (image, boolean mask)."""
    height, width = image.shape[:2]
    planting = Planting(planting)
    centres = part_mask(image) if planting is Planting.PART else None
    mask = _blob_mask(rng, height, width, area_range=PLANTED_AREA[planting], centres=centres)
    kind = rng.integers(3)
    if kind == 0:
        if height == width:
            shift = rng.integers(-height // 3, height // 3, 2)
        else:
            shift = (rng.integers(-height // 3, height // 3), rng.integers(-width // 3, width // 3))
        texture = _fit(donor() if callable(donor) else donor, image.shape)
        source = np.roll(texture, tuple(shift), (0, 1))
    elif kind == 1:
        source = np.clip(image * rng.uniform(0.3, 1.7) + rng.uniform(-0.3, 0.3, 3), 0, 1)
    else:
        noise = ndimage.gaussian_filter(rng.uniform(0, 1, image.shape), (1.5, 1.5, 0))
        source = np.clip(noise * 2 - 0.5 + image * 0.3, 0, 1)
    alpha = rng.uniform(0.5, 1.0)
    out = image.copy()
    out[mask] = (1 - alpha) * image[mask] + alpha * source[mask]
    return out.astype(np.float32), mask


def plant_anomalies(
    normals: Sequence[np.ndarray],
    donors: Sequence,
    load: Callable[[object], np.ndarray],
    rng: np.random.Generator,
    *,
    per_image: int = 1,
    planting: Planting = Planting.ANYWHERE,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(planted image, mask) for ``per_image`` planted copies of every normal image
    (floats in [0, 1]), in a fixed order of draws from ``rng``; foreign texture comes from
    ``load(donor)``."""
    for _ in range(per_image):
        for image in normals:
            donor = donors[rng.integers(len(donors))]
            yield plant_anomaly(image, lambda d=donor: load(d), rng, planting)


PLANTED_SEED = 0


def planted_copies(
    normal_images: Sequence[str | Path],
    donor_images: Sequence[str | Path] = (),
    *,
    per_image: int,
    seed: int,
    planting: Planting = Planting.ANYWHERE,
) -> tuple[list[Image.Image], Iterator[tuple[Image.Image, np.ndarray]]]:
    """(normals, planted copies with their masks) at the images' own resolution, so that
    they go through the model's pre-processing like any photo. Foreign texture comes from
    ``donor_images`` (default: the normals). The copies are drawn lazily: large photos add up."""
    from fod_core.processing import read_image

    paths = list(normal_images)
    normals = [read_image(p) for p in paths]
    by_path = dict(zip(paths, normals, strict=True))

    def as_array(image: Image.Image) -> np.ndarray:
        return np.asarray(image, dtype=np.float32) / 255.0

    def to_image(array: np.ndarray) -> Image.Image:
        return Image.fromarray((np.clip(array, 0, 1) * 255 + 0.5).astype(np.uint8))

    def donor(path) -> np.ndarray:
        return as_array(by_path[path] if path in by_path else read_image(path))

    draws = plant_anomalies(
        _Converted(normals, as_array),  # floats one image at a time
        list(donor_images) or paths,
        donor,
        np.random.default_rng(seed),
        per_image=per_image,
        planting=planting,
    )
    return normals, ((to_image(image), mask) for image, mask in draws)


def planted_test_set(
    normal_images: Sequence[str | Path],
    *,
    per_image: int = 2,
    seed: int = PLANTED_SEED,
    planting: Planting = Planting.ANYWHERE,
) -> tuple[list[Image.Image], list[Image.Image], list[np.ndarray]]:
    """(normals, planted copies, their masks) of held-out normal images at their own
    resolution: evidence of what a model finds when no labelled defect exists. Depends only
    on the images and the seed, never on a model, so a challenger and the champion are
    scored on the same set; nothing but the planted region differs from the normal image."""
    paths = sorted(normal_images, key=lambda p: Path(p).name)
    normals, draws = planted_copies(paths, per_image=per_image, seed=seed, planting=planting)
    planted, masks = [], []
    for image, mask in draws:
        planted.append(image)
        masks.append(mask)
    return normals, planted, masks


class _Converted(Sequence):
    """A sequence that converts its items when they are read."""

    def __init__(self, items: Sequence, convert: Callable) -> None:
        self.items, self.convert = items, convert

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index):
        return self.convert(self.items[index])
