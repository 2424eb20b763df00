"""Download one partition's images into webdataset shards, safely, and summarize what came back.

img2dataset does the sharding of the input (``Reader``), the resizing (``Resizer``, COYO's recipe
at 512 px by default), the webdataset/parquet writing (``WebDatasetSampleWriter``) and the stats
file (``write_stats``). What it does not do, and a 747M-URL crawl needs, is here:

- Every URL is fetched through ``core/fetch.py``: no private, loopback or link-local address (the
  cloud metadata service), not through redirects nor DNS; cut by time and by size.
- Decompression bombs are refused from the image header, before anything decodes them.
- Content drift: each image's pHash is compared with the crawl's ``image_phash``; the Hamming
  distance is kept (``phash_distance``), and ``drop_drifted`` drops images farther than
  ``drift_distance``.
- Every row gets one of ``STATUSES``; nothing is lost or duplicated.
- A shard is written whole or not at all: it is built in a staging folder (``<output>/_tmp`` on a
  local disk, a local temp folder for S3) and moved into place tar, parquet, then
  ``NNNNN_stats.json`` last. ``_stats.json`` is what img2dataset's incremental mode, the labeler
  and the sensors all take as "done", so a run killed at any point resumes at the first shard
  without one and rewrites it from scratch.

``id`` and ``image_phash`` ride along with every sample so labels join back on COYO's id.
Imports no ``dagster``.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing.pool import ThreadPool
from threading import Semaphore

import polars as pl
import pyarrow as pa

from coyo_platform.core import fetch
from coyo_platform.core.storage import Storage

SUCCESS = "success"
FAILED_TO_RESIZE = "failed_to_resize"
DECOMPRESSION_BOMB = "decompression_bomb"
DRIFTED = "drifted"
#: Every row of a shard's parquet has one of these in ``status``; ``error_message`` says more.
STATUSES = (
    SUCCESS,
    fetch.BLOCKED,  # the URL named a private/loopback/link-local/... address, or not http(s)
    fetch.FAILED,  # HTTP error, DNS, refused, reset, TLS, X-Robots-Tag noai
    fetch.TIMEOUT,  # no complete answer within timeout (per read) or max_seconds (in all)
    fetch.TOO_LARGE,  # more than max_bytes
    fetch.NOT_AN_IMAGE,  # an HTML page, a truncated or undecodable file
    DECOMPRESSION_BOMB,  # more than max_pixels: refused from the header, never decoded
    DRIFTED,  # drop_drifted: the image is not the one the crawl saw
    FAILED_TO_RESIZE,  # img2dataset's filters: too small, aspect ratio too large
)
#: PIL's own decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``): about 9,459 x 9,459.
MAX_PIXELS = 89_478_485


@dataclass
class DownloadSettings:
    """The defaults reproduce COYO's recipe with 512 px images, plus the safety limits."""

    image_size: int = 512
    resize_mode: str = "keep_ratio"
    resize_only_if_bigger: bool = True
    skip_reencode: bool = True
    min_image_size: int = 200
    max_aspect_ratio: float = 3.0
    retries: int = 1
    timeout: int = 10
    number_sample_per_shard: int = 10_000
    processes_count: int = field(default_factory=lambda: os.cpu_count() or 1)
    thread_count: int = 64
    #: Comma-separated networks the downloader may reach although they are not public (tests, a
    #: private mirror), e.g. ``10.20.0.0/16,127.0.0.1``. Empty: public addresses only.
    allow_networks: str = ""
    max_seconds: float = 30.0
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = MAX_PIXELS
    #: pHash Hamming distance (of 64 bits) above which an image counts as changed since the crawl.
    drift_distance: int = 12
    drop_drifted: bool = False

    def __post_init__(self) -> None:
        for name in (
            "image_size",
            "number_sample_per_shard",
            "processes_count",
            "thread_count",
            "timeout",
            "max_bytes",
            "max_pixels",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        if not self.max_seconds > 0:
            raise ValueError(f"max_seconds must be > 0, got {self.max_seconds}")
        if self.max_pixels > 2 * MAX_PIXELS:
            raise ValueError(
                f"max_pixels must be <= {2 * MAX_PIXELS:,} (PIL refuses larger images itself), "
                f"got {self.max_pixels:,}"
            )
        if not 0 <= self.drift_distance <= 64:
            raise ValueError(f"drift_distance must be in [0, 64] (bits), got {self.drift_distance}")
        fetch.parse_networks(self.allow_networks.split(","))

    def fetcher(self) -> fetch.Fetcher:
        return fetch.Fetcher(
            guard=fetch.Guard(fetch.parse_networks(self.allow_networks.split(","))),
            timeout=self.timeout,
            max_seconds=self.max_seconds,
            max_bytes=self.max_bytes,
        )


@dataclass
class DownloadSummary:
    attempted: int
    succeeded: int
    by_status: dict[str, int]
    failed_by_reason: dict[str, int]
    shards: int
    shards_this_run: int
    succeeded_this_run: int
    seconds: float
    bytes_written: int
    compared: int  # images whose pHash could be compared with the crawl's
    drifted: int  # of those, farther than drift_distance
    mean_distance: float | None

    @property
    def images_per_second(self) -> float:
        return self.succeeded_this_run / self.seconds if self.seconds > 0 else 0.0

    @property
    def drift_rate(self) -> float:
        return self.drifted / self.compared if self.compared else 0.0


# img2dataset records the exception text; group those texts into reasons a person can act on.
_REASONS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"HTTP Error (\d{3})"), r"http \1"),
    (re.compile(r"timed out|timeout", re.I), "timeout"),
    (re.compile(r"Connection refused"), "connection refused"),
    (
        re.compile(r"Connection reset|Remote end closed|RemoteDisconnected", re.I),
        "connection reset",
    ),
    (re.compile(r"^dns:|Name or service not known|nodename nor servname|getaddrinfo", re.I), "dns"),
    (re.compile(r"CERTIFICATE|SSL", re.I), "tls"),
    (re.compile(r"Image decoding error"), "not an image"),
    (re.compile(r"X-Robots-Tag"), "disallowed by X-Robots-Tag"),
    (re.compile(r"unknown url type|no host given|^bad url", re.I), "bad url"),
]
_BLOCKED_KIND = re.compile(r"is an? ([\w-]+ address)|(not an http\(s\) URL)|(redirect to a non)")


