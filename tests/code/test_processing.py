"""The shared pre/post-processing: decoding errors, resize, smoothing, map assembly."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter

from fod_core.processing import (
    Alignment,
    ImageDecodeError,
    PostProcessing,
    PreProcessing,
    gaussian_blur,
    read_image,
    read_mask,
)
from fod_core.synthetic import rotated_part


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("shape", [(40, 37), (5, 6), (1, 64)])
def test_gaussian_blur_matches_scipy(shape):
    maps = torch.rand(2, *shape)
    expected = np.stack([gaussian_filter(m, 4.0) for m in maps.numpy()])
    assert np.allclose(gaussian_blur(maps, 4.0).numpy(), expected, atol=1e-6)


def test_grayscale_is_replicated_and_resized():
    gray = Image.fromarray(np.tile(np.arange(50, dtype=np.uint8), (30, 1)), mode="L")
    pre = PreProcessing(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    tensor = pre(png_bytes(gray))
    assert tensor.shape == (3, 32, 32)
    assert torch.equal(tensor[0], tensor[1]) and torch.equal(tensor[1], tensor[2])
    assert float(tensor.min()) >= -1.0 and float(tensor.max()) <= 1.0


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "empty"),
        (b"not an image at all", "unknown format"),
        (png_bytes(Image.new("RGB", (8, 8)))[:40], "not a readable image"),
    ],
)
def test_bad_bytes_are_a_clear_error(payload, message):
    with pytest.raises(ImageDecodeError, match=message):
        read_image(payload)


def test_missing_file_and_huge_image(tmp_path):
    with pytest.raises(ImageDecodeError, match="cannot open"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(ImageDecodeError, match="exceeds"):
        read_image(png_bytes(Image.new("L", (100, 100))), max_pixels=50 * 50)


def test_mask_is_binary_at_model_size(tmp_path):
    mask = np.zeros((90, 90), np.uint8)
    mask[10:40, 10:40] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    resized = read_mask(tmp_path / "m.png", 30)
    assert resized.shape == (30, 30)
    assert set(np.unique(resized)) == {0, 1}
    assert resized[5, 5] == 1 and resized[20, 20] == 0


def test_post_processing_map_score_and_decision():
    post = PostProcessing(image_size=16, score_sigma=0.0, threshold=0.5)
    level_maps = [torch.zeros(2, 4, 4), torch.zeros(2, 2, 2)]
    level_maps[0][1, 2, 2] = 2.0
    anomaly_map = post.anomaly_map(level_maps)
    assert anomaly_map.shape == (2, 16, 16)
    scores = post.image_score(anomaly_map)
    assert scores[0] == 0 and scores[1] == pytest.approx(1.0)  # mean of the two levels
    assert post.is_anomalous(scores).tolist() == [False, True]
    with pytest.raises(ValueError, match="threshold"):
        PostProcessing(image_size=16).is_anomalous(scores)


def test_level_weights_weight_the_maps_and_are_stored():
    level_maps = [torch.ones(1, 4, 4), torch.zeros(1, 2, 2)]
    weighted = PostProcessing(image_size=8, level_weights=(0.9, 0.1))
    assert torch.allclose(weighted.anomaly_map(level_maps), torch.full((1, 8, 8), 0.9))
    assert torch.allclose(PostProcessing(8).anomaly_map(level_maps), torch.full((1, 8, 8), 0.5))
    assert PostProcessing.from_dict(weighted.to_dict()) == weighted
    # Without weights the settings are what readers of format 1 know.
    assert "level_weights" not in PostProcessing(8).to_dict()
    with pytest.raises(ValueError, match="2 level weights for 3 levels"):
        weighted.anomaly_map([*level_maps, torch.zeros(1, 2, 2)])


def test_a_level_weighted_zero_may_be_left_unscored():
    level_maps = [torch.ones(1, 4, 4), torch.zeros(1, 2, 2)]
    fine_only = PostProcessing(image_size=8, level_weights=(1.0, 0.0))
    assert fine_only.used_levels(2) == [True, False]
    assert PostProcessing(8).used_levels(2) == [True, True]
    assert torch.allclose(fine_only.anomaly_map([level_maps[0], None]), torch.ones(1, 8, 8))
    assert torch.allclose(fine_only.anomaly_map(level_maps), torch.ones(1, 8, 8))
    with pytest.raises(ValueError, match=r"level\(s\) \[0\] were not scored"):
        fine_only.anomaly_map([None, level_maps[1]])
    with pytest.raises(ValueError, match="not scored"):
        PostProcessing(8).anomaly_map([level_maps[0], None])


def screw_like(angle_degrees: float, centre=(48, 48)) -> Image.Image:
    return rotated_part(angle_degrees, size=96, centre=centre, seed=int(angle_degrees))


def part_axis(tensor: torch.Tensor) -> tuple[float, float, float]:
    """(axis angle in degrees mod 180, head side along x: -1 or 1, centre x offset)."""
    gray = tensor.mean(0).numpy()
    ys, xs = np.nonzero(gray < 0.5)
    cov = np.cov(np.stack([xs - xs.mean(), ys - ys.mean()]))
    vx, vy = np.linalg.eigh(cov)[1][:, 1]
    heavy = np.sign(((xs - xs.mean()) ** 3).mean())  # long tail toward the tip
    return np.degrees(np.arctan2(vy, vx)) % 180, -heavy, xs.mean() - gray.shape[1] / 2


@pytest.mark.parametrize("angle", [0, 37, 90, 150, 217, 300])
def test_principal_axis_turns_a_part_at_any_angle_onto_one_pose(angle):
    pre = PreProcessing(96, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), Alignment.PRINCIPAL_AXIS)
    aligned, pose = pre.transform(screw_like(angle, centre=(40, 55)))
    assert pose is not None
    axis, head_side, offset = part_axis(aligned)
    assert min(axis, 180 - axis) < 3  # horizontal
    reference_side = part_axis(pre(screw_like(0)))[1]
    assert head_side == reference_side  # the heavy end always on the same side
    assert abs(offset) < 6  # and the part's extent centred


def test_a_round_part_or_an_empty_picture_is_left_as_it_is():
    ys, xs = np.mgrid[0:96, 0:96]
    disc = np.where((ys - 50) ** 2 + (xs - 44) ** 2 < 30**2, 60, 200).astype(np.uint8)
    pre = PreProcessing(96, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), Alignment.PRINCIPAL_AXIS)
    for image in (Image.fromarray(disc, "L"), Image.new("L", (96, 96), 128)):
        tensor, pose = pre.transform(image)
        assert pose is None
        assert torch.equal(tensor, PreProcessing(96, (0.0,) * 3, (1.0,) * 3)(image))


def test_an_aligned_map_goes_back_onto_the_photo():
    """A map drawn on the aligned image, put back, lands where the part is in the photo."""
    pre = PreProcessing(96, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), Alignment.PRINCIPAL_AXIS)
    photo = screw_like(120, centre=(52, 44))
    aligned, pose = pre.transform(photo)
    part_in_aligned = (aligned.mean(0) < 0.5).float()
    back = PostProcessing.to_input_frame(part_in_aligned[None], [pose])[0]
    part_in_photo = torch.from_numpy(np.asarray(photo) < 128).float()
    overlap = (back > 0.5).float()
    iou = (overlap * part_in_photo).sum() / ((overlap + part_in_photo) > 0).sum()
    assert iou > 0.8
    unaligned = torch.rand(2, 96, 96)
    assert torch.equal(PostProcessing.to_input_frame(unaligned, [None, None]), unaligned)


def test_alignment_is_stored_and_earlier_manifests_read_as_none():
    aligned = PreProcessing(64, (0.1, 0.2, 0.3), (1.0, 1.0, 1.0), Alignment.PRINCIPAL_AXIS)
    assert PreProcessing.from_dict(aligned.to_dict()) == aligned
    plain = PreProcessing(64, (0.1, 0.2, 0.3), (1.0, 1.0, 1.0))
    assert "alignment" not in plain.to_dict()  # feature cache keys of earlier runs still hit
    assert PreProcessing.from_dict(plain.to_dict()).alignment is Alignment.NONE


def _part_on_a_plain_table(speck: bool) -> torch.Tensor:
    """(3, 64, 64) in [0, 1]: a dark bar (the part) on a light table, maybe with a speck."""
    image = torch.full((3, 64, 64), 0.8)
    image[:, 28:36, 10:54] = 0.2
    if speck:
        image[:, 4:6, 4:6] = 0.2  # 2x2 px, away from the part
    return image


def test_the_part_region_is_the_part_grown_without_specks():
    from fod_core.processing import part_region

    region = part_region(_part_on_a_plain_table(speck=True))
    assert region[32, 30] and region[27, 30]  # on the part, and 1 px beside it (grown)
    assert not region[4, 4]  # the speck is opened away
    assert not region[60, 60] and not region[10, 30]  # the table
    plain = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert part_region(plain).all()  # no plain background: the whole picture


def test_the_score_over_the_part_ignores_a_peak_beside_it():
    from fod_core.processing import ScoreRegion

    pre = PreProcessing(64, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    batch = torch.stack([pre.normalize(_part_on_a_plain_table(speck=True))])
    regions = pre.part_regions(batch)
    maps = torch.zeros(1, 64, 64)
    maps[0, 4:6, 4:6] = 10.0  # the normal's speck
    maps[0, 31, 30] = 3.0  # a small defect on the part
    post = PostProcessing(64, 1.0, score_region=ScoreRegion.PART)
    whole, part = float(post.image_score(maps)), float(post.image_score(maps, regions))
    assert whole > part > 0
    assert part == pytest.approx(float(gaussian_blur(maps, 1.0)[0, 31, 30]), rel=1e-5)
    assert post.needs_regions() and not PostProcessing(64).needs_regions()
    # stored by name, and absent (the method's whole picture) for earlier readers
    assert PostProcessing.from_dict(post.to_dict()).score_region is ScoreRegion.PART
    assert "score_region" not in PostProcessing(64).to_dict()
    assert PostProcessing.from_dict(PostProcessing(64).to_dict()).score_region is ScoreRegion.WHOLE
