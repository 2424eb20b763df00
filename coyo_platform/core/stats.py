"""Label statistics as small, exactly mergeable partial aggregates.

A partition's labels are reduced once to an aggregate (counts only, a few hundred KB at most);
the all-partition rollup is the sum of the partition aggregates, never a second pass over rows.

Definitions, matching the card's threshold table (kakaobrain/coyo-dataset,
subset/COYO-Labeled-300M/README.md), for a threshold ``t``, with "above" meaning ``p >= t``:

- share of images kept: images whose top-1 probability is above ``t``, over all labeled images;
- labels per image: labels above ``t``, averaged over the kept images;
- unique labels: distinct classes that are above ``t`` in at least one image.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import polars as pl

#: The thresholds of the card's table.
CARD_THRESHOLDS: tuple[float, ...] = (0.05, 0.10, 0.15, 0.20, 0.25)
HISTOGRAM_BINS = 20


def _counts(frame: pl.DataFrame, column: str) -> dict[str, int]:
    counted = frame.group_by(column).len()
    return {str(k): int(n) for k, n in counted.iter_rows()}


def partial_aggregate(labels: pl.LazyFrame, thresholds: Sequence[float] = CARD_THRESHOLDS) -> dict:
    """Reduce labeled rows (``labels``, ``label_probs`` and ``error`` columns) to an aggregate."""
    ok = labels.filter(pl.col("error").is_null()).select(
        top1_class=pl.col("labels").list.first(),
        top1=pl.col("label_probs").list.first().cast(pl.Float64),
        labels=pl.col("labels"),
        probs=pl.col("label_probs").cast(pl.List(pl.Float64)),
    )
    queries = [
        labels.filter(pl.col("error").is_not_null()).select(pl.len()),
        ok.select("top1_class", "top1"),
    ]
    for t in thresholds:
        # probs are sorted descending, so the labels above t are a prefix of each list
        above = ok.select(
            kept=pl.col("top1") >= t,
            n_above=pl.col("probs").list.eval(pl.element() >= t).list.sum(),
            labels=pl.col("labels"),
        )
        queries.append(
            above.select(kept=pl.col("kept").sum(), labels_above=pl.col("n_above").sum())
        )
        queries.append(
            above.filter(pl.col("n_above") > 0)
            .select(cls=pl.col("labels").list.head(pl.col("n_above")))
            .explode("cls")
        )
    # one collect_all: polars shares the scan of the partition's files between the queries
    failed_frame, top, *per_t = pl.collect_all(queries)
    failed = failed_frame.item()
    bins = (
        top.select(b=(pl.col("top1") * HISTOGRAM_BINS).floor().clip(0, HISTOGRAM_BINS - 1))
        .group_by("b")
        .len()
    )
    histogram = [0] * HISTOGRAM_BINS
    for b, n in bins.iter_rows():
        histogram[int(b)] = int(n)

    per_threshold = []
    for t, sums, classes in zip(thresholds, per_t[0::2], per_t[1::2], strict=True):
        kept, labels_above = sums.row(0)
        per_threshold.append(
            {
                "threshold": float(t),
                "kept": int(kept or 0),
                "labels_above": int(labels_above or 0),
                "class_counts": _counts(classes, "cls"),
            }
        )
    return {
        "images": top.height,
        "failed": int(failed),
        "thresholds": per_threshold,
        "top1_counts": _counts(top, "top1_class"),
        "top1_histogram": histogram,
    }


def merge_aggregates(aggregates: Iterable[dict]) -> dict:
    """Sum partition aggregates computed with the same thresholds into one."""
    aggregates = list(aggregates)
    if not aggregates:
        return {"images": 0, "failed": 0, "thresholds": [], "top1_counts": {}, "top1_histogram": []}
    thresholds = [t["threshold"] for t in aggregates[0]["thresholds"]]
    for agg in aggregates[1:]:
        if [t["threshold"] for t in agg["thresholds"]] != thresholds:
            raise ValueError("cannot merge label stats computed with different thresholds")
    merged_thresholds = []
    for i, t in enumerate(thresholds):
        classes: Counter[str] = Counter()
        for agg in aggregates:
            classes.update(agg["thresholds"][i]["class_counts"])
        merged_thresholds.append(
            {
                "threshold": t,
                "kept": sum(a["thresholds"][i]["kept"] for a in aggregates),
                "labels_above": sum(a["thresholds"][i]["labels_above"] for a in aggregates),
                "class_counts": dict(classes),
            }
        )
    top1: Counter[str] = Counter()
    for agg in aggregates:
        top1.update(agg["top1_counts"])
    return {
        "images": sum(a["images"] for a in aggregates),
        "failed": sum(a["failed"] for a in aggregates),
        "thresholds": merged_thresholds,
        "top1_counts": dict(top1),
        "top1_histogram": [
            sum(col) for col in zip(*(a["top1_histogram"] for a in aggregates), strict=True)
        ],
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
