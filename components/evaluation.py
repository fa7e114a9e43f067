"""Evaluation as a pipeline step: test metrics at the calibrated threshold, plots and
heatmap overlays, logged to the training run in MLflow, and an HTML summary."""

from __future__ import annotations

import base64
import html
import json
import logging
from pathlib import Path

from components.settings import StackSettings

log = logging.getLogger(__name__)

HEADLINE = (
    "image_auroc",
    "pixel_auroc",
    "aupro",
    "f1_max",
    "catch_rate",
    "planted_detected",
    "false_alarm_rate",
    "promised_false_alarm_rate",
    "planted_image_auroc",
    "planted_aupro",
)


def evaluate_and_track(
    model_dir: str | Path,
    data_root: str | Path,
    category: str,
    out_dir: str | Path,
    *,
    settings: StackSettings | None,
    data_format: str = "mvtec",
    run_id: str | None = None,
    html_report: str | Path | None = None,
    max_overlays: int | None = 48,
    progress: bool = True,
) -> dict:
    """Evaluate on the test split; log metrics and plots into ``run_id`` when given."""
    from fod_core.evaluate import evaluate_model

    metrics = evaluate_model(
        model_dir,
        data_root,
        category,
        out_dir,
        format=data_format,
        max_overlays=max_overlays,
        progress=progress,
    )
    out_dir = Path(out_dir)
    if html_report:
        write_html_report(metrics, out_dir, Path(html_report), category)
    if run_id and settings is not None:
        import mlflow

        from components.tracking import connect

        connect(settings.mlflow_uri, category)
        with mlflow.start_run(run_id=run_id):
            values = {f"test_{k}": metrics[k] for k in HEADLINE if metrics.get(k) is not None}
            confusion = metrics.get("confusion") or {}
            values |= {f"test_{k}": float(v) for k, v in confusion.items()}
            values |= {f"split_{k}": float(v) for k, v in (metrics.get("splits") or {}).items()}
            mlflow.log_metrics(values)
            mlflow.set_tag("evidence", metrics.get("evidence", ""))
            mlflow.log_dict(metrics, "evaluation/metrics.json")
            for name in (
                "roc.png",
                "score_histogram.png",
                "planted_histogram.png",
                "predictions.csv",
            ):
                if (out_dir / name).is_file():
                    mlflow.log_artifact(str(out_dir / name), artifact_path="evaluation")
            if (out_dir / "overlays").is_dir():
                mlflow.log_artifacts(str(out_dir / "overlays"), artifact_path="evaluation/overlays")
            _log_level_weights(Path(model_dir))
    return metrics


def _log_level_weights(model_dir: Path) -> None:
    """How the levels were combined, as a tag (a cached training run may be re-calibrated
    with another choice, which a param would refuse) and its plot."""
    import mlflow

    from components.tracking import level_weights_tag

    mlflow.set_tag("level_weights", level_weights_tag(model_dir))
    if (model_dir / "level_weights.png").is_file():
        mlflow.log_artifact(str(model_dir / "level_weights.png"), artifact_path="calibration")


def rescore_on(data_root: str | Path, category: str, data_format: str):
    """A function that evaluates another model (the champion) on this run's test data."""

    def rescore(model_dir: str | Path, planting: str | None = None) -> dict:
        import tempfile

        from fod_core.evaluate import evaluate_model

        with tempfile.TemporaryDirectory() as tmp:
            return evaluate_model(
                model_dir,
                data_root,
                category,
                tmp,
                format=data_format,
                max_overlays=0,
                planting=planting,
                progress=False,
            )

    return rescore


def catch_line(metrics: dict) -> str:
    """What the line sees at the shipped threshold, in one sentence: defects caught,
    false alarms, and the planted catch rate (named as planted) without labelled ones."""
    parts = []
    if metrics.get("catch_rate") is not None:
        n = metrics["defects_caught"], metrics.get("n_anomalous")
        parts.append(f"caught {n[0]} of {n[1]} labelled defects ({metrics['catch_rate']:.0%})")
    elif metrics.get("planted_detected") is not None:
        parts.append(
            f"caught {metrics['planted_detected']:.0%} of {metrics.get('n_planted')} planted "
            "anomalies (no labelled defects)"
        )
    if metrics.get("false_alarm_rate") is not None:
        parts.append(
            f"{metrics.get('false_alarms')} false alarms in {metrics.get('n_normal')} test normals"
        )
    return "At the shipped threshold: " + ("; ".join(parts) or "no decision (no threshold)")


