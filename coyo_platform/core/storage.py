"""One storage root, local folder or ``s3://bucket/prefix``, through fsspec.

Every stage reads and writes below the root with the layout::

    <root>/coyo700m_metadata/<part>.parquet
    <root>/downloaded_shards/<part>/NNNNN.tar|.parquet|_stats.json   (img2dataset's own layout)
    <root>/labeled_shards/<part>/NNNNN.parquet
    <root>/label_stats/<part>.json|.index.parquet|.png
    <root>/subset_plan/plan.json, <root>/subset_plan/<id>/duplicates|class_cutoffs
    <root>/coyo_labeled_300m/<part>.parquet

Writes are atomic for readers: a file is written under a temporary name and then moved into place
(a rename on a local disk; on S3 an object only appears once its upload completes).

S3 credentials come from the standard AWS chain (environment, profile, instance or task role),
never from settings. An S3-compatible store is reached through the standard ``AWS_ENDPOINT_URL``
variable, which s3fs, polars and boto3 all read, or through ``endpoint_url`` here, which this
class hands to fsspec and polars alike and, through ``env()``, to the programs it starts.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from typing import Any

import fsspec
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

METADATA = "coyo700m_metadata"
DOWNLOADS = "downloaded_shards"
LABELS = "labeled_shards"
STATS = "label_stats"
SUBSET = "coyo_labeled_300m"
PLAN = "subset_plan"


class Storage:
    """Paths and atomic writes below one root URL."""

    def __init__(self, root: str, endpoint_url: str | None = None) -> None:
        if "://" not in root:
            root = os.path.abspath(root)
        self.root = root.rstrip("/")
        self.endpoint_url = endpoint_url or None
        self.is_local = "://" not in self.root or self.root.startswith("file://")
        options: dict = {"endpoint_url": self.endpoint_url} if self.endpoint_url else {}
        if not self.is_local:  # sensors list the same root every tick in a long-lived process
            options["use_listings_cache"] = False
        self.fs, _ = fsspec.core.url_to_fs(self.root, **options)

    def env(self) -> dict[str, str]:
        """Environment for a program that reads and writes this root (the endpoint, if set)."""
        return {"AWS_ENDPOINT_URL": self.endpoint_url} if self.endpoint_url else {}

    def scan_parquet(self, urls: str | list[str]) -> pl.LazyFrame:
        """``pl.scan_parquet`` with this root's endpoint."""
        options = {"aws_endpoint_url": self.endpoint_url} if self.endpoint_url else None
        return pl.scan_parquet(urls, storage_options=options)

    def url(self, *parts: str) -> str:
        """The URL of ``parts`` joined below the root."""
        return "/".join([self.root, *(p.strip("/") for p in parts)])

    def exists(self, url: str) -> bool:
        return self.fs.exists(url)

    def glob(self, pattern: str) -> list[str]:
        """Matching URLs, sorted, with the root's protocol kept."""
        found = sorted(self.fs.glob(pattern))
        if self.is_local:
            return found
        protocol = self.root.split("://", 1)[0]
        return [p if "://" in p else f"{protocol}://{p}" for p in found]

    def write_bytes(self, url: str, data: bytes) -> None:
        """Write ``data`` to ``url`` so that a reader sees the old file, or the whole new one."""
        if not self.is_local:
            self.fs.pipe_file(url, data)  # one PUT: the object appears whole or not at all
            return
        os.makedirs(os.path.dirname(url), exist_ok=True)
        tmp = f"{url}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, url)

    def write_parquet(self, url: str, table: pa.Table, **options: Any) -> None:
        """``options`` go to ``pq.write_table`` (default: zstd)."""
        buf = io.BytesIO()
        pq.write_table(table, buf, **{"compression": "zstd", **options})
        self.write_bytes(url, buf.getvalue())

    def write_json(self, url: str, value: Any) -> None:
        self.write_bytes(url, json.dumps(value, indent=1, sort_keys=True).encode())

    def read_json(self, url: str) -> Any:
        with self.fs.open(url, "rb") as fh:
            return json.load(fh)

    def presigned_url(self, url: str, seconds: int) -> str | None:
        """An https address a browser can fetch for ``seconds`` (S3), or None (a local folder)."""
        if self.is_local:
            return None
        return self.fs.sign(url, expiration=seconds)

    def size(self, url: str) -> int:
        return int(self.fs.size(url))


def label_files(storage: Storage, key: str) -> list[str]:
    """The partition's labeled-shard parquets, in shard order."""
    return storage.glob(storage.url(LABELS, key, "*.parquet"))
