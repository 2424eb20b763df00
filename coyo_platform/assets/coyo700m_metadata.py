import dagster as dg

from coyo_platform.assets import (
    GROUP,
    ONE_PARTITION_PER_RUN,
    bad_input,
    code_version,
    config_for,
    location,
    settings_or_fail,
)
from coyo_platform.ingest.metadata import IngestSettings, copy_part
from coyo_platform.ingest.schema import BadPartError
from coyo_platform.partitions import coyo_parts
from coyo_platform.resources import SourceResource, StorageResource

MetadataConfig = config_for(IngestSettings, "MetadataConfig")


@dg.asset(
    partitions_def=coyo_parts,
    group_name=GROUP,
    kinds={"parquet"},
    backfill_policy=ONE_PARTITION_PER_RUN,
    code_version=code_version("coyo700m_metadata", IngestSettings),
)
def coyo700m_metadata(
    context: dg.AssetExecutionContext,
    config: MetadataConfig,
    source: SourceResource,
    storage: StorageResource,
) -> dg.MaterializeResult:
    """COYO-700M rows of one source part, checked against the 17-column schema, in storage."""
    settings = settings_or_fail(config, "coyo700m_metadata")
    try:
        part = copy_part(source.location, context.partition_key, storage.store(), settings)
    except (BadPartError, FileNotFoundError, ValueError) as exc:  # the part itself: not retried
        raise bad_input(str(exc)) from exc
    return dg.MaterializeResult(
        data_version=dg.DataVersion(part.fingerprint["ids_and_urls_sha256"][:16]),
        metadata={
            "rows": part.rows,
            "rows_in_source_part": part.source_rows if part.source_rows is not None else "not read",
            "limit": settings.limit or "none",
            "unique_urls": part.unique_urls,
            "source": location(part.source_url),
            "path": dg.MetadataValue.path(part.url),
            "bytes_written": part.bytes_written,
            "source_digest": part.fingerprint["ids_and_urls_sha256"][:16],
        },
    )
