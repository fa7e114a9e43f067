"""The KServe model server: v1, v2 REST and gRPC, heatmaps, parity with `fod predict`,
bad input answered 4xx, loopback only."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import sys

import numpy as np
import psutil
import pytest
import requests
from PIL import Image

from fod_core.artifact import read_manifest


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def v1(server, instances, **extra) -> requests.Response:
    return requests.post(
        f"{server.url}/v1/models/{server.name}:predict",
        json={"instances": instances, **extra},
        timeout=60,
    )


def v2(server, inputs, **extra) -> requests.Response:
    return requests.post(
        f"{server.url}/v2/models/{server.name}/infer",
        json={"inputs": inputs, **extra},
        timeout=60,
    )


def png(size: tuple[int, int], color=(40, 80, 120)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def cli_predictions(model_a, test_images) -> list[dict]:
    """What the `fod predict` command prints for the same images."""
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "-q", "predict", "--model", str(model_a)]
        + [str(p) for p in test_images],
        capture_output=True,
        text=True,
        check=True,
    )
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_v1_batch_scores_equal_fod_predict(server, model_a, test_images, cli_predictions):
    response = v1(server, [{"image_bytes": {"b64": b64(p.read_bytes())}} for p in test_images])
    assert response.status_code == 200, response.text
    served = response.json()["predictions"]
    assert len(served) == len(test_images) == len(cli_predictions)
    for item, expected in zip(served, cli_predictions, strict=True):
        assert item["score"] == pytest.approx(expected["score"], abs=1e-5)
        assert item["is_anomalous"] == expected["is_anomalous"]
        assert item["threshold"] == pytest.approx(expected["threshold"], abs=1e-6)
        assert item["model_name"] == "fod-widget" and item["model_version"] == "7"
    # what the threshold promises, in words, wherever a decision is shown
    promise = read_manifest(model_a)["calibration"]["promise"]
    assert promise.startswith("at most ") and "confidence, from" in promise
    assert {p["promise"] for p in cli_predictions} == {promise}
    assert server.status()["promise"] == promise


def test_concurrent_requests_batched_together_score_as_alone(server, test_images, cli_predictions):
    from concurrent.futures import ThreadPoolExecutor

    bodies = [[b64(p.read_bytes())] for p in test_images] * 3
    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        answers = list(pool.map(lambda body: v1(server, body), bodies))
    assert all(a.status_code == 200 for a in answers)
    assert server.status()["scored"]["largest_batch_requests"] > 1  # they were batched
    for index, answer in enumerate(answers):
        expected = cli_predictions[index % len(test_images)]["score"]
        # Another batch composition changes float32 rounding in the matrix products only.
        assert answer.json()["predictions"][0]["score"] == pytest.approx(expected, rel=1e-5)


def test_v2_rest_and_grpc_give_the_same_scores(server, test_images, cli_predictions):
    from kserve import InferenceGRPCClient, InferInput, InferRequest

    images = [p.read_bytes() for p in test_images]
    expected = [p["score"] for p in cli_predictions]
    rest = v2(
        server,
        [{"name": "image", "shape": [4], "datatype": "BYTES", "data": list(map(b64, images))}],
    )
    assert rest.status_code == 200, rest.text
    body = rest.json()
    assert body["model_name"] == "fod-widget" and body["model_version"] == "7"
    outputs = {o["name"]: o for o in body["outputs"]}
    assert outputs["score"]["data"] == pytest.approx(expected, abs=1e-5)
    assert outputs["is_anomalous"]["data"] == [p["is_anomalous"] for p in cli_predictions]

    async def grpc_infer():
        client = InferenceGRPCClient(f"127.0.0.1:{server.grpc_port}")
        request = InferRequest(
            model_name=server.name,
            infer_inputs=[InferInput("image", [len(images)], "BYTES", images)],
        )
        return await client.infer(request)

    answer = asyncio.run(grpc_infer())
    assert answer.model_version == "7"
    grpc_outputs = {o.name: o for o in answer.outputs}
    assert list(grpc_outputs["score"].data) == pytest.approx(expected, abs=1e-5)


def test_raw_bytes_through_the_v2_rest_binary_extension_are_a_400(server, test_images):
    import struct

    image = test_images[0].read_bytes()
    tensor = struct.pack("<I", len(image)) + image  # BYTES element: 4-byte length + bytes
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": [1],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(tensor)},
                }
            ]
        }
    ).encode()
    response = requests.post(
        f"{server.url}/v2/models/{server.name}/infer",
        data=header + tensor,
        headers={
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(header)),
        },
        timeout=60,
    )
    assert response.status_code == 400, response.text[:300]
    assert "base64-encoded in JSON, or as raw bytes over gRPC" in response.json()["error"]


def test_anomaly_maps_as_png_heatmap_or_grid(server, test_images):
    image = b64(test_images[-1].read_bytes())
    heatmap = v1(server, [image], parameters={"anomaly_map": "png"}).json()["predictions"][0]
    picture = Image.open(io.BytesIO(base64.b64decode(heatmap["anomaly_map_png"])))
    assert picture.size == (128, 64)  # image | heatmap overlay at the model's 64x64
    grid = v2(
        server,
        [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [image]}],
        parameters={"anomaly_map": "grid", "grid_size": 8},
    ).json()
    output = {o["name"]: o for o in grid["outputs"]}["anomaly_map"]
    assert output["shape"] == [1, 8, 8]
    assert np.isfinite(output["data"]).all() and max(output["data"]) > 0


def test_metadata_and_status(server):
    metadata = requests.get(f"{server.url}/v2/models/{server.name}", timeout=10).json()
    assert {"name": "image", "datatype": "BYTES", "shape": [-1]} in metadata["inputs"]
    assert requests.get(f"{server.url}/v2/models/{server.name}/ready", timeout=10).ok
    assert server.status()["version"] == "7"


BAD_REQUESTS = {
    "v1 body not JSON": ("v1raw", b"{not json"),
    "v1 empty body": ("v1raw", b""),
    "v1 no instances": ("v1raw", json.dumps({"foo": 1}).encode()),
    "v1 instances not a list": ("v1", "abc"),
    "v1 no images": ("v1", []),
    "v1 not base64": ("v1", [{"b64": "!!!"}]),
    "v1 truncated PNG": ("v1", [{"b64": b64(png((64, 64))[:60])}]),
    "v1 not an image": ("v1", [{"b64": b64(b"hello, world")}]),
    "v1 empty image": ("v1", [{"b64": ""}]),
    "v1 a number": ("v1", [3]),
    "v1 image over the pixel limit": ("v1", [{"b64": b64(png((1200, 1000)))}]),
    "v1 too many images": ("v1", [{"b64": b64(png((8, 8)))}] * 5),
    "v1 unknown map format": ("v1params", {"anomaly_map": "svg"}),
    "v1 grid size not a number": ("v1params", {"anomaly_map": "grid", "grid_size": "x"}),
    "v1 grid size out of range": ("v1params", {"anomaly_map": "grid", "grid_size": 0}),
    "v1 parameters not an object": ("v1params", ["png"]),
    "payload over the limit": ("v1raw", b"x" * (2 * 1024 * 1024)),
    "v2 FP32 tensor": ("v2", [{"name": "image", "shape": [1], "datatype": "FP32", "data": [1.0]}]),
    "v2 shape and data disagree": (
        "v2",
        [{"name": "image", "shape": [2], "datatype": "BYTES", "data": [b64(png((8, 8)))]}],
    ),
    "v2 3-d shape": (
        "v2",
        [{"name": "image", "shape": [1, 1, 1], "datatype": "BYTES", "data": [b64(png((8, 8)))]}],
    ),
    "v2 two inputs": (
        "v2",
        [{"name": n, "shape": [1], "datatype": "BYTES", "data": [b64(png((8, 8)))]} for n in "ab"],
    ),
    "v2 no inputs": ("v2", []),
    "v2 inputs not a list": ("v2raw", json.dumps({"inputs": 5}).encode()),
    "v2 input without shape": ("v2", [{"name": "image"}]),
    "v2 corrupt image": (
        "v2",
        [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64(b"\x89PNG\r\n")]}],
    ),
    "v2 body not JSON": ("v2raw", b"garbage"),
    "v2 number instead of bytes": (
        "v2",
        [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [5]}],
    ),
    "unknown model": ("v1other", [b64(png((8, 8)))]),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS), ids=list(BAD_REQUESTS))
def test_malformed_input_is_a_4xx_with_a_message(server, case):
    kind, payload = BAD_REQUESTS[case]
    base = f"{server.url}/v1/models/{server.name}:predict"
    if kind == "v1":
        response = v1(server, payload)
    elif kind == "v1params":
        response = v1(server, [b64(png((16, 16)))], parameters=payload)
    elif kind == "v1raw":
        response = requests.post(base, data=payload, timeout=60)
    elif kind == "v2":
        response = v2(server, payload)
    elif kind == "v2raw":
        response = requests.post(f"{server.url}/v2/models/{server.name}/infer", data=payload)
    else:
        response = requests.post(
            f"{server.url}/v1/models/nope:predict", json={"instances": payload}, timeout=60
        )
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    assert response.text.strip()


def test_body_without_content_length_is_still_limited(server):
    def chunks():
        for _ in range(40):
            yield b"y" * 65536  # 2.5 MB in chunked transfer encoding, over the 1 MB limit

    response = requests.post(
        f"{server.url}/v1/models/{server.name}:predict", data=chunks(), timeout=60
    )
    assert response.status_code == 413


def test_server_survives_bad_input_and_listens_on_loopback_only(server, test_images):
    assert psutil.pid_exists(server.pid)
    ok = v1(server, [b64(test_images[0].read_bytes())])
    assert ok.status_code == 200
    process = psutil.Process(server.pid)
    sockets = [
        c
        for p in [process, *process.children(recursive=True)]
        for c in getattr(p, "net_connections", p.connections)(kind="inet")
        if c.status == psutil.CONN_LISTEN
    ]
    assert {c.laddr.port for c in sockets} >= {server.http_port, server.grpc_port}
    assert all(c.laddr.ip in ("127.0.0.1", "::ffff:127.0.0.1") for c in sockets), sockets


def test_fod_serve_reports_a_missing_model_clearly(tmp_path, capsys):
    from pipelines.cli import main

    assert main(["serve", "--model", str(tmp_path / "nothing-here")]) == 2
    assert "does not exist" in capsys.readouterr().err
