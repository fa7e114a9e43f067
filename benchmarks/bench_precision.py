"""bf16 scoring against fp32 on one trained model: which parts can run in bf16 and keep the
accuracy (image AUROC, pixel AUROC, AUPRO within 0.002 of fp32), on the test set (for the
record) and on the label-free check set that ``fod export --format bf16`` uses.

Variants, each in the same process: everything under bf16 autocast (what
``--precision bf16`` runs); the backbone in fp32; the backbone and the reconstruction
head in fp32 (only the transformer layers in bf16).

    python benchmarks/bench_precision.py --model runs/bf16/bottle_e10 \
        --data ../shared/data/mvtec_ad --category bottle --out benchmarks/results/bf16_parts.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from fod_core.artifact import load_detector, read_manifest
from fod_core.data import load_category
from fod_core.evaluate import evaluate_detector
from fod_core.export import check_set
from fod_core.inference import ScoringGraph
from fod_core.model import FODLevel
from fod_core.precision_check import planted_accuracy
from fod_core.roofline import machine

METRICS = ("image_auroc", "pixel_auroc", "aupro")


class Fp32(torch.nn.Module):
    """A layer run in fp32 even under autocast."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.layer(x.float())


@contextlib.contextmanager
def variant(name: str):
    """Patch the scoring path for one variant; restore it afterwards."""
    forward, level_forward = ScoringGraph.forward, FODLevel.forward

    def fp32_backbone(self, images):
        return self.score_features(self.extractor(images))

    def fp32_head(self, feature_map, **kwargs):
        head = self.head
        self.head = Fp32(head)
        try:
            return level_forward(self, feature_map, **kwargs)
        finally:
            self.head = head

    if name in ("bf16_fp32_backbone", "bf16_fp32_backbone_head"):
        ScoringGraph.forward = fp32_backbone
    if name == "bf16_fp32_backbone_head":
        FODLevel.forward = fp32_head
    try:
        yield
    finally:
        ScoringGraph.forward, FODLevel.forward = forward, level_forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--category", required=True)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    where = machine()
    print(where.describe(), flush=True)
    fp32 = load_detector(args.model)
    manifest = read_manifest(args.model)
    test = load_category(args.data, args.category, manifest["data"].get("format", "mvtec")).test
    checks = check_set(args.model, args.data, args.category)
    report = {
        "command": "python benchmarks/bench_precision.py " + " ".join(sys.argv[1:]),
        "machine": where.describe(),
        "check_set": checks.describe,
    }
    variants = ("fp32", "bf16", "bf16_fp32_backbone", "bf16_fp32_backbone_head")
    for name in variants:
        detector = fp32 if name == "fp32" else fp32.with_precision("bf16")
        with variant(name), tempfile.TemporaryDirectory() as out:
            started = time.perf_counter()
            metrics = evaluate_detector(detector, test, out, max_overlays=0, progress=False)
            seconds = time.perf_counter() - started
            planted = planted_accuracy(
                detector.predict(checks.images, batch_size=8), len(checks.normals), checks.masks
            )
        report[name] = {
            "test": {k: metrics[k] for k in METRICS},
            "planted": planted,
            "test_seconds": round(seconds, 1),
        }
        if name != "fp32":
            for where_, values in (("test", report[name]["test"]), ("planted", planted)):
                base = report["fp32"][where_]
                report[name][f"{where_}_max_delta"] = max(abs(values[k] - base[k]) for k in METRICS)
        print(name, json.dumps(report[name]), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