def more_normals_lines(metrics: dict) -> list[str]:
    """The forecast of ``fod_core.evaluate.more_normals`` in sentences: how many more good
    parts behind the threshold move it, and the catch rate that would follow."""
    from fod_core.promise import ordinal, percent

    lines = []
    for row in metrics.get("more_normals") or []:
        if row["more"] == 0:
            continue
        head = (
            f"{row['more']} more good parts ({row['n_normal']}), asking at most "
            f"{percent(row['asked_rate'])}: the threshold at the {ordinal(row['rank'])} "
            f"highest score promises at most {percent(row['promise'])}"
        )
        if row["threshold"] is None:
            today = row.get("catch_rate_at_most")
            lines.append(
                f"{head}; it would be at least today's (above every calibration score so "
                "far), so the catch rate would not rise"
                + (f" (today {today:.0%})" if today is not None else "")
            )
        elif row.get("catch_rate") is not None:
            lines.append(
                f"{head}; threshold about {row['threshold']:.4g} (from today's normal scores), "
                f"catching about {row['catch_rate']:.0%} of the test's labelled defects"
                f" (today {metrics.get('catch_rate', 0):.0%})"
            )
        else:
            lines.append(f"{head}; threshold about {row['threshold']:.4g}")
    return lines


def recipe_section(recipe: dict | None) -> str:
    """What ``--preset auto`` chose, on what evidence (none for a fixed recipe)."""
    from fod_core.retrieval import describe_window

    if not recipe:
        return ""
    chosen = ", ".join(
        f"{k} {describe_window(v) if k == 'retrieval_window' else v}"
        for k, v in recipe["chosen"].items()
    )
    above = recipe.get("planted_caught_above_normals")
    above = "?" if above is None else f"{above:.1%}"
    return (
        f"<h2>Recipe chosen without labels</h2><p>{html.escape(chosen)}: "
        f"{above} of {recipe.get('planted_images')} "
        f"planted copies above every normal, planted image AUROC "
        f"{recipe.get('planted_image_auroc')}, on {recipe.get('choice_images')} choice images "
        f"and {recipe.get('tail_normals', 0)} training normals left out in turn; best of "
        f"{recipe.get('candidates')} candidates ({html.escape(str(recipe.get('rule')))}).</p>"
    )


def write_html_report(metrics: dict, eval_dir: Path, target: Path, title: str) -> None:
    """One self-contained page: headline metrics, confusion matrix, plots inline."""
    rows = "".join(
        f"<tr><td>{k}</td><td>{metrics[k]:.4f}</td></tr>"
        for k in HEADLINE
        if metrics.get(k) is not None
    )
    confusion = metrics.get("confusion") or {}
    confusion_rows = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in confusion.items())
    split_rows = "".join(
        f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in (metrics.get("splits") or {}).items()
    )
    promise = (metrics.get("calibration") or {}).get("promise") or "nothing (not recorded)"
    images = ""
    for name in ("roc.png", "score_histogram.png", "planted_histogram.png"):
        path = eval_dir / name
        if path.is_file():
            data = base64.b64encode(path.read_bytes()).decode()
            images += f'<img alt="{name}" src="data:image/png;base64,{data}" width="480">'
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(
        f"<html><head><title>FOD evaluation: {html.escape(title)}</title></head><body>"
        f"<h1>FOD evaluation: {html.escape(title)}</h1>"
        f"<p>Evidence: {html.escape(str(metrics.get('evidence', '')))}</p>"
        + "".join(f"<p><i>{html.escape(n)}</i></p>" for n in metrics.get("notes", []))
        + f"<table border=1>{rows}</table><h2>Splits</h2><table border=1>{split_rows}</table>"
        f"<p>Roles: training learns; the validation's choice part picks the epoch and level "
        f"weights; its calibration part alone sets the threshold.</p>"
        f"<h2>At the calibrated threshold</h2>"
        f"<p>The threshold promises: {html.escape(str(promise))}</p>"
        f"<p>{html.escape(catch_line(metrics))}</p>"
        + (
            "<h3>More good parts behind the threshold</h3><p>Without retraining: "
            "<code>fod calibrate --normals DIR</code>, or the pipeline's "
            "<code>normals_subdir</code>. Estimated from today's calibration scores:</p><ul>"
            + "".join(f"<li>{html.escape(line)}</li>" for line in more_normals_lines(metrics))
            + "</ul>"
            if more_normals_lines(metrics)
            else ""
        )
        + recipe_section(metrics.get("recipe"))
        + f"<table border=1>{confusion_rows}</table>{images}"
        f"<pre>{html.escape(json.dumps(metrics.get('per_defect_type', {}), indent=2))}</pre>"
        "</body></html>"
    )
