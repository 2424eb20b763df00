import dagster as dg

from coyo_platform.assets import (
    GROUP,
    ONE_PARTITION_PER_RUN,
    TRANSIENT_RETRIES,
    bad_input,
    code_version,
    config_for,
    settings_or_fail,
)
from coyo_platform.assets.coyo700m_metadata import coyo700m_metadata
from coyo_platform.common import layout, provenance, shards
from coyo_platform.common.settings import to_arguments
from coyo_platform.download import fingerprint
from coyo_platform.download.settings import DownloadSettings
from coyo_platform.partitions import coyo_parts
from coyo_platform.resources import ComputeResource, StorageResource

DownloadConfig = config_for(DownloadSettings, "DownloadConfig")


@dg.asset(
    partitions_def=coyo_parts,
    deps=[coyo700m_metadata],
    group_name=GROUP,
    kinds={"webdataset"},
    retry_policy=TRANSIENT_RETRIES,
    backfill_policy=ONE_PARTITION_PER_RUN,
    code_version=code_version("downloaded_shards", DownloadSettings),
)
def downloaded_shards(
    context: dg.AssetExecutionContext,
    config: DownloadConfig,
    storage: StorageResource,
    compute: ComputeResource,
) -> dg.MaterializeResult:
    """The part's images, downloaded by img2dataset into webdataset shards (resumes on rerun):
    one row per crawl image_phash across the registered parts (dedup before download)."""
    settings = settings_or_fail(config, "downloaded_shards")
    store, key = storage.store(), context.partition_key
    metadata, folder = layout.metadata(store, key), layout.shards(store, key)
    values = config.model_dump()
    settings, taken = fingerprint.for_retry(store, folder, settings)
    if taken:  # a recovery rewrites shards as they were made
        values.update({k: recorded for k, (_, recorded) in taken.items()})
        context.log.info(f"retry_failed: the partition's own settings are kept: {sorted(taken)}")
    try:  # here, before a program or a task starts: a mismatch is not retried
        fingerprint.check_folder(store, folder, fingerprint.current(store, metadata, settings))
    except provenance.Mismatch as err:
        raise bad_input(f"downloaded_shards[{key}]: {err}") from err
    args = ["--metadata", metadata, "--output", folder]
    return compute.run_program(context, "download", args + to_arguments(values), env=store.env())


#: Below this share of URLs downloaded, suspect the network (DNS, a blocked egress) rather than link
#: rot: Kakao found about 85% of COYO-700M's URLs alive in August 2022.
MIN_SUCCESS_RATE = 0.5


@dg.asset_check(asset=downloaded_shards, partitions_def=coyo_parts, blocking=False)
def download_success_rate(
    context: dg.AssetCheckExecutionContext, storage: StorageResource
) -> dg.AssetCheckResult:
    """Share of the part's URLs that became images (warns below 50%)."""
    attempted, succeeded = shards.download_counts(storage.store(), context.partition_key)
    rate = succeeded / attempted if attempted else 0.0
    return dg.AssetCheckResult(
        passed=attempted > 0 and rate >= MIN_SUCCESS_RATE,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "attempted": attempted,
            "succeeded": succeeded,
            "success_rate": round(rate, 4),
            "minimum": MIN_SUCCESS_RATE,
        },
    )
