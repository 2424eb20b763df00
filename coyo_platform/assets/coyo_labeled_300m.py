import dagster as dg
import polars as pl

from coyo_platform.assets import GROUP, ONE_PARTITION_PER_RUN, REFRESH
from coyo_platform.assets.label_stats import label_stats
from coyo_platform.assets.labeled_shards import labeled_shards
from coyo_platform.core.schema import CARD_SCHEMA
from coyo_platform.core.storage import METADATA, SUBSET, label_files
from coyo_platform.core.subset import DEFAULT_THRESHOLD, build_subset, check_threshold
from coyo_platform.partitions import coyo_parts
from coyo_platform.resources import StorageResource


class SubsetConfig(dg.Config):
    threshold: float = DEFAULT_THRESHOLD
    """Keep rows whose top-1 probability is >= this (see core/subset.py for the default)."""


@dg.asset(
    partitions_def=coyo_parts,
    deps=[labeled_shards, label_stats],
    automation_condition=REFRESH,
    backfill_policy=ONE_PARTITION_PER_RUN,
    group_name=GROUP,
    kinds={"parquet"},
)
def coyo_labeled_300m(
    context: dg.AssetExecutionContext, config: SubsetConfig, storage: StorageResource
) -> dg.MaterializeResult:
    """The COYO-Labeled-300M rows of a partition, in exactly the card's schema."""
    check_threshold(config.threshold)
    store, key = storage.store(), context.partition_key
    files = label_files(store, key)
    if files:
        metadata = store.scan_parquet(store.url(METADATA, f"{key}.parquet"))
        table, labeled = build_subset(store.scan_parquet(files), metadata, config.threshold)
    else:
        table, labeled = CARD_SCHEMA.empty_table(), 0
    url = store.url(SUBSET, f"{key}.parquet")
    store.write_parquet(url, table)
    preview = pl.from_arrow(table.slice(0, 5)).with_columns(
        pl.col("labels").list.head(3), pl.col("label_probs").list.head(3)
    )
    return dg.MaterializeResult(
        metadata={
            "rows": table.num_rows,
            "images_labeled": labeled,
            "share_kept": round(table.num_rows / labeled, 4) if labeled else 0.0,
            "threshold": config.threshold,
            "path": dg.MetadataValue.path(url),
            "preview": dg.MetadataValue.md(_markdown(preview)),
        }
    )


def _markdown(frame: pl.DataFrame) -> str:
    head = "| " + " | ".join(frame.columns) + " |\n|" + "---|" * len(frame.columns)
    rows = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.iter_rows()]
    return "\n".join([head, *rows])


@dg.asset_check(asset=coyo_labeled_300m, partitions_def=coyo_parts, blocking=True)
def card_schema(
    context: dg.AssetCheckExecutionContext, storage: StorageResource
) -> dg.AssetCheckResult:
    """The written subset has exactly the card's columns, types and order, and unique ids."""
    store = storage.store()
    frame = store.scan_parquet(store.url(SUBSET, f"{context.partition_key}.parquet"))
    schema = frame.collect_schema()
    expected = pl.Schema(pl.from_arrow(CARD_SCHEMA.empty_table()).schema)
    rows, unique = frame.select(pl.len(), pl.col("id").n_unique()).collect().row(0)
    return dg.AssetCheckResult(
        passed=schema == expected and rows == unique,
        metadata={
            "columns": ", ".join(f"{k} {v}" for k, v in schema.items()),
            "matches_card": schema == expected,
            "rows": rows,
            "duplicate_ids": rows - unique,
        },
    )