def failure_reason(status: str, message: str | None) -> str:
    """A short, stable reason for a failed row, e.g. ``download: http 404``, ``blocked: link-local
    address``, ``timeout`` or ``resize: image too small``."""
    text = message or "unknown"
    if status == fetch.BLOCKED:
        hit = _BLOCKED_KIND.search(text)
        kind = (hit.group(1) or hit.group(2) or "redirect to a non-http(s) URL") if hit else "other"
        return f"blocked: {kind}"
    if status in (fetch.TIMEOUT, fetch.TOO_LARGE, fetch.NOT_AN_IMAGE, DECOMPRESSION_BOMB, DRIFTED):
        return status.replace("_", " ")
    stage = "download" if status == fetch.FAILED else "resize"
    for pattern, reason in _REASONS:
        hit = pattern.search(text)
        if hit:
            return f"{stage}: {hit.expand(reason)}"
    # unknown text: drop numbers and addresses so identical failures group together
    text = re.sub(r"0x[0-9a-f]+|\d+", "N", text.lower())
    return f"{stage}: {text[:80]}"


def expected_shards(rows: int, settings: DownloadSettings) -> int:
    return math.ceil(rows / settings.number_sample_per_shard)


def done_shards(storage: Storage, output: str) -> set[str]:
    return set(storage.glob(f"{output}/*_stats.json"))


