"""The pipeline's parameters: one typed list that the DAG, the CLI and the demo preset derive from.

Adding a parameter is one field here plus its use: a step input of the same name receives
it (``step_inputs``), ``fod pipeline`` and ``fod retrain`` get a flag for it, and the
compiled pipeline a default. Defaults come from the rules' own classes where they have one,
so a library default and a pipeline default cannot drift apart.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from components.deploy import DEFAULT_NAMESPACE
from components.features import DEFAULT_CACHE_PREFIX
from components.registry import PromotionGates
from components.validation import ValidationRules, parse_val_fraction
from fod_core.config import PRESETS, ModelConfig, ModelSize, Preset, ReferenceMode, TrainConfig
from fod_core.data import DatasetFormat
from fod_core.level_weights import LevelWeighting
from fod_core.processing import Alignment, ScoreRegion
from fod_core.retrieval import RetrievalFeatures
from fod_core.synthetic import Planting

DEPLOY_TARGETS = ("local", "kserve", "none")
THRESHOLD_MODES = ("auto", "false_alarm_rate", "f1")
DEFAULT_CATEGORIES = ("widget",)  # the demo's synthetic product
_GATES, _RULES, _TRAIN = PromotionGates(), ValidationRules(), TrainConfig()
# The pipeline's training defaults are `fod train`'s (`--preset auto`), so a new product is
# trained the same way by either. The method: auto_recipe false, level_weights equal,
# epochs 100, learning_rate 1e-4, val_fraction 0.1 (README, "The pipeline's defaults").
_AUTO = PRESETS[Preset.AUTO]


def parameter(default, help: str, *, flag: str = "", choices=None, cli: bool = True, **kwargs):
    """A pipeline parameter: its default, its help, and how the CLI spells it."""
    if isinstance(default, list):
        kwargs["default_factory"] = lambda: list(default)
    else:
        kwargs["default"] = default
    metadata = {"help": help, "flag": flag, "choices": choices, "cli": cli}
    return field(metadata=metadata, **kwargs)


@dataclass(frozen=True)
class PipelineParameters:
    """Everything one category's run is given. The run itself also takes the data source
    (``dvc_remote``, ``data_version``) and the ``categories`` (see ``RUN_INPUTS``)."""

    # data
    data_format: str = parameter(
        DatasetFormat.MVTEC.value,
        "layout of the data folder",
        flag="--format",
        choices=[f.value for f in DatasetFormat],
    )
    val_fraction: str = parameter(
        _AUTO["val_fraction"],
        "share of the normal images held out for validation, or auto: enough calibration "
        "normals for target_false_alarm_rate's promise (or a 5 percent one), between a "
        "tenth and a third",
    )
    min_train_images: int = parameter(_RULES.min_train, "fail early with fewer training normals")
    min_val_images: int = parameter(_RULES.min_val, "fail early with fewer validation normals")
    min_image_size: int = parameter(_RULES.min_size, "smallest image side, in pixels")
    require_masks: bool = parameter(
        _RULES.require_masks,
        "fail validation when a defect image has no mask (pixel metrics need them)",
    )
    anomalies_subdir: str = parameter(
        "", "folder (under the category) of labelled validation anomalies for an F1 threshold"
    )
    normals_subdir: str = parameter(
        "",
        "folder (under the category) of more good parts for the threshold alone, as fod "
        "calibrate --normals: a tighter promise without retraining",
    )
    # model and training
    code_version: str = parameter("unknown", "the git commit that trained", cli=False)
    backbone: str = parameter(ModelConfig().backbone.name, "timm feature extractor")
    image_size: int = parameter(ModelConfig().image_size, "side of the square model input")
    model_size: str = parameter(
        ModelSize.METHOD.value, "architecture preset", choices=[s.value for s in ModelSize]
    )
    alignment: str = parameter(
        Alignment.NONE.value,
        "pose normalisation: none (the method), or principal_axis to turn parts that lie at "
        "any angle (screws) onto one axis before the model",
        choices=[a.value for a in Alignment],
    )
    reference: str = parameter(
        ReferenceMode.CLASS.value,
        "the inter branch's reference pattern: class, the mean of all training normals (the "
        "method), or nearest, per image the mean of its reference_k nearest training normals "
        "(parts that are not aligned; `fod train --preset hard`)",
        choices=[r.value for r in ReferenceMode],
    )
    reference_k: int = parameter(ModelConfig().reference_k, "normals per nearest reference")
    retrieval_window: int = parameter(
        ModelConfig().retrieval_window,
        "not the method: add the retrieval distance within w x w positions as a further "
        "branch of the score (odd w; -1: any position; 0: none); needs level_weights synthetic",
    )
    retrieval_features: str = parameter(
        ModelConfig().retrieval_features.value,
        "not the method: what the retrieval distance compares, finer (the finer level's "
        "features), local (every level's over 3x3 positions, PatchCore's patch features) or "
        "both (a branch of each, weighted apart); auto_recipe uses both",
        choices=[f.value for f in RetrievalFeatures],
    )
    score_region: str = parameter(
        ModelConfig().score_region.value,
        "not the method: where the image score looks, whole (the method's) or part (the part "
        "alone, for a part on a plain background; nothing beside it is scored); auto_recipe "
        "chooses it",
        choices=[r.value for r in ScoreRegion],
    )
    auto_recipe: bool = parameter(
        _AUTO["auto_recipe"],
        "choose alignment, reference, K, retrieval window, planting and score region per "
        "product before training, on planted anomalies (`fod train --preset auto`; overrides "
        "those six and retrieval_features, which are then not read); "
        "needs level_weights synthetic",
    )
    epochs: int = parameter(
        _AUTO["epochs"],
        "training epochs; 0: as many whole epochs as fit in 1,500 training images seen (1 to 10)",
    )
    batch_size: int = parameter(_TRAIN.batch_size, "training batch size")
    learning_rate: float = parameter(_AUTO["lr"], "Adam learning rate", flag="--lr")
    cache_prefix: str = parameter(DEFAULT_CACHE_PREFIX, "S3 prefix of the feature cache")
    warm_start: bool = parameter(False, "start from the champion's weights")
    # threshold
    threshold_mode: str = parameter(
        "auto",
        "auto: F1 with labelled validation anomalies, else the false-alarm quantile",
        choices=list(THRESHOLD_MODES),
    )
    target_false_alarm_rate: float = parameter(
        0.01, "the share of good parts that may raise an alarm"
    )
    level_weights: str = parameter(
        _AUTO["level_weights"],
        "how the levels' maps combine: equal (the method) or synthetic (weights chosen on "
        "anomalies planted into validation images)",
        choices=[w.value for w in LevelWeighting],
    )
    planting: str = parameter(
        Planting.ANYWHERE.value,
        "anomalies planted for the level weights and the planted metrics: anywhere (0.3 to 3 "
        "percent of the image) or part (0.05 to 0.5 percent, on the part, for small defects "
        "on small parts; compare a product's versions planted the same way)",
        choices=[p.value for p in Planting],
    )
    # export
    export_formats: str = parameter(
        "onnx,openvino",
        "scoring graphs exported into the model and checked against PyTorch before "
        "registration (comma-separated: onnx, openvino; empty: none). A version whose "
        "export disagrees is registered with the failure as a tag and not promoted. bf16 "
        "adds PyTorch's bf16 accuracy check (a tag; `fod serve --precision auto` follows it)",
    )
    # promotion gates
    min_image_auroc: float = parameter(_GATES.min_image_auroc, "gate on labelled defects")
    min_pixel_auroc: float = parameter(_GATES.min_pixel_auroc, "gate on defect masks")
    min_aupro: float = parameter(_GATES.min_aupro, "gate on defect masks")
    min_planted_image_auroc: float = parameter(
        _GATES.min_planted_image_auroc,
        "gate without labelled defects: image AUROC on planted anomalies",
    )
    min_planted_aupro: float = parameter(
        _GATES.min_planted_aupro, "gate without labelled defects: AUPRO on planted anomalies"
    )
    promotion_tolerance: float = parameter(
        _GATES.tolerance, "how much worse than the champion still counts as not worse"
    )
    min_catch_rate: float = parameter(
        _GATES.min_catch_rate,
        "gate on the share of defects caught at the model's own threshold (labelled "
        "defects, else the planted ones); 0: off",
    )
    # serving
    deploy_target: str = parameter(
        "kserve",
        "serve the champion: a local model server, an InferenceService, or none",
        flag="--deploy",
        choices=list(DEPLOY_TARGETS),
    )
    serving_namespace: str = parameter(DEFAULT_NAMESPACE, "namespace of the InferenceService")
    canary_traffic_percent: int = parameter(
        0, "kserve: traffic share of a new version (0: all at once)", flag="--canary-percent"
    )


# The run's own inputs, before the per-category parameters.
RUN_INPUTS: dict[str, tuple[type, object]] = {
    "dvc_remote": (str, MISSING),
    "data_version": (str, MISSING),
    "categories": (list, list(DEFAULT_CATEGORIES)),
}
NAMES = tuple(f.name for f in fields(PipelineParameters))


def defaults() -> dict:
    """Each parameter's default, by name."""
    return asdict(PipelineParameters())


