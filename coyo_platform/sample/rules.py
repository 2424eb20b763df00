"""The sampling rules: which labeled images the subset keeps.

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

Exact target threshold. Each partition's stats carry a fine top-1 histogram
(``stats.aggregate.FINE_BINS`` bins). Summed over partitions, it says which bin holds the k-th
largest eligible value; only the values in that bin (and the next non-empty bin above it) are then
read from the partitions' indexes, and the k-th value and its neighbour above decide the
threshold: whichever of the two gives the size closer to k (a tie goes to the lower threshold, the
larger subset). Memory: one bin's values (1,754 at 20M rows in benchmarks/stats.py's synthetic
data), never all rows.

Deduplication reads the partitions' indexes (sorted by pHash) one pHash range at a time, sized
to ``BUCKET_ROWS`` rows, and hands over the dropped rows (with the id each one lost to) per
range. Class caps keep a running top-N per class, at most ``CAP_ROWS`` rows at once (classes are
processed in groups when N is large). Both are a pass over the index (24 bytes per image), never
over the labels. Imports no ``dagster``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from coyo_platform.common.labelspace import NUM_CLASSES
from coyo_platform.common.settings import setting
from coyo_platform.stats.aggregate import FINE_BINS, bin_of

#: The card's evidence on its threshold (Kakao did not publish it; FACTS.md section 6):
#: its threshold table's share of labeled images kept at 0.05 .. 0.25,
CARD_SHARE_KEPT = {0.05: 0.967, 0.10: 0.858, 0.15: 0.745, 0.20: 0.643, 0.25: 0.556}
#: the lowest top-1 probability in the subset README's preview (id 1105): the threshold is at
#: most this,
CARD_PREVIEW_TOP1 = 0.2763672
#: and the share its 300M images are of those labeled: ~580M unique ``image_phash`` (labeled
#: once each, after dedup), ~85% of them still downloadable, so ~490M labeled.
CARD_KEPT_SHARE = 300 / 490
#: Default top-1 threshold: where the card's share-kept column, interpolated linearly between its
#: 0.20 and 0.25 rows, keeps ``CARD_KEPT_SHARE`` (0.218, rounded to 0.22: 60.8% kept); below
#: the preview row's 0.276, so that row is in the subset, as it is in the card's.
DEFAULT_THRESHOLD = 0.22
#: Rows read per pHash range in deduplication (24 bytes each before the sort; not benchmarked).
BUCKET_ROWS = 8_000_000
#: Rows held by the class-cap pass at once.
CAP_ROWS = 8_000_000

#: A partition's index, as ``(partition key, lazy frame of id/phash/top1/top1_class)``.
Indexes = Sequence[tuple[str, pl.LazyFrame]]


def check_threshold(threshold: float) -> float:
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    return threshold


@dataclass(frozen=True)
class Sampling:
    """How the subset is chosen: one of ``threshold``, ``target_rows``, ``target_fraction``
    (none: threshold 0.22), optionally with ``dedup`` and ``class_cap``."""

    threshold: float | None = setting(
        None, f"keep images whose top-1 probability is >= this (default {DEFAULT_THRESHOLD})"
    )
    target_rows: int | None = setting(
        None, "pick the threshold whose subset is closest to this many images (exact to the row)"
    )
    target_fraction: float | None = setting(
        None, "like target_rows, as a fraction of all labeled images (e.g. 0.4)"
    )
    dedup: bool = setting(
        False, "one image per pHash across all partitions: the highest top-1, then smallest id"
    )
    class_cap: int | None = setting(
        None, "at most this many images per top-1 class (its highest top-1, then smallest ids)"
    )

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


def above(threshold: float) -> pl.Expr:
    """The one comparison every stage uses: ``float64(top1) >= threshold``."""
    return pl.col("top1").cast(pl.Float64) >= threshold


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
    above_bin = 0
    for pos, b in enumerate(bins):
        if above_bin + histogram[b] >= target:
            break
        if pos == len(bins) - 1:  # the target is all of them (or more): keep every image
            break
        above_bin += histogram[b]
    upper = bins[pos - 1] if pos > 0 else b
    values = np.asarray(values_in_bins(b, upper), dtype=np.float32)
    in_bin = np.sort(values[bin_of(values, FINE_BINS) == b])[::-1]
    if len(in_bin) != histogram[b]:
        raise RuntimeError(
            f"label stats count {histogram[b]} images in top-1 bin {b} but the index has "
            f"{len(in_bin)}: rematerialize label_stats for the partitions whose labels changed"
        )
    rank = min(target - above_bin, len(in_bin))
    v_k = in_bin[rank - 1]
    size_k = above_bin + int((in_bin >= v_k).sum())
    greater = in_bin[in_bin > v_k]
    if len(greater):
        v_up, size_up = greater.min(), above_bin + len(greater)
    elif pos > 0:
        v_up, size_up = values[bin_of(values, FINE_BINS) == upper].min(), above_bin
    else:
        v_up, size_up = None, 0
    if v_up is not None and target - size_up < size_k - target:
        return float(v_up), int(size_up)
    return float(v_k), int(size_k)


def in_bins(lo: int, hi: int) -> pl.Expr:
    """Rows whose top-1 falls in fine bins ``lo`` to ``hi``."""
    top1 = pl.col("top1").cast(pl.Float64)
    return (top1 >= lo / FINE_BINS) & ((top1 < (hi + 1) / FINE_BINS) | (hi == FINE_BINS - 1))


def find_duplicates(
    indexes: Indexes,
    write: Callable[[int, pl.DataFrame], None],
    bucket_rows: int | None = None,
) -> int:
    """Hand ``write``, per pHash range, the rows deduplication drops: ``partition``, ``id``,
    ``top1``, ``top1_class``, ``kept_id`` (the id that stays). Returns how many it dropped."""
    sizes = [lf.select(pl.len()).collect().item() for _, lf in indexes]
    buckets = max(1, math.ceil(sum(sizes) / (bucket_rows or BUCKET_ROWS)))
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
    return index.join(duplicates.select("id"), on="id", how="anti", maintain_order="left")


def class_cutoffs(eligible: Indexes, cap: int, cap_rows: int | None = None) -> pl.DataFrame:
    """For each class with more than ``cap`` eligible images, the last image it keeps:
    ``top1_class``, ``cut_top1``, ``cut_id`` (keep ``top1 > cut_top1``, or equal and
    ``id <= cut_id``)."""
    groups = max(1, math.ceil(cap * NUM_CLASSES / (cap_rows or CAP_ROWS)))
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


def apply_caps(frame: pl.LazyFrame, cutoffs: pl.DataFrame | None) -> pl.LazyFrame:
    """Rows of ``frame`` (``id``, ``top1_class`` and ``top1`` columns) within their class cap."""
    if cutoffs is None:
        return frame
    joined = frame.join(cutoffs.lazy(), on="top1_class", how="left", maintain_order="left")
    keep = (
        pl.col("cut_top1").is_null()
        | (pl.col("top1") > pl.col("cut_top1"))
        | ((pl.col("top1") == pl.col("cut_top1")) & (pl.col("id") <= pl.col("cut_id")))
    )
    return joined.filter(keep).drop("cut_top1", "cut_id")
