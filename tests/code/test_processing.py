"""The shared pre/post-processing: decoding errors, resize, smoothing, map assembly."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter

from fod_core.processing import (
    ImageDecodeError,
    PostProcessing,
    PreProcessing,
    gaussian_blur,
    read_image,
    read_mask,
)


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
