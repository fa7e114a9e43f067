"""The whole pipeline through the KFP local runner against the real stack, and its YAML."""

from __future__ import annotations

import json

import mlflow
import pytest
import yaml
from mlflow import MlflowClient
from PIL import Image

from components.data_version import DvcRepo, remote_url
from components.local.servers import LocalServing
from components.tracking import download_fod_model
from fod_core.artifact import read_manifest
from fod_core.synthetic import make_synthetic_dataset
from pipelines.dag import COMPILED_YAML, compile_pipeline
from pipelines.runner import run_local

CATEGORY = "gadget"  # its own registered model: other tests share the MLflow server


def test_compiled_yaml_is_current(tmp_path, monkeypatch):
    for variable in ("FOD_IMAGE", "FOD_CUDA_IMAGE"):  # the defaults are checked in
        monkeypatch.delenv(variable, raising=False)
    fresh = compile_pipeline(tmp_path / "pipeline.yaml")
    fresh_docs = list(yaml.safe_load_all(fresh.read_text()))
    assert fresh_docs == list(yaml.safe_load_all(COMPILED_YAML.read_text())), (
        "pipelines/fod_training.yaml is stale: run `fod pipeline compile`"
    )


def test_compiled_yaml_requests_a_gpu_for_training():
    spec = next(yaml.safe_load_all(COMPILED_YAML.read_text()))  # then the platform spec
    executors = spec["deploymentSpec"]["executors"]
    resources = executors["exec-train-fod"]["container"]["resources"]
    assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert resources["accelerator"]["resourceCount"] == "1"
    assert "accelerator" not in executors["exec-evaluate-model"]["container"].get("resources", {})


