"""The pipeline's Kubeflow components: typed lightweight components, imports inside the body.

Each one is a thin wrapper over a plain function of ``components``/``fod_core`` and can be
called directly through ``<component>.python_func`` with local artifacts (tests do).
Services are reached through ``components.settings.load_settings()``: environment
variables in a cluster, the embedded stack's state file on a laptop.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from components.settings import DEFAULT_IMAGE

# The image contains this package, so components install nothing at start-up. The image
# of each step is set when the pipeline is compiled (pipelines.dag.set_cluster_settings).
component = dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)


@component
def fetch_data(dvc_remote: str, data_version: str, dataset: Output[Dataset]):
    """Download one DVC data version (the ``.dir`` md5 in data.dvc) from the S3 remote."""
    from components.preflight import preflight
    from components.settings import load_settings
    from components.storage import fetch_dvc_directory

    preflight(load_settings(), s3=True)
    count = fetch_dvc_directory(load_settings(), dvc_remote, data_version, dataset.path)
    # Strings only: numbers come back as floats from KFP's cache, which would change
    # the cache keys of every downstream step between a first and a second run.
    dataset.metadata.update({"data_version": data_version, "files": str(count)})


@component
def validate_data(
    dataset: Input[Dataset],
    category: str,
    data_format: str,
    min_train_images: int,
    min_val_images: int,
    val_fraction: str,
    target_false_alarm_rate: float,
    min_image_size: int,
    require_masks: bool,
    level_weights: str,
    auto_recipe: bool,
    data_docs: Output[Artifact],
    summary: Output[Metrics],
) -> bool:
    """Great Expectations over the image table; the data docs (and ``report.json``) are an
    artifact either way. Returns whether the data passed (a single output: the local runner
    resolves conditions on it). Missing masks are a warning unless ``require_masks``."""
    from components.kfp_io import write_metrics_file
    from components.validation import ValidationRules, parse_val_fraction, validate_images

    report = validate_images(
        dataset.path,
        category,
        data_format,
        rules=ValidationRules(
            min_train=min_train_images,
            min_val=min_val_images,
            val_fraction=parse_val_fraction(val_fraction),  # auto: as training sizes it
            target_false_alarm_rate=target_false_alarm_rate,
            min_size=min_image_size,
            require_masks=require_masks,
            # the choice part that synthetic weights and the recipe are chosen on
            min_choice=int(auto_recipe or level_weights == "synthetic"),
        ),
        docs_dir=data_docs.path,
    )
    summary.log_metric("images", report.rows)
    summary.log_metric("failed_expectations", len(report.failures))
    for key, value in report.counts.items():
        summary.log_metric(key, value)
    write_metrics_file(summary)
    print(report.message())
    return report.success


@component
def fail_validation(data_docs: Input[Artifact]):
    """Stops the run with the validation report's message; nothing downstream runs."""
    from components.validation import ValidationReport

    raise RuntimeError(ValidationReport.load(data_docs.path).message())


@component
def cache_features(
    dataset: Input[Dataset],
    category: str,
    data_format: str,
    backbone: str,
    image_size: int,
    alignment: str,
    auto_recipe: bool,
    cache_prefix: str,
    stats: Output[Metrics],
):
    """Fill the S3-backed feature cache for every image of the category (with
    ``auto_recipe``, seen with every alignment, as the recipe tries them all)."""
    from components.features import fill_cache
    from components.kfp_io import write_metrics_file
    from components.preflight import preflight
    from components.settings import load_settings

    preflight(load_settings(), s3=True)
    result = fill_cache(
        dataset.path,
        category,
        data_format,
        backbone,
        image_size,
        load_settings(),
        cache_prefix,
        alignment="all" if auto_recipe else alignment,
    )
    for key, value in result.items():
        stats.log_metric(key, value)
    write_metrics_file(stats)


