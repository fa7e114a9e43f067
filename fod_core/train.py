"""Lifecycle stage 'train': dataset -> cached features -> FOD model -> calibrated artefact."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from fod_core.artifact import ArtifactError, read_manifest, save_artifact
from fod_core.backbone import FeatureExtractor
from fod_core.cache import BlobStore, CacheStats, FeatureCache, LocalStore
from fod_core.calibration import (
    CALIBRATION_PART,
    Threshold,
    calibrate_threshold,
    require_calibration_images,
    require_held_out_normals,
)
from fod_core.config import (
    AUTO_TRAIN_IMAGES,
    ModelConfig,
    ReferenceMode,
    TrainConfig,
    budget_epochs,
)
from fod_core.data import (
    DatasetFormat,
    load_category,
    split_roles,
    split_sizes,
    split_validation,
    validation_fraction_for,
)
from fod_core.inference import AnomalyDetector
from fod_core.level_weights import (
    LevelWeightChoice,
    LevelWeighting,
    apply_level_weighting,
    require_validation_images,
    require_weighted_branches,
)
from fod_core.memory import PhaseMeter
from fod_core.model import FODModel, create_fod_model
from fod_core.processing import Alignment, PostProcessing
from fod_core.promise import DEFAULT_DELTA, normals_needed, percent
from fod_core.recipe import (
    AUTO,
    RecipeChoice,
    RecipeSpace,
    choose_recipe,
    choose_reference_k,
    require_choice_images,
)
from fod_core.runtime import configure_cpu_numerics, release_free_memory
from fod_core.synthetic import Planting
from fod_core.trainer import FODTrainer, TrainResult, resolve_device
from fod_core.visualize import plot_training_curves

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    import os

    return Path(os.environ.get("FOD_CACHE_DIR", Path.home() / ".cache" / "fod" / "features"))


@dataclass
class TrainOutcome:
    model_dir: Path
    result: TrainResult
    threshold: Threshold | None  # None: left to a calibration step (the pipeline's)
    cache: dict[str, CacheStats]
    seconds: dict[str, float]
    level_weights: LevelWeightChoice | None = None
    splits: dict[str, int] | None = None
    memory: dict | None = None  # each phase's peak resident memory (fod_core.memory)
    recipe: RecipeChoice | None = None  # what --preset auto chose


def train_model(
    data_root: str | Path,
    category: str,
    out_dir: str | Path,
    *,
    format: DatasetFormat | str = DatasetFormat.MVTEC,
    model_config: ModelConfig | None = None,
    train_config: TrainConfig | None = None,
    cache_store: BlobStore | None = None,
    resume: bool = False,
    keep_checkpoints: bool = False,
    checkpoint_dir: str | Path | None = None,
    target_false_alarm_rate: float = 0.01,
    delta: float = DEFAULT_DELTA,
    level_weighting: LevelWeighting | str = LevelWeighting.EQUAL,
    progress: bool = True,
    on_epoch_end: Callable[[int, FODModel], dict | None] | None = None,
    metadata: dict | None = None,
    init_from: str | Path | None = None,
    calibrate: bool = True,
    planting: Planting | str = Planting.ANYWHERE,
    auto_recipe: bool = False,
    recipe_space: RecipeSpace | None = None,
) -> TrainOutcome:
    """Train one category and write a calibrated model artefact to ``out_dir``.

    ``init_from``: a model artefact of the same architecture whose FOD weights start the
    training (warm start when retraining on grown data); the class reference is always
    recomputed from this data. ``level_weighting``: EQUAL averages the levels' maps (the
    method); SYNTHETIC weights them for the best AUPRO on anomalies planted into the
    validation images. ``calibrate=False`` leaves level weights and threshold to a later
    ``calibrate_model`` (the pipeline's calibration step), so they are derived once.
    ``checkpoint_dir``: where the per-epoch checkpoint goes (``out_dir/checkpoints`` by
    default; the pipeline keeps it apart so a killed step resumes).
    ``planting``: how anomalies are planted for the level weights and for the evaluation's
    planted metrics (small and on the part for products like screws); kept in the artefact.
    Choices (best epoch, level weights) use the validation's choice part, the threshold
    its calibration part: ``delta`` is the chance its false-alarm promise may fail.
    ``auto_recipe`` (``--preset auto``): alignment, reference, K, retrieval window (with
    both retrieval branches unless ``recipe_space`` names one kind), planting and score
    region are chosen before training on the choice part
    with planted anomalies (``fod_core.recipe.choose_recipe``) among ``recipe_space``'s
    candidates (all by default), overriding ``model_config``'s and ``planting``."""
    configure_cpu_numerics()  # before the backbone starts PyTorch's worker threads
    model_config = model_config or ModelConfig()
    train_config = train_config or TrainConfig()
    out_dir = Path(out_dir)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else out_dir / "checkpoints"
    timings: dict[str, float] = {}
    if not auto_recipe:  # settings first: they need no data
        model_config.require_retrieval_for_features()
    if calibrate:
        retrieval = bool(model_config.retrieval_window)
        require_weighted_branches(level_weighting, auto_recipe or retrieval)
    data = load_category(data_root, category, format)  # lists the test set, never reads it
    train_config, split = training_split(data.train, train_config, target_false_alarm_rate, delta)
    train_records, val_records = split.train, split.validation
    choice_records, calibration_records = split.choice, split.calibration
    if train_config.epochs == 0:
        train_config = replace(train_config, epochs=budget_epochs(len(train_records)))
        log.info("%d epochs: about %d images seen", train_config.epochs, AUTO_TRAIN_IMAGES)
    require_validation_images(level_weighting, len(choice_records))
    auto_k = (
        model_config.reference is ReferenceMode.NEAREST
        and model_config.reference_k == AUTO
        and not auto_recipe  # the recipe chooses K itself
    )
    if auto_k or auto_recipe:
        require_choice_images(len(choice_records))
    if calibrate:
        require_calibration_images(len(val_records), len(calibration_records))
        require_held_out_normals(
            auto_recipe or model_config.reference is ReferenceMode.NEAREST,
            len(calibration_records),
        )
    splits = split_sizes(data, train_records, val_records, choice_records)
    log.info(
        "%s: %d training, %d validation images (%d to choose on, %d to calibrate on; "
        "%d normal, %d anomalous test images held out)",
        category,
        splits["train"],
        splits["validation"],
        splits["validation_choice"],
        splits["validation_calibration"],
        splits["test_normal"],
        splits["test_anomalous"],
    )

    device = resolve_device(train_config.device)
    meter = PhaseMeter(device)
    store = cache_store or LocalStore(default_cache_dir())
    recipe = None
    if auto_recipe:
        started = time.perf_counter()
        with meter.phase("recipe"):
            recipe = auto_recipe_choice(
                store, model_config, train_records, choice_records, device, progress, recipe_space
            )
        model_config = replace(
            model_config,
            alignment=recipe.alignment,
            reference=recipe.reference,
            reference_k=recipe.reference_k,
            retrieval_window=recipe.retrieval_window,
            retrieval_features=recipe.retrieval_features,
            score_region=recipe.score_region,
        )
        planting = recipe.planting
        timings["recipe_s"] = time.perf_counter() - started
        release_free_memory()
    started = time.perf_counter()
    with meter.phase("features"):
        cache = FeatureCache.for_backbone(
            store,
            model_config.backbone,
            model_config.image_size,
            model_config.alignment,
        )
        extractor, pre = cache.extractor, cache.pre
        train_features, train_stats = cache.features(
            train_records, device=device, progress=progress, desc="train features"
        )
        val_features, val_stats = cache.features(  # the best epoch is a choice
            choice_records, device=device, progress=progress, desc="val features"
        )
    timings["features_s"] = time.perf_counter() - started
    release_free_memory()  # the decoded images' buffers: training needs the room

    reference_k = None
    if auto_k:
        started = time.perf_counter()
        with meter.phase("reference_k"):
            reference_k = choose_reference_k(
                extractor,
                pre,
                train_features[0],
                [r.path for r in choice_records],
                planting=planting,
            )
        model_config = replace(model_config, reference_k=reference_k.k)
        timings["reference_k_s"] = time.perf_counter() - started
    torch.manual_seed(train_config.seed)  # the seed fixes the initial weights too
    started = time.perf_counter()
    with meter.phase("training"):
        model = create_fod_model(
            model_config, in_channels=extractor.channels, strides=extractor.strides
        )
        if init_from is not None and auto_recipe and (why := alignment_change(init_from, model)):
            # the recipe is chosen again on the grown data; weights learnt on images seen
            # another way would mislead, so this model starts from its own first epoch
            log.warning("no warm start: %s", why)
            metadata = {**(metadata or {}), "warm_start_from": None, "warm_start_skipped": why}
            init_from = None
        if init_from is not None:
            load_weights_for_warm_start(model, init_from, extractor)
        model.fit_references(train_features)
        trainer = FODTrainer(
            model,
            config=train_config,
            checkpoint_dir=checkpoint_dir,
            progress=progress,
            on_epoch_end=on_epoch_end,
        )
        result = trainer.fit(train_features, val_features, resume=resume)
    timings["train_s"] = time.perf_counter() - started
    release_free_memory()

    detector = AnomalyDetector(
        extractor=extractor,
        model=model,
        pre=pre,
        post=PostProcessing(
            model_config.image_size,
            model_config.score_sigma,
            score_region=model_config.score_region,
        ),
        device=device,
    )
    level_weights, threshold, calibration = None, None, {"pending": "a calibration step"}
    if calibrate:
        started = time.perf_counter()
        with meter.phase("level_weights"):
            level_weights = apply_level_weighting(
                detector,
                level_weighting,
                [r.path for r in choice_records],
                [r.path for r in train_records],
                seed=train_config.seed,
                planting=planting,
            )
        timings["level_weights_s"] = time.perf_counter() - started
        held_out = bool(val_records)
        if not held_out:
            log.warning("no validation images: calibrating on training images (no guarantee)")
        scored = calibration_records if held_out else train_records
        with meter.phase("threshold"):
            val_scores = [p.score for p in detector.predict([r.path for r in scored])]
        threshold = calibrate_threshold(
            val_scores,
            target_false_alarm_rate=target_false_alarm_rate,
            delta=delta,
            held_out=held_out,
        )
        detector.with_threshold(threshold.value, threshold.mode.value)
        calibration = {
            **threshold.to_dict(),
            "validation_scores": val_scores,
            "calibrated_on": CALIBRATION_PART if held_out else "training images",
        }
    history = [r.__dict__ for r in result.history]
    log.info("%s: %s", category, meter.describe())
    save_artifact(
        out_dir,
        model=model,
        extractor=extractor,
        pre=pre,
        post=detector.post,
        metadata={
            "category": category,
            "data": {
                **data.summary(),
                "root": str(data.root),
                "train_images": len(train_records),
                "val_images": len(val_records),
                "splits": splits,
                "validation_images": sorted(r.identity for r in val_records),
                "choice_images": sorted(r.identity for r in choice_records),
                "calibration_images": sorted(r.identity for r in calibration_records),
            },
            "training": {
                "config": train_config.to_dict(),
                "device": str(device),
                "best_epoch": result.best_epoch,
                "best_val_loss": result.best_val_loss,
                "compile_warmup_s": result.warmup_seconds,
                "history": history,
                "memory": meter.to_dict(),
                **timings,
            },
            "feature_cache": {"train": train_stats.to_dict(), "val": val_stats.to_dict()},
            "calibration": calibration,
            "level_weights": (level_weights.to_dict() if level_weights else {"weighting": "equal"}),
            "planting": Planting(planting).value,
            **({"recipe": {"reference_k": reference_k.to_dict()}} if reference_k else {}),
            **({"recipe": {"auto": recipe.to_dict()}} if recipe else {}),
            **(metadata or {}),
        },
    )
    plot_training_curves(history, out_dir / "training_curves.png")
    if level_weights is not None:
        level_weights.save_plot(out_dir / "level_weights.png")
    if not keep_checkpoints:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return TrainOutcome(
        out_dir,
        result,
        threshold,
        {"train": train_stats, "val": val_stats},
        timings,
        level_weights,
        splits,
        meter.to_dict(),
        recipe,
    )


@dataclass(frozen=True)
class TrainingSplit:
    """The normals' roles as ``fod train`` draws them: training, and the validation's
    choice part (every choice) and calibration part (the threshold alone)."""

    train: list
    validation: list
    choice: list
    calibration: list


def training_split(
    normals: list, train_config: TrainConfig, target: float, delta: float
) -> tuple[TrainConfig, TrainingSplit]:
    """The split of ``train_model``, for anything that must see the same images (the
    recipe preview, ``fod data splits``); ``train_config`` with its validation fraction
    settled (``None``, auto: enough calibration normals for a promise)."""
    if train_config.val_fraction is None:
        fraction = auto_val_fraction(normals, train_config, target, delta)
        train_config = replace(train_config, val_fraction=fraction)
    train, validation = split_validation(normals, train_config.val_fraction)
    choice, calibration = split_roles(validation, train_config.choice_fraction)
    return train_config, TrainingSplit(train, validation, choice, calibration)


# ``--val-fraction auto`` sizes the calibration part for the target, or for this rate
# where the target asks more normals than a third of them hold (a 1% promise needs 230)
AUTO_PROMISE = 0.05


def auto_val_fraction(
    normals: list, train_config: TrainConfig, target: float, delta: float
) -> float:
    """The validation fraction whose calibration part holds the normals that promise
    ``target`` (or ``AUTO_PROMISE``, the smaller need) at confidence 1 - ``delta``."""
    needed = min(normals_needed(target, delta), normals_needed(AUTO_PROMISE, delta))
    fraction = validation_fraction_for(normals, needed, train_config.choice_fraction)
    log.info(
        "validation fraction %g: %d calibration normals wanted (a %s promise at %g%%)",
        fraction,
        needed,
        percent(max(target, AUTO_PROMISE)),
        100 * (1 - delta),
    )
    return fraction


def auto_recipe_choice(
    store: BlobStore,
    model_config: ModelConfig,
    train_records: list,
    choice_records: list,
    device: torch.device,
    progress: bool,
    space: RecipeSpace | None = None,
) -> RecipeChoice:
    """``choose_recipe`` on the training features of each alignment, through the feature
    cache (the chosen alignment's features are then a cache hit for training)."""

    def features_for(alignment: Alignment):
        cache = FeatureCache.for_backbone(
            store, model_config.backbone, model_config.image_size, alignment
        )
        features, _ = cache.features(
            train_records,
            device=device,
            progress=progress,
            desc=f"recipe features ({alignment.value})",
        )
        return cache.extractor, cache.pre, [level.cpu() for level in features]

    return choose_recipe(
        features_for,
        [r.path for r in choice_records],
        image_size=model_config.image_size,
        score_sigma=model_config.score_sigma,
        space=space,
        training_images=[r.path for r in train_records],
    )


def alignment_change(artifact_dir: str | Path, model: FODModel) -> str | None:
    """Why ``artifact_dir``'s weights cannot start ``model`` (another alignment), or None."""
    manifest = read_manifest(Path(artifact_dir))
    theirs = manifest.get("preprocessing", {}).get("alignment", Alignment.NONE.value)
    if theirs == model.config.alignment.value:
        return None
    return (
        f"{artifact_dir} saw its images with alignment {theirs!r}, this training (the recipe "
        f"chosen) with {model.config.alignment.value!r}"
    )


def load_weights_for_warm_start(
    model: FODModel, artifact_dir: str | Path, extractor: FeatureExtractor
) -> None:
    """Copy another artefact's FOD weights into ``model``; refuse a different architecture."""
    artifact_dir = Path(artifact_dir)
    manifest = read_manifest(artifact_dir)
    if manifest["backbone"]["weights_digest"] != extractor.weights_digest:
        raise ArtifactError(
            f"cannot warm-start from {artifact_dir}: it was trained on another backbone "
            f"({manifest['backbone']['name']})"
        )
    if why := alignment_change(artifact_dir, model):
        raise ArtifactError(f"cannot warm-start: {why}")
    state = torch.load(artifact_dir / "model.pt", map_location="cpu", weights_only=True)
    # The references (and a nearest-normal bank) are recomputed from this data afterwards.
    state = {k: v for k, v in state.items() if not k.endswith(".bank")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
        if [k for k in missing if not k.endswith(".bank")] or unexpected:
            raise RuntimeError(f"missing {missing}, unexpected {unexpected}")
    except RuntimeError as error:
        raise ArtifactError(
            f"cannot warm-start from {artifact_dir}: another model architecture ({error})"
        ) from None
    log.info("warm start from %s", artifact_dir)