def hamming(a: str | None, b: str | None) -> int | None:
    """Bits that differ between two 16-hex-digit pHashes; None if either is missing or malformed."""
    try:
        return bin(int(a, 16) ^ int(b, 16)).count("1") if len(a) == 16 == len(b) else None
    except (TypeError, ValueError):
        return None


@dataclass
class Fetched:
    """One row after fetching and inspecting: image bytes, or the status that stopped it."""

    key: int
    data: bytes | None = None
    status: str = SUCCESS
    message: str | None = None
    phash: str | None = None
    distance: int | None = None


def inspect(data: bytes, crawl_phash: str | None, max_pixels: int) -> Fetched:
    """Check the header (refuse bombs before decoding), then decode at reduced size for the pHash.

    JPEGs are decoded through PIL's draft mode (at most 8x smaller, never below 128 px): pHash
    looks at a 32 x 32 grayscale version, and on the demo photos the draft hash equals the full
    one while taking a quarter of the time.
    """
    import imagehash
    from PIL import Image

    _quiet_pil()
    out = Fetched(key=-1, data=data)
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as exc:
        return Fetched(-1, None, DECOMPRESSION_BOMB, f"decompression bomb: {exc}")
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for non-images
        return Fetched(-1, None, fetch.NOT_AN_IMAGE, f"not an image: {type(exc).__name__}")
    with img:
        width, height = img.size
        if width * height > max_pixels:
            return Fetched(
                -1,
                None,
                DECOMPRESSION_BOMB,
                f"decompression bomb: {width} x {height} pixels, more than {max_pixels:,}",
            )
        try:
            with _DECODES:
                img.draft("L", (128, 128))
                out.phash = str(imagehash.phash(img))
        except Exception as exc:  # noqa: BLE001 - truncated or corrupt data
            return Fetched(-1, None, fetch.NOT_AN_IMAGE, f"not an image: {exc}"[:200])
    out.distance = hamming(out.phash, crawl_phash)
    return out


#: Full decodes at once per process: a PNG or WebP (no draft mode) of up to ``max_pixels`` takes
#: about 3 bytes a pixel while hashed; the fetch threads wait here rather than exhaust memory.
_DECODES = threading.BoundedSemaphore(4)


