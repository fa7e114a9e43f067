"""The model artefact: one directory that scores images without the training data.

fod.json      config, preprocessing, postprocessing (threshold), provenance
model.pt      FOD weights with the class reference features (and, for a nearest-normal
              reference, the training normals' pooled features it is drawn from)
backbone.pt   the frozen backbone's weights (so no weights package or hub is needed)
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import torch

from fod_core.backbone import BackboneSpec, FeatureExtractor, WeightsSource
from fod_core.cache import file_sha256
from fod_core.config import ModelConfig, Precision
from fod_core.inference import AnomalyDetector
from fod_core.model import FODModel, create_fod_model
from fod_core.processing import PostProcessing, PreProcessing
from fod_core.runtime import configure_cpu_numerics

log = logging.getLogger(__name__)

ARTIFACT_FORMAT = "fod-model"
# 2: post-processing may carry level weights; 3: pre-processing a pose; 4: a reference
# per image from a bank of training normals kept in model.pt; 5: a retrieval branch in the
# score, the branches on their own scales; 6: retrieval on every level's local features;
# 7: two retrieval branches, the finer level's and the local features' (``both``)
ARTIFACT_VERSION = 7


def format_version(
    postprocessing: dict, preprocessing: dict | None = None, model: dict | None = None
) -> int:
    """The oldest format that reads this manifest: readers of version 1 know no level
    weights, readers of version 2 no pose normalisation, readers of version 3 no
    nearest-normal reference, so only artefacts that use them are marked 2, 3 or 4 (and
    refused clearly by older readers)."""
    model = model or {}
    features = model.get("retrieval_features", "finer") if model.get("retrieval_window") else None
    if features == "both":
        return 7
    if features == "local":
        return 6
    if model.get("retrieval_window") or postprocessing.get("branch_scales"):
        return 5
    if model.get("reference", "class") != "class":
        return 4
    if (preprocessing or {}).get("alignment", "none") != "none":
        return 3
    return 2 if postprocessing.get("level_weights") is not None else 1


MANIFEST = "fod.json"


class ArtifactError(RuntimeError):
    """A model directory that is missing, incomplete or of another format."""


def find_model_dir(path: str | Path) -> Path:
    """The one model directory at or under ``path`` (the folder with ``fod.json``): a model
    directory itself, or a downloaded MLflow model that holds one."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path} does not exist")
    if (path / MANIFEST).is_file():
        return path
    found = sorted(p.parent for p in path.rglob(MANIFEST))
    if len(found) != 1:
        raise ArtifactError(
            f"{path} holds {'no' if not found else len(found)} FOD model artefacts "
            f"({MANIFEST}); point at one model directory"
        )
    return found[0]


def save_artifact(
    directory: str | Path,
    *,
    model: FODModel,
    extractor: FeatureExtractor,
    pre: PreProcessing,
    post: PostProcessing,
    metadata: dict | None = None,
) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, directory / "model.pt")
    torch.save(
        {k: v.cpu() for k, v in extractor.body.state_dict().items()}, directory / "backbone.pt"
    )
    manifest = {
        "format": ARTIFACT_FORMAT,
        "format_version": format_version(post.to_dict(), pre.to_dict(), model.config.to_dict()),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": model.config.to_dict(),
        "backbone": {
            "name": extractor.spec.name,
            "out_indices": list(extractor.spec.out_indices),
            "weights_source": extractor.source.value,
            "weights_digest": extractor.weights_digest,
            "channels": extractor.channels,
            "strides": extractor.strides,
        },
        "preprocessing": pre.to_dict(),
        "postprocessing": post.to_dict(),
        **(metadata or {}),
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return directory


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory} is not an FOD model directory (no {MANIFEST})")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{path}: not an FOD model manifest")
    if manifest.get("format_version", 0) > ARTIFACT_VERSION:
        raise ArtifactError(
            f"{path}: format version {manifest['format_version']} is newer than this "
            f"fod_core reads ({ARTIFACT_VERSION}); upgrade the package"
        )
    return manifest


