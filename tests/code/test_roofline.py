"""FOD's FLOPs from its configuration agree with PyTorch's own count; the machine is named."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fod_core.config import LevelConfig, ModelConfig
from fod_core.model import create_fod_model
from fod_core.roofline import Rates, achieved, fod_flops, machine, roofline_header

CHANNELS, STRIDES = (12, 20), (8, 16)
CONFIG = ModelConfig(
    image_size=64,
    levels=(LevelConfig(d_model=32, n_heads=4, n_layers=2), LevelConfig(d_model=48, n_heads=4)),
)


def explicit_attention(q, k, v, scale=None, **_):
    """SDPA as two matmuls: PyTorch's counter does not count the fused CPU kernel."""
    weights = torch.softmax(q @ k.transpose(-2, -1) * (scale or q.shape[-1] ** -0.5), dim=-1)
    return weights @ v


def features(batch: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [
        torch.randn(batch, c, 64 // s, 64 // s, generator=generator)
        for c, s in zip(CHANNELS, STRIDES, strict=True)
    ]


def counted(work) -> float:
    with FlopCounterMode(display=False) as counter:
        work()
    return float(counter.get_total_flops())


def test_scoring_flops_match_pytorchs_count(monkeypatch) -> None:
    monkeypatch.setattr(F, "scaled_dot_product_attention", explicit_attention)
    model = create_fod_model(CONFIG, in_channels=CHANNELS, strides=STRIDES).eval()
    batch = features(3)
    model.score_maps(batch)  # fills the cached reference keys and values
    expected = fod_flops(model).score
    assert counted(lambda: model.score_maps(batch)) / 3 == pytest.approx(expected, rel=1e-6)
    # a level weighted 0 is not scored, and not counted
    expected = fod_flops(model, levels=[False, True]).score
    assert 0 < expected < fod_flops(model).score
    counted_second = counted(lambda: model.score_maps(batch, levels=[False, True])) / 3
    assert counted_second == pytest.approx(expected, rel=1e-6)


def test_a_nearest_normal_reference_is_counted_per_image(monkeypatch) -> None:
    """Retrieval and each image's own reference keys and values are scoring cost too."""
    from dataclasses import replace

    from fod_core.config import ReferenceMode

    monkeypatch.setattr(F, "scaled_dot_product_attention", explicit_attention)
    config = replace(CONFIG, reference=ReferenceMode.NEAREST, reference_k=2)
    model = create_fod_model(config, in_channels=CHANNELS, strides=STRIDES).eval()
    model.fit_references(features(7))
    batch = features(3)
    expected = fod_flops(model).score
    assert counted(lambda: model.score_maps(batch)) / 3 == pytest.approx(expected, rel=1e-6)
    class_model = create_fod_model(CONFIG, in_channels=CHANNELS, strides=STRIDES).eval()
    assert expected > fod_flops(class_model).score


def test_a_training_step_costs_about_three_forward_passes() -> None:
    from fod_core.losses import fod_objective, total_objective

    model = create_fod_model(CONFIG, in_channels=CHANNELS, strides=STRIDES).train()
    batch = features(4)

    def step() -> None:
        outputs = model(batch)
        loss = total_objective(
            [fod_objective(o, lambda1=0.5, lambda2=0.5, eps=1e-4) for o in outputs]
        )
        loss.backward()

    estimate = fod_flops(model, batch_size=4).train_step
    assert counted(step) / 4 == pytest.approx(estimate, rel=0.1)
    forward_only = counted(lambda: model(batch)) / 4
    assert estimate / forward_only == pytest.approx(3.0, rel=0.01)


def test_the_backbone_is_counted_and_the_header_names_the_machine() -> None:
    from fod_core.backbone import create_feature_extractor

    extractor = create_feature_extractor(weights="random")
    model = create_fod_model(CONFIG, in_channels=CHANNELS, strides=STRIDES)
    flops = fod_flops(model, extractor, batch_size=8)
    assert flops.backbone > 1e6 and math.isclose(flops.inference, flops.backbone + flops.score)
    here = machine()
    header = roofline_header(here, Rates(fp32=100.0, bf16=None), flops)
    assert header.startswith("machine: ") and here.name in header
    assert "bf16 not native" in header and "fp32 100 GFLOP/s" in header
    assert achieved(2e9, 0.1, 40.0) == {"gflops": 20.0, "fraction_of_matmul": 0.5}
