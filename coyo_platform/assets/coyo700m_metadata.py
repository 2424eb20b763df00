import dagster as dg

from coyo_platform.assets import GROUP, ONE_PARTITION_PER_RUN
from coyo_platform.core.metadata import copy_part
from coyo_platform.core.schema import BadPartError
from coyo_platform.partitions import coyo_parts
from coyo_platform.resources import SourceResource, StorageResource


class MetadataConfig(dg.Config):
    limit: int | None = None
    """Keep only the first N rows of the part (a first try on a real part)."""


@dg.asset(
    partitions_def=coyo_parts,
    group_name=GROUP,
    kinds={"parquet"},
    backfill_policy=ONE_PARTITION_PER_RUN,
)
def coyo700m_metadata(
    context: dg.AssetExecutionContext,
    config: MetadataConfig,
    source: SourceResource,
    storage: StorageResource,
) -> dg.MaterializeResult:
    """COYO-700M rows of one source part, checked against the 17-column schema, in storage."""
    try:
        part = copy_part(
            source.location, context.partition_key, storage.store(), limit=config.limit
        )
    except (BadPartError, FileNotFoundError, ValueError) as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from exc
    return dg.MaterializeResult(
        metadata={
            "rows": part.rows,
            "rows_in_source_part": part.source_rows if part.source_rows is not None else "not read",
            "limit": config.limit or "none",
            "unique_urls": part.unique_urls,
            "source": dg.MetadataValue.url(part.source_url)
            if "://" in part.source_url
            else dg.MetadataValue.path(part.source_url),
            "path": dg.MetadataValue.path(part.url),
            "bytes_written": part.bytes_written,
        }
    )
