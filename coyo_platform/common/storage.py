"""One storage root, local folder or ``s3://bucket/prefix``, through fsspec. Where each stage's
files go below the root is ``common/layout.py``'s business; this module reads and writes.

Writes are atomic for readers: a file is written under a temporary name and then moved into place
(a rename on a local disk; on S3 an object only appears once its upload completes). So "done" can
be read off a file's existence (a labeled shard's parquet, a downloaded shard's ``_stats.json``):
a write cut short leaves nothing at the name. On a local disk a killed process can leave its
``<name>.tmp-<hex>`` behind, under a name no reader looks for; the next write of that name
deletes it (``remove_stale_temp``), so a rerun leaves none.
On S3 there is nothing to clean: a PUT that does not complete leaves no object (and a failed
multipart upload is aborted by s3fs).

S3 faults are retried with exponential backoff, by settings pinned here (``S3_*`` and
``POLARS_RETRY_OPTIONS`` below) rather than by whatever the installed libraries default to:

* s3fs (writes, listings, small reads, everything on ``Storage.fs``): botocore's ``standard``
  retry mode retries throttling codes (``SlowDown``, ``ThrottlingException``,
  ``TooManyRequestsException``, ...), HTTP 500/502/503/504 and dropped, reset, refused or
  timed-out connections (a server gone mid-upload: the PUT's body is sent again whole), sleeping
  ``rand(0, 1) * min(2 ** attempt, 20)`` s between attempts; its retry quota stops retrying for a
  while when most requests fail. A bare HTTP 429 without one of those codes (a HEAD's reply has no
  body) is not retried; S3 itself throttles with 503 ``SlowDown``. Around each call s3fs has its
  own loop (``S3FS_RETRIES`` rounds, ``0.1 * 1.7 ** i`` s apart) for what outlasts botocore's
  attempts: a ``SlowDown``, a connection closed before the reply, a timeout, and a GET body cut
  mid-stream, which botocore cannot see (not a reset while sending, a refused connection or a
  HEAD's bare 503: those are botocore's alone). A call failing for good so makes up to
  ``S3_MAX_ATTEMPTS * S3FS_RETRIES`` attempts, about 2 minutes of backoff, then raises:
  ``OSError`` (EBUSY) for throttling, botocore's ``ConnectionClosedError`` or
  ``EndpointConnectionError`` (naming the URL) for a server that is gone. aiohttp may also resend
  an idempotent request (GET, PUT) once, at once, when a reused keep-alive connection drops.
* polars (``scan_parquet``): object_store's own loop retries 5xx, 429 and connection errors with
  exponential backoff, configured through ``storage_options``; after a connection error polars
  also rebuilds its client and tries once more.

A write that finally fails has left nothing at its name.

S3 credentials come from the standard AWS chain (environment, profile, instance or task role),
never from settings. An S3-compatible store is reached through the standard ``AWS_ENDPOINT_URL``
variable, which s3fs, polars and boto3 all read, or through ``endpoint_url`` here, which this
class hands to fsspec and polars alike and, through ``env()``, to the programs it starts.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import json
import os
import re
import tempfile
import uuid
from collections.abc import Callable
from typing import Any

import fsspec
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

TEMP_MARK = ".tmp-"  # a local write's temporary name: <name>.tmp-<hex>

#: botocore's retry policy for every s3fs call: the AWS SDKs' common one (see the module docstring).
S3_RETRY_MODE = "standard"
#: Attempts per S3 request, the first included: 7 sleeps of rand(0, 1) * 1, 2, 4, 8, 16, 20, 20 s,
#: about 35 s in all (71 s at most), to ride out a throttling burst or a store restarting.
S3_MAX_ATTEMPTS = 8
#: Rounds of s3fs's own loop around each call (its default is 5): 3 keeps a dead store's failure
#: to about 2 minutes, and still retries GET bodies cut mid-stream, which botocore cannot.
S3FS_RETRIES = 3
#: Connections per S3 client (botocore's default is 10): ``shards.TODO_THREADS`` at once.
S3_CONNECTIONS = 16
#: polars' (object_store's) retries for ``scan_parquet``, the same order of patience: up to 10
#: retries, 250 ms growing to 15 s apart, within 2 minutes.
POLARS_RETRY_OPTIONS = {
    "max_retries": 10,
    "retry_init_backoff_ms": 250,
    "retry_max_backoff_ms": 15_000,
    "retry_base_multiplier": 2,
    "retry_timeout_ms": 120_000,
}


_WILDCARDS = re.compile(r"[*?\[]")


def is_local(url: str) -> bool:
    """Whether ``url`` names a place on this machine's disk: a plain path or ``file://``."""
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    """The plain path of a local ``url`` (``file:///a/b`` -> ``/a/b``)."""
    return url.removeprefix("file://")


