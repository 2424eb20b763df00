import dagster as dg

from coyo_platform.assets import GROUP, REFRESH_ROLLUP, code_version
from coyo_platform.assets.label_stats import label_stats, stats_metadata
from coyo_platform.common import layout
from coyo_platform.resources import StorageResource
from coyo_platform.stats.write import write_rollup


@dg.asset(
    deps=[label_stats],
    group_name=GROUP,
    kinds={"polars"},
    automation_condition=REFRESH_ROLLUP,
    code_version=code_version("label_stats_rollup"),
)
def label_stats_rollup(storage: StorageResource) -> dg.MaterializeResult:
    """label_stats over all partitions, summed from the per-partition aggregates, and every
    class's counts with its name (``_classes.parquet``)."""
    store = storage.store()
    written, keys = write_rollup(store)
    return dg.MaterializeResult(
        metadata={
            **stats_metadata(written),
            "classes": dg.MetadataValue.path(layout.class_counts(store)),
            "partitions": len(keys),
            "partition_keys": keys,
        }
    )
