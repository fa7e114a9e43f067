"""Serving exported models: a registered version carries its ONNX and OpenVINO graphs,
is served by either runtime with PyTorch's answers, and an export that disagrees keeps
its version from being promoted or served."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest
from kfp.dsl import Dataset, Model
from mlflow import MlflowClient
from registered import register_version

from components import steps
from components.errors import ServingError
from components.local.servers import LocalServing
from components.registry import CHAMPION, PromotionGates, register_model
from components.serving.source import ModelSource
from components.tracking import connect, download_fod_model
from fod_core.artifact import load_detector
from fod_core.export import Runtime, check_exports, export_file, export_model


@pytest.fixture(scope="module")
def exported_a(model_a, tmp_path_factory):
    model = shutil.copytree(model_a, tmp_path_factory.mktemp("exported-a") / "model")
    export_model(model, ["onnx", "openvino"])  # parity on model A's validation images
    return model


def test_registered_version_carries_its_exports_and_each_runtime_serves_it(
    settings, stack, exported_a, test_images, tmp_path
):
    version = register_version(settings, exported_a, "exported")
    tags = MlflowClient().get_model_version("fod-exported", version).tags
    assert tags["export"].startswith("onnx: parity passed"), tags["export"]
    assert "openvino: parity passed" in tags["export"]
    downloaded = download_fod_model(f"models:/fod-exported/{version}", tmp_path)
    for name in ("model.onnx", "openvino/model.xml", "openvino/model.bin", "parity.json"):
        assert (downloaded / "export" / name).is_file(), name

    expected = load_detector(exported_a).predict(test_images)
    serving = LocalServing(stack.home)
    for runtime in ("onnx", "openvino"):
        name = f"fod-exported-{runtime}"
        server = serving.deploy(
            name, version, model_uri=f"models:/fod-exported/{version}", env=settings.env(),
            runtime=runtime,
        )  # fmt: skip
        try:
            assert server.status()["runtime"] == runtime
            answers = server.predict([p.read_bytes() for p in test_images])
        finally:
            serving.stop(name)
        for answer, ours in zip(answers, expected, strict=True):
            assert answer["score"] == pytest.approx(ours.score, rel=1e-4)
            assert answer["is_anomalous"] == ours.is_anomalous


def test_a_version_whose_export_disagrees_is_tagged_not_promoted_and_not_served(
    settings, exported_a, tmp_path, damage_onnx
):
    model = shutil.copytree(exported_a, tmp_path / "model")
    damage_onnx(export_file(model, Runtime.ONNX))
    check_exports(model)
    connect(settings.mlflow_uri, "damaged")
    with mlflow.start_run() as run:
        pass
    result = register_model(
        model,
        run_id=run.info.run_id,
        category="damaged",
        metrics={"image_auroc": 1.0},
        data_version="d",
        code_version="c",
        gates=PromotionGates(min_image_auroc=0.0),  # every metric gate passes
    )
    assert not result.promoted
    assert len(result.reasons) == 1 and result.reasons[0].startswith(
        "the onnx export failed its parity check (image scores differ"
    )
    client = MlflowClient()
    tags = client.get_model_version("fod-damaged", result.version).tags
    assert "onnx: FAILED" in tags["export"] and "openvino: parity passed" in tags["export"]
    assert tags["gates"] == result.reasons[0]
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias("fod-damaged", CHAMPION)
    with pytest.raises(ServingError, match="failed its parity check"):
        ModelSource(str(model), runtime="onnx").load("1")
    ModelSource(str(model), runtime="openvino").load("1")  # its other export is fine


def test_the_pipelines_bf16_check_is_a_tag_and_a_server_in_bf16_says_so(
    settings, stack, exported_a, served_data, test_images, tmp_path
):
    """The export step with "bf16" records the check, registration tags it, and
    `fod deploy local --precision` (--precision of the server) reaches the model server,
    whose /status names it."""
    checked = Model(uri=str(tmp_path / "checked"))
    result = json.loads(
        steps.export_model.python_func(
            dataset=Dataset(uri=str(served_data)),
            calibrated_model=Model(uri=str(exported_a)),
            category="widget",
            data_format="mvtec",
            export_formats="bf16",
            model=checked,
        )
    )
    check = result["bf16"]
    assert set(result) == {"bf16"} and set(check["fp32"]) == {"image_auroc", "pixel_auroc", "aupro"}
    assert checked.metadata["bf16_parity"] == ("passed" if check["passed"] else check["failure"])
    version = register_version(settings, Path(checked.path), "bf16")
    tag = MlflowClient().get_model_version("fod-bf16", version).tags["bf16_check"]
    assert tag.startswith("passed (accuracy moves by" if check["passed"] else "FAILED")

    expected = load_detector(exported_a).predict(test_images)
    serving = LocalServing(stack.home)
    server = serving.deploy(
        "fod-bf16", version, model_uri=f"models:/fod-bf16/{version}", env=settings.env(),
        precision="bf16",
    )  # fmt: skip
    try:
        assert server.status()["precision"] == "bf16" and server.status()["runtime"] == "torch"
        answers = server.predict([p.read_bytes() for p in test_images])
    finally:
        serving.stop("fod-bf16")
    for answer, ours in zip(answers, expected, strict=True):
        # bf16's 2^-8 per matmul, amplified by the softmax of the divergences that weights
        # the tokens: 5.3% at most measured on these images (see tests/model/test_export.py)
        assert answer["score"] == pytest.approx(ours.score, rel=0.1)
        assert answer["score"] != ours.score
    # auto without a bf16 check (exported_a has none) scores in fp32
    assert ModelSource(str(exported_a), precision="auto").load("1").detector.precision == "fp32"
