"""On-disk cache of backbone features, one entry per image content.

Keyed by the backbone (name, stages, weights digest), the preprocessing (input size,
normalisation) and the SHA-256 of the image file's bytes: a second training run on the
same data extracts nothing, and adding images extracts only those. The store is
pluggable so the pipeline can keep the cache in S3.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from fod_core.backbone import BackboneSpec, FeatureExtractor
from fod_core.data import ImageRecord
from fod_core.processing import Alignment, PreProcessing, read_image

CACHE_FORMAT = 1
log = logging.getLogger(__name__)


class BlobStore(Protocol):
    """Minimal key -> bytes store (a folder here; S3 in the pipeline)."""

    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, data: bytes) -> None: ...


class LocalStore:
    """A folder; writes are atomic (temp file + rename), so a killed run leaves no torn entry."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key

    def get(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        except BaseException:  # a full disk: no partial file left behind
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def extractor_key(extractor: FeatureExtractor, pre: PreProcessing) -> str:
    """Everything that changes the features, hashed into one folder name."""
    identity = {
        "format": CACHE_FORMAT,
        "backbone": extractor.spec.name,
        "out_indices": list(extractor.spec.out_indices),
        "weights": extractor.weights_digest,
        "preprocessing": pre.to_dict(),
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return f"{extractor.spec.name}-{pre.image_size}-{digest}"


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0

    def to_dict(self) -> dict:
        return {"hits": self.hits, "misses": self.misses}


class FeatureCache:
    """Pooled per-level features of single images, stored as float16 ``.npz``."""

    def __init__(self, store: BlobStore, extractor: FeatureExtractor, pre: PreProcessing) -> None:
        self.store = store
        self.extractor = extractor
        self.pre = pre
        self.prefix = extractor_key(extractor, pre)
        self.damaged = 0  # entries found unreadable and extracted again
        self.unwritable = 0  # entries that could not be written (a full disk)

    @classmethod
    def for_backbone(
        cls,
        store: BlobStore,
        spec: BackboneSpec,
        image_size: int,
        alignment: Alignment = Alignment.NONE,
    ) -> FeatureCache:
        """The one way the pipeline's cache step and training build the extractor and its
        pre-processing: both must agree for the cache to hit."""
        extractor = FeatureExtractor(spec=spec)
        pre = PreProcessing(image_size, extractor.mean, extractor.std, Alignment(alignment))
        return cls(store, extractor, pre)

    def _key(self, content_hash: str) -> str:
        return f"{self.prefix}/{content_hash[:2]}/{content_hash}.npz"

    def get(self, content_hash: str) -> list[torch.Tensor] | None:
        """The entry's features, or None when absent or damaged (then extracted again and
        overwritten: a truncated or foreign entry is never used)."""
        key = self._key(content_hash)
        blob = self.store.get(key)
        if blob is None:
            return None
        try:
            with np.load(io.BytesIO(blob)) as arrays:
                levels = [
                    torch.from_numpy(arrays[f"level{i}"].astype(np.float32))
                    for i in range(len(arrays.files))
                ]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            log.warning("feature cache entry %s is damaged (%s): extracted again", key, error)
            self.damaged += 1
            return None
        channels = [level.shape[0] for level in levels]
        if channels != list(self.extractor.channels):
            log.warning(
                "feature cache entry %s has other levels %s: extracted again", key, channels
            )
            self.damaged += 1
            return None
        return levels

    def put(self, content_hash: str, features: Sequence[torch.Tensor]) -> None:
        """Store one entry; a local disk that is full or read-only costs the cache, not the
        run: one warning, the features are still used."""
        buffer = io.BytesIO()
        np.savez(
            buffer,
            **{f"level{i}": f.cpu().numpy().astype(np.float16) for i, f in enumerate(features)},
        )
        try:
            self.store.put(self._key(content_hash), buffer.getvalue())
        except OSError as error:
            if not self.unwritable:
                log.warning("cannot write the feature cache (%s): going on without caching", error)
            self.unwritable += 1

    def features(
        self,
        records: Sequence[ImageRecord],
        *,
        batch_size: int = 16,
        device: torch.device | str = "cpu",
        progress: bool = True,
        desc: str = "features",
    ) -> tuple[list[torch.Tensor], CacheStats]:
        """Per-level stacked features (N, C, H, W) for the records, extracting only misses."""
        hashes = [file_sha256(r.path) for r in records]
        found: dict[int, list[torch.Tensor]] = {}
        stats = CacheStats()
        for i, content_hash in enumerate(hashes):
            cached = self.get(content_hash)
            if cached is not None:
                found[i] = cached
        stats.hits = len(found)
        todo = [i for i in range(len(records)) if i not in found]
        stats.misses = len(todo)
        if todo:
            self.extractor.to(device)
            bar = tqdm(total=len(todo), desc=f"{desc} (extract)", disable=not progress, unit="img")
            for batch_idx, images in _decoded_batches(
                [records[i] for i in todo], self.pre, batch_size
            ):
                maps = self.extractor(images.to(device))
                for j, index in enumerate(todo[k] for k in batch_idx):
                    per_image = [m[j].float().cpu() for m in maps]
                    self.put(hashes[index], per_image)
                    # Train on exactly what the cache will give back next time.
                    found[index] = [f.half().float() for f in per_image]
                bar.update(len(batch_idx))
            bar.close()
        n_levels = len(found[0]) if found else 0
        stacked = [
            torch.stack([found[i][lvl] for i in range(len(records))]) for lvl in range(n_levels)
        ]
        return stacked, stats


def _decoded_batches(
    records: Sequence[ImageRecord], pre: PreProcessing, batch_size: int
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Decode and resize images in two threads (PIL releases the GIL) while the backbone runs.

    Unlike ``AnomalyDetector.predict``, these threads do run PyTorch ops (the resize). That
    gives the process a second OpenMP team, and libgomp then lets idle workers sleep soon
    instead of spinning. Measured on the 2-core CPU, training after extraction is faster
    that way (0.655 vs 0.761 s per image fp32, 0.457 vs 0.706 bf16), while batch-1
    scoring is faster without it. Why is not understood yet: see BENCHMARKS.md."""
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="fod-extract") as pool:
        for start in range(0, len(records), batch_size):
            chunk = range(start, min(start + batch_size, len(records)))
            tensors = list(pool.map(lambda i: pre(read_image(records[i].path)), chunk))
            yield list(chunk), torch.stack(tensors)
