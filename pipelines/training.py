"""The FOD training pipeline: fetch a data version, then per category (in parallel):
validate -> cache features -> train -> calibrate -> evaluate -> register/promote -> deploy.

The same DAG compiles to KFP YAML for a cluster (``fod pipeline compile``), runs on one
machine through the KFP local runner (``fod pipeline run``), and is submitted to a KFP
endpoint with ``fod pipeline submit``.
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path

from kfp import compiler, dsl, kubernetes
from kfp.dsl import Dataset, Input

from components import steps
from components.deployment import DEPLOYER_TOKEN_DIR
from components.settings import (
    CLUSTER_CONFIG_KEYS,
    CLUSTER_CONFIG_MAP,
    CLUSTER_SECRET,
    CLUSTER_SECRET_KEYS,
    images,
)

log = logging.getLogger(__name__)

PIPELINE_NAME = "fod-training"
COMPILED_YAML = Path(__file__).with_name("fod_training.yaml")
# The steps that run the CUDA image; every other step runs the CPU image.
CUDA_STEPS = ("train-fod",)
GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
# The deploy step talks to the Kubernetes API as fod-deployer (infra/kfp-standalone).
DEPLOYER_TOKEN_SECRET = "fod-deployer-token"
RUN_TIMEOUT = 6 * 3600.0  # how long a submitter waits for a KFP run


def with_cluster_settings(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """In a cluster every step reaches S3 and MLflow through the environment: endpoints
    from the ConfigMap, keys from the Secret (infra/base). The local runner ignores this
    and passes the embedded stack's environment instead."""
    kubernetes.use_config_map_as_env(
        task,
        config_map_name=CLUSTER_CONFIG_MAP,
        config_map_key_to_env={k: k for k in CLUSTER_CONFIG_KEYS},
    )
    kubernetes.use_secret_as_env(
        task, secret_name=CLUSTER_SECRET, secret_key_to_env={k: k for k in CLUSTER_SECRET_KEYS}
    )
    return task


@dsl.pipeline(name="fod-category", description="One category: validate to registration.")
def category_pipeline(
    dataset: Input[Dataset],
    category: str,
    data_format: str,
    data_version: str,
    code_version: str,
    backbone: str,
    image_size: int,
    model_size: str,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    val_fraction: float,
    min_train_images: int,
    min_val_images: int,
    min_image_size: int,
    require_masks: bool,
    cache_prefix: str,
    threshold_mode: str,
    target_false_alarm_rate: float,
    anomalies_subdir: str,
    level_weights: str,
    min_image_auroc: float,
    min_pixel_auroc: float,
    min_aupro: float,
    min_planted_image_auroc: float,
    min_planted_aupro: float,
    deploy_target: str,
    serving_namespace: str,
    canary_traffic_percent: int,
    warm_start: bool,
    promotion_tolerance: float,
    gpu_tolerations: list,
):
    validation = steps.validate_data(
        dataset=dataset,
        category=category,
        data_format=data_format,
        min_train=min_train_images,
        min_val=min_val_images,
        val_fraction=val_fraction,
        min_size=min_image_size,
        require_masks=require_masks,
    )
    with_cluster_settings(validation).set_caching_options(False)
    with dsl.If(validation.outputs["Output"] == False, name="data-invalid"):  # noqa: E712
        with_cluster_settings(steps.fail_validation(data_docs=validation.outputs["data_docs"]))
    with dsl.If(validation.outputs["Output"] == True, name="data-valid"):  # noqa: E712
        features = steps.cache_features(
            dataset=dataset,
            category=category,
            data_format=data_format,
            backbone=backbone,
            image_size=image_size,
            cache_prefix=cache_prefix,
        )
        with_cluster_settings(features).set_caching_options(False)
        train = steps.train_fod(
            dataset=dataset,
            category=category,
            data_format=data_format,
            data_version=data_version,
            code_version=code_version,
            backbone=backbone,
            image_size=image_size,
            model_size=model_size,
            epochs=epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
            val_fraction=val_fraction,
            cache_prefix=cache_prefix,
            warm_start=warm_start,
        ).after(features)
        with_cluster_settings(train).set_caching_options(True)
        train.set_cpu_request("2").set_memory_request("8G").set_memory_limit("24G")
        # A GPU on a cluster, tolerating the taint of GPU nodes (a parameter: clusters name
        # it differently); the local runner ignores both and trains on CPU.
        train.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
        kubernetes.add_toleration_json(train, gpu_tolerations)
        calibration = steps.calibrate_threshold(
            dataset=dataset,
            trained_model=train.outputs["model"],
            category=category,
            data_format=data_format,
            mode=threshold_mode,
            target_false_alarm_rate=target_false_alarm_rate,
            anomalies_subdir=anomalies_subdir,
            level_weights=level_weights,
            run_id=train.outputs["Output"],
        )
        with_cluster_settings(calibration).set_caching_options(True)
        evaluation = steps.evaluate_model(
            dataset=dataset,
            model=calibration.outputs["model"],
            category=category,
            data_format=data_format,
            run_id=train.outputs["Output"],
        )
        with_cluster_settings(evaluation).set_caching_options(True)
        registration = steps.register_model(
            model=calibration.outputs["model"],
            dataset=dataset,
            category=category,
            data_format=data_format,
            run_id=train.outputs["Output"],
            metrics_json=evaluation.outputs["Output"],
            data_version=data_version,
            code_version=code_version,
            min_image_auroc=min_image_auroc,
            min_pixel_auroc=min_pixel_auroc,
            min_aupro=min_aupro,
            min_planted_image_auroc=min_planted_image_auroc,
            min_planted_aupro=min_planted_aupro,
            tolerance=promotion_tolerance,
        )
        # Never cached: it moves aliases in the registry, and a cached run would skip that.
        with_cluster_settings(registration).set_caching_options(False)
        deployment = steps.deploy_model(
            category=category,
            champion_version=registration.outputs["champion_version"],
            target=deploy_target,
            namespace=serving_namespace,
            canary_traffic_percent=canary_traffic_percent,
        )
        # never cached: it checks a live server every time
        with_cluster_settings(deployment).set_caching_options(False)
        kubernetes.use_secret_as_volume(
            deployment,
            secret_name=DEPLOYER_TOKEN_SECRET,
            mount_path=DEPLOYER_TOKEN_DIR,
            optional=True,  # without it the step acts as the pod's account (and says so on 403)
        )


