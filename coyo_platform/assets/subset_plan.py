"""The sampling plan: the threshold (given, or found for a target size), pHash deduplication and
class caps, decided once over every partition with label stats (logic in ``core.plan``)."""

import dagster as dg

from coyo_platform.assets import GROUP, REFRESH_ROLLUP
from coyo_platform.assets.label_stats import label_stats, stats_partitions
from coyo_platform.core import plan as plans
from coyo_platform.core.storage import PLAN
from coyo_platform.resources import StorageResource


class PlanConfig(dg.Config):
    """Give one of threshold, target_rows, target_fraction (none: threshold 0.30)."""

    threshold: float | None = None
    """Keep images whose top-1 probability is >= this."""
    target_rows: int | None = None
    """Pick the threshold whose subset is closest to this many images (exact to the row)."""
    target_fraction: float | None = None
    """Like target_rows, as a fraction of all labeled images (e.g. 0.4)."""
    dedup: bool = False
    """Keep one image per pHash across all partitions: the highest top-1, then the smallest id."""
    class_cap: int | None = None
    """At most this many images per top-1 class (its highest top-1 ones, then smallest ids)."""


def recorded_digest(context: dg.AssetExecutionContext) -> str | None:
    """The digest of the plan's last materialization in Dagster's event log."""
    event = context.instance.get_latest_materialization_event(context.asset_key)
    materialization = event.asset_materialization if event else None
    digest = materialization.metadata.get("digest") if materialization else None
    return digest.value if digest is not None else None


@dg.asset(
    deps=[label_stats],
    group_name=GROUP,
    kinds={"polars"},
    automation_condition=REFRESH_ROLLUP,
    output_required=False,
)
def subset_plan(context: dg.AssetExecutionContext, config: PlanConfig, storage: StorageResource):
    """Which labeled images the subset keeps. A new plan that decides the same as the current one
    (same settings and threshold; for global settings also the same partitions, duplicates and
    caps) updates ``plan.json`` but records no new materialization, so the subsets, which refresh
    when the plan does, are not rewritten for nothing."""
    try:
        sampling = plans.Sampling(**config.model_dump())
    except ValueError as err:
        raise dg.Failure(f"subset_plan: {err}", allow_retries=False) from err
    store = storage.store()
    keys = stats_partitions(store)
    if not keys:
        raise dg.Failure(
            "subset_plan: no partition has label stats yet; materialize label_stats first",
            allow_retries=False,
        )
    previous = plans.read_plan(store)
    plan = plans.make_plan(store, keys, sampling, log=context.log.info)
    store.write_json(store.url(PLAN, plans.PLAN_FILE), plan)
    plans.prune(store, keep=[plan["folder"], previous and previous.get("folder")])
    # compared with the last *recorded* plan, not plan.json: a run killed between writing
    # plan.json and recording it must still record it, or the subsets would never refresh
    if recorded_digest(context) == plan["digest"]:
        context.log.info(f"plan unchanged ({plan['digest']}): subsets stay as they are")
        return
    yield dg.MaterializeResult(
        metadata={
            "threshold": plan["threshold"],
            "target_rows": plan["target_rows"] or 0,
            "rows": plan["rows"],
            "images_labeled": plan["images_labeled"],
            "share_kept": round(plan["rows"] / plan["images_labeled"], 4)
            if plan["images_labeled"]
            else 0.0,
            "duplicates_dropped": plan["duplicates_dropped"],
            "classes_capped": plan["classes_capped"],
            "partitions": len(plan["partitions"]),
            "digest": plan["digest"],
            "rows_per_partition": dg.MetadataValue.json(plan["rows_per_partition"]),
            "path": dg.MetadataValue.path(store.url(PLAN, plans.PLAN_FILE)),
        }
    )
