"""Inference: backbone + FOD model + the shared pre/post-processing, in one object that
evaluation, ``fod predict``, export and serving all call."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from fod_core.backbone import FeatureExtractor
from fod_core.config import Precision
from fod_core.model import FODModel
from fod_core.processing import PostProcessing, PreProcessing, read_image
from fod_core.runtime import autocast_for, configure_cpu_numerics


@dataclass
class Prediction:
    """One image's result; ``anomaly_map`` is at the model's input size."""

    score: float
    is_anomalous: bool | None
    anomaly_map: np.ndarray

    def to_dict(self, *, with_map: bool = False) -> dict:
        data = {"score": self.score, "is_anomalous": self.is_anomalous}
        if with_map:
            data["anomaly_map"] = self.anomaly_map.tolist()
        return data


class Detector:
    """What every runtime shares: decode, pre-process, score, decide. Subclasses score a
    normalised batch (``score_batch``): PyTorch here, an exported graph in
    ``fod_core.export``; pre- and post-processing stay the same objects."""

    runtime = "torch"
    precision = Precision.FP32  # an exported graph's; PyTorch's may be bf16

    def __init__(self, *, pre: PreProcessing, post: PostProcessing) -> None:
        self.pre = pre
        self.post = post
        self._pool: ThreadPoolExecutor | None = None

    def _decode(self, sources: Sequence[str | Path | bytes | Image.Image]) -> list[Image.Image]:
        """Decode in two threads (PIL releases the GIL) but run no PyTorch op there: a
        second thread's OpenMP workers would slow every op (``fod_core.runtime``)."""

        def as_image(source: str | Path | bytes | Image.Image) -> Image.Image:
            return source if isinstance(source, Image.Image) else read_image(source)

        if len(sources) == 1 or all(isinstance(s, Image.Image) for s in sources):
            return [as_image(s) for s in sources]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fod-decode")
        return list(self._pool.map(as_image, sources))

    def with_threshold(self, threshold: float, mode: str) -> Detector:
        self.post = replace(self.post, threshold=float(threshold), threshold_mode=mode)
        return self

    def preprocess(
        self, images: Sequence[Image.Image]
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Decoded images -> (model input batch, poses for ``post.to_input_frame``)."""
        inputs, poses = zip(*(self.pre.transform(image) for image in images), strict=True)
        return torch.stack(inputs), list(poses)

    def score_batch(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images (N, 3, S, S) -> (anomaly maps, image scores), on CPU."""
        raise NotImplementedError

    def predict(
        self,
        sources: Sequence[str | Path | bytes | Image.Image],
        *,
        batch_size: int = 16,
    ) -> list[Prediction]:
        """Decode, preprocess, score and decide; images of any size and mode."""
        results: list[Prediction] = []
        for start in range(0, len(sources), batch_size):
            chunk = sources[start : start + batch_size]
            batch, poses = self.preprocess(self._decode(chunk))
            maps, scores = self.score_batch(batch)  # the score: on the aligned map
            if self.post.needs_regions():  # the graph scores the whole map; the part alone
                scores = self.post.image_score(maps, self.pre.part_regions(batch))
            maps = self.post.to_input_frame(maps, poses)  # the map: on the photo
            decisions = (
                self.post.is_anomalous(scores.numpy())
                if self.post.threshold is not None
                else [None] * len(chunk)
            )
            for m, s, d in zip(maps, scores, decisions, strict=True):
                results.append(Prediction(float(s), None if d is None else bool(d), m.numpy()))
        return results


class ScoringGraph(nn.Module):
    """The whole scoring path after pre-processing, as one module: normalised images ->
    (anomaly maps (N, S, S), image scores (N,)). What PyTorch runs and what is exported
    (``fod_core.export``), so both compute the same thing. Its scores are over the whole
    map; a model scored over the part (``ScoreRegion.PART``) takes them from the map in
    ``Detector.predict``, with the part found by the same pre-processing, for every
    runtime alike."""

    def __init__(
        self,
        extractor: FeatureExtractor,
        model: FODModel,
        post: PostProcessing,
        *,
        chunked: bool,
        precision: Precision = Precision.FP32,
    ) -> None:
        super().__init__()
        self.extractor = extractor
        self.model = model
        self.post = post
        self.chunked = chunked  # an exported graph runs the batch in one pass
        self.precision = precision

    def _autocast(self, reference: torch.Tensor):
        """bf16 for the transformers' matmuls (their softmax, divergence and reconstruction
        error stay fp32, as in training). The backbone stays fp32: in bf16 it cost bottle
        0.008 image AUROC for no measurable speed (BENCHMARKS.md); the map, its smoothing
        and the image score are fp32 too."""
        return autocast_for(reference.device, self.precision)

    def score_features(
        self, feature_maps: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        levels = self.post.used_levels(self.model.n_branches)
        with self._autocast(feature_maps[0]):
            level_maps = self.model.score_maps(feature_maps, levels=levels, chunked=self.chunked)
        maps = self.post.anomaly_map([m if m is None else m.float() for m in level_maps])
        return maps, self.post.image_score(maps)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.score_features(self.extractor(images))


class AnomalyDetector(Detector):
    """A trained FOD model ready to score images, run by PyTorch, in fp32 or with bf16
    autocast (``precision``; only ``load_detector`` knows whether a model's bf16
    accuracy check passed, so AUTO is resolved there)."""

    def __init__(
        self,
        *,
        extractor: FeatureExtractor,
        model: FODModel,
        pre: PreProcessing,
        post: PostProcessing,
        device: torch.device | str = "cpu",
        precision: Precision | str = Precision.FP32,
    ) -> None:
        super().__init__(pre=pre, post=post)
        self.device = torch.device(device)
        self.precision = Precision(precision)
        if self.precision is Precision.AUTO:
            raise ValueError("AnomalyDetector takes fp32 or bf16; load_detector resolves auto")
        self.extractor = extractor.to(self.device).eval()
        self.model = model.to(self.device).eval()
        configure_cpu_numerics()

    def with_precision(self, precision: Precision | str) -> AnomalyDetector:
        """The same weights, scored at another precision (the bf16 accuracy check)."""
        return AnomalyDetector(
            extractor=self.extractor,
            model=self.model,
            pre=self.pre,
            post=self.post,
            device=self.device,
            precision=precision,
        )

    def graph(self, *, chunked: bool = True, precision: Precision | None = None) -> ScoringGraph:
        """The scoring path with the current post-processing (threshold, level weights)."""
        return ScoringGraph(
            self.extractor,
            self.model,
            self.post,
            chunked=chunked,
            precision=precision or self.precision,
        ).eval()

    @torch.no_grad()
    def score_features(
        self, feature_maps: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone features -> (anomaly maps (N, S, S), image scores (N,)), on CPU."""
        maps, scores = self.graph().score_features([f.to(self.device) for f in feature_maps])
        return maps.cpu(), scores.cpu()

    @torch.no_grad()
    def level_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Normalised images -> each level's map at the input size, on CPU (calibration)."""
        grids = self.model.score_maps(self.extractor(images.to(self.device)))
        return [m.cpu() for m in self.post.upsample(grids)]

    @torch.no_grad()
    def score_batch(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images (N, 3, S, S) -> (anomaly maps, image scores)."""
        maps, scores = self.graph()(images.to(self.device))
        return maps.cpu(), scores.cpu()