@dsl.pipeline(
    name=PIPELINE_NAME,
    description="Validate, train, calibrate, evaluate and register an FOD model per category.",
)
def training_pipeline(
    dvc_remote: str,
    data_version: str,
    categories: list = ["widget"],  # noqa: B006 - KFP pipeline parameters need literal defaults
    data_format: str = "mvtec",
    code_version: str = "unknown",
    backbone: str = "efficientnet_lite0",
    image_size: int = 256,
    model_size: str = "method",
    epochs: int = 100,
    batch_size: int = 8,
    learning_rate: float = 1e-4,
    val_fraction: float = 0.1,
    min_train_images: int = 10,
    min_val_images: int = 5,
    min_image_size: int = 64,
    require_masks: bool = False,
    cache_prefix: str = "features",
    threshold_mode: str = "auto",
    target_false_alarm_rate: float = 0.01,
    anomalies_subdir: str = "",
    level_weights: str = "equal",
    min_image_auroc: float = 0.9,
    min_pixel_auroc: float = 0.0,
    min_aupro: float = 0.0,
    min_planted_image_auroc: float = 0.5,
    min_planted_aupro: float = 0.0,
    deploy_target: str = "kserve",
    serving_namespace: str = "fod",
    canary_traffic_percent: int = 0,
    warm_start: bool = False,
    promotion_tolerance: float = 0.0,
    gpu_tolerations: list = GPU_TOLERATIONS,
):
    data = steps.fetch_data(dvc_remote=dvc_remote, data_version=data_version)
    with_cluster_settings(data).set_caching_options(True)
    with dsl.ParallelFor(categories, parallelism=4) as category:
        category_pipeline(
            dataset=data.outputs["dataset"],
            category=category,
            data_format=data_format,
            data_version=data_version,
            code_version=code_version,
            backbone=backbone,
            image_size=image_size,
            model_size=model_size,
            epochs=epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
            val_fraction=val_fraction,
            min_train_images=min_train_images,
            min_val_images=min_val_images,
            min_image_size=min_image_size,
            require_masks=require_masks,
            cache_prefix=cache_prefix,
            threshold_mode=threshold_mode,
            target_false_alarm_rate=target_false_alarm_rate,
            anomalies_subdir=anomalies_subdir,
            level_weights=level_weights,
            min_image_auroc=min_image_auroc,
            min_pixel_auroc=min_pixel_auroc,
            min_aupro=min_aupro,
            min_planted_image_auroc=min_planted_image_auroc,
            min_planted_aupro=min_planted_aupro,
            deploy_target=deploy_target,
            serving_namespace=serving_namespace,
            canary_traffic_percent=canary_traffic_percent,
            warm_start=warm_start,
            promotion_tolerance=promotion_tolerance,
            gpu_tolerations=gpu_tolerations,
        )


