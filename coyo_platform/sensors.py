"""The platform's sensors: new source parts become partitions and are downloaded; finished shards
without labels get labeled, by whoever wrote them. What they read is ``ingest.sources`` and
``common.shards``; this module only turns it into Dagster requests."""

from __future__ import annotations

import json

import dagster as dg

from coyo_platform.common.shards import downloaded_partitions, labeling_todos
from coyo_platform.ingest.sources import list_parts
from coyo_platform.partitions import coyo_parts
from coyo_platform.resources import SourceResource, StorageResource

#: Metadata and download of a part: what a newly found part needs first.
coyo_ingest = dg.define_asset_job(
    "coyo_ingest",
    selection=dg.AssetSelection.assets("coyo700m_metadata", "downloaded_shards"),
    description="Copy a part's metadata and download its images.",
)
#: Labeling alone; label stats and the subset follow by declarative automation.
coyo_label = dg.define_asset_job(
    "coyo_label",
    selection=dg.AssetSelection.assets("labeled_shards"),
    description="Label a partition's finished shards that have no labels yet.",
)

_ACTIVE = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


@dg.sensor(
    job=coyo_ingest,
    minimum_interval_seconds=600,
    default_status=dg.DefaultSensorStatus.STOPPED,  # on: it starts downloading every new part
)
def coyo_parts_sensor(
    context: dg.SensorEvaluationContext, source: SourceResource
) -> dg.SensorResult | dg.SkipReason:
    """Lists the source (folder, s3://, hf://); each part not seen before becomes a partition of
    ``coyo_parts`` and gets a metadata + download run, in the same tick. The cursor holds the
    parts seen, so a part is requested once, even if its partition is deleted later."""
    seen = set(json.loads(context.cursor)) if context.cursor else set()
    found = sorted(list_parts(source.location))
    registered = set(context.instance.get_dynamic_partitions(coyo_parts.name))
    new = [k for k in found if k not in seen and k not in registered]
    cursor = json.dumps(sorted(seen | set(found)))
    if not new:
        context.update_cursor(cursor)
        return dg.SkipReason(f"no new parts in {source.location} ({len(found)} known)")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=k, run_key=f"ingest:{k}") for k in new],
        dynamic_partitions_requests=[coyo_parts.build_add_request(new)],
        cursor=cursor,
    )


@dg.sensor(
    job=coyo_label, minimum_interval_seconds=120, default_status=dg.DefaultSensorStatus.RUNNING
)
def unlabeled_shards_sensor(
    context: dg.SensorEvaluationContext, storage: StorageResource
) -> dg.SensorResult | dg.SkipReason:
    """Finds finished shards without labels in the storage root, including shards img2dataset
    wrote outside Dagster, and requests a labeling run for exactly those partitions (registering
    a partition it did not know), with the settings of the partition's current label set (so new
    shards join the set the partition's other shards are in; a partition never labeled gets the
    defaults). The run key names the missing shards, the downloads and the labeler, so a repeat
    tick is a no-op, and shards that land later (or a part downloaded again) get a run of their
    own. A partition with a run in progress
    waits for the next tick. A labeling run that failed (after its retries) is not requested again
    for the same shards, so bad input cannot loop: fix the cause, then re-execute that run or
    materialize the partition from the UI."""
    store = storage.store()
    registered = set(context.instance.get_dynamic_partitions(coyo_parts.name))
    requests, unknown, waiting = [], [], []
    keys = downloaded_partitions(store)
    for key, todo in zip(keys, labeling_todos(store, keys), strict=True):
        if not todo.missing:
            continue
        busy = context.instance.get_runs(
            filters=dg.RunsFilter(tags={"dagster/partition": key}, statuses=_ACTIVE), limit=1
        )
        if busy:
            waiting.append(key)
            continue
        if key not in registered:
            unknown.append(key)
        config = {"ops": {"labeled_shards": {"config": todo.settings}}} if todo.settings else None
        requests.append(
            dg.RunRequest(
                partition_key=key,
                run_key=f"label:{key}:{todo.run_key}",
                run_config=config,
                tags={"coyo/unlabeled_shards": str(len(todo.missing))},
            )
        )
    if not requests:
        detail = f"; waiting on runs in progress: {', '.join(waiting)}" if waiting else ""
        return dg.SkipReason(f"every finished shard in {store.root} is labeled{detail}")
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[coyo_parts.build_add_request(unknown)] if unknown else [],
    )
