import dagster as dg

from coyo_platform.assets import GROUP, ONE_PARTITION_PER_RUN, REFRESH, REFRESH_ROLLUP
from coyo_platform.assets.labeled_shards import labeled_shards
from coyo_platform.core import charts, stats
from coyo_platform.core.labelspace import class_names
from coyo_platform.core.storage import LABELS, STATS, Storage, label_files
from coyo_platform.partitions import coyo_parts
from coyo_platform.resources import StorageResource

ROLLUP_FILE = "_all_partitions.json"


def _chart(store: Storage, agg: dict, url: str) -> dict:
    """The chart as a PNG beside the stats JSON. The Dagster UI's markdown drops ``data:`` images,
    so it shows the chart inline only from an http(s) address: on S3, a presigned URL (7 days)."""
    names = class_names()
    top = sorted(agg["top1_counts"].items(), key=lambda kv: (-kv[1], int(kv[0])))[:10]
    png = charts.stats_chart(agg["top1_histogram"], [(names[int(c)], n) for c, n in top])
    png_url = url.removesuffix(".json") + ".png"
    store.write_bytes(png_url, png)
    metadata: dict = {"chart": dg.MetadataValue.path(png_url)}
    link = store.presigned_url(png_url, seconds=7 * 24 * 3600)
    if link:
        metadata["chart_image"] = dg.MetadataValue.md(f"![top-1 histogram and classes]({link})")
    return metadata


def _metadata(agg: dict, url: str) -> dict:
    return {
        "images_labeled": agg["images"],
        "images_failed": agg["failed"],
        "threshold_table": dg.MetadataValue.md(stats.threshold_table_markdown(agg)),
        "top1_classes": dg.MetadataValue.md(stats.top_classes_markdown(agg, class_names())),
        "top1_histogram": dg.MetadataValue.md(stats.histogram_markdown(agg)),
        "path": dg.MetadataValue.path(url),
    }


@dg.asset(
    partitions_def=coyo_parts,
    deps=[labeled_shards],
    group_name=GROUP,
    kinds={"polars"},
    automation_condition=REFRESH,
    backfill_policy=ONE_PARTITION_PER_RUN,
)
def label_stats(
    context: dg.AssetExecutionContext, storage: StorageResource
) -> dg.MaterializeResult:
    """The card's threshold table, top-1 classes and top-1 probability histogram of a partition."""
    store, key = storage.store(), context.partition_key
    files = label_files(store, key)
    if not files:
        raise FileNotFoundError(f"no labeled shards for {key} in {store.url(LABELS, key)}")
    agg = stats.partial_aggregate(store.scan_parquet(files))
    url = store.url(STATS, f"{key}.json")
    store.write_json(url, agg)
    return dg.MaterializeResult(metadata={**_metadata(agg, url), **_chart(store, agg, url)})


def rollup(store: Storage) -> tuple[dict, list[str]]:
    files = [f for f in store.glob(store.url(STATS, "*.json")) if not f.endswith(ROLLUP_FILE)]
    return stats.merge_aggregates(store.read_json(f) for f in files), files


@dg.asset(
    deps=[label_stats], group_name=GROUP, kinds={"polars"}, automation_condition=REFRESH_ROLLUP
)
def label_stats_rollup(storage: StorageResource) -> dg.MaterializeResult:
    """label_stats over all partitions, summed from the per-partition aggregates."""
    store = storage.store()
    agg, files = rollup(store)
    url = store.url(STATS, ROLLUP_FILE)
    store.write_json(url, agg)
    partitions = [f.rsplit("/", 1)[-1].removesuffix(".json") for f in files]
    return dg.MaterializeResult(
        metadata={
            **_metadata(agg, url),
            **_chart(store, agg, url),
            "partitions": len(files),
            "partition_keys": partitions,
        }
    )