def test_each_role_gets_its_image_from_the_environment(tmp_path, monkeypatch):
    """A user's registry needs no code edit: the images are read at compile (and submit)
    time. Training runs the CUDA image and tolerates the GPU nodes' taint (FOD_GPU_TOLERATIONS)."""
    monkeypatch.setenv("FOD_IMAGE", "registry.example.com/fod:1.2")
    monkeypatch.setenv("FOD_CUDA_IMAGE", "registry.example.com/fod:1.2-cuda")
    documents = list(yaml.safe_load_all(compile_pipeline(tmp_path / "p.yaml").read_text()))
    executors = documents[0]["deploymentSpec"]["executors"]
    images = {name: spec["container"]["image"] for name, spec in executors.items()}
    assert images.pop("exec-train-fod") == "registry.example.com/fod:1.2-cuda"
    assert set(images.values()) == {"registry.example.com/fod:1.2"}
    platform = documents[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert platform["exec-train-fod"]["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert "tolerations" not in platform["exec-evaluate-model"]


def driver_tolerations_before_2_5(entries: list[dict]) -> list[dict]:
    """What the driver of KFP backends 2.2.0 to 2.4.1 makes of a task's tolerations
    (backend/src/v2/driver/driver.go at 2.4.1, read for this test): the kubernetes_platform
    proto it vendors has key, operator, value, effect and toleration_seconds; it parses the
    platform spec with AllowUnknownFields, so anything else (``tolerationJson``) is dropped,
    and every entry becomes one Toleration of the fields that were kept."""
    tolerations = []
    for entry in entries:
        toleration = {k: entry[k] for k in ("key", "operator", "value", "effect") if entry.get(k)}
        if entry.get("tolerationSeconds") is not None:  # int64: a JSON string in the YAML
            toleration["tolerationSeconds"] = int(entry["tolerationSeconds"])
        tolerations.append(toleration)
    return tolerations


@pytest.mark.parametrize(
    "tolerations",
    [
        None,  # the default
        [
            {"key": "gpu", "operator": "Equal", "value": "a100", "effect": "NoSchedule"},
            {"key": "spot", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 600},
        ],
        [],
    ],
    ids=["default", "custom", "none"],
)
def test_tolerations_reach_the_pod_on_the_oldest_supported_backend(
    tmp_path, monkeypatch, tolerations
):
    """Compiled as plain fields, the training step's tolerations come out of an old driver
    as they were set, each one valid. A run-time parameter compiled to ``tolerationJson``,
    which that driver drops: it built ``{}``, which the API server refuses."""
    from components.settings import DEFAULT_GPU_TOLERATIONS, toleration_problem

    monkeypatch.delenv("FOD_GPU_TOLERATIONS", raising=False)
    if tolerations is not None:
        monkeypatch.setenv("FOD_GPU_TOLERATIONS", json.dumps(tolerations))
    documents = list(yaml.safe_load_all(compile_pipeline(tmp_path / "p.yaml").read_text()))
    platform = documents[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    entries = platform["exec-train-fod"].get("tolerations", [])
    applied = driver_tolerations_before_2_5(entries)
    assert applied == (DEFAULT_GPU_TOLERATIONS if tolerations is None else tolerations)
    assert [toleration_problem(t) for t in applied] == [None] * len(applied)
    # what the parameter's compiled form became on such a backend
    (before,) = driver_tolerations_before_2_5(
        [{"tolerationJson": {"componentInputParameter": "x"}}]
    )
    assert toleration_problem(before) == "an empty key needs operator Exists"


# The fields of the Kubernetes executor config that KFP backend 2.2.0 knows
# (kubernetes_platform/proto/kubernetes_executor_config.proto at the commit its go.mod
# pins, 8b2a099e8c9f), per message, for the messages the compiled pipelines use. Its driver
# (and 2.4.0's) parses the config strictly: any other field fails the step.
KFP_2_2_FIELDS = {
    "config": {"secretAsVolume", "secretAsEnv", "pvcMount", "nodeSelector", "podMetadata",
               "imagePullSecret", "imagePullPolicy", "configMapAsVolume", "configMapAsEnv",
               "activeDeadlineSeconds", "fieldPathAsEnv", "tolerations",
               "genericEphemeralVolume", "nodeAffinity", "podAffinity"},
    "secretAsVolume": {"secretName", "mountPath", "optional"},
    "secretAsEnv": {"secretName", "keyToEnv"},
    "configMapAsEnv": {"configMapName", "keyToEnv"},
    "secretAsEnv.keyToEnv": {"secretKey", "envVar"},
    "configMapAsEnv.keyToEnv": {"configMapKey", "envVar"},
    "tolerations": {"key", "operator", "value", "effect", "tolerationSeconds"},
}  # fmt: skip


def unknown_to_kfp_2_2(config: dict) -> list[str]:
    unknown = [f"config.{k}" for k in set(config) - KFP_2_2_FIELDS["config"]]
    for key, entries in config.items():
        for entry in entries if isinstance(entries, list) else []:
            known = KFP_2_2_FIELDS.get(key)
            if known is None:
                unknown.append(f"{key}: not checked here")
                continue
            unknown += [f"{key}.{field}" for field in set(entry) - known]
            for inner in entry.get("keyToEnv", []):
                unknown += [
                    f"{key}.keyToEnv.{f}" for f in set(inner) - KFP_2_2_FIELDS[f"{key}.keyToEnv"]
                ]
    return unknown


@pytest.mark.parametrize("compiled", ["fod_training.yaml", "fod_retrain_check.yaml"])
def test_every_steps_kubernetes_config_parses_on_kfp_backend_2_2(compiled):
    """What the checked-in pipelines ask of Kubernetes, each step's config read as the
    strict driver of KFP 2.2.0 reads it: no field it does not know."""
    documents = list(yaml.safe_load_all((COMPILED_YAML.parent / compiled).read_text()))
    executors = documents[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert executors
    for name, config in executors.items():
        assert unknown_to_kfp_2_2(config) == [], name
    env = executors["exec-train-fod" if "training" in compiled else next(iter(executors))]
    assert env["configMapAsEnv"][0]["configMapName"] == "fod-settings"  # the name stays


@pytest.mark.parametrize(
    "value",
    ['{"key": "gpu"}', '[{"key": "gpu", "operator": "Exist"}]', '[{"operator": "Equal"}]',
     '[{"key": "g", "effect": "NoSchedule", "tolerationSeconds": 5}]', "[{"],
)  # fmt: skip
def test_a_wrong_toleration_fails_at_compile_time(tmp_path, monkeypatch, value):
    from components.settings import SettingsError

    monkeypatch.setenv("FOD_GPU_TOLERATIONS", value)
    with pytest.raises(SettingsError, match="FOD_GPU_TOLERATIONS"):
        compile_pipeline(tmp_path / "p.yaml")


def test_no_step_with_side_effects_is_cached():
    """A cached step is skipped: registering (aliases move) and deploying must always run."""
    tasks = {}
    for component in next(yaml.safe_load_all(COMPILED_YAML.read_text()))["components"].values():
        tasks |= component.get("dag", {}).get("tasks", {})
    for name in ("register-model", "deploy-model", "validate-data", "cache-features"):
        assert not tasks[name].get("cachingOptions", {}).get("enableCache"), name


def test_every_component_runs_from_its_own_source():
    """KFP ships each component's source alone to its container: any name the body uses
    that it does not import or define itself is a NameError there. Checked on the compiled
    YAML (what the cluster runs), with ruff's undefined-name rule. The star imports KFP
    puts in front are spelled out first: behind a star, no name counts as undefined."""
    import importlib
    import re
    import subprocess
    import sys

    from pipelines.schedule import COMPILED_YAML as CHECK_YAML

    def spell_out(match: re.Match) -> str:
        module = importlib.import_module(match[1])
        names = getattr(module, "__all__", None) or [n for n in dir(module) if n[0] != "_"]
        return f"from {match[1]} import ({', '.join(names)})"

    for compiled in (COMPILED_YAML, CHECK_YAML):
        executors = next(yaml.safe_load_all(compiled.read_text()))["deploymentSpec"]["executors"]
        for name, spec in executors.items():
            source = spec["container"]["command"][-1]
            assert "def " in source, name
            source = re.sub(r"^from ([\w.]+) import \*$", spell_out, source, flags=re.M)
            result = subprocess.run(
                [sys.executable, "-m", "ruff", "check", "--isolated", "--select", "F821,F822",
                 "--stdin-filename", f"{name}.py", "-"],
                input=source, capture_output=True, text=True, check=False,
            )  # fmt: skip
            assert result.returncode == 0, f"{compiled.name} {name}:\n{result.stdout}"


@pytest.fixture(scope="module")
def versioned_data(settings, tmp_path_factory):
    repo_root = tmp_path_factory.mktemp("repo")
    data = make_synthetic_dataset(
        repo_root / "data", CATEGORY, n_train=28, n_test_good=6, n_test_defect=4, size=64, seed=5
    )
    repo = DvcRepo(repo_root)
    repo.ensure(settings, remote_url(settings, "dvc-pipeline"))
    return repo_root, data, repo.add_and_push(data)


def _arguments(settings, version, **overrides) -> dict:
    return {
        "dvc_remote": remote_url(settings, "dvc-pipeline"),
        "data_version": version.md5,
        "categories": [CATEGORY],
        "code_version": "test-code",
        "image_size": 64,
        "model_size": "compact",
        "epochs": 30,
        "batch_size": 8,
        "learning_rate": 1e-3,
        # 10 validation normals: with 6 the threshold (their maximum) sat so near the test
        # normals' scores that the false-alarm gate flipped with the CPU's kernels (AVX-512,
        # one thread) and the first run registered no champion.
        "val_fraction": "0.35",
        "cache_prefix": "features-pipeline-test",
        "min_image_auroc": 0.8,
        "deploy_target": "local",
    } | overrides


@pytest.mark.slow
def test_pipeline_registers_serves_a_champion_then_gates_a_worse_model(
    settings, stack, versioned_data, tmp_path
):
    _, data, version = versioned_data
    client = MlflowClient(settings.mlflow_uri)
    name = f"fod-{CATEGORY}"

    run_local(_arguments(settings, version), tmp_path / "first")  # the recipe chosen: auto
    champion = client.get_model_version_by_alias(name, "champion")
    mlflow.set_tracking_uri(settings.mlflow_uri)
    registered = download_fod_model(f"models:/{name}/{champion.version}", tmp_path / "champion")
    manifest = read_manifest(registered)
    weights = manifest["postprocessing"]["level_weights"]
    # FOD's two levels, then the two retrieval branches the auto recipe scores
    assert manifest["model"]["retrieval_features"] == "both" and manifest["recipe"]["auto"]
    assert len(weights) == 4 and sum(weights) == pytest.approx(1.0)
    tag = ",".join(map(str, weights))
    assert client.get_run(champion.run_id).data.tags["level_weights"] == tag
    assert champion.tags["level_weights"] == tag
    calibration = {a.path for a in client.list_artifacts(champion.run_id, "calibration")}
    assert calibration == {"calibration/level_weights.png"}
    assert champion.tags["data_version"] == version.md5
    assert champion.tags["code_version"] == "test-code"
    # Exported and checked against PyTorch before registration; the version carries both.
    assert champion.tags["export"].startswith("onnx: parity passed"), champion.tags["export"]
    assert "openvino: parity passed" in champion.tags["export"]
    assert (registered / "export" / "model.onnx").is_file()
    assert (registered / "export" / "openvino" / "model.xml").is_file()
    assert json.loads(champion.tags["metrics"])["image_auroc"] >= 0.8
    run = client.get_run(champion.run_id)
    assert run.data.tags["data_version"] == version.md5
    assert len(client.get_metric_history(run.info.run_id, "val_reconstruction")) == 30
    # The threshold is calibrated once per run, and MLflow has the value the model uses.
    thresholds = client.get_metric_history(run.info.run_id, "threshold")
    served = read_manifest(registered)["postprocessing"]["threshold"]
    assert [m.value for m in thresholds] == [pytest.approx(served)]
    assert run.data.metrics["test_image_auroc"] >= 0.8
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/roc.png", "evaluation/metrics.json"} <= artifacts
    # The deploy step started a model server on loopback that serves the champion.
    server = LocalServing(stack.home).get(name)
    image = next((data / CATEGORY / "test").glob("*/000.png")).read_bytes()
    assert server.predict([image])[0]["model_version"] == champion.version

    # The method barely trained: registered as challenger, the champion stays.
    worse = {"auto_recipe": False, "level_weights": "equal", "epochs": 1, "learning_rate": 1e-7}
    run_local(
        _arguments(settings, version, **worse, min_image_auroc=0.0, export_formats=""),
        tmp_path / "second",
    )
    challenger = client.get_model_version_by_alias(name, "challenger")
    assert int(challenger.version) == int(champion.version) + 1
    assert client.get_model_version_by_alias(name, "champion").version == champion.version
    assert "worse than the champion" in challenger.tags["gates"]
    assert "export" not in challenger.tags  # export_formats="": nothing exported
    assert server.predict([image])[0]["model_version"] == champion.version


@pytest.mark.slow
def test_invalid_data_stops_the_run_and_registers_nothing(settings, tmp_path, capfd):
    bad_root = tmp_path / "bad"
    make_synthetic_dataset(
        bad_root / "data", "broken", n_train=12, n_test_good=2, n_test_defect=2, size=64, seed=9
    )
    (bad_root / "data/broken/train/good/002.png").write_bytes(b"corrupt")
    mask = next((bad_root / "data/broken/ground_truth/scratch").glob("*.png"))
    Image.new("L", (10, 10), 255).save(mask)  # a mask of another size than its image
    repo = DvcRepo(bad_root)
    repo.ensure(settings, remote_url(settings, "dvc-pipeline"))
    bad_version = repo.add_and_push(bad_root / "data")
    with pytest.raises(RuntimeError) as failed:
        run_local(_arguments(settings, bad_version, categories=["broken"]), tmp_path / "bad-run")
    output = capfd.readouterr()
    logs = output.out + output.err
    # the error first (issue 27): the step's own message, not the executor's input JSON
    assert str(failed.value).startswith(
        "step fail-validation failed: RuntimeError: data validation FAILED"
    )
    assert "raw logs: " in str(failed.value) and "\x1b" not in str(failed.value)
    assert "error: RuntimeError: data validation FAILED" in logs
    assert "parameterValues" not in logs and "Traceback" not in logs
    assert "broken/train/good/002.png" in logs
    assert "broken/test/scratch/000.png" in logs and "size_mismatch" in logs
    assert "too few normal images left for validation" in logs  # 12 normals, 2 for validation
    assert not MlflowClient(settings.mlflow_uri).search_model_versions("name='fod-broken'")


def test_submit_to_an_unreachable_endpoint_is_a_clear_error(capsys):
    import socket

    from pipelines.cli import main

    with socket.socket() as sock:  # a loopback port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert main(["pipeline", "submit", "--host", f"http://127.0.0.1:{port}"]) == 2
    assert "is unreachable" in capsys.readouterr().err
