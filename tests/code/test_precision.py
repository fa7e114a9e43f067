"""Precision that fits the machine, and the compile warm-up kept out of the epoch times."""

from __future__ import annotations

import logging

import pytest
import torch

from fod_core import roofline, runtime
from fod_core.config import LevelConfig, ModelConfig, Precision, TrainConfig
from fod_core.model import class_references, create_fod_model
from fod_core.runtime import resolve_precision
from fod_core.trainer import FODTrainer

CHANNELS, STRIDES = (12, 20), (8, 16)
CONFIG = ModelConfig(
    image_size=64,
    levels=(LevelConfig(d_model=32, n_heads=4, n_layers=1), LevelConfig(d_model=32, n_heads=4)),
)
CPU = torch.device("cpu")


def fake_cpu(monkeypatch, isa: tuple[str, ...]) -> None:
    monkeypatch.setattr(
        roofline, "machine", lambda device="cpu": roofline.Machine("cpu", "Test CPU", isa, 2)
    )


def test_auto_is_fp32_on_every_cpu(monkeypatch) -> None:
    for isa in (("avx2", "fma"), ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")):
        fake_cpu(monkeypatch, isa)
        assert resolve_precision(CPU, Precision.AUTO) is Precision.FP32


def test_bf16_on_a_cpu_without_it_warns_why(monkeypatch, caplog) -> None:
    monkeypatch.setattr(runtime, "_warned_emulated_bf16", False)
    fake_cpu(monkeypatch, ("avx2", "fma"))
    with caplog.at_level(logging.WARNING, logger="fod_core.runtime"):
        assert resolve_precision(CPU, "bf16") is Precision.BF16
    assert "emulated" in caplog.text and "AMX" in caplog.text and "Test CPU" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fod_core.runtime"):
        resolve_precision(CPU, "bf16")  # once per process, not once per batch
    assert caplog.text == ""
    monkeypatch.setattr(runtime, "_warned_emulated_bf16", False)
    fake_cpu(monkeypatch, ("avx2", "avx512f", "amx_tile", "amx_bf16"))
    with caplog.at_level(logging.WARNING, logger="fod_core.runtime"):
        resolve_precision(CPU, "bf16")
    assert caplog.text == ""


def test_the_warm_up_changes_nothing_the_training_sees() -> None:
    def trained(warm: bool) -> tuple[dict, list[float]]:
        torch.manual_seed(0)
        model = create_fod_model(CONFIG, in_channels=CHANNELS, strides=STRIDES)
        generator = torch.Generator().manual_seed(1)
        features = [
            torch.randn(6, c, 64 // s, 64 // s, generator=generator)
            for c, s in zip(CHANNELS, STRIDES, strict=True)
        ]
        model.set_references(class_references(features))
        trainer = FODTrainer(
            model, config=TrainConfig(epochs=2, batch_size=4, device="cpu"), progress=False
        )
        if warm:
            assert trainer.warm_up(features) > 0
            assert all(p.grad is None for p in model.parameters())
        result = trainer.fit(features)
        losses = [r.train["level0/reconstruction"] for r in result.history]
        return {k: v.clone() for k, v in model.state_dict().items()}, losses

    cold_state, cold_losses = trained(warm=False)
    warm_state, warm_losses = trained(warm=True)
    assert warm_losses == cold_losses
    for key, value in cold_state.items():
        torch.testing.assert_close(warm_state[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_the_result_reports_no_warm_up_when_compilation_is_off(precision) -> None:
    model = create_fod_model(CONFIG, in_channels=CHANNELS, strides=STRIDES)
    features = [torch.randn(4, c, 64 // s, 64 // s) for c, s in zip(CHANNELS, STRIDES, strict=True)]
    model.set_references(class_references(features))
    config = TrainConfig(epochs=1, batch_size=4, device="cpu", precision=Precision(precision))
    result = FODTrainer(model, config=config, progress=False).fit(features)
    assert result.warmup_seconds == 0.0 and result.to_dict()["warmup_seconds"] == 0.0


def test_decision_flips_gate_only_beyond_the_near_tie_band():
    """The bf16 check gates decisions that change at the calibrated threshold: a flip of
    an image 0.5% from it is a near tie (counted), one 5% from it fails the check."""
    from fod_core.precision_check import PRECISION_DECISION_BAND, decision_flips

    assert PRECISION_DECISION_BAND == 0.01
    fp32 = [1.0, 0.995, 0.95, 1.2]
    assert decision_flips(fp32, fp32, 1.0) == (0, 0)
    near = [0.999, 1.001, 0.95, 1.2]  # 1.0 -> below, 0.995 -> above: both within 1%
    assert decision_flips(fp32, near, 1.0) == (2, 0)
    far = [1.0, 0.995, 1.01, 0.99]  # 0.95 -> alarm, 1.2 -> no alarm: both beyond 1%
    assert decision_flips(fp32, far, 1.0) == (2, 2)
    assert decision_flips(fp32, far, None) == (0, 0)