def checked(arguments: dict) -> dict:
    """``arguments`` unchanged, once every name is known and every value of its type."""
    types = {f.name: f.type for f in fields(PipelineParameters)} | {
        name: kind.__name__ for name, (kind, _) in RUN_INPUTS.items()
    }
    kinds = {"str": str, "int": int, "float": (int, float), "bool": bool, "list": list}
    for name, value in arguments.items():
        if name not in types:
            raise ValueError(f"{name!r} is not a pipeline parameter; known: {', '.join(types)}")
        if not isinstance(value, kinds[types[name]]) or (
            types[name] in ("int", "float") and isinstance(value, bool)
        ):
            raise ValueError(f"pipeline parameter {name}={value!r} must be of type {types[name]}")
    merged = defaults() | arguments
    if (
        not merged["auto_recipe"]
        and not merged["retrieval_window"]
        and merged["retrieval_features"] != RetrievalFeatures.FINER.value
    ):
        raise ValueError(
            f"retrieval_features {merged['retrieval_features']} needs a retrieval branch: set "
            "retrieval_window (1, 3, 5 or -1), or auto_recipe true"
        )
    if (merged["auto_recipe"] or merged["retrieval_window"]) and merged[
        "level_weights"
    ] == LevelWeighting.EQUAL.value:
        raise ValueError(
            "auto_recipe and retrieval_window need level_weights synthetic: the retrieval "
            "distance and FOD's scores are put on one scale and weighted on planted anomalies "
            "(auto_recipe is the default: for the method's equal weights, set auto_recipe "
            "false too)"
        )
    parse_val_fraction(merged["val_fraction"])  # auto or a share, else a ValueError
    return arguments


