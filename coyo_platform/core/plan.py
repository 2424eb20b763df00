"""The sampling plan: which labeled images the subset keeps, decided once for all partitions.

A plan is a top-1 threshold, optionally with pHash deduplication and per-class caps:

1. ``threshold``: keep images whose top-1 probability ``p`` (float32) has ``float64(p) >= t``.
   Either given, or found for a target size (``target_rows``, or ``target_fraction`` of the
   labeled images): the threshold whose subset size is closest to the target, exact to the row.
2. ``dedup``: among images with the same pHash (``imagehash``) across all partitions, keep one:
   the highest top-1 probability, then the smallest ``id``.
3. ``class_cap``: at most N images per top-1 class, the N best by the same order.

All three rank images by one total order, (top-1 probability descending, ``id`` ascending), so
they commute with the threshold: the image a duplicate group keeps, and the N images a class
keeps, are the same whatever the threshold (a group or class member below the threshold is
simply dropped with it). So the set of *eligible* images (after dedup, then caps) is decided
first, and the threshold is then a cut on that set: the subset's size for any threshold is the
number of eligible images at or above it, which is what the exact target search counts.

Exact target threshold. Each partition's stats carry a fine top-1 histogram (``stats.FINE_BINS``
bins). Summed over partitions, it says which bin holds the k-th largest eligible value; only the
values in that bin (and the next non-empty bin above it) are then read from the partitions'
indexes, and the k-th value and its neighbour above decide the threshold: whichever of the two
gives the size closer to k (a tie goes to the lower threshold, the larger subset). Memory: one
bin's values (1,754 at 20M rows in benchmarks/stats.py's synthetic data), never all rows.

Deduplication reads the partitions' indexes (sorted by pHash) one pHash range at a time, sized
to ``BUCKET_ROWS`` rows, and writes the dropped rows (with the id each one lost to) per range.
Class caps keep a running top-N per class, at most ``CAP_ROWS`` rows at once (classes are
processed in groups when N is large). Both are a pass over the index (24 bytes per image), never
over the labels.
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import polars as pl

from coyo_platform.core.labelspace import NUM_CLASSES
from coyo_platform.core.stats import FINE_BINS, merge_aggregates
from coyo_platform.core.storage import PLAN, STATS, Storage

PLAN_FILE = "plan.json"

#: Default top-1 threshold. Kakao did not publish theirs. Extrapolating the card's share-kept
#: column (96.7%, 85.8%, 74.5%, 64.3%, 55.6% at 0.05..0.25, falling ~8-11 points per 0.05) puts
#: 0.30 near 48% of labeled images: about 300M of the ~640M COYO-700M images still downloadable.
DEFAULT_THRESHOLD = 0.30
#: Rows read per pHash range in deduplication (24 bytes each before the sort; not benchmarked).
BUCKET_ROWS = 8_000_000
#: Rows held by the class-cap pass at once.
CAP_ROWS = 8_000_000
PLAN_VERSION = 1

#: A partition's index, as ``(partition key, lazy frame of id/phash/top1/top1_class)``.
Indexes = Sequence[tuple[str, pl.LazyFrame]]


def check_threshold(threshold: float) -> float:
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    return threshold


@dataclass(frozen=True)
class Sampling:
    """How the subset is chosen. Give one of ``threshold``, ``target_rows``,
    ``target_fraction``; with none, ``DEFAULT_THRESHOLD``."""

    threshold: float | None = None
    target_rows: int | None = None
    target_fraction: float | None = None
    dedup: bool = False
    class_cap: int | None = None

    def __post_init__(self) -> None:
        given = [
            n
            for n in ("threshold", "target_rows", "target_fraction")
            if getattr(self, n) is not None
        ]
        if len(given) > 1:
            raise ValueError(f"give one of threshold, target_rows, target_fraction, not {given}")
        if self.threshold is not None:
            check_threshold(self.threshold)
        if self.target_rows is not None and self.target_rows < 1:
            raise ValueError(f"target_rows must be >= 1, got {self.target_rows}")
        if self.target_fraction is not None and not 0.0 < self.target_fraction <= 1.0:
            raise ValueError(f"target_fraction must be in (0, 1], got {self.target_fraction}")
        if self.class_cap is not None and self.class_cap < 1:
            raise ValueError(f"class_cap must be >= 1, got {self.class_cap}")

    @property
    def is_global(self) -> bool:
        """True when a partition's subset depends on the other partitions' labels."""
        return (
            self.threshold is None
            and (self.target_rows is not None or self.target_fraction is not None)
            or self.dedup
            or self.class_cap is not None
        )

    def fixed_threshold(self) -> float | None:
        if self.target_rows is None and self.target_fraction is None:
            return DEFAULT_THRESHOLD if self.threshold is None else self.threshold
        return None


def fine_bin(values: pl.Expr | np.ndarray) -> pl.Expr | np.ndarray:
    """The fine-histogram bin of float32 top-1 values (exact: the width is a power of two)."""
    if isinstance(values, np.ndarray):
        return np.clip(np.floor(values.astype(np.float64) * FINE_BINS), 0, FINE_BINS - 1).astype(
            np.int64
        )
    return (values.cast(pl.Float64) * FINE_BINS).floor().clip(0, FINE_BINS - 1).cast(pl.Int64)


def threshold_for_target(
    histogram: dict[int, int], target: int, values_in_bins: Callable[[int, int], np.ndarray]
) -> tuple[float, int]:
    """The threshold whose subset size is closest to ``target``, and that size.

    ``histogram`` maps fine bins to eligible images; ``values_in_bins(lo, hi)`` returns the
    eligible top-1 values (float32) whose bin is in ``[lo, hi]``. Candidate thresholds are the
    values themselves: the size for ``t`` is the number of values ``>= t``.
    """
    if target < 1:
        raise ValueError(f"target must be >= 1 image, got {target}")
    bins = sorted((b for b, n in histogram.items() if n), reverse=True)
    if not bins:
        raise ValueError("no labeled images to choose from")
    above = 0
    for pos, b in enumerate(bins):
        if above + histogram[b] >= target:
            break
        if pos == len(bins) - 1:  # the target is all of them (or more): keep every image
            break
        above += histogram[b]
    upper = bins[pos - 1] if pos > 0 else b
    values = np.asarray(values_in_bins(b, upper), dtype=np.float32)
    in_bin = np.sort(values[fine_bin(values) == b])[::-1]
    if len(in_bin) != histogram[b]:
        raise RuntimeError(
            f"label stats count {histogram[b]} images in top-1 bin {b} but the index has "
            f"{len(in_bin)}: rematerialize label_stats for the partitions whose labels changed"
        )
    rank = min(target - above, len(in_bin))
    v_k = in_bin[rank - 1]
    size_k = above + int((in_bin >= v_k).sum())
    greater = in_bin[in_bin > v_k]
    if len(greater):
        v_up, size_up = greater.min(), above + len(greater)
    elif pos > 0:
        v_up, size_up = values[fine_bin(values) == upper].min(), above
    else:
        v_up, size_up = None, 0
    if v_up is not None and target - size_up < size_k - target:
        return float(v_up), int(size_up)
    return float(v_k), int(size_k)


def find_duplicates(
    indexes: Indexes, write: Callable[[int, pl.DataFrame], None], bucket_rows: int = BUCKET_ROWS
) -> int:
    """Write, per pHash range, the rows deduplication drops: ``partition``, ``id``, ``top1``,
    ``top1_class``, ``kept_id`` (the id that stays). Returns how many rows it dropped."""
    sizes = [lf.select(pl.len()).collect().item() for _, lf in indexes]
    buckets = max(1, math.ceil(sum(sizes) / bucket_rows))
    edges = [(i << 64) // buckets for i in range(buckets + 1)]
    dropped = 0
    for i in range(buckets):
        lo, hi = edges[i], edges[i + 1] - 1
        rows = pl.concat(
            [
                lf.filter(pl.col("phash").is_between(lo, hi))
                .with_columns(partition=pl.lit(key))
                .collect()
                for key, lf in indexes
            ]
        )
        losers = (
            rows.sort(["phash", "top1", "id"], descending=[False, True, False])
            .with_columns(
                rank=pl.int_range(pl.len()).over("phash"),
                kept_id=pl.col("id").first().over("phash"),
            )
            .filter(pl.col("rank") > 0)
            .select("partition", "id", "top1", "top1_class", "kept_id")
            .sort("partition", "id")
        )
        write(i, losers)
        dropped += losers.height
    return dropped


def drop_duplicates(index: pl.LazyFrame, duplicates: pl.LazyFrame | None) -> pl.LazyFrame:
    if duplicates is None:
        return index
    return index.join(duplicates.select("id"), on="id", how="anti")


def class_cutoffs(eligible: Indexes, cap: int, cap_rows: int = CAP_ROWS) -> pl.DataFrame:
    """For each class with more than ``cap`` eligible images, the last image it keeps:
    ``top1_class``, ``cut_top1``, ``cut_id`` (keep ``top1 > cut_top1``, or equal and
    ``id <= cut_id``)."""
    groups = max(1, math.ceil(cap * NUM_CLASSES / cap_rows))
    edges = [(g * NUM_CLASSES) // groups for g in range(groups + 1)]
    order = {"by": ["top1", "id"], "descending": [True, False]}
    found = []
    for g in range(groups):
        best, counts = None, []
        for _, lf in eligible:
            part = lf.filter(pl.col("top1_class").is_between(edges[g], edges[g + 1] - 1))
            top, count = pl.collect_all(
                [
                    part.sort(**order).group_by("top1_class", maintain_order=True).head(cap),
                    part.group_by("top1_class").len(),
                ]
            )
            counts.append(count)
            merged = top if best is None else pl.concat([best, top])
            best = merged.sort(**order).group_by("top1_class", maintain_order=True).head(cap)
        if best is None:
            break
        over = (
            pl.concat(counts)
            .group_by("top1_class")
            .agg(pl.col("len").sum())
            .filter(pl.col("len") > cap)
        )
        found.append(
            best.join(over.select("top1_class"), on="top1_class")
            .group_by("top1_class")
            .agg(cut_top1=pl.col("top1").last(), cut_id=pl.col("id").last())
        )
    schema = {"top1_class": pl.Int32, "cut_top1": pl.Float32, "cut_id": pl.Int64}
    return pl.concat(found).cast(schema) if found else pl.DataFrame(schema=schema)


def apply_caps(
    frame: pl.LazyFrame, cutoffs: pl.DataFrame | None, top1: str = "top1"
) -> pl.LazyFrame:
    """Rows of ``frame`` (``id``, ``top1_class`` and ``top1`` columns) within their class cap."""
    if cutoffs is None:
        return frame
    joined = frame.join(cutoffs.lazy(), on="top1_class", how="left")
    keep = (
        pl.col("cut_top1").is_null()
        | (pl.col(top1) > pl.col("cut_top1"))
        | ((pl.col(top1) == pl.col("cut_top1")) & (pl.col("id") <= pl.col("cut_id")))
    )
    return joined.filter(keep).drop("cut_top1", "cut_id")


def digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


# ---- the whole plan over a storage root ------------------------------------------------------


def index_url(store: Storage, key: str) -> str:
    return store.url(STATS, f"{key}.index.parquet")


def _in_bins(lo: int, hi: int) -> pl.Expr:
    top1 = pl.col("top1").cast(pl.Float64)
    return (top1 >= lo / FINE_BINS) & ((top1 < (hi + 1) / FINE_BINS) | (hi == FINE_BINS - 1))


def make_plan(store: Storage, keys: Sequence[str], sampling: Sampling, log=print) -> dict:
    """Decide the subset for partitions ``keys`` (each with label stats) and write the plan's
    files under a fresh folder of ``<root>/subset_plan/``; returns the plan (not yet written)."""
    if not keys:
        raise ValueError("no partition has label stats yet: materialize label_stats first")
    aggs = {k: store.read_json(store.url(STATS, f"{k}.json")) for k in keys}
    merged = merge_aggregates(aggs.values())
    folder_id = uuid.uuid4().hex[:12]
    folder = store.url(PLAN, folder_id)
    indexes = [(k, store.scan_parquet(index_url(store, k))) for k in keys]
    eligible = indexes
    dup_digest, duplicates, dup_glob = None, 0, None
    if sampling.dedup:
        hashes: list[str] = []

        def write(bucket: int, losers: pl.DataFrame) -> None:
            store.write_parquet(f"{folder}/duplicates/{bucket:05d}.parquet", losers.to_arrow())
            hashes.append(hashlib.sha256(losers["id"].to_numpy().tobytes()).hexdigest())

        duplicates = find_duplicates(indexes, write)
        dup_glob = f"{folder}/duplicates/*.parquet"
        dup_digest = digest(hashes)
        dups = store.scan_parquet(store.glob(dup_glob))
        eligible = [
            (k, drop_duplicates(lf, dups.filter(pl.col("partition") == k))) for k, lf in indexes
        ]
        log(f"deduplication: {duplicates:,} images share a pHash with a better one")
    cutoffs, cut_digest, cut_url = None, None, None
    if sampling.class_cap is not None:
        cutoffs = class_cutoffs(eligible, sampling.class_cap)
        cut_url = f"{folder}/class_cutoffs.parquet"
        store.write_parquet(cut_url, cutoffs.sort("top1_class").to_arrow())
        cut_digest = digest(cutoffs.sort("top1_class").rows())
        eligible = [(k, apply_caps(lf, cutoffs)) for k, lf in eligible]
        log(f"class cap {sampling.class_cap:,}: {cutoffs.height:,} classes capped")
    if eligible is indexes:  # nothing removed: the stats' histogram is the eligible one
        histogram = {int(b): n for b, n in merged["top1_fine"].items()}
    else:
        counted = pl.concat(
            pl.collect_all([lf.group_by(b=fine_bin(pl.col("top1"))).len() for _, lf in eligible])
        )
        histogram = dict(counted.group_by("b").agg(pl.col("len").sum()).iter_rows())
    available = sum(histogram.values())
    threshold, target = sampling.fixed_threshold(), None
    if threshold is None:
        if sampling.target_rows is not None:
            target = sampling.target_rows
        else:
            target = max(1, round(sampling.target_fraction * merged["images"]))

        def values_in_bins(lo: int, hi: int) -> np.ndarray:
            frames = pl.collect_all(
                [lf.filter(_in_bins(lo, hi)).select("top1") for _, lf in eligible]
            )
            return pl.concat(frames)["top1"].to_numpy()

        threshold, _ = threshold_for_target(histogram, target, values_in_bins)
        log(f"target {target:,} images: threshold {threshold!r}")
    top1 = pl.col("top1").cast(pl.Float64)
    counts = pl.collect_all([lf.filter(top1 >= threshold).select(pl.len()) for _, lf in eligible])
    rows = {k: int(c.item()) for (k, _), c in zip(eligible, counts, strict=True)}
    decision = {
        "sampling": asdict(sampling),
        "threshold": threshold,
        "duplicates": dup_digest,
        "class_cutoffs": cut_digest,
    }
    if sampling.is_global:
        decision["partitions"] = sorted(keys)
    return {
        "version": PLAN_VERSION,
        "digest": digest(decision),
        "sampling": asdict(sampling),
        "threshold": threshold,
        "target_rows": target,
        "partitions": sorted(keys),
        "global": sampling.is_global,
        "images_labeled": merged["images"],
        "images_eligible": available,
        "duplicates_dropped": duplicates,
        "classes_capped": 0 if cutoffs is None else cutoffs.height,
        "rows": sum(rows.values()),
        "rows_per_partition": rows,
        "folder": folder,
        "duplicates_glob": dup_glob,
        "class_cutoffs": cut_url,
    }


def read_plan(store: Storage) -> dict | None:
    url = store.url(PLAN, PLAN_FILE)
    return store.read_json(url) if store.exists(url) else None


def default_plan() -> dict:
    """The plan a subset uses before ``subset_plan`` was ever materialized: the default
    threshold, no dedup, no caps."""
    sampling = Sampling()
    return {
        "version": PLAN_VERSION,
        "digest": digest(
            {
                "sampling": asdict(sampling),
                "threshold": DEFAULT_THRESHOLD,
                "duplicates": None,
                "class_cutoffs": None,
            }
        ),
        "sampling": asdict(sampling),
        "threshold": DEFAULT_THRESHOLD,
        "global": False,
        "partitions": [],
        "duplicates_glob": None,
        "class_cutoffs": None,
        "default": True,
    }


def partition_filters(
    store: Storage, plan: dict, key: str
) -> tuple[pl.LazyFrame | None, pl.DataFrame | None]:
    """The plan's duplicates to drop from partition ``key`` and its class cutoffs."""
    if plan["global"] and key not in plan["partitions"]:
        raise PlanMismatch(
            f"the subset plan was made without {key} (it covers {len(plan['partitions'])} "
            "partitions and depends on all of them: a target size, dedup or class caps); "
            "materialize subset_plan again, which rewrites every partition's subset"
        )
    duplicates = None
    if plan.get("duplicates_glob"):
        files = store.glob(plan["duplicates_glob"])
        duplicates = store.scan_parquet(files).filter(pl.col("partition") == key) if files else None
    cutoffs = None
    if plan.get("class_cutoffs"):
        cutoffs = store.scan_parquet(plan["class_cutoffs"]).collect()
    return duplicates, cutoffs


class PlanMismatch(ValueError):
    """The plan cannot be applied to this partition."""


def prune(store: Storage, keep: Sequence[str | None]) -> list[str]:
    """Delete plan folders other than ``keep`` (the current plan's and the one before, which a
    subset still running may be reading); returns the deleted folders."""
    kept = {k.rstrip("/").rsplit("/", 1)[-1] for k in keep if k}
    gone = []
    for path in store.glob(store.url(PLAN, "*")):
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if name != PLAN_FILE and name not in kept and store.fs.isdir(path):
            store.fs.rm(path, recursive=True)
            gone.append(path)
    return gone
