"""FOD training as a pipeline step: S3 feature cache, MLflow run with params, per-epoch
losses, curves and the artefact's manifest."""

from __future__ import annotations

import functools
import json
import logging
import shutil
import tempfile
from pathlib import Path

from components.kept import KeptModels, training_key
from components.settings import StackSettings
from components.storage import S3Store
from fod_core.artifact import MANIFEST, read_manifest
from fod_core.config import ModelConfig, TrainConfig

log = logging.getLogger(__name__)
# the phases' seconds train_model records in the manifest, logged as the run's metrics
TIMINGS = ("recipe_s", "features_s", "reference_k_s", "train_s", "level_weights_s")


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
    kept: KeptModels | None = None,
    auto_recipe: bool = False,
    target_false_alarm_rate: float = 0.01,
) -> tuple[str, dict[str, float]]:
    """Train one category into ``out_dir``, then track it in a new MLflow run; returns (run
    id, summary). The trained model is kept (``components.kept``) until the run holds it:
    when the upload fails, the next call with the same inputs tracks the kept model instead
    of training again, and says so."""
    from components.kfp_io import SUMMARY_MARKER
    from components.tracking import connect
    from fod_core.train import train_model
    from fod_core.trainer import CheckpointMismatchError

    store = S3Store(settings, cache_prefix)
    store.check()
    kept = kept or KeptModels(store=store)
    key = training_key(
        {
            "category": category,
            "data_format": data_format,
            "data_version": data_version,
            "code_version": code_version,
            "model": model_config.to_dict(),
            "train": train_config.to_dict(),
            "warm_start_from": warm_start_from,
            **({"auto_recipe": True} if auto_recipe else {}),
            # an auto validation fraction is sized for it
            **({"target": target_false_alarm_rate} if train_config.val_fraction is None else {}),
        }
    )
    out_dir = Path(out_dir)
    connect(settings.mlflow_uri, category)
    reused = kept.restore(key, out_dir)
    if reused:
        note = (
            f"reused the model trained before a failed upload (kept {reused['kept_at']} at "
            f"{reused['from']}): not trained again"
        )
        log.warning(note)
        print(SUMMARY_MARKER + note, flush=True)
    else:
        with tempfile.TemporaryDirectory(prefix="fod-warm-start-") as tmp:
            init_dir = _warm_start_dir(warm_start_from, Path(tmp))
            train = functools.partial(
                train_model,
                data_root,
                category,
                out_dir,
                format=data_format,
                model_config=model_config,
                train_config=train_config,
                cache_store=store,
                progress=progress,
                metadata={
                    "data_version": data_version,
                    "code_version": code_version,
                    "warm_start_from": warm_start_from if init_dir else None,
                },
                init_from=init_dir,
                auto_recipe=auto_recipe,
                target_false_alarm_rate=target_false_alarm_rate,
                calibrate=False,  # the pipeline's calibrate_threshold step does it, once
                checkpoint_dir=kept.checkpoints(key),  # a killed step resumes its epochs
                keep_checkpoints=True,
            )
            try:
                train(resume=True)
            except CheckpointMismatchError as error:  # damaged: never used
                log.warning("%s: training from the first epoch", error)
                shutil.rmtree(kept.checkpoints(key), ignore_errors=True)
                train(resume=False)
        kept.keep(key, out_dir)
    run_id, summary = _track(
        out_dir,
        category,
        model_config=model_config,
        train_config=train_config,
        data_format=data_format,
        data_version=data_version,
        code_version=code_version,
        reused=reused,
    )
    kept.discard(key)  # the run holds it now
    return run_id, summary


def _track(
    out_dir: Path,
    category: str,
    *,
    model_config: ModelConfig,
    train_config: TrainConfig,
    data_format: str,
    data_version: str,
    code_version: str,
    reused: dict | None,
) -> tuple[str, dict[str, float]]:
    """One MLflow run for a trained artefact: params, per-epoch losses, the summary, the
    manifest and curves, all read from the artefact (so a kept model tracks the same)."""
    import mlflow

    manifest = read_manifest(out_dir)
    training = manifest["training"]
    with mlflow.start_run(run_name=f"{category}-{data_version[:8]}") as run:
        mlflow.set_tags(
            {
                "category": category,
                "data_version": data_version,
                "code_version": code_version,
                "stage": "training",
            }
        )
        if manifest.get("warm_start_from"):
            mlflow.set_tag("warm_start_from", manifest["warm_start_from"])
        if manifest.get("warm_start_skipped"):  # the recipe chose another alignment
            mlflow.set_tag("warm_start_skipped", manifest["warm_start_skipped"][:5000])
        if reused:
            mlflow.set_tag("kept_model", f"trained {reused['kept_at']}, reused: an upload failed")
        # what was trained, from the artefact: the recipe's choices (auto_recipe) and the
        # epochs of a budget (epochs 0) are resolved there, not in the configs asked for
        mlflow.log_params(
            _flatten("model", manifest.get("model") or model_config.to_dict())
            | _flatten("train", training.get("config") or train_config.to_dict())
            | {"data.format": data_format, "data.version": data_version}
        )
        for record in training["history"]:
            values = {k.replace("/", "."): v for k, v in record["train"].items()}
            if record.get("val_loss") is not None:
                values["val_reconstruction"] = record["val_loss"]
            values["epoch_seconds"] = record["seconds"]
            mlflow.log_metrics(values, step=record["epoch"])
        cache = manifest.get("feature_cache", {})
        summary = {
            "best_epoch": float(training["best_epoch"]),
            "cache_hits": float(sum(part.get("hits", 0) for part in cache.values())),
            "cache_misses": float(sum(part.get("misses", 0) for part in cache.values())),
            **{k: round(v, 3) for k, v in training.items() if k in TIMINGS},
            "reused_kept_model": float(bool(reused)),
        }
        if training.get("best_val_loss") is not None:
            summary["best_val_reconstruction"] = training["best_val_loss"]
        splits = manifest.get("data", {}).get("splits") or {}
        summary |= {f"split_{k}": float(v) for k, v in splits.items()}
        chosen_k = manifest.get("recipe", {}).get("reference_k")
        if chosen_k:  # the recipe setting chosen at training time, with its evidence
            summary["reference_k"] = float(chosen_k["k"])
            mlflow.set_tag("recipe.reference_k", json.dumps(chosen_k)[:5000])
        auto = manifest.get("recipe", {}).get("auto")
        if auto:  # what --preset auto chose, with its label-free evidence
            from fod_core.evaluate import recipe_summary

            chosen = recipe_summary(auto)
            mlflow.set_tag("recipe.auto", json.dumps(chosen)[:5000])
            for key in ("planted_image_auroc", "planted_caught_above_normals"):
                if chosen.get(key) is not None:
                    summary[f"recipe_{key}"] = float(chosen[key])
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
