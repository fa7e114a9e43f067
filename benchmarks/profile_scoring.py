"""Where the scoring graph's time goes: torch.profiler over PyTorch scoring at batch 1,
ops by self CPU time, in ms per image (BENCHMARKS.md, "What the profile shows is left").

    python benchmarks/profile_scoring.py --model runs/export/bottle_e4 \
        --images ../shared/data/mvtec_ad/bottle/test/good
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

from fod_core.artifact import load_detector
from fod_core.roofline import machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", type=int, default=18)
    args = parser.parse_args()
    detector = load_detector(args.model)
    print(machine(detector.device).describe())
    image = sorted(args.images.rglob("*.png"))[:1]
    batch, _ = detector.preprocess(detector._decode(image))
    for _ in range(3):  # warm-up, kernel compilation
        detector.score_batch(batch)
    with profile(activities=[ProfilerActivity.CPU]) as profiled:
        for _ in range(args.repeats):
            detector.score_batch(batch)
    events = sorted(profiled.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) / 1000 / args.repeats
    print(f"{'op':60s} {'ms/image':>9s}   (total {total:.1f} ms/image)")
    for event in events[: args.rows]:
        print(f"{event.key[:60]:60s} {event.self_cpu_time_total / 1000 / args.repeats:9.1f}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
