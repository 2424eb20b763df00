import dagster as dg
import polars as pl

from coyo_platform.assets import (
    GROUP,
    ONE_PARTITION_PER_RUN,
    REFRESH,
    bad_input,
    code_version,
    metadata_table,
)
from coyo_platform.assets.labeled_shards import labeled_shards
from coyo_platform.assets.subset_plan import subset_plan
from coyo_platform.common import layout, provenance
from coyo_platform.common.formats import CARD_SCHEMA
from coyo_platform.common.tables import Table
from coyo_platform.partitions import coyo_parts
from coyo_platform.resources import StorageResource
from coyo_platform.sample.plan import PlanMismatch, current_plan
from coyo_platform.sample.subset import StaleLabels, write_subset


def _preview(frame: pl.DataFrame) -> Table:
    columns = {name: "string" for name in frame.columns}
    return Table(columns, [{k: str(v) for k, v in row.items()} for row in frame.to_dicts()])


@dg.asset(
    partitions_def=coyo_parts,
    deps=[labeled_shards, subset_plan],
    automation_condition=REFRESH,
    backfill_policy=ONE_PARTITION_PER_RUN,
    group_name=GROUP,
    kinds={"parquet"},
    code_version=code_version("coyo_labeled_300m"),
)
def coyo_labeled_300m(
    context: dg.AssetExecutionContext, storage: StorageResource
) -> dg.MaterializeResult:
    """The COYO-Labeled-300M rows of a partition, in exactly the card's schema, as the sampling
    plan (``subset_plan``) decides; before any plan, the default one (threshold 0.22)."""
    store = storage.store()
    plan = current_plan(store)
    try:
        part = write_subset(store, plan, context.partition_key)
    except (PlanMismatch, StaleLabels) as err:
        raise bad_input(str(err)) from err
    return dg.MaterializeResult(
        data_version=dg.DataVersion(provenance.digest([plan.digest, part.labeler, part.rows])),
        metadata={
            "labeler": part.labeler or "none",
            "rows": part.rows,
            "images_labeled": part.labeled,
            "share_kept": round(part.rows / part.labeled, 4) if part.labeled else 0.0,
            "threshold": plan.threshold,
            "plan": "default (subset_plan never materialized)" if plan.default else plan.digest,
            "rows_expected_by_plan": -1 if part.expected is None else part.expected,
            "path": dg.MetadataValue.path(part.url),
            "preview": metadata_table(_preview(part.preview)),
        },
    )


@dg.asset_check(asset=coyo_labeled_300m, partitions_def=coyo_parts, blocking=True)
def card_schema(
    context: dg.AssetCheckExecutionContext, storage: StorageResource
) -> dg.AssetCheckResult:
    """The written subset has exactly the card's columns, types and order, and unique ids."""
    store = storage.store()
    frame = store.scan_parquet(layout.subset(store, context.partition_key))
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
