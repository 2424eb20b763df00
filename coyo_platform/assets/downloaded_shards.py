import dagster as dg
from pydantic import Field

from coyo_platform.assets import GROUP, ONE_PARTITION_PER_RUN, TRANSIENT_RETRIES
from coyo_platform.assets.coyo700m_metadata import coyo700m_metadata
from coyo_platform.core.download import MAX_PIXELS
from coyo_platform.core.progress import download_counts
from coyo_platform.core.storage import DOWNLOADS, METADATA
from coyo_platform.partitions import coyo_parts
from coyo_platform.resources import ComputeResource, StorageResource, program_args


class DownloadConfig(dg.Config):
    """Download settings; defaults are COYO's recipe at 512 px plus the safety limits (see
    core/download.py and the README's "Security" section)."""

    image_size: int = 512
    min_image_size: int = 200
    max_aspect_ratio: float = 3.0
    retries: int = 1
    timeout: int = 10
    number_sample_per_shard: int = 10_000
    processes_count: int | None = None  # default: one per CPU core
    thread_count: int = 64
    allow_networks: list[str] = Field(
        default_factory=list,
        description="Non-public networks the downloader may reach (tests, a private mirror), "
        "e.g. ['10.20.0.0/16']. Empty: public addresses only.",
    )
    max_seconds: float = 30.0
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = MAX_PIXELS
    drift_distance: int = 12
    drop_drifted: bool = False


@dg.asset(
    partitions_def=coyo_parts,
    deps=[coyo700m_metadata],
    group_name=GROUP,
    kinds={"webdataset"},
    retry_policy=TRANSIENT_RETRIES,
    backfill_policy=ONE_PARTITION_PER_RUN,
)
def downloaded_shards(
    context: dg.AssetExecutionContext,
    config: DownloadConfig,
    storage: StorageResource,
    compute: ComputeResource,
) -> dg.MaterializeResult:
    """The part's images, downloaded by img2dataset into webdataset shards (resumes on rerun)."""
    store, key = storage.store(), context.partition_key
    args = [
        "--metadata",
        store.url(METADATA, f"{key}.parquet"),
        "--output",
        store.url(DOWNLOADS, key),
    ]
    return compute.run_program(
        context, "coyo_platform.downloader", args + program_args(config), env=store.env()
    )


#: Below this share of URLs downloaded, suspect the network (DNS, a blocked egress) rather than link
#: rot: Kakao found about 85% of COYO-700M's URLs alive in August 2022.
MIN_SUCCESS_RATE = 0.5


@dg.asset_check(asset=downloaded_shards, partitions_def=coyo_parts, blocking=False)
def download_success_rate(
    context: dg.AssetCheckExecutionContext, storage: StorageResource
) -> dg.AssetCheckResult:
    """Share of the part's URLs that became images (warns below 50%)."""
    attempted, succeeded = download_counts(storage.store(), context.partition_key)
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