def update_manifest(directory: str | Path, **fields) -> dict:
    """Merge fields into fod.json (e.g. a new threshold from calibration)."""
    manifest = read_manifest(directory)
    manifest.update(fields)
    manifest["format_version"] = format_version(
        manifest["postprocessing"], manifest.get("preprocessing"), manifest.get("model")
    )
    (Path(directory) / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return manifest


def load_detector(
    directory: str | Path,
    *,
    device: str | torch.device = "cpu",
    precision: Precision | str = Precision.FP32,
) -> AnomalyDetector:
    """The model of ``directory``, scored by PyTorch. ``precision`` AUTO is bf16 only where
    the device computes bf16 natively and the model's bf16 accuracy check passed
    (``fod export --format bf16``); fp32 otherwise."""
    configure_cpu_numerics()  # before the backbone starts PyTorch's worker threads
    directory = Path(directory)
    manifest = read_manifest(directory)
    for name in ("model.pt", "backbone.pt"):
        if not (directory / name).is_file():
            raise ArtifactError(f"{directory} is incomplete: {name} is missing")
    config = ModelConfig.from_dict(manifest["model"])
    backbone = manifest["backbone"]
    spec = BackboneSpec(
        name=backbone["name"],
        out_indices=tuple(backbone["out_indices"]),
        weights=WeightsSource.FILE,
        weights_file=str(directory / "backbone.pt"),
    )
    try:
        extractor = FeatureExtractor(spec=spec)
    except Exception as error:  # torch.load of a damaged file raises many kinds of errors
        raise ArtifactError(
            f"{directory / 'backbone.pt'} is corrupt or unreadable "
            f"({type(error).__name__}: {error})"
        ) from error
    if extractor.weights_digest != backbone["weights_digest"]:
        raise ArtifactError(
            f"{directory / 'backbone.pt'} does not match the digest in {MANIFEST}; "
            "the artefact is corrupt"
        )
    model = create_fod_model(config, in_channels=backbone["channels"], strides=backbone["strides"])
    try:
        state = torch.load(directory / "model.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as error:
        raise ArtifactError(
            f"{directory / 'model.pt'} is corrupt or does not fit the manifest "
            f"({type(error).__name__}: {error})"
        ) from error
    post = PostProcessing.from_dict(manifest["postprocessing"])
    weights, scales = post.level_weights, post.branch_scales
    if weights is not None and (
        len(weights) != model.n_branches
        or not all(0 <= w <= 1 for w in weights)
        or abs(sum(weights) - 1) > 1e-6
    ):
        raise ArtifactError(
            f"{directory / MANIFEST}: level weights {list(weights)} do not fit a model of "
            f"{model.n_branches} branches (one weight in [0, 1] per branch, summing to 1)"
        )
    if scales is not None and (len(scales) != model.n_branches or min(scales) <= 0):
        raise ArtifactError(
            f"{directory / MANIFEST}: branch scales {list(scales)} do not fit a model of "
            f"{model.n_branches} branches (one positive scale per branch)"
        )
    return AnomalyDetector(
        extractor=extractor,
        model=model,
        pre=PreProcessing.from_dict(manifest["preprocessing"]),
        post=post,
        device=device,
        precision=scoring_precision(manifest, directory, device, precision),
    )


def scoring_precision(
    manifest: dict, directory: Path, device: str | torch.device, requested: Precision | str
) -> Precision:
    """fp32 or bf16 for scoring this model on ``device`` (see ``load_detector``). An explicit
    bf16 is honoured, with a warning where the model's check does not vouch for it."""
    from fod_core.roofline import machine

    requested = Precision(requested)
    if requested is Precision.FP32:
        return requested
    problem = precision_problem(directory, manifest)
    if requested is Precision.AUTO:
        return Precision.BF16 if machine(device).native_bf16 and not problem else Precision.FP32
    if problem:
        log.warning(
            "scoring %s in bf16 although %s: `fod export --model %s --format bf16` checks "
            "its accuracy against fp32 on planted anomalies",
            directory,
            problem,
            directory,
        )
    return requested


def files_digest(paths: Sequence[Path]) -> str:
    """One short digest of several files; "missing" when one of them is not there."""
    if not all(path.is_file() for path in paths):
        return "missing"
    return hashlib.sha256("".join(file_sha256(p) for p in paths).encode()).hexdigest()[:16]


def scoring_fingerprint(model_dir: Path, post: dict, model: dict | None = None) -> dict:
    """What an exported graph or a precision check depends on: the weights, the
    post-processing inside the scoring graph (not the threshold, applied after it) and
    what the retrieval branch compares (``model``, the manifest's section)."""
    baked = {k: post.get(k) for k in ("image_size", "score_sigma", "level_weights")}
    features = (model or {}).get("retrieval_features", "finer")
    if features != "finer":  # earlier fingerprints stay as they were
        baked["retrieval_features"] = features
    if post.get("branch_scales") is not None:
        baked["branch_scales"] = post["branch_scales"]
    if post.get("score_region", "whole") != "whole":  # decides what a precision check flips
        baked["score_region"] = post["score_region"]
    weights = files_digest([model_dir / "model.pt", model_dir / "backbone.pt"])
    return {"weights_digest": weights, "postprocessing": baked}


def precision_problem(model_dir: str | Path, manifest: dict) -> str | None:
    """Why the model's bf16 check does not vouch for scoring it in bf16, or None."""
    check = manifest.get("precision_check", {}).get(Precision.BF16.value)
    if check is None:
        return "its bf16 accuracy was never checked"
    fingerprint = scoring_fingerprint(
        Path(model_dir), manifest["postprocessing"], manifest.get("model")
    )
    if check.get("checked_with") != fingerprint:
        return "its bf16 check was made on other weights or post-processing"
    if not check.get("passed"):
        return f"its bf16 check FAILED ({check.get('failure')})"
    return None
