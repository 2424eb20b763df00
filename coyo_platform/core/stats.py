"""Label statistics as small, exactly mergeable partial aggregates, computed in bounded memory.

A partition's labels are read a few shard files at a time (``aggregate_files``); each chunk is
reduced to an aggregate of counts, and aggregates are summed (``merge_aggregates``). The roll-up
over all partitions is the sum of the partition aggregates: no step ever holds more than one
chunk of label rows, and no step reads all rows at once.

Definitions, matching the card's threshold table (kakaobrain/coyo-dataset,
subset/COYO-Labeled-300M/README.md), for a threshold ``t``, with "above" meaning ``p >= t``:

- share of images kept: images whose top-1 probability is above ``t``, over all labeled images;
- labels per image: labels above ``t``, averaged over the kept images;
- unique labels: distinct classes that are above ``t`` in at least one image.

Probabilities are float32 (the card's ``label_probs``); ``p >= t`` is decided exactly as
``float64(p) >= t``, the comparison the subset uses, so the stats and the subset agree to the row.

Per partition the aggregate also carries a fine top-1 histogram (``FINE_BINS`` bins of width
2**-14, exact for float32 values) from which ``core.plan`` finds a target size's threshold, and the
partition's *index* (one row per labeled image: ``id``, ``phash``, ``top1``, ``top1_class``, sorted
by ``phash``) for the exact threshold, deduplication and class caps.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

#: The thresholds of the card's table.
CARD_THRESHOLDS: tuple[float, ...] = (0.05, 0.10, 0.15, 0.20, 0.25)
HISTOGRAM_BINS = 20
#: Fine top-1 histogram: bin ``b`` holds ``b / FINE_BINS <= p < (b + 1) / FINE_BINS`` (the last
#: bin also holds 1.0). Bin edges are powers of two apart, so float32 values fall in bins exactly.
FINE_BINS = 1 << 14
#: Label files read per chunk: 24 img2dataset shards of 10,000 images, ~240k rows (the whole
#: stats pass peaked at about 1 GB RSS per 5M-row partition in benchmarks/stats.py).
CHUNK_FILES = 24
VERSION = 2

INDEX_SCHEMA = pa.schema(
    [
        pa.field("id", pa.int64()),
        pa.field("phash", pa.uint64()),
        pa.field("top1", pa.float32()),
        pa.field("top1_class", pa.int32()),
    ]
)


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
    return labels.filter(pl.col("error").is_null()).select(
        pl.col("id").cast(pl.Int64),
        phash=pl.col("imagehash").str.to_integer(base=16, dtype=pl.UInt64, strict=False),
        top1=pl.col("label_probs").list.first().cast(pl.Float32),
        top1_class=pl.col("labels").list.first().cast(pl.Int32),
    )


def _reduce(ok: pl.DataFrame, failed: int, ts: tuple[float, ...]) -> dict[str, Any]:
    """One chunk of labeled images (``ok``; ``failed`` others) as count tables, summed across
    chunks by ``_combine``."""
    probs = pl.col("label_probs")
    # labels are sorted by probability, so those above t are a prefix: count them per row
    counts = ok.select(
        top1_class=pl.col("labels").list.first(),
        top1=probs.list.first().cast(pl.Float64),
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
    top1 = counts["top1"]
    return {
        "images": ok.height,
        "failed": failed,
        "levels": levels,
        "per_image": per_image,
        "top1": counts.group_by("top1_class").len(),
        "coarse": _bins(top1, HISTOGRAM_BINS),
        "fine": _bins(top1, FINE_BINS),
    }


def _bins(top1: pl.Series, bins: int) -> pl.DataFrame:
    b = (top1 * bins).floor().clip(0, bins - 1).cast(pl.Int32).alias("bin")
    return b.to_frame().group_by("bin").len()


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


def _to_aggregate(reduced: dict[str, Any], ts: tuple[float, ...]) -> dict:
    levels, per_image = reduced["levels"], reduced["per_image"]
    per_threshold = []
    for i, t in enumerate(ts):
        dist = per_image.filter(pl.col("t") == i)
        classes = levels.filter(pl.col("level") > i).group_by("cls").agg(pl.col("len").sum())
        per_threshold.append(
            {
                "threshold": t,
                "kept": int(dist["len"].sum()),
                "labels_above": int((dist["n"].cast(pl.Int64) * dist["len"]).sum()),
                "class_counts": _count_dict(classes, "cls"),
                "labels_per_image": _count_dict(dist, "n"),
            }
        )
    histogram = [0] * HISTOGRAM_BINS
    for b, n in reduced["coarse"].iter_rows():
        histogram[b] = int(n)
    return {
        "version": VERSION,
        "images": reduced["images"],
        "failed": reduced["failed"],
        "thresholds": per_threshold,
        "top1_counts": _count_dict(reduced["top1"], "top1_class"),
        "top1_histogram": histogram,
        "top1_fine": _count_dict(reduced["fine"], "bin"),
    }


def partial_aggregate(labels: pl.LazyFrame, thresholds: Sequence[float] = CARD_THRESHOLDS) -> dict:
    """Reduce labeled rows (``labels``, ``label_probs``, ``error`` columns) to an aggregate."""
    ts = check_thresholds(thresholds)
    frame = labels.select("labels", "label_probs", "error").collect()
    ok = frame.filter(pl.col("error").is_null())
    return _to_aggregate(_reduce(ok, frame.height - ok.height, ts), ts)


def aggregate_files(
    scan: Callable[[list[str]], pl.LazyFrame],
    files: Sequence[str],
    thresholds: Sequence[float] = CARD_THRESHOLDS,
    chunk_files: int = CHUNK_FILES,
) -> tuple[dict, pa.Table]:
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
        ok = frame.filter(pl.col("error").is_null())  # once, for the counts and the index
        parts.append(_reduce(ok, frame.height - ok.height, ts))
        index.append(index_frame(ok.lazy()).collect())
        if len(parts) >= 8:  # keep the count tables small: fold them as we go
            parts = [_combine(parts)]
    if not parts:
        return empty_aggregate(ts), INDEX_SCHEMA.empty_table()
    frame = pl.concat(index).sort("phash", nulls_last=True, maintain_order=True)
    return _to_aggregate(_combine(parts), ts), frame.to_arrow().cast(INDEX_SCHEMA)


def empty_aggregate(thresholds: Sequence[float] = CARD_THRESHOLDS) -> dict:
    empty = pl.DataFrame(
        schema={"labels": pl.List(pl.Int32), "label_probs": pl.List(pl.Float32), "error": pl.String}
    )
    return partial_aggregate(empty.lazy(), thresholds)


def _sum_counts(dicts: Iterable[dict[str, int]]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for d in dicts:
        total.update(d)
    return dict(total)


def merge_aggregates(aggregates: Iterable[dict]) -> dict:
    """Sum aggregates computed with the same thresholds into one (exact: counts only)."""
    aggregates = list(aggregates)
    if not aggregates:
        raise ValueError("no aggregates to merge")
    if any(a.get("version") != VERSION for a in aggregates):
        raise ValueError(
            "label stats written by an older version of the platform; "
            f"rematerialize label_stats (version {VERSION})"
        )
    thresholds = [t["threshold"] for t in aggregates[0]["thresholds"]]
    for agg in aggregates[1:]:
        if [t["threshold"] for t in agg["thresholds"]] != thresholds:
            raise ValueError(
                "cannot merge label stats computed with different thresholds: "
                f"{thresholds} and {[t['threshold'] for t in agg['thresholds']]}"
            )
    merged_thresholds = []
    for i, t in enumerate(thresholds):
        per_t = [a["thresholds"][i] for a in aggregates]
        merged_thresholds.append(
            {
                "threshold": t,
                "kept": sum(p["kept"] for p in per_t),
                "labels_above": sum(p["labels_above"] for p in per_t),
                "class_counts": _sum_counts(p["class_counts"] for p in per_t),
                "labels_per_image": _sum_counts(p["labels_per_image"] for p in per_t),
            }
        )
    return {
        "version": VERSION,
        "images": sum(a["images"] for a in aggregates),
        "failed": sum(a["failed"] for a in aggregates),
        "thresholds": merged_thresholds,
        "top1_counts": _sum_counts(a["top1_counts"] for a in aggregates),
        "top1_histogram": [
            sum(col) for col in zip(*(a["top1_histogram"] for a in aggregates), strict=True)
        ],
        "top1_fine": _sum_counts(a["top1_fine"] for a in aggregates),
    }


def threshold_table(agg: dict) -> list[dict[str, Any]]:
    """The card's table: threshold, labels per image, unique labels, share of images kept."""
    rows = []
    for t in agg["thresholds"]:
        kept = t["kept"]
        rows.append(
            {
                "threshold": t["threshold"],
                "labels_per_image": t["labels_above"] / kept if kept else 0.0,
                "unique_labels": len(t["class_counts"]),
                "share_kept": kept / agg["images"] if agg["images"] else 0.0,
                "images_kept": kept,
            }
        )
    return rows