@component
def train_fod(
    dataset: Input[Dataset],
    category: str,
    data_format: str,
    data_version: str,
    code_version: str,
    backbone: str,
    image_size: int,
    model_size: str,
    alignment: str,
    reference: str,
    reference_k: int,
    retrieval_window: int,
    retrieval_features: str,
    score_region: str,
    auto_recipe: bool,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    val_fraction: str,
    target_false_alarm_rate: float,
    cache_prefix: str,
    warm_start: bool,
    model: Output[Model],
    training: Output[Metrics],
) -> str:
    """Train on cached features (GPU when the pod has one); returns the MLflow run id."""
    from components.kfp_io import write_metrics_file
    from components.preflight import mlflow_calls, preflight
    from components.registry import champion_uri
    from components.settings import load_settings
    from components.tracking import registered_name
    from components.training import train_and_track
    from components.validation import parse_val_fraction
    from fod_core.config import TrainConfig, model_config_for

    preflight(load_settings(), s3=True, mlflow=True, artifacts=True)  # before the epochs

    model_config = model_config_for(
        model_size,
        image_size=image_size,
        backbone=backbone,
        alignment=alignment,
        reference=reference,
        reference_k=reference_k,
        retrieval_window=retrieval_window,
        retrieval_features=retrieval_features,
        score_region=score_region,
    )
    train_config = TrainConfig(  # val_fraction auto: None; epochs 0: a budget of images
        epochs=epochs,
        batch_size=batch_size,
        lr=learning_rate,
        val_fraction=parse_val_fraction(val_fraction),
    )
    with mlflow_calls(load_settings(), "training"):
        run_id, summary = train_and_track(
            dataset.path,
            category,
            model.path,
            settings=load_settings(),
            model_config=model_config,
            train_config=train_config,
            data_format=data_format,
            data_version=data_version,
            code_version=code_version,
            cache_prefix=cache_prefix,
            warm_start_from=champion_uri(registered_name(category)) if warm_start else None,
            auto_recipe=auto_recipe,
            target_false_alarm_rate=target_false_alarm_rate,  # sizes an auto validation
        )
    model.metadata.update({"framework": "fod", "mlflow_run_id": run_id})
    for key, value in summary.items():
        training.log_metric(key, value)
    write_metrics_file(training)
    return run_id


@component
def calibrate_threshold(
    dataset: Input[Dataset],
    trained_model: Input[Model],
    category: str,
    data_format: str,
    threshold_mode: str,
    target_false_alarm_rate: float,
    anomalies_subdir: str,
    normals_subdir: str,
    level_weights: str,
    planting: str,
    run_id: str,
    model: Output[Model],
) -> float:
    """Threshold from validation normals (false-alarm quantile), or F1-optimal when a
    folder of labelled validation anomalies is given; stored in the artefact. Level weights
    first: 'equal' (the method) or 'synthetic' (chosen on planted validation anomalies).
    ``normals_subdir``: more good parts (under the category) for the threshold alone;
    images the model trained or chose on are refused by content."""
    import shutil
    from pathlib import Path

    from components.preflight import mlflow_calls, preflight
    from components.settings import load_settings
    from components.tracking import log_calibration
    from fod_core.calibration import calibrate_model
    from fod_core.data import images_in_folder_tree

    preflight(load_settings(), mlflow=True)
    shutil.copytree(trained_model.path, model.path, dirs_exist_ok=True)
    from fod_core.artifact import read_manifest

    if read_manifest(model.path).get("recipe", {}).get("auto"):
        planting = None  # the auto recipe chose it: the model's, not the parameter's
    anomalies = []
    if anomalies_subdir:
        folder = Path(dataset.path) / category / anomalies_subdir
        anomalies = images_in_folder_tree(folder)
    normals = []
    if normals_subdir:
        folder = Path(dataset.path) / category / normals_subdir
        normals = images_in_folder_tree(folder)
        if not normals:
            from fod_core.data import DatasetError

            raise DatasetError(
                f"normals_subdir {normals_subdir!r}: no images in {folder} (or its folders)"
            )
    threshold = calibrate_model(
        model.path,
        dataset.path,
        category,
        format=data_format,
        mode=None if threshold_mode == "auto" else threshold_mode,
        target_false_alarm_rate=target_false_alarm_rate,
        anomalous_images=anomalies,
        level_weighting=level_weights,
        planting=planting,
        extra_normals=normals,
    )
    load_settings().export()
    with mlflow_calls(load_settings(), "calibration"):
        log_calibration(run_id, threshold)
    model.metadata.update({k: str(v) for k, v in threshold.to_dict().items()})
    model.metadata["level_weights"] = level_weights
    model.metadata["framework"] = "fod"
    return threshold.value


@component
def export_model(
    dataset: Input[Dataset],
    calibrated_model: Input[Model],
    category: str,
    data_format: str,
    export_formats: str,
    model: Output[Model],
) -> str:
    """Export the scoring graph (ONNX, OpenVINO) into the model and check it against
    PyTorch on validation normals and anomalies planted into them; "bf16" checks PyTorch's
    bf16 scoring against fp32 (for `fod serve --precision auto`). A failed export check
    does not fail the run: registration tags the version with it and does not promote it;
    a failed bf16 check is a tag only (the version serves in fp32)."""
    import json
    import shutil

    from fod_core.export import export_model
    from fod_core.precision_check import check_precision

    shutil.copytree(calibrated_model.path, model.path, dirs_exist_ok=True)
    formats = [f.strip() for f in export_formats.split(",") if f.strip()]
    graphs = [f for f in formats if f != "bf16"]
    data = dict(data_root=dataset.path, category=category, format=data_format)
    records = export_model(model.path, graphs, **data) if graphs else {}
    parity = {name: record["parity"] for name, record in records.items()}
    if "bf16" in formats:
        parity["bf16"] = check_precision(model.path, **data).to_dict()
    model.metadata.update({"framework": "fod", "exports": ",".join(parity)})
    for name, report in parity.items():
        model.metadata[f"{name}_parity"] = "passed" if report["passed"] else report["failure"]
    return json.dumps(parity)