@functools.cache
def _quiet_pil() -> None:
    """PIL warns above its pixel limit; ``max_pixels`` decides here (once per process: warning
    filters are process-wide and not thread-safe to change per call)."""
    from PIL import Image

    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def _die_with_parent(parent: int) -> None:
    """Pool processes end when the downloader dies (SIGKILL included): an orphan left writing
    shards would race the rerun. Linux's PR_SET_PDEATHSIG; elsewhere, nothing."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the line above: too late for it
            os._exit(1)


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

    def __call__(self, row: tuple[int, str]) -> tuple[bool, tuple[int, str], dict[str, int]]:
        try:
            return True, row, self.download_shard(*row)
        except Exception as exc:  # noqa: BLE001 - reported, the shard is retried or left undone
            print(f"shard {row[0]} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return False, row, {}

    def _fetch(self, fetcher: fetch.Fetcher, key: int, url: str, crawl_phash: str | None):
        settings, result = self.settings, None
        for _ in range(settings.retries + 1):
            try:
                data = fetcher.fetch(url)
            except fetch.FetchError as exc:
                result = Fetched(key, None, exc.status, exc.message)
                if exc.transient:
                    continue  # a timeout, a 5xx, a reset; not a 404, a blocked URL, a bad TLS cert
                return result
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

    def download_shard(self, shard_id: int, arrow_file: str) -> dict[str, int]:
        import fsspec

        start = time.time()
        with fsspec.open(arrow_file, "rb") as fh:
            table = pa.ipc.open_file(fh).read_all()
        columns = table.select(self.column_list).to_pydict()
        rows = list(zip(*(columns[c] for c in self.column_list), strict=True))
        url_at, phash_at = self.column_list.index("url"), self.column_list.index("image_phash")
        caption_at = self.column_list.index("caption")
        schema = table.schema
        for name, kind in (
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
        ):
            schema = schema.append(pa.field(name, kind))

        local = _is_local(self.output)
        staging = os.path.join(staging_root(self.output), f"shard-{shard_id}-{uuid.uuid4().hex}")
        os.makedirs(staging, exist_ok=True)
        try:
            counts, reasons = self._write_shard(
                shard_id, rows, schema, staging, url_at, phash_at, caption_at
            )
            stats = {  # img2dataset's _stats.json keys, plus the count of each status
                "count": len(rows),
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
            name = f"{shard_id:0{self.oom_shard_count}d}"
            with open(os.path.join(staging, f"{name}_stats.json"), "w") as fh:
                json.dump(stats, fh, indent=1)
            self._commit(name, staging, local)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return dict(counts)

    def _write_shard(self, shard_id, rows, schema, staging, url_at, phash_at, caption_at):  # noqa: ANN001
        import hashlib

        from img2dataset.downloader import compute_key
        from img2dataset.writer import WebDatasetSampleWriter

        fetcher = self.settings.fetcher()
        writer = WebDatasetSampleWriter(
            shard_id, staging, True, self.oom_shard_count, schema, "jpg"
        )
        counts: Counter[str] = Counter()
        reasons: Counter[str] = Counter()
        in_flight = Semaphore(self.settings.thread_count * 2)  # bounds images held in memory

        stop = threading.Event()

        def todo():
            for key, row in enumerate(rows):
                in_flight.acquire()
                if stop.is_set():
                    return
                yield key, row

        def work(item):  # noqa: ANN001
            key, row = item
            try:
                return self._fetch(fetcher, key, row[url_at], row[phash_at])
            except Exception as exc:  # noqa: BLE001 - one URL's surprise is that row's failure
                return Fetched(key, None, fetch.FAILED, f"{type(exc).__name__}: {exc}"[:200])

        threads = ThreadPool(self.settings.thread_count)
        try:
            for got in threads.imap_unordered(work, todo()):
                try:
                    row = rows[got.key]
                    meta = {name: row[i] for i, name in enumerate(self.column_list)}
                    meta.update(
                        key=compute_key(
                            got.key, shard_id, self.oom_sample_per_shard, self.oom_shard_count
                        ),
                        status=got.status,
                        error_message=got.message,
                        width=None,
                        height=None,
                        original_width=None,
                        original_height=None,
                        sha256=None,
                        phash=got.phash,
                        phash_distance=got.distance,
                    )
                    image = None
                    if got.status == SUCCESS:
                        image, w, h, ow, oh, error = self.resizer(io.BytesIO(got.data))
                        if error is not None:
                            meta.update(status=FAILED_TO_RESIZE, error_message=error)
                            image = None
                        else:
                            meta.update(
                                width=w,
                                height=h,
                                original_width=ow,
                                original_height=oh,
                                sha256=hashlib.sha256(got.data).hexdigest(),
                            )
                    counts[meta["status"]] += 1
                    status = meta["status"]
                    reason = meta["error_message"]
                    reasons[SUCCESS if status == SUCCESS else failure_reason(status, reason)] += 1
                    writer.write(image, meta["key"], row[caption_at], meta)
                finally:
                    in_flight.release()
        except BaseException:
            stop.set()  # unblock the feeder, so the pool can shut down and the error surface
            for _ in range(self.settings.thread_count * 2 + 1):
                in_flight.release()
            raise
        finally:
            threads.terminate()
            threads.join()
        writer.close()
        return counts, reasons

    def _commit(self, name: str, staging: str, local: bool) -> None:
        """Move the shard's files into place, ``_stats.json`` last (the "done" mark)."""
        storage = Storage(self.output)  # S3: its retry settings for throttling and drops
        files = (f"{name}.tar", f"{name}.parquet", f"{name}_stats.json")
        if local:  # on disk before the renames: a power cut cannot leave a done, empty shard
            for file in files:
                with open(os.path.join(staging, file), "rb") as fh:
                    os.fsync(fh.fileno())
        for file in files:
            if local:
                os.replace(os.path.join(staging, file), os.path.join(storage.root, file))
            else:  # an object appears only once its upload completes
                storage.fs.put_file(os.path.join(staging, file), storage.url(file))
        if local:
            folder = os.open(storage.root, os.O_RDONLY)
            try:
                os.fsync(folder)  # the renames themselves
            finally:
                os.close(folder)


