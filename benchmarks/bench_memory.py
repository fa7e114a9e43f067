"""Memory of training, end to end and per phase.

Default (``--mode command``): the whole ``fod train`` (and ``fod evaluate`` with
``--evaluate``) as a user runs it, one process per configuration, with a fresh feature
cache each (a user's first run). Per configuration: the peak resident memory of each phase
(``fod_core.memory``, written by the command into its manifest and metrics.json), the
command's exact peak (the kernel's, from ``wait4``) and its wall time.

    python benchmarks/bench_memory.py --data ../shared/data/mvtec_ad --category bottle \
        --batch-sizes 1 8 16 --epochs 1 --evaluate --out runs/bench/memory-command
    python benchmarks/bench_memory.py --data ../shared/data/screw_512 --category screw \
        --batch-sizes 1 8 16 --epochs 1 --evaluate --train-args "--preset hard" \
        --out runs/bench/memory-command-screw

``--mode step``: the training step alone on a category's cached features (forward,
backward, Adam), each batch size in a process of its own; one warm-up then ``--steps``
timed steps, peak RSS (CPU) or peak allocated memory (CUDA), seconds per image.

    python benchmarks/bench_memory.py --mode step --data ../shared/data/mvtec_ad \
        --category bottle --batch-sizes 1 8 16 --steps 2 --out runs/bench/memory

Writes <out>/memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import threading
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


def _sample_tree(pid: int, peak: list[float], done: threading.Event) -> None:
    """The summed RSS of ``pid`` and every process under it (compile workers count
    against a pod's memory too), sampled every 20 ms."""
    try:
        root = psutil.Process(pid)
        while not done.wait(0.02):
            total = 0
            for process in [root, *root.children(recursive=True)]:
                try:
                    total += process.memory_info().rss
                except psutil.Error:
                    continue
            peak[0] = max(peak[0], total / 2**20)
    except psutil.Error:
        return


def run_measured(command: list[str], log_path: Path) -> dict:
    """Run ``command`` to its end: its exact peak RSS in MB (the kernel's, from ``wait4``),
    the sampled peak of its process tree, and the wall seconds."""
    started = time.perf_counter()
    tree_peak, done = [0.0], threading.Event()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        sampler = threading.Thread(target=_sample_tree, args=(process.pid, tree_peak, done))
        sampler.start()
        _, status, usage = os.wait4(process.pid, 0)
    done.set()
    sampler.join()
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise SystemExit(f"{shlex.join(command)} failed ({process.returncode}):\n{tail}")
    return {"peak_rss_mb": usage.ru_maxrss / 1024, "tree_peak_rss_mb": tree_peak[0],
            "seconds": seconds}  # fmt: skip


def command_run(args, size: int) -> dict:
    """One configuration: fod train (then fod evaluate) with a fresh cache, each measured."""
    from fod_core.artifact import read_manifest

    fod = str(Path(sys.executable).with_name("fod"))
    folder = args.out / f"{args.category}-batch{size}"
    model = folder / "model"
    data = ["--data", str(args.data), "--category", args.category, "--format", args.format]
    train = [fod, "-q", "train", *data, "--out", str(model), "--cache-dir", str(folder / "cache")]
    train += ["--epochs", str(args.epochs), "--batch-size", str(size)]
    train += ["--precision", args.precision, "--device", args.device]
    train += shlex.split(args.train_args)
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    measured = run_measured(train, folder / "train.log")
    # an older fod (before per-phase memory) has no phases: the whole command's peak only
    memory = read_manifest(model)["training"].get("memory", {"phases": []})
    run = {
        "batch_size": size,
        "train": {"command": shlex.join(train), **measured, "phases": memory["phases"]},
    }
    print(f"batch {size:3d}: fod train {_describe(run['train'])}", flush=True)
    if args.evaluate:
        evaluate = [fod, "-q", "evaluate", "--model", str(model), *data, "--out",
                    str(folder / "report"), "--max-overlays", "8"]  # fmt: skip
        measured = run_measured(evaluate, folder / "evaluate.log")
        metrics = json.loads((folder / "report" / "metrics.json").read_text())
        run["evaluate"] = {"command": shlex.join(evaluate), **measured,
                           "phases": metrics.get("memory", {"phases": []})["phases"]}  # fmt: skip
        print(f"           fod evaluate {_describe(run['evaluate'])}", flush=True)
    return run


def _describe(part: dict) -> str:
    phases = ", ".join(f"{p['name']} {p['peak_rss_mb']:.0f}" for p in part["phases"])
    return (
        f"peak {part['peak_rss_mb']:.0f} MB (with its workers {part['tree_peak_rss_mb']:.0f}) "
        f"in {part['seconds']:.0f} s; per phase: {phases}"
    )


def markdown(runs: list[dict]) -> str:
    """One row per command and batch size: each phase's peak, the command's, its time."""
    lines = []
    for command in ("train", "evaluate"):
        rows = [r for r in runs if command in r]
        if not rows:
            continue
        names = list(dict.fromkeys(p["name"] for r in rows for p in r[command]["phases"]))
        lines += [
            f"| fod {command}, batch | "
            + " | ".join(names)
            + " | whole command | with its workers | wall |",
            "|---" * (len(names) + 4) + "|",
        ]
        for r in rows:
            part = r[command]
            peaks = {p["name"]: f"{p['peak_rss_mb']:,.0f} MB" for p in part["phases"]}
            cells = [peaks.get(n, "-") for n in names]
            lines.append(
                f"| {r['batch_size']} | " + " | ".join(cells)
                + f" | **{part['peak_rss_mb']:,.0f} MB** | {part['tree_peak_rss_mb']:,.0f} MB"
                f" | {part['seconds']:.0f} s |"
            )  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=["command", "step"], default="command")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--format", default="mvtec")
    parser.add_argument("--epochs", type=int, default=1, help="command mode: epochs to train")
    parser.add_argument("--evaluate", action="store_true", help="command mode: fod evaluate too")
    parser.add_argument("--train-args", default="", help="command mode: more fod train flags")
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
    if args.mode == "command":
        report["runs"] = [command_run(args, size) for size in args.batch_sizes]
        (args.out / "memory.json").write_text(json.dumps(report, indent=2))
        print(markdown(report["runs"]))
        return
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
