"""Feature-extractor caching as a pipeline step: fill the S3-backed cache before training."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from components.settings import StackSettings
from components.storage import S3Store

log = logging.getLogger(__name__)

DEFAULT_CACHE_PREFIX = "features"


def fill_cache(
    data_root: str | Path,
    category: str,
    data_format: str,
    backbone: str,
    image_size: int,
    settings: StackSettings,
    cache_prefix: str = DEFAULT_CACHE_PREFIX,
    *,
    alignment: str = "none",
    progress: bool = True,
) -> dict[str, float]:
    """Extract features of every image the cache lacks, seen with ``alignment`` ("all":
    each alignment, as the auto recipe tries them); returns hits, misses, seconds."""
    from fod_core.backbone import BackboneSpec
    from fod_core.cache import FeatureCache
    from fod_core.data import load_category
    from fod_core.processing import Alignment
    from fod_core.runtime import configure_cpu_numerics

    configure_cpu_numerics()
    store = S3Store(settings, cache_prefix)
    store.check()
    data = load_category(data_root, category, data_format)
    alignments = [a.value for a in Alignment] if alignment == "all" else [alignment]
    hits = misses = 0
    started = time.perf_counter()
    for seen in alignments:
        cache = FeatureCache.for_backbone(store, BackboneSpec(name=backbone), image_size, seen)
        desc = category if len(alignments) == 1 else f"{category} ({seen})"
        _, stats = cache.features(data.train, progress=progress, desc=desc)
        hits, misses = hits + stats.hits, misses + stats.misses
    seconds = time.perf_counter() - started
    log.info("%s feature cache: %d hits, %d extracted", category, hits, misses)
    return {"hits": hits, "misses": misses, "seconds": round(seconds, 3)}
