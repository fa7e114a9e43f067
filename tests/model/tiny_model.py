"""A tiny FOD configuration and random feature maps of its shape: model tests that need no
backbone and run in seconds."""

from __future__ import annotations

import torch

from fod_core.config import LevelConfig, ModelConfig

TINY = ModelConfig(
    image_size=64,
    levels=(
        LevelConfig(d_model=32, n_heads=4, n_layers=1),
        LevelConfig(d_model=32, n_heads=4, n_layers=1),
    ),
)
CHANNELS, STRIDES = (12, 20), (8, 16)


def features(batch: int, seed: int = 0) -> list[torch.Tensor]:
    """Per level, (batch, channels, 64 / stride, 64 / stride) standard normal maps."""
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, c, 64 // s, 64 // s, generator=generator)
        for c, s in zip(CHANNELS, STRIDES, strict=True)
    ]