def _is_local(output: str) -> bool:
    return "://" not in output


def staging_root(output: str) -> str:
    """Where shards are built before they move into place: ``<output>/_tmp`` on a local disk
    (a rename away), else one local folder per output URL (an upload away)."""
    if _is_local(output):
        return os.path.join(output, "_tmp")
    digest = hashlib.sha1(output.rstrip("/").encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "coyo-staging", digest)


def _clear_staging(output: str) -> None:
    """Remove what a killed run staged (local disk or, for S3, this machine's temp folder)."""
    shutil.rmtree(staging_root(output), ignore_errors=True)


def run_shards(
    metadata_url: str,
    output: str,
    settings: DownloadSettings,
    on_shard: Callable[[int, dict[str, int]], None] | None = None,
) -> list[int]:
    """Download every shard of the part not done yet; returns the shard ids that failed.

    img2dataset's Reader cuts the part into arrow files (in a local temp folder) and skips done
    shards; a spawn pool runs :class:`ShardDownloader` on them, retrying failed shards once.
    """
    import fsspec
    from img2dataset.reader import Reader

    fs, out = fsspec.core.url_to_fs(output)
    fs.makedirs(out, exist_ok=True)
    with _exclusive(output), tempfile.TemporaryDirectory(prefix="coyo-download-") as tmp:
        _clear_staging(output)  # a killed run's staging
        names = (os.path.basename(p).split("_")[0] for p in fs.glob(f"{out}/*_stats.json"))
        done = {int(n) for n in names if n.isdigit()}
        reader = Reader(
            metadata_url,
            "parquet",
            "url",
            "text",
            None,
            None,
            ["id", "image_phash"],
            settings.number_sample_per_shard,
            done,
            tmp,
            0,
        )
        shard = ShardDownloader(output, settings, reader.column_list)
        failed: list[tuple[int, str]] = []
        todo: list = list(reader)
        with ProcessPoolExecutor(
            settings.processes_count,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_die_with_parent,
            initargs=(os.getpid(),),
        ) as pool:
            for _attempt in range(2):  # img2dataset's max_shard_retry=1
                failed = []
                try:
                    for ok, row, counts in pool.map(shard, todo):
                        if ok and on_shard is not None:
                            on_shard(row[0], counts)
                        if not ok:
                            failed.append(row)
                except BrokenProcessPool as exc:  # killed by the OOM killer, or a decoder crash
                    raise RuntimeError(
                        f"a download process died (out of memory? a crashing decoder?) while "
                        f"writing {output}; finished shards are kept, rerun to resume"
                    ) from exc
                if not failed:
                    break
                todo = failed
        _clear_staging(output)
    return sorted(row[0] for row in failed)


@contextlib.contextmanager
def _exclusive(output: str) -> Iterator[None]:
    """One downloader per local output folder at a time (an flock on the folder itself, which
    the kernel drops when the holder dies): a second one, or one left running by a killed
    parent, would commit the same shards. S3 outputs have no such lock; Dagster runs one
    materialization of a partition at a time."""
    if not _is_local(output):
        yield
        return
    folder = os.open(output, os.O_RDONLY)
    try:
        try:
            fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(
                f"another downloader is writing {output}; stop it (or wait) and rerun"
            ) from None
        yield
    finally:
        os.close(folder)