def step_inputs(step, values: dict) -> dict:
    """The parameters a step takes, by its input names (the DAG's wiring)."""
    return {name: values[name] for name in step.component_spec.inputs or {} if name in values}


def run_arguments(
    *,
    data_version: str,
    categories: list[str],
    repo_root: str | Path = ".",
    dvc_remote: str | None = None,
    overrides: dict | None = None,
) -> dict:
    """A run's arguments: the data version, the categories, this checkout's code version,
    then ``overrides`` (unset parameters keep the pipeline's defaults)."""
    from components.data_version import remote_url
    from components.settings import load_settings
    from components.tracking import code_version

    return checked(
        {
            "dvc_remote": dvc_remote or remote_url(load_settings()),
            "data_version": data_version,
            "categories": list(categories),
            "code_version": code_version(repo_root),
        }
        | (overrides or {})
    )


# -- command line -----------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per parameter; unset flags keep the pipeline's default (shown in the help)."""
    group = parser.add_argument_group("pipeline parameters (default: the pipeline's)")
    default_of = defaults()
    for spec in fields(PipelineParameters):
        meta = spec.metadata
        if not meta["cli"]:
            continue
        flag = meta["flag"] or "--" + spec.name.replace("_", "-")
        default = default_of[spec.name]
        help_text = f"{meta['help']} (default {default!r})"
        if spec.type == "bool":
            group.add_argument(
                flag,
                dest=spec.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
            continue
        kind = {"int": int, "float": float, "str": str}[spec.type]
        group.add_argument(
            flag, dest=spec.name, type=kind, choices=meta["choices"], default=None, help=help_text
        )


def from_arguments(args: argparse.Namespace) -> dict:
    """The parameters set on the command line (``add_arguments``'s flags)."""
    return {name: getattr(args, name) for name in NAMES if getattr(args, name, None) is not None}
