"""The COYO-Labeled-300M subset of one partition: the rows the sampling plan keeps.

Output is exactly the card's schema and column order (``schema.CARD_SCHEMA``). ``url`` comes from
the source part, joined on COYO's ``id`` (never on row position); ``width``/``height`` are the
downloaded image's original size; ``imagehash`` is the pHash of the downloaded image. Which rows
are kept (threshold, duplicates, class caps) is ``core.plan``'s decision.
"""

from __future__ import annotations

import polars as pl
import pyarrow as pa

from coyo_platform.core.plan import DEFAULT_THRESHOLD, apply_caps, check_threshold
from coyo_platform.core.schema import CARD_SCHEMA

__all__ = ["DEFAULT_THRESHOLD", "build_subset", "check_threshold"]


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
    ok = labels.filter(pl.col("error").is_null())
    kept = (
        ok.with_columns(
            top1=pl.col("label_probs").list.first().cast(pl.Float32),
            top1_class=pl.col("labels").list.first().cast(pl.Int32),
        )
        .filter(pl.col("top1").cast(pl.Float64) >= threshold)
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