def summarize(
    storage: Storage, output: str, before: set[str], seconds: float, drift_distance: int = 12
) -> DownloadSummary:
    """Count what the finished shards' parquets under ``output`` say (a shard without its
    ``_stats.json`` is not finished and not counted).

    ``before`` is the set of shards done before this run, to tell this run's speed.
    """
    after = done_shards(storage, output)
    names = sorted(os.path.basename(p).removesuffix("_stats.json") for p in after)
    new = {os.path.basename(p).removesuffix("_stats.json") for p in after - before}
    files = [f"{output}/{n}.parquet" for n in names]
    by_status: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    attempted = succeeded_new = compared = drifted = 0
    distance_sum = 0
    for name, path in zip(names, files, strict=True):
        with storage.fs.open(path, "rb") as fh:
            rows = pl.read_parquet(fh)
        if "phash_distance" not in rows.columns:  # written by img2dataset itself (no drift check)
            rows = rows.with_columns(phash_distance=pl.lit(None, pl.Int32))
        attempted += rows.height
        for status, n in rows.group_by("status").len().iter_rows():
            by_status[status] += n
        if name in new:
            succeeded_new += int((rows["status"] == SUCCESS).sum())
        distances = rows["phash_distance"].drop_nulls()
        compared += len(distances)
        drifted += int((distances > drift_distance).sum())
        distance_sum += int(distances.sum() or 0)
        bad = rows.filter(pl.col("status") != SUCCESS).group_by("status", "error_message").len()
        for status, message, n in bad.iter_rows():
            failed[failure_reason(status, message)] += n
    return DownloadSummary(
        attempted=attempted,
        succeeded=by_status.get(SUCCESS, 0),
        by_status=dict(by_status.most_common()),
        failed_by_reason=dict(failed.most_common()),
        shards=len(after),
        shards_this_run=len(new),
        succeeded_this_run=succeeded_new,
        seconds=seconds,
        bytes_written=sum(storage.size(f"{output}/{n}.tar") for n in names),
        compared=compared,
        drifted=drifted,
        mean_distance=distance_sum / compared if compared else None,
    )


def _check_shard_size(
    storage: Storage, done: list[str], rows: int, settings: DownloadSettings
) -> None:
    """Shards already there must have been cut like this run cuts them, or rows would be lost or
    doubled: read the first finished shard's row count."""
    if not done:
        return
    first = done[0]
    shard_id = int(os.path.basename(first).split("_")[0])
    size = settings.number_sample_per_shard
    expected = min(size, rows - shard_id * size)
    count = storage.read_json(first).get("count")
    if count != expected:
        raise ValueError(
            f"{first} holds {count} rows, but number_sample_per_shard={size} makes that shard "
            f"{max(expected, 0)} rows: rerun with the setting the folder was started with, or "
            f"delete {os.path.dirname(first)} to start over"
        )


def download_partition(
    storage: Storage,
    metadata_url: str,
    output: str,
    settings: DownloadSettings,
    on_shard: Callable[[int, dict[str, int]], None] | None = None,
) -> DownloadSummary:
    """Download (or resume) a partition; raise if shards are left unfinished."""
    rows = pl.scan_parquet(metadata_url).select(pl.len()).collect().item()
    before = done_shards(storage, output)
    _check_shard_size(storage, sorted(before), rows, settings)
    start = time.monotonic()
    if len(before) < expected_shards(rows, settings):
        run_shards(metadata_url, output, settings, on_shard)
    _clear_staging(output)  # also what a run killed after its last shard left
    summary = summarize(storage, output, before, time.monotonic() - start, settings.drift_distance)
    missing = expected_shards(rows, settings) - summary.shards
    if missing > 0:
        raise RuntimeError(
            f"{summary.shards} of {expected_shards(rows, settings)} shards finished in {output}; "
            f"{missing} failed. Rerun to resume: finished shards are kept."
        )
    return summary
