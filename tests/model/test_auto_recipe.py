"""``--preset auto``: the retrieval branch beside FOD's levels (its distance, its place in
the map, its scale), the recipe chosen on planted anomalies without labels, and the
artefact that carries both through reloading, evaluation and export."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_model import CHANNELS, STRIDES, TINY, features

from fod_core.artifact import ArtifactError, load_detector, read_manifest, update_manifest
from fod_core.cache import LocalStore
from fod_core.cli import build_parser
from fod_core.cli_train import configs_from_args, recipe_space_from_args
from fod_core.config import (
    AUTO_TRAIN_IMAGES,
    ModelConfig,
    ReferenceMode,
    TrainConfig,
    budget_epochs,
)
from fod_core.level_weights import typical_maxima
from fod_core.model import create_fod_model
from fod_core.processing import Alignment, PostProcessing, ScoreRegion, read_image
from fod_core.recipe import (
    CLASS_REFERENCE,
    WINDOWS,
    RecipeSpace,
    candidate_scores,
    choose_planting,
)
from fod_core.retrieval import (
    ANY_POSITION,
    RetrievalFeatures,
    local_features,
    retrieval_features,
    window_min_distance,
    window_reach,
)
from fod_core.synthetic import Planting, make_good_only_folder
from fod_core.train import train_model

# --- the retrieval distance ------------------------------------------------------------


def test_window_one_is_the_distance_to_the_nearest_row_position_by_position() -> None:
    x = torch.randn(2, 5, 6, 7)
    rows = torch.randn(2, 3, 5, 6, 7)
    expected = ((x[:, None] - rows) ** 2).sum(2).min(1).values
    torch.testing.assert_close(window_min_distance(x, rows, 1), expected)


def test_a_window_forgives_a_shift_of_one_position_not_a_defect() -> None:
    reference = torch.randn(1, 4, 8, 8)
    shifted = torch.roll(reference, shifts=1, dims=-1)  # the part one position to the right
    rows = reference[:, None]
    inner = (slice(None), slice(1, -1), slice(2, -1))  # away from the wrapped column
    assert window_min_distance(shifted, rows, 1)[inner].mean() > 1.0
    assert window_min_distance(shifted, rows, 3)[inner].abs().max() < 1e-6
    defect = shifted.clone()
    defect[0, :, 4, 4] += 5.0  # matches nothing nearby
    assert window_min_distance(defect, rows, 3)[0, 4, 4] > 10.0
    with pytest.raises(ValueError, match="odd"):
        window_min_distance(shifted, rows, 2)


def test_any_position_is_the_window_that_spans_the_whole_grid() -> None:
    x = torch.randn(2, 5, 6, 7)
    rows = torch.randn(2, 3, 5, 6, 7)
    spanning = window_min_distance(x, rows, 2 * 7 - 1)  # every position within reach
    torch.testing.assert_close(window_min_distance(x, rows, ANY_POSITION), spanning)
    # where a pattern lies in the reference does not matter; what it is does
    scrambled = rows.flatten(3)[..., torch.randperm(42)].view_as(rows)
    torch.testing.assert_close(
        window_min_distance(x, scrambled, ANY_POSITION), spanning, rtol=1e-4, atol=1e-4
    )
    moved = torch.roll(rows[:1, :1], shifts=(3, 4), dims=(-2, -1))
    assert window_min_distance(moved[:, 0], rows[:1, :1], ANY_POSITION).abs().max() < 1e-4
    assert window_reach(ANY_POSITION) > window_reach(5) > window_reach(1)
    with pytest.raises(ValueError, match="any position"):
        window_min_distance(x, rows, -3)


def test_local_features_pool_every_level_onto_the_finer_grid() -> None:
    finer, coarser = features(2)
    local = local_features([finer, coarser])
    assert local.shape == (2, finer.shape[1] + coarser.shape[1], *finer.shape[-2:])
    torch.testing.assert_close(local[:, : finer.shape[1]], F.avg_pool2d(finer, 3, 1, 1))
    flat = torch.ones(1, 2, 4, 4)  # a constant level stays constant inside, zeros pad the edge
    pooled = local_features([flat])
    assert pooled[0, 0, 1:3, 1:3].eq(1).all() and pooled[0, 0, 0, 0] == pytest.approx(4 / 9)


@pytest.mark.parametrize(
    "reference, window, kind",
    [
        (ReferenceMode.CLASS, 3, RetrievalFeatures.FINER),
        (ReferenceMode.NEAREST, 3, RetrievalFeatures.FINER),
        (ReferenceMode.NEAREST, ANY_POSITION, RetrievalFeatures.FINER),
        (ReferenceMode.CLASS, 1, RetrievalFeatures.LOCAL),
        (ReferenceMode.NEAREST, 3, RetrievalFeatures.LOCAL),
    ],
)
def test_the_model_scores_the_retrieval_branch_after_its_levels(reference, window, kind) -> None:
    config = replace(
        TINY, reference=reference, reference_k=3, retrieval_window=window, retrieval_features=kind
    )
    model = create_fod_model(config, in_channels=CHANNELS, strides=STRIDES).eval()
    bank = features(9)
    model.fit_references(bank)
    batch = features(4, seed=1)
    assert model.n_branches == 3
    maps = model.score_maps(batch)
    assert [tuple(m.shape) for m in maps] == [(4, 8, 8), (4, 4, 4), (4, 8, 8)]
    query = retrieval_features(batch, kind)
    if reference is ReferenceMode.NEAREST:
        neighbours = model.neighbours(batch)  # found on the finer level, whatever is compared
        # (N, K, C, H, W)
        rows = torch.stack(
            [retrieval_features([level[n] for level in bank], kind) for n in neighbours]
        )
    else:
        rows = retrieval_features([level.mean(0, keepdim=True) for level in bank], kind)[None]
    torch.testing.assert_close(maps[2], window_min_distance(query, rows, window))
    assert ModelConfig.from_dict(config.to_dict()).retrieval_features is kind
    # a branch weighted 0 is not computed; the others are as before
    only = model.score_maps(batch, levels=[False, False, True])
    assert only[0] is None and only[1] is None
    torch.testing.assert_close(only[2], maps[2])
    with pytest.raises(ValueError, match="branches"):
        model.score_maps(batch, levels=[True, True])


@pytest.mark.parametrize("window", [1, 3, ANY_POSITION])
@pytest.mark.parametrize("reference", [ReferenceMode.CLASS, ReferenceMode.NEAREST])
def test_every_branch_keeps_the_batch_dimension_free_for_export(reference, window) -> None:
    """torch.export (the ONNX export's tracer) with a dynamic batch: nothing in the scoring
    may turn the batch into a Python int, or the exported graph takes 2 images only (a
    nearest model's retrieval did, and its exports failed parity at batch 1)."""

    class Maps(torch.nn.Module):
        def __init__(self, model) -> None:
            super().__init__()
            self.model = model

        def forward(self, finer: torch.Tensor, coarser: torch.Tensor) -> list[torch.Tensor]:
            return self.model.score_maps([finer, coarser], chunked=False)

    config = replace(
        TINY,
        reference=reference,
        reference_k=3,
        retrieval_window=window,
        retrieval_features=RetrievalFeatures.BOTH,
    )
    model = create_fod_model(config, in_channels=CHANNELS, strides=STRIDES).eval()
    model.fit_references(features(9))
    batch = torch.export.Dim("batch", min=1, max=64)
    with torch.no_grad():
        exported = torch.export.export(
            Maps(model),
            tuple(features(2)),
            dynamic_shapes={"finer": {0: batch}, "coarser": {0: batch}},
            strict=False,
        )
        three = features(3, seed=2)
        for mine, theirs in zip(exported.module()(*three), Maps(model)(*three), strict=True):
            torch.testing.assert_close(mine, theirs)


@pytest.mark.parametrize("reference", [ReferenceMode.CLASS, ReferenceMode.NEAREST])
def test_both_retrieval_branches_are_the_finer_and_the_local_models_own(reference) -> None:
    """``both``: two branches after the levels, each the map a one-kind model computes,
    with the same neighbours; a branch weighted 0 is not computed."""
    models = {}
    for kind in RetrievalFeatures:
        config = replace(
            TINY, reference=reference, reference_k=3, retrieval_window=3, retrieval_features=kind
        )
        models[kind] = create_fod_model(config, in_channels=CHANNELS, strides=STRIDES).eval()
    models[RetrievalFeatures.FINER].load_state_dict(models[RetrievalFeatures.BOTH].state_dict())
    models[RetrievalFeatures.LOCAL].load_state_dict(models[RetrievalFeatures.BOTH].state_dict())
    bank, batch = features(9), features(4, seed=1)
    for model in models.values():
        model.fit_references(bank)
    both = models[RetrievalFeatures.BOTH]
    assert both.retrieval_branches == (RetrievalFeatures.FINER, RetrievalFeatures.LOCAL)
    assert both.n_branches == 4
    maps = both.score_maps(batch)
    finer = models[RetrievalFeatures.FINER].score_maps(batch)
    local = models[RetrievalFeatures.LOCAL].score_maps(batch)
    for mine, theirs in zip(maps[:3], finer, strict=True):  # the levels and the finer branch
        torch.testing.assert_close(mine, theirs)
    torch.testing.assert_close(maps[3], local[2])
    assert not torch.equal(maps[2], maps[3])
    only = both.score_maps(batch, levels=[False, False, False, True])
    assert only[:3] == [None, None, None]
    torch.testing.assert_close(only[3], maps[3])
    finer_only = both.score_maps(batch, levels=[True, True, True, False])
    assert finer_only[3] is None
    torch.testing.assert_close(finer_only[2], maps[2])
    with pytest.raises(ValueError, match="branches"):
        both.score_maps(batch, levels=[True, True, True])
    with pytest.raises(ValueError, match="one kind at a time"):
        both.retrieval_map(batch)
    with pytest.raises(ValueError, match="both"):
        retrieval_features(batch, RetrievalFeatures.BOTH)


def test_each_retrieval_setting_has_its_format_and_its_own_fingerprint(tmp_path) -> None:
    """Older readers refuse what they cannot score, and an export or bf16 check made for
    one retrieval setting is never taken for another."""
    from fod_core.artifact import format_version, scoring_fingerprint

    for name in ("model.pt", "backbone.pt"):
        (tmp_path / name).write_bytes(b"weights")
    post = {"image_size": 64, "score_sigma": 4.0, "level_weights": [0.5, 0.5]}
    fingerprints = []
    for kind, version in (("finer", 5), ("local", 6), ("both", 7)):
        model = {"retrieval_window": 3, "retrieval_features": kind}
        assert format_version(post, None, model) == version
        fingerprints.append(json.dumps(scoring_fingerprint(tmp_path, post, model)))
    assert len(set(fingerprints)) == 3
    assert format_version(post, None, {"retrieval_features": "both"}) == 2  # no branch


def test_branches_are_put_on_their_own_scale_before_weighting() -> None:
    post = PostProcessing(4, level_weights=(0.5, 0.0, 0.5), branch_scales=(2.0, 1.0, 10.0))
    maps = [torch.full((1, 4, 4), 4.0), None, torch.full((1, 4, 4), 30.0)]
    combined = post.combine(maps)
    torch.testing.assert_close(combined, torch.full((1, 4, 4), 0.5 * 2.0 + 0.5 * 3.0))
    assert PostProcessing.from_dict(post.to_dict()) == post
    assert "branch_scales" not in PostProcessing(4).to_dict()  # what older readers know
    normal = np.array([True, True, False])
    maps = [np.stack([np.full((2, 2), v) for v in (1.0, 3.0, 100.0)])]
    assert typical_maxima(maps, normal) == (2.0,)  # the anomalous image is left out


# --- the recipe, chosen without labels ---------------------------------------------------


def test_candidate_scores_rank_a_planted_defect_above_normals() -> None:
    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(12, 6, 8, 8, generator=generator)
    normals = bank[:4] + 0.05 * torch.randn(4, 6, 8, 8, generator=generator)
    defects = normals.clone()
    defects[:, :, 3, 3] += 4.0
    post = PostProcessing(32, 1.0)
    queries = torch.cat([normals, defects])
    scores = candidate_scores(bank, queries, [CLASS_REFERENCE, 1], [1, 3], post)
    whole = ScoreRegion.WHOLE
    assert set(scores) == {(0, 1, whole), (0, 3, whole), (1, 1, whole), (1, 3, whole)}
    for key in [(1, 1, whole), (1, 3, whole)]:  # the nearest normal is the image itself
        assert scores[key][4:].min() > scores[key][:4].max(), key


def test_candidate_scores_over_the_part_ignore_what_lies_beside_it() -> None:
    """A normal with a speck off the part outscores a defect on the part over the whole
    picture; over the part alone the defect is above it."""
    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(12, 6, 8, 8, generator=generator) * 0.01
    speck, defect = bank[0].clone(), bank[1].clone()
    speck[:, 0, 0] += 6.0  # beside the part
    defect[:, 4, 4] += 3.0  # on it
    regions = torch.zeros(2, 32, 32, dtype=torch.bool)
    regions[:, 12:24, 12:24] = True  # the part
    post = PostProcessing(32, 1.0)
    scores = candidate_scores(bank, torch.stack([speck, defect]), [1], [1], post, regions)
    assert scores[(1, 1, ScoreRegion.WHOLE)][0] > scores[(1, 1, ScoreRegion.WHOLE)][1]
    assert scores[(1, 1, ScoreRegion.PART)][1] > scores[(1, 1, ScoreRegion.PART)][0]


def test_planting_follows_the_part_size(tmp_path) -> None:
    from PIL import Image

    small, full = tmp_path / "small", tmp_path / "full"
    small.mkdir(), full.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        screw = np.full((64, 64, 3), 200, np.uint8)
        screw[30:34, 10:40] = 40  # a thin dark part, 3% of the photo
        Image.fromarray(screw).save(small / f"{i}.png")
        cell = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)  # fills the photo
        Image.fromarray(cell).save(full / f"{i}.png")
    planting, evidence = choose_planting(sorted(small.glob("*.png")))
    assert planting.value == "part" and evidence["small_part_images"] == 3
    assert choose_planting(sorted(full.glob("*.png")))[0].value == "anywhere"


def test_the_epoch_budget_is_images_seen() -> None:
    assert budget_epochs(AUTO_TRAIN_IMAGES // 5) == 5
    assert budget_epochs(424) == 3  # whole epochs within the budget: 1,272 images, not 1,696
    assert budget_epochs(10) == 10  # at most 10
    assert budget_epochs(10 * AUTO_TRAIN_IMAGES) == 1  # at least 1


def test_auto_is_the_default_and_a_flag_fixes_its_part_of_the_recipe() -> None:
    parser = build_parser()
    base = ["train", "--data", "d", "--category", "c", "--out", "o"]
    args = parser.parse_args(base)  # no --preset: auto
    _, train_config = configs_from_args(args)
    assert train_config.epochs == 0 and train_config.lr == 3e-4
    assert recipe_space_from_args(args) == RecipeSpace()  # everything chosen
    args = parser.parse_args([*base, "--alignment", "principal_axis", "--retrieval-window", "3"])
    space = recipe_space_from_args(args)
    assert space.alignments == (Alignment.PRINCIPAL_AXIS,) and space.windows == (3,)
    assert space.ks == RecipeSpace().ks and space.planting is None  # still chosen
    assert space.fixed() == {"alignments": ["principal_axis"], "windows": [3]}
    assert recipe_space_from_args(parser.parse_args([*base, "--reference", "class"])).ks == (0,)
    nearest = recipe_space_from_args(parser.parse_args([*base, "--reference", "nearest"]))
    assert CLASS_REFERENCE not in nearest.ks
    assert recipe_space_from_args(parser.parse_args([*base, "--reference-k", "5"])).ks == (5,)
    planted = recipe_space_from_args(parser.parse_args([*base, "--planting", "part"]))
    assert planted.planting is Planting.PART
    finer = recipe_space_from_args(parser.parse_args([*base, "--retrieval-features", "finer"]))
    assert finer.features == (RetrievalFeatures.FINER,)
    assert finer.fixed() == {"features": ["finer"]}  # recorded: not what auto would take
    both = recipe_space_from_args(parser.parse_args([*base, "--retrieval-features", "both"]))
    assert both == RecipeSpace() and both.fixed() == {}  # auto's own: nothing fixed
    assert recipe_space_from_args(parser.parse_args([*base, "--preset", "method"])) is None
    with pytest.raises(ValueError, match="--preset method or hard"):
        recipe_space_from_args(parser.parse_args([*base, "--retrieval-window", "0"]))
    _, train_config = configs_from_args(parser.parse_args([*base, "--epochs", "2"]))  # not a choice
    assert train_config.epochs == 2


class _PooledPixels(torch.nn.Module):
    """A fixed stand-in backbone for the recipe's candidates: the finer level is the image
    averaged over 8 x 8 cells (what is far from its neighbours stays far)."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = torch.nn.AvgPool2d(8)
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)  # its device

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.pool(x)]


def test_a_fixed_part_of_the_recipe_is_not_chosen(tmp_path) -> None:
    from fod_core.processing import PreProcessing
    from fod_core.recipe import choose_recipe

    root = tmp_path / "data"
    make_good_only_folder(root, "part", n_good=10, size=64, seed=1)
    images = sorted((root / "part").rglob("*.png"))
    extractor = _PooledPixels()
    pre = PreProcessing(64, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    bank = torch.cat([extractor(pre(read_image(p))[None])[0] for p in images[:6]])
    seen = []

    def features_for(alignment):
        seen.append(alignment)
        return extractor, pre, [bank]

    space = RecipeSpace(
        alignments=(Alignment.NONE,),
        ks=(3,),
        windows=(3,),
        features=(RetrievalFeatures.LOCAL,),
        planting=Planting.PART,
    )
    choice = choose_recipe(features_for, images[6:], image_size=64, score_sigma=1.0, space=space)
    assert seen == [Alignment.NONE]
    assert [
        (c["alignment"], c["features"], c["k"], c["window"], c["score_region"])
        for c in choice.candidates
    ] == [("none", "local", 3, 3, "whole"), ("none", "local", 3, 3, "part")]
    assert (choice.reference, choice.reference_k, choice.retrieval_window) == ("nearest", 3, 3)
    assert choice.retrieval_features == "local"
    assert choice.planting == "part" and choice.planting_evidence["fixed_by_flag"]
    assert choice.score_region == "part"  # planted on the part: scored on the part
    assert set(choice.fixed_by_flags) == {"alignments", "ks", "windows", "features", "planting"}
    assert RecipeSpace.from_flags(retrieval_features="local").features == (RetrievalFeatures.LOCAL,)
    fixed = RecipeSpace.from_flags(planting="part", score_region="whole")
    assert fixed.regions == (ScoreRegion.WHOLE,)
    kept = choose_recipe(features_for, images[6:], image_size=64, score_sigma=1.0, space=fixed)
    assert kept.score_region == "whole" and {c["score_region"] for c in kept.candidates} == {
        "whole"
    }
    whole = choose_recipe(features_for, images[6:], image_size=64, score_sigma=1.0)
    # every alignment, both retrieval branches (one kind only when asked), class and K
    # 1/3/5 (10 and 20 are more than the 6 bank rows), every window, both score regions
    assert len(whole.candidates) == len(Alignment) * 4 * len(WINDOWS) * len(ScoreRegion)
    assert {c["features"] for c in whole.candidates} == {"both"}
    assert whole.retrieval_features == "both"
    every = replace(RecipeSpace(), features=tuple(RetrievalFeatures), alignments=(Alignment.NONE,))
    tried = choose_recipe(features_for, images[6:], image_size=64, score_sigma=1.0, space=every)
    assert {c["features"] for c in tried.candidates} == {"finer", "local", "both"}

    def evidence(kind):
        return [
            (c["k"], c["window"], c["score_region"], c["planted_image_auroc"])
            for c in tried.candidates
            if c["features"] == kind
        ]

    assert evidence("both") == evidence("finer")  # both is judged by the finer branch
    assert tried.retrieval_features != "both"  # a tie goes to the simpler, one branch
    assert whole.fixed_by_flags == {}
    assert whole.score_region == ("part" if whole.planting == "part" else "whole")


# --- the whole recipe on a good-only folder ----------------------------------------------


def train_auto(root, out, cache, **options):
    """One epoch of the tiny model with the recipe chosen, on the good-only folder."""
    return train_model(
        root,
        "part",
        out,
        model_config=TINY,
        format="folder",
        train_config=TrainConfig(epochs=1, batch_size=4, lr=1e-3, val_fraction=0.3),
        cache_store=LocalStore(cache),
        progress=False,
        level_weighting="synthetic",
        auto_recipe=True,
        **options,
    )


@pytest.fixture(scope="module")
def auto_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("auto") / "data"
    make_good_only_folder(root, "part", n_good=30, size=72, seed=3)
    model = tmp_path_factory.mktemp("auto") / "model"
    return model, root, train_auto(root, model, model.parent / "cache")


def test_the_choice_and_its_evidence_travel_in_the_artefact(auto_model) -> None:
    model, root, outcome = auto_model
    manifest = read_manifest(model)
    recipe = manifest["recipe"]["auto"]
    assert (model / "level_weights.png").is_file()  # the 4 branches' best weightings, ranked
    assert outcome.recipe is not None and "best planted image AUROC" in recipe["rule"]
    # every candidate was scored, both alignments, class and nearest, both windows
    candidates = recipe["candidates"]
    assert {(c["alignment"], c["reference"], c["window"]) for c in candidates} >= {
        ("none", "class", 1),
        ("principal_axis", "nearest", 3),
    }
    region = recipe["score_region"]
    assert region == ("part" if recipe["planting"] == "part" else "whole")
    best = max(
        (c["planted_caught_above_normals"], c["planted_image_auroc"])
        for c in candidates
        if c["score_region"] == region
    )
    key = (
        "alignment",
        "reference",
        "reference_k",
        "retrieval_window",
        "score_region",
        "retrieval_features",
    )
    picked = tuple(recipe[k] for k in key)
    chosen = [
        c
        for c in candidates
        if (c["alignment"], c["reference"], c["k"], c["window"], c["score_region"], c["features"])
        == picked
    ]
    assert chosen
    assert (chosen[0]["planted_caught_above_normals"], chosen[0]["planted_image_auroc"]) == best
    # the normals' tail: training normals scored leave-one-out beside the choice images
    assert 0 < recipe["n_tail_normals"] <= manifest["data"]["splits"]["train"]
    assert recipe["n_choice_images"] == manifest["data"]["splits"]["validation_choice"]
    # the model is the one chosen, with the branch on, weighted and scaled
    assert recipe["retrieval_features"] == "both"  # auto's default: a branch of each kind
    assert manifest["format_version"] == 7
    assert manifest["model"]["retrieval_window"] == recipe["retrieval_window"]
    assert manifest["model"].get("retrieval_features", "finer") == recipe["retrieval_features"]
    assert manifest["planting"] == recipe["planting"]
    post = manifest["postprocessing"]
    assert post.get("score_region", "whole") == region  # the image score looks there
    assert len(post["level_weights"]) == len(post["branch_scales"]) == 4  # 2 levels, 2 branches
    assert sum(post["level_weights"]) == pytest.approx(1.0)
    # reloaded, it scores the calibration images as it did in training
    names = manifest["data"]["calibration_images"]
    reloaded = [p.score for p in load_detector(model).predict([root / "part" / n for n in names])]
    recorded = manifest["calibration"]["validation_scores"]
    assert sorted(reloaded) == pytest.approx(sorted(recorded), rel=1e-5)


def test_a_part_scored_model_takes_its_score_over_the_part_alone(auto_model) -> None:
    from dataclasses import replace as replace_post

    from fod_core.processing import read_image

    model, root, _ = auto_model
    detector = load_detector(model)
    assert detector.post.score_region is ScoreRegion.PART
    images = sorted((root / "part").rglob("*.png"))[:6]
    part = np.array([p.score for p in detector.predict(images)])
    batch, _ = detector.preprocess([read_image(i) for i in images])
    maps, whole_graph = detector.score_batch(batch)
    expected = detector.post.image_score(maps, detector.pre.part_regions(batch)).numpy()
    np.testing.assert_allclose(part, expected, rtol=1e-6)
    detector.post = replace_post(detector.post, score_region=ScoreRegion.WHOLE)
    whole = np.array([p.score for p in detector.predict(images)])
    np.testing.assert_allclose(whole, whole_graph.numpy(), rtol=1e-6)
    assert (part <= whole + 1e-6).all()  # the largest value over a part of the map


def test_an_auto_model_evaluates_and_exports_with_parity(auto_model, tmp_path) -> None:
    import shutil

    from fod_core.evaluate import evaluate_model
    from fod_core.export import export_model, load_exported

    model, root, _ = auto_model
    metrics = evaluate_model(model, root, "part", tmp_path / "eval", format="folder")
    assert metrics["n_normal"] > 0 and metrics["n_planted"] > 0
    # the report's recipe: the chosen candidate's own evidence, its score region named
    recipe, summary = read_manifest(model)["recipe"]["auto"], metrics["recipe"]
    assert summary["chosen"]["score_region"] == recipe["score_region"]
    chosen = [
        c
        for c in recipe["candidates"]
        if (c["k"], c["window"], c["alignment"], c["score_region"], c["features"])
        == (
            recipe["reference_k"],
            recipe["retrieval_window"],
            recipe["alignment"],
            recipe["score_region"],
            recipe["retrieval_features"],
        )
    ]
    assert summary["planted_caught_above_normals"] == chosen[0]["planted_caught_above_normals"]
    assert summary["planted_image_auroc"] == chosen[0]["planted_image_auroc"]
    assert summary["tail_normals"] == recipe["n_tail_normals"] > 0
    # every branch weighted, so that each one is in the exported graphs
    every = tmp_path / "every"
    shutil.copytree(model, every, ignore=shutil.ignore_patterns("export"))
    post = read_manifest(every)["postprocessing"]
    update_manifest(every, postprocessing={**post, "level_weights": [0.4, 0.2, 0.2, 0.2]})
    records = export_model(every, ["onnx", "openvino"])
    for runtime in ("onnx", "openvino"):
        assert records[runtime]["parity"]["passed"], records[runtime]["parity"]
    # the graphs return the map; the score over the part is taken from it as PyTorch takes it
    manifest = read_manifest(every)
    assert manifest["postprocessing"].get("score_region") == "part"
    images = [root / "part" / n for n in manifest["data"]["calibration_images"]]
    expected = [p.score for p in load_detector(every).predict(images)]
    for runtime in ("onnx", "openvino"):
        scores = [p.score for p in load_exported(every, runtime).predict(images)]
        assert scores == pytest.approx(expected, rel=1e-4), runtime
    # the location-free retrieval (any position of the K nearest) exports alike
    anywhere = tmp_path / "anywhere"
    shutil.copytree(every, anywhere, ignore=shutil.ignore_patterns("export"))
    model_section = read_manifest(anywhere)["model"]
    update_manifest(anywhere, model={**model_section, "retrieval_window": ANY_POSITION})
    records = export_model(anywhere, ["onnx"])
    assert records["onnx"]["parity"]["passed"], records["onnx"]["parity"]
    detector = load_detector(anywhere)
    assert detector.model.config.retrieval_window == ANY_POSITION
    moved = [p.score for p in detector.predict(images)]
    scores = [p.score for p in load_exported(anywhere, "onnx").predict(images)]
    assert scores == pytest.approx(moved, rel=1e-4)
    # and the retrieval on every level's local features (a newer format: 6)
    local = tmp_path / "local"
    shutil.copytree(every, local, ignore=shutil.ignore_patterns("export"))
    update_manifest(local, model={**model_section, "retrieval_features": "local"})
    three = {"level_weights": [0.4, 0.2, 0.4], "branch_scales": post["branch_scales"][:3]}
    update_manifest(local, postprocessing={**post, **three})  # one retrieval branch
    assert read_manifest(local)["format_version"] == 6
    records = export_model(local, ["onnx"])
    assert records["onnx"]["parity"]["passed"], records["onnx"]["parity"]
    detector = load_detector(local)
    assert detector.model.config.retrieval_features is RetrievalFeatures.LOCAL
    pooled = [p.score for p in detector.predict(images)]
    scores = [p.score for p in load_exported(local, "onnx").predict(images)]
    assert scores == pytest.approx(pooled, rel=1e-4)


def test_scales_that_do_not_fit_the_branches_are_refused(auto_model, tmp_path) -> None:
    import shutil

    model, _, _ = auto_model
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    manifest = read_manifest(broken)
    update_manifest(broken, postprocessing={**manifest["postprocessing"], "branch_scales": [1.0]})
    with pytest.raises(ArtifactError, match="branch scales"):
        load_detector(broken)


def test_a_retrieval_branch_needs_weights_chosen_on_planted_anomalies(tmp_path) -> None:
    root = tmp_path / "data"
    make_good_only_folder(root, "part", n_good=12, size=72, seed=3)
    with pytest.raises(ValueError, match="--level-weights synthetic"):
        train_model(
            root,
            "part",
            tmp_path / "m",
            model_config=replace(TINY, retrieval_window=3),
            format="folder",
            train_config=TrainConfig(epochs=1, batch_size=4, val_fraction=0.3),
            cache_store=LocalStore(tmp_path / "cache"),
            progress=False,
        )


def test_calibrating_an_unweighted_retrieval_model_weights_its_branches(
    auto_model, tmp_path
) -> None:
    """A model from the pipeline's training step (calibrate=False) has a retrieval branch
    but no weights or scales yet: `fod calibrate` must not average them as they are."""
    import shutil

    from fod_core.calibration import calibrate_model

    model, root, _ = auto_model
    bare = tmp_path / "bare"
    shutil.copytree(model, bare)
    post = dict(read_manifest(bare)["postprocessing"])
    post.pop("branch_scales"), post.pop("level_weights")
    update_manifest(bare, postprocessing=post)
    assert load_detector(bare).post.branch_scales is None
    calibrate_model(bare, root, "part", format="folder")
    post = read_manifest(bare)["postprocessing"]
    assert len(post["level_weights"]) == len(post["branch_scales"]) == 4  # 2 levels, 2 branches
    with pytest.raises(ValueError, match="--level-weights synthetic"):
        calibrate_model(bare, root, "part", format="folder", level_weighting="equal")


def test_settings_that_cannot_go_together_are_a_readable_error(capsys) -> None:
    from fod_core.cli import main

    argv = ["train", "--data", "d", "--category", "c", "--out", "o", "--preset", "method"]
    assert main([*argv, "--retrieval-window", "2"]) == 2
    assert "fod train: error:" in capsys.readouterr().err
    assert main([*argv, "--retrieval-window", "3"]) == 2  # needs synthetic weights
    assert "--level-weights synthetic" in capsys.readouterr().err
    assert main([*argv, "--retrieval-features", "local"]) == 2  # no branch to compare on
    assert "need a retrieval branch" in capsys.readouterr().err


def test_a_warm_start_seen_through_another_alignment_trains_from_scratch(
    auto_model, tmp_path, caplog
) -> None:
    """Retraining chooses the recipe again: when it turns the parts another way than the
    champion did, the champion's weights are not loaded (they would refuse), and the artefact
    says why."""
    import shutil

    model, root, _ = auto_model
    chosen = Alignment(read_manifest(model)["preprocessing"].get("alignment", "none"))
    other = next(a for a in Alignment if a is not chosen)
    champion = tmp_path / "champion"
    shutil.copytree(model, champion)
    pre = read_manifest(champion)["preprocessing"]
    update_manifest(champion, preprocessing={**pre, "alignment": other.value})
    out = tmp_path / "retrained"
    train_auto(
        root,
        out,
        model.parent / "cache",
        recipe_space=RecipeSpace(alignments=(chosen,), ks=(1,), windows=(3,)),
        init_from=champion,
        metadata={"warm_start_from": "models:/fod-part@champion"},
    )
    manifest = read_manifest(out)
    assert manifest["preprocessing"].get("alignment", "none") == chosen.value
    assert manifest["warm_start_from"] is None
    assert f"alignment {other.value!r}" in manifest["warm_start_skipped"]
    assert "no warm start" in caplog.text
