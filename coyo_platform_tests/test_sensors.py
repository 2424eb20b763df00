"""The sensors, tick by tick, against a real Dagster instance and a real storage folder, named as
the situations a user meets; and one daemon-free run of the whole incremental path."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from coyo_platform import sensors
from coyo_platform.assets.subset_plan import subset_plan
from coyo_platform.common import layout, shards
from coyo_platform.common.shards import label_files
from coyo_platform.common.storage import Storage
from coyo_platform.definitions import CHECKS, PIPELINE, ROLLUPS, local_resources
from coyo_platform.resources import SourceResource, StorageResource
from coyo_platform.sensors import (
    FULL_SWEEP_SECONDS,
    coyo_ingest,
    coyo_label,
    coyo_parts_sensor,
    unlabeled_shards_sensor,
)
from coyo_platform_tests.conftest import HAND_LABELER, fast_run_config, hand_label_folder, write_tar


@pytest.fixture
def instance():
    with dg.instance_for_test() as instance:
        yield instance


def _tick(sensor, instance, cursor=None, **resources):
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources)
    return sensor(context), context


def _shard(root: Path, part: str, name: str, photo: bytes, finished: bool = True) -> None:
    """A shard as img2dataset writes it (here, as a run outside Dagster would leave it)."""
    folder = root / "downloaded_shards" / part
    folder.mkdir(parents=True, exist_ok=True)
    write_tar(folder / f"{name}.tar", [(f"{name}0000", photo, {"id": int(name) * 10})])
    if finished:
        (folder / f"{name}_stats.json").write_text(json.dumps({"count": 1, "successes": 1}))


def _labels(root: Path, part: str, name: str) -> None:
    folder = hand_label_folder(root, part)
    pl.DataFrame({"id": [int(name) * 10]}).write_parquet(folder / f"{name}.parquet")


@pytest.fixture
def photo(site) -> bytes:
    return next(iter(sorted(site.images.glob("*.jpg")))).read_bytes()


# ---------------------------------------------------------------- coyo_parts_sensor


def test_parts_nothing_new(source: Path, instance):
    source_resource = SourceResource(location=str(source))
    first, _ = _tick(coyo_parts_sensor, instance, source=source_resource)
    instance.add_dynamic_partitions("coyo_parts", ["part-00000", "part-00001"])
    again, _ = _tick(coyo_parts_sensor, instance, first.cursor, source=source_resource)
    assert isinstance(again, dg.SkipReason)
    assert "no new parts" in again.skip_message


def test_parts_one_new_part(source: Path, instance):
    instance.add_dynamic_partitions("coyo_parts", ["part-00000"])  # registered earlier, by hand
    result, _ = _tick(coyo_parts_sensor, instance, source=SourceResource(location=str(source)))
    assert [r.partition_key for r in result.run_requests] == ["part-00001"]
    assert result.run_requests[0].run_key == "ingest:part-00001"
    [add] = result.dynamic_partitions_requests
    assert (add.partitions_def_name, list(add.partition_keys)) == ("coyo_parts", ["part-00001"])
    assert json.loads(result.cursor) == ["part-00000", "part-00001"]


def test_parts_repeat_tick_requests_nothing_twice(source: Path, instance):
    source_resource = SourceResource(location=str(source))
    first, _ = _tick(coyo_parts_sensor, instance, source=source_resource)
    assert len(first.run_requests) == 2
    # the partitions were not added (say, someone deleted them): the cursor still remembers
    again, _ = _tick(coyo_parts_sensor, instance, first.cursor, source=source_resource)
    assert isinstance(again, dg.SkipReason)


# ---------------------------------------------------------------- unlabeled_shards_sensor


def test_labels_nothing_new(tmp_path: Path, instance, photo):
    _shard(tmp_path, "part-00000", "00000", photo)
    _labels(tmp_path, "part-00000", "00000")
    result, _ = _tick(
        unlabeled_shards_sensor, instance, storage=StorageResource(root=str(tmp_path))
    )
    assert isinstance(result, dg.SkipReason)
    assert "every finished shard" in result.skip_message


def test_labels_new_shards_in_a_labeled_partition(tmp_path: Path, instance, photo):
    instance.add_dynamic_partitions("coyo_parts", ["part-00000"])
    _shard(tmp_path, "part-00000", "00000", photo)
    _labels(tmp_path, "part-00000", "00000")
    _shard(tmp_path, "part-00000", "00001", photo)
    _shard(tmp_path, "part-00000", "00002", photo, finished=False)  # still being written
    storage = StorageResource(root=str(tmp_path))
    result, _ = _tick(unlabeled_shards_sensor, instance, storage=storage)
    [request] = result.run_requests
    assert request.partition_key == "part-00000"
    assert request.tags["coyo/unlabeled_shards"] == "1"  # 00001 only: 00002 is not finished
    assert result.dynamic_partitions_requests == []

    # the unfinished shard finishes: a new set of missing shards, a new run key
    (tmp_path / "downloaded_shards" / "part-00000" / "00002_stats.json").write_text("{}")
    later, _ = _tick(unlabeled_shards_sensor, instance, storage=storage)
    assert later.run_requests[0].run_key != request.run_key
    assert later.run_requests[0].tags["coyo/unlabeled_shards"] == "2"


def test_labels_shards_dropped_by_an_outside_run(tmp_path: Path, instance, photo):
    """img2dataset on another cluster wrote a partition the instance never heard of."""
    _shard(tmp_path, "part-00042", "00000", photo)
    result, _ = _tick(
        unlabeled_shards_sensor, instance, storage=StorageResource(root=str(tmp_path))
    )
    assert [r.partition_key for r in result.run_requests] == ["part-00042"]
    [add] = result.dynamic_partitions_requests
    assert list(add.partition_keys) == ["part-00042"]


def test_labels_repeat_tick_is_a_no_op(tmp_path: Path, instance, photo):
    instance.add_dynamic_partitions("coyo_parts", ["part-00000"])
    _shard(tmp_path, "part-00000", "00000", photo)
    storage = StorageResource(root=str(tmp_path))
    first, _ = _tick(unlabeled_shards_sensor, instance, storage=storage)
    again, _ = _tick(unlabeled_shards_sensor, instance, storage=storage)
    # the same run key: Dagster launches at most one run per key
    assert [r.run_key for r in again.run_requests] == [r.run_key for r in first.run_requests]

    # and while that partition has a run in progress, the sensor waits
    instance.add_run(
        dg.DagsterRun(
            job_name="coyo_label",
            status=dg.DagsterRunStatus.STARTED,
            tags={"dagster/partition": "part-00000"},
        )
    )
    waiting, _ = _tick(unlabeled_shards_sensor, instance, storage=storage)
    assert isinstance(waiting, dg.SkipReason)
    assert "waiting on runs in progress: part-00000" in waiting.skip_message


def _downloaded(root: Path, part: str) -> None:
    """The download program's record that it finished the partition."""
    store = Storage(str(root))
    shards.mark_downloaded(store, layout.shards(store, part), {"shards": 1})


