"""The sampling plan: the threshold (given, or found for a target size), pHash deduplication and
class caps, decided once over every partition with label stats (logic in ``sample.plan``)."""

import dagster as dg

from coyo_platform.assets import (
    GROUP,
    REFRESH_ROLLUP,
    bad_input,
    code_version,
    config_for,
    settings_or_fail,
)
from coyo_platform.assets.label_stats import label_stats
from coyo_platform.common import layout
from coyo_platform.resources import StorageResource
from coyo_platform.sample.plan import MixedLabelers, NoStats, plan_and_write
from coyo_platform.sample.rules import Sampling

PlanConfig = config_for(Sampling, "PlanConfig")


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
    code_version=code_version("subset_plan", Sampling),
)
def subset_plan(context: dg.AssetExecutionContext, config: PlanConfig, storage: StorageResource):
    """Which labeled images the subset keeps. A new plan that decides the same as the current one
    (same settings and threshold; for global settings also the same partitions, duplicates and
    caps) updates ``plan.json`` but records no new materialization, so the subsets, which refresh
    when the plan does, are not rewritten for nothing."""
    sampling = settings_or_fail(config, "subset_plan")
    store = storage.store()
    try:
        plan, _ = plan_and_write(store, sampling, log=context.log.info)
    except (NoStats, MixedLabelers) as err:  # label stats come first, from one labeler
        raise bad_input(f"subset_plan: {err}") from err
    # compared with the last *recorded* plan, not plan.json: a run killed between writing
    # plan.json and recording it must still record it, or the subsets would never refresh
    if recorded_digest(context) == plan.digest:
        context.log.info(f"plan unchanged ({plan.digest}): subsets stay as they are")
        return
    yield dg.MaterializeResult(
        data_version=dg.DataVersion(plan.digest),
        metadata={
            "threshold": plan.threshold,
            "target_rows": plan.target_rows or 0,
            "rows": plan.rows,
            "images_labeled": plan.images_labeled,
            "share_kept": plan.share_kept,
            "duplicates_dropped": plan.duplicates_dropped,
            # rows downloaded before a part with a smaller id of their image_phash was registered
            "crawl_duplicates_dropped": sum(plan.crawl_duplicates_dropped.values()),
            "crawl_duplicates_by_partition": dg.MetadataValue.json(plan.crawl_duplicates_dropped),
            # rows never downloaded for a part no longer registered as it was: clear and rerun
            "crawl_duplicates_revived": dg.MetadataValue.json(plan.crawl_duplicates_revived),
            "classes_capped": plan.classes_capped,
            "partitions": len(plan.partitions),
            "digest": plan.digest,
            "labelers": ", ".join(sorted(set(plan.labelers.values()))),
            "rows_per_partition": dg.MetadataValue.json(plan.rows_per_partition),
            "path": dg.MetadataValue.path(layout.plan(store)),
        },
    )
