"""The platform's sensors: new source parts become partitions and are downloaded; finished shards
without labels get labeled, by whoever wrote them. What they read is ``ingest.sources`` and
``common.shards``; this module only turns it into Dagster requests."""

from __future__ import annotations

import json
import time

import dagster as dg

from coyo_platform.common.shards import downloaded_partitions, labeling_todos, partition_versions
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

#: How often the labeling sensor reads each partition again, the finished ones included
#: (seconds): the net under its cursor, for shards added to a finished partition by other means
#: than the download program (an img2dataset run into the same folder, a file copied by hand).
FULL_SWEEP_SECONDS = 3600
#: The most partitions one tick of the labeling sensor reads (about 6 storage requests each);
#: the others wait for the next ticks, new or changed ones first, then the longest unread. At 128
#: partitions on S3 a tick that read them all took 99 s on moto (Dagster's sensor timeout is 60 s,
#: and a tick that times out keeps its old cursor, so it would never get past them).
READS_PER_TICK = 32


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
    own. A partition with a run in progress waits for the next tick. A labeling run that failed
    (after its retries) is not requested again for the same shards, so bad input cannot loop:
    fix the cause, then re-execute that run or materialize the partition from the UI.

    The cursor holds the partitions found finished: downloaded in full (the download program's
    completion record) and every shard labeled, with when each was read. A tick lists three
    folders and reads only the other partitions, until a finished one's completion record or
    current-labels pointer changes (a download run removes the record when it starts; a label
    run rewrites the pointer) or it was read ``FULL_SWEEP_SECONDS`` ago. Partitions written by
    img2dataset alone have no record and are read every tick. A tick reads at most
    ``READS_PER_TICK`` partitions: new or changed ones first, then the longest unread, so that
    every partition is read in turn whatever their number."""
    store = storage.store()
    cursor = json.loads(context.cursor) if context.cursor else {}
    now = time.time()
    before = cursor.get("settled", {})
    last_read = cursor.get("read", {})  # when each partition not settled was last read
    registered = set(context.instance.get_dynamic_partitions(coyo_parts.name))
    requests, unknown, waiting = [], [], []
    keys = downloaded_partitions(store)
    versions = partition_versions(store)
    settled, due = {}, []
    for key in keys:
        entry = before.get(key)
        if key not in versions or not entry or entry[:2] != versions[key]:
            # never read or changed since it was settled: first; else the longest unread first
            due.append((0 if entry else last_read.get(key, 0), key))
            continue
        read_at = entry[2] if len(entry) > 2 else cursor.get("swept", 0)  # a cursor of before
        settled[key] = [*versions[key], read_at]  # until read again
        if now - read_at >= FULL_SWEEP_SECONDS:
            due.append((read_at, key))
    read = [key for _, key in sorted(due)[:READS_PER_TICK]]
    left = len(due) - len(read)
    reads = {k: t for k, t in last_read.items() if k in keys and k not in settled}
    for key, todo in zip(read, labeling_todos(store, read), strict=True):
        settled.pop(key, None)
        reads[key] = now
        if not todo.missing:
            if key in versions:  # downloaded in full and labeled: skipped until either changes
                settled[key] = [*versions[key], now]
                reads.pop(key)
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
    cursor = json.dumps({"settled": settled, "read": reads}, sort_keys=True)
    if not requests:
        context.update_cursor(cursor)
        skipped = len(keys) - len(read) - left
        detail = f"; waiting on runs in progress: {', '.join(waiting)}" if waiting else ""
        if left:  # a tick reads at most READS_PER_TICK partitions
            return dg.SkipReason(
                f"no unlabeled shards in the {len(read)} partitions read in {store.root} "
                f"({left} left for the next ticks, {skipped} finished ones skipped){detail}"
            )
        return dg.SkipReason(
            f"every finished shard in {store.root} is labeled ({len(read)} partitions read, "
            f"{skipped} finished ones skipped){detail}"
        )
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[coyo_parts.build_add_request(unknown)] if unknown else [],
        cursor=cursor,
    )