def threshold_table_markdown(agg: dict) -> str:
    lines = [
        "| threshold | labels per image | unique labels | images kept | share kept |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in threshold_table(agg):
        lines.append(
            f"| {r['threshold']:.2f} | {r['labels_per_image']:.2f} | {r['unique_labels']:,} "
            f"| {r['images_kept']:,} | {r['share_kept']:.2%} |"
        )
    return "\n".join(lines)


def top_classes_markdown(agg: dict, names: Sequence[str], n: int = 20) -> str:
    total = agg["images"] or 1
    top = sorted(agg["top1_counts"].items(), key=lambda kv: (-kv[1], int(kv[0])))[:n]
    lines = ["| label | class | top-1 images | share |", "|---:|---|---:|---:|"]
    for cls, count in top:
        lines.append(f"| {cls} | {names[int(cls)]} | {count:,} | {count / total:.2%} |")
    return "\n".join(lines)


def histogram_markdown(agg: dict) -> str:
    hist = agg["top1_histogram"]
    peak = max(hist, default=0) or 1
    width = 1 / len(hist) if hist else 0
    lines = ["| top-1 probability | images | |", "|---|---:|---|"]
    for i, count in enumerate(hist):
        bar = "█" * round(30 * count / peak)
        lines.append(f"| {i * width:.2f}–{(i + 1) * width:.2f} | {count:,} | {bar} |")
    return "\n".join(lines)


def labels_per_image_markdown(agg: dict, most: int = 10) -> str:
    """Kept images by how many labels clear each threshold (1, 2, ..., ``most``+)."""
    head = " | ".join(str(n) for n in range(1, most)) + f" | {most}+"
    lines = [f"| threshold | {head} |", "|---:|" + "---:|" * most]
    for t in agg["thresholds"]:
        dist = {int(k): v for k, v in t["labels_per_image"].items()}
        cells = [dist.get(n, 0) for n in range(1, most)]
        cells.append(sum(v for k, v in dist.items() if k >= most))
        lines.append(f"| {t['threshold']:.2f} | " + " | ".join(f"{c:,}" for c in cells) + " |")
    return "\n".join(lines)


def class_changes(agg: dict, n: int = 10) -> list[dict[str, Any]]:
    """For each pair of consecutive thresholds, the classes that lose the most images above
    the threshold (in count and in share of their images) going from the lower to the higher."""
    changes = []
    for low, high in zip(agg["thresholds"], agg["thresholds"][1:], strict=False):
        before, after = low["class_counts"], high["class_counts"]
        lost = {c: before[c] - after.get(c, 0) for c in before}
        share = {c: lost[c] / before[c] for c in before if before[c] >= 20}
        changes.append(
            {
                "from": low["threshold"],
                "to": high["threshold"],
                "most_lost": sorted(lost.items(), key=lambda kv: (-kv[1], int(kv[0])))[:n],
                "most_lost_share": sorted(share.items(), key=lambda kv: (-kv[1], int(kv[0])))[:n],
                "least_lost_share": sorted(share.items(), key=lambda kv: (kv[1], int(kv[0])))[:n],
                "classes_gone": sorted((c for c in before if c not in after), key=int),
            }
        )
    return changes


def class_changes_markdown(agg: dict, names: Sequence[str], n: int = 5) -> str:
    lines = [
        "| thresholds | loses most images | loses largest share | keeps largest share "
        "| classes gone |",
        "|---|---|---|---|---:|",
    ]

    def fmt(pairs: list, pct: bool) -> str:
        return "; ".join(
            f"{names[int(c)]} ({v:.0%})" if pct else f"{names[int(c)]} (-{v:,})"
            for c, v in pairs[:n]
        )

    for ch in class_changes(agg, n):
        lines.append(
            f"| {ch['from']:.2f} → {ch['to']:.2f} | {fmt(ch['most_lost'], False)} "
            f"| {fmt(ch['most_lost_share'], True)} | {fmt(ch['least_lost_share'], True)} "
            f"| {len(ch['classes_gone']):,} |"
        )
    return "\n".join(lines)


def class_counts_table(agg: dict, names: Sequence[str]) -> pa.Table:
    """Every class with its name, its top-1 images and its images above each threshold."""
    columns: dict[str, Any] = {
        "label": pa.array(range(len(names)), pa.int32()),
        "name": pa.array(names, pa.string()),
        "top1_images": pa.array(
            [agg["top1_counts"].get(str(i), 0) for i in range(len(names))], pa.int64()
        ),
    }
    for t in agg["thresholds"]:
        counts = t["class_counts"]
        columns[f"images_above_{t['threshold']:g}"] = pa.array(
            [counts.get(str(i), 0) for i in range(len(names))], pa.int64()
        )
    return pa.table(columns)
