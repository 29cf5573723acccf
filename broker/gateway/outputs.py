"""Where finished outputs live: a directory (default) or an S3-compatible bucket (boto3).

A long job's writer fills a hidden file beside ``<id>.<ext>`` and renames it when done, so a reader never
mistakes a half-written file for a finished one, and ``GET /v1/jobs/{id}/output`` can follow the hidden file
as it grows.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from broker.errors import ConfigurationError

CHUNK = 64 * 1024


class OutputStore(ABC):
    @abstractmethod
    def put(self, key: str, data: bytes, mime: str) -> None: ...

    @abstractmethod
    def open_iter(self, key: str) -> Iterator[bytes]: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...

    def partial_path(self, key: str) -> Path | None:
        """A local file a running job may write progressively (None: this store has no local files)."""
        return None


class DirectoryOutputs(OutputStore):
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigurationError(f"cannot create the output directory {self.root}: {exc.strerror}") from None

    def _path(self, key: str) -> Path:
        if "/" in key or key.startswith("."):
            raise ValueError(f"bad output key {key!r}")
        return self.root / key

    def put(self, key: str, data: bytes, mime: str) -> None:
        path = self._path(key)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def open_iter(self, key: str) -> Iterator[bytes]:
        with open(self._path(key), "rb") as fh:
            while chunk := fh.read(CHUNK):
                yield chunk

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def partial_path(self, key: str) -> Path | None:
        from broker.longform.writer import in_progress

        return in_progress(self._path(key))


class S3Outputs(OutputStore):
    """Any S3-compatible bucket (AWS, MinIO, R2) through boto3; credentials from boto3's usual chain."""

    def __init__(self, bucket: str, *, prefix: str = "", endpoint_url: str | None = None,
                 client: Any = None) -> None:
        if client is None:
            try:
                import boto3
            except ImportError:
                raise ConfigurationError("gateway.s3_bucket needs: pip install boto3") from None
            client = boto3.client("s3", endpoint_url=endpoint_url)
        self.client = client
        self.bucket = bucket
        self.prefix = prefix

    def put(self, key: str, data: bytes, mime: str) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data, ContentType=mime)

    def open_iter(self, key: str) -> Iterator[bytes]:
        body = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"]
        while chunk := body.read(CHUNK):
            yield chunk

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.prefix + key)
