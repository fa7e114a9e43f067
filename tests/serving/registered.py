"""Registering a trained test model in the real MLflow, for the deployment tests."""

from __future__ import annotations

from pathlib import Path


def register_version(settings, model: Path, category: str) -> str:
    """Register ``model`` as a new version of ``fod-<category>`` (it passes the gates)."""
    import mlflow

    from components.registry import PromotionGates, register_model
    from components.tracking import connect

    connect(settings.mlflow_uri, category)
    with mlflow.start_run() as run:
        pass
    return register_model(
        model,
        run_id=run.info.run_id,
        category=category,
        metrics={"image_auroc": 1.0},
        data_version="d",
        code_version="c",
        gates=PromotionGates(min_image_auroc=0.0),
    ).version
