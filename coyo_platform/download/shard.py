"""One shard, downloaded and written whole or not at all.

img2dataset does the resizing (``Resizer``, COYO's recipe) and the webdataset/parquet writing
(``WebDatasetSampleWriter``). Around them: every URL goes through the guard (``fetch.py``), every
image through :func:`inspect.inspect`, every row gets one status, and the shard is built in a
staging folder (``<output>/_tmp`` on a local disk, a local temp folder for S3) and moved into
place tar, parquet, then ``NNNNN_stats.json`` last: the file img2dataset's incremental mode, the
label program and the sensors all take as "done". A shard killed at any point is redone from
scratch.

``id`` and ``image_phash`` ride along with every sample so labels join back on COYO's id.
Imports no ``dagster``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import sys
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.pool import ThreadPool
from threading import Semaphore
from typing import Any

import pyarrow as pa

from coyo_platform.common import layout
from coyo_platform.common.storage import Storage
from coyo_platform.download import fetch
from coyo_platform.download.inspect import Fetched, decode_budget, inspect
from coyo_platform.download.settings import DownloadSettings
from coyo_platform.download.statuses import (
    DRIFTED,
    FAILED,
    FAILED_TO_RESIZE,
    NOT_AN_IMAGE,
    SUCCESS,
    TIMEOUT,
)
from coyo_platform.download.statuses import failure_reason as reason_of

#: Columns the shard's parquet adds to the part's own (img2dataset's, plus the pHash check).
SHARD_COLUMNS = (
    ("key", pa.string()),
    ("status", pa.string()),
    ("error_message", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("original_width", pa.int32()),
    ("original_height", pa.int32()),
    ("sha256", pa.string()),
    ("phash", pa.string()),
    ("phash_distance", pa.int32()),
    ("transient", pa.bool_()),  # a failure another try may not meet; False for final ones
)


class Outage(RuntimeError):
    """Too many of a shard's rows failed transiently: the network, not the links. The shard is
    not committed, so a later try (or rerun) downloads it whole."""


def clear_staging(output: str) -> None:
    """Remove what a killed run staged (local disk or, for S3, this machine's temp folder)."""
    shutil.rmtree(layout.staging(output), ignore_errors=True)


#: Timeouts in a row after which a host counts as stalled in a process: its timeouts are not
#: retried at once until it answers again (``ShardDownloader._fetch``).
STALLED_HOST_TIMEOUTS = 2
_TIMEOUTS: Counter[str] = Counter()  # per host, in this process: timeouts since its last answer
_TIMEOUTS_LOCK = threading.Lock()

#: What a pool process reports per shard: (done, the shard's row, its status counts, why not).
Done = tuple[bool, tuple[int, str], dict[str, int], str]


@dataclass
class _OpenShard:
    """A shard being written: its rows, staging folder and writer, and the counts so far."""

    row: tuple[int, str]  # (shard id, its rows' file)
    rows: list[dict[str, Any]]
    staging: str
    writer: Any  # img2dataset's WebDatasetSampleWriter
    start: float
    counts: Counter[str] = field(default_factory=Counter)  # by status
    reasons: Counter[str] = field(default_factory=Counter)
    transient: Counter[str] = field(default_factory=Counter)  # by reason
    pending: int = -1  # rows not written yet

    def __post_init__(self) -> None:
        self.pending = len(self.rows)


class ShardDownloader:
    """Downloads one shard (img2dataset's Reader gives ``(shard_id, arrow_file)``) into place.

    Pickled into each pool process (spawn); holds only plain settings and img2dataset's Resizer.
    """

    def __init__(self, output: str, settings: DownloadSettings, column_list: list[str]) -> None:
        from img2dataset.resizer import Resizer

        self.output = output.rstrip("/")
        self.settings = settings
        self.column_list = column_list
        self.resizer = Resizer(
            image_size=settings.image_size,
            resize_mode=settings.resize_mode,
            resize_only_if_bigger=settings.resize_only_if_bigger,
            upscale_interpolation="lanczos",
            downscale_interpolation="area",
            encode_quality=95,
            encode_format="jpg",
            skip_reencode=settings.skip_reencode,
            disable_all_reencoding=False,
            min_image_size=settings.min_image_size,
            max_image_area=float("inf"),
            max_aspect_ratio=settings.max_aspect_ratio,
        )
        self.oom_shard_count = 5  # img2dataset's default: 00000.tar
        self.oom_sample_per_shard = math.ceil(math.log10(settings.number_sample_per_shard))

    def __call__(self, batch: list[tuple[int, str]]) -> list[Done]:
        """Each shard of ``batch``: (done, row, status counts, why not done)."""
        return self.download_batch(batch)

    def download_batch(self, batch: list[tuple[int, str]]) -> list[Done]:
        """The batch's shards through one pool of fetch threads, pipelined: the next shard's
        rows are fetched as soon as every row of the one before is under way, so no thread waits
        out a shard's slowest fetches (a heavy-tailed web, a stalling host) while rows remain.
        Each shard is still written whole or not at all, and committed as its last row lands."""
        results: dict[int, Done] = {}
        shards: list[_OpenShard] = []
        failed = self._not_done
        try:
            for row in batch:
                try:
                    shards.append(self._open(row))
                except Exception as exc:  # noqa: BLE001 - that shard's failure alone
                    results[row[0]] = failed(row, exc)
            skip: set[int] = set()  # shards that failed while writing: no more fetches
            for shard in shards:  # a shard with no rows is done at once
                if not shard.rows:
                    try:
                        results[shard.row[0]] = self._finish(shard)
                    except Exception as exc:  # noqa: BLE001 - that shard's failure alone
                        results[shard.row[0]] = failed(shard.row, exc)
            with contextlib.closing(self._fetched([s.rows for s in shards], skip)) as fetched:
                for i, got in fetched:
                    shard = shards[i]
                    if shard.row[0] in results:  # failed while writing: drain what is in flight
                        continue
                    try:
                        self._add(shard, got)
                        if shard.pending == 0:
                            results[shard.row[0]] = self._finish(shard)
                    except Exception as exc:  # noqa: BLE001 - reported, retried or left undone
                        results[shard.row[0]] = failed(shard.row, exc)
                        skip.add(i)
        except Exception as exc:  # noqa: BLE001 - the pool itself: every open shard not done
            for shard in shards:
                results.setdefault(shard.row[0], failed(shard.row, exc))
        finally:
            for shard in shards:
                if shard.pending:  # not finished: its tar and parquet are dropped unwritten
                    with contextlib.suppress(Exception):
                        shard.writer.close()
                shutil.rmtree(shard.staging, ignore_errors=True)
        return [results[row[0]] for row in batch]

    @staticmethod
    def _not_done(row: tuple[int, str], exc: BaseException) -> Done:
        why = str(exc) if isinstance(exc, Outage) else f"{type(exc).__name__}: {exc}"
        print(f"shard {row[0]} not done: {why}", file=sys.stderr)
        return False, row, {}, why

    def _open(self, row: tuple[int, str]) -> _OpenShard:
        """A shard's rows, read, and its staging folder and writer, ready for rows."""
        import fsspec

        shard_id, arrow_file = row
        start = time.time()
        with fsspec.open(arrow_file, "rb") as fh:
            table = pa.ipc.open_file(fh).read_all()
        rows = table.select(self.column_list).to_pylist()
        schema = table.schema
        for name, kind in SHARD_COLUMNS:
            schema = schema.append(pa.field(name, kind))
        staging = os.path.join(layout.staging(self.output), f"shard-{shard_id}-{uuid.uuid4().hex}")
        os.makedirs(staging, exist_ok=True)
        return _OpenShard(row, rows, staging, self._writer(shard_id, staging, schema), start)

    def _writer(self, shard_id: int, staging: str, schema: pa.Schema) -> Any:
        """img2dataset's webdataset writer (tar and parquet) for a shard, in ``staging``."""
        from img2dataset.writer import WebDatasetSampleWriter

        return WebDatasetSampleWriter(shard_id, staging, True, self.oom_shard_count, schema, "jpg")

    def _add(self, shard: _OpenShard, got: Fetched, keys: list[str] | None = None) -> None:
        """One fetched row into its shard's tar and parquet (its sample key img2dataset's, from
        its place in the shard, or ``keys``' where given)."""
        row = shard.rows[got.key]
        key = keys[got.key] if keys is not None else None
        image, meta = self._sample(shard.row[0], row, got, key)
        shard.counts[meta["status"]] += 1
        status, message = meta["status"], meta["error_message"]
        reason = SUCCESS if status == SUCCESS else reason_of(status, message)
        shard.reasons[reason] += 1
        if meta["transient"]:
            shard.transient[reason] += 1
        shard.writer.encode_format = extension(image) if self.settings.keep_original else "jpg"
        shard.writer.write(image, meta["key"], row["caption"], meta)
        shard.pending -= 1

    def _finish(self, shard: _OpenShard) -> Done:
        """Close a shard whose every row is written; check it for an outage, and commit it."""
        shard.writer.close()
        name = f"{shard.row[0]:0{self.oom_shard_count}d}"
        self._check_outage(name, len(shard.rows), shard.reasons, shard.transient)
        stats = _stats_file(len(shard.rows), shard.counts, shard.reasons, shard.start)
        with open(os.path.join(shard.staging, name + layout.STATS_DONE), "w") as fh:
            json.dump(stats, fh, indent=1)
        self._commit(name, shard.staging)
        shutil.rmtree(shard.staging, ignore_errors=True)  # now, not when the batch ends
        return True, shard.row, dict(shard.counts), ""

    def _check_outage(
        self, name: str, rows: int, reasons: Counter[str], transient: Counter[str]
    ) -> None:
        """Raise :class:`Outage` when the shard's transient failures pass the share allowed, or
        every row's name failed to resolve (a resolver down)."""
        failed = sum(transient.values())
        dns = sum(n for reason, n in reasons.items() if reason == "download: dns")
        if rows and (failed / rows > self.settings.max_transient_share or dns == rows):
            top = ", ".join(f"{r} {n}" for r, n in transient.most_common(3))
            cause = "every name failed to resolve" if dns == rows else "the network, not the links"
            raise Outage(
                f"shard {name}: {failed} of {rows} rows failed transiently ({top}); likely "
                f"cause: {cause} (a resolver or NAT gateway down, egress throttled)"
            )

    def _write(
        self,
        shard_id: int,
        rows: list[dict[str, Any]],
        schema: pa.Schema,
        staging: str,
        keys: list[str] | None = None,
    ) -> tuple[Counter[str], Counter[str], Counter[str]]:
        """Every row into the staging folder's tar and parquet, as its fetch comes back (its
        sample key img2dataset's, from its place in the shard, or ``keys``' where given)."""
        shard = _OpenShard(
            (shard_id, ""), rows, staging, self._writer(shard_id, staging, schema), 0
        )
        with contextlib.closing(self._fetched([rows])) as fetched:
            for _, got in fetched:
                self._add(shard, got, keys)
        shard.writer.close()
        return shard.counts, shard.reasons, shard.transient

    @contextmanager
    def _pool(self) -> Iterator[tuple[ThreadPool, Semaphore, threading.Event]]:
        threads, size = self.settings.thread_count, self.settings.thread_count * 2
        pool, in_flight, stop = ThreadPool(threads), Semaphore(size), threading.Event()
        try:
            yield pool, in_flight, stop
        except BaseException:
            stop.set()  # unblock the feeder, so the pool can shut down and the error surface
            for _ in range(size + 1):
                in_flight.release()
            raise
        finally:
            pool.terminate()
            pool.join()

    def _fetched(
        self, shards: list[list[dict[str, Any]]], skip: set[int] | None = None
    ) -> Iterator[tuple[int, Fetched]]:
        """Each row's fetch result with the index of its shard in ``shards``, in the order they
        finish; rows are started shard after shard (those of shards in ``skip`` not at all),
        with at most ``2 * thread_count`` images held in memory (a row's slot is freed once its
        result has been written)."""
        fetcher = self.settings.fetcher()

        def work(item: tuple[int, int]) -> tuple[int, Fetched]:
            i, key = item
            row = shards[i][key]
            try:
                return i, self._fetch(fetcher, key, row["url"], row["image_phash"])
            except Exception as exc:  # noqa: BLE001 - one URL's surprise is that row's failure
                return i, Fetched(key, None, FAILED, f"{type(exc).__name__}: {exc}"[:200])

        with self._pool() as (pool, in_flight, stop):

            def todo() -> Iterator[tuple[int, int]]:
                for i, rows in enumerate(shards):
                    for key in range(len(rows)):
                        in_flight.acquire()
                        if stop.is_set():
                            return
                        if skip and i in skip:
                            in_flight.release()
                            continue
                        yield i, key

            for got in pool.imap_unordered(work, todo()):
                try:
                    yield got
                finally:
                    in_flight.release()

    def _fetch(self, fetcher: fetch.Fetcher, key: int, url: str, crawl_phash: str | None):
        """Fetch and inspect one URL, retrying transient failures only. A timeout is not tried
        again at once on a host whose last ``STALLED_HOST_TIMEOUTS`` fetches in this process all
        timed out, until it answers again (a host that stalls would hold a thread for every
        retry); the row stays a transient failure, for ``retry_failed``."""
        settings, result = self.settings, None
        for _ in range(settings.retries + 1):
            try:
                data = fetcher.fetch(url)
            except fetch.FetchError as exc:
                result = Fetched(key, None, exc.status, exc.message, transient=exc.transient)
                if self._stalled(url, exc.status == TIMEOUT):
                    return result
                if exc.transient:
                    continue  # a timeout, a 5xx, a reset; not a 404, a blocked URL, a bad TLS cert
                return result
            self._stalled(url, False)  # it answered
            result = inspect(data, crawl_phash, settings.max_pixels)
            result.key = key
            if settings.drop_drifted and (result.distance or 0) > settings.drift_distance:
                result.status, result.data = DRIFTED, None
                result.message = (
                    f"drifted: pHash {result.phash} is {result.distance} bits from the crawl's "
                    f"{crawl_phash} (more than {settings.drift_distance})"
                )
            return result
        return result

    @staticmethod
    def _stalled(url: str, timed_out: bool) -> bool:
        """Record how a fetch of ``url``'s host ended (a timeout, or anything else: the host or
        the network answered); whether the host has now timed out ``STALLED_HOST_TIMEOUTS``
        times in a row."""
        try:
            host = urllib.parse.urlsplit(url).hostname or ""
        except ValueError:
            host = ""
        with _TIMEOUTS_LOCK:
            if not timed_out:
                _TIMEOUTS.pop(host, None)
                return False
            _TIMEOUTS[host] += 1
            return _TIMEOUTS[host] >= STALLED_HOST_TIMEOUTS

    def _sample(
        self, shard_id: int, row: dict[str, Any], got: Fetched, key: str | None = None
    ) -> tuple[bytes | None, dict[str, Any]]:
        """The resized image (None unless it succeeded) and the row's parquet record."""
        from img2dataset.downloader import compute_key

        if key is None:
            key = compute_key(got.key, shard_id, self.oom_sample_per_shard, self.oom_shard_count)
        meta = {**row, **{name: None for name, _ in SHARD_COLUMNS}}
        meta.update(
            key=key,
            status=got.status,
            error_message=got.message,
            phash=got.phash,
            phash_distance=got.distance,
            transient=got.status != SUCCESS and got.transient,
        )
        if got.status != SUCCESS:
            return None, meta
        pixels = got.size[0] * got.size[1] if got.size else 0
        with decode_budget(self.settings.max_pixels).take(pixels):
            image, w, h, ow, oh, error = self.resizer(io.BytesIO(matted(got.data)))
        if error is not None:
            meta.update(status=FAILED_TO_RESIZE, error_message=error)
            return None, meta
        if got.size is not None and (ow, oh) not in (got.size, got.size[::-1]):
            meta.update(  # Pillow checked one image, OpenCV decoded another: refuse it
                status=NOT_AN_IMAGE,
                error_message=f"not an image: decoders disagree (Pillow {got.size[0]} x "
                f"{got.size[1]}, OpenCV {ow} x {oh})",
            )
            return None, meta
        if self.settings.keep_original:  # the bytes as fetched; the resizer only checked them
            image, w, h = got.data, ow, oh
        meta.update(
            width=w,
            height=h,
            original_width=ow,
            original_height=oh,
            sha256=hashlib.sha256(got.data).hexdigest(),
        )
        return image, meta

    def _commit(self, name: str, staging: str) -> None:
        """Move the shard's files into place, ``_stats.json`` last (the "done" mark)."""
        storage = Storage(self.output)  # S3: its retry settings for throttling and drops
        files = [name + suffix for suffix in _SHARD_SUFFIXES]
        if not storage.is_local:  # an object appears only once its upload completes
            for file in files:
                storage.fs.put_file(os.path.join(staging, file), storage.url(file))
            return
        for (
            file
        ) in files:  # on disk before the renames: a power cut cannot leave a done, empty shard
            with open(os.path.join(staging, file), "rb") as fh:
                os.fsync(fh.fileno())
        for file in files:
            os.replace(os.path.join(staging, file), os.path.join(storage.root, file))
        folder = os.open(storage.root, os.O_RDONLY)
        try:
            os.fsync(folder)  # the renames themselves
        finally:
            os.close(folder)


_SHARD_SUFFIXES = (".tar", ".parquet", layout.STATS_DONE)

#: A stored image's tar extension, by its first bytes (``keep_original``: any allowed format).
_MAGIC = ((b"\x89PNG", "png"), (b"GIF8", "gif"), (b"BM", "bmp"), (b"RIFF", "webp"))


def extension(image: bytes | None) -> str:
    """``jpg`` for JPEGs (and what img2dataset re-encoded), else the original's format."""
    head = (image or b"")[:4]
    return next((ext for magic, ext in _MAGIC if head.startswith(magic)), "jpg")


#: Rows composited at a time by :func:`matted`.
MATTE_ROWS = 256


def matted(data: bytes) -> bytes:
    """An image with an alpha channel composited over white in uint8, a band of rows at a time,
    and handed on as an uncompressed BMP; any other image as it is. img2dataset's resizer does
    the same compositing in float64 over the whole image (6.6 GB for a 9000 x 9000 RGBA PNG);
    this keeps it to the decoded image, the result and a band. The formula is img2dataset's,
    ``rint(a / 255 * rgb + 255 - a)``, in exact integers (its result is never a tie); 16-bit
    images are taken to 8 bits first."""
    import cv2
    import numpy as np

    if not data.startswith((b"\x89PNG", b"RIFF", b"GIF8")):  # the formats that carry alpha
        return data
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None or img.ndim != 3 or img.shape[2] != 4:
        return data
    out = np.empty((*img.shape[:2], 3), np.uint8)
    for top in range(0, img.shape[0], MATTE_ROWS):
        band = img[top : top + MATTE_ROWS]
        if band.dtype == np.uint16:  # to 8 bits a band at a time too
            band = (band >> 8).astype(np.uint8)
        alpha = band[..., 3:4].astype(np.uint32)
        rgb = band[..., :3].astype(np.uint32)
        out[top : top + MATTE_ROWS] = (rgb * alpha + 255 * (255 - alpha) + 127) // 255
    del img
    ok, encoded = cv2.imencode(".bmp", out)
    return encoded.tobytes() if ok else data


def _stats_file(
    rows: int, counts: Counter[str], reasons: Counter[str], start: float
) -> dict[str, Any]:
    """img2dataset's ``_stats.json`` keys, plus the count of each status."""
    return {
        "count": rows,
        "successes": counts.get(SUCCESS, 0),
        "failed_to_download": sum(
            n for s, n in counts.items() if s not in (SUCCESS, FAILED_TO_RESIZE)
        ),
        "failed_to_resize": counts.get(FAILED_TO_RESIZE, 0),
        "duration": time.time() - start,
        "start_time": start,
        "end_time": time.time(),
        "status_dict": dict(reasons.most_common()),
        "statuses": dict(counts.most_common()),
    }