def set_images(path: str | Path, cuda_steps: tuple[str, ...] = CUDA_STEPS) -> Path:
    """Give each step of a compiled pipeline its role's image (``components.settings.images``:
    FOD_IMAGE, FOD_CUDA_IMAGE), so that a user's registry needs no code edit."""
    import yaml

    path = Path(path)
    chosen = images()
    text = path.read_text()
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    documents = list(yaml.safe_load_all(text))
    executors = documents[0]["deploymentSpec"]["executors"]
    for executor, spec in executors.items():
        if "container" in spec:
            cuda = executor.removeprefix("exec-") in cuda_steps
            spec["container"]["image"] = chosen.cuda if cuda else chosen.cpu
    path.write_text(header + yaml.safe_dump_all(documents, sort_keys=False))
    return path


def compile_pipeline(path: str | Path = COMPILED_YAML) -> Path:
    """Write the KFP IR YAML that a cluster runs (kept in the repo, checked by a test)."""
    path = Path(path)
    compiler.Compiler().compile(training_pipeline, str(path))
    return set_images(path)


@dataclass
class LocalRunResult:
    pipeline_root: Path
    registrations: dict[str, dict] = field(default_factory=dict)
    state: str = ""


def run_local(
    arguments: dict,
    pipeline_root: str | Path,
) -> LocalRunResult:
    """Execute the pipeline with the KFP local runner (subprocesses, this Python).

    Components reach the stack through the environment (``StackSettings.export``)."""
    from kfp import local

    pipeline_root = Path(pipeline_root).resolve()
    pipeline_root.mkdir(parents=True, exist_ok=True)
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(pipeline_root),
        raise_on_error=True,
        enable_caching=True,  # same data, code and parameters: reuse the step's outputs
    )
    task = training_pipeline(**arguments)
    result = LocalRunResult(pipeline_root=pipeline_root, state=str(getattr(task, "state", "")))
    return result


class SubmitError(RuntimeError):
    """The KFP endpoint cannot take the pipeline, or the run did not succeed."""


def kfp_call(host: str, call):
    """``call()`` against a KFP endpoint; connection and API errors become a SubmitError."""
    try:
        return call()
    except Exception as error:  # kfp raises urllib3/ApiException types on connection errors
        raise SubmitError(
            f"KFP endpoint {host} is unreachable or refused the client: "
            f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
        ) from error


def kfp_client(host: str):
    """A client of ``host``. Multi-user KFP: runs go to the profile namespace named by
    FOD_KFP_NAMESPACE, and the client authenticates with the projected ServiceAccount token
    at KF_PIPELINES_SA_TOKEN_PATH where the pod has one (infra/retrain)."""
    import os

    import kfp

    namespace = os.environ.get("FOD_KFP_NAMESPACE") or None
    return kfp_call(host, lambda: kfp.Client(host=host, namespace=namespace))


def submit(
    arguments: dict,
    host: str,
    *,
    experiment: str = "fod",
    wait: bool = False,
    timeout: float = RUN_TIMEOUT,
) -> str:
    """Compile and submit the pipeline to a KFP endpoint; optionally wait for success."""
    import tempfile

    client = kfp_client(host)
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(Path(tmp) / "pipeline.yaml")
        run = kfp_call(
            host,
            lambda: client.create_run_from_pipeline_package(
                str(package), arguments=arguments, experiment_name=experiment
            ),
        )
    log.info("submitted run %s to %s", run.run_id, host)
    if wait:
        wait_for_run(host, run.run_id, timeout=timeout, client=client)
    return run.run_id


def wait_for_run(host: str, run_id: str, *, timeout: float = RUN_TIMEOUT, client=None) -> None:
    """Until the KFP run ends; SubmitError unless it succeeded."""
    client = client or kfp_client(host)
    detail = kfp_call(host, lambda: client.wait_for_run_completion(run_id, timeout=timeout))
    state = str(getattr(detail, "state", "")).upper()
    if "SUCCEEDED" not in state:
        raise SubmitError(f"KFP run {run_id} ended in state {state or 'unknown'}")
