"""Label statistics as small, exactly mergeable partial aggregates, computed in bounded memory.

A partition's labels are read a few shard files at a time (``aggregate_files``); each chunk is
reduced to counts, and aggregates are summed (``merge_aggregates``). The roll-up over all
partitions is the sum of the partition aggregates: no step ever holds more than one chunk of
label rows, and no step reads all rows at once.

Definitions, matching the card's threshold table (kakaobrain/coyo-dataset,
subset/COYO-Labeled-300M/README.md), for a threshold ``t``, with "above" meaning ``p >= t``:

- share of images kept: images whose top-1 probability is above ``t``, over all labeled images;
- labels per image: labels above ``t``, averaged over the kept images;
- unique labels: distinct classes that are above ``t`` in at least one image.

Probabilities are float32 (the card's ``label_probs``); ``p >= t`` is decided exactly as
``float64(p) >= t``, the comparison the subset uses, so the stats and the subset agree to the row.

Per partition the aggregate also carries a fine top-1 histogram (``FINE_BINS`` bins of width
2**-14, exact for float32 values) from which ``sample/plan.py`` finds a target size's threshold,
and the partition's *index* (``common.formats.INDEX_SCHEMA``: one row per labeled image, sorted by
pHash) for the exact threshold, deduplication and class caps. Imports no ``dagster``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import numpy as np
import polars as pl
import pyarrow as pa

from coyo_platform.common.formats import INDEX_SCHEMA, labeled_ok, top1, top1_class
from coyo_platform.common.settings import setting

#: The thresholds of the card's table.
CARD_THRESHOLDS: tuple[float, ...] = (0.05, 0.10, 0.15, 0.20, 0.25)
HISTOGRAM_BINS = 20
#: Fine top-1 histogram: bin ``b`` holds ``b / FINE_BINS <= p < (b + 1) / FINE_BINS`` (the last
#: bin also holds 1.0). Bin edges are powers of two apart, so float32 values fall in bins exactly.
FINE_BINS = 1 << 14
#: Label files read per chunk: 24 img2dataset shards of 10,000 images, ~240k rows (the whole
#: stats pass peaked at about 1 GB RSS per 5M-row partition in benchmarks/stats.py).
CHUNK_FILES = 24
VERSION = 3  # 3: the labelers the stats were computed from


def check_thresholds(thresholds: Sequence[float]) -> tuple[float, ...]:
    """Thresholds sorted ascending; each in [0, 1], at least one, no repeats."""
    values = tuple(float(t) for t in thresholds)
    if not values:
        raise ValueError("give at least one threshold")
    bad = [t for t in values if not 0.0 <= t <= 1.0]
    if bad:
        raise ValueError(f"thresholds must be in [0, 1], got {bad[0]}")
    if len(set(values)) != len(values):
        raise ValueError(f"thresholds repeat: {list(values)}")
    return tuple(sorted(values))


@dataclass(frozen=True)
class StatsSettings:
    """Which thresholds label stats count for (the rows of the card's table)."""

    thresholds: tuple[float, ...] = setting(
        CARD_THRESHOLDS,
        "rows of the threshold table (default: the card's); every partition must use the same "
        "list for the roll-up",
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "thresholds", check_thresholds(self.thresholds))


Values = TypeVar("Values", pl.Expr, pl.Series, np.ndarray)


def bin_of(values: Values, bins: int) -> Values:
    """The histogram bin (of ``bins`` equal bins over [0, 1]; 1.0 in the last) of top-1 values,
    compared in float64 as everywhere else."""
    if isinstance(values, np.ndarray):
        scaled = np.floor(values.astype(np.float64) * bins)
        return np.clip(scaled, 0, bins - 1).astype(np.int64)
    return (values.cast(pl.Float64) * bins).floor().clip(0, bins - 1).cast(pl.Int64)


def f32_cut(t: float) -> np.float32:
    """The smallest float32 ``c`` with ``c >= t``: for float32 ``p``, ``p >= c`` iff
    ``float64(p) >= t``, so comparisons run on float32 lists without casting them."""
    c = np.float32(t)
    if float(c) < t:
        c = np.nextafter(c, np.float32(np.inf))
    return c


def _cut(t: float) -> pl.Expr:
    return pl.lit(f32_cut(t), dtype=pl.Float32)


def _count_dict(frame: pl.DataFrame, key: str, value: str = "len") -> dict[str, int]:
    return dict(zip(frame[key].cast(pl.String).to_list(), frame[value].to_list(), strict=True))


def index_frame(labels: pl.LazyFrame) -> pl.LazyFrame:
    """One row per labeled image: ``id``, ``phash`` (the pHash as uint64), ``top1``,
    ``top1_class``."""
    return labels.filter(labeled_ok()).select(
        pl.col("id").cast(pl.Int64),
        phash=pl.col("imagehash").str.to_integer(base=16, dtype=pl.UInt64, strict=False),
        top1=top1(),
        top1_class=top1_class(),
    )


@dataclass
class ThresholdCounts:
    threshold: float
    kept: int  # images whose top-1 is above the threshold
    labels_above: int  # (label, image) pairs above it, over the kept images
    class_counts: dict[str, int]  # class -> images where it is above the threshold
    labels_per_image: dict[str, int]  # labels above it -> kept images with that many


@dataclass
class Aggregate:
    """Counts only, so that aggregates add up exactly. Dict keys are strings (class ids, bins),
    as in the JSON each partition's stats are stored as."""

    images: int
    failed: int
    thresholds: list[ThresholdCounts]
    top1_counts: dict[str, int]
    top1_histogram: list[int]  # HISTOGRAM_BINS bins
    top1_fine: dict[str, int]  # FINE_BINS bins, the empty ones left out
    labelers: list[str] = field(default_factory=list)  # the label sets counted (labeler ids)
    version: int = VERSION

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Aggregate:
        if value.get("version") != VERSION:
            raise ValueError(
                "label stats written by an older version of the platform; "
                f"rematerialize label_stats (version {VERSION})"
            )
        thresholds = [ThresholdCounts(**t) for t in value["thresholds"]]
        return cls(**{**value, "thresholds": thresholds})

    @property
    def threshold_values(self) -> list[float]:
        return [t.threshold for t in self.thresholds]


def _reduce(ok: pl.DataFrame, failed: int, ts: tuple[float, ...]) -> dict[str, Any]:
    """One chunk of labeled images (``ok``; ``failed`` others) as count tables, summed across
    chunks by ``_combine``."""
    probs = pl.col("label_probs")
    # labels are sorted by probability, so those above t are a prefix: count them per row
    counts = ok.select(
        top1_class(),
        top1(),
        **{f"n{i}": probs.list.eval(pl.element() >= _cut(t)).list.sum() for i, t in enumerate(ts)},
    )
    # the (label, probability) pairs above the lowest threshold, each with how many it clears
    levels = (
        ok.select("labels", "label_probs")
        .with_columns(n0=counts["n0"])
        .select(cls=pl.col("labels").list.head("n0"), p=probs.list.head("n0"))
        .explode("cls", "p")
        .drop_nulls("cls")
        .group_by(
            "cls",
            level=pl.sum_horizontal([(pl.col("p") >= _cut(t)).cast(pl.Int8) for t in ts]),
        )
        .len()
    )
    per_image = pl.concat(
        [
            counts.select(t=pl.lit(i, pl.Int8), n=pl.col(f"n{i}").cast(pl.Int32))
            .filter(pl.col("n") > 0)
            .group_by("t", "n")
            .len()
            for i in range(len(ts))
        ]
    )
    top = counts["top1"]
    return {
        "images": ok.height,
        "failed": failed,
        "levels": levels,
        "per_image": per_image,
        "top1": counts.group_by("top1_class").len(),
        "coarse": bin_of(top, HISTOGRAM_BINS).alias("bin").to_frame().group_by("bin").len(),
        "fine": bin_of(top, FINE_BINS).alias("bin").to_frame().group_by("bin").len(),
    }


_KEYS = {
    "levels": ("cls", "level"),
    "per_image": ("t", "n"),
    "top1": ("top1_class",),
    "coarse": ("bin",),
    "fine": ("bin",),
}


def _combine(parts: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "images": sum(p["images"] for p in parts),
        "failed": sum(p["failed"] for p in parts),
    }
    for name, keys in _KEYS.items():
        out[name] = pl.concat([p[name] for p in parts]).group_by(*keys).agg(pl.col("len").sum())
    return out


def _to_aggregate(reduced: dict[str, Any], ts: tuple[float, ...]) -> Aggregate:
    levels, per_image = reduced["levels"], reduced["per_image"]
    per_threshold = []
    for i, t in enumerate(ts):
        dist = per_image.filter(pl.col("t") == i)
        classes = levels.filter(pl.col("level") > i).group_by("cls").agg(pl.col("len").sum())
        per_threshold.append(
            ThresholdCounts(
                threshold=t,
                kept=int(dist["len"].sum()),
                labels_above=int((dist["n"].cast(pl.Int64) * dist["len"]).sum()),
                class_counts=_count_dict(classes, "cls"),
                labels_per_image=_count_dict(dist, "n"),
            )
        )
    histogram = [0] * HISTOGRAM_BINS
    for b, n in reduced["coarse"].iter_rows():
        histogram[b] = int(n)
    return Aggregate(
        images=reduced["images"],
        failed=reduced["failed"],
        thresholds=per_threshold,
        top1_counts=_count_dict(reduced["top1"], "top1_class"),
        top1_histogram=histogram,
        top1_fine=_count_dict(reduced["fine"], "bin"),
    )


def partial_aggregate(
    labels: pl.LazyFrame, thresholds: Sequence[float] = CARD_THRESHOLDS
) -> Aggregate:
    """Reduce labeled rows (``labels``, ``label_probs``, ``error`` columns) to an aggregate."""
    ts = check_thresholds(thresholds)
    frame = labels.select("labels", "label_probs", "error").collect()
    ok = frame.filter(labeled_ok())
    return _to_aggregate(_reduce(ok, frame.height - ok.height, ts), ts)


def aggregate_files(
    scan: Callable[[list[str]], pl.LazyFrame],
    files: Sequence[str],
    thresholds: Sequence[float] = CARD_THRESHOLDS,
    chunk_files: int = CHUNK_FILES,
) -> tuple[Aggregate, pa.Table]:
    """A partition's aggregate and index, reading ``chunk_files`` label files at a time.

    Memory is one chunk's rows plus the index (24 bytes a row, ~140 MB for a COYO part).
    """
    ts = check_thresholds(thresholds)
    parts, index = [], []
    for start in range(0, len(files), chunk_files):
        frame = (
            scan(list(files[start : start + chunk_files]))
            .select("id", "imagehash", "labels", "label_probs", "error")
            .collect()
        )
        ok = frame.filter(labeled_ok())  # once, for the counts and the index
        parts.append(_reduce(ok, frame.height - ok.height, ts))
        index.append(index_frame(ok.lazy()).collect())
        if len(parts) >= 8:  # keep the count tables small: fold them as we go
            parts = [_combine(parts)]
    if not parts:
        return empty_aggregate(ts), INDEX_SCHEMA.empty_table()
    frame = pl.concat(index).sort("phash", nulls_last=True, maintain_order=True)
    return _to_aggregate(_combine(parts), ts), frame.to_arrow().cast(INDEX_SCHEMA)


def empty_aggregate(thresholds: Sequence[float] = CARD_THRESHOLDS) -> Aggregate:
    empty = pl.DataFrame(
        schema={"labels": pl.List(pl.Int32), "label_probs": pl.List(pl.Float32), "error": pl.String}
    )
    return partial_aggregate(empty.lazy(), thresholds)


def _sum_counts(dicts: Iterable[dict[str, int]]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for d in dicts:
        total.update(d)
    return dict(total)


def merge_aggregates(aggregates: Iterable[Aggregate]) -> Aggregate:
    """Sum aggregates computed with the same thresholds into one (exact: counts only)."""
    aggregates = list(aggregates)
    if not aggregates:
        raise ValueError("no aggregates to merge")
    thresholds = aggregates[0].threshold_values
    for agg in aggregates[1:]:
        if agg.threshold_values != thresholds:
            raise ValueError(
                "cannot merge label stats computed with different thresholds: "
                f"{thresholds} and {agg.threshold_values}"
            )
    merged = []
    for i, t in enumerate(thresholds):
        per_t = [a.thresholds[i] for a in aggregates]
        merged.append(
            ThresholdCounts(
                threshold=t,
                kept=sum(p.kept for p in per_t),
                labels_above=sum(p.labels_above for p in per_t),
                class_counts=_sum_counts(p.class_counts for p in per_t),
                labels_per_image=_sum_counts(p.labels_per_image for p in per_t),
            )
        )
    return Aggregate(
        images=sum(a.images for a in aggregates),
        failed=sum(a.failed for a in aggregates),
        thresholds=merged,
        top1_counts=_sum_counts(a.top1_counts for a in aggregates),
        top1_histogram=[
            sum(col) for col in zip(*(a.top1_histogram for a in aggregates), strict=True)
        ],
        top1_fine=_sum_counts(a.top1_fine for a in aggregates),
        labelers=sorted({labeler for a in aggregates for labeler in a.labelers}),
    )