@component
def evaluate_model(
    dataset: Input[Dataset],
    model: Input[Model],
    category: str,
    data_format: str,
    run_id: str,
    metrics: Output[Metrics],
    report: Output[HTML],
    evaluation: Output[Artifact],
) -> str:
    """Test metrics at the calibrated threshold, plots and overlays, logged to MLflow.
    Returns the metrics as JSON for the registration step."""
    import json

    from components.evaluation import evaluate_and_track
    from components.kfp_io import write_metrics_file
    from components.preflight import mlflow_calls, preflight
    from components.settings import load_settings

    preflight(load_settings(), mlflow=True, artifacts=True)
    with mlflow_calls(load_settings(), "evaluation"):
        result = evaluate_and_track(
            model.path,
            dataset.path,
            category,
            evaluation.path,
            settings=load_settings(),
            data_format=data_format,
            run_id=run_id,
            html_report=report.path,
        )
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max"):
        if result.get(key) is not None:
            metrics.log_metric(key, result[key])
    write_metrics_file(metrics)
    return json.dumps(result)


@component
def register_model(
    model: Input[Model],
    dataset: Input[Dataset],
    category: str,
    data_format: str,
    run_id: str,
    metrics_json: str,
    data_version: str,
    code_version: str,
    min_image_auroc: float,
    min_pixel_auroc: float,
    min_aupro: float,
    min_planted_image_auroc: float,
    min_planted_aupro: float,
    promotion_tolerance: float,
    min_catch_rate: float,
) -> NamedTuple(
    "RegistrationOutputs", version=str, promoted=bool, champion_version=str, evidence=str
):
    """New registry version (alias challenger); champion only when the gates pass, on
    labelled defects where the test set has them, else on planted anomalies."""
    import json
    from typing import NamedTuple

    from components.evaluation import rescore_on
    from components.kfp_io import print_summary
    from components.preflight import mlflow_calls, preflight
    from components.registry import PromotionGates, register_model
    from components.settings import load_settings
    from components.tracking import connect

    preflight(load_settings(), mlflow=True, artifacts=True)
    connect(load_settings().mlflow_uri, category)
    with mlflow_calls(load_settings(), "registration"):
        result = register_model(
            model.path,
            run_id=run_id,
            category=category,
            metrics=json.loads(metrics_json),
            data_version=data_version,
            code_version=code_version,
            gates=PromotionGates(
                min_image_auroc=min_image_auroc,
                min_pixel_auroc=min_pixel_auroc,
                min_aupro=min_aupro,
                min_planted_image_auroc=min_planted_image_auroc,
                min_planted_aupro=min_planted_aupro,
                tolerance=promotion_tolerance,
                min_catch_rate=min_catch_rate,
            ),
            rescore=rescore_on(dataset.path, category, data_format),
        )
    print_summary(result.to_dict())
    outputs = NamedTuple(
        "RegistrationOutputs", version=str, promoted=bool, champion_version=str, evidence=str
    )
    return outputs(result.version, result.promoted, result.champion_version or "", result.evidence)


@component
def deploy_model(
    category: str,
    champion_version: str,
    deploy_target: str,
    serving_namespace: str,
    canary_traffic_percent: int,
) -> str:
    """Serve the champion: locally a KServe model server on loopback (it follows the alias),
    on a cluster an InferenceService (``deploy_target``: local, kserve or none)."""
    import json

    from components.deploy import DeployTarget, deploy_champion
    from components.kfp_io import print_summary
    from components.preflight import mlflow_calls, preflight
    from components.settings import load_settings
    from components.tracking import registered_name

    settings = load_settings()
    preflight(settings, mlflow=True)
    settings.export()
    if not champion_version:
        print(f"{registered_name(category)} has no champion yet: nothing to deploy")
        return json.dumps({"target": deploy_target, "deployed": False})
    with mlflow_calls(load_settings(), "deployment"):
        result = deploy_champion(
            registered_name(category),
            champion_version,
            DeployTarget(deploy_target),
            namespace=serving_namespace,
            canary_traffic_percent=canary_traffic_percent or None,
            env=settings.env(),
        )
    print_summary(result)
    return json.dumps(result)
