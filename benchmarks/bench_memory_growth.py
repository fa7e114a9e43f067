"""Does a long-running scorer's memory grow under varied batch sizes? Our allocator tuning
(``fod_core.runtime.configure_cpu_numerics``: freed buffers kept, no mmap) against glibc's
defaults (``FOD_MALLOC_TUNING=0``), each in a process of its own.

    python benchmarks/bench_memory_growth.py --model runs/products/auto/screw \
        --images ../shared/data/screw_512/screw/test --calls 300 \
        --out benchmarks/results/memory_growth.json

Each process loads the model as ``fod serve`` does (``load_detector``) and scores
``--calls`` requests of 1 to ``--max-batch`` images (sizes drawn with a fixed seed, the
same sequence for both), sampling its RSS after every call. Reported: RSS after the first
10 calls, the peak, the last, the growth over the second half of the calls (a heap that
fragments keeps growing there) and the time per image. PatchCore's greedy coreset
fragmented the tuned heap to 24 GB (BENCHMARKS.md, issue 28); steady scoring shapes did
not, and this measures the mixed shapes a server sees.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {"tuned": "1", "glibc defaults": "0"}


def worker(args: argparse.Namespace) -> None:
    import numpy as np
    import psutil

    from fod_core.artifact import load_detector

    detector = load_detector(args.model)
    images = sorted(p for p in Path(args.images).rglob("*.png"))
    rng = np.random.default_rng(args.seed)
    process = psutil.Process()
    rss, seen, started = [], 0, time.perf_counter()
    for _ in range(args.calls):
        size = int(rng.integers(1, args.max_batch + 1))
        chosen = [str(images[i]) for i in rng.choice(len(images), size)]
        detector.predict(chosen, batch_size=size)
        seen += size
        rss.append(process.memory_info().rss / 2**30)
    half = len(rss) // 2
    print(
        json.dumps(
            {
                "rss_gb_after_10_calls": round(rss[min(9, len(rss) - 1)], 3),
                "rss_gb_peak": round(max(rss), 3),
                "rss_gb_last": round(rss[-1], 3),
                "growth_gb_second_half": round(rss[-1] - rss[half], 3),
                "images": seen,
                "ms_per_image": round(1000 * (time.perf_counter() - started) / seen, 1),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--images", required=True)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    from fod_core.roofline import machine

    report = {"command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}
    report["machine"] = machine("cpu").describe()
    for name, value in SETTINGS.items():
        command = [sys.executable, __file__, "--worker", *sys.argv[1:]]
        env = os.environ | {"FOD_MALLOC_TUNING": value}
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        report[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(name, report[name], flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
