"""The FOD training pipeline's DAG: fetch a data version, then per category (in parallel):
validate -> cache features -> train -> calibrate -> evaluate -> register/promote -> deploy.

The same DAG compiles to KFP YAML for a cluster (``fod pipeline compile``), runs on one
machine through the KFP local runner and is submitted to a KFP endpoint
(``pipelines.runner``). Its parameters are ``pipelines.parameters``'s: each step receives
those named like its inputs.
"""

import functools
import inspect
from dataclasses import MISSING, fields
from pathlib import Path

from kfp import compiler, dsl, kubernetes
from kfp.dsl import Dataset, Input

from components import steps
from components.kserve_rollout import DEPLOYER_TOKEN_DIR
from components.settings import (
    CLUSTER_CONFIG_KEYS,
    CLUSTER_CONFIG_MAP,
    CLUSTER_SECRET,
    CLUSTER_SECRET_KEYS,
    gpu_tolerations,
    images,
)
from pipelines.parameters import RUN_INPUTS, PipelineParameters, defaults, step_inputs

PIPELINE_NAME = "fod-training"
COMPILED_YAML = Path(__file__).with_name("fod_training.yaml")
# The steps that run the CUDA image; every other step runs the CPU image.
CUDA_STEPS = ("train-fod",)
# The deploy step talks to the Kubernetes API as fod-deployer (infra/kfp-standalone).
DEPLOYER_TOKEN_SECRET = "fod-deployer-token"
_TYPES = {"str": str, "int": int, "float": float, "bool": bool, "list": list}


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


def _signature(
    leading: dict[str, tuple[type, object]], *, with_defaults: bool
) -> inspect.Signature:
    """``leading`` inputs, then every pipeline parameter (with its default when asked)."""
    empty = inspect.Parameter.empty
    given = defaults()
    items = [(name, kind, default) for name, (kind, default) in leading.items()]
    items += [
        (spec.name, _TYPES[spec.type], given[spec.name] if with_defaults else empty)
        for spec in fields(PipelineParameters)
    ]
    return inspect.Signature(
        [
            inspect.Parameter(
                name,
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                annotation=kind,
                default=empty if default is MISSING else default,
            )
            for name, kind, default in items
        ]
    )


