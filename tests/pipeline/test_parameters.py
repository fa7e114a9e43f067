"""One source of the pipeline's parameters: the DAG, the CLI and the presets derive from it."""

from __future__ import annotations

from dataclasses import fields

import pytest

from components import steps
from components.validation import parse_val_fraction
from fod_core.cli import build_parser
from fod_core.config import PRESETS, Preset
from pipelines.cli import add_commands
from pipelines.dag import category_pipeline, training_pipeline
from pipelines.demo import DemoSettings
from pipelines.parameters import (
    RUN_INPUTS,
    PipelineParameters,
    checked,
    defaults,
    from_arguments,
)

STEPS = [step for step in vars(steps).values() if hasattr(step, "component_spec")]


def test_the_pipeline_takes_every_parameter_with_its_default() -> None:
    inputs = training_pipeline.component_spec.inputs
    assert list(inputs) == [*RUN_INPUTS, *defaults()]
    for name, default in defaults().items():
        assert inputs[name].default == default, name
    assert inputs["dvc_remote"].default is None and inputs["data_version"].default is None


def test_every_parameter_reaches_a_step_under_its_own_name() -> None:
    step_inputs = {name for step in STEPS for name in step.component_spec.inputs}
    per_category = category_pipeline.component_spec.inputs
    for spec in fields(PipelineParameters):
        assert spec.name in per_category, spec.name
        assert spec.name in step_inputs, f"{spec.name} is passed to no step"


def test_the_cli_has_a_flag_per_parameter_and_passes_only_what_was_set() -> None:
    parser = build_parser(add_commands)
    for command in ("pipeline run", "retrain"):
        argv = command.split()
        assert from_arguments(parser.parse_args(argv)) == {}
        args = parser.parse_args(
            [*argv, "--lr", "0.01", "--no-require-masks", "--min-train-images", "3",
             "--deploy", "none", "--threshold-mode", "f1"]
        )  # fmt: skip
        assert from_arguments(args) == {
            "learning_rate": 0.01,
            "require_masks": False,
            "min_train_images": 3,
            "deploy_target": "none",
            "threshold_mode": "f1",
        }
        with pytest.raises(SystemExit):
            parser.parse_args([*argv, "--level-weights", "average"])


def test_arguments_are_checked_by_name_and_type() -> None:
    assert checked(DemoSettings().training_arguments())["model_size"] == "compact"
    with pytest.raises(ValueError, match="'epoch' is not a pipeline parameter"):
        checked({"epoch": 3})
    with pytest.raises(ValueError, match=r"epochs=2\.5 must be of type int"):
        checked({"epochs": 2.5})
    with pytest.raises(ValueError, match="learning_rate=True"):
        checked({"learning_rate": True})


def test_the_pipelines_training_defaults_are_fod_trains() -> None:
    """A new product is trained the same way by `fod train` and by the pipeline."""
    train = build_parser(add_commands).parse_args(
        ["train", "--data", "d", "--category", "c", "--out", "o"]
    )
    assert train.preset == "auto"
    auto = PRESETS[Preset.AUTO]
    pipeline = defaults()
    assert pipeline["auto_recipe"] is auto["auto_recipe"] is True
    assert pipeline["level_weights"] == auto["level_weights"] == "synthetic"
    assert pipeline["epochs"] == auto["epochs"] == 0  # a budget of images seen
    assert pipeline["learning_rate"] == auto["lr"]
    assert pipeline["val_fraction"] == auto["val_fraction"] == "auto"
    assert checked({}) == {}  # the defaults are a valid run (no error)


def test_an_auto_recipe_needs_weights_chosen_on_planted_anomalies() -> None:
    for setting in ({}, {"auto_recipe": False, "retrieval_window": 3}):
        with pytest.raises(ValueError, match=r"level_weights synthetic.*auto_recipe false"):
            checked({**setting, "level_weights": "equal"})
        assert checked({**setting, "level_weights": "synthetic"})
    method = {"auto_recipe": False, "level_weights": "equal", "epochs": 100, "val_fraction": "0.1"}
    assert checked(method)


def test_a_validation_fraction_is_auto_or_a_share() -> None:
    assert [parse_val_fraction(v) for v in ("auto", "0", "0.25")] == [None, 0.0, 0.25]
    for wrong in ("-0.1", "1", "most"):
        with pytest.raises(ValueError, match=r"must be auto or a share in \[0, 1\)"):
            checked({"val_fraction": wrong})


def test_local_retrieval_features_need_a_retrieval_branch() -> None:
    with pytest.raises(ValueError, match="needs a retrieval branch"):
        checked({"auto_recipe": False, "retrieval_features": "local"})
    for setting in ({"auto_recipe": True}, {"auto_recipe": False, "retrieval_window": 3}):
        assert checked({**setting, "level_weights": "synthetic", "retrieval_features": "local"})
