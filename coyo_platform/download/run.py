"""Download (or resume) one partition: the shards not done yet, in a pool of processes, one
download per output folder at a time; a summary of every finished shard at the end.

img2dataset's ``Reader`` cuts the part into arrow files (in a local temp folder) and skips done
shards; a spawn pool runs :class:`shard.ShardDownloader` on them, retrying failed shards once
(img2dataset's ``max_shard_retry``). Imports no ``dagster``.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import math
import multiprocessing
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import polars as pl

from coyo_platform.common import provenance, shards
from coyo_platform.common.storage import Storage, is_local
from coyo_platform.download import fingerprint, recover
from coyo_platform.download.settings import DownloadSettings
from coyo_platform.download.shard import ShardDownloader, clear_staging
from coyo_platform.download.statuses import BLOCKED
from coyo_platform.download.summary import DownloadSummary, summarize
from coyo_platform.ingest import dedup

OnShard = Callable[[int, dict[str, int]], None]


@dataclass
class Recovery:
    """What ``retry_failed`` did this run: rows fetched again, of them now images
    (``recovered``) or failed to resolve again (``dns``), and the shards rewritten."""

    retried: int = 0
    recovered: int = 0
    dns: int = 0
    shards_revised: int = 0

    def add(self, counts: dict[str, int]) -> None:
        self.retried += counts["retried"]
        self.recovered += counts["recovered"]
        self.dns += counts["dns"]
        self.shards_revised += bool(counts["revision"])


def _pool_process(parent: int, max_pixels: int) -> None:
    """A pool process: OpenCV's own pixel limit set to ``max_pixels`` (it reads
    ``OPENCV_IO_MAX_IMAGE_PIXELS`` at its first decode), so that it refuses what Pillow's header
    check would; and it dies with the download program."""
    os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(max_pixels)
    _large_blocks_to_the_system()
    without_torch()
    _die_with_parent(parent)


def without_torch() -> None:
    """img2dataset's package imports webdataset, which imports torch if it can (500 MB of
    memory and a second of start-up in every download process) and works without it: a
    download never uses it. For the download program and its pool processes only, which do
    nothing else; before img2dataset is first imported."""
    sys.modules.setdefault("torch", None)  # type: ignore[arg-type] # import torch: not found


#: glibc's ``mallopt`` parameter, and the size from which a block is its own mapping here.
_M_MMAP_THRESHOLD, MMAP_THRESHOLD = -3, 1 << 20


def _large_blocks_to_the_system() -> None:
    """Blocks of 1 MiB and more (decoded images, Pillow's 16 MiB image blocks, fetched bodies)
    get a mapping of their own, returned to the system when freed. By default glibc raises this
    threshold up to 32 MiB as large blocks are freed, and then serves them from per-thread
    arenas, which keep what they freed: a process's memory then grew with its thread count
    (16 threads on 16-megapixel PNGs: 530 MB above its footprint, against 156 MB for one
    thread)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def _die_with_parent(parent: int) -> None:
    """Pool processes end when the download program dies (SIGKILL included): an orphan left writing
    shards would race the rerun. Linux's PR_SET_PDEATHSIG; elsewhere, nothing."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the line above: too late for it
            os._exit(1)


@contextlib.contextmanager
def _exclusive(output: str) -> Iterator[None]:
    """One download program per local output folder at a time (an flock on the folder itself, which
    the kernel drops when the holder dies): a second one, or one left running by a killed
    parent, would commit the same shards. S3 outputs have no such lock; Dagster runs one
    materialization of a partition at a time."""
    if not is_local(output):
        yield
        return
    folder = os.open(output, os.O_RDONLY)
    try:
        try:
            fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(
                f"another download program is writing {output}; stop it (or wait) and rerun"
            ) from None
        yield
    finally:
        os.close(folder)


def _metadata_store(metadata_url: str) -> Storage:
    """The part's folder (the endpoint, if any, from ``AWS_ENDPOINT_URL``, as the compute seam
    passes it)."""
    return Storage(metadata_url.rsplit("/", 1)[0])


def run_shards(
    metadata_url: str, output: str, settings: DownloadSettings, on_shard: OnShard | None = None
) -> tuple[dict[int, str], Recovery]:
    """Download every shard of the part not done yet, then (``retry_failed``) recover the
    finished ones; returns the shards that failed, with why, and what the recovery did. The
    folder's fingerprint is checked (or, in a new folder, recorded) under the folder's lock."""
    from img2dataset.reader import Reader

    store = Storage(output)
    output = store.root
    store.fs.makedirs(output, exist_ok=True)
    with _exclusive(output), tempfile.TemporaryDirectory(prefix="coyo-download-") as tmp:
        wanted = fingerprint.current(_metadata_store(metadata_url), metadata_url, settings)
        fingerprint.check_or_record(store, output, wanted)
        clear_staging(output)  # a killed run's staging
        if recover.finish_interrupted(store, output):  # rewrites cut short after their parquet
            _record_revisions(store, output)
        done = {int(s) for s in shards.finished(store, store.root) if s.isdigit()}
        rows_url = metadata_url
        if settings.dedup_crawl_phash:
            rows_url = _deduplicated(metadata_url, store, bool(done), tmp)
        reader = Reader(
            rows_url,
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
        failed = _run_pool(shard, list(reader), settings, output, on_shard)
        recovery = Recovery()
        if settings.retry_failed and not failed:
            failed = _recover(store, output, settings, recovery, on_shard)
        clear_staging(output)
    return failed, recovery


def _deduplicated(metadata_url: str, store: Storage, started: bool, tmp: str) -> str:
    """The part's rows less its crawl duplicates (``ingest/dedup.py``), in a local file for
    img2dataset's reader, in the part's order. Decided against the parts registered now, unless
    a shard is finished already: then the frozen decision holds, so shards keep their rows."""
    parts = _metadata_store(metadata_url)
    part = metadata_url.rsplit("/", 1)[-1].removesuffix(".parquet")
    if not started or dedup.decision(store) is None:
        record = dedup.decide(parts, part, store)
        print(
            f"dedup before download: {record['dropped']:,} of {record['rows']:,} rows share "
            "their crawl image_phash with a smaller id; not downloaded",
            file=sys.stderr,
        )
    if not dedup.decision(store)["dropped"]:
        return metadata_url  # nothing dropped: no copy of the part to write
    rows = parts.scan_parquet(metadata_url).join(
        dedup.dropped_ids(store), on="id", how="anti", maintain_order="left"
    )
    path = os.path.join(tmp, "rows.parquet")
    rows.collect().write_parquet(path)
    return path


def _expected_rows(store: Storage, metadata_url: str, settings: DownloadSettings) -> int | None:
    """The rows the partition's shards hold once done: the part's, less its crawl duplicates
    (None: not decided yet)."""
    if settings.dedup_crawl_phash:
        record = dedup.decision(store)
        return None if record is None else record["kept"]
    return pl.scan_parquet(metadata_url).select(pl.len()).collect().item()


def _recover(
    store: Storage,
    output: str,
    settings: DownloadSettings,
    recovery: Recovery,
    on_shard: OnShard | None,
) -> dict[int, str]:
    """Fetch again the transient failures of the finished shards (``recover.py``), recording
    each shard rewritten in the partition's ``_revisions.json`` as soon as it is in place."""
    todo = recover.candidates(store, output)
    revised = _record_revisions(store, output)  # a retry killed before its record: repaired
    if not todo:
        return {}
    recoverer = recover.ShardRecoverer(output, settings, [])

    def done(shard_id: int, counts: dict[str, int]) -> None:
        recovery.add(counts)
        if counts["revision"]:
            revised[f"{shard_id:0{recoverer.oom_shard_count}d}"] = counts["revision"]
            recover.record_revisions(store, output, revised)
        if on_shard is not None:
            on_shard(shard_id, counts)

    failed = _run_pool(recoverer, todo, settings, output, done)
    if recovery.retried and not recovery.recovered and recovery.dns == recovery.retried:
        raise RuntimeError(  # transient: Dagster retries the step, with backoff
            f"retry_failed: none of the {recovery.retried} rows fetched again came back: every "
            "name failed to resolve again (a resolver down?). The shards are kept as they were; "
            "rerun when the network is back"
        )
    return failed


