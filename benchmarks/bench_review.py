"""Time from an operator's verdict to a new data version: verdicts through the review
page's HTTP API, then Publish (copy, ``dvc add``, ``dvc push``) on the embedded stack.

    python benchmarks/bench_review.py --flagged 20 --out benchmarks/results/review.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image

from components.data_version import DvcRepo, read_data_version
from components.local.processes import free_port
from components.local.stack import EmbeddedStack
from components.review import ReviewStore, create_app
from components.serving.records import DecisionLog, KeepImages, RecordSettings, Served
from fod_core.roofline import machine
from fod_core.synthetic import make_synthetic_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flagged", type=int, default=20, help="flagged parts to review")
    parser.add_argument("--size", type=int, default=900, help="image side (MVTec: 900)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="fod-bench-review-"))
    stack = EmbeddedStack(home / ".fod", s3_port=0, mlflow_port=0)
    settings = stack.up()
    settings.export()
    try:
        root = home / "repo"
        make_synthetic_dataset(root / "data", "widget", n_train=40, size=128, seed=0)
        repo = DvcRepo(root)
        repo.ensure(settings)
        repo.add_and_push(root / "data")
        record = home / "record.sqlite"
        log = DecisionLog(RecordSettings(record, KeepImages.FLAGGED, queue_size=4096))
        rng = np.random.default_rng(0)
        for _ in range(args.flagged):
            buffer = io.BytesIO()
            pixels = rng.integers(0, 255, (args.size, args.size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(buffer, "PNG")
            log.submit([Served(buffer.getvalue(), 1.0, 0.5, True, None, "fod-widget", "1", "x")])
        log.close(timeout=600)
        import uvicorn

        app = create_app(ReviewStore(record), category="widget", data_dir=root / "data",
                         repo_root=root)  # fmt: skip
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(),
                                               log_level="warning"))  # fmt: skip
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{server.config.port}"
        queue = requests.get(f"{url}/api/queue", timeout=30).json()
        started = time.perf_counter()
        for index, item in enumerate(queue):
            requests.post(
                f"{url}/api/decisions/{item['id']}/verdict",
                data={"verdict": "good" if index % 4 else "defective", "reviewer": "bench"},
                timeout=30,
            ).raise_for_status()
        verdicts_s = time.perf_counter() - started
        published = requests.post(f"{url}/api/publish", timeout=600).json()
        total_s = time.perf_counter() - started
        server.should_exit = True
        report = {
            "command": "python benchmarks/bench_review.py " + " ".join(sys.argv[1:]),
            "machine": machine().describe(),
            "flagged": len(queue),
            "image_side": args.size,
            "verdicts_seconds": round(verdicts_s, 3),
            "ms_per_verdict": round(1000 * verdicts_s / max(len(queue), 1), 1),
            "publish_seconds": round(total_s - verdicts_s, 2),
            "verdict_to_data_version_seconds": round(total_s, 2),
            "published": published,
            "data_version_matches": published["data_version"]
            == read_data_version(root / "data.dvc").md5,
        }
        print(json.dumps(report, indent=2))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2))
    finally:
        stack.down()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
