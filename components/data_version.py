"""Dataset versioning with DVC, remote in the stack's S3 bucket.

``data.dvc`` (committed) pins the dataset folder's content; its ``.dir`` md5 is the
*data version* every model records. Endpoint and credentials go to DVC's git-ignored
``.dvc/config.local``, never to the committed ``.dvc/config``.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from components.settings import StackSettings

log = logging.getLogger(__name__)

REMOTE_NAME = "storage"


class DataVersionError(RuntimeError):
    """DVC failed (its own message is included) or a .dvc file is not what we expect."""


@dataclass(frozen=True)
class DataVersion:
    md5: str  # the directory's md5, with DVC's '.dir' suffix
    files: int
    size: int

    @property
    def short(self) -> str:
        return self.md5.removesuffix(".dir")[:12]


def remote_url(settings: StackSettings, prefix: str = "dvc") -> str:
    return f"s3://{settings.bucket}/{prefix}"


class DvcRepo:
    """The DVC commands the pipeline needs, run in ``root`` with this environment's DVC."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    def run(self, *args: str, env: dict | None = None, secret: str | None = None) -> str:
        """``dvc ARGS``; ``secret`` (an argument value) never appears in an error message."""
        import os

        result = subprocess.run(
            [sys.executable, "-m", "dvc", *args],
            cwd=self.root,
            capture_output=True,
            text=True,
            env={**os.environ, "DVC_NO_ANALYTICS": "1", **(env or {})},
        )
        if result.returncode != 0:
            shown = " ".join("***" if secret and a == secret else a for a in args)
            stderr = result.stderr.strip().replace(secret, "***") if secret else result.stderr
            raise DataVersionError(f"dvc {shown} failed:\n{stderr.strip()}")
        return result.stdout

    def ensure(self, settings: StackSettings, url: str | None = None) -> None:
        """Initialise DVC if needed and point the default remote at the stack's S3."""
        if not (self.root / ".dvc").is_dir():
            scm = (self.root / ".git").exists()
            self.run("init", *([] if scm else ["--no-scm"]))
        self.run("config", "core.analytics", "false")
        self.run("remote", "add", "--default", "--force", REMOTE_NAME, url or remote_url(settings))
        local = ["remote", "modify", "--local", REMOTE_NAME]
        if settings.s3_endpoint:
            self.run(*local, "endpointurl", settings.s3_endpoint)
        # "--": a generated key may start with "-" and must not be read as an option.
        self.run(*local, "access_key_id", "--", settings.access_key)
        self.run(*local, "secret_access_key", "--", settings.secret_key, secret=settings.secret_key)

    def add_and_push(self, data_dir: str | Path) -> DataVersion:
        """Track the folder (writes ``<folder>.dvc``) and push new content to the remote."""
        data_dir = Path(data_dir).resolve()
        target = data_dir.relative_to(self.root)
        self.run("add", "--quiet", str(target))
        self.run("push", "--quiet", str(target) + ".dvc")
        version = read_data_version(self.root / f"{target}.dvc")
        log.info("data version %s (%d files) pushed", version.short, version.files)
        return version

    def remote_in_sync(self, dvc_file: str | Path) -> bool:
        out = self.run("status", "--cloud", str(dvc_file))
        return "up to date" in out.lower() or not out.strip()


def read_data_version(dvc_file: str | Path) -> DataVersion:
    path = Path(dvc_file)
    if not path.is_file():
        raise DataVersionError(f"{path} not found: track the dataset with `dvc add` first")
    outs = (yaml.safe_load(path.read_text()) or {}).get("outs") or []
    if len(outs) != 1 or not str(outs[0].get("md5", "")).endswith(".dir"):
        raise DataVersionError(f"{path} does not track exactly one directory")
    out = outs[0]
    return DataVersion(
        md5=out["md5"], files=int(out.get("nfiles", 0)), size=int(out.get("size", 0))
    )


def commit_and_push(root: str | Path, dvc_file: str | Path, message: str) -> str:
    """Commit a new data version's ``.dvc`` file and push it to the checkout's origin, where
    the retrain check (which clones the repository) finds it; the commit's sha. A push the
    origin refuses (it moved on) undoes the commit and raises, so that a retry starts clean."""
    root = Path(root).resolve()

    def git(*args: str) -> str:
        result = subprocess.run(
            ["git", "-C", str(root), "-c", "user.name=fod review",
             "-c", "user.email=fod-review@localhost", *args],
            capture_output=True, text=True,
        )  # fmt: skip
        if result.returncode != 0:
            raise DataVersionError(f"git {' '.join(args)} failed:\n{result.stderr.strip()}")
        return result.stdout.strip()

    git("add", str(Path(dvc_file).resolve().relative_to(root)))
    git("commit", "--quiet", "-m", message)
    try:
        git("push", "--quiet", "origin", "HEAD")
    except DataVersionError:
        git("reset", "--soft", "HEAD~1")
        raise
    return git("rev-parse", "HEAD")
