"""What a partition's finished shards say, counted from their parquet (one row per input URL),
and the figures the ``downloaded_shards`` materialization shows. Imports no ``dagster``."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import polars as pl

from coyo_platform.common import layout, shards
from coyo_platform.common.reporting import json_value, path, table
from coyo_platform.common.storage import Storage
from coyo_platform.common.tables import counts
from coyo_platform.download.statuses import BLOCKED, SUCCESS, failure_reason


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
    root: str
    transient: int = 0  # rows whose failure was transient: what retry_failed fetches again
    retried: int = 0  # this run's retry_failed: rows fetched again,
    recovered: int = 0  # of them now images,
    shards_revised: int = 0  # in this many shards rewritten
    crawl_duplicates: int | None = None  # rows not downloaded: dedup before download
    crawl_duplicates_for: dict[str, int] | None = None  # by the part holding the smaller id

    @property
    def images_per_second(self) -> float:
        images = self.succeeded_this_run + self.recovered
        return images / self.seconds if self.seconds > 0 else 0.0

    @property
    def drift_rate(self) -> float:
        return self.drifted / self.compared if self.compared else 0.0

    def metadata(self, drift_distance: int, drop_drifted: bool, image_size: int) -> dict[str, Any]:
        """The materialization's metadata (Pipes' raw form)."""
        figures: dict[str, Any] = {
            "attempted": self.attempted,
            "succeeded": self.succeeded,
            "failed": self.attempted - self.succeeded,
            "success_rate": round(self.succeeded / self.attempted, 4) if self.attempted else 0.0,
            "blocked": self.by_status.get(BLOCKED, 0),
            "statuses": table(counts(self.by_status, "status", "rows")),
            "by_status": json_value(self.by_status),
            "failed_by_reason": table(counts(self.failed_by_reason, "reason", "rows")),
            "failures": json_value(self.failed_by_reason),
            "phash_compared": self.compared,
            "drifted": self.drifted,
            "drift_rate": round(self.drift_rate, 4),
            "drift_distance": drift_distance,
            "drifted_dropped": drop_drifted,
            "transient_failures": self.transient,
            "retried": self.retried,
            "recovered": self.recovered,
            "shards_revised": self.shards_revised,
            "shards": self.shards,
            "shards_this_run": self.shards_this_run,
            "images_per_second": round(self.images_per_second, 2),
            "seconds": round(self.seconds, 2),
            "bytes_written": self.bytes_written,
            "path": path(self.root),
            "image_size": image_size,
        }
        if self.mean_distance is not None:
            figures["mean_phash_distance"] = round(self.mean_distance, 2)
        if self.crawl_duplicates is not None:
            figures["crawl_duplicates_dropped"] = self.crawl_duplicates
            figures["crawl_duplicates_by_part"] = json_value(self.crawl_duplicates_for or {})
        return figures


@dataclass
class _Tally:
    attempted: int = 0
    succeeded_new: int = 0
    compared: int = 0
    drifted: int = 0
    distance_sum: int = 0
    transient: int = 0


def summarize(
    store: Storage, before: set[str], seconds: float, drift_distance: int = 12
) -> DownloadSummary:
    """Count what the finished shards' parquets under ``store.root`` say (a shard without its
    ``_stats.json`` is not finished and not counted). ``before`` holds the shards done before
    this run, to tell this run's speed."""
    names = shards.finished(store, store.root)
    tally = _Tally()
    by_status: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    for name in names:
        with store.fs.open(layout.shard_file(store.root, name, ".parquet"), "rb") as fh:
            rows = pl.read_parquet(fh)
        if "phash_distance" not in rows.columns:  # written by img2dataset itself (no drift check)
            rows = rows.with_columns(phash_distance=pl.lit(None, pl.Int32))
        tally.attempted += rows.height
        if "transient" in rows.columns:
            tally.transient += int(rows["transient"].fill_null(False).sum())
        for status, n in rows.group_by("status").len().iter_rows():
            by_status[status] += n
        if name not in before:
            tally.succeeded_new += int((rows["status"] == SUCCESS).sum())
        distances = rows["phash_distance"].drop_nulls()
        tally.compared += len(distances)
        tally.drifted += int((distances > drift_distance).sum())
        tally.distance_sum += int(distances.sum() or 0)
        bad = rows.filter(pl.col("status") != SUCCESS).group_by("status", "error_message").len()
        for status, message, n in bad.iter_rows():
            failed[failure_reason(status, message)] += n
    return DownloadSummary(
        attempted=tally.attempted,
        succeeded=by_status.get(SUCCESS, 0),
        by_status=dict(by_status.most_common()),
        failed_by_reason=dict(failed.most_common()),
        shards=len(names),
        shards_this_run=len(set(names) - before),
        succeeded_this_run=tally.succeeded_new,
        seconds=seconds,
        bytes_written=sum(store.size(layout.shard_file(store.root, n, ".tar")) for n in names),
        compared=tally.compared,
        drifted=tally.drifted,
        mean_distance=tally.distance_sum / tally.compared if tally.compared else None,
        root=store.root,
        transient=tally.transient,
    )
