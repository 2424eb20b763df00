"""The COYO-Labeled-300M subset of one partition: the rows the sampling plan keeps.

Output is exactly the card's schema and column order (``common.formats.CARD_SCHEMA``). ``url``
comes from the source part, joined on COYO's ``id`` (never on row position); ``width``/``height``
are the downloaded image's original size; ``imagehash`` is the downloader's pHash of the
original image (the one pHash each image gets).
Which rows are kept (threshold, duplicates, class caps) is the plan's decision (``plan.py``).
Imports no ``dagster``.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
import pyarrow as pa

from coyo_platform.common import layout, shards
from coyo_platform.common.formats import CARD_SCHEMA, labeled_ok, top1, top1_class
from coyo_platform.common.storage import Storage
from coyo_platform.sample.plan import Plan, partition_filters
from coyo_platform.sample.rules import above, apply_caps, check_threshold
from coyo_platform.stats.aggregate import HISTOGRAM_BINS, bin_of

#: The plan's digest and the labeler in each subset file's parquet metadata (the manifest reads
#: them back).
PLAN_DIGEST_KEY = "coyo.plan_digest"
LABELER_KEY = "coyo.labeler"


def build_subset(
    labels: pl.LazyFrame,
    metadata: pl.LazyFrame,
    threshold: float,
    duplicates: pl.LazyFrame | None = None,
    cutoffs: pl.DataFrame | None = None,
) -> tuple[pa.Table, int]:
    """Select the labeled rows whose top-1 probability is >= ``threshold``, minus the plan's
    ``duplicates`` (rows with an ``id`` column) and beyond its class ``cutoffs``.

    Args:
        labels: the partition's labeled shards (``id``, ``imagehash``, ``labels``, ``label_probs``,
            ``width``, ``height``, ``error``), in shard order.
        metadata: the partition's source rows (``id``, ``url``).
        threshold: top-1 probability a row must reach to be kept.

    Returns:
        A table in exactly ``CARD_SCHEMA``, one row per id, in shard order, and the number of
        labeled images it was chosen from.

    Raises:
        ValueError: when a labeled id is not one of the source part's ids.
    """
    check_threshold(threshold)
    ok = labels.filter(labeled_ok())
    kept = (
        ok.with_columns(top1(), top1_class())
        .filter(above(threshold))
        .unique("id", keep="first", maintain_order=True)
    )
    if duplicates is not None:
        kept = kept.join(duplicates.select("id"), on="id", how="anti", maintain_order="left")
    kept = apply_caps(kept, cutoffs)
    kept_query = kept.join(metadata.select("id", "url"), on="id", how="left", maintain_order="left")
    kept, labeled = pl.collect_all([kept_query, ok.select(pl.len())])
    strangers = kept.filter(pl.col("url").is_null())["id"]
    if len(strangers):
        raise ValueError(
            f"{len(strangers)} labeled id(s) are not in the source part, e.g. {strangers[0]}"
        )
    return kept.select(CARD_SCHEMA.names).to_arrow().cast(CARD_SCHEMA), labeled.item()


def summarize(table: pa.Table | pl.LazyFrame) -> dict[str, object]:
    """What the dataset card counts of a subset file: its rows, the top-1 probability histogram
    (``HISTOGRAM_BINS`` bins over [0, 1]) and the images per top-1 class."""
    frame = table.lazy() if isinstance(table, pl.LazyFrame) else pl.from_arrow(table).lazy()
    top = frame.select(
        pl.col("labels").list.first().alias("cls"),
        bin_of(pl.col("label_probs").list.first(), HISTOGRAM_BINS).alias("bin"),
    )
    bins, classes = pl.collect_all(
        [top.group_by("bin").len().sort("bin"), top.group_by("cls").len().sort("cls")]
    )
    histogram = [0] * HISTOGRAM_BINS
    for b, n in bins.iter_rows():
        if b is not None:
            histogram[b] = n
    return {
        "rows": int(classes["len"].sum()) if classes.height else 0,
        "top1_histogram": histogram,
        "top1_classes": {str(c): n for c, n in classes.iter_rows() if c is not None},
    }


class StaleLabels(ValueError):
    """The partition's labels no longer give the rows its (global) plan counted."""


@dataclass
class SubsetPart:
    labeler: str | None
    url: str
    rows: int
    labeled: int
    expected: int | None  # the rows the plan counted for this partition, if it did
    preview: pl.DataFrame  # the first rows, labels cut to 3


def write_subset(store: Storage, plan: Plan, key: str) -> SubsetPart:
    """Build partition ``key``'s subset under ``plan`` and write it whole, with the plan's
    digest in the file's metadata.

    Raises:
        PlanMismatch: a global plan made without this partition.
        StaleLabels: a global plan that counted other rows than the labels now give.
    """
    duplicates, cutoffs = partition_filters(store, plan, key)
    labeler = shards.current_labeler(store, key)
    planned = plan.labelers.get(key)
    if planned is not None and planned != labeler:
        raise StaleLabels(
            f"{key}: the plan was made from the labels of {planned}, but the partition's current "
            f"labels are {labeler}'s: materialize label_stats for it, then subset_plan"
        )
    files = shards.label_files(store, key, labeler) if labeler else []
    if files:
        metadata = store.scan_parquet(layout.metadata(store, key))
        table, labeled = build_subset(
            store.scan_parquet(files), metadata, plan.threshold, duplicates, cutoffs
        )
    else:
        table, labeled = CARD_SCHEMA.empty_table(), 0
    expected = plan.rows_per_partition.get(key)
    if plan.is_global and expected is not None and expected != table.num_rows:
        raise StaleLabels(
            f"{key}: the plan expects {expected:,} rows but its labels now give "
            f"{table.num_rows:,}: the labels changed after the plan was made; rematerialize "
            "label_stats for it, then subset_plan"
        )
    url = layout.subset(store, key)
    table = table.replace_schema_metadata(
        {
            PLAN_DIGEST_KEY: plan.digest,
            LABELER_KEY: labeler or "",
            "coyo.threshold": repr(plan.threshold),
        }
    )
    store.remove_stale_temp(url)  # what a run killed while writing this file left
    store.write_parquet(url, table)
    summary = {"plan_digest": plan.digest, "labeler": labeler or "", **summarize(table)}
    store.write_json(layout.subset_summary(store, key), summary, compact=True)
    preview = pl.from_arrow(table.slice(0, 5)).with_columns(
        pl.col("labels").list.head(3), pl.col("label_probs").list.head(3)
    )
    return SubsetPart(labeler, url, table.num_rows, labeled, expected, preview)
