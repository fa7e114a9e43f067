"""The nearest-normal reference (``--reference nearest``, ``--preset hard``): retrieval that
never hands a training image itself, a bank that travels in the artefact, the same scores
after reloading and through an exported graph, and a preset whose flags still win."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from tiny_model import CHANNELS, STRIDES, TINY, features

from fod_core import model as model_module
from fod_core import train as train_module
from fod_core.artifact import load_detector, read_manifest
from fod_core.cache import LocalStore
from fod_core.cli import build_parser
from fod_core.cli_train import configs_from_args, recipe_space_from_args, train_setting
from fod_core.config import ModelConfig, ReferenceMode, TrainConfig
from fod_core.export import export_model, load_runtime
from fod_core.model import create_fod_model
from fod_core.processing import Alignment, ScoreRegion
from fod_core.synthetic import make_good_only_folder
from fod_core.train import train_model
from fod_core.trainer import FODTrainer

NEAREST = replace(TINY, reference=ReferenceMode.NEAREST, reference_k=3)


def brute_force_nearest(
    bank: list[torch.Tensor], queries: list[torch.Tensor], k: int, *, exclude: bool = False
) -> torch.Tensor:
    """The K nearest bank images by squared distance of the finer level's maps, the plain
    way: every difference summed in float64 (no |q|^2 - 2 q.b + |b|^2 cancellation)."""
    b, q = bank[0].double().flatten(1), queries[0].double().flatten(1)
    distances = ((q[:, None] - b[None]) ** 2).sum(-1)
    if exclude:
        distances.fill_diagonal_(float("inf"))
    return distances.argsort(dim=1, stable=True)[:, :k]


def test_retrieval_finds_an_image_itself_unless_excluded() -> None:
    model = create_fod_model(NEAREST, in_channels=CHANNELS, strides=STRIDES)
    bank = features(9)
    model.fit_references(bank)
    found = model.neighbours(bank)
    assert found.shape == (9, 3)
    assert torch.equal(found[:, 0], torch.arange(9))  # distance 0 to itself
    assert torch.equal(found, brute_force_nearest(bank, bank, 3))
    others = model.neighbours(bank, exclude=torch.arange(9))
    assert not (others == torch.arange(9)[:, None]).any()
    assert torch.equal(others, brute_force_nearest(bank, bank, 3, exclude=True))
    queries = features(4, seed=5)  # images not in the bank
    assert torch.equal(model.neighbours(queries), brute_force_nearest(bank, queries, 3))
    # each reference is the mean of its rows, per level
    reference = model.levels[1].nearest_reference(others[:2])
    expected = bank[1][others[1]].flatten(2).transpose(1, 2).mean(0)
    torch.testing.assert_close(reference[1], expected)


def test_scores_in_chunks_in_one_pass_and_after_reloading_agree(monkeypatch) -> None:
    torch.manual_seed(0)
    model = create_fod_model(NEAREST, in_channels=CHANNELS, strides=STRIDES).eval()
    bank = features(11)
    model.fit_references(bank)
    batch = features(5, seed=1)
    # Small enough that both levels really score in chunks (1 and 2 images), each chunk
    # with its own images' neighbours: at the default budget 5 images are one chunk.
    monkeypatch.setattr(model_module, "SCORING_MAP_BUDGET", 2 * 4 * 16 * 16 * 4)
    assert [level.scoring_chunk(torch.device("cpu")) for level in model.levels] == [1, 2]
    chunked = model.score_maps(batch)
    whole = model.score_maps(batch, chunked=False)
    reloaded = create_fod_model(NEAREST, in_channels=CHANNELS, strides=STRIDES).eval()
    reloaded.load_state_dict(model.state_dict())  # the bank's size comes with it
    assert reloaded.levels[0].bank.shape[0] == 11
    again = reloaded.score_maps(batch)
    for a, b, c in zip(chunked, whole, again, strict=True):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)
    # Independently: each image scored through the class-reference path, with the class
    # reference set to the mean of its brute-force K nearest bank images.
    nearest = brute_force_nearest(bank, batch, NEAREST.reference_k)
    by_class = create_fod_model(TINY, in_channels=CHANNELS, strides=STRIDES).eval()
    by_class.load_state_dict(model.state_dict(), strict=False)  # the same weights, no bank
    for i in range(5):
        by_class.set_references([f[nearest[i]].mean(0).flatten(1).transpose(0, 1) for f in bank])
        alone = by_class.score_maps([f[i : i + 1] for f in batch])
        for level, expected in zip(chunked, alone, strict=True):
            torch.testing.assert_close(level[i : i + 1], expected)
    # the class reference scores differently: the per-image reference is really used
    model.config = TINY
    assert not torch.allclose(model.score_maps(batch)[0], chunked[0])


def test_retrieval_stays_fp32_under_bf16_autocast() -> None:
    """|q|^2 - 2 q.b + |b|^2 in bf16 loses more than the gaps between neighbours."""
    model = create_fod_model(NEAREST, in_channels=CHANNELS, strides=STRIDES)
    bank = [f + 50.0 for f in features(40)]  # large norms: where bf16 cancels badly
    model.fit_references(bank)
    queries = [f + 50.0 for f in features(6, seed=2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = model.neighbours(queries)
    assert torch.equal(under_autocast, brute_force_nearest(bank, queries, 3))


def test_a_nearest_reference_needs_validation_images(tmp_path) -> None:
    """A training image is its own nearest normal: calibrating on them breaks the promise."""
    from fod_core.data import DatasetError

    root = make_good_only_folder(tmp_path / "data", "part", n_good=6, size=48)
    with pytest.raises(DatasetError, match="needs validation images"):
        train_model(
            root,
            "part",
            tmp_path / "model",
            model_config=NEAREST,
            format="folder",
            train_config=TrainConfig(epochs=1, val_fraction=0.0),
            cache_store=LocalStore(tmp_path / "cache"),
            progress=False,
        )
    assert not (tmp_path / "model").exists()  # refused before any work


def test_a_class_models_dict_reads_as_before() -> None:
    assert "reference" not in TINY.to_dict()  # earlier readers and checkpoints
    assert ModelConfig.from_dict(TINY.to_dict()).reference is ReferenceMode.CLASS
    assert ModelConfig.from_dict(NEAREST.to_dict()) == NEAREST
    assert replace(NEAREST, reference_k=0).reference_k == 0  # 0: chosen at training time
    with pytest.raises(ValueError, match="reference_k"):
        replace(NEAREST, reference_k=-1)


def test_the_trainer_refuses_a_bank_of_other_images() -> None:
    model = create_fod_model(NEAREST, in_channels=CHANNELS, strides=STRIDES)
    model.fit_references(features(6))
    trainer = FODTrainer(model, config=TrainConfig(epochs=1), progress=False)
    with pytest.raises(ValueError, match="bank holds 6 images, the training set 8"):
        trainer.fit(features(8))


@pytest.fixture(scope="module")
def nearest_model(tmp_path_factory):
    """A good-only folder (our first user's data), trained with a nearest reference."""
    root = tmp_path_factory.mktemp("reference-data")
    make_good_only_folder(root, "part", n_good=14, size=72, seed=3)
    model = tmp_path_factory.mktemp("reference") / "model"
    outcome = train_model(
        root,
        "part",
        model,
        model_config=NEAREST,
        format="folder",
        train_config=TrainConfig(epochs=2, batch_size=4, lr=1e-3, val_fraction=0.25),
        cache_store=LocalStore(model.parent / "cache"),
        progress=False,
        level_weighting="synthetic",
        planting="part",
    )
    return model, root, outcome


def test_the_bank_travels_in_the_artefact(nearest_model) -> None:
    model, root, outcome = nearest_model
    manifest = read_manifest(model)
    assert manifest["format_version"] == 4  # readers without nearest references refuse it
    assert manifest["model"]["reference"] == "nearest"
    detector = load_detector(model)
    n_train = manifest["data"]["train_images"]
    assert [level.bank.shape[0] for level in detector.model.levels] == [n_train, n_train]
    # The reloaded model scores the calibration images as the in-memory one did in
    # training (recorded then, in the order of the data set: compared as sorted lists).
    calibration = manifest["calibration"]
    recorded = calibration["validation_scores"]
    names = manifest["data"]["calibration_images"]
    assert len(recorded) == len(names) == calibration["n_normal"] >= 2
    reloaded = [p.score for p in detector.predict([root / "part" / n for n in names])]
    assert sorted(reloaded) == pytest.approx(sorted(recorded), rel=1e-5)
    # the calibration rule: the threshold_rank-th largest calibration score; so few normals
    # support no 1% false-alarm rate, so the rank is 1 (their maximum)
    rank = calibration["threshold_rank"]
    assert rank == 1
    expected = sorted(recorded, reverse=True)[rank - 1]
    assert outcome.threshold.value == calibration["threshold"] == expected
    assert detector.post.threshold == pytest.approx(expected)
    # planted small and on the part, for the level weights and for evaluation alike
    assert manifest["planting"] == "part"
    assert len(manifest["level_weights"]["weights"]) == 2  # chosen on planted anomalies


def test_evaluation_plants_as_the_model_was_calibrated(nearest_model, tmp_path) -> None:
    from fod_core.evaluate import evaluate_model

    model, root, _ = nearest_model
    metrics = evaluate_model(model, root, "part", tmp_path / "eval", format="folder")
    assert metrics["planting"] == "part"
    assert metrics["n_normal"] > 0 and metrics["n_planted"] == 2 * metrics["n_normal"]


def test_a_nearest_model_exports_with_parity(nearest_model) -> None:
    model, root, _ = nearest_model
    records = export_model(model, ["onnx", "openvino"])
    images = sorted((root / "part" / "good").glob("*.png"))[:4]
    expected = [p.score for p in load_detector(model).predict(images)]
    for runtime in ("onnx", "openvino"):  # retrieval (top-k, gather) inside the graph
        assert records[runtime]["parity"]["passed"], records[runtime]["parity"]
        answers = load_runtime(model, runtime).predict(images, batch_size=4)
        assert [p.score for p in answers] == pytest.approx(expected, rel=1e-4)


def test_a_class_model_warm_starts_a_nearest_one(nearest_model, tmp_path, monkeypatch) -> None:
    model, root, _ = nearest_model
    started: dict[str, torch.Tensor] = {}

    def spy(fod_model, *args, **kwargs):  # the weights training starts from
        load(fod_model, *args, **kwargs)
        started.update({k: v.clone() for k, v in fod_model.state_dict().items()})

    load = train_module.load_weights_for_warm_start
    monkeypatch.setattr(train_module, "load_weights_for_warm_start", spy)
    class_model = tmp_path / "class"
    common = dict(
        format="folder",
        train_config=TrainConfig(epochs=1, batch_size=4, lr=1e-3, val_fraction=0.25),
        cache_store=LocalStore(model.parent / "cache"),
        progress=False,
    )
    train_model(root, "part", class_model, model_config=TINY, **common)
    train_model(
        root, "part", tmp_path / "warm", model_config=NEAREST, init_from=class_model, **common
    )
    assert read_manifest(tmp_path / "warm")["model"]["reference"] == "nearest"
    # every FOD weight started as the class model's; references are recomputed
    saved = torch.load(class_model / "model.pt", weights_only=True)
    weights = [k for k in saved if not k.endswith(".reference")]
    assert weights and set(started) == set(saved) | {"levels.0.bank", "levels.1.bank"}
    for name in weights:
        torch.testing.assert_close(started[name], saved[name], rtol=0, atol=0, msg=name)


def test_the_hard_preset_gives_its_recipe_and_a_flag_wins() -> None:
    parser = build_parser()
    base = ["train", "--data", "d", "--category", "c", "--out", "o"]
    model_config, train_config = configs_from_args(parser.parse_args([*base, "--preset", "hard"]))
    assert model_config.reference is ReferenceMode.NEAREST
    assert model_config.reference_k == 0  # chosen by the label-free rule at training time
    assert model_config.alignment is Alignment.PRINCIPAL_AXIS
    assert (train_config.lr, train_config.epochs) == (3e-4, 10)
    args = parser.parse_args([*base, "--preset", "hard", "--epochs", "3", "--reference", "class"])
    model_config, train_config = configs_from_args(args)
    assert model_config.reference is ReferenceMode.CLASS
    assert train_config.epochs == 3
    assert train_setting(args, "level_weights") == "synthetic"
    assert train_setting(args, "planting") == "part"
    method = [*base, "--preset", "method"]
    model_config, train_config = configs_from_args(parser.parse_args(method))
    assert model_config == replace(model_config, reference=ReferenceMode.CLASS)
    assert model_config.alignment is Alignment.NONE
    assert (train_config.lr, train_config.epochs) == (TrainConfig().lr, TrainConfig().epochs)
    assert train_setting(parser.parse_args(method), "level_weights") == "equal"
    assert train_config.val_fraction == TrainConfig().val_fraction
    # auto: the validation fraction resolved at training time, the score region chosen
    model_config, train_config = configs_from_args(parser.parse_args([*base, "--preset", "auto"]))
    assert train_config.val_fraction is None
    assert model_config.score_region is ScoreRegion.WHOLE  # until the recipe chooses
    args = [*base, "--preset", "auto", "--val-fraction", "0.2", "--score-region", "part"]
    model_config, train_config = configs_from_args(parser.parse_args(args))
    assert train_config.val_fraction == 0.2 and model_config.score_region is ScoreRegion.PART
    assert recipe_space_from_args(parser.parse_args(args)).regions == (ScoreRegion.PART,)
