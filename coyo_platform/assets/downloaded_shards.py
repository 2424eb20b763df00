import dagster as dg

from coyo_platform.assets import GROUP
from coyo_platform.assets.coyo700m_metadata import coyo700m_metadata
from coyo_platform.core.storage import DOWNLOADS, METADATA
from coyo_platform.partitions import coyo_parts
from coyo_platform.resources import ComputeResource, StorageResource, program_args


class DownloadConfig(dg.Config):
    """img2dataset settings; defaults are COYO's recipe at 512 px (see core/download.py)."""

    image_size: int = 512
    min_image_size: int = 200
    max_aspect_ratio: float = 3.0
    retries: int = 1
    timeout: int = 10
    number_sample_per_shard: int = 10_000
    processes_count: int | None = None  # default: one per CPU core
    thread_count: int = 64


@dg.asset(
    partitions_def=coyo_parts, deps=[coyo700m_metadata], group_name=GROUP, kinds={"webdataset"}
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
