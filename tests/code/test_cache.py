"""The feature cache: nothing extracted twice, new images only, content-keyed."""

from __future__ import annotations

import shutil

import pytest
import torch

from fod_core.backbone import create_feature_extractor
from fod_core.cache import FeatureCache, LocalStore
from fod_core.data import load_category
from fod_core.processing import PreProcessing


@pytest.fixture(scope="module")
def extractor():
    return create_feature_extractor("efficientnet_lite0")


def test_second_run_extracts_nothing_and_new_images_only(synthetic_root, tmp_path, extractor):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root / "widget", root / "widget")
    records = load_category(root, "widget").train
    pre = PreProcessing(64, extractor.mean, extractor.std)
    cache = FeatureCache(LocalStore(tmp_path / "cache"), extractor, pre)

    first, stats = cache.features(records[:20], progress=False)
    assert (stats.hits, stats.misses) == (0, 20)
    assert [tuple(f.shape) for f in first] == [(20, 40, 8, 8), (20, 112, 4, 4)]

    again, stats = cache.features(records, progress=False)
    assert (stats.hits, stats.misses) == (20, 4)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b[:20])

    # Same features as a direct float16-rounded extraction of the same image.
    direct = extractor(pre(records[0].path)[None])
    assert torch.allclose(direct[0][0], again[0][0], rtol=2e-3, atol=2e-2)

    # A renamed copy hits (content key); a changed image misses.
    copy = records[0].path.with_name("renamed.png")
    shutil.copy(records[0].path, copy)
    records[1].path.write_bytes(records[2].path.read_bytes())
    reloaded = load_category(root, "widget").train
    _, stats = cache.features(reloaded, progress=False)
    assert stats.misses == 0


def test_other_preprocessing_is_another_cache(tmp_path, extractor, synthetic_root):
    records = load_category(synthetic_root, "widget").train[:2]
    store = LocalStore(tmp_path)
    small = FeatureCache(store, extractor, PreProcessing(64, extractor.mean, extractor.std))
    large = FeatureCache(store, extractor, PreProcessing(96, extractor.mean, extractor.std))
    assert small.prefix != large.prefix
    small.features(records, progress=False)
    _, stats = large.features(records, progress=False)
    assert stats.misses == 2
