"""S3 access for the pipeline: the feature cache store and DVC-versioned datasets.

DVC keeps a directory version as a ``.dir`` object (a JSON list of ``{md5, relpath}``)
plus one object per file, under ``files/md5/<2 hex>/<rest>`` in the remote. Reading that
layout directly lets a pipeline pod fetch an exact data version with S3 credentials
alone: no git checkout, no DVC repository in the container.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlparse

from components.settings import StackSettings

log = logging.getLogger(__name__)


class StorageError(RuntimeError):
    """S3 is unreachable, refuses the credentials, or lacks an object we need."""


def _describe(error: Exception, endpoint: str | None) -> str:
    where = endpoint or "AWS S3"
    text = str(error)
    if "Could not connect" in text or "Connect timeout" in text or "EndpointConnection" in text:
        return f"S3 at {where} is unreachable ({text}); is the stack up? (`fod stack status`)"
    refusals = ("SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied", "(403)")
    if any(refusal in text for refusal in refusals):
        return f"S3 at {where} refused the credentials (or they give no access): {text}"
    return f"S3 error at {where}: {text}"


def split_s3_url(url: str) -> tuple[str, str]:
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an s3:// URL: {url!r}")
    return parsed.netloc, parsed.path.strip("/")


def ensure_bucket(settings: StackSettings) -> bool:
    """Create the settings' bucket where it is missing (a cluster's first start: MLflow's
    artifacts and DVC's remote live in it). True when it was created."""
    from botocore.exceptions import BotoCoreError, ClientError

    client = settings.s3_client()
    try:
        client.head_bucket(Bucket=settings.bucket)
        return False
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
            raise StorageError(_describe(error, settings.s3_endpoint)) from error
    except BotoCoreError as error:
        raise StorageError(_describe(error, settings.s3_endpoint)) from error
    try:
        client.create_bucket(Bucket=settings.bucket)
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") not in (
            "BucketAlreadyOwnedByYou",
            "BucketAlreadyExists",
        ):
            raise StorageError(_describe(error, settings.s3_endpoint)) from error
        return False
    log.info("created bucket %s at %s", settings.bucket, settings.s3_endpoint or "AWS S3")
    return True


class S3Store:
    """Key -> bytes in a bucket prefix; the feature cache's store in the pipeline."""

    def __init__(self, settings: StackSettings, prefix: str) -> None:
        self.settings = settings
        self.bucket = settings.bucket
        self.prefix = prefix.strip("/")
        self.client = settings.s3_client()

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def get(self, key: str) -> bytes | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return response["Body"].read()
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise StorageError(_describe(error, self.settings.s3_endpoint)) from error
        except BotoCoreError as error:
            raise StorageError(_describe(error, self.settings.s3_endpoint)) from error

    def put(self, key: str, data: bytes) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except (BotoCoreError, ClientError) as error:
            raise StorageError(_describe(error, self.settings.s3_endpoint)) from error

    def delete(self, key: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except (BotoCoreError, ClientError) as error:
            raise StorageError(_describe(error, self.settings.s3_endpoint)) from error

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def check(self) -> None:
        """Fail early, with a readable message, when S3 cannot be used."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as error:
            raise StorageError(_describe(error, self.settings.s3_endpoint)) from error


def fetch_dvc_directory(
    settings: StackSettings, remote_url: str, dir_md5: str, dest: str | Path
) -> int:
    """Download one DVC directory version (``<md5>.dir``) from an S3 remote into ``dest``.

    Returns the number of files. Files already present with the right content are kept.
    """
    import hashlib

    bucket, prefix = split_s3_url(remote_url)
    store = S3Store(replace(settings, bucket=bucket), f"{prefix}/files/md5")
    store.check()
    if not dir_md5.endswith(".dir"):
        dir_md5 += ".dir"
    listing_blob = store.get(f"{dir_md5[:2]}/{dir_md5[2:]}")
    if listing_blob is None:
        raise StorageError(
            f"data version {dir_md5} is not in the DVC remote {remote_url}: was it pushed "
            "(`dvc push`)?"
        )
    entries = json.loads(listing_blob)
    dest = Path(dest)

    def fetch(entry: dict) -> None:
        target = dest / entry["relpath"]
        if target.is_file() and hashlib.md5(target.read_bytes()).hexdigest() == entry["md5"]:
            return
        blob = store.get(f"{entry['md5'][:2]}/{entry['md5'][2:]}")
        if blob is None:
            raise StorageError(f"{entry['relpath']} ({entry['md5']}) missing from {remote_url}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(blob)

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(fetch, entries))
    log.info("fetched data version %s: %d files into %s", dir_md5, len(entries), dest)
    return len(entries)
