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
range. Class caps take two passes whatever N: the first counts images per (class, ``CAP_BINS``
bin of top-1), which says for each class over its cap the bin holding its N-th image and how many
it keeps above that bin; the second reads only the rows in those boundary bins, at most about
``CAP_ROWS`` of them at once (more passes only when the boundary bins hold more: heavy ties), and
sorts them. Both steps read the index (24 bytes per image), never the labels. Imports no
``dagster``.
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
#: Rows the class caps' second pass (the rows in each capped class's boundary bin) holds at once;
#: when the boundary bins hold more, it takes one pass per group of classes that fit (a class
#: alone in its group holds at most its boundary rows in one partition plus N).
CAP_ROWS = 8_000_000
#: Top-1 bins per class in the class caps' first pass: a NUM_CLASSES x CAP_BINS int64 count
#: (21,841 x 512: 89 MB), the same bins (``bin_of``, in float64) in both passes.
CAP_BINS = 512

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
    sizes = [f.item() for f in pl.collect_all([lf.select(pl.len()) for _, lf in indexes])]
    buckets = max(1, math.ceil(sum(sizes) / (bucket_rows or BUCKET_ROWS)))
    edges = [(i << 64) // buckets for i in range(buckets + 1)]
    dropped = 0
    for i in range(buckets):
        lo, hi = edges[i], edges[i + 1] - 1
        rows = pl.concat(  # the range's rows of every partition, read together
            pl.collect_all(
                [
                    lf.filter(pl.col("phash").is_between(lo, hi)).with_columns(
                        partition=pl.lit(key)
                    )
                    for key, lf in indexes
                ]
            )
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


def _cap_bin(bins: int) -> pl.Expr:
    """A row's class-cap bin: ``bin_of(top1, bins)``, with null and NaN (which sort first, as the
    highest) in the top bin, so that the bin never decreases along (top1 descending)."""
    scaled = (pl.col("top1").cast(pl.Float64) * bins).floor().clip(0, bins - 1)  # as bin_of
    return scaled.fill_nan(bins - 1).fill_null(bins - 1).cast(pl.Int64)


def _in_classes(lf: pl.LazyFrame) -> pl.LazyFrame:
    return lf.filter(pl.col("top1_class").is_between(0, NUM_CLASSES - 1))


def class_cutoffs(eligible: Indexes, cap: int, cap_rows: int | None = None) -> pl.DataFrame:
    """For each class with more than ``cap`` eligible images, the last image it keeps:
    ``top1_class``, ``cut_top1``, ``cut_id`` (keep ``top1 > cut_top1``, or equal and
    ``id <= cut_id``), sorted by class.

    Pass 1 counts images per (class, ``CAP_BINS`` bin of top-1) over every partition; a class
    over ``cap`` keeps all its images in the bins above the one holding its ``cap``-th (top-1
    descending), and the first ``need`` of that boundary bin. Pass 2 reads only the boundary
    bins' rows, in groups of classes of at most ``cap_rows`` (``CAP_ROWS``) boundary rows (a
    class with more is a group alone), keeps a running first ``need`` per class in the order
    (top1 descending, id ascending) and takes the ``need``-th."""
    bins, cap_rows = CAP_BINS, cap_rows or CAP_ROWS
    schema = {"top1_class": pl.Int32, "cut_top1": pl.Float32, "cut_id": pl.Int64}
    cell = pl.col("top1_class").cast(pl.Int64) * bins + _cap_bin(bins)
    counts = np.zeros(NUM_CLASSES * bins, dtype=np.int64)
    for _, lf in eligible:  # pass 1
        part = _in_classes(lf).group_by(cell=cell).len().collect()
        # cells are distinct within one partition's counts: a plain fancy-index add is exact
        counts[part["cell"].to_numpy()] += part["len"].to_numpy()
    counts = counts.reshape(NUM_CLASSES, bins)
    capped = np.flatnonzero(counts.sum(axis=1) > cap)
    if not len(capped):
        return pl.DataFrame(schema=schema)
    below = counts[capped, ::-1]  # per capped class, bins from the top down
    del counts
    np.cumsum(below, axis=1, out=below)
    top_down = np.argmax(below >= cap, axis=1)  # the boundary bin, counted from the top
    kept_above = np.where(top_down > 0, below[np.arange(len(capped)), top_down - 1], 0)
    boundary = (bins - 1 - top_down).astype(np.int64)
    in_bin = below[np.arange(len(capped)), top_down] - kept_above
    del below
    wanted = pl.DataFrame(
        {
            "top1_class": capped.astype(np.int32),
            "cell": capped.astype(np.int64) * bins + boundary,
            "need": (cap - kept_above).astype(np.int64),
            "in_bin": in_bin.astype(np.int64),
        }
    )
    order = {"by": ["top1_class", "top1", "id"], "descending": [False, True, False]}
    rank = pl.int_range(pl.len()).over("top1_class")
    found = []
    for group in _groups(wanted, cap_rows):  # pass 2
        cells = group["cell"]
        best: pl.DataFrame | None = None
        for _, lf in eligible:
            rows = (
                _in_classes(lf)
                .filter(cell.is_in(cells.implode()))
                .select(pl.col("top1_class").cast(pl.Int32), "top1", "id")
                .collect()
            )
            merged = rows if best is None else pl.concat([best, rows], how="vertical_relaxed")
            best = (
                merged.join(group.select("top1_class", "need"), on="top1_class")
                .sort(**order)
                .filter(rank < pl.col("need"))
                .drop("need")
            )
        assert best is not None  # sorted, at most ``need`` rows a class: its last is the cut
        cut = best.group_by("top1_class").agg(
            cut_top1=pl.col("top1").last(), cut_id=pl.col("id").last(), n=pl.len()
        )
        got = group.join(cut, on="top1_class", how="left")
        if got.height != group.height or (got["n"].fill_null(0) != got["need"]).any():
            raise RuntimeError(
                "class caps: the second pass found fewer images in a class's boundary bin than "
                "the first counted: an index changed while the plan read it"
            )
        found.append(got.select("top1_class", "cut_top1", "cut_id"))
    return pl.concat(found).cast(schema).sort("top1_class")


def _groups(wanted: pl.DataFrame, cap_rows: int) -> list[pl.DataFrame]:
    """``wanted`` (by class) in consecutive groups whose boundary rows sum to at most
    ``cap_rows``, at least one class each."""
    groups, start, rows = [], 0, 0
    sizes = wanted["in_bin"].to_list()
    for i, n in enumerate(sizes):
        if i > start and rows + n > cap_rows:
            groups.append(wanted.slice(start, i - start))
            start, rows = i, 0
        rows += n
    groups.append(wanted.slice(start, len(sizes) - start))
    return groups


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
