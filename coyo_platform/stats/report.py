"""What label stats show a person: the card's threshold table, the top classes, the top-1
histogram, labels per image, the classes that lose most between thresholds (as metadata
tables), and every class's counts (as parquet). Imports no ``dagster``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from coyo_platform.common.tables import Table
from coyo_platform.stats.aggregate import Aggregate


def threshold_rows(agg: Aggregate) -> list[dict[str, Any]]:
    """The card's table: threshold, labels per image, unique labels, share of images kept."""
    rows = []
    for t in agg.thresholds:
        rows.append(
            {
                "threshold": t.threshold,
                "labels_per_image": t.labels_above / t.kept if t.kept else 0.0,
                "unique_labels": len(t.class_counts),
                "share_kept": t.kept / agg.images if agg.images else 0.0,
                "images_kept": t.kept,
            }
        )
    return rows


def threshold_table(agg: Aggregate) -> Table:
    table = Table(
        {
            "threshold": "string",
            "labels per image": "float",
            "unique labels": "int",
            "images kept": "int",
            "share kept": "float",
        }
    )
    for r in threshold_rows(agg):
        table.records.append(
            {
                "threshold": f"{r['threshold']:.2f}",
                "labels per image": round(r["labels_per_image"], 2),
                "unique labels": r["unique_labels"],
                "images kept": r["images_kept"],
                "share kept": round(r["share_kept"], 4),
            }
        )
    return table


def _by_count(counts: dict[str, int]) -> list[tuple[str, int]]:
    return sorted(counts.items(), key=lambda kv: (-kv[1], int(kv[0])))


def top_classes(agg: Aggregate, names: Sequence[str], n: int = 20) -> list[tuple[str, int]]:
    """(name, top-1 images) of the ``n`` classes most often top-1."""
    return [(names[int(c)], count) for c, count in _by_count(agg.top1_counts)[:n]]


def top_classes_table(agg: Aggregate, names: Sequence[str], n: int = 20) -> Table:
    total = agg.images or 1
    table = Table({"label": "int", "class": "string", "top-1 images": "int", "share": "float"})
    for cls, count in _by_count(agg.top1_counts)[:n]:
        table.records.append(
            {
                "label": int(cls),
                "class": names[int(cls)],
                "top-1 images": count,
                "share": round(count / total, 4),
            }
        )
    return table


def histogram_table(agg: Aggregate) -> Table:
    hist = agg.top1_histogram
    peak = max(hist, default=0) or 1
    width = 1 / len(hist) if hist else 0
    table = Table({"top-1 probability": "string", "images": "int", "bar": "string"})
    for i, count in enumerate(hist):
        table.records.append(
            {
                "top-1 probability": f"{i * width:.2f}–{(i + 1) * width:.2f}",
                "images": count,
                "bar": "█" * round(30 * count / peak),
            }
        )
    return table


def labels_per_image_table(agg: Aggregate, most: int = 10) -> Table:
    """Kept images by how many labels clear each threshold (1, 2, ..., ``most``+)."""
    heads = [str(n) for n in range(1, most)] + [f"{most}+"]
    table = Table({"threshold": "string", **dict.fromkeys(heads, "int")})
    for t in agg.thresholds:
        dist = {int(k): v for k, v in t.labels_per_image.items()}
        cells = [dist.get(n, 0) for n in range(1, most)]
        cells.append(sum(v for k, v in dist.items() if k >= most))
        row = dict(zip(heads, cells, strict=True))
        table.records.append({"threshold": f"{t.threshold:.2f}", **row})
    return table


def class_changes(agg: Aggregate, n: int = 10) -> list[dict[str, Any]]:
    """For each pair of consecutive thresholds, the classes that lose the most images above
    the threshold (in count and in share of their images) going from the lower to the higher."""
    changes = []
    for low, high in zip(agg.thresholds, agg.thresholds[1:], strict=False):
        before, after = low.class_counts, high.class_counts
        lost = {c: before[c] - after.get(c, 0) for c in before}
        share = {c: lost[c] / before[c] for c in before if before[c] >= 20}
        changes.append(
            {
                "from": low.threshold,
                "to": high.threshold,
                "most_lost": _by_count(lost)[:n],
                "most_lost_share": sorted(share.items(), key=lambda kv: (-kv[1], int(kv[0])))[:n],
                "least_lost_share": sorted(share.items(), key=lambda kv: (kv[1], int(kv[0])))[:n],
                "classes_gone": sorted((c for c in before if c not in after), key=int),
            }
        )
    return changes


def class_changes_table(agg: Aggregate, names: Sequence[str], n: int = 5) -> Table:
    def fmt(pairs: list, pct: bool) -> str:
        return "; ".join(
            f"{names[int(c)]} ({v:.0%})" if pct else f"{names[int(c)]} (-{v:,})"
            for c, v in pairs[:n]
        )

    table = Table(
        {
            "thresholds": "string",
            "loses most images": "string",
            "loses largest share": "string",
            "keeps largest share": "string",
            "classes gone": "int",
        }
    )
    for ch in class_changes(agg, n):
        table.records.append(
            {
                "thresholds": f"{ch['from']:.2f} → {ch['to']:.2f}",
                "loses most images": fmt(ch["most_lost"], False),
                "loses largest share": fmt(ch["most_lost_share"], True),
                "keeps largest share": fmt(ch["least_lost_share"], True),
                "classes gone": len(ch["classes_gone"]),
            }
        )
    return table


def class_counts_table(agg: Aggregate, names: Sequence[str]) -> pa.Table:
    """Every class with its name, its top-1 images and its images above each threshold."""
    columns: dict[str, Any] = {
        "label": pa.array(range(len(names)), pa.int32()),
        "name": pa.array(names, pa.string()),
        "top1_images": pa.array(
            [agg.top1_counts.get(str(i), 0) for i in range(len(names))], pa.int64()
        ),
    }
    for t in agg.thresholds:
        columns[f"images_above_{t.threshold:g}"] = pa.array(
            [t.class_counts.get(str(i), 0) for i in range(len(names))], pa.int64()
        )
    return pa.table(columns)
