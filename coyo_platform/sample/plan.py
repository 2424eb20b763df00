"""The sampling plan: the rules (``rules.py``) decided once over every partition with label
stats, written as ``<root>/subset_plan/plan.json`` plus the plan's own folder (duplicates, class
cutoffs), and applied per partition by the subset. Imports no ``dagster``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from coyo_platform.common import layout
from coyo_platform.common.provenance import digest
from coyo_platform.common.storage import Storage
from coyo_platform.ingest import dedup
from coyo_platform.sample.rules import (
    DEFAULT_THRESHOLD,
    Indexes,
    Sampling,
    above,
    apply_caps,
    class_cutoffs,
    drop_duplicates,
    find_duplicates,
    in_bins,
    threshold_for_target,
)
from coyo_platform.stats.aggregate import FINE_BINS, Aggregate, bin_of, merge_aggregates

PLAN_VERSION = 4  # 2: the labelers; 3: crawl duplicates found after download; 4: duplicates
# in one file per partition (before: one per pHash range, every partition's rows)


class PlanMismatch(ValueError):
    """The plan cannot be applied to this partition."""


class NoStats(ValueError):
    """No partition has label stats to plan over."""


class MixedLabelers(ValueError):
    """The partitions' label stats come from different labelers: a subset never mixes them."""


@dataclass
class Plan:
    """A decision, as ``plan.json`` stores it (the same keys)."""

    digest: str
    sampling: Sampling
    threshold: float
    is_global: bool
    partitions: list[str] = field(default_factory=list)
    target_rows: int | None = None
    images_labeled: int = 0
    images_eligible: int = 0
    duplicates_dropped: int = 0
    crawl_duplicates_dropped: dict[str, int] = field(default_factory=dict)
    """Per partition: rows downloaded before a part holding their image_phash with a smaller id
    was registered (``ingest/dedup.py``), dropped here."""
    crawl_duplicates_revived: dict[str, int] = field(default_factory=dict)
    """Per partition: rows never downloaded for a part no longer registered as it was."""
    classes_capped: int = 0
    rows: int = 0
    rows_per_partition: dict[str, int] = field(default_factory=dict)
    labelers: dict[str, str] = field(default_factory=dict)
    """The labeler whose labels each partition's stats counted."""
    folder: str | None = None
    duplicates_glob: str | None = None
    class_cutoffs: str | None = None
    default: bool = False
    version: int = PLAN_VERSION

    def to_json(self) -> dict[str, Any]:
        value = asdict(self)
        value["global"] = value.pop("is_global")
        if not self.default:  # only the stand-in plan says so
            del value["default"]
        return value

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Plan:
        known = {f.name for f in fields(cls)}
        given = {k: v for k, v in value.items() if k in known}
        return cls(
            **{**given, "sampling": Sampling(**value["sampling"]), "is_global": value["global"]}
        )

    @property
    def share_kept(self) -> float:
        return round(self.rows / self.images_labeled, 4) if self.images_labeled else 0.0


def _decision_digest(sampling: Sampling, threshold: float, dups: str | None, cuts: str | None):
    return {
        "sampling": asdict(sampling),
        "threshold": threshold,
        "duplicates": dups,
        "class_cutoffs": cuts,
    }


def default_plan() -> Plan:
    """The plan a subset uses before ``subset_plan`` was ever materialized: the default
    threshold, no dedup, no caps."""
    sampling = Sampling()
    decided = _decision_digest(sampling, DEFAULT_THRESHOLD, None, None)
    return Plan(
        digest=digest(decided),
        sampling=sampling,
        threshold=DEFAULT_THRESHOLD,
        is_global=False,
        default=True,
    )


def read_plan(store: Storage) -> Plan | None:
    url = layout.plan(store)
    return Plan.from_json(store.read_json(url)) if store.exists(url) else None


def current_plan(store: Storage) -> Plan:
    return read_plan(store) or default_plan()


def write_plan(store: Storage, plan: Plan) -> None:
    store.write_json(layout.plan(store), plan.to_json())


