import urllib.parse

import dagster as dg
from pydantic import Field

from coyo_platform.assets import GROUP, ONE_PARTITION_PER_RUN, REFRESH, REFRESH_ROLLUP
from coyo_platform.assets.labeled_shards import labeled_shards
from coyo_platform.core import charts, stats
from coyo_platform.core.labelspace import class_names
from coyo_platform.core.plan import index_url
from coyo_platform.core.storage import LABELS, STATS, Storage, label_files
from coyo_platform.partitions import coyo_parts
from coyo_platform.resources import StorageResource

ROLLUP_FILE = "_all_partitions.json"
CLASSES_FILE = "_classes.parquet"


class StatsConfig(dg.Config):
    thresholds: list[float] = Field(default_factory=lambda: list(stats.CARD_THRESHOLDS))
    """Rows of the threshold table (default: the card's 0.05-0.25). Every partition must use the
    same list for the roll-up; changing it means rematerializing all partitions' stats."""


def carries_session_token(link: str) -> bool:
    """Whether a presigned address holds a session token (it was signed with temporary
    credentials: an ECS task role's, SSO's, an assumed role's). Such an address *is* a
    credential: whoever reads it can act as the role until the token expires."""
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(link).query)
    return any(name.lower() == "x-amz-security-token" for name in query)


def _chart(store: Storage, agg: dict, url: str) -> dict:
    """The chart as a PNG beside the stats JSON, recorded by its path. The Dagster UI's markdown
    drops ``data:`` images, so it shows the chart inline only from an http(s) address: on S3, a
    presigned URL (7 days), and only when signed with long-lived keys; under temporary
    credentials that address would put the session token into the run's metadata, so there is
    none (open the ``chart`` path instead)."""
    names = class_names()
    top = sorted(agg["top1_counts"].items(), key=lambda kv: (-kv[1], int(kv[0])))[:10]
    png = charts.stats_chart(agg["top1_histogram"], [(names[int(c)], n) for c, n in top])
    png_url = url.removesuffix(".json") + ".png"
    store.write_bytes(png_url, png)
    metadata: dict = {"chart": dg.MetadataValue.path(png_url)}
    link = store.presigned_url(png_url, seconds=7 * 24 * 3600)
    if link and not carries_session_token(link):
        metadata["chart_image"] = dg.MetadataValue.md(f"![top-1 histogram and classes]({link})")
    return metadata


def _metadata(agg: dict, url: str) -> dict:
    names = class_names()
    return {
        "images_labeled": agg["images"],
        "images_failed": agg["failed"],
        "threshold_table": dg.MetadataValue.md(stats.threshold_table_markdown(agg)),
        "top1_classes": dg.MetadataValue.md(stats.top_classes_markdown(agg, names)),
        "top1_histogram": dg.MetadataValue.md(stats.histogram_markdown(agg)),
        "labels_per_image": dg.MetadataValue.md(stats.labels_per_image_markdown(agg)),
        "class_changes": dg.MetadataValue.md(stats.class_changes_markdown(agg, names)),
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
    context: dg.AssetExecutionContext, config: StatsConfig, storage: StorageResource
) -> dg.MaterializeResult:
    """The card's threshold table, per-class counts, top-1 histogram and labels-per-image of a
    partition, as mergeable counts; plus its index (id, pHash, top-1) for the sampling plan."""
    try:
        thresholds = stats.check_thresholds(config.thresholds)
    except ValueError as err:
        raise dg.Failure(str(err), allow_retries=False) from err
    store, key = storage.store(), context.partition_key
    files = label_files(store, key)
    if not files:
        raise FileNotFoundError(f"no labeled shards for {key} in {store.url(LABELS, key)}")
    agg, index = stats.aggregate_files(store.scan_parquet, files, thresholds)
    url = store.url(STATS, f"{key}.json")
    store.write_parquet(index_url(store, key), index)  # before the JSON: a plan reads both
    store.write_json(url, agg)
    return dg.MaterializeResult(
        metadata={
            **_metadata(agg, url),
            **_chart(store, agg, url),
            "index": dg.MetadataValue.path(index_url(store, key)),
        }
    )


def stats_partitions(store: Storage) -> list[str]:
    """Partitions with label stats (JSON and index both written)."""
    found = [f for f in store.glob(store.url(STATS, "*.json")) if not f.endswith(ROLLUP_FILE)]
    keys = [f.rsplit("/", 1)[-1].removesuffix(".json") for f in found]
    indexed = {f.rsplit("/", 1)[-1] for f in store.glob(store.url(STATS, "*.index.parquet"))}
    return [k for k in keys if f"{k}.index.parquet" in indexed]


def rollup(store: Storage) -> tuple[dict, list[str]]:
    keys = stats_partitions(store)
    if not keys:
        raise FileNotFoundError(f"no label stats under {store.url(STATS)}: materialize label_stats")
    return stats.merge_aggregates(
        store.read_json(store.url(STATS, f"{k}.json")) for k in keys
    ), keys


@dg.asset(
    deps=[label_stats], group_name=GROUP, kinds={"polars"}, automation_condition=REFRESH_ROLLUP
)
def label_stats_rollup(storage: StorageResource) -> dg.MaterializeResult:
    """label_stats over all partitions, summed from the per-partition aggregates, and every
    class's counts with its name (``_classes.parquet``)."""
    store = storage.store()
    agg, keys = rollup(store)
    url = store.url(STATS, ROLLUP_FILE)
    store.write_json(url, agg)
    classes_url = store.url(STATS, CLASSES_FILE)
    store.write_parquet(classes_url, stats.class_counts_table(agg, class_names()))
    return dg.MaterializeResult(
        metadata={
            **_metadata(agg, url),
            **_chart(store, agg, url),
            "classes": dg.MetadataValue.path(classes_url),
            "partitions": len(keys),
            "partition_keys": keys,
        }
    )
