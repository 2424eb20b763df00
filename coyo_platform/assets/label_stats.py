import dagster as dg

from coyo_platform.assets import (
    GROUP,
    ONE_PARTITION_PER_RUN,
    REFRESH,
    bad_input,
    code_version,
    config_for,
    metadata_table,
    settings_or_fail,
)
from coyo_platform.assets.labeled_shards import labeled_shards
from coyo_platform.common import layout, provenance
from coyo_platform.common.labelspace import class_names
from coyo_platform.partitions import coyo_parts
from coyo_platform.resources import StorageResource
from coyo_platform.stats import report
from coyo_platform.stats.aggregate import StatsSettings
from coyo_platform.stats.write import Written, write_partition_stats

StatsConfig = config_for(StatsSettings, "StatsConfig")


def stats_metadata(written: Written) -> dict:
    """What label stats show in the UI (a partition's, or the roll-up's)."""
    agg, names = written.aggregate, class_names()
    metadata = {
        "images_labeled": agg.images,
        "images_failed": agg.failed,
        "labelers": ", ".join(agg.labelers),
        "threshold_table": metadata_table(report.threshold_table(agg)),
        "top1_classes": metadata_table(report.top_classes_table(agg, names)),
        "top1_histogram": metadata_table(report.histogram_table(agg)),
        "labels_per_image": metadata_table(report.labels_per_image_table(agg)),
        "class_changes": metadata_table(report.class_changes_table(agg, names)),
        "path": dg.MetadataValue.path(written.url),
        "chart": dg.MetadataValue.path(written.chart),
    }
    if written.chart_link:
        image = f"![top-1 histogram and classes]({written.chart_link})"
        metadata["chart_image"] = dg.MetadataValue.md(image)
    return metadata


@dg.asset(
    partitions_def=coyo_parts,
    deps=[labeled_shards],
    group_name=GROUP,
    kinds={"polars"},
    automation_condition=REFRESH,
    backfill_policy=ONE_PARTITION_PER_RUN,
    code_version=code_version("label_stats", StatsSettings),
)
def label_stats(
    context: dg.AssetExecutionContext, config: StatsConfig, storage: StorageResource
) -> dg.MaterializeResult:
    """The card's threshold table, per-class counts, top-1 histogram and labels-per-image of a
    partition, as mergeable counts; plus its index (id, pHash, top-1) for the sampling plan."""
    settings = settings_or_fail(config, "label_stats")
    store, key = storage.store(), context.partition_key
    try:
        written = write_partition_stats(store, key, settings)
    except FileNotFoundError as err:  # nothing labeled: label first
        raise bad_input(f"label_stats[{key}]: {err}") from err
    return dg.MaterializeResult(
        data_version=dg.DataVersion(provenance.digest(written.aggregate.to_json())),
        metadata={
            **stats_metadata(written),
            "index": dg.MetadataValue.path(layout.index(store, key)),
        },
    )
