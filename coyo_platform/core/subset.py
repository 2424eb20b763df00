"""The COYO-Labeled-300M subset of one partition: rows whose top-1 probability clears a threshold.

Output is exactly the card's schema and column order (``schema.CARD_SCHEMA``). ``url`` comes from
the source part, joined on COYO's ``id`` (never on row position); ``width``/``height`` are the
downloaded image's original size; ``imagehash`` is the pHash of the downloaded image.
"""

from __future__ import annotations

import polars as pl
import pyarrow as pa

from coyo_platform.core.schema import CARD_SCHEMA

#: Default top-1 threshold. Kakao did not publish theirs. Extrapolating the card's share-kept
#: column (96.7%, 85.8%, 74.5%, 64.3%, 55.6% at 0.05..0.25, falling ~8-11 points per 0.05) puts
#: 0.30 near 48% of labeled images: about 300M of the ~640M COYO-700M images still downloadable.
DEFAULT_THRESHOLD = 0.30


def check_threshold(threshold: float) -> float:
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    return threshold


def build_subset(
    labels: pl.LazyFrame, metadata: pl.LazyFrame, threshold: float
) -> tuple[pa.Table, int]:
    """Select the labeled rows whose top-1 probability is >= ``threshold``.

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
    kept_query = (
        ok.filter(pl.col("label_probs").list.first().cast(pl.Float64) >= threshold)
        .unique("id", keep="first", maintain_order=True)
        .join(metadata.select("id", "url"), on="id", how="left", maintain_order="left")
    )
    kept, labeled = pl.collect_all([kept_query, ok.select(pl.len())])
    strangers = kept.filter(pl.col("url").is_null())["id"]
    if len(strangers):
        raise ValueError(
            f"{len(strangers)} labeled id(s) are not in the source part, e.g. {strangers[0]}"
        )
    return kept.select(CARD_SCHEMA.names).to_arrow().cast(CARD_SCHEMA), labeled.item()
