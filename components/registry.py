"""Registration and promotion in the MLflow model registry.

Every trained model becomes a new version of ``fod-<category>`` with alias
``challenger``. It becomes ``champion`` only when the gates pass, on the evidence the
data has:
- labelled defects in the test set: minimum image/pixel metrics (pixel ones need masks);
- no labelled defect (a product with good images only): anomalies planted into the
  held-out normals with a fixed seed (the same set for the challenger and the champion);
- always: the false alarms on held-out normals are not significantly more than a model
  calibrated as promised makes (beta-binomial given the threshold's rank among its
  calibration normals: a perfectly calibrated model is refused at most
  ``false_alarm_alpha`` of the time).
And it must not be worse than the current champion on the same evidence *and the same
data* (the champion is re-scored on this run's test set when it was evaluated on another
data version, and with this version's planting when it was planted another way). Splits
never move an image (`fod_core.data`), so the test set holds no image that either model
trained, chose or calibrated on. The decision records which evidence it rests on.
- its exported scoring graphs (ONNX, OpenVINO), when the run exported any, agree with
  PyTorch (the parity check of ``fod_core.export``); the check's result is a tag.
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
from fod_core.artifact import read_manifest
from fod_core.export import export_failures

log = logging.getLogger(__name__)

LABELLED_METRICS = ("image_auroc", "pixel_auroc", "aupro")
PLANTED_METRICS = ("planted_image_auroc", "planted_aupro")
GATED_METRICS = LABELLED_METRICS + PLANTED_METRICS
RECORDED_METRICS = (
    *GATED_METRICS,
    "false_alarm_rate",
    "false_alarms",
    "n_normal",
    "promised_false_alarm_rate",
    "false_alarm_p_value",
    "n_anomalous",
    "evidence",
    "planting",
    "catch_rate",
    "defects_caught",
    "planted_detected",
)
CHAMPION = "champion"
CHALLENGER = "challenger"


def champion_version(client: MlflowClient, name: str) -> str | None:
    """The version the champion alias points at, or None when there is none (yet)."""
    try:
        return client.get_model_version_by_alias(name, CHAMPION).version
    except MlflowException:
        return None


def champion_uri(name: str) -> str:
    """The MLflow URI that follows a registered model's champion alias."""
    return f"models:/{name}@{CHAMPION}"


@dataclass(frozen=True)
class PromotionGates:
    min_image_auroc: float = 0.9
    min_pixel_auroc: float = 0.0
    min_aupro: float = 0.0
    min_planted_image_auroc: float = 0.5  # better than chance: small held-out sets are noisy
    min_planted_aupro: float = 0.0
    # refuse when the held-out false alarms are this unlikely under the promised rate
    false_alarm_alpha: float = 0.05
    tolerance: float = 0.0  # how much worse than the champion still counts as "not worse"
    # share of defects caught at the model's own threshold (labelled, else planted); 0: off
    min_catch_rate: float = 0.0

    def minimums(self, evidence: str) -> dict[str, float]:
        if evidence == "planted":
            return {
                "planted_image_auroc": self.min_planted_image_auroc,
                "planted_aupro": self.min_planted_aupro,
            }
        return {
            "image_auroc": self.min_image_auroc,
            "pixel_auroc": self.min_pixel_auroc,
            "aupro": self.min_aupro,
        }


def evidence_of(metrics: dict) -> str:
    """'labelled' when the test set has labelled defects, else 'planted'."""
    if metrics.get("evidence") in ("labelled", "planted"):
        return metrics["evidence"]
    return "labelled" if metrics.get("n_anomalous") or metrics.get("image_auroc") else "planted"


def describe_evidence(metrics: dict) -> str:
    """One line for tags and logs: what the decision rests on."""
    splits = metrics.get("splits") or {}
    n_normal = metrics.get("n_normal", splits.get("test_normal"))
    if evidence_of(metrics) == "labelled":
        masks = splits.get("test_masks")
        mask_note = "" if masks is None else f", {masks} with masks"
        main = (
            f"labelled test defects: {metrics.get('n_anomalous')} anomalous{mask_note} and "
            f"{n_normal} normal test images"
        )
    else:
        main = (
            f"no labelled defects: {metrics.get('n_planted')} anomalies planted into "
            f"{n_normal} held-out normals (seed {metrics.get('planted_seed')})"
        )
    if metrics.get("catch_rate") is not None:
        main += (
            f"; caught {metrics.get('defects_caught')}/{metrics.get('n_anomalous')} "
            "labelled defects at the threshold"
        )
    elif metrics.get("planted_detected") is not None:
        main += f"; caught {metrics['planted_detected']:.0%} of the planted at the threshold"
    if metrics.get("false_alarm_rate") is not None:
        promised = metrics.get("promised_false_alarm_rate")
        promise = "" if promised is None else f" (promised at most {promised:.4g})"
        main += (
            f"; false alarms {metrics.get('false_alarms')}/{n_normal} on held-out normals{promise}"
        )
    return main


