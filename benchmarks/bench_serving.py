"""Load test of the FOD model server: concurrent clients for a fixed time per level.

Starts ``python -m components.serving`` (what ``fod serve`` runs) on 127.0.0.1, then for
each concurrency level runs that many client threads, each sending one v1 request after
another (``--images-per-request`` PNG/JPEG images, base64) until the time is up.
Reports throughput in images/s, p50/p99 latency, errors (non-200 answers and transport
failures) and the server's RSS (peak over the run, sampled every 0.2 s).

    python benchmarks/bench_serving.py --model runs/bench/lite0_e40/model \
        --images ../shared/data/mvtec_ad/bottle/test --duration 30 --concurrency 1 4 16
"""

from __future__ import annotations

import argparse
import base64
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import requests

from components.local.processes import ServerState, free_port, stop_server, wait_healthy
from components.local.servers import LocalServer, spawn_model_server


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


class RssSampler(threading.Thread):
    """Peak resident memory of the server process and its children."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.peak = 0
        self.stop = threading.Event()

    def current(self) -> int:
        processes = [self.process, *self.process.children(recursive=True)]
        return sum(p.memory_info().rss for p in processes if p.is_running())

    def run(self) -> None:
        while not self.stop.wait(0.2):
            self.peak = max(self.peak, self.current())


def run_level(server: LocalServer, bodies: list[bytes], clients: int, duration: float) -> dict:
    url = f"{server.url}/v1/models/{server.name}:predict"
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    deadline = time.perf_counter() + duration

    def client(index: int) -> None:
        session = requests.Session()
        position = index
        while time.perf_counter() < deadline:
            body = bodies[position % len(bodies)]
            position += clients
            started = time.perf_counter()
            try:
                response = session.post(
                    url, data=body, headers={"Content-Type": "application/json"}, timeout=120
                )
                ok = response.status_code == 200
            except requests.RequestException:
                ok = False
            if ok:
                latencies[index].append(time.perf_counter() - started)
            else:
                errors[index] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    flat = [x for per_client in latencies for x in per_client]
    return {
        "clients": clients,
        "seconds": elapsed,
        "requests": len(flat),
        "errors": sum(errors),
        "latencies": flat,
    }


def untrained_model(directory: Path, backbone: str, image_size: int) -> Path:
    """A model of the method's architecture with untrained FOD weights: serving speed and
    memory depend on the architecture and input size, not on what the weights learned."""
    from fod_core.artifact import save_artifact
    from fod_core.backbone import BackboneSpec, FeatureExtractor
    from fod_core.config import ModelConfig
    from fod_core.model import create_fod_model
    from fod_core.processing import PostProcessing, PreProcessing

    config = ModelConfig(image_size=image_size)
    extractor = FeatureExtractor(spec=BackboneSpec(name=backbone))
    model = create_fod_model(config, in_channels=extractor.channels, strides=extractor.strides)
    save_artifact(
        directory,
        model=model,
        extractor=extractor,
        pre=PreProcessing(image_size, extractor.mean, extractor.std),
        post=PostProcessing(image_size, config.score_sigma, threshold=1.0, threshold_mode="far"),
        metadata={"category": "bench"},
    )
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="model directory or models:/ URI")
    source.add_argument(
        "--untrained-backbone",
        help="serve the method's architecture on this backbone with untrained FOD weights",
    )
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--images", type=Path, required=True, help="folder of test images")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--images-per-request", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=5, help="requests before measuring")
    parser.add_argument("--max-batch", type=int, default=1, help="the server's --max-batch")
    parser.add_argument(
        "--record",
        choices=["none", "flagged", "all"],
        default="none",
        help="the decision record: off, or on keeping these full images",
    )
    parser.add_argument("--out", type=Path, help="write the results JSON here")
    args = parser.parse_args()

    paths = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in {".png", ".jpg"})
    if not paths:
        sys.exit(f"no PNG/JPEG images under {args.images}")
    encoded = [base64.b64encode(p.read_bytes()).decode() for p in paths]
    per = args.images_per_request
    bodies = [
        json.dumps(
            {
                "instances": [
                    {"image_bytes": {"b64": encoded[(i + j) % len(encoded)]}} for j in range(per)
                ]
            }
        ).encode()
        for i in range(0, len(encoded), per)
    ]

    home = Path(tempfile.mkdtemp(prefix="fod-bench-serving-"))
    if args.untrained_backbone:
        model = untrained_model(home / "model", args.untrained_backbone, args.image_size)
        args.model = str(model)
    server = spawn_model_server(
        home,
        "fod-bench",
        args.model,
        http_port=free_port(),
        grpc_port=free_port(),
        extra=("--poll-interval", "0", "--max-batch", str(args.max_batch))
        + (
            ("--record", str(home / "records.sqlite"), "--keep-images", args.record)
            if args.record != "none"
            else ()
        ),
    )
    process = ServerState(pid=server.pid, log=server.log)
    started = time.perf_counter()
    wait_healthy("model server", process, lambda: bool(server.status()), timeout=300)
    startup_s = time.perf_counter() - started
    sampler = RssSampler(process.pid)
    report = {
        "command": "python benchmarks/bench_serving.py " + " ".join(sys.argv[1:]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": psutil.cpu_count()},
        "images": len(paths),
        "images_per_request": per,
        "server_startup_s": startup_s,
        "levels": [],
    }
    try:
        for body in bodies[: args.warmup]:
            requests.post(f"{server.url}/v1/models/fod-bench:predict", data=body, timeout=120)
        report["server_rss_mb_idle"] = sampler.current() / 2**20
        sampler.start()
        for clients in args.concurrency:
            level = run_level(server, bodies, clients, args.duration)
            latencies = level.pop("latencies")
            level |= {
                "images_per_s": level["requests"] * per / level["seconds"],
                "p50_ms": 1000 * statistics.median(latencies) if latencies else None,
                "p99_ms": 1000 * percentile(latencies, 99) if latencies else None,
                "server_rss_mb_peak_so_far": sampler.peak / 2**20,
            }
            report["levels"].append(level)
            print(
                f"{clients:3d} clients: {level['images_per_s']:.2f} images/s, "
                f"p50 {level['p50_ms']:.0f} ms, p99 {level['p99_ms']:.0f} ms, "
                f"errors {level['errors']}, server RSS peak {sampler.peak / 2**20:.0f} MB",
                flush=True,
            )
    finally:
        sampler.stop.set()
        stop_server(process)
    report["server_rss_mb_peak"] = sampler.peak / 2**20
    if args.record != "none":
        from components.serving.records import read_decisions

        report["records"] = {"rows": len(read_decisions(home / "records.sqlite"))}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "levels"}, indent=2))


if __name__ == "__main__":
    main()
