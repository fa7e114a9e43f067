"""Label-free choices on validation data: the level-weight grid, the choice, planted anomalies."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from fod_core.level_weights import choose_level_weights, weight_grid
from fod_core.synthetic import plant_anomaly


def test_weight_grid_covers_the_simplex():
    two = weight_grid(2, 0.1)
    assert len(two) == 11 and (0.5, 0.5) in two and (1.0, 0.0) in two
    three = weight_grid(3, 0.5)
    assert len(three) == 6
    assert all(sum(w) == pytest.approx(1.0) and min(w) >= 0 for w in two + three)


def _maps_and_masks(seed: int = 0):
    """Level 'sharp' marks the anomalies, level 'blurred' only their surroundings."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((12, 32, 32), bool)
    for i in range(6, 12):
        y, x = rng.integers(4, 24, 2)
        masks[i, y : y + 5, x : x + 5] = True
    sharp = masks + rng.normal(0, 0.2, masks.shape)
    blurred = np.stack([ndimage.gaussian_filter(m.astype(float), 6) for m in masks]) * 20
    blurred += rng.normal(0, 0.2, masks.shape)
    return sharp, blurred, masks


def test_the_level_that_localises_gets_the_weight():
    sharp, blurred, masks = _maps_and_masks()
    choice = choose_level_weights([sharp, blurred], masks)
    assert choice.weights[0] > 0.5
    assert (choice.n_normal, choice.n_anomalous) == (6, 6)
    assert len(choice.candidates) == 11
    swapped = choose_level_weights([blurred, sharp], masks)
    assert swapped.weights == tuple(reversed(choice.weights))


def test_ties_go_to_the_methods_equal_weights():
    _, _, masks = _maps_and_masks()
    same = masks + np.random.default_rng(4).normal(0, 0.2, masks.shape)
    assert choose_level_weights([same, same], masks).weights == (0.5, 0.5)


def test_level_weights_need_anomalous_pixels():
    sharp, blurred, masks = _maps_and_masks()
    with pytest.raises(ValueError, match="both normal and anomalous"):
        choose_level_weights([sharp, blurred], np.zeros_like(masks))


def test_planted_anomaly_changes_only_its_connected_mask():
    rng = np.random.default_rng(1)
    image = np.random.default_rng(2).uniform(0, 1, (128, 128, 3)).astype(np.float32)
    donor = np.random.default_rng(3).uniform(0, 1, (128, 128, 3)).astype(np.float32)
    for _ in range(20):
        planted, mask = plant_anomaly(image, donor, rng)
        assert planted.shape == image.shape and planted.dtype == np.float32
        assert 0.0005 < mask.mean() < 0.1
        assert ndimage.label(mask, structure=np.ones((3, 3)))[1] == 1
        changed = np.abs(planted - image).max(-1) > 0
        assert not changed[~mask].any() and changed[mask].mean() > 0.5
        assert planted.min() >= 0 and planted.max() <= 1
    again = plant_anomaly(image, donor, np.random.default_rng(1))
    first = plant_anomaly(image, donor, np.random.default_rng(1))
    assert np.array_equal(again[1], first[1]) and np.array_equal(again[0], first[0])


def test_part_planting_is_small_and_on_the_part():
    """Planting.PART: a screw's defects are small and on the screw, not on the background."""
    from fod_core.synthetic import Planting, part_mask, rotated_part

    image = np.asarray(rotated_part(35, size=256, seed=4).convert("RGB"), np.float32) / 255
    part = part_mask(image)
    assert part is not None and 0.01 < part.mean() < 0.2
    rng = np.random.default_rng(0)
    small, anywhere = [], []
    for _ in range(12):
        _, mask = plant_anomaly(image, image, rng, Planting.PART)
        assert ndimage.label(mask, structure=np.ones((3, 3)))[1] == 1
        assert (mask & ndimage.binary_dilation(part, iterations=2)).any()  # touches the part
        small.append(mask.mean())
        anywhere.append(plant_anomaly(image, image, rng)[1].mean())
    assert max(small) < 0.012 and np.median(small) < np.median(anywhere) / 3
    # a photo with nothing standing out: planted anywhere, as before
    flat = np.full((64, 64, 3), 0.5, np.float32)
    assert part_mask(flat) is None
    assert plant_anomaly(flat, flat, rng, Planting.PART)[1].any()


def test_default_planting_draws_what_it_always_drew():
    """Planted sets are compared across model versions: the default's draws must not move.
    (Mask sizes from the code before Planting existed, same seeds.)"""
    image = np.random.default_rng(2).uniform(0, 1, (64, 64, 3)).astype(np.float32)
    sizes = [int(plant_anomaly(image, image, np.random.default_rng(s))[1].sum()) for s in range(5)]
    assert sizes == [46, 101, 317, 39, 179]
