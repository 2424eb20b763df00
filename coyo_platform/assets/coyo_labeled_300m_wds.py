"""Webdataset shards of a partition's kept images (logic in ``sample.wds``)."""

import dagster as dg

from coyo_platform.assets import (
    GROUP,
    KEEP_CURRENT,
    ONE_PARTITION_PER_RUN,
    bad_input,
    code_version,
    config_for,
    settings_or_fail,
)
from coyo_platform.assets.coyo_labeled_300m import coyo_labeled_300m
from coyo_platform.common import provenance
from coyo_platform.partitions import coyo_parts
from coyo_platform.resources import StorageResource
from coyo_platform.sample.wds import WdsRefused, WdsSettings, write_wds

WdsConfig = config_for(WdsSettings, "WdsConfig")


@dg.asset(
    partitions_def=coyo_parts,
    deps=[coyo_labeled_300m],
    group_name=GROUP,
    kinds={"webdataset"},
    automation_condition=KEEP_CURRENT,
    backfill_policy=ONE_PARTITION_PER_RUN,
    code_version=code_version("coyo_labeled_300m_wds", WdsSettings),
)
def coyo_labeled_300m_wds(
    context: dg.AssetExecutionContext, config: WdsConfig, storage: StorageResource
) -> dg.MaterializeResult:
    """The images of the partition's subset rows, as downloaded, with ``.cls`` (top-1) and
    ``.json`` (the row), in ``NNNNN.tar`` shards of about ``shard_bytes``: the training set
    without a second crawl. Materialized by a person first (a backfill); automation then keeps
    the partitions that have shards current when their subset part changes. Resumes after the
    last shard written; a part whose rows did not change keeps its shards."""
    settings = settings_or_fail(config, "coyo_labeled_300m_wds")
    try:
        part = write_wds(storage.store(), context.partition_key, settings, log=context.log.info)
    except WdsRefused as err:
        raise bad_input(str(err)) from err
    return dg.MaterializeResult(
        data_version=dg.DataVersion(provenance.digest(part.identity)),
        metadata={
            "samples": part.samples,
            "shards": len(part.shards),
            "bytes": part.bytes,
            "shards_written": part.written,
            "shards_kept": part.kept,
            "shard_bytes": settings.shard_bytes,
            "path": dg.MetadataValue.path(part.folder),
        },
    )
