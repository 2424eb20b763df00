"""A real backfill through the daemon (issue 18): ``dagster-daemon run`` and its run queue label 16
partitions of a small real part, the ``gpu`` pool at 2, and the run worker of one labeling run is
killed in the middle of its partition.

The instance is ``infra/dagster.yaml``'s run coordination on SQLite: its ``concurrency`` (the
queue, one run per partition, the pools), ``run_retries`` and ``run_monitoring`` as they are,
only the polling intervals shortened; the storage, run launcher and compute logs are the local
defaults (runs are subprocesses of the daemon's code server). The pool is set to 2 as an operator
does it (``dagster instance concurrency set gpu 2``). Declarative automation is off (label stats
would follow every partition: CPU this 2-core suite does not have).

One part is downloaded once, for real (the demo photos on a loopback server, 5 rows a shard: 9
shards), and copied into 16 partitions. The unlabeled-shards sensor is stopped and the backfill
launched as a person does it in the UI, through the webserver's GraphQL (``stopSensor``,
``launchPartitionBackfill`` with the small offline model's config), and the daemon executes it.

The kill: a ``sitecustomize`` on the daemon's ``PYTHONPATH`` (so in every process it starts)
holds the first label program to write its 3rd shard's labels, after that write. Once another
labeling step has started beside it, the test SIGKILLs the held run's worker and everything under
it (its step process, the label program, its loader), as when the machine running the run dies.
The code server marks the run failed, ``run_retries`` starts a retry, and the retry labels only
the 6 shards without labels. Then: every partition materialized, every downloaded image labeled
once, never more than 2 labeling steps at once (and 2 at least once, by construction), and no
pool slot still held by the killed run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import yaml
from dagster._core.events import DagsterEventType
from dagster._core.execution.backfill import BULK_ACTION_TERMINAL_STATUSES, BulkActionStatus
from dagster._core.storage.dagster_run import FINISHED_STATUSES
from dagster._core.storage.tags import (
    BACKFILL_ID_TAG,
    PARENT_RUN_ID_TAG,
    PARTITION_NAME_TAG,
    RETRY_NUMBER_TAG,
    ROOT_RUN_ID_TAG,
)

from coyo_platform.common import layout, shards
from coyo_platform.common.storage import Storage
from coyo_platform_tests.conftest import (
    BIN,
    PART,
    REPO,
    Site,
    fast_run_config,
    free_port,
    write_source,
)

KEYS = [f"part-{i:05d}" for i in range(16)]
SHARD = 5  # rows a shard: the test part's 45 rows are 9 shards
SHARDS = [f"{i:05d}" for i in range(9)]
HOLD_AFTER = 3  # the held label program stops once its 3rd shard's labels are written
POOL, SLOTS = "gpu", 2
STEP = "labeled_shards"
DEADLINE = 600  # seconds for a step of the test to happen; readiness, not a speed limit
BACKFILL_DEADLINE = 1200  # for the whole backfill
#: The runs' executor: one process a run (the run worker executes its steps), not one more per
#: step (each imports dagster, the definitions and timm: ~9 s of CPU, x 2 steps x 17 runs). What is
#: tested does not depend on it: the pool's slots are claimed per step by either executor.
IN_PROCESS = {"execution": {"config": {"in_process": {}}}}

HOLD_HOOK = """
import os

_after = os.environ.get("COYO_TEST_HOLD_AFTER")
if _after:
    import json, re, time

    _claim, _seen, _replace = os.environ["COYO_TEST_HOLD_CLAIM"], [], os.replace
    _label = re.compile(r"/labeled_shards/[^/]+/(part-[0-9]+)/([0-9]{5})\\.parquet$")

    def _replace_then_hold(src, dst, *args, **kwargs):
        done = _replace(src, dst, *args, **kwargs)
        found = _label.search(os.fspath(dst))
        if found:
            _seen.append(found.group(2))
            if len(_seen) == int(_after):
                tmp = f"{_claim}.{os.getpid()}"
                with open(tmp, "w") as fh:
                    json.dump({"pid": os.getpid(), "part": found.group(1), "shards": _seen}, fh)
                try:
                    os.link(tmp, _claim)  # the first program here is held, no other
                except FileExistsError:
                    return done
                while True:  # until killed
                    time.sleep(3600)
        return done

    os.replace = _replace_then_hold
