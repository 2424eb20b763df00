"""What is left to do, read from storage alone: which partitions have downloaded shards, and which
finished shards have no labels yet. The sensors ask this; so can a person, without Dagster.

A shard is *finished* when its ``NNNNN_stats.json`` exists: the downloader moves it into place
after the shard's tar and parquet (``core/download.py``), img2dataset writes it last too, and
img2dataset's incremental mode uses the same test. So shards that an
img2dataset run outside Dagster (a Spark cluster, say) is still writing are never picked up.
"""

from __future__ import annotations

import os
import re

import polars as pl

from coyo_platform.core.storage import DOWNLOADS, LABELS, Storage

_KEY = re.compile(r"^[A-Za-z0-9][\w.-]*$")


def finished_in(storage: Storage, folder: str) -> list[str]:
    """Names (``00000``) of the shards img2dataset finished in ``folder`` (any URL)."""
    stats = storage.glob(f"{folder.rstrip('/')}/*_stats.json")
    return sorted(os.path.basename(p).removesuffix("_stats.json") for p in stats)


def finished_shards(storage: Storage, key: str) -> list[str]:
    """Names of the partition's shards that img2dataset finished."""
    return finished_in(storage, storage.url(DOWNLOADS, key))


def labeled_shards(storage: Storage, key: str) -> set[str]:
    return {
        os.path.basename(p).removesuffix(".parquet")
        for p in storage.glob(storage.url(LABELS, key, "*.parquet"))
    }


def unlabeled_shards(storage: Storage, key: str) -> list[str]:
    """Finished shards of the partition without their labels."""
    done = labeled_shards(storage, key)
    return [s for s in finished_shards(storage, key) if s not in done]


def downloaded_partitions(storage: Storage) -> list[str]:
    """Partition keys that have a shard folder under the storage root (written by this platform
    or by img2dataset run elsewhere into the same layout)."""
    root = storage.url(DOWNLOADS)
    if not storage.exists(root):
        return []
    entries = storage.fs.ls(root, detail=True)  # one listing: names and types together
    names = {os.path.basename(e["name"].rstrip("/")) for e in entries if e["type"] == "directory"}
    return sorted(n for n in names if _KEY.match(n))


def download_counts(
    storage: Storage, key: str, finished: list[str] | None = None
) -> tuple[int, int]:
    """(attempted, succeeded) over the partition's finished shards, from img2dataset's own
    per-shard parquet (one row per input URL with its ``status``)."""
    if finished is None:
        finished = finished_shards(storage, key)
    files = [storage.url(DOWNLOADS, key, f"{s}.parquet") for s in finished]
    if not files:
        return 0, 0
    counts = storage.scan_parquet(files).select(
        pl.len().alias("attempted"), (pl.col("status") == "success").sum().alias("succeeded")
    )
    row = counts.collect().row(0)
    return int(row[0]), int(row[1])


def label_coverage(storage: Storage, key: str) -> dict:
    """Downloaded images against label rows (labeled, or recorded as failed with a reason):
    equal, with every finished shard labeled, when nothing was lost."""
    finished = finished_shards(storage, key)
    _, downloaded = download_counts(storage, key, finished)
    files = storage.glob(storage.url(LABELS, key, "*.parquet"))
    rows = storage.scan_parquet(files).select(pl.len()).collect().item() if files else 0
    done = {os.path.basename(f).removesuffix(".parquet") for f in files}
    return {
        "downloaded_images": downloaded,
        "label_rows": int(rows),
        "unlabeled_shards": [s for s in finished if s not in done],
    }