@dataclass
class _Eligible:
    """The partitions' indexes after dedup and caps, and what those steps left behind."""

    indexes: Indexes
    duplicates: int = 0
    duplicates_digest: str | None = None
    duplicates_glob: str | None = None
    cutoffs: pl.DataFrame | None = None
    cutoffs_digest: str | None = None
    cutoffs_url: str | None = None


def _dedup(store: Storage, folder: str, eligible: _Eligible, log: Callable[[str], Any]) -> None:
    """Find the pHash duplicates over every partition, one pHash range at a time, and write them
    as one file per partition (``<plan>/duplicates/<part>.parquet``, a row group per range), so
    that each later pass and each subset reads only its own partition's (plans of version 3 kept
    a file per range, which every pass read whole for every partition)."""
    hashes: list[str] = []
    writers: dict[str, pq.ParquetWriter] = {}
    with tempfile.TemporaryDirectory(prefix="coyo-dedup-") as tmp:

        def write(bucket: int, losers: pl.DataFrame) -> None:
            hashes.append(hashlib.sha256(losers["id"].to_numpy().tobytes()).hexdigest())
            for (key,), rows in losers.partition_by("partition", as_dict=True).items():
                table = rows.to_arrow()
                if key not in writers:  # one local file per partition, a row group per range
                    writers[key] = pq.ParquetWriter(os.path.join(tmp, key), table.schema)
                writers[key].write_table(table)

        try:
            eligible.duplicates = find_duplicates(eligible.indexes, write)
        finally:
            for writer in writers.values():
                writer.close()
        found: dict[str, str] = {}
        for key in sorted(writers):
            found[key] = layout.duplicates(folder, key)
            local = os.path.join(tmp, key)
            store.write_file(found[key], lambda path, local=local: shutil.copyfile(local, path))
    eligible.duplicates_glob = layout.duplicates(folder)
    eligible.duplicates_digest = digest(hashes)
    eligible.indexes = [
        (k, drop_duplicates(lf, store.scan_parquet(found[k])) if k in found else lf)
        for k, lf in eligible.indexes
    ]
    log(
        f"deduplication: {eligible.duplicates:,} images share a pHash with a better one "
        f"({len(hashes)} pHash range{'s' if len(hashes) != 1 else ''}, {len(found)} "
        f"partition{'s' if len(found) != 1 else ''} with duplicates)"
    )


def _crawl_later(store: Storage, folder: str, eligible: _Eligible, log: Callable[[str], Any]):
    """Drop the rows that dedup before download keeps no more: a part registered after a
    partition's download holds their crawl image_phash with a smaller id. Returns the count per
    partition, a digest of the ids (None: none), and per partition the rows not downloaded
    for a part no longer registered as it was."""
    parts = Storage(store.url(layout.METADATA))
    now = dedup.registered(parts)
    found: dict[str, int] = {}
    revived: dict[str, int] = {}
    ids: list[list[int]] = []
    indexes = []
    for key, lf in eligible.indexes:
        changed = dedup.since(parts, key, Storage(layout.shards(store, key)), now)
        if changed is not None and changed.revived:
            revived[key] = changed.revived
            log(
                f"dedup before download, {key}: {changed.revived:,} rows were not downloaded "
                "for a part that is no longer registered as it was (cleared or changed); to "
                f"download them: coyo-platform clear --parts {key} --from downloaded_shards"
            )
        later = changed.later if changed is not None else None
        if later is not None and later.height:
            losers = (
                lf.join(later.lazy().select("id", "kept_id"), on="id")
                .with_columns(partition=pl.lit(key))
                .select("partition", "id", "top1", "top1_class", "kept_id")
                .sort("id")
                .collect()
            )
            store.write_parquet(layout.crawl_duplicates(folder, key), losers.to_arrow())
            found[key], lf = losers.height, drop_duplicates(lf, losers.lazy())
            ids.append(losers["id"].to_list())
            by = ", ".join(f"{p} {n}" for p, n in sorted(later["kept_part"].value_counts().rows()))
            log(
                f"dedup before download, {key}: {later.height:,} rows downloaded before a part "
                f"holding their image_phash with a smaller id was registered ({by}); "
                f"{losers.height:,} of them labeled, dropped from the subset"
            )
        indexes.append((key, lf))
    eligible.indexes = indexes
    if found:
        eligible.duplicates_glob = layout.duplicates(folder)
    return found, digest(ids) if found else None, revived