def test_labels_a_finished_partition_is_skipped_until_a_run_changes_it(
    tmp_path: Path, instance, photo
):
    """The cursor keeps a partition downloaded in full and labeled out of later ticks' reads; a
    download run starting on it, or a label run finishing it, brings it back; shards copied in
    by other means are found by the hourly full sweep."""
    instance.add_dynamic_partitions("coyo_parts", ["part-00000", "part-00001"])
    for part in ("part-00000", "part-00001"):
        _shard(tmp_path, part, "00000", photo)
        _labels(tmp_path, part, "00000")
    _downloaded(tmp_path, "part-00000")  # part-00001: img2dataset's alone, no record
    storage = StorageResource(root=str(tmp_path))
    first, tick = _tick(unlabeled_shards_sensor, instance, storage=storage)
    assert "(2 partitions read, 0 finished ones skipped)" in first.skip_message
    assert list(json.loads(tick.cursor)["settled"]) == ["part-00000"]
    again, tick = _tick(unlabeled_shards_sensor, instance, tick.cursor, storage=storage)
    assert "(1 partitions read, 1 finished ones skipped)" in again.skip_message

    # a download run (retry_failed, say) starts on the finished partition and finishes a shard
    store = Storage(str(tmp_path))
    shards.mark_downloading(store, layout.shards(store, "part-00000"))
    _shard(tmp_path, "part-00000", "00001", photo)
    during, _ = _tick(unlabeled_shards_sensor, instance, tick.cursor, storage=storage)
    [request] = during.run_requests
    assert (request.partition_key, request.tags["coyo/unlabeled_shards"]) == ("part-00000", "1")
    assert json.loads(during.cursor)["settled"] == {}

    _labels(tmp_path, "part-00000", "00001")  # the label run (its pointer written again)
    _downloaded(tmp_path, "part-00000")  # and the download run's end
    after, tick = _tick(unlabeled_shards_sensor, instance, during.cursor, storage=storage)
    assert "(2 partitions read, 0 finished ones skipped)" in after.skip_message
    assert list(json.loads(tick.cursor)["settled"]) == ["part-00000"]  # finished again

    # a shard copied into the finished partition by hand: the cursor does not see it...
    _shard(tmp_path, "part-00000", "00002", photo)
    missed, tick = _tick(unlabeled_shards_sensor, instance, tick.cursor, storage=storage)
    assert "(1 partitions read, 1 finished ones skipped)" in missed.skip_message
    # ...until the partition is read again, an hour after it was last read
    stale = json.loads(tick.cursor)
    stale["settled"]["part-00000"][2] -= FULL_SWEEP_SECONDS
    swept, tick = _tick(unlabeled_shards_sensor, instance, json.dumps(stale), storage=storage)
    assert [r.partition_key for r in swept.run_requests] == ["part-00000"]
    assert swept.run_requests[0].tags["coyo/unlabeled_shards"] == "1"


