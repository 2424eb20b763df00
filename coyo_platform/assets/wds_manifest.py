"""The webdataset shards' manifest and timm's ``_info.json`` (logic in ``sample.wds``), and a
check that every subset part has current shards."""

import dagster as dg

from coyo_platform.assets import GROUP, REFRESH_AFTER_UPDATES, code_version
from coyo_platform.assets.coyo_labeled_300m_wds import coyo_labeled_300m_wds
from coyo_platform.common import layout
from coyo_platform.resources import StorageResource
from coyo_platform.sample.wds import write_wds_manifest


@dg.asset(
    deps=[coyo_labeled_300m_wds],
    group_name=GROUP,
    kinds={"json"},
    automation_condition=REFRESH_AFTER_UPDATES,
    check_specs=[dg.AssetCheckSpec("wds_complete", asset="wds_manifest")],
    code_version=code_version("wds_manifest"),
)
def wds_manifest(storage: StorageResource):
    """Every partition's webdataset shards with their samples and bytes, and timm's
    ``_info.json`` over the current ones; the check fails while a subset part has no shards,
    unfinished ones, or shards written from an earlier part."""
    store = storage.store()
    manifest = write_wds_manifest(store)
    yield dg.MaterializeResult(
        metadata={
            "samples": manifest["samples"],
            "shards": manifest["shards"],
            "bytes": manifest["bytes"],
            "partitions": len(manifest["partitions"]),
            "path": dg.MetadataValue.path(layout.wds_manifest(store)),
            "info": dg.MetadataValue.path(layout.wds_info(store)),
        }
    )
    yield dg.AssetCheckResult(  # a warning: partitions without shards are a person's choice
        check_name="wds_complete",
        passed=manifest["complete"],
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "problems": dg.MetadataValue.md(
                "\n".join(f"- {p}" for p in manifest["problems"][:50]) or "none"
            ),
        },
    )