def _caps(
    store: Storage, folder: str, eligible: _Eligible, cap: int, log: Callable[[str], Any]
) -> None:
    cutoffs = class_cutoffs(eligible.indexes, cap).sort("top1_class")
    eligible.cutoffs, eligible.cutoffs_url = cutoffs, layout.class_cutoffs(folder)
    store.write_parquet(eligible.cutoffs_url, cutoffs.to_arrow())
    eligible.cutoffs_digest = digest(cutoffs.rows())
    eligible.indexes = [(k, apply_caps(lf, cutoffs)) for k, lf in eligible.indexes]
    log(f"class cap {cap:,}: {cutoffs.height:,} classes capped")


def _histogram(eligible: _Eligible, merged: Aggregate, filtered: bool) -> dict[int, int]:
    """Eligible images per fine top-1 bin: the stats' own when nothing was removed."""
    if not filtered:
        return {int(b): n for b, n in merged.top1_fine.items()}
    frames = [lf.group_by(b=bin_of(pl.col("top1"), FINE_BINS)).len() for _, lf in eligible.indexes]
    counted = pl.concat(pl.collect_all(frames))
    return dict(counted.group_by("b").agg(pl.col("len").sum()).iter_rows())


def _target_threshold(
    eligible: _Eligible, histogram: dict[int, int], target: int, log: Callable[[str], Any]
) -> float:
    def values_in_bins(lo: int, hi: int) -> np.ndarray:
        frames = [lf.filter(in_bins(lo, hi)).select("top1") for _, lf in eligible.indexes]
        return pl.concat(pl.collect_all(frames))["top1"].to_numpy()

    threshold, _ = threshold_for_target(histogram, target, values_in_bins)
    log(f"target {target:,} images: threshold {threshold!r}")
    return threshold


def _one_labeler(stats: dict[str, Aggregate]) -> dict[str, str]:
    """Each partition's labeler, all the same one; else :class:`MixedLabelers`."""
    labelers = {k: agg.labelers[0] if agg.labelers else "?" for k, agg in stats.items()}
    by_labeler: dict[str, list[str]] = {}
    for key, labeler in sorted(labelers.items()):
        by_labeler.setdefault(labeler, []).append(key)
    if len(by_labeler) > 1:
        listed = "; ".join(
            f"{labeler}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
            for labeler, keys in sorted(by_labeler.items(), key=lambda kv: -len(kv[1]))
        )
        raise MixedLabelers(
            f"the partitions' labels come from {len(by_labeler)} labelers ({listed}); a subset "
            "never mixes labelers: label the other partitions with the same settings "
            "(coyo-platform run --parts ... with the same --model/--checkpoint/--preset/"
            "--precision), then materialize subset_plan again"
        )
    return labelers


