"""Where finished outputs live: a directory (default) or an S3-compatible bucket (boto3).

A long job's writer fills a hidden file beside ``<id>.<ext>`` and renames it when done, so a reader never
mistakes a half-written file for a finished one, and ``GET /v1/jobs/{id}/output`` can follow the hidden file
as it grows.

Every method blocks (disk or network): the gateway calls them from a thread. A missing output is
``FileNotFoundError`` whatever the store, so the API answers 410 for it.
"""

from __future__ import annotations

import contextlib
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from broker.errors import BrokerError, ConfigurationError

CHUNK = 64 * 1024


class OutputStoreError(BrokerError):
    """The output store failed (a job whose output cannot be written fails with this; the API answers 502)."""

    code = "output_store_error"


class OutputStore(ABC):
    @abstractmethod
    def put(self, key: str, data: bytes, mime: str) -> None: ...

    def put_file(self, key: str, path: Path, mime: str) -> None:
        """Store a finished file (a book can be large: stores that can stream it do)."""
        self.put(key, path.read_bytes(), mime)

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
    """Any S3-compatible bucket (AWS, MinIO, R2) through boto3.

    Credentials are the bucket's own keys when given (``gateway.s3_access_key_id``/``s3_secret_access_key``),
    else boto3's usual chain. The secret is handed to boto3 and kept nowhere else here, so no repr, log
    line or error of ours can show it; errors name the bucket, the key and S3's error code only.
    """

    def __init__(self, bucket: str, *, prefix: str = "", endpoint_url: str | None = None,
                 region: str | None = None, access_key_id: str | None = None,
                 secret_access_key: str | None = None, client: Any = None) -> None:
        if client is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError:
                raise ConfigurationError("gateway.s3_bucket needs boto3: pip install 'broker[s3]'") from None
            # A client of its own session: boto3's default session is not safe to share across threads.
            client = boto3.session.Session().client(
                "s3", endpoint_url=endpoint_url, region_name=region, aws_access_key_id=access_key_id,
                aws_secret_access_key=secret_access_key,
                config=Config(connect_timeout=10, read_timeout=60, retries={"max_attempts": 4, "mode": "standard"}))
        self.client = client
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url

    def __repr__(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"S3Outputs(s3://{self.bucket}/{self.prefix}{where})"

    def put(self, key: str, data: bytes, mime: str) -> None:
        with self._errors("store", key):
            self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data, ContentType=mime)

    def put_file(self, key: str, path: Path, mime: str) -> None:
        with self._errors("store", key):  # multipart for large files, never all in memory
            self.client.upload_file(str(path), self.bucket, self.prefix + key, ExtraArgs={"ContentType": mime})

    def open_iter(self, key: str) -> Iterator[bytes]:
        with self._errors("read", key):
            body = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"]
        try:
            while chunk := body.read(CHUNK):
                yield chunk
        finally:
            body.close()

    def delete(self, key: str) -> None:
        with self._errors("delete", key):
            self.client.delete_object(Bucket=self.bucket, Key=self.prefix + key)

    @contextlib.contextmanager
    def _errors(self, doing: str, key: str) -> Iterator[None]:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        where = f"s3://{self.bucket}/{self.prefix}{key}"
        try:
            yield
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", "")) or "error"
            if doing == "read" and code in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(where) from None  # deleted, or expired by a lifecycle rule
            raise OutputStoreError(f"could not {doing} {where}: S3 said {code}") from None
        except (BotoCoreError, Boto3Error, OSError) as exc:  # unreachable, no credentials, timeouts, uploads
            raise OutputStoreError(f"could not {doing} {where}: {type(exc).__name__}") from None
