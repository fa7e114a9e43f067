"""On a CUDA device: placement, bf16 autocast, and scoring that agrees with the CPU.

Marked ``cuda``: ``benchmarks/gpu_check.sh`` runs them on a lent GPU; elsewhere they skip.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fod_core.backbone import create_feature_extractor
from fod_core.config import Device, LevelConfig, ModelConfig, Precision, TrainConfig
from fod_core.inference import AnomalyDetector
from fod_core.model import class_references, create_fod_model
from fod_core.processing import PostProcessing, PreProcessing
from fod_core.runtime import resolve_precision
from fod_core.trainer import FODTrainer

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CONFIG = ModelConfig(
    image_size=64,
    levels=(LevelConfig(d_model=32, n_heads=4, n_layers=1), LevelConfig(d_model=48, n_heads=4)),
)


def detector_on(device: str) -> AnomalyDetector:
    torch.manual_seed(0)
    extractor = create_feature_extractor(weights="random")
    model = create_fod_model(CONFIG, in_channels=extractor.channels, strides=extractor.strides)
    features = extractor(torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
    model.set_references(class_references(features))
    return AnomalyDetector(
        extractor=extractor,
        model=model,
        pre=PreProcessing(64, extractor.mean, extractor.std),
        post=PostProcessing(64, CONFIG.score_sigma),
        device=device,
    )


def test_training_runs_on_the_gpu_in_bf16_with_finite_losses() -> None:
    device = torch.device("cuda")
    assert resolve_precision(device, Precision.AUTO) is Precision.BF16
    detector = detector_on("cpu")
    features = detector.extractor(torch.randn(8, 3, 64, 64))
    trainer = FODTrainer(
        detector.model, config=TrainConfig(batch_size=4, device=Device.CUDA), progress=False
    )
    detector.model.to(device)
    stats = trainer.train_step([f[:4].to(device) for f in features])
    assert all(np.isfinite(v) for v in stats.values())
    assert all(p.device.type == "cuda" for p in detector.model.parameters())
    assert all(p.grad is None or p.grad.device.type == "cuda" for p in detector.model.parameters())


def test_scores_and_maps_agree_with_the_cpu() -> None:
    images = [
        (np.random.default_rng(seed).random((80, 80, 3)) * 255).astype(np.uint8)
        for seed in range(3)
    ]
    from PIL import Image

    pil = [Image.fromarray(a) for a in images]
    on_cpu = detector_on("cpu").predict(pil)
    on_gpu = detector_on("cuda").predict(pil)
    for cpu, gpu in zip(on_cpu, on_gpu, strict=True):
        assert gpu.score == pytest.approx(cpu.score, rel=1e-4)
        np.testing.assert_allclose(gpu.anomaly_map, cpu.anomaly_map, rtol=1e-4, atol=1e-6)
