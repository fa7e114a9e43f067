"""A trained model kept until the training step has tracked it: when S3 or MLflow fails after
the epochs, a rerun of the pipeline uploads the kept model instead of training again.

Kept under ``<FOD_HOME>/kept-models/<key>/`` (``FOD_KEPT_MODELS`` to choose the folder: in
a cluster, a volume that outlives the pod; without either, a temporary folder), with a copy
in the bucket when S3 answers, so a pod that failed on MLflow leaves it where the next pod
finds it. The key hashes everything
that decides the training (category, data and code versions, model and training settings,
warm start): other settings train anew. Each file's SHA-256 is kept beside it; a damaged
kept model is removed and trained again, never used. The trainer's per-epoch checkpoint
lives there too, so a step killed mid-training resumes at its last epoch.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from components.settings import fod_home
from components.storage import S3Store, StorageError
from fod_core.cache import file_sha256

log = logging.getLogger(__name__)

KEPT_FORMAT = 1
INDEX = "kept.json"
S3_FOLDER = "kept-models"


def training_key(identity: dict) -> str:
    """The kept model's name: a digest of everything that decides the training."""
    text = json.dumps({"format": KEPT_FORMAT, **identity}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def kept_root() -> Path:
    """FOD_KEPT_MODELS; else the local stack's home (FOD_HOME, set for local runs); else a
    temporary folder (a pod without a volume: the bucket's copy is what outlives it)."""
    if os.environ.get("FOD_KEPT_MODELS"):
        return Path(os.environ["FOD_KEPT_MODELS"])
    if os.environ.get("FOD_HOME"):
        return fod_home() / "kept-models"
    return Path(tempfile.gettempdir()) / "fod-kept-models"


class KeptModels:
    """Trained models waiting for their upload, by training key."""

    def __init__(self, root: Path | None = None, store: S3Store | None = None) -> None:
        self.root = Path(root) if root else kept_root()
        self.store = store  # the bucket's copy; None: this folder only

    def folder(self, key: str) -> Path:
        return self.root / key

    def checkpoints(self, key: str) -> Path:
        return self.folder(key) / "checkpoints"

    def keep(self, key: str, model_dir: Path) -> Path:
        """Copy the trained artefact (not its checkpoints) here, then into the bucket; the
        epoch checkpoint is dropped: the model it led to is kept."""
        kept = self.folder(key) / "model"
        staging = self.folder(key) / ".model-staging"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(model_dir, staging, ignore=shutil.ignore_patterns("checkpoints"))
        files = {
            str(path.relative_to(staging)): file_sha256(path)
            for path in sorted(staging.rglob("*"))
            if path.is_file()
        }
        index = {"kept_at": datetime.now(UTC).isoformat(timespec="seconds"), "files": files}
        (staging / INDEX).write_text(json.dumps(index, indent=2))
        shutil.rmtree(kept, ignore_errors=True)
        staging.replace(kept)  # whole or not at all
        shutil.rmtree(self.checkpoints(key), ignore_errors=True)
        log.info("trained model kept at %s until it is tracked", kept)
        if self.store is not None:
            try:
                self.store.put(f"{S3_FOLDER}/{key}.tar", _tar(kept))
            except StorageError as error:  # S3 may be the outage: the local copy stays
                log.warning("could not copy the kept model to S3 (%s); kept at %s", error, kept)
        return kept

    def restore(self, key: str, dest: Path) -> dict | None:
        """Copy the kept model for ``key`` into ``dest``; its index (when it was kept, and
        from where), or None when there is none or it is damaged (then removed)."""
        kept = self.folder(key) / "model"
        where = str(kept)
        if not (kept / INDEX).is_file() and self.store is not None:
            blob = self._fetch(key)
            if blob is not None:
                _untar(blob, kept)
                where = self.store.url(f"{S3_FOLDER}/{key}.tar")
        if not (kept / INDEX).is_file():
            return None
        problem = _damage(kept)
        if problem:
            log.warning("kept model at %s is damaged (%s): training again", where, problem)
            self.discard(key)
            return None
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        for path in kept.iterdir():
            if path.name == INDEX:
                continue
            target = dest / path.name
            if path.is_dir():
                shutil.copytree(path, target, dirs_exist_ok=True)
            else:
                shutil.copy2(path, target)
        return json.loads((kept / INDEX).read_text()) | {"from": where}

    def discard(self, key: str) -> None:
        """Forget the kept model once it is tracked (or found damaged)."""
        shutil.rmtree(self.folder(key), ignore_errors=True)
        if self.store is not None:
            try:
                self.store.delete(f"{S3_FOLDER}/{key}.tar")
            except StorageError as error:
                log.warning("could not remove the kept model's copy in S3 (%s)", error)

    def _fetch(self, key: str) -> bytes | None:
        try:
            return self.store.get(f"{S3_FOLDER}/{key}.tar")
        except StorageError as error:
            log.warning("could not look for a kept model in S3 (%s)", error)
            return None


def _damage(kept: Path) -> str | None:
    """What is wrong with a kept model's files, or None when each matches its digest."""
    try:
        files = json.loads((kept / INDEX).read_text())["files"]
    except (OSError, ValueError, KeyError) as error:
        return f"{INDEX} unreadable: {error}"
    for name, digest in files.items():
        path = kept / name
        if not path.is_file():
            return f"{name} is missing"
        if file_sha256(path) != digest:
            return f"{name} does not match its SHA-256 (truncated or changed)"
    return None


def _tar(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        archive.add(folder, arcname=".")
    return buffer.getvalue()


def _untar(blob: bytes, dest: Path) -> None:
    staging = dest.parent / f".download-{time.monotonic_ns()}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(fileobj=io.BytesIO(blob)) as archive:
            archive.extractall(staging, filter="data")
    except (tarfile.TarError, OSError) as error:
        log.warning("the kept model's copy in S3 is unreadable (%s): training again", error)
        shutil.rmtree(staging, ignore_errors=True)
        return
    shutil.rmtree(dest, ignore_errors=True)
    staging.replace(dest)