def _with_signature(signature: inspect.Signature):
    """A pipeline function with ``signature`` (KFP reads its inputs from it) whose body gets
    all its arguments as one dict, so the parameter list is written once."""

    def decorate(body):
        @functools.wraps(body)
        def pipeline_func(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            return body(dict(bound.arguments))

        pipeline_func.__signature__ = signature
        del pipeline_func.__wrapped__  # inspect.signature would follow it to ``body``
        return pipeline_func

    return decorate


CATEGORY_INPUTS = {"dataset": (Input[Dataset], MISSING), "category": (str, MISSING)}
CATEGORY_INPUTS["data_version"] = RUN_INPUTS["data_version"]


@dsl.pipeline(name="fod-category", description="One category: validate to registration.")
@_with_signature(_signature(CATEGORY_INPUTS, with_defaults=False))
def category_pipeline(p: dict):
    validation = steps.validate_data(**step_inputs(steps.validate_data, p))
    with_cluster_settings(validation).set_caching_options(False)
    with dsl.If(validation.outputs["Output"] == False, name="data-invalid"):  # noqa: E712
        with_cluster_settings(steps.fail_validation(data_docs=validation.outputs["data_docs"]))
    with dsl.If(validation.outputs["Output"] == True, name="data-valid"):  # noqa: E712
        features = steps.cache_features(**step_inputs(steps.cache_features, p))
        with_cluster_settings(features).set_caching_options(False)
        train = steps.train_fod(**step_inputs(steps.train_fod, p)).after(features)
        with_cluster_settings(train).set_caching_options(True)
        # `fod train` at batch 8 peaked at 3.0-3.3 GB on bottle and screw (--preset hard),
        # every phase measured (BENCHMARKS.md, training memory end to end)
        train.set_cpu_request("2").set_memory_request("4G").set_memory_limit("8G")
        # A GPU on a cluster; its tolerations of GPU nodes' taints are set at compile time
        # (``set_cluster_settings``). The local runner ignores both and trains on CPU.
        train.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
        trained = {"run_id": train.outputs["Output"]}
        calibration = steps.calibrate_threshold(
            **step_inputs(steps.calibrate_threshold, p),
            trained_model=train.outputs["model"],
            **trained,
        )
        with_cluster_settings(calibration).set_caching_options(True)
        calibrated = {"model": calibration.outputs["model"], **trained}
        evaluation = steps.evaluate_model(**step_inputs(steps.evaluate_model, p), **calibrated)
        with_cluster_settings(evaluation).set_caching_options(True)
        # `fod evaluate` peaked at 1.5-1.6 GB on bottle and screw (BENCHMARKS.md)
        evaluation.set_cpu_request("1").set_memory_request("2G").set_memory_limit("4G")
        export = steps.export_model(
            **step_inputs(steps.export_model, p), calibrated_model=calibration.outputs["model"]
        )
        with_cluster_settings(export).set_caching_options(True)
        # bottle at 256x256: 1.9 GB peak RSS for the ONNX export and its check (BENCHMARKS.md)
        export.set_cpu_request("2").set_memory_request("4G").set_memory_limit("12G")
        registration = steps.register_model(
            **step_inputs(steps.register_model, p),
            **trained,
            model=export.outputs["model"],
            metrics_json=evaluation.outputs["Output"],
        )
        # Never cached: it moves aliases in the registry, and a cached run would skip that.
        with_cluster_settings(registration).set_caching_options(False)
        deployment = steps.deploy_model(
            **step_inputs(steps.deploy_model, p),
            champion_version=registration.outputs["champion_version"],
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
@_with_signature(_signature(RUN_INPUTS, with_defaults=True))
def training_pipeline(p: dict):
    data = steps.fetch_data(**step_inputs(steps.fetch_data, p))
    with_cluster_settings(data).set_caching_options(True)
    with dsl.ParallelFor(p["categories"], parallelism=4) as category:
        per_category = p | {"dataset": data.outputs["dataset"], "category": category}
        category_pipeline(**step_inputs(category_pipeline, per_category))


def set_cluster_settings(path: str | Path, cuda_steps: tuple[str, ...] = CUDA_STEPS) -> Path:
    """Give a compiled pipeline what differs per cluster, read now from the environment
    (``components.settings``), so that no code edit is needed: each step its role's image
    (FOD_IMAGE, FOD_CUDA_IMAGE), the CUDA steps their tolerations (FOD_GPU_TOLERATIONS).

    Tolerations are written as kfp-kubernetes' ``add_toleration`` writes them: plain
    fields, which the driver of every KFP backend from 2.2 applies. A pipeline parameter
    would compile to ``tolerationJson``, read only from backend 2.5.0 on."""
    import yaml

    path = Path(path)
    chosen, tolerations = images(), gpu_tolerations()
    text = path.read_text()
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    documents = list(yaml.safe_load_all(text))
    executors = documents[0]["deploymentSpec"]["executors"]
    for executor, spec in executors.items():
        if "container" in spec:
            cuda = executor.removeprefix("exec-") in cuda_steps
            spec["container"]["image"] = chosen.cuda if cuda else chosen.cpu
            if cuda and tolerations:
                platform = documents[1]["platforms"]["kubernetes"]["deploymentSpec"]
                platform["executors"].setdefault(executor, {})["tolerations"] = [
                    {k: str(v) if k == "tolerationSeconds" else v for k, v in t.items()}
                    for t in tolerations
                ]
    for platform in documents[1:]:
        for config in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values():
            readable_by_old_backends(config)
    path.write_text(header + yaml.safe_dump_all(documents, sort_keys=False))
    return path


def readable_by_old_backends(config: dict) -> dict:
    """A step's Kubernetes config as KFP backends 2.2.0 to 2.4.0 can read it: their driver
    parses it strictly and fails the step on any field its proto lacks. kfp-kubernetes
    2.17 also writes each ConfigMap and Secret name as a parameter (read from backend 2.5.0
    on, else the constant name beside it) and ``optional: false`` on env sources (read from
    2.15.0; false is the default): both mean what their absence means, so they go."""
    for key in ("configMapAsEnv", "secretAsEnv", "secretAsVolume", "configMapAsVolume"):
        for source in config.get(key, []):
            name = source.pop("configMapNameParameter", None) or source.pop(
                "secretNameParameter", None
            )
            constant = (name or {}).get("runtimeValue", {}).get("constant")
            if constant is not None and constant != (
                source.get("configMapName") or source.get("secretName")
            ):
                raise ValueError(f"{key}: a name parameter that is not the constant name")
            if key.endswith("AsEnv") and source.get("optional") is False:
                del source["optional"]
    return config


def compile_pipeline(path: str | Path = COMPILED_YAML) -> Path:
    """Write the KFP IR YAML that a cluster runs (kept in the repo, checked by a test)."""
    path = Path(path)
    compiler.Compiler().compile(training_pipeline, str(path))
    return set_cluster_settings(path)
