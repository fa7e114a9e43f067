"""Inference latency of a trained model through the full path (decode, resize, backbone,
FOD, maps, score), at batch 1 and 16, and what the scoring fast path saves; with
``--runtimes torch,torch-bf16,onnx,openvino`` PyTorch with bf16 autocast and the model's
exported graphs too, in the same process.

The fast path runs the intra attention fused (its maps are not part of the score); the
comparison runs the same model with the maps materialised, in the same process.

    python benchmarks/bench_inference.py --model runs/bench/lite0_e40/model \
        --images ../shared/data/mvtec_ad/bottle/test --out benchmarks/results/inference.json
    fod export --model MODEL && python benchmarks/bench_inference.py --model MODEL \
        --images ../shared/data/mvtec_ad/bottle/test --runtimes torch,onnx,openvino
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from fod_core.artifact import load_detector
from fod_core.export import load_runtime
from fod_core.inference import Detector
from fod_core.model import FODLevel
from fod_core.roofline import achieved, fod_flops, machine, measure_rates, roofline_header
from fod_core.runtime import configure_cpu_numerics


def time_predict(detector: Detector, paths: list[Path], batch: int, repeats: int) -> float:
    """Median milliseconds per image over ``repeats`` runs of the first ``batch`` images."""
    chosen = paths[:batch]
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        detector.predict(chosen, batch_size=batch)
        runs.append((time.perf_counter() - started) * 1000 / len(chosen))
    return statistics.median(runs)


def time_scoring(detector: Detector, paths: list[Path], batch: int, repeats: int) -> float:
    """Median milliseconds per image of the scoring graph alone (decoded, pre-processed)."""
    tensors, _ = detector.preprocess(detector._decode(paths[:batch]))
    detector.score_batch(tensors)
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        detector.score_batch(tensors)
        runs.append((time.perf_counter() - started) * 1000 / len(tensors))
    return statistics.median(runs)


def main() -> None:
    configure_cpu_numerics()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path)
    source.add_argument(
        "--untrained-backbone",
        help="the method's architecture on this backbone with untrained FOD weights (speed "
        "depends on the architecture, not on what the weights learned)",
    )
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--runtimes",
        default="torch",
        help="comma-separated: torch, torch-bf16 (PyTorch with bf16 autocast), onnx, "
        "openvino (the model's checked exports: run `fod export` first); each is timed in "
        "the same process",
    )
    parser.add_argument(
        "--all-levels",
        action="store_true",
        help="score every level (the method's equal weights), whatever weights the model "
        "was calibrated with: a level weighted 0 is not run, so its cost would be missing",
    )
    args = parser.parse_args()
    if args.all_levels and args.runtimes != "torch":
        parser.error("--all-levels times PyTorch only: an export holds the model's own weights")
    paths = sorted(p for p in args.images.rglob("*.png"))
    if args.untrained_backbone:
        import tempfile

        sys.path.insert(0, str(Path(__file__).parent))
        from bench_serving import untrained_model

        args.model = untrained_model(
            Path(tempfile.mkdtemp(prefix="fod-bench-")), args.untrained_backbone, 256
        )
    detector = load_detector(args.model, device=args.device)
    where = machine(detector.device)
    rates = measure_rates(where)
    if args.all_levels and detector.post.level_weights is not None:
        detector.post = replace(detector.post, level_weights=None)  # the method: every level
    levels = detector.post.used_levels(detector.model.n_branches)  # a retrieval branch too
    flops = fod_flops(detector.model, detector.extractor, levels=levels)
    print(roofline_header(where, rates, flops), flush=True)  # first: every figure is read by it
    full_forward = FODLevel.forward

    def with_intra_maps(self, feature_map, *, scoring=False):
        return full_forward(self, feature_map, scoring=False)

    report = {
        "command": "python benchmarks/bench_inference.py " + " ".join(sys.argv[1:]),
        "threads": torch.get_num_threads(),
        "machine": {"name": where.name, "device": where.device, "isa": list(where.isa)},
        "matmul_gflops": {"fp32": rates.fp32, "bf16": rates.bf16},
        "flops_per_image": flops.to_dict(),
        "levels_scored": levels,
    }
    for runtime in args.runtimes.split(","):
        if runtime == "torch":
            chosen = detector
        elif runtime == "torch-bf16":
            chosen = detector.with_precision("bf16")
        else:
            chosen = load_runtime(args.model, runtime)
        for batch, repeats in ((1, args.repeats), (16, max(3, args.repeats // 3))):
            # In blocks, each after a warm-up: alternating paths of different buffer sizes
            # would time the allocator's page faults rather than the model.
            chosen.predict(paths[:batch], batch_size=batch)  # warm-up, kernel compilation
            fast = time_predict(chosen, paths, batch, repeats)
            scoring = time_scoring(chosen, paths, batch, repeats)
            result = {
                "ms_per_image": fast,
                "scoring_ms_per_image": scoring,  # the graph alone, after decoding
                "runs": repeats,
                "of_matmul": achieved(flops.inference, fast / 1000, rates.fp32),
                "scoring_of_matmul": achieved(flops.inference, scoring / 1000, rates.fp32),
            }
            if runtime == "torch-bf16" and rates.bf16:
                result["of_bf16_matmul"] = achieved(flops.inference, fast / 1000, rates.bf16)
            if runtime == "torch":
                for name, variant in (("with_intra_maps", with_intra_maps),):
                    FODLevel.forward = variant
                    try:
                        detector.predict(paths[:batch], batch_size=batch)
                        result[f"ms_per_image_{name}"] = time_predict(
                            detector, paths, batch, repeats
                        )
                        result[f"scoring_ms_per_image_{name}"] = time_scoring(
                            detector, paths, batch, repeats
                        )
                    finally:
                        FODLevel.forward = full_forward
            key = f"batch_{batch}" if runtime == "torch" else f"{runtime}_batch_{batch}"
            report[key] = result
            print(f"{runtime} batch {batch}: {result}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
