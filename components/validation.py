"""Data validation: a Great Expectations suite over the table of a category's images.

Every image is opened once and described by one row (readable, mode, size, content
hash, mask state). The suite then states what a trainable dataset is; a failure names
the files, and the GX data docs (HTML) are written for a person to read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

log = logging.getLogger(__name__)

MASK_OK = ("not_needed", "ok")


@dataclass(frozen=True)
class ValidationRules:
    min_size: int = 64  # pixels, both sides
    min_train: int = 10  # normal training images
    min_val: int = 5  # normal validation images, which every choice rests on
    # of the training normals, as training will split them; None: auto, sized as training
    # sizes it (calibration normals for this rate's promise)
    val_fraction: float | None = 0.1
    target_false_alarm_rate: float = 0.01
    # validation normals in its choice part, which level weights and the recipe are chosen
    # on (1 with level_weights synthetic or auto_recipe, the pipeline's defaults)
    min_choice: int = 0
    modes: tuple[str, ...] = ("RGB", "L")
    # Missing masks are a warning unless the run asks for pixel metrics; a mask that is
    # there but unusable (unreadable, another size, not binary) always fails.
    require_masks: bool = False


@dataclass
class ValidationReport:
    success: bool
    rows: int
    failures: list[dict] = field(default_factory=list)  # expectation, column, files
    docs_dir: str | None = None
    counts: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def message(self) -> str:
        warnings = "".join(f"\n  warning: {w}" for w in self.warnings)
        if self.success:
            return f"data validation passed: {self.rows} images, {self.counts}{warnings}"
        lines = [f"data validation FAILED ({len(self.failures)} expectation(s)):"]
        for failure in self.failures:
            files = failure.get("files") or []
            shown = ", ".join(files[:10]) + (
                f" (+{len(files) - 10} more)" if len(files) > 10 else ""
            )
            lines.append(f"  - {failure['expectation']}: {failure['detail']}")
            if shown:
                lines.append(f"      files: {shown}")
        if self.docs_dir:
            lines.append(f"  report: {self.docs_dir}/index.html")
        return "\n".join(lines) + warnings

    @classmethod
    def load(cls, docs_dir: str | Path) -> ValidationReport:
        data = json.loads((Path(docs_dir) / "report.json").read_text())
        return cls(**data)

    def to_dict(self) -> dict:
        return {
            "success": self.success,
            "rows": self.rows,
            "counts": self.counts,
            "failures": self.failures,
            "docs_dir": self.docs_dir,
            "warnings": self.warnings,
        }


def _describe_image(path: Path, root: Path) -> dict:
    from PIL import Image, UnidentifiedImageError

    row = {
        "path": str(path.relative_to(root)),
        "readable": False,
        "mode": "unreadable",
        "width": 0,
        "height": 0,
        "sha256": "",
    }
    try:
        data = path.read_bytes()
        row["sha256"] = hashlib.sha256(data).hexdigest()
        with Image.open(path) as image:
            image.load()  # decode fully: a truncated file fails here, not in training
            row.update(readable=True, mode=image.mode, width=image.width, height=image.height)
    except (OSError, UnidentifiedImageError, ValueError) as error:
        log.debug("unreadable image %s: %s", path, error)
    if not row["sha256"]:
        row["sha256"] = f"unreadable:{row['path']}"  # unique, so only 'readable' fails
    return row


def _mask_status(mask_path: Path | None, size: tuple[int, int]) -> str:
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if mask_path is None:
        return "missing"
    try:
        with Image.open(mask_path) as mask:
            values = np.asarray(mask.convert("L"))
    except (OSError, UnidentifiedImageError, ValueError):
        return "unreadable"
    if (values.shape[1], values.shape[0]) != size:
        return "size_mismatch"
    if not set(np.unique(values).tolist()) <= {0, 255, 1}:
        return "not_binary"
    return "ok"


def image_table(root: str | Path, category: str, format: str = "mvtec", *, val_fraction=0.1):
    """One row per image of the category (a pandas DataFrame) and the split counts (the
    splits training will make: train, validation, test normals, test anomalies)."""
    import pandas as pd

    from fod_core.data import load_category, split_roles, split_sizes, split_validation

    root = Path(root)
    data = load_category(root, category, format)
    train, val = split_validation(data.train, val_fraction, min_train=0)
    choice, _ = split_roles(val)
    rows = []
    for split, records in (("train", train), ("validation", val), ("test", data.test)):
        for record in records:
            row = _describe_image(record.path, root)
            row |= {"split": split, "label": record.label, "defect_type": record.defect_type}
            if record.label == 0:
                row["mask_status"] = "not_needed"
            elif not row["readable"]:
                row["mask_status"] = "ok" if record.mask_path else "missing"
            else:
                row["mask_status"] = _mask_status(record.mask_path, (row["width"], row["height"]))
            rows.append(row)
    table = pd.DataFrame(rows)
    return table, split_sizes(data, train, val, choice)


def parse_val_fraction(value: str) -> float | None:
    """A ``val_fraction`` parameter (``fod train --val-fraction``'s spelling): a share of
    the normals, or None for ``auto``."""
    if value == "auto":
        return None
    try:
        share = float(value)
    except ValueError:
        share = -1.0
    if not 0 <= share < 1:
        raise ValueError(f"val_fraction {value!r} must be auto or a share in [0, 1)")
    return share


def resolved(rules: ValidationRules, root, category: str, format: str) -> ValidationRules:
    """``rules`` with an auto validation fraction (None) settled as training will settle it."""
    if rules.val_fraction is not None:
        return rules
    from fod_core.config import TrainConfig
    from fod_core.data import load_category
    from fod_core.promise import DEFAULT_DELTA
    from fod_core.train import auto_val_fraction

    normals = load_category(Path(root), category, format).train
    fraction = auto_val_fraction(
        normals, TrainConfig(val_fraction=None), rules.target_false_alarm_rate, DEFAULT_DELTA
    )
    return replace(rules, val_fraction=fraction)


def validate_images(
    root: str | Path,
    category: str,
    format: str = "mvtec",
    *,
    rules: ValidationRules | None = None,
    docs_dir: str | Path | None = None,
) -> ValidationReport:
    """Run the suite; write GX data docs to ``docs_dir`` when given."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    import pandas as pd
    from great_expectations.data_context.types.base import ProgressBarsConfig
    from great_expectations.expectations.row_conditions import Column

    rules = resolved(rules or ValidationRules(), root, category, format)
    table, counts = image_table(root, category, format, val_fraction=rules.val_fraction)
    missing = int((table["mask_status"] == "missing").sum()) if len(table) else 0
    warnings = []
    if missing and not rules.require_masks:
        warnings.append(
            f"{missing} of {counts['test_anomalous']} defect images have no mask: image "
            "metrics only (pixel AUROC and AUPRO need masks; require_masks makes this an error)"
        )
        log.warning(warnings[-1])
    mask_ok = list(MASK_OK) + ([] if rules.require_masks else ["missing"])
    context = gx.get_context(mode="ephemeral")
    if docs_dir:
        docs_dir = Path(docs_dir).resolve()
        context.add_data_docs_site(
            site_name="fod",
            site_config={
                "class_name": "SiteBuilder",
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(docs_dir),
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_pandas("fod")
    E = gx.expectations
    # An unreadable file fails 'readable' only, not every check after it.
    readable_rows = {"row_condition": Column("readable") == True}  # noqa: E712
    suites = {
        "images": [
            E.ExpectColumnValuesToBeInSet(column="readable", value_set=[True]),
            E.ExpectColumnValuesToBeInSet(
                column="mode", value_set=list(rules.modes), **readable_rows
            ),
            E.ExpectColumnValuesToBeBetween(
                column="width", min_value=rules.min_size, **readable_rows
            ),
            E.ExpectColumnValuesToBeBetween(
                column="height", min_value=rules.min_size, **readable_rows
            ),
            E.ExpectColumnValuesToBeUnique(column="sha256"),
            E.ExpectColumnValuesToBeInSet(column="mask_status", value_set=mask_ok),
        ],
        "counts": [
            E.ExpectColumnValuesToBeBetween(column="train", min_value=rules.min_train),
            E.ExpectColumnValuesToBeBetween(column="validation", min_value=rules.min_val),
            E.ExpectColumnValuesToBeBetween(column="validation_choice", min_value=rules.min_choice),
        ],
    }
    frames = {"images": table, "counts": pd.DataFrame([counts])}
    failures: list[dict] = []
    actions = []
    if docs_dir:
        from great_expectations.checkpoint import UpdateDataDocsAction

        actions = [UpdateDataDocsAction(name="docs", site_names=["fod"])]
    for name, expectations in suites.items():
        asset = source.add_dataframe_asset(name)
        batch = asset.add_batch_definition_whole_dataframe(f"{name}-all")
        suite = context.suites.add(gx.ExpectationSuite(name=f"fod-{category}-{name}"))
        for expectation in expectations:
            suite.add_expectation(expectation)
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=f"{category}-{name}", data=batch, suite=suite)
        )
        checkpoint = context.checkpoints.add(
            gx.Checkpoint(
                name=f"{category}-{name}-checkpoint",
                validation_definitions=[definition],
                actions=actions,
                result_format={
                    "result_format": "COMPLETE",
                    **({"unexpected_index_column_names": ["path"]} if name == "images" else {}),
                },
            )
        )
        result = checkpoint.run(batch_parameters={"dataframe": frames[name]})
        for run_result in result.run_results.values():
            for item in run_result.results:
                if item.success:
                    continue
                config = item.expectation_config
                column = config.kwargs.get("column")
                details = item.result or {}
                files = [
                    entry["path"] if isinstance(entry, dict) else str(entry)
                    for entry in details.get("unexpected_index_list") or []
                ]
                values = details.get("partial_unexpected_list") or []
                failures.append(
                    {
                        "expectation": f"{config.type}({column})",
                        "detail": _failure_detail(config.type, column, values, counts, rules),
                        "files": files,
                    }
                )
    report = ValidationReport(
        success=not failures,
        rows=len(table),
        failures=failures,
        docs_dir=str(docs_dir) if docs_dir else None,
        counts=counts,
        warnings=warnings,
    )
    if docs_dir:
        (Path(docs_dir) / "report.json").write_text(json.dumps(report.to_dict(), indent=2))
    return report


def _failure_detail(kind: str, column: str, values: list, counts: dict, rules) -> str:
    if column == "readable":
        return "files that cannot be decoded as images"
    if column == "mode":
        return f"image modes outside the allowed set: {sorted(set(map(str, values)))}"
    if column in ("width", "height"):
        return f"images smaller than the minimum {column}"
    if column == "sha256":
        return "images with identical content (duplicates)"
    if column == "mask_status":
        return f"defect images without a usable mask: {sorted(set(map(str, values)))}"
    if column == "train":
        return (
            f"too few normal training images: {counts.get('train')}, at least "
            f"{rules.min_train} (rule min_train)"
        )
    if column == "validation":
        from fod_core.data import validation_shortfall

        normals = counts.get("train", 0) + counts.get("validation", 0)
        return validation_shortfall(
            counts.get("validation", 0), normals, rules.val_fraction, rules.min_val
        )
    if column == "validation_choice":
        return (
            f"none of the {counts.get('validation', 0)} validation normals fell into the part "
            "that level weights and the recipe are chosen on (about 30% of them): add normal "
            "images or raise val_fraction (auto sizes it for the promise), or set "
            "auto_recipe false and level_weights equal"
        )
    return f"{kind} failed on {column}"
