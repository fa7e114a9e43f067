"""Exported scoring graphs (ONNX Runtime, OpenVINO): the same answers as PyTorch, checked
by a parity gate that refuses an export that disagrees or no longer fits the model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fod_core.artifact import load_detector, read_manifest, update_manifest
from fod_core.cache import LocalStore
from fod_core.cli import main as fod_main
from fod_core.config import LevelConfig, ModelConfig, TrainConfig
from fod_core.export import (
    ExportError,
    Runtime,
    check_exports,
    export_failures,
    export_file,
    export_model,
    load_runtime,
)
from fod_core.synthetic import make_good_only_folder
from fod_core.train import train_model

TINY = ModelConfig(
    image_size=64,
    levels=(
        LevelConfig(d_model=32, n_heads=4, n_layers=1),
        LevelConfig(d_model=32, n_heads=4, n_layers=1),
    ),
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny model trained on a good-only folder (our first user's data), exported to
    both formats; (model directory, data root)."""
    root = tmp_path_factory.mktemp("export-data")
    make_good_only_folder(root, "part", n_good=16, size=72, seed=5)
    model = tmp_path_factory.mktemp("export") / "model"
    train_model(
        root,
        "part",
        model,
        model_config=TINY,
        format="folder",
        train_config=TrainConfig(epochs=1, batch_size=8, lr=1e-3, val_fraction=0.25),
        cache_store=LocalStore(model.parent / "cache"),
        progress=False,
    )
    export_model(model, ["onnx", "openvino"])
    return model, root


def test_both_exports_pass_parity_on_validation_and_planted_images(exported):
    model, _ = exported
    records = read_manifest(model)["export"]
    assert set(records) == {"onnx", "openvino"}
    n_val = len(read_manifest(model)["data"]["validation_images"])
    for record in records.values():
        parity = record["parity"]
        assert parity["passed"], parity
        assert parity["n_images"] == 2 * n_val  # each normal and a planted copy of it
        assert "planted" in parity["images"] and "validation" in parity["images"]
        assert parity["max_score_rel_error"] <= 1e-4 and parity["max_map_error"] <= 1e-3
        assert (model / record["file"]).is_file()
    assert (model / "export" / "openvino" / "model.bin").is_file()
    assert json.loads((model / "export" / "parity.json").read_text()).keys() == records.keys()
    assert export_failures(model) == []


@pytest.mark.parametrize("runtime", ["onnx", "openvino"])
def test_exported_runtimes_answer_what_pytorch_answers(exported, runtime):
    """Any batch size (the graph's batch dimension is dynamic), photos of another size."""
    model, root = exported
    images = sorted((root / "part" / "good").glob("*.png"))[:5]
    torch_answers = load_detector(model).predict(images, batch_size=5)
    detector = load_runtime(model, runtime)
    assert detector.runtime == runtime
    for batch_size in (1, 5):
        answers = detector.predict(images, batch_size=batch_size)
        for ours, theirs in zip(answers, torch_answers, strict=True):
            assert ours.score == pytest.approx(theirs.score, rel=1e-4)
            threshold = load_detector(model).post.threshold
            if abs(theirs.score - threshold) > 1e-4 * abs(threshold):  # not a round-off tie
                assert ours.is_anomalous == theirs.is_anomalous
            scale = np.abs(theirs.anomaly_map).max()
            assert np.abs(ours.anomaly_map - theirs.anomaly_map).max() <= 1e-3 * scale


def test_a_new_threshold_needs_no_new_export_but_new_level_weights_do(exported, tmp_path):
    model, _ = exported
    copy = shutil.copytree(model, tmp_path / "model")
    post = read_manifest(copy)["postprocessing"]
    update_manifest(copy, postprocessing={**post, "threshold": -1.0})
    assert all(p.is_anomalous for p in load_runtime(copy, "onnx").predict([_any_image(exported)]))
    update_manifest(copy, postprocessing={**post, "level_weights": [0.7, 0.3]})
    with pytest.raises(ExportError, match="traced from other weights or post-processing"):
        load_runtime(copy, "onnx")


def test_an_export_that_disagrees_fails_parity_and_is_refused(
    exported, tmp_path, capsys, damage_onnx
):
    """A damaged graph (one weight of the ONNX file scaled by 1.5): the check finds it,
    records it, `fod export --check-only` exits 3, and nothing serves it."""
    model, _ = exported
    copy = shutil.copytree(model, tmp_path / "model")
    damage_onnx(export_file(copy, Runtime.ONNX))
    with pytest.raises(ExportError, match="not the ones that were checked"):
        load_runtime(copy, "onnx")  # files changed after their check: refused before any check

    records = check_exports(copy)
    assert not records["onnx"]["parity"]["passed"] and records["openvino"]["parity"]["passed"]
    assert "differ" in records["onnx"]["parity"]["failure"]
    assert export_failures(copy) == [
        f"the onnx export failed its parity check ({records['onnx']['parity']['failure']}): "
        "serve it with --runtime torch"
    ]
    with pytest.raises(ExportError, match="failed its parity check"):
        load_runtime(copy, "onnx")
    load_runtime(copy, "openvino")  # the other export is unaffected
    assert fod_main(["-q", "export", "--model", str(copy), "--check-only"]) == 3
    assert "parity FAILED for onnx" in capsys.readouterr().err


def test_exporting_one_format_leaves_the_others_export_alone(exported, tmp_path):
    model, _ = exported
    copy = shutil.copytree(model, tmp_path / "model")
    onnx_before = export_file(copy, Runtime.ONNX).read_bytes()
    records = export_model(copy, ["openvino"])
    assert records["openvino"]["parity"]["passed"] and records["onnx"]["parity"]["passed"]
    assert export_file(copy, Runtime.ONNX).read_bytes() == onnx_before
    assert not (copy / "export" / "openvino" / "intermediate.onnx").exists()
    load_runtime(copy, "onnx")


def test_missing_export_and_missing_data_are_clear_errors(exported, tmp_path, capsys):
    model, _ = exported
    bare = tmp_path / "bare"
    shutil.copytree(model, bare, ignore=shutil.ignore_patterns("export"))
    manifest = read_manifest(bare)
    manifest.pop("export")
    (bare / "fod.json").write_text(json.dumps(manifest))
    code = fod_main(["-q", "predict", "--model", str(bare), "--runtime", "openvino", "x.png"])
    assert code == 2 and "has no openvino export: run `fod export" in capsys.readouterr().err
    update_manifest(bare, data={**manifest["data"], "root": str(tmp_path / "gone")})
    assert fod_main(["-q", "export", "--model", str(bare)]) == 2
    assert "pass --data and --category" in capsys.readouterr().err


def _any_image(exported) -> Path:
    return sorted((exported[1] / "part" / "good").glob("*.png"))[0]
