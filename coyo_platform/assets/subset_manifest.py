"""The subset's manifest (logic in ``sample.manifest``), its dataset card (``sample.card``), and a
check that it is complete."""

import dagster as dg

from coyo_platform.assets import GROUP, REFRESH_ROLLUP, code_version
from coyo_platform.assets.coyo_labeled_300m import coyo_labeled_300m
from coyo_platform.common import layout
from coyo_platform.resources import StorageResource
from coyo_platform.sample.card import write_card
from coyo_platform.sample.manifest import write_manifest
from coyo_platform.sample.plan import current_plan


@dg.asset(
    deps=[coyo_labeled_300m],
    group_name=GROUP,
    kinds={"json"},
    automation_condition=REFRESH_ROLLUP,
    check_specs=[dg.AssetCheckSpec("subset_complete", asset="subset_manifest")],
    code_version=code_version("subset_manifest"),
)
def subset_manifest(storage: StorageResource):
    """Every subset part with its rows, bytes and plan, and the dataset card beside the parts
    (``coyo_labeled_300m/README.md``); the check fails while a planned part is missing, stale
    (written under another plan) or has a row count the plan did not count."""
    store = storage.store()
    plan = current_plan(store)
    manifest, url = write_manifest(store, plan)
    card = write_card(store, manifest, plan)
    store.remove(store.url(layout.SUBSET, layout.LEGACY_MANIFEST))  # dataset loaders choke on it
    summary = manifest.to_json()
    yield dg.MaterializeResult(
        metadata={
            "rows": summary["rows"],
            "partitions": summary["partitions"],
            "bytes": summary["bytes"],
            "threshold": manifest.threshold,
            "plan_digest": manifest.plan_digest,
            "labelers": ", ".join(manifest.labelers) or "none",
            "path": dg.MetadataValue.path(url),
            "card": dg.MetadataValue.path(card),
        }
    )
    yield dg.AssetCheckResult(
        check_name="subset_complete",
        passed=manifest.complete,
        metadata={
            "problems": dg.MetadataValue.md(
                "\n".join(f"- {p}" for p in manifest.problems[:50]) or "none"
            ),
            "missing": len(manifest.missing),
        },
    )
