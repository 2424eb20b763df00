"""Label stats into storage: a partition's aggregate (JSON) and index (parquet), the roll-up over
all partitions, each with its chart (PNG) beside it. Imports no ``dagster``."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

from coyo_platform.common import layout, shards
from coyo_platform.common.labelspace import class_names
from coyo_platform.common.storage import Storage
from coyo_platform.stats import chart
from coyo_platform.stats.aggregate import (
    Aggregate,
    StatsSettings,
    aggregate_files,
    merge_aggregates,
)
from coyo_platform.stats.report import class_counts_table, top_classes

#: How long a chart's presigned address stays valid.
CHART_LINK_SECONDS = 7 * 24 * 3600


@dataclass
class Written:
    aggregate: Aggregate
    url: str  # the stats JSON
    chart: str  # the PNG beside it
    chart_link: str | None  # an https address for the UI (S3 only, long-lived credentials only)


def carries_session_token(link: str) -> bool:
    """Whether a presigned address holds a session token (it was signed with temporary
    credentials: an ECS task role's, SSO's, an assumed role's). Such an address *is* a
    credential: whoever reads it can act as the role until the token expires."""
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(link).query)
    return any(name.lower() == "x-amz-security-token" for name in query)


def _with_chart(store: Storage, agg: Aggregate, url: str) -> Written:
    """Write the chart beside the stats JSON. The Dagster UI's markdown drops ``data:`` images,
    so it shows the chart inline only from an http(s) address: on S3, a presigned URL, and only
    when signed with long-lived keys (under temporary credentials that address would put the
    session token into the run's metadata)."""
    png = chart.stats_chart(agg.top1_histogram, top_classes(agg, class_names(), n=10))
    png_url = layout.chart(url)
    store.write_bytes(png_url, png)
    link = store.presigned_url(png_url, seconds=CHART_LINK_SECONDS)
    return Written(agg, url, png_url, link if link and not carries_session_token(link) else None)


def write_partition_stats(store: Storage, key: str, settings: StatsSettings) -> Written:
    """The stats of the partition's current label set (``shards.current_labeler``)."""
    labeler = shards.current_labeler(store, key)
    files = shards.label_files(store, key, labeler) if labeler else []
    if not files:
        raise FileNotFoundError(
            f"no labeled shards for {key} under {layout.label_sets(store)}: label them first"
        )
    # the index before the JSON: a plan reads both
    agg = aggregate_files(files, settings.thresholds, store, index_url=layout.index(store, key))
    agg.labelers = [labeler]
    url = layout.stats(store, key)
    store.write_json(url, agg.to_json(), compact=True)
    return _with_chart(store, agg, url)


def write_rollup(store: Storage) -> tuple[Written, list[str]]:
    """The sum of every partition's stats, and every class's counts with its name."""
    keys = layout.partitions_with_stats(store)
    if not keys:
        raise FileNotFoundError(
            f"no label stats under {store.url(layout.STATS)}: materialize label_stats"
        )
    agg = merge_aggregates(
        Aggregate.from_json(store.read_json(layout.stats(store, k))) for k in keys
    )
    url = layout.rollup(store)
    store.write_json(url, agg.to_json(), compact=True)
    store.write_parquet(layout.class_counts(store), class_counts_table(agg, class_names()))
    return _with_chart(store, agg, url), keys