@dataclass
class RegistrationResult:
    name: str
    version: str
    promoted: bool
    reasons: list[str] = field(default_factory=list)
    champion_version: str | None = None  # the champion after this step
    previous_champion: str | None = None
    evidence: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def check_gates(
    metrics: dict,
    gates: PromotionGates,
    champion_metrics: dict | None,
) -> tuple[bool, list[str]]:
    """(passed, reasons): every reason is one readable line for logs and tags."""
    reasons = []
    evidence = evidence_of(metrics)
    for key, minimum in gates.minimums(evidence).items():
        value = metrics.get(key)
        if value is None:
            if minimum > 0:
                need = "masks" if key in ("pixel_auroc", "aupro") else "labelled test data"
                if evidence == "planted":
                    need = "held-out normal images"
                reasons.append(f"{key} not available (needs {need}), minimum {minimum}")
            continue
        if value < minimum:
            reasons.append(f"{key} {value:.4f} below the minimum {minimum:.4f}")
    catch_key = "catch_rate" if evidence == "labelled" else "planted_detected"
    catch = metrics.get(catch_key)
    if gates.min_catch_rate > 0:
        if catch is None:
            reasons.append(f"{catch_key} not available (needs a threshold), minimum "
                           f"{gates.min_catch_rate}")  # fmt: skip
        elif catch < gates.min_catch_rate:
            reasons.append(
                f"{catch_key} {catch:.4f} below the minimum {gates.min_catch_rate:.4f} (defects "
                "caught at the model's own threshold)"
            )
    p_value = metrics.get("false_alarm_p_value")
    if p_value is not None and p_value < gates.false_alarm_alpha:
        reasons.append(
            f"{metrics.get('false_alarms')} false alarms in {metrics.get('n_normal')} held-out "
            f"normals break the promised rate {metrics.get('promised_false_alarm_rate'):.4g} "
            f"(p {p_value:.3g} < {gates.false_alarm_alpha} for a model calibrated as promised)"
        )
    if champion_metrics is not None:
        compared = LABELLED_METRICS if evidence == "labelled" else PLANTED_METRICS
        ours_planting = metrics.get("planting", "anywhere")
        if evidence != "labelled" and champion_metrics.get("planting", "anywhere") != ours_planting:
            # another test: the champion must be re-scored this version's way (never skipped)
            raise ValueError(
                f"the champion's planted metrics come from {champion_metrics.get('planting')} "
                f"planting, this version's from {ours_planting}: re-score the champion with "
                "this version's planting before comparing"
            )
        ours_rate = metrics.get("promised_false_alarm_rate")
        theirs_rate = champion_metrics.get("promised_false_alarm_rate")
        if ours_rate is not None and theirs_rate is not None and ours_rate <= theirs_rate:
            # at an equal or lower promised rate, fewer defects caught is worse for the line
            compared = (*compared, catch_key)
        for key in compared:
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
    planting: str | None = None,
) -> tuple[str | None, dict | None]:
    """The current champion's version and its metrics on ``eval_data_version``, with
    anomalies planted the ``planting`` way (re-scored when it was evaluated otherwise;
    None: planted metrics are not compared, labelled test defects are)."""
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None, None
    tags = champion.tags or {}
    recorded = json.loads(tags["metrics"]) if "metrics" in tags else None
    same_data = tags.get("eval_data_version") == eval_data_version
    same_planting = planting is None or (recorded and recorded.get("planting") == planting)
    if recorded is not None and same_data and same_planting:
        return champion.version, recorded
    if rescore is None:
        return champion.version, None
    log.info(
        "re-scoring champion v%s on data %s, anomalies planted %s",
        champion.version,
        eval_data_version,
        planting,
    )
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = download_fod_model(f"models:/{name}@{CHAMPION}", tmp)
        return champion.version, rescore(model_dir, planting)


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

    ``rescore(model_dir, planting) -> metrics`` evaluates another model on this run's test
    data; it is called only when the champion's recorded metrics are on other data or
    from anomalies planted another way.
    """
    gates = gates or PromotionGates()
    name = registered_name(category)
    client = MlflowClient()
    if kept := registered_already(client, name, run_id):
        return kept
    # planted evidence is compared on one planted set: the champion planted this way
    planting = metrics.get("planting", "anywhere") if evidence_of(metrics) == "planted" else None
    previous, champion_metrics = champion_metrics_on(client, name, data_version, rescore, planting)
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
            "metrics": json.dumps({k: metrics.get(k) for k in RECORDED_METRICS}),
            "run_id": run_id,
            "level_weights": level_weights_tag(model_dir),
            "splits": json.dumps(metrics.get("splits") or {}),
            "threshold": threshold_tag(model_dir),
        },
    ).version
    client.set_registered_model_alias(name, CHALLENGER, version)
    passed, reasons = check_gates(metrics, gates, champion_metrics)
    exports = read_manifest(model_dir).get("export", {})
    if exports:  # what the version's files hold, and whether each export matched PyTorch
        client.set_model_version_tag(name, version, "export", export_tag(exports))
    bf16 = read_manifest(model_dir).get("precision_check", {}).get("bf16")
    if bf16:  # a tag, not a gate: without a passed check the version serves in fp32
        client.set_model_version_tag(name, version, "bf16_check", precision_tag(bf16))
    reasons += export_failures(model_dir)  # failed, stale, or files changed since the check
    passed = passed and not reasons
    evidence = describe_evidence(metrics)
    client.set_model_version_tag(name, version, "evidence", evidence)
    client.set_model_version_tag(name, version, "gates", "passed" if passed else "; ".join(reasons))
    if passed:
        client.set_registered_model_alias(name, CHAMPION, version)
        if previous is not None:
            client.set_model_version_tag(name, version, "replaced_champion", previous)
        log.info("%s v%s promoted to champion (was %s)", name, version, previous or "none")
    else:
        log.warning("%s v%s stays challenger: %s", name, version, "; ".join(reasons))
    log.info("%s v%s: decision rests on %s", name, version, evidence)
    return RegistrationResult(
        name=name,
        version=str(version),
        promoted=passed,
        reasons=reasons,
        champion_version=str(version) if passed else previous,
        previous_champion=previous,
        evidence=evidence,
    )


def registered_already(client: MlflowClient, name: str, run_id: str) -> RegistrationResult | None:
    """The version this training run was registered as, when a rerun whose steps were all
    cached reaches registration again: the same model gets no second version."""
    versions = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    if not versions:
        return None
    version = max(versions, key=lambda v: int(v.version))
    champion = champion_version(client, name)
    reason = f"this training run is {name} v{version.version} already: nothing new to register"
    log.info("%s (run %s)", reason, run_id)
    return RegistrationResult(
        name=name,
        version=str(version.version),
        promoted=False,
        reasons=[reason],
        champion_version=champion,
        previous_champion=champion,
        evidence=(version.tags or {}).get("evidence", ""),
    )


def export_tag(exports: dict) -> str:
    """e.g. 'onnx: parity passed (scores 2.8e-06, maps 2.5e-06); openvino: ...'."""
    parts = []
    for name, record in sorted(exports.items()):
        parity = record.get("parity", {})
        if parity.get("passed"):
            parts.append(
                f"{name}: parity passed (scores {parity['max_score_rel_error']:.1e}, "
                f"maps {parity['max_map_error']:.1e}, {parity['n_images']} images)"
            )
        else:
            parts.append(f"{name}: FAILED ({parity.get('failure')})")
    return "; ".join(parts)


def precision_tag(check: dict) -> str:
    """e.g. 'passed (accuracy moves by 0.0004 at most, limit 0.002; 42 images)'."""
    if not check.get("passed"):
        return f"FAILED ({check.get('failure')}): serves in fp32"
    return (
        f"passed (accuracy moves by {check['max_metric_delta']:.4f} at most, limit "
        f"{check['tolerance']}; {check['n_images']} images)"
    )


def threshold_tag(model_dir: str | Path) -> str:
    """The calibrated threshold and what it promises, as a tag value."""
    from fod_core.artifact import read_manifest
    from fod_core.calibration import Threshold, ThresholdMode

    calibration = read_manifest(model_dir).get("calibration", {})
    if "threshold" not in calibration:
        return "not calibrated"
    threshold = Threshold.from_dict(calibration)
    if threshold.mode is ThresholdMode.FALSE_ALARM_RATE and threshold.rank is None:
        return f"{threshold.value:.6g} (quantile of {threshold.n_normal} validation normals)"
    return f"{threshold.value:.6g}: {threshold.describe()}"