"""


# ---------------------------------------------------------------- processes


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state, ppid = text[text.rindex(")") + 2 :].split()[:2]
    return state, int(ppid)


def _alive(pid: int) -> bool:
    found = _stat(pid)
    return found is not None and found[0] not in ("Z", "X")


def descendants(pid: int) -> set[int]:
    """Every process below ``pid``, read from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        found = _stat(int(entry.name))
        if found is not None:
            parents[int(entry.name)] = found[1]
    below, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - below
        below |= frontier
    return below


def kill_tree(pid: int) -> set[int]:
    """SIGKILL ``pid`` and every process below it, frozen first so none starts another; return
    once all are dead."""
    tree = {pid} | descendants(pid)
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for p in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, sig)
    while any(_alive(p) for p in tree):
        time.sleep(0.05)
    return tree


@contextlib.contextmanager
def started(cmd: list[str], log: Path, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """``cmd`` in a session of its own (its code servers, run workers and programs with it),
    ended at the end: SIGTERM, then SIGKILL for whatever of the session is left."""
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield proc
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def tail(log: Path, chars: int = 6000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


class Waiter:
    """Polls for a condition; fails naming it, with the daemon's log, when a process it relies on
    exits or the deadline passes."""

    def __init__(self, logs: dict[str, Path]) -> None:
        self.logs, self.procs = logs, {}

    def watch(self, name: str, proc: subprocess.Popen) -> None:
        self.procs[name] = proc

    def forget(self, name: str) -> None:
        self.procs.pop(name, None)

    def logs_tail(self) -> str:
        return "\n".join(f"--- {name} log:\n{tail(path)}" for name, path in self.logs.items())

    def until(self, what: str, check: Callable[[], object], deadline: float = DEADLINE):
        end = time.monotonic() + deadline
        while True:
            value = check()
            if value:
                return value
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    pytest.fail(
                        f"{name} exited ({proc.returncode}) before {what}\n{self.logs_tail()}"
                    )
            if time.monotonic() > end:
                pytest.fail(f"gave up after {deadline} s waiting for {what}\n{self.logs_tail()}")
            time.sleep(0.5)


# ---------------------------------------------------------------- GraphQL, as the UI speaks it


def graphql(url: str, query: str, variables: dict | None = None) -> dict:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(
        f"{url}/graphql", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        answer = json.loads(response.read())
    assert not answer.get("errors"), answer["errors"]
    return answer["data"]


LOCATIONS = """{ workspaceOrError { __typename ... on Workspace { locationEntries {
    name loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } } }"""

SENSOR = """query ($selector: SensorSelector!) { sensorOrError(sensorSelector: $selector) {
    __typename ... on Sensor { jobOriginId sensorState { selectorId status } }
    ... on PythonError { message } } }"""

STOP_SENSOR = """mutation ($origin: String!, $selector: String!) {
    stopSensor(jobOriginId: $origin, jobSelectorId: $selector) { __typename
    ... on StopSensorMutationResult { instigationState { status } }
    ... on PythonError { message } } }"""

LAUNCH_BACKFILL = """mutation ($params: LaunchBackfillParams!) {
    launchPartitionBackfill(backfillParams: $params) { __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message stack }
    ... on UnauthorizedError { message } } }"""


def loaded_location(url: str) -> str | None:
    """The workspace's one code location's name, once it is loaded."""
    try:
        entries = graphql(url, LOCATIONS)["workspaceOrError"]["locationEntries"]
    except OSError:  # not listening yet
        return None
    [entry] = entries
    if entry["loadStatus"] != "LOADED":
        return None
    loaded = entry["locationOrLoadError"]
    assert loaded["__typename"] == "RepositoryLocation", loaded
    return entry["name"]


def stop_sensor(url: str, location: str, name: str) -> None:
    selector = {"repositoryLocationName": location, "repositoryName": "__repository__",
                "sensorName": name}  # fmt: skip
    sensor = graphql(url, SENSOR, {"selector": selector})["sensorOrError"]
    assert sensor["__typename"] == "Sensor", sensor
    variables = {"origin": sensor["jobOriginId"], "selector": sensor["sensorState"]["selectorId"]}
    stopped = graphql(url, STOP_SENSOR, variables)["stopSensor"]
    assert stopped["__typename"] == "StopSensorMutationResult", stopped
    assert stopped["instigationState"]["status"] == "STOPPED"


def launch_backfill(url: str, keys: list[str], run_config: dict) -> str:
    params = {
        "assetSelection": [{"path": [STEP]}],
        "partitionNames": keys,
        "runConfigData": run_config,
        "title": "label 16 parts",
    }
    launched = graphql(url, LAUNCH_BACKFILL, {"params": params})["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched
    return launched["backfillId"]


# ---------------------------------------------------------------- the instance and the data


def instance_yaml() -> dict:
    """``infra/dagster.yaml``'s run coordination, retries and monitoring, on the local defaults
    (SQLite below DAGSTER_HOME, runs as subprocesses, compute logs on disk), polled every second
    instead of every minute; automation off (see the module's docstring)."""
    infra = yaml.safe_load((REPO / "infra" / "dagster.yaml").read_text())
    config = {k: infra[k] for k in ("concurrency", "run_retries", "run_monitoring", "telemetry")}
    monitoring = config["run_monitoring"]
    monitoring["poll_interval_seconds"] = 1
    if "free_slots_after_run_end_seconds" in monitoring:  # absent: the killed run's slot leaks
        monitoring["free_slots_after_run_end_seconds"] = 1
    config["run_coordinator"] = {
        "module": "dagster",
        "class": "QueuedRunCoordinator",
        "config": {"dequeue_interval_seconds": 1},  # limits: `concurrency` above
    }
    config["auto_materialize"] = {"enabled": False, "use_sensors": False}
    config["freshness"] = {"enabled": False}
    return config


def download_once(site: Site, tmp: Path, data: Path) -> Path:
    """``part-00000``'s metadata copy and downloads, made by the assets themselves."""
    from coyo_platform.definitions import coyo700m_metadata, downloaded_shards, local_resources

    source = write_source(site, tmp / "source")
    download = fast_run_config(site.checkpoint)["ops"]["downloaded_shards"]
    download["config"]["number_sample_per_shard"] = SHARD
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("coyo_parts", [PART])
        result = dg.materialize(
            [coyo700m_metadata, downloaded_shards],
            partition_key=PART,
            instance=instance,
            resources=local_resources(source=str(source), data_root=str(data)),
            run_config={"ops": {"downloaded_shards": download}},
        )
    assert result.success
    return source


def copy_partitions(data: Path) -> None:
    """``part-00000``'s metadata copy and shards, as the other 15 partitions'."""
    shards_of = data / layout.DOWNLOADS
    assert (
        sorted(p.name.removesuffix("_stats.json") for p in (shards_of / PART).glob("*_stats.json"))
        == SHARDS
    )
    for key in KEYS[1:]:
        shutil.copytree(shards_of / PART, shards_of / key)
        shutil.copy2(
            data / layout.METADATA / f"{PART}.parquet", data / layout.METADATA / f"{key}.parquet"
        )


def downloaded_ids(data: Path, key: str) -> list[int]:
    rows = pl.read_parquet(sorted((data / layout.DOWNLOADS / key).glob("[0-9]*.parquet")))
    return rows.filter(pl.col("status") == "success")["id"].to_list()


# ---------------------------------------------------------------- what the instance recorded


def step_interval(instance: dg.DagsterInstance, run_id: str) -> tuple[float, float | None] | None:
    """When the run's labeling step started and ended (for a run that died with its step: when
    the run was marked failed, an upper bound on when its slot could be taken again); None:
    not started, an end of None: still running."""
    kinds = {
        DagsterEventType.STEP_START, DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE,
        DagsterEventType.RUN_SUCCESS, DagsterEventType.RUN_FAILURE, DagsterEventType.RUN_CANCELED,
    }  # fmt: skip
    start = end = run_end = None
    for entry in instance.all_logs(run_id, of_type=kinds):
        event = entry.dagster_event
        if event.step_key == STEP and event.event_type == DagsterEventType.STEP_START:
            start = start or entry.timestamp
        elif event.step_key == STEP:
            end = end or entry.timestamp
        elif event.step_key is None:
            run_end = run_end or entry.timestamp
    return None if start is None else (start, end or run_end)


def most_at_once(intervals: list[tuple[float, float | None]]) -> int:
    """The most intervals open at one time (one ending when another starts: not both)."""
    edges = sorted(
        [(start, 1) for start, _ in intervals]
        + [(end, -1) for _, end in intervals if end is not None]
    )
    most = now = 0
    for _, change in edges:
        now += change
        most = max(most, now)
    return most


def files_of(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """A label folder's shard parquets: inode, mtime and bytes."""
    return {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(folder.glob("[0-9]*.parquet"))
    }


def partition_of(run: dg.DagsterRun) -> str:
    """The one partition a run of the backfill is for, by the tag the per-partition run limit
    (infra/dagster.yaml) and the sensors' check for runs in progress read."""
    assert PARTITION_NAME_TAG in run.tags, (
        f"a backfill run without {PARTITION_NAME_TAG}: neither the one-run-per-partition limit "
        f"nor the sensors see it ({run.tags})"
    )
    return run.tags[PARTITION_NAME_TAG]


def materialization_metadata(instance: dg.DagsterInstance, run_id: str) -> dict:
    [entry] = instance.all_logs(run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION)
    metadata = entry.dagster_event.event_specific_data.materialization.metadata
    return {k: v.value for k, v in metadata.items()}


# ---------------------------------------------------------------- the test


def test_backfill_through_the_daemon_pool_of_2_and_a_killed_run_retried(site: Site, tmp_path: Path):
    home, data, hook = tmp_path / "dagster_home", tmp_path / "data", tmp_path / "hold_hook"
    claim = tmp_path / "held.json"
    for folder in (home, hook):
        folder.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(instance_yaml()))
    (hook / "sitecustomize.py").write_text(HOLD_HOOK)
    source = download_once(site, tmp_path, data)
    copy_partitions(data)

    env = {
        **os.environ, "DAGSTER_HOME": str(home), "COYO_ENV": "local",
        "COYO_DATA_ROOT": str(data), "COYO_SOURCE": str(source),
    }  # fmt: skip
    hold_env = {
        **env,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])),
        "COYO_TEST_HOLD_AFTER": str(HOLD_AFTER),
        "COYO_TEST_HOLD_CLAIM": str(claim),
    }
    set_pool = subprocess.run(
        [str(BIN / "dagster"), "instance", "concurrency", "set", POOL, str(SLOTS)],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert set_pool.returncode == 0, set_pool.stdout + set_pool.stderr

    logs = {"daemon": tmp_path / "daemon.log", "webserver": tmp_path / "webserver.log"}
    wait = Waiter(logs)
    instance = dg.DagsterInstance.from_config(str(home))
    instance.add_dynamic_partitions("coyo_parts", KEYS)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    webserver_cmd = [str(BIN / "dagster-webserver"), "-w", "workspace.yaml",
                     "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
    daemon_cmd = [str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"]
    began = time.monotonic()
    with contextlib.ExitStack() as stack:
        webserver = stack.enter_context(started(webserver_cmd, logs["webserver"], env))
        wait.watch("the webserver", webserver)
        location = wait.until("the code location in the webserver", lambda: loaded_location(url))
        # on by default, it would label every partition with the default (hub) model
        stop_sensor(url, location, "unlabeled_shards_sensor")
        daemon = stack.enter_context(started(daemon_cmd, logs["daemon"], hold_env))
        wait.watch("the daemon", daemon)
        labeler_config = fast_run_config(site.checkpoint)["ops"][STEP]
        backfill_id = launch_backfill(url, KEYS, {"ops": {STEP: labeler_config}, **IN_PROCESS})
        wait.forget("the webserver")
        webserver.terminate()  # the UI's part is done

        def runs() -> list[dg.DagsterRun]:
            return instance.get_runs(filters=dg.RunsFilter(tags={BACKFILL_ID_TAG: backfill_id}))

        # 1. a label program held in the middle of its partition, its step holding a slot
        wait.until(f"a label program to write {HOLD_AFTER} shards' labels", claim.exists)
        held = json.loads(claim.read_text())
        key = held["part"]
        [killed] = [r for r in runs() if partition_of(r) == key]
        labels = next((data / layout.LABELS).glob(f"*/{key}"))
        kept = files_of(labels)
        assert sorted(kept) == [f"{s}.parquet" for s in SHARDS[:HOLD_AFTER]]

        # 2. another labeling step beside it: the pool runs 2 at once
        def another_step() -> bool:
            mine = step_interval(instance, killed.run_id)
            assert mine is not None and mine[1] is None, "the held step is not running"
            others = [
                step_interval(instance, r.run_id) for r in runs() if r.run_id != killed.run_id
            ]
            return any(o is not None and (o[1] is None or o[1] > mine[0]) for o in others)

        wait.until("a 2nd labeling step while one holds its slot", another_step)

        # 3. the machine running the held run dies: its worker and all below it, SIGKILLed
        [worker] = [
            int(e.dagster_event.event_specific_data.metadata["pid"].value)
            for e in instance.all_logs(killed.run_id, of_type=DagsterEventType.ENGINE_EVENT)
            if (e.dagster_event.message or "").startswith("Started process for run")
        ]
        assert held["pid"] in descendants(worker), "the held label program is not that run's"
        kill_tree(worker)
        wait.until(
            "the killed run to be marked failed",
            lambda: instance.get_run_by_id(killed.run_id).status == dg.DagsterRunStatus.FAILURE,
        )

        # 4. retried, and the backfill done
        def backfill_done():
            backfill = instance.get_backfill(backfill_id)
            return backfill.status in BULK_ACTION_TERMINAL_STATUSES and all(
                r.status in FINISHED_STATUSES for r in runs()
            )

        wait.until("the backfill to finish", backfill_done, BACKFILL_DEADLINE)
        # 5. no slot left to the killed run: a run that died holding one never frees it itself
        held_slots = instance.event_log_storage.get_concurrency_info(POOL).claimed_slots
        wait.until(
            f"every {POOL} slot free once every run ended, the killed run's freed by run "
            f"monitoring (free_slots_after_run_end_seconds); held then: {held_slots}",
            lambda: not instance.event_log_storage.get_concurrency_info(POOL).claimed_slots,
            deadline=60,
        )
    print(f"backfill of {len(KEYS)} partitions, kill and retry: {time.monotonic() - began:.0f} s")

    every = runs()
    backfill = instance.get_backfill(backfill_id)
    assert backfill.status == BulkActionStatus.COMPLETED_SUCCESS, (
        backfill.status,
        wait.logs_tail(),
    )
    assert instance.get_materialized_partitions(dg.AssetKey(STEP)) == set(KEYS)

    # the killed run: failed with no step failure, retried once, as a run of the same partition
    killed = instance.get_run_by_id(killed.run_id)
    assert killed.status == dg.DagsterRunStatus.FAILURE
    assert not instance.all_logs(killed.run_id, of_type=DagsterEventType.STEP_FAILURE)
    [retry] = [r for r in every if r.tags.get(PARENT_RUN_ID_TAG) == killed.run_id]
    assert retry.tags[RETRY_NUMBER_TAG] == "1" and retry.tags[ROOT_RUN_ID_TAG] == killed.run_id
    assert partition_of(retry) == key and retry.status == dg.DagsterRunStatus.SUCCESS
    assert len(every) == len(KEYS) + 1, [(partition_of(r), r.status) for r in every]
    others = [r for r in every if r.run_id not in (killed.run_id, retry.run_id)]
    assert sorted(partition_of(r) for r in others) == sorted(set(KEYS) - {key})
    assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in others)

    # resumed at shard granularity: the shards labeled before the kill untouched, the rest new
    now = files_of(labels)
    assert {name: now[name] for name in kept} == kept  # the same inode, mtime and bytes
    assert sorted(now) == [f"{s}.parquet" for s in SHARDS]
    done = materialization_metadata(instance, retry.run_id)
    assert (done["shards_skipped"], done["shards_labeled"]) == (
        HOLD_AFTER,
        len(SHARDS) - HOLD_AFTER,
    )

    # every partition: every downloaded image labeled once, in its current label set
    store = Storage(str(data))
    for part in KEYS:
        coverage = shards.label_coverage(store, part)
        assert coverage.complete, (part, coverage)
        ids = pl.read_parquet(shards.label_files(store, part))["id"].to_list()
        assert sorted(ids) == sorted(downloaded_ids(data, part)), part

    # the pool: never more than 2 labeling steps at once, and 2 while the held one ran
    intervals = [step_interval(instance, r.run_id) for r in every]
    assert None not in intervals and all(end is not None for _, end in intervals)
    assert most_at_once(intervals) == SLOTS, intervals
