"""FOD benchmark on a real category: accuracy, feature extraction, training speed against
a reference-style baseline, inference latency and peak memory.

    python benchmarks/bench_fod.py --data ../shared/data/mvtec_ad --category bottle \
        --backbone efficientnet_lite0 --epochs 10 --out runs/bench/lite0

Model selection uses the validation split only; test AUROC per epoch is recorded for
the record, never used for a choice. Writes <out>/benchmark.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from fod_core.cache import FeatureCache, LocalStore
from fod_core.config import Device, LevelConfig, ModelConfig, Precision, TrainConfig
from fod_core.data import load_category, split_validation
from fod_core.evaluate import evaluate_detector, ground_truth_masks
from fod_core.inference import AnomalyDetector
from fod_core.level_weights import LevelWeighting
from fod_core.losses import reference_objective
from fod_core.metrics import image_auroc, pixel_auroc
from fod_core.model import FODLevel, class_references, create_fod_model
from fod_core.processing import Alignment, PostProcessing, PreProcessing
from fod_core.roofline import achieved, fod_flops, machine, measure_rates, roofline_header
from fod_core.runtime import configure_cpu_numerics
from fod_core.train import train_model
from fod_core.trainer import FODTrainer, resolve_device


@torch.no_grad()
def branch_scores(
    model, feature_maps, post: PostProcessing, chunk: int = 4
) -> dict[str, np.ndarray]:
    """Image scores of each part of FOD's score, per level (diagnosis, record only): the
    reconstruction error, the inter and the intra divergence, and the method's weighted
    score; each map upsampled and smoothed as the real score is."""
    eps = model.config.log_eps
    parts: dict[str, list] = {}
    for index, (level, features) in enumerate(zip(model.levels, feature_maps, strict=True)):
        for start in range(0, len(features), chunk):
            out = level(features[start : start + chunk])
            tokens = {
                "rec": FODLevel.reconstruction_error(out),
                "inter": FODLevel.mean_divergence(out.inter, eps),
                "intra": FODLevel.mean_divergence(out.intra, eps),
                "weighted": FODLevel.token_scores(out, eps),
            }
            for name, values in tokens.items():
                grid = values.view(-1, *level.grid)
                score = post.image_score(post.upsample([grid])[0])
                parts.setdefault(f"L{index + 1} {name}", []).append(score.numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def baseline_seconds_per_image(
    model_config: ModelConfig, extractor, pre, records, references, iterations: int
) -> float:
    """Train the way the reference code does: batch 1, the backbone run on every step, the
    dense target and separate KL terms, backward of phase 1 (retain graph) then phase 2,
    one optimiser per level. Same process settings as ours (subnormals flushed)."""
    model = create_fod_model(
        model_config, in_channels=extractor.channels, strides=extractor.strides
    )
    model.set_references(references)
    model.train()
    optimizers = [torch.optim.Adam(level.parameters(), lr=1e-4) for level in model.levels]
    images = [pre(r.path) for r in records[: iterations + 1]]
    times = []
    for i, image in enumerate(images):
        started = time.perf_counter()
        with torch.no_grad():
            maps = extractor(image[None])
        for level, features, optimizer in zip(model.levels, maps, optimizers, strict=True):
            terms = reference_objective(
                level(features),
                lambda1=model_config.lambda1,
                lambda2=model_config.lambda2,
                eps=model_config.log_eps,
            )
            optimizer.zero_grad()
            terms.phase1.backward(retain_graph=True)
            terms.phase2.backward()
            optimizer.step()
        if i > 0:  # the first iteration warms up allocators
            times.append(time.perf_counter() - started)
    return statistics.mean(times)


def our_seconds_per_image(model_config, train_config, extractor, features, batches: int):
    """Our training step (cached features, batched, one backward, fused kernels)."""
    model = create_fod_model(
        model_config, in_channels=extractor.channels, strides=extractor.strides
    )
    model.set_references(class_references(features))
    trainer = FODTrainer(model, config=train_config, progress=False)
    size = train_config.batch_size
    batch = [f[:size] for f in features]
    trainer.train_step(batch)  # warm-up: kernel compilation, allocator
    started = time.perf_counter()
    for i in range(batches):
        trainer.train_step([f[i * size % len(f) :][:size] for f in features])
    return (time.perf_counter() - started) / (batches * size)


def inference_ms(detector: AnomalyDetector, records, batch_size: int, repeats: int) -> dict:
    """Per-image latency of the full path (decode, preprocess, backbone, FOD, post)."""
    paths = [r.path for r in records[:batch_size]]
    detector.predict(paths, batch_size=batch_size)  # warm-up (and kernel compilation)
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        detector.predict(paths, batch_size=batch_size)
        runs.append((time.perf_counter() - started) * 1000 / len(paths))
    return {"ms_per_image_median": statistics.median(runs), "runs": len(runs)}


def main() -> None:
    configure_cpu_numerics()  # first: PyTorch's worker threads inherit it
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument(
        "--alignment", choices=[a.value for a in Alignment], default=Alignment.NONE.value
    )
    parser.add_argument(
        "--branches",
        action="store_true",
        help="record each part of the score (reconstruction, inter, intra; per level) by epoch",
    )
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument(
        "--precision", choices=[p.value for p in Precision], default=Precision.AUTO.value
    )
    parser.add_argument("--baseline-iterations", type=int, default=4)
    parser.add_argument("--timing-batches", type=int, default=4)
    parser.add_argument(
        "--resume", action="store_true", help="continue an interrupted run's training"
    )
    parser.add_argument("--baseline-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--speed-only", action="store_true", help="the speed comparison alone, no training"
    )
    parser.add_argument(
        "--skip-speed", action="store_true", help="no speed comparison (accuracy runs only)"
    )
    parser.add_argument(
        "--level-weights",
        choices=[w.value for w in LevelWeighting],
        default=LevelWeighting.EQUAL.value,
        help="equal: the method's average of the levels; synthetic: chosen on validation "
        "images with planted anomalies",
    )
    parser.add_argument("--tiny", action="store_true", help="small model: smoke-test the script")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    model_config = ModelConfig(image_size=args.image_size, alignment=Alignment(args.alignment))
    model_config = model_config.with_backbone(type(model_config.backbone)(name=args.backbone))
    if args.tiny:
        model_config = ModelConfig(
            backbone=model_config.backbone,
            image_size=args.image_size,
            levels=(LevelConfig(d_model=32, n_heads=4, n_layers=1),) * 2,
            alignment=model_config.alignment,
        )
    train_config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        precision=Precision(args.precision),
    )
    device = resolve_device(train_config.device)
    where = machine(device)
    rates = measure_rates(where)
    data = load_category(args.data, args.category)
    train_records, val_records = split_validation(data.train, train_config.val_fraction)
    report: dict = {
        "command": "python benchmarks/bench_fod.py "
        + " ".join(
            f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
            for k, v in vars(args).items()
            if v not in (False, None)
        ),
        "machine": {
            "device": str(device),
            "name": where.name,
            "isa": list(where.isa),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "matmul_gflops": {"fp32": rates.fp32, "bf16": rates.bf16},
        },
        "data": data.summary() | {"train_split": len(train_records), "val_split": len(val_records)},
        "model_config": model_config.to_dict(),
        "train_config": train_config.to_dict(),
    }

    # 1. Feature extraction, cold cache.
    cache_dir = args.out / "cache"
    from fod_core.backbone import FeatureExtractor

    extractor = FeatureExtractor(spec=model_config.backbone)
    pre = PreProcessing(args.image_size, extractor.mean, extractor.std, model_config.alignment)
    flops = fod_flops(
        create_fod_model(model_config, in_channels=extractor.channels, strides=extractor.strides),
        extractor,
        batch_size=train_config.batch_size,
    )
    report["flops_per_image"] = flops.to_dict()
    print(roofline_header(where, rates, flops), flush=True)  # first: every figure is read by it
    cache = FeatureCache(LocalStore(cache_dir), extractor, pre)
    started = time.perf_counter()
    train_features, stats = cache.features(data.train, desc="all train features")
    report["feature_extraction"] = {
        "seconds": time.perf_counter() - started,
        "images": len(data.train),
        "misses": stats.misses,
    }
    if args.baseline_only:  # child process of measure_speed, with the reference's settings
        seconds = baseline_seconds_per_image(
            model_config,
            extractor,
            pre,
            train_records,
            class_references(train_features),
            args.baseline_iterations,
        )
        print(json.dumps({"baseline_seconds_per_image": seconds}))
        return

    test_features, _ = cache.features(data.test, desc="test features")
    labels = [r.label for r in data.test]
    masks = ground_truth_masks(data.test, args.image_size)

    # 2. Speed, back to back on a quiet machine: our train step vs the reference's way.
    if not args.skip_speed:
        measure_speed(
            args, report, model_config, train_config, extractor, pre, train_records, train_features
        )
    if args.speed_only:
        report["peak_rss_mb"] = peak_rss_mb()
        (args.out / "speed.json").write_text(json.dumps(report, indent=2, default=str))
        return

    # 3. Training on cached features; test AUROC per epoch for the record only.
    _train_and_report(
        args,
        report,
        model_config,
        train_config,
        extractor,
        pre,
        data,
        test_features,
        labels,
        masks,
        cache_dir,
    )


def measure_speed(
    args, report, model_config, train_config, extractor, pre, train_records, train_features
) -> None:
    ours = our_seconds_per_image(
        model_config,
        replace(train_config, precision=Precision.FP32),
        extractor,
        train_features,
        args.timing_batches,
    )
    ours_bf16 = our_seconds_per_image(
        model_config,
        replace(train_config, precision=Precision.BF16),
        extractor,
        train_features,
        args.timing_batches,
    )
    baseline = baseline_seconds_per_image(
        model_config,
        extractor,
        pre,
        train_records,
        class_references(train_features),
        args.baseline_iterations,
    )
    # The same baseline in a fresh process with the reference's process settings:
    # subnormal floats kept and the default allocator.
    import subprocess
    import sys

    child = subprocess.run(
        [sys.executable, __file__, *sys.argv[1:], "--baseline-only"],
        env={**os.environ, "FOD_FLUSH_DENORMAL": "0", "FOD_MALLOC_TUNING": "0"},
        capture_output=True,
        text=True,
        check=True,
    )
    reference = json.loads(child.stdout.strip().splitlines()[-1])["baseline_seconds_per_image"]
    train_step, matmul = report["flops_per_image"]["train_step"], report["machine"]["matmul_gflops"]
    report["speed"] = {
        "our_seconds_per_image": ours,
        "baseline_seconds_per_image": baseline,
        "speedup": baseline / ours,
        "baseline_reference_process_seconds_per_image": reference,
        "speedup_vs_reference_process": reference / ours,
        "speedup_bf16_vs_reference_process": reference / ours_bf16,
        "our_seconds_per_image_bf16_autocast": ours_bf16,
        "speedup_bf16_autocast": baseline / ours_bf16,
        "fp32_of_matmul": achieved(train_step, ours, matmul["fp32"]),
        "bf16_of_matmul": achieved(train_step, ours_bf16, matmul["bf16"] or matmul["fp32"]),
        "timing_batches": args.timing_batches,
        "baseline_iterations": args.baseline_iterations,
    }
    print(
        f"speed: ours fp32 {ours:.3f} s/img (x{baseline / ours:.1f}), "
        f"bf16 {ours_bf16:.3f} s/img (x{baseline / ours_bf16:.1f}), baseline {baseline:.3f} s/img, "
        f"baseline with the reference's process settings {reference:.3f} s/img",
        flush=True,
    )


def _train_and_report(
    args,
    report,
    model_config,
    train_config,
    extractor,
    pre,
    data,
    test_features,
    labels,
    masks,
    cache_dir,
) -> None:
    by_epoch: dict[int, dict] = {}

    def record(epoch: int, model) -> None:
        detector = AnomalyDetector(
            extractor=extractor,
            model=model,
            pre=pre,
            post=PostProcessing(args.image_size, model_config.score_sigma),
        )
        maps, scores = [], []
        for start in range(0, len(data.test), 16):
            m, s = detector.score_features([f[start : start + 16] for f in test_features])
            maps.append(m)
            scores.append(s)
        maps_np, scores_np = torch.cat(maps).numpy(), torch.cat(scores).numpy()
        by_epoch[epoch] = {
            "image_auroc": image_auroc(labels, scores_np),
            # score_features' maps are in the aligned frame, the masks in the photo's.
            "pixel_auroc": pixel_auroc(masks, maps_np) if pre.alignment is Alignment.NONE else None,
        }
        if args.branches:
            parts = branch_scores(model, test_features, detector.post)
            by_epoch[epoch]["branches"] = {
                name: round(image_auroc(labels, values), 4) for name, values in parts.items()
            }
        print(f"[record only] epoch {epoch}: test {by_epoch[epoch]}", flush=True)
        model.train()

    outcome = train_model(
        args.data,
        args.category,
        args.out / "model",
        model_config=model_config,
        train_config=train_config,
        cache_store=LocalStore(cache_dir),
        on_epoch_end=record,
        resume=args.resume,
        level_weighting=args.level_weights,
    )
    epoch_seconds = [r.seconds for r in outcome.result.history]
    report["training"] = {
        "epochs": args.epochs,
        "seconds_per_epoch_median": statistics.median(epoch_seconds),
        "seconds_per_epoch_first": epoch_seconds[0],
        "seconds_per_image": statistics.median(epoch_seconds) / report["data"]["train_split"],
        "of_matmul": achieved(
            report["flops_per_image"]["train_step"],
            statistics.median(epoch_seconds) / report["data"]["train_split"],
            report["machine"]["matmul_gflops"]["fp32"],
        ),
        "best_epoch_by_validation": outcome.result.best_epoch,
        "val_loss_by_epoch": [r.val_loss for r in outcome.result.history],
        "test_by_epoch_record_only": by_epoch,
    }

    # 4. The selected model on the test set, through the shared inference path.
    from fod_core.artifact import load_detector

    device = resolve_device(Device.AUTO)
    detector = load_detector(args.out / "model", device=device)
    metrics = evaluate_detector(
        detector, data.test, args.out / "eval", title=args.category, max_overlays=24
    )
    keys = ("image_auroc", "pixel_auroc", "aupro", "f1_max", "per_defect_type")
    report["metrics"] = {k: metrics[k] for k in keys}
    if outcome.level_weights is not None:
        report["level_weights"] = outcome.level_weights.to_dict()
        equal = load_detector(args.out / "model", device=device)
        equal.post = replace(equal.post, level_weights=None)
        method = evaluate_detector(
            equal, data.test, args.out / "eval_equal_weights", title=args.category, max_overlays=0
        )
        report["metrics_equal_weights_record_only"] = {k: method[k] for k in keys}

    # 5. Inference latency and memory.
    peak = report["machine"]["matmul_gflops"]["fp32"]
    report["inference"] = {}
    for batch, repeats in ((1, 10), (16, 3)):
        timing = inference_ms(detector, data.test, batch, repeats=repeats)
        seconds = timing["ms_per_image_median"] / 1000
        timing["of_matmul"] = achieved(report["flops_per_image"]["inference"], seconds, peak)
        report["inference"][f"batch_{batch}"] = timing
    report["peak_rss_mb"] = peak_rss_mb()
    (args.out / "benchmark.json").write_text(json.dumps(report, indent=2, default=str))
    print(
        json.dumps(
            {
                k: report.get(k)
                for k in (
                    "feature_extraction",
                    "training",
                    "speed",
                    "metrics",
                    "inference",
                    "peak_rss_mb",
                )
            },
            indent=2,
            default=str,
        )
    )


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
