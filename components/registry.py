"""Registration and promotion in the MLflow model registry.

Every trained model becomes a new version of ``fod-<category>`` with alias
``challenger``. It becomes ``champion`` only when the gates pass: minimum absolute
metrics, and not worse than the current champion *on the same evaluation data* (the
champion is re-scored on this run's test set when it was evaluated on another data
version).
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from components.tracking import (
    download_fod_model,
    level_weights_tag,
    log_fod_model,
    registered_name,
)

log = logging.getLogger(__name__)

GATED_METRICS = ("image_auroc", "pixel_auroc", "aupro")
CHAMPION = "champion"
CHALLENGER = "challenger"


@dataclass(frozen=True)
class PromotionGates:
    min_image_auroc: float = 0.9
    min_pixel_auroc: float = 0.0
    min_aupro: float = 0.0
    tolerance: float = 0.0  # how much worse than the champion still counts as "not worse"

    def minimums(self) -> dict[str, float]:
        return {
            "image_auroc": self.min_image_auroc,
            "pixel_auroc": self.min_pixel_auroc,
            "aupro": self.min_aupro,
        }


@dataclass
class RegistrationResult:
    name: str
    version: str
    promoted: bool
    reasons: list[str] = field(default_factory=list)
    champion_version: str | None = None  # the champion after this step
    previous_champion: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def check_gates(
    metrics: dict,
    gates: PromotionGates,
    champion_metrics: dict | None,
) -> tuple[bool, list[str]]:
    """(passed, reasons): every reason is one readable line for logs and tags."""
    reasons = []
    for key, minimum in gates.minimums().items():
        value = metrics.get(key)
        if value is None:
            if minimum > 0:
                reasons.append(f"{key} not available (needs labelled test data), minimum {minimum}")
            continue
        if value < minimum:
            reasons.append(f"{key} {value:.4f} below the minimum {minimum:.4f}")
    if champion_metrics is not None:
        for key in GATED_METRICS:
            ours, theirs = metrics.get(key), champion_metrics.get(key)
            if ours is None or theirs is None:
                continue
            if ours < theirs - gates.tolerance:
                reasons.append(f"{key} {ours:.4f} worse than the champion's {theirs:.4f}")
    return not reasons, reasons


def champion_metrics_on(
    client: MlflowClient,
    name: str,
    eval_data_version: str,
    rescore,
) -> tuple[str | None, dict | None]:
    """The current champion's version and its metrics on ``eval_data_version``."""
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None, None
    tags = champion.tags or {}
    if tags.get("eval_data_version") == eval_data_version and "metrics" in tags:
        return champion.version, json.loads(tags["metrics"])
    log.info("re-scoring champion v%s on data %s", champion.version, eval_data_version)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = download_fod_model(f"models:/{name}@{CHAMPION}", tmp)
        return champion.version, rescore(model_dir)


def register_model(
    model_dir: str | Path,
    *,
    run_id: str,
    category: str,
    metrics: dict,
    data_version: str,
    code_version: str,
    gates: PromotionGates | None = None,
    rescore=None,
) -> RegistrationResult:
    """Register a new version (alias challenger); promote it to champion if the gates pass.

    ``rescore(model_dir) -> metrics`` evaluates another model on this run's test data;
    it is called only when the champion's recorded metrics are on other data.
    """
    gates = gates or PromotionGates()
    name = registered_name(category)
    client = MlflowClient()
    previous, champion_metrics = champion_metrics_on(client, name, data_version, rescore)
    if previous is not None and champion_metrics is None:
        raise RuntimeError("the champion must be re-scored but no rescore function was given")
    model_uri = log_fod_model(model_dir, run_id)
    with mlflow.start_run(run_id=run_id):
        mlflow.set_tags({"data_version": data_version, "code_version": code_version})
    version = mlflow.register_model(
        model_uri,
        name,
        tags={
            "data_version": data_version,
            "eval_data_version": data_version,
            "code_version": code_version,
            "metrics": json.dumps({k: metrics.get(k) for k in GATED_METRICS}),
            "run_id": run_id,
            "level_weights": level_weights_tag(model_dir),
        },
    ).version
    client.set_registered_model_alias(name, CHALLENGER, version)
    passed, reasons = check_gates(metrics, gates, champion_metrics)
    client.set_model_version_tag(name, version, "gates", "passed" if passed else "; ".join(reasons))
    if passed:
        client.set_registered_model_alias(name, CHAMPION, version)
        if previous is not None:
            client.set_model_version_tag(name, version, "replaced_champion", previous)
        log.info("%s v%s promoted to champion (was %s)", name, version, previous or "none")
    else:
        log.warning("%s v%s stays challenger: %s", name, version, "; ".join(reasons))
    return RegistrationResult(
        name=name,
        version=str(version),
        promoted=passed,
        reasons=reasons,
        champion_version=str(version) if passed else previous,
        previous_champion=previous,
    )