def make_plan(
    store: Storage, keys: Sequence[str], sampling: Sampling, log: Callable[[str], Any] = print
) -> Plan:
    """Decide the subset for partitions ``keys`` (each with label stats) and write the plan's
    files under a fresh folder of ``<root>/subset_plan/``; returns the plan (not yet written)."""
    if not keys:
        raise ValueError("no partition has label stats yet: materialize label_stats first")
    stats = {k: Aggregate.from_json(store.read_json(layout.stats(store, k))) for k in keys}
    labelers = _one_labeler(stats)
    merged = merge_aggregates(stats.values())
    folder = layout.plan_folder(store, uuid.uuid4().hex[:12])
    eligible = _Eligible([(k, store.scan_parquet(layout.index(store, k))) for k in keys])
    crawl, crawl_digest, revived = _crawl_later(store, folder, eligible, log)
    if sampling.dedup:
        _dedup(store, folder, eligible, log)
    if sampling.class_cap is not None:
        _caps(store, folder, eligible, sampling.class_cap, log)
    filtered = sampling.dedup or sampling.class_cap is not None or bool(crawl)
    histogram = _histogram(eligible, merged, filtered)
    threshold, target = sampling.fixed_threshold(), None
    if threshold is None:
        target = sampling.target_rows or max(1, round(sampling.target_fraction * merged.images))
        threshold = _target_threshold(eligible, histogram, target, log)
    counts = pl.collect_all(
        [lf.filter(above(threshold)).select(pl.len()) for _, lf in eligible.indexes]
    )
    rows = {k: int(c.item()) for (k, _), c in zip(eligible.indexes, counts, strict=True)}
    if target is not None and sum(rows.values()) < target:
        log(
            f"target {target:,} images not reachable: {sum(histogram.values()):,} images are "
            f"eligible after dedup and class caps, the subset keeps {sum(rows.values()):,} "
            "(lower the target, or raise or drop the class cap)"
        )
    decided = _decision_digest(
        sampling, threshold, eligible.duplicates_digest, eligible.cutoffs_digest
    )
    decided["labelers"] = sorted(set(labelers.values()))
    is_global = sampling.is_global or bool(crawl)  # then it depends on the other parts too
    if crawl_digest:
        decided["crawl_duplicates"] = crawl_digest
    if is_global:
        decided["partitions"] = sorted(keys)
    return Plan(
        digest=digest(decided),
        sampling=sampling,
        threshold=threshold,
        is_global=is_global,
        partitions=sorted(keys),
        target_rows=target,
        images_labeled=merged.images,
        images_eligible=sum(histogram.values()),
        duplicates_dropped=eligible.duplicates,
        crawl_duplicates_dropped=crawl,
        crawl_duplicates_revived=revived,
        classes_capped=0 if eligible.cutoffs is None else eligible.cutoffs.height,
        rows=sum(rows.values()),
        rows_per_partition=rows,
        labelers=labelers,
        folder=folder,
        duplicates_glob=eligible.duplicates_glob,
        class_cutoffs=eligible.cutoffs_url,
    )


def partition_filters(
    store: Storage, plan: Plan, key: str
) -> tuple[pl.LazyFrame | None, pl.DataFrame | None]:
    """The plan's duplicates to drop from partition ``key`` and its class cutoffs."""
    if plan.is_global and key not in plan.partitions:
        raise PlanMismatch(
            f"the subset plan was made without {key} (it covers {len(plan.partitions)} "
            "partitions and depends on all of them: a target size, dedup or class caps); "
            "materialize subset_plan again, which rewrites every partition's subset"
        )
    duplicates = None
    if plan.duplicates_glob and plan.folder and plan.version >= 4:  # this partition's files
        files = [layout.duplicates(plan.folder, key), layout.crawl_duplicates(plan.folder, key)]
        files = [f for f in files if store.exists(f)]
        duplicates = store.scan_parquet(files) if files else None
    elif plan.duplicates_glob:  # a plan written before (files by pHash range)
        files = store.glob(plan.duplicates_glob)
        duplicates = store.scan_parquet(files).filter(pl.col("partition") == key) if files else None
    cutoffs = store.scan_parquet(plan.class_cutoffs).collect() if plan.class_cutoffs else None
    return duplicates, cutoffs


def prune(store: Storage, keep: Sequence[str | None]) -> list[str]:
    """Delete plan folders other than ``keep`` (the current plan's and the one before, which a
    subset still running may be reading); returns the deleted folders."""
    kept = {k.rstrip("/").rsplit("/", 1)[-1] for k in keep if k}
    gone = []
    for path in layout.plan_folders(store):
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if name not in kept and store.fs.isdir(path):
            store.fs.rm(path, recursive=True)
            gone.append(path)
    return gone


def plan_and_write(
    store: Storage, sampling: Sampling, log: Callable[[str], Any] = print
) -> tuple[Plan, Plan | None]:
    """Make the plan over every partition with label stats, write ``plan.json`` and prune the
    plan folders no one reads any more; returns the new plan and the one it replaced."""
    keys = layout.partitions_with_stats(store)
    if not keys:
        raise NoStats("no partition has label stats yet; materialize label_stats first")
    previous = read_plan(store)
    plan = make_plan(store, keys, sampling, log=log)
    write_plan(store, plan)
    prune(store, keep=[plan.folder, previous.folder if previous else None])
    return plan, previous