def test_a_tick_reads_at_most_reads_per_tick_partitions_and_the_next_ticks_the_rest(
    tmp_path: Path, instance, photo, monkeypatch
):
    """A tick that read every partition of a full run on S3 outlasted Dagster's sensor timeout
    (and a timed-out tick keeps its old cursor): each tick reads a bounded number, changed
    partitions first, and every partition is labeled within a few ticks, none twice."""
    monkeypatch.setattr(sensors, "READS_PER_TICK", 2)
    parts = [f"part-{i:05d}" for i in range(5)]
    instance.add_dynamic_partitions("coyo_parts", parts)
    for part in parts:
        _shard(tmp_path, part, "00000", photo)
        _downloaded(tmp_path, part)
    for part in parts[:3]:  # labeled already
        _labels(tmp_path, part, "00000")
    storage = StorageResource(root=str(tmp_path))
    first, tick = _tick(unlabeled_shards_sensor, instance, storage=storage)
    assert "(3 left for the next ticks, 0 finished ones skipped)" in first.skip_message
    assert sorted(json.loads(tick.cursor)["settled"]) == parts[:2]
    second, _ = _tick(unlabeled_shards_sensor, instance, tick.cursor, storage=storage)
    assert [r.partition_key for r in second.run_requests] == ["part-00003"]  # read 2 and 3
    third, _ = _tick(unlabeled_shards_sensor, instance, second.cursor, storage=storage)
    by_key = {r.partition_key: r.run_key for r in third.run_requests}
    assert sorted(by_key) == ["part-00003", "part-00004"]
    assert by_key["part-00003"] == second.run_requests[0].run_key  # one run, not two
    cursor = third.cursor
    assert sorted(json.loads(cursor)["settled"]) == parts[:3]
    # once every partition was read, a tick reads only what is due: nothing here
    _labels(tmp_path, "part-00003", "00000")
    _labels(tmp_path, "part-00004", "00000")
    quiet, tick = _tick(unlabeled_shards_sensor, instance, cursor, storage=storage)
    assert "(2 partitions read, 3 finished ones skipped)" in quiet.skip_message
    # and an hour on, the partitions read longest ago first, two a tick
    stale = json.loads(tick.cursor)
    for entry in stale["settled"].values():
        entry[2] -= sensors.FULL_SWEEP_SECONDS
    swept, _ = _tick(unlabeled_shards_sensor, instance, json.dumps(stale), storage=storage)
    assert "(3 left for the next ticks, 0 finished ones skipped)" in swept.skip_message


def test_partitions_read_every_tick_take_turns_under_the_bound(
    tmp_path: Path, instance, photo, monkeypatch
):
    """Partitions img2dataset wrote alone (no completion record) are read on every tick they
    can be: more of them than a tick reads must not leave the last ones never read."""
    monkeypatch.setattr(sensors, "READS_PER_TICK", 2)
    parts = [f"part-{i:05d}" for i in range(5)]
    instance.add_dynamic_partitions("coyo_parts", parts)
    for part in parts:
        _shard(tmp_path, part, "00000", photo)
    storage = StorageResource(root=str(tmp_path))
    cursor, ticks = None, []
    for _ in range(3):
        result, _ = _tick(unlabeled_shards_sensor, instance, cursor, storage=storage)
        ticks.append(sorted(r.partition_key for r in result.run_requests))
        cursor = result.cursor
    assert ticks == [parts[0:2], parts[2:4], [parts[0], parts[4]]]  # the longest unread next


# ---------------------------------------------------------------- daemon-free, end to end