class Storage:
    """Paths and atomic writes below one root URL."""

    def __init__(self, root: str, endpoint_url: str | None = None) -> None:
        if is_local(root):  # one spelling for a local root: an absolute plain path
            root = os.path.abspath(local_path(root))
        self.root = root.rstrip("/")
        self.endpoint_url = endpoint_url or None
        self.is_local = is_local(self.root)
        options: dict = {"endpoint_url": self.endpoint_url} if self.endpoint_url else {}
        s3 = self.root.startswith(("s3://", "s3a://"))  # the options below are s3fs's
        if s3:  # sensors list the same root every tick in a long-lived process
            options["use_listings_cache"] = False
            # total_max_attempts counts the first request; botocore's max_attempts would not
            retries = {"mode": S3_RETRY_MODE, "total_max_attempts": S3_MAX_ATTEMPTS}
            # botocore's pool is 10 connections: the sensor's tick reads 16 partitions at once
            options["config_kwargs"] = {"retries": retries, "max_pool_connections": S3_CONNECTIONS}
        self.fs, _ = fsspec.core.url_to_fs(self.root, **options)
        if s3:  # not a constructor argument; instances with these options share it
            self.fs.retries = S3FS_RETRIES

    def env(self) -> dict[str, str]:
        """Environment for a program that reads and writes this root (the endpoint, if set)."""
        return {"AWS_ENDPOINT_URL": self.endpoint_url} if self.endpoint_url else {}

    def scan_parquet(self, urls: str | list[str], **kwargs: Any) -> pl.LazyFrame:
        """``pl.scan_parquet`` with this root's endpoint and retry settings (``kwargs``: its
        other options)."""
        options: dict[str, Any] = dict(POLARS_RETRY_OPTIONS)
        if self.endpoint_url:
            options["aws_endpoint_url"] = self.endpoint_url
        return pl.scan_parquet(urls, storage_options=options, **kwargs)

    def url(self, *parts: str) -> str:
        """The URL of ``parts`` joined below the root."""
        return "/".join([self.root, *(p.strip("/") for p in parts)])

    def exists(self, url: str) -> bool:
        return self.fs.exists(url)

    def glob(self, pattern: str) -> list[str]:
        """Matching URLs, sorted, with the root's protocol kept. A pattern whose wildcards are
        all in its last part (``<folder>/*_stats.json``) is one listing of the folder, filtered
        here: on S3, one LIST a 1,000 names, where fsspec's glob made a HEAD and three LISTs
        for a folder of a few files (``benchmarks/scale.py``). A folder that is not there
        matches nothing."""
        folder, _, name = pattern.rpartition("/")
        if (
            folder
            and not _WILDCARDS.search(folder)
            and _WILDCARDS.search(name)
            and "**" not in name
        ):
            try:
                listed = self.fs.ls(folder, detail=False)
            except FileNotFoundError:
                listed = []
            below = self.fs._strip_protocol(folder).rstrip("/") + "/"  # not the folder itself,
            found = sorted(  # nor a file of that name (ls lists a file as itself)
                p
                for p in listed
                if p.startswith(below)
                and fnmatch.fnmatchcase(p.rstrip("/").rsplit("/", 1)[-1], name)
            )
        else:
            found = sorted(self.fs.glob(pattern))
        return self._with_protocol(found)

    def find(self, folder: str) -> list[str]:
        """Every file below ``folder`` (none where it is not there), sorted, as :meth:`glob`
        gives them."""
        return self._with_protocol(sorted(self.fs.find(folder)))

    def _with_protocol(self, paths: list[str]) -> list[str]:
        """fsspec's paths as this root spells them (its protocol kept)."""
        if self.is_local:
            return paths
        protocol = self.root.split("://", 1)[0]
        return [p if "://" in p else f"{protocol}://{p}" for p in paths]

    def write_bytes(self, url: str, data: bytes) -> None:
        """Write ``data`` to ``url`` so that a reader sees the old file, or the whole new one."""
        if not self.is_local:
            self.fs.pipe_file(url, data)  # one PUT: the object appears whole or not at all
            return

        def fill(path: str) -> None:
            with open(path, "wb") as fh:
                fh.write(data)

        self.write_file(url, fill)

    def write_file(self, url: str, fill: Callable[[str], object]) -> None:
        """Write ``url`` from a local file that ``fill(path)`` writes (an engine that writes files
        itself, such as DuckDB's ``COPY``), as whole as :meth:`write_bytes`: on disk a temp
        name beside it, renamed once synced; on S3 one upload of a local temp file."""
        if not self.is_local:
            with tempfile.TemporaryDirectory(prefix="coyo-upload-") as folder:
                path = os.path.join(folder, os.path.basename(url))
                fill(path)
                self.fs.put_file(path, url)
            return
        os.makedirs(os.path.dirname(url), exist_ok=True)
        self.remove_stale_temp(url)  # what a process killed while writing this file left
        tmp = f"{url}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex}"  # the pid: see remove_stale_temp
        try:
            fill(tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, url)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def remove_stale_temp(self, prefix_url: str) -> int:
        """Delete the ``<prefix_url>.tmp-*`` files that writes killed midway left (``prefix_url``
        may hold glob wildcards: ``url(folder, "*")`` cleans a folder); returns how many. Only
        for temp files whose writing process is gone (the pid in the name). On S3 there are none: a
        no-op that returns 0."""
        if not self.is_local:
            return 0
        stale = [
            path
            for path in self.fs.glob(f"{prefix_url}{TEMP_MARK}*")
            if not _writer_alive(path.rsplit(TEMP_MARK, 1)[1])
        ]
        for path in stale:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        return len(stale)

    def write_parquet(self, url: str, table: pa.Table, **options: Any) -> None:
        """``options`` go to ``pq.write_table`` (default: zstd)."""
        buf = io.BytesIO()
        pq.write_table(table, buf, **{"compression": "zstd", **options})
        self.write_bytes(url, buf.getvalue())

    def write_json(self, url: str, value: Any, compact: bool = False) -> None:
        """``value`` as JSON, keys sorted; indented, or ``compact`` for files of many counts
        (json's C encoder: indenting runs the pure-Python one, 0.19 s against 0.09 s for a
        1M-row chunk's label stats on the 2-core Xeon)."""
        text = (
            json.dumps(value, sort_keys=True, separators=(",", ":"))
            if compact
            else json.dumps(value, indent=1, sort_keys=True)
        )
        self.write_bytes(url, text.encode())

    def read_json(self, url: str) -> Any:
        """The JSON at ``url``: one GET on S3 (opening the file first asked its size, a HEAD,
        and for a file not there a LIST too; s3fs's ``cat_file`` asks the size too unless it
        reads in one piece)."""
        options = {} if self.is_local else {"max_concurrency": 1}
        return json.loads(self.fs.cat_file(url, **options))

    def parquet_metadata(self, url: str) -> tuple[int, dict[str, str]]:
        """A parquet file's row count and key-value metadata, from its footer alone."""
        with self.fs.open(url, "rb") as fh:
            meta = pq.ParquetFile(fh).metadata
        pairs = {k.decode(): v.decode() for k, v in (meta.metadata or {}).items()}
        return meta.num_rows, pairs

    def read_json_if_exists(self, url: str) -> Any | None:
        """The JSON at ``url``, or None where there is none (one request, not two)."""
        try:
            return self.read_json(url)
        except FileNotFoundError:
            return None

    def remove(self, url: str) -> bool:
        """Delete a file or a folder (with what it holds); whether there was one."""
        if not self.exists(url):
            return False
        self.fs.rm(url, recursive=True)
        return True

    def presigned_url(self, url: str, seconds: int) -> str | None:
        """An https address a browser can fetch for ``seconds`` (S3), or None (a local folder)."""
        if self.is_local:
            return None
        return self.fs.sign(url, expiration=seconds)

    def size(self, url: str) -> int:
        return int(self.fs.size(url))


def _writer_alive(suffix: str) -> bool:
    """Whether the process that named a temp file ``<url>.tmp-<pid>-<hex>`` still runs (on this
    machine): its file is then a write in progress, not a leftover."""
    pid = suffix.split("-", 1)[0]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
