"""Typed configuration: every hyper-parameter of the method in one place.

Defaults are the method's (FOD, ICCV 2023); training defaults differ from the
reference only where the reference is not part of the method (batch size).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from enum import Enum

from fod_core.backbone import BackboneSpec
from fod_core.processing import Alignment, ScoreRegion
from fod_core.retrieval import NO_RETRIEVAL, RetrievalFeatures, is_window


class SettingsError(ValueError):
    """Settings that do not go together (a user's flags or pipeline parameters)."""


class Device(str, Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class Precision(str, Enum):
    """Autocast mode for the transformer; AUTO is bf16 on CUDA and fp32 on CPU."""

    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"


class ReferenceMode(str, Enum):
    """Which normal images make the inter branch's reference pattern.

    CLASS: the per-position mean of all training normals (the method). NEAREST, not the
    method: for each image, the mean of the K training normals nearest to it (whole-map
    distance of the finer level's features). On parts that lie at any angle the class
    mean is a blur with no signal (screw: image AUROC 0.38 before training), the mean of
    the 5 nearest normals has one (0.95); BENCHMARKS.md, "Hard products"."""

    CLASS = "class"
    NEAREST = "nearest"


@dataclass(frozen=True)
class LevelConfig:
    """One feature level's transformer."""

    d_model: int
    n_heads: int = 8
    n_layers: int = 3
    ffn_ratio: int = 4
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.d_model % 4:
            raise ValueError(f"d_model must be divisible by 4 for 2-D sin/cos, got {self.d_model}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture, objective and scoring of FOD."""

    backbone: BackboneSpec = field(default_factory=BackboneSpec)
    image_size: int = 256
    levels: tuple[LevelConfig, ...] = (LevelConfig(d_model=256), LevelConfig(d_model=512))
    output_projection: bool = False  # the reference computes one and discards it
    lambda1: float = 0.5  # weight of the correlation divergences
    lambda2: float = 0.5  # weight of the entropy terms
    log_eps: float = 1e-4  # inside log() of KL and entropy
    score_sigma: float = 4.0  # Gaussian smoothing of the map before the image-score max
    # Not part of the method: where the image score looks (ScoreRegion: the whole map, the
    # method's, or the part alone); ``--preset auto`` chooses it.
    score_region: ScoreRegion = ScoreRegion.WHOLE
    # Not part of the method: pose normalisation of parts that lie at any angle (screws).
    alignment: Alignment = Alignment.NONE
    # Not part of the method: a reference per image from its nearest normals (ReferenceMode).
    reference: ReferenceMode = ReferenceMode.CLASS
    # normals averaged into each image's reference (NEAREST only); 0: chosen at training
    # time by the label-free rule of `fod_core.recipe` (the default: no K was fixed after
    # looking at test labels)
    reference_k: int = 0
    # Not part of the method: 0 scores as the method does; an odd window w adds the
    # retrieval distance (the distance of ``retrieval_features`` to the reference within w x w
    # positions, ``fod_core.retrieval``) as a further branch of the score; -1 looks at every
    # position of the reference (``ANY_POSITION``).
    retrieval_window: int = 0
    # what the retrieval distance compares: the finer level, every level's features over
    # 3 x 3 positions, or both as two branches (``RetrievalFeatures``); ``--preset auto``
    # takes both
    retrieval_features: RetrievalFeatures = RetrievalFeatures.FINER

    def __post_init__(self) -> None:
        object.__setattr__(self, "alignment", Alignment(self.alignment))
        object.__setattr__(self, "reference", ReferenceMode(self.reference))
        object.__setattr__(self, "score_region", ScoreRegion(self.score_region))
        object.__setattr__(self, "retrieval_features", RetrievalFeatures(self.retrieval_features))
        if self.reference_k < 0:
            raise ValueError(f"reference_k must be 0 (auto) or at least 1, got {self.reference_k}")
        if self.retrieval_window != NO_RETRIEVAL and not is_window(self.retrieval_window):
            raise ValueError(
                "retrieval_window must be 0 (none), an odd number or -1 (any position), got "
                f"{self.retrieval_window}"
            )
        if len(self.levels) != len(self.backbone.out_indices):
            raise ValueError(
                f"{len(self.levels)} level configs for {len(self.backbone.out_indices)} "
                "backbone stages"
            )

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["backbone"] = self.backbone.to_dict()
        data["levels"] = [asdict(level) for level in self.levels]
        data["alignment"] = self.alignment.value
        if self.alignment is Alignment.NONE:
            del data["alignment"]  # what earlier readers (and checkpoints) know
        data["reference"] = self.reference.value
        if self.reference is ReferenceMode.CLASS:
            del data["reference"], data["reference_k"]  # likewise
        if not self.retrieval_window:
            del data["retrieval_window"]
        data["retrieval_features"] = self.retrieval_features.value
        if self.retrieval_features is RetrievalFeatures.FINER or not self.retrieval_window:
            del data["retrieval_features"]  # what earlier readers know; nothing to compare
        data["score_region"] = self.score_region.value
        if self.score_region is ScoreRegion.WHOLE:
            del data["score_region"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        data = dict(data)
        data["backbone"] = BackboneSpec.from_dict(data["backbone"])
        data["levels"] = tuple(LevelConfig(**level) for level in data["levels"])
        data["alignment"] = Alignment(data.get("alignment", Alignment.NONE.value))
        data["reference"] = ReferenceMode(data.get("reference", ReferenceMode.CLASS.value))
        return cls(**data)

    def require_retrieval_for_features(self) -> None:
        """Local retrieval features without a retrieval branch would change nothing: a
        user who asks for them has forgotten the window (``--preset auto`` chooses both)."""
        if self.retrieval_features is not RetrievalFeatures.FINER and not self.retrieval_window:
            raise SettingsError(
                f"retrieval features {self.retrieval_features.value} need a retrieval branch: "
                "give --retrieval-window (1, 3, 5 or -1), or train with --preset auto"
            )

    def with_backbone(self, backbone: BackboneSpec) -> ModelConfig:
        return replace(self, backbone=backbone)


class ModelSize(str, Enum):
    """METHOD is the paper's architecture; COMPACT halves the widths and drops a layer for
    small images and quick CPU runs (the demo, tests)."""

    METHOD = "method"
    COMPACT = "compact"


MODEL_LEVELS: dict[ModelSize, tuple[LevelConfig, ...]] = {
    ModelSize.METHOD: (LevelConfig(d_model=256), LevelConfig(d_model=512)),
    ModelSize.COMPACT: (
        LevelConfig(d_model=128, n_layers=2),
        LevelConfig(d_model=256, n_layers=2),
    ),
}


def model_config_for(
    size: ModelSize | str = ModelSize.METHOD,
    *,
    image_size: int = 256,
    backbone: str | None = None,
    alignment: Alignment | str = Alignment.NONE,
    reference: ReferenceMode | str = ReferenceMode.CLASS,
    reference_k: int = 0,
    retrieval_window: int = 0,
    retrieval_features: RetrievalFeatures | str = RetrievalFeatures.FINER,
    score_region: ScoreRegion | str = ScoreRegion.WHOLE,
) -> ModelConfig:
    config = ModelConfig(
        image_size=image_size,
        levels=MODEL_LEVELS[ModelSize(size)],
        alignment=Alignment(alignment),
        reference=ReferenceMode(reference),
        reference_k=reference_k,
        retrieval_window=retrieval_window,
        retrieval_features=RetrievalFeatures(retrieval_features),
        score_region=ScoreRegion(score_region),
    )
    if backbone:
        config = config.with_backbone(BackboneSpec(name=backbone))
    return config


@dataclass(frozen=True)
class TrainConfig:
    """The training loop. Adam without weight decay or schedule, as the method trains."""

    epochs: int = 100  # 0: ``budget_epochs`` of the training set's size
    batch_size: int = 8
    lr: float = 1e-4
    seed: int = 3407
    # of the normal training images, held out from training; None (``--val-fraction
    # auto``): enough for the calibration part to promise the target, resolved by
    # ``fod_core.train.auto_val_fraction`` before any split (the artefact records the number)
    val_fraction: float | None = 0.1
    # of the validation normals, the part that makes choices (epoch, level weights, recipe);
    # the rest sets the threshold alone, so its promise survives the choices
    choice_fraction: float = 0.3
    device: Device = Device.AUTO
    precision: Precision = Precision.AUTO
    # The attention maps held one block of query rows at a time (forward and backward):
    # the same losses and gradients (to round-off) in a fraction of the memory, 3.2 GB
    # against 8.1 GB for the training step alone at batch 8 on bottle, about 22% slower
    # on a 2-core CPU (fp32; autocast keeps the maps). With micro-batches below, the whole
    # `fod train` at batch 8 peaks near 3 GB (BENCHMARKS.md, training memory end to end).
    # On by default: a pod's memory request or a laptop's RAM is the harder limit for our
    # users; --no-lean-attention trades the memory back for speed.
    lean_attention: bool = True
    # Images per forward and backward pass; their gradients add up to the batch's before
    # one Adam step, so the training is the batch's (to round-off: the loss is a mean
    # over images). 0: ``AUTO_MICRO_BATCH`` on a CPU, where memory grows with the images
    # in a pass and the time per image barely changes; the whole batch on a GPU.
    micro_batch_size: int = 0

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {
            "device": self.device.value,
            "precision": self.precision.value,
        }

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        data = {k: v for k, v in data.items() if k in {f.name for f in fields(cls)}}
        data["device"] = Device(data["device"])
        data["precision"] = Precision(data["precision"])
        return cls(**data)


class Preset(str, Enum):
    """Named training recipes of ``fod train``: settings that go together. Each setting
    stays overridable by its own flag."""

    METHOD = "method"  # the method as published: every default
    HARD = "hard"  # small defects on parts that lie at any angle (MVTec screw)
    AUTO = "auto"  # the recipe chosen per product on planted anomalies (fod_core.recipe)


# ``--epochs`` 0: as many whole epochs as fit in this many training images seen (at least
# 1, at most 10): 20-25 min of a 2-core CPU at 256 px, whatever the product's size.
# Whole epochs that fit, never rounded up: ELPV mono's 424 images rounded to 4 epochs
# (1,696 images) took `fod train` to 30.3 min on a 2-core Zen 4.
AUTO_TRAIN_IMAGES = 1500
MAX_AUTO_EPOCHS = 10


def budget_epochs(n_train: int, images: int = AUTO_TRAIN_IMAGES) -> int:
    return max(1, min(MAX_AUTO_EPOCHS, images // max(n_train, 1)))


# Per preset, the ``fod train`` settings it changes (the flags' names, as dests).
PRESETS: dict[Preset, dict[str, object]] = {
    Preset.METHOD: {},
    Preset.HARD: {
        "alignment": Alignment.PRINCIPAL_AXIS.value,  # turn each part onto one axis
        "reference": ReferenceMode.NEAREST.value,  # its reference from its nearest normals,
        "reference_k": 0,  # K chosen by the label-free rule at training time (fod_core.recipe)
        "lr": 3e-4,
        "epochs": 10,  # about 30 min per product on a 2-core CPU (BENCHMARKS.md)
        "level_weights": "synthetic",  # levels weighted on planted anomalies, no labels
        "planting": "part",  # planted small and on the part, as screws' defects are
    },
    Preset.AUTO: {
        # alignment, reference, K, retrieval window and planting chosen per product before
        # training, on the choice images with planted anomalies (fod_core.recipe)
        "auto_recipe": True,
        "lr": 3e-4,
        "epochs": 0,  # a budget of images seen (AUTO_TRAIN_IMAGES), not of epochs
        "level_weights": "synthetic",  # the branches weighted on planted anomalies
        "val_fraction": "auto",  # calibration normals enough for a 5% promise (at most 1/3)
    },
}
