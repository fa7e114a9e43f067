"""Recipe settings chosen at training time by the stated label-free rule: the reference K
of ``--reference nearest`` on the validation's choice part, recorded with its evidence,
and the calibration part never used for it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from fod_core.artifact import read_manifest
from fod_core.cache import LocalStore
from fod_core.config import LevelConfig, ModelConfig, ReferenceMode, TrainConfig
from fod_core.data import DatasetError
from fod_core.recipe import K_CANDIDATES, retrieval_scores
from fod_core.synthetic import make_good_only_folder
from fod_core.train import train_model

TINY_NEAREST = ModelConfig(
    image_size=64,
    levels=(
        LevelConfig(d_model=32, n_heads=4, n_layers=1),
        LevelConfig(d_model=32, n_heads=4, n_layers=1),
    ),
    reference=ReferenceMode.NEAREST,
)


def test_retrieval_scores_against_a_direct_computation():
    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(7, 3, 4, 4, generator=generator)
    queries = torch.randn(2, 3, 4, 4, generator=generator)
    scores = retrieval_scores(bank, queries, (1, 3))
    for q, query in enumerate(queries):
        distances = [float(((query - b) ** 2).sum()) for b in bank]
        order = np.argsort(distances)
        for k in (1, 3):
            reference = bank[order[:k]].mean(0)
            expected = float(((query - reference) ** 2).sum(0).max())
            assert scores[k][q] == pytest.approx(expected, rel=1e-5)


def test_auto_k_is_chosen_on_the_choice_part_and_recorded(tmp_path):
    root = make_good_only_folder(tmp_path / "data", "parts", n_good=40, size=64, seed=3)
    config = TrainConfig(epochs=1, batch_size=4, val_fraction=0.3, choice_fraction=0.5)
    outcome = train_model(
        root,
        "parts",
        tmp_path / "model",
        format="folder",
        model_config=TINY_NEAREST,
        train_config=config,
        cache_store=LocalStore(tmp_path / "cache"),
        progress=False,
    )
    manifest = read_manifest(tmp_path / "model")
    chosen = manifest["recipe"]["reference_k"]
    rows = {r["k"]: r["planted_image_auroc"] for r in chosen["candidates"]}
    assert set(rows) == set(K_CANDIDATES)
    # the rule as stated: best planted AUROC, ties to the smaller K
    best = max(rows.values())
    assert chosen["k"] == min(k for k, v in rows.items() if v == best)
    assert manifest["model"]["reference_k"] == chosen["k"]
    assert chosen["n_choice_images"] == len(manifest["data"]["choice_images"])
    assert chosen["n_planted"] == 3 * chosen["n_choice_images"]
    assert outcome.splits["validation_calibration"] > 0  # the threshold's own images
    # an explicit K is kept as given, and nothing is chosen
    fixed = train_model(
        root,
        "parts",
        tmp_path / "fixed",
        format="folder",
        model_config=replace(TINY_NEAREST, reference_k=2),
        train_config=config,
        cache_store=LocalStore(tmp_path / "cache"),
        progress=False,
    )
    assert "recipe" not in read_manifest(fixed.model_dir)
    assert read_manifest(fixed.model_dir)["model"]["reference_k"] == 2
    # the evidence: planted copies are told apart better than chance
    assert best > 0.5


def test_auto_k_without_choice_images_fails_before_any_work(tmp_path):
    root = make_good_only_folder(tmp_path / "data", "parts", n_good=12, size=64, seed=3)
    with pytest.raises(DatasetError, match="choosing the reference K needs validation images"):
        train_model(
            root,
            "parts",
            tmp_path / "model",
            format="folder",
            model_config=TINY_NEAREST,
            train_config=TrainConfig(epochs=1, val_fraction=0.3, choice_fraction=0.0),
            cache_store=LocalStore(tmp_path / "cache"),
            progress=False,
        )
    assert not (tmp_path / "cache").exists()  # no feature was extracted