#: Shards per pool task: a process fetches a task's shards through one pool of threads, the next
#: shard's rows as soon as the one before has all of its rows under way (``ShardDownloader``).
BATCH_SHARDS = 4


def batches(todo: list, processes: int) -> list[list]:
    """``todo`` in tasks of consecutive shards: at most ``BATCH_SHARDS``, and fewer when there
    are not enough shards to give every process a task."""
    size = max(1, min(BATCH_SHARDS, len(todo) // max(1, processes)))
    return [todo[i : i + size] for i in range(0, len(todo), size)]


def _run_pool(
    shard: ShardDownloader,
    todo: list,
    settings: DownloadSettings,
    output: str,
    on_shard: OnShard | None,
) -> dict[int, str]:
    """Download (or recover) ``todo``'s shards; the shards not done (an outage, an error) are
    tried again ``shard_retries`` times, after ``outage_backoff`` seconds, doubling. Returns the
    shards left undone, with why."""
    failed: dict[int, str] = {}
    with ProcessPoolExecutor(
        settings.processes,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_pool_process,
        initargs=(os.getpid(), settings.max_pixels),
    ) as pool:
        for attempt in range(settings.shard_retries + 1):
            if attempt:
                wait = settings.outage_backoff * 2 ** (attempt - 1)
                print(f"{len(todo)} shard(s) not done; trying again in {wait:g} s", file=sys.stderr)
                time.sleep(wait)
            failed, again = {}, []
            try:
                for done in pool.map(shard, batches(todo, settings.processes)):
                    for ok, row, counts, why in done:
                        if ok and on_shard is not None:
                            on_shard(row[0], counts)
                        if not ok:
                            failed[row[0]] = why
                            again.append(row)
            except BrokenProcessPool as exc:  # killed by the OOM killer, or a decoder crash
                raise RuntimeError(
                    f"a download process died (out of memory? a crashing decoder?) while "
                    f"writing {output}; finished shards are kept, rerun to resume"
                ) from exc
            if not failed:
                break
            todo = again
    return failed


def _record_revisions(store: Storage, output: str) -> dict[str, int]:
    """The partition's ``_revisions.json`` made to match its shards' own files; returns it."""
    revised = shards.revisions_read_first(store, output, shards.finished(store, output))
    if revised != shards.revisions(store, output):
        recover.record_revisions(store, output, revised)
    return revised


def download_partition(
    metadata_url: str, output: str, settings: DownloadSettings, on_shard: OnShard | None = None
) -> DownloadSummary:
    """Download (or resume) a partition; raise if shards are left unfinished. (The program
    applies ``fingerprint.for_retry`` to its settings first.)"""
    store = Storage(output)
    output = store.root
    wanted = fingerprint.current(_metadata_store(metadata_url), metadata_url, settings)
    fingerprint.check_folder(store, output, wanted)
    per_shard = settings.number_sample_per_shard
    rows = _expected_rows(store, metadata_url, settings)
    before = shards.finished(store, store.root)
    start = time.monotonic()
    failed: dict[int, str] = {}
    recovery = Recovery()
    if (
        rows is None
        or len(before) < math.ceil(rows / per_shard)
        or settings.retry_failed
        or shards.pending_rewrites(store, output)
    ):
        shards.mark_downloading(store, output)
        failed, recovery = run_shards(metadata_url, output, settings, on_shard)
        rows = _expected_rows(store, metadata_url, settings)
    expected = math.ceil((rows or 0) / per_shard)
    clear_staging(output)  # also what a run killed after its last shard left
    summary = summarize(store, set(before), time.monotonic() - start, settings.drift_distance)
    summary.retried, summary.recovered = recovery.retried, recovery.recovered
    summary.shards_revised = recovery.shards_revised
    decided = dedup.decision(store) if settings.dedup_crawl_phash else None
    if decided is not None:
        summary.crawl_duplicates = decided["dropped"]
        summary.crawl_duplicates_for = decided["dropped_for"]
    missing = expected - summary.shards
    if missing > 0:
        why = "; ".join(failed[s] for s in sorted(failed)[:3]) or "see the log"
        raise RuntimeError(  # transient: Dagster retries the step, with backoff
            f"{summary.shards} of {expected} shards finished in {output}; {missing} not: {why}. "
            "Finished shards are kept: rerun (or let the step's retries) resume"
        )
    if failed:  # every shard finished, but some were not recovered (retry_failed)
        why = "; ".join(failed[s] for s in sorted(failed)[:3])
        raise RuntimeError(
            f"retry_failed: {len(failed)} finished shard(s) in {output} not recovered: {why}. "
            "They are kept as they were: rerun (or let the step's retries) try again"
        )
    if summary.attempted and not summary.succeeded:
        raise provenance.BadInput(nothing_downloaded(summary))
    shards.mark_downloaded(
        store, output, {"shards": summary.shards, "revisions": shards.revisions(store, output)}
    )
    return summary


def nothing_downloaded(summary: DownloadSummary) -> str:
    """Why a partition whose shards are all done has no image, and what to do."""
    counts = ", ".join(
        f"{s} {n}" for s, n in sorted(summary.by_status.items(), key=lambda x: -x[1])
    )
    reasons = ", ".join(
        f"{r} {n}" for r, n in sorted(summary.failed_by_reason.items(), key=lambda x: -x[1])[:3]
    )
    head = f"no image downloaded: all {summary.attempted} URLs failed ({counts}; {reasons})"
    if summary.by_status.get(BLOCKED, 0) == summary.attempted:
        return (
            f"{head}: they name non-public addresses; --allow-networks (allow_networks) opens a "
            "mirror or a test server"
        )
    return f"{head}: check the part's URLs (are they still online?)"