def test_tick_run_labels_then_stats_and_subset_follow(site, source: Path, tmp_path: Path):
    """parts sensor tick -> ingest run -> label sensor tick -> label run -> labels present ->
    automation requests label stats for that partition, nothing upstream; the roll-up and the
    sampling plan follow the stats, and the subset follows the plan."""
    root = tmp_path / "data"
    defs = dg.Definitions(
        assets=[*PIPELINE, *ROLLUPS],
        asset_checks=CHECKS,
        jobs=[coyo_ingest, coyo_label],
        sensors=[coyo_parts_sensor, unlabeled_shards_sensor],
        resources=local_resources(source=str(source), data_root=str(root)),
    )
    config = fast_run_config(site.checkpoint)
    resources = local_resources(source=str(source), data_root=str(root))
    with dg.instance_for_test() as instance:
        tick, _ = _tick(coyo_parts_sensor, instance, source=resources["source"])
        request = tick.run_requests[0]
        instance.add_dynamic_partitions(
            "coyo_parts", list(tick.dynamic_partitions_requests[0].partition_keys)
        )
        ingest = defs.resolve_job_def("coyo_ingest").execute_in_process(
            partition_key=request.partition_key,
            instance=instance,
            run_config={"ops": {"downloaded_shards": config["ops"]["downloaded_shards"]}},
            tags=request.tags,
        )
        assert ingest.success

        baseline = dg.evaluate_automation_conditions(defs=defs, instance=instance)
        assert baseline.total_requested == 0  # nothing labeled yet: stats and subset wait

        tick, _ = _tick(unlabeled_shards_sensor, instance, storage=resources["storage"])
        [label_request] = tick.run_requests
        assert label_request.partition_key == request.partition_key
        labeled = defs.resolve_job_def("coyo_label").execute_in_process(
            partition_key=label_request.partition_key,
            instance=instance,
            run_config={"ops": {"labeled_shards": config["ops"]["labeled_shards"]}},
            tags=label_request.tags,
        )
        assert labeled.success
        part = label_request.partition_key
        assert label_files(Storage(str(root)), part)
        after, _ = _tick(unlabeled_shards_sensor, instance, storage=resources["storage"])
        assert isinstance(after, dg.SkipReason)

        automation = dg.evaluate_automation_conditions(
            defs=defs, instance=instance, cursor=baseline.cursor
        )
        assert automation.get_requested_partitions(dg.AssetKey("label_stats")) == {part}
        # the subset waits for a sampling plan, which waits for stats
        assert automation.get_num_requested(dg.AssetKey("coyo_labeled_300m")) == 0
        for upstream in ("coyo700m_metadata", "downloaded_shards", "labeled_shards"):
            assert automation.get_num_requested(dg.AssetKey(upstream)) == 0  # nothing re-run

        # the roll-up follows the new stats even though another registered part has none yet
        instance.add_dynamic_partitions("coyo_parts", ["part-00099"])
        stats_run = dg.materialize(
            [*PIPELINE[3:], *CHECKS[2:]],
            partition_key=part,
            instance=instance,
            resources=resources,
        )
        assert stats_run.success
        later = dg.evaluate_automation_conditions(
            defs=defs, instance=instance, cursor=automation.cursor
        )
        assert later.get_num_requested(dg.AssetKey("label_stats_rollup")) == 1
        assert later.get_num_requested(dg.AssetKey("subset_plan")) == 1
        assert later.get_requested_partitions(dg.AssetKey("label_stats")) == set()
        planned = dg.materialize([subset_plan], instance=instance, resources=resources)
        assert planned.success
        after_plan = dg.evaluate_automation_conditions(
            defs=defs, instance=instance, cursor=later.cursor
        )  # a new plan rewrites the subset of every partition that has labels
        assert after_plan.get_requested_partitions(dg.AssetKey("coyo_labeled_300m")) == {part}


def test_new_shards_are_labeled_with_the_partitions_current_labeler(
    tmp_path: Path, instance, photo
):
    """A partition labeled with other settings than the defaults (another checkpoint, say): new
    shards are requested with those settings, so they join its current label set instead of
    relabeling the part with the defaults."""
    from coyo_platform.common import layout

    _shard(tmp_path, "part-00000", "00000", photo)
    _labels(tmp_path, "part-00000", "00000")
    store = Storage(str(tmp_path))
    record = layout.labeler_record(layout.label_sets(store), HAND_LABELER)
    chosen = {"model": "test_efficientnet", "checkpoint": "/weights/other.pth", "preset": "timm"}
    store.write_json(record, {**store.read_json(record), "settings": chosen})
    _shard(tmp_path, "part-00000", "00001", photo)
    storage = StorageResource(root=str(tmp_path))
    [request] = _tick(unlabeled_shards_sensor, instance, storage=storage)[0].run_requests
    assert request.run_config == {"ops": {"labeled_shards": {"config": chosen}}}

    # the part downloaded again (a new download, same missing shards): a new run key, so the
    # sensor does not take it for the run it already requested
    folder = tmp_path / "downloaded_shards" / "part-00000"
    (folder / "_fingerprint.json").write_text(json.dumps({"made": "a"}))
    first = _tick(unlabeled_shards_sensor, instance, storage=storage)[0].run_requests[0].run_key
    (folder / "_fingerprint.json").write_text(json.dumps({"made": "b"}))
    again = _tick(unlabeled_shards_sensor, instance, storage=storage)[0].run_requests[0].run_key
    assert first != again
