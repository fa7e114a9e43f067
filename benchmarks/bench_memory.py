"""Training memory and speed against batch size: peak RSS (CPU) or peak allocated memory
(CUDA) of FOD's training step on a real category's cached features, each batch size in a
process of its own so that every peak is that batch size's.

    python benchmarks/bench_memory.py --data ../shared/data/mvtec_ad --category bottle \
        --batch-sizes 1 8 16 --steps 2 --out runs/bench/memory

Per batch size: the RSS once the features are loaded (before any step), the peak after one
warm-up and ``--steps`` timed steps (forward, backward, Adam), and seconds per image.
Writes <out>/memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch


def child(args) -> dict:
    from fod_core.backbone import FeatureExtractor
    from fod_core.cache import FeatureCache, LocalStore
    from fod_core.config import ModelConfig, TrainConfig
    from fod_core.data import load_category
    from fod_core.model import class_references, create_fod_model
    from fod_core.processing import PreProcessing
    from fod_core.runtime import configure_cpu_numerics
    from fod_core.trainer import FODTrainer, resolve_device

    configure_cpu_numerics()
    model_config = ModelConfig(image_size=args.image_size)
    train_config = TrainConfig(
        batch_size=args.batch_size,
        precision=args.precision,
        device=args.device,
        lean_attention=args.lean_attention,
    )
    device = resolve_device(train_config.device)
    extractor = FeatureExtractor(spec=model_config.backbone)
    pre = PreProcessing(args.image_size, extractor.mean, extractor.std)
    data = load_category(args.data, args.category)
    cache = FeatureCache(LocalStore(args.out / "cache"), extractor, pre)
    features, _ = cache.features(data.train, progress=False)
    model = create_fod_model(
        model_config, in_channels=extractor.channels, strides=extractor.strides
    )
    model.set_references(class_references(features))
    model.to(device)
    trainer = FODTrainer(model, config=train_config, progress=False)
    size = args.batch_size
    batches = [
        [f[i * size % len(f) :][:size].to(device) for f in features] for i in range(args.steps + 1)
    ]
    rss_before = psutil.Process().memory_info().rss / 2**20
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.train_step(batches[0])  # warm-up: kernel compilation, allocator
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for batch in batches[1:]:
        trainer.train_step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - started) / (args.steps * size)
    result = {
        "batch_size": size,
        "seconds_per_image": seconds,
        "rss_before_mb": rss_before,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "device": str(device),
        "precision": str(train_config.precision),
        "compile": os.environ.get("FOD_COMPILE", "1"),
        "lean_attention": train_config.lean_attention,
    }
    if device.type == "cuda":
        result["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--steps", type=int, default=2, help="timed steps after the warm-up")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--lean-attention", action="store_true", help="maps in row blocks")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/memory"))
    parser.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)  # a child's
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.batch_size:
        print(json.dumps(child(args)), flush=True)
        return

    from dataclasses import asdict

    from fod_core.roofline import machine
    from fod_core.trainer import resolve_device

    where = machine(resolve_device(args.device))
    print(f"# {where.describe()}", flush=True)
    report = {"machine": asdict(where), "command": " ".join(sys.argv), "runs": []}
    for size in args.batch_sizes:
        command = [sys.executable, __file__, *sys.argv[1:], "--batch-size", str(size)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"batch {size} failed:\n{done.stderr[-3000:]}")
        run = json.loads(done.stdout.strip().splitlines()[-1])
        report["runs"].append(run)
        extra = (
            f", CUDA peak {run['cuda_max_allocated_mb']:.0f} MB"
            if "cuda_max_allocated_mb" in run
            else ""
        )
        print(
            f"batch {size:3d}: {run['seconds_per_image']:.3f} s/image, peak RSS "
            f"{run['peak_rss_mb']:.0f} MB (before the first step {run['rss_before_mb']:.0f} MB)"
            f"{extra}",
            flush=True,
        )
    (args.out / "memory.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
