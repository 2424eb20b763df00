import dagster as dg
import polars as pl

from coyo_platform.assets import GROUP, ONE_PARTITION_PER_RUN, REFRESH
from coyo_platform.assets.labeled_shards import labeled_shards
from coyo_platform.assets.subset_plan import subset_plan
from coyo_platform.core import plan as plans
from coyo_platform.core.manifest import PLAN_DIGEST_KEY
from coyo_platform.core.schema import CARD_SCHEMA
from coyo_platform.core.storage import METADATA, SUBSET, label_files
from coyo_platform.core.subset import build_subset
from coyo_platform.partitions import coyo_parts
from coyo_platform.resources import StorageResource


@dg.asset(
    partitions_def=coyo_parts,
    deps=[labeled_shards, subset_plan],
    automation_condition=REFRESH,
    backfill_policy=ONE_PARTITION_PER_RUN,
    group_name=GROUP,
    kinds={"parquet"},
)
def coyo_labeled_300m(
    context: dg.AssetExecutionContext, storage: StorageResource
) -> dg.MaterializeResult:
    """The COYO-Labeled-300M rows of a partition, in exactly the card's schema, as the sampling
    plan (``subset_plan``) decides; before any plan, the default one (threshold 0.30)."""
    store, key = storage.store(), context.partition_key
    plan = plans.read_plan(store) or plans.default_plan()
    try:
        duplicates, cutoffs = plans.partition_filters(store, plan, key)
    except plans.PlanMismatch as err:
        raise dg.Failure(str(err), allow_retries=False) from err
    files = label_files(store, key)
    if files:
        metadata = store.scan_parquet(store.url(METADATA, f"{key}.parquet"))
        table, labeled = build_subset(
            store.scan_parquet(files), metadata, plan["threshold"], duplicates, cutoffs
        )
    else:
        table, labeled = CARD_SCHEMA.empty_table(), 0
    expected = plan.get("rows_per_partition", {}).get(key)
    if plan["global"] and expected is not None and expected != table.num_rows:
        raise dg.Failure(
            f"{key}: the plan expects {expected:,} rows but its labels now give "
            f"{table.num_rows:,}: the labels changed after the plan was made; rematerialize "
            "label_stats for it, then subset_plan",
            allow_retries=False,
        )
    url = store.url(SUBSET, f"{key}.parquet")
    table = table.replace_schema_metadata(
        {PLAN_DIGEST_KEY: plan["digest"], "coyo.threshold": repr(plan["threshold"])}
    )
    store.remove_stale_temp(url)  # what a run killed while writing this file left
    store.write_parquet(url, table)
    preview = pl.from_arrow(table.slice(0, 5)).with_columns(
        pl.col("labels").list.head(3), pl.col("label_probs").list.head(3)
    )
    return dg.MaterializeResult(
        metadata={
            "rows": table.num_rows,
            "images_labeled": labeled,
            "share_kept": round(table.num_rows / labeled, 4) if labeled else 0.0,
            "threshold": plan["threshold"],
            "plan": "default (subset_plan never materialized)"
            if plan.get("default")
            else plan["digest"],
            "rows_expected_by_plan": -1 if expected is None else expected,
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
