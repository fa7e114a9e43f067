"""Backbone weights: offline package (remapped), local file, hub errors, random only on request."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fod_core.backbone import (
    BackboneSpec,
    BackboneWeightsError,
    FeatureExtractor,
    WeightsSource,
    create_feature_extractor,
)


@pytest.fixture(scope="module")
def lite0() -> FeatureExtractor:
    return create_feature_extractor("efficientnet_lite0")


def test_offline_package_weights_are_loaded_and_frozen(lite0):
    assert lite0.source is WeightsSource.PACKAGE
    assert lite0.channels == [40, 112] and lite0.strides == [8, 16]
    assert lite0.mean == (0.5, 0.5, 0.5)
    assert not any(p.requires_grad for p in lite0.parameters())
    lite0.train()
    assert not lite0.body.training
    maps = lite0(torch.zeros(2, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(2, 40, 8, 8), (2, 112, 4, 4)]


def test_package_weights_differ_from_random_init(lite0):
    random = create_feature_extractor("efficientnet_lite0", weights="random")
    assert random.source is WeightsSource.RANDOM
    assert random.weights_digest != lite0.weights_digest


def test_weights_file_roundtrip(tmp_path, lite0):
    path = tmp_path / "weights.pth"
    torch.save({"state_dict": lite0.body.state_dict()}, path)
    again = create_feature_extractor("efficientnet_lite0", weights_file=str(path))
    assert again.source is WeightsSource.FILE
    assert again.weights_digest == lite0.weights_digest


def test_missing_or_wrong_weights_are_clear_errors(tmp_path):
    with pytest.raises(BackboneWeightsError, match="not found"):
        create_feature_extractor("efficientnet_lite0", weights_file=str(tmp_path / "x.pth"))
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(BackboneWeightsError, match="lacks"):
        create_feature_extractor("resnet18", weights_file=str(wrong))
    with pytest.raises(BackboneWeightsError, match="no weights package"):
        FeatureExtractor(spec=BackboneSpec(name="resnet18", weights=WeightsSource.PACKAGE))


def test_hub_without_internet_is_an_error_not_random_weights(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneWeightsError, match="hub"):
        create_feature_extractor("resnet18", weights="hub")


def test_torchvision_fix_applies_exactly_when_the_ops_are_missing():
    """In a fresh interpreter: the fix is applied iff torchvision's C++ ops do not load,
    and timm imports either way."""
    code = (
        "from fod_core._compat import ensure_torchvision_importable as fix\n"
        "applied = fix()\n"
        "import timm, torchvision.extension as ext\n"
        "print(applied, ext._has_ops())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    applied, has_ops = out.stdout.split()
    assert applied != has_ops  # applied exactly when the ops are missing
