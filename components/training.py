"""FOD training as a pipeline step: S3 feature cache, MLflow run with params, per-epoch
losses, curves and the artefact's manifest."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from components.settings import StackSettings
from components.storage import S3Store
from fod_core.artifact import MANIFEST
from fod_core.config import ModelConfig, TrainConfig

log = logging.getLogger(__name__)


def _flatten(prefix: str, data: dict) -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            flat |= _flatten(name, value)
        else:
            flat[name] = str(value)
    return flat


def train_and_track(
    data_root: str | Path,
    category: str,
    out_dir: str | Path,
    *,
    settings: StackSettings,
    model_config: ModelConfig,
    train_config: TrainConfig,
    data_format: str,
    data_version: str,
    code_version: str,
    cache_prefix: str,
    progress: bool = True,
    warm_start_from: str | None = None,
) -> tuple[str, dict[str, float]]:
    """Train one category into ``out_dir`` inside a new MLflow run; returns (run id, summary)."""
    import mlflow

    from components.tracking import connect
    from fod_core.artifact import read_manifest
    from fod_core.train import train_model

    store = S3Store(settings, cache_prefix)
    store.check()
    connect(settings.mlflow_uri, category)
    with mlflow.start_run(run_name=f"{category}-{data_version[:8]}") as run:
        mlflow.set_tags(
            {
                "category": category,
                "data_version": data_version,
                "code_version": code_version,
                "stage": "training",
            }
        )
        mlflow.log_params(
            _flatten("model", model_config.to_dict())
            | _flatten("train", train_config.to_dict())
            | {"data.format": data_format, "data.version": data_version}
        )
        with tempfile.TemporaryDirectory(prefix="fod-warm-start-") as tmp:
            init_dir = _warm_start_dir(warm_start_from, Path(tmp))
            if init_dir is not None:
                mlflow.set_tag("warm_start_from", warm_start_from)
            outcome = train_model(
                data_root,
                category,
                out_dir,
                format=data_format,
                model_config=model_config,
                train_config=train_config,
                cache_store=store,
                progress=progress,
                metadata={"data_version": data_version, "code_version": code_version},
                init_from=init_dir,
                calibrate=False,  # the pipeline's calibrate_threshold step does it, once
            )
        for record in outcome.result.history:
            values = {k.replace("/", "."): v for k, v in record.train.items()}
            if record.val_loss is not None:
                values["val_reconstruction"] = record.val_loss
            values["epoch_seconds"] = record.seconds
            mlflow.log_metrics(values, step=record.epoch)
        summary = {
            "best_epoch": float(outcome.result.best_epoch),
            "cache_hits": float(outcome.cache["train"].hits + outcome.cache["val"].hits),
            "cache_misses": float(outcome.cache["train"].misses + outcome.cache["val"].misses),
            **{k: round(v, 3) for k, v in outcome.seconds.items()},
        }
        if outcome.result.best_val_loss is not None:
            summary["best_val_reconstruction"] = outcome.result.best_val_loss
        summary |= {f"split_{k}": float(v) for k, v in (outcome.splits or {}).items()}
        out_dir = Path(out_dir)
        chosen_k = read_manifest(out_dir).get("recipe", {}).get("reference_k")
        if chosen_k:  # the recipe setting chosen at training time, with its evidence
            summary["reference_k"] = float(chosen_k["k"])
            mlflow.set_tag("recipe.reference_k", json.dumps(chosen_k)[:5000])
        mlflow.log_metrics(summary)
        mlflow.log_artifact(str(out_dir / MANIFEST), artifact_path="training")
        if (out_dir / "training_curves.png").is_file():
            mlflow.log_artifact(str(out_dir / "training_curves.png"), artifact_path="training")
        return run.info.run_id, summary


def _warm_start_dir(model_uri: str | None, dest: Path) -> Path | None:
    """The artefact to warm-start from (e.g. the champion), or None when there is none yet."""
    if not model_uri:
        return None
    from mlflow.exceptions import MlflowException

    from components.tracking import download_fod_model

    try:
        return download_fod_model(model_uri, dest)
    except MlflowException as error:  # no champion yet: a cold start is the right thing
        log.info("no model at %s to warm-start from (%s): cold start", model_uri, error.message)
        return None
