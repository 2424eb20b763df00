"""The aws deployment's compute seam, end to end: the pipeline for a partition with storage on S3
(moto's server on loopback) and the two programs, ``download`` and ``label``, launched by
``EcsCompute`` through ``PipesECSClient``, the Pipes context and messages passing through S3.

ECS itself cannot run here, so ECS's API is answered in-process: every request is built,
validated and serialized by botocore exactly as for AWS (its service model rejects a malformed
``run_task``), then ``run_task`` starts the task's container the way ECS would: as a process
running the task definition's entrypoint from ``infra/coyo-platform.yaml`` plus the override's
command, with the task definition's and the override's environment. Only ``python`` is this
interpreter rather than the image's. A task can be stopped from outside as ECS stops one whose
spot instance is reclaimed (``LoopbackEcs.reclaim_spot_instance``)."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path

import boto3
import botocore.session
import botocore.validate
import dagster as dg
import polars as pl
import pytest
from botocore.awsrequest import AWSResponse

from coyo_platform.definitions import PIPELINE
from coyo_platform.resources import ECS_OVERRIDES_LIMIT, EcsCompute, SourceResource, StorageResource
from coyo_platform_tests.conftest import ROWS, fast_run_config
from coyo_platform_tests.test_infra import template

PART = "part-00000"
ACCOUNT, REGION = "123456789012", "us-east-1"


def _resolve(value):
    """The template's values as CloudFormation would give them, for the pseudo parameters used."""
    if value == {"Ref": "AWS::Region"}:
        return REGION
    assert isinstance(value, str), f"no stand-in for {value}"
    return value


class _Body:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def stream(self, **_):
        yield self.data


#: How ECS reports a task it stopped itself: its essential container ended on its own, or its spot
#: instance was reclaimed (the container is sent SIGTERM, then SIGKILL after its stop timeout).
EXITED = {
    "stopCode": "EssentialContainerExited",
    "stoppedReason": "Essential container in task exited",
}
SPOT = {"stopCode": "SpotInterruption", "stoppedReason": "Your Spot Task was interrupted."}
STOP_TIMEOUT = 30  # seconds, ECS's default stopTimeout (the stack's task definitions set none)


class LoopbackEcs:
    """ECS's API for the stack's task definitions, with tasks run as local processes (each in
    its own process group, as a container: a stop signals every process in it)."""

    def __init__(self) -> None:
        resources = template()["Resources"]
        self.definitions = {}
        for logical, family in (
            ("LabelTaskDefinition", "coyo-label"),
            ("DownloadTaskDefinition", "coyo-download"),
        ):
            [container] = resources[logical]["Properties"]["ContainerDefinitions"]
            self.definitions[family] = container
        self.requests: list[dict] = []
        self.tasks: dict[str, dict] = {}
        self.stopped: list[dict] = []
        self.interrupt_while_running = False  # as if the Dagster run were terminated meanwhile
        self._reclaim: tuple[Callable[[], bool], Callable[[], None]] | None = None
        self.model = botocore.session.get_session().get_service_model("ecs")

    def reclaim_spot_instance(
        self, when: Callable[[], bool], then: Callable[[], None] = lambda: None
    ) -> None:
        """The next task's spot instance is reclaimed as soon as ``when()`` holds while the task
        runs (checked every 0.05 s): its container gets SIGTERM, then SIGKILL after
        ``STOP_TIMEOUT``, and the task stops with ECS's spot stop code and reason; ``then()``
        is called once its processes are gone. Later tasks run undisturbed."""
        self._reclaim = (when, then)

    def _run_container(self, command: list[str], env: dict) -> tuple[int, str, dict]:
        """Run the container's process to its end (or its reclaim): its exit code as Docker
        reports one (128 + the signal that killed it), its stderr, and the task's stop."""
        reclaim, self._reclaim = self._reclaim, None
        with tempfile.TemporaryFile() as stderr:
            proc = subprocess.Popen(
                command, env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True
            )
            stop = EXITED
            try:
                if reclaim is None:
                    proc.wait()
                else:
                    when, then = reclaim
                    while proc.poll() is None and not when():
                        time.sleep(0.05)
                    if proc.poll() is None:
                        self._stop_container(proc)
                        stop = SPOT
                        then()
            except BaseException:  # a failing check: no container left running behind the test
                self._stop_container(proc)
                raise
            stderr.seek(0)
            text = stderr.read().decode(errors="replace")
        code = proc.returncode
        return (128 - code if code < 0 else code), text, stop

    @staticmethod
    def _stop_container(proc: subprocess.Popen) -> None:
        """As ECS stops a container: SIGTERM, SIGKILL after the stop timeout; then nothing of it
        runs any more (its loader processes included)."""
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # the whole group ended at SIGTERM
            pass
        proc.wait()

    def __call__(self, request, **_) -> AWSResponse:
        operation = request.headers["X-Amz-Target"].decode().split(".")[-1]
        params = json.loads(request.body or b"{}")
        body = getattr(self, operation)(params)
        return AWSResponse(request.url, 200, {}, _Body(json.dumps(body).encode()))

    def _definition(self, family: str) -> dict:
        container = self.definitions[family.split(":")[0].split("/")[-1]]
        return {
            "name": container["Name"],
            "image": "programs:latest",
            "entryPoint": container["EntryPoint"],
            "environment": [
                {"name": e["Name"], "value": _resolve(e["Value"])} for e in container["Environment"]
            ],
            "logConfiguration": {
                "logDriver": "awslogs",
                "options": {
                    "awslogs-group": "/coyo-platform/test/programs",
                    "awslogs-region": REGION,
                    "awslogs-stream-prefix": container["Name"],
                },
            },
        }

    def DescribeTaskDefinition(self, params: dict) -> dict:  # noqa: N802 (ECS's names)
        family = params["taskDefinition"]
        return {
            "taskDefinition": {
                "taskDefinitionArn": f"arn:aws:ecs:{REGION}:{ACCOUNT}:task-definition/{family}:1",
                "family": family,
                "containerDefinitions": [self._definition(family)],
            }
        }

    def RunTask(self, params: dict) -> dict:  # noqa: N802
        operation = self.model.operation_model("RunTask")
        botocore.validate.validate_parameters(params, operation.input_shape)  # raises if not
        self.requests.append(params)
        definition = self._definition(params["taskDefinition"])
        [override] = params["overrides"]["containerOverrides"]
        assert override["name"] == definition["name"]
        env = dict(os.environ)
        for entry in definition["environment"] + override.get("environment", []):
            env[entry["name"]] = entry["value"]
        entry_point = [sys.executable if w == "python" else w for w in definition["entryPoint"]]
        command = [*entry_point, *override["command"]]
        if self.interrupt_while_running:
            command = [sys.executable, "-c", "pass"]  # the task is 'running' when Dagster stops
        exit_code, stderr, stop = self._run_container(command, env)
        cluster = params["cluster"]
        arn = f"arn:aws:ecs:{REGION}:{ACCOUNT}:task/{cluster}/{uuid.uuid4().hex}"
        family = params["taskDefinition"]
        self.tasks[arn] = {
            "taskArn": arn,
            "clusterArn": f"arn:aws:ecs:{REGION}:{ACCOUNT}:cluster/{cluster}",
            "taskDefinitionArn": f"arn:aws:ecs:{REGION}:{ACCOUNT}:task-definition/{family}:1",
            "lastStatus": "STOPPED",
            "desiredStatus": "STOPPED",
            **stop,
            "containers": [
                {
                    "name": definition["name"],
                    "lastStatus": "STOPPED",
                    "exitCode": exit_code,
                    "runtimeId": arn[-12:],
                }
            ],
            "_stderr": stderr,
        }
        started = {
            **{k: v for k, v in self.tasks[arn].items() if k not in ("_stderr", *stop)},
            "lastStatus": "PENDING",
            "desiredStatus": "RUNNING",
            "containers": [{"name": definition["name"]}],
        }
        return {"tasks": [started], "failures": []}

    def DescribeTasks(self, params: dict) -> dict:  # noqa: N802
        if self.interrupt_while_running:
            from dagster._core.errors import DagsterExecutionInterruptedError

            raise DagsterExecutionInterruptedError()
        tasks = [
            {k: v for k, v in self.tasks[t].items() if k != "_stderr"} for t in params["tasks"]
        ]
        return {"tasks": tasks, "failures": []}

    def StopTask(self, params: dict) -> dict:  # noqa: N802
        self.stopped.append(params)
        return {"task": self.DescribeTasks({"tasks": [params["task"]]})["tasks"][0]}


@pytest.fixture
def ecs(s3_bucket, monkeypatch) -> LoopbackEcs:
    fake = LoopbackEcs()
    boto3.setup_default_session()
    boto3.DEFAULT_SESSION.events.register("before-send.ecs", fake)
    yield fake
    boto3.DEFAULT_SESSION = None


def _decode(value: str) -> dict:
    return json.loads(zlib.decompress(base64.b64decode(value)))


def _ecs_resources(source, s3_bucket, **compute_settings) -> dict:
    # messages read every 0.2 s rather than 5: the runs below wait less for their last report
    settings = {"subnets": "subnet-0a", "messages_interval": 0.2, **compute_settings}
    compute = EcsCompute(
        cluster="coyo-test",
        pipes_bucket=s3_bucket,
        download_task_definition="coyo-download",
        label_task_definition="coyo-label",
        cpu_capacity_provider="coyo-cpu",
        gpu_capacity_provider="coyo-gpu",
        **settings,
    )
    return {
        "source": SourceResource(location=str(source)),
        "storage": StorageResource(root=f"s3://{s3_bucket}/coyo"),
        "compute": compute,
    }


def test_pipeline_runs_its_programs_as_ecs_tasks_over_s3(site, source: Path, s3_bucket, ecs):
    checkpoint_url = f"s3://{s3_bucket}/weights/random_model.pth"
    boto3.client("s3").upload_file(str(site.checkpoint), s3_bucket, "weights/random_model.pth")
    resources = _ecs_resources(
        source, s3_bucket, subnets="subnet-0a,subnet-0b", security_groups="sg-0c"
    )
    compute = resources["compute"]
    run_config = fast_run_config(site.checkpoint)
    run_config["ops"]["labeled_shards"]["config"]["checkpoint"] = checkpoint_url
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("coyo_parts", [PART])
        result = dg.materialize(
            PIPELINE,
            partition_key=PART,
            instance=instance,
            resources=resources,
            run_config=run_config,
            raise_on_error=False,
        )
    stderr = "\n".join(t["_stderr"][-2000:] for t in ecs.tasks.values())
    assert result.success, stderr

    # what Dagster received from the containers, through the S3 message channel
    [download] = result.asset_materializations_for_node("downloaded_shards")
    [labels] = result.asset_materializations_for_node("labeled_shards")
    assert download.metadata["attempted"].value == ROWS
    labeled = labels.metadata["images_labeled"].value
    assert labeled == download.metadata["succeeded"].value > 0
    assert labels.metadata["checkpoint"].value == checkpoint_url
    labeler = labels.metadata["labeler"].value
    folder = f"s3://{s3_bucket}/coyo/labeled_shards/{labeler}/{PART}"
    assert labels.metadata["path"].value == folder
    rows = pl.scan_parquet(f"{folder}/*.parquet").collect()
    assert rows.filter(pl.col("error").is_null()).height == labeled

    # the two run_task requests: one task each, on the right capacity, small overrides
    download, label = ecs.requests
    assert download["taskDefinition"] == "coyo-download"
    assert label["taskDefinition"] == "coyo-label"
    assert download["capacityProviderStrategy"] == [{"capacityProvider": "coyo-cpu", "weight": 1}]
    assert label["capacityProviderStrategy"] == [{"capacityProvider": "coyo-gpu", "weight": 1}]
    [gpu_override] = label["overrides"]["containerOverrides"]
    [cpu_override] = download["overrides"]["containerOverrides"]
    assert gpu_override["resourceRequirements"] == [{"type": "GPU", "value": "1"}]
    assert "resourceRequirements" not in cpu_override
    assert label["networkConfiguration"]["awsvpcConfiguration"]["subnets"] == [
        "subnet-0a",
        "subnet-0b",
    ]
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert not [k for k in keys if not k.startswith(("coyo/", "dagster-pipes/", "weights/"))]
    for request in ecs.requests:
        assert request["count"] == 1
        assert len(json.dumps(request["overrides"])) < ECS_OVERRIDES_LIMIT
        env = {
            e["name"]: e["value"]
            for e in request["overrides"]["containerOverrides"][0]["environment"]
        }
        # the Pipes context and messages are S3 locations, not inline payloads
        context, messages = (
            _decode(env["DAGSTER_PIPES_CONTEXT"]),
            _decode(env["DAGSTER_PIPES_MESSAGES"]),
        )
        assert set(context) == {"bucket", "key"} and messages["bucket"] == s3_bucket
        # under the prefix the stack's lifecycle rule expires
        assert context["key"].startswith("dagster-pipes/")
        assert messages["key_prefix"].startswith("dagster-pipes/")
        assert any(t["key"] == "dagster/run-id" for t in request["tags"])
    assert compute.pipes_client().forward_termination  # a terminated run stops its task
    assert gpu_override["command"][:2] == [
        "--shards",
        f"s3://{s3_bucket}/coyo/downloaded_shards/{PART}",
    ]


def _label_run(site, instance, resources, **settings):
    labels = fast_run_config(site.checkpoint)["ops"]["labeled_shards"]
    labels["config"].update(settings)
    return dg.materialize(
        [PIPELINE[2]],
        partition_key=PART,
        instance=instance,
        resources=resources,
        run_config={"ops": {"labeled_shards": labels}},
        raise_on_error=False,
    )


def test_a_failing_task_is_retried_then_fails_the_asset_saying_why(site, source, s3_bucket, ecs):
    """The partition's only shard is an empty tar: the label program exits non-zero in its task,
    the step is retried twice (as for a reclaimed spot instance), then fails; the program's own
    reason reaches Dagster's log through the S3 message channel."""
    boto3.client("s3").put_object(
        Bucket=s3_bucket, Key=f"coyo/downloaded_shards/{PART}/00000.tar", Body=b""
    )
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("coyo_parts", [PART])
        result = _label_run(site, instance, _ecs_resources(source, s3_bucket))
        closed = [
            e for e in instance.all_logs(result.run_id) if "closed with exception" in e.user_message
        ]
    assert not result.success
    assert len(ecs.tasks) == 3, "one task, then two retries"
    assert sum(e.is_step_up_for_retry for e in result.all_events) == 2
    [failure] = [e for e in result.all_events if e.is_step_failure]
    assert "non-zero exit code" in failure.step_failure_data.error.to_string()
    assert len(closed) == 3
    error = closed[-1].dagster_event.engine_event_data.error
    assert "1 shard(s) could not be read" in error.message and "00000.tar" in error.message
    for task in ecs.tasks.values():
        assert task["containers"][0]["exitCode"] == 1


SPOT_SHARD_SIZE = 5  # the part's 45 rows in 9 shards: room to stop a label task between two


def _labeled_versions(bucket: str) -> dict[str, list[tuple[str, str, str]]]:
    """Every write of each of the partition's labeled-shard parquets (any labeler) on S3, by
    key: (version id, ETag, last modified) each, on a bucket with versioning."""
    pattern = re.compile(rf"^coyo/labeled_shards/[^/]+/{PART}/\d{{5}}\.parquet$")
    pages = boto3.client("s3").get_paginator("list_object_versions")
    found: dict[str, list[tuple[str, str, str]]] = {}
    for page in pages.paginate(Bucket=bucket, Prefix="coyo/labeled_shards/"):
        for v in page.get("Versions", []):
            if pattern.match(v["Key"]):
                stamp = (v["VersionId"], v["ETag"], v["LastModified"].isoformat())
                found.setdefault(v["Key"], []).append(stamp)
    return found


def test_a_spot_reclaimed_label_task_is_retried_and_resumes_at_its_finished_shards(
    site, source, s3_bucket, ecs
):
    """The partition is downloaded (through ECS) into 9 shards. The first label task's spot
    instance is reclaimed once a shard's labels are on S3: ECS stops the task (SIGTERM to its
    container) with its spot stop code and reason. The step is retried in a second task, which
    labels only the shards the first did not finish, keeping the first's files as they were;
    every downloaded image is labeled once, and Dagster's log says why the first task stopped."""
    s3 = boto3.client("s3")
    # every write of an object stays listed: a shard labeled twice would have two versions
    s3.put_bucket_versioning(Bucket=s3_bucket, VersioningConfiguration={"Status": "Enabled"})
    resources = _ecs_resources(source, s3_bucket)
    download_config = fast_run_config(site.checkpoint)["ops"]["downloaded_shards"]
    download_config["config"]["number_sample_per_shard"] = SPOT_SHARD_SIZE
    first_task_wrote: dict[str, list[tuple[str, str, str]]] = {}
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("coyo_parts", [PART])
        downloaded = dg.materialize(
            PIPELINE[:2],
            partition_key=PART,
            instance=instance,
            resources=resources,
            run_config={"ops": {"downloaded_shards": download_config}},
            raise_on_error=False,
        )
        assert downloaded.success, "\n".join(t["_stderr"][-2000:] for t in ecs.tasks.values())
        tars = s3.list_objects_v2(Bucket=s3_bucket, Prefix=f"coyo/downloaded_shards/{PART}/")
        shards = sorted(o["Key"] for o in tars["Contents"] if o["Key"].endswith(".tar"))
        assert len(shards) == 9, shards

        ecs.reclaim_spot_instance(
            when=lambda: bool(_labeled_versions(s3_bucket)),  # a first shard's labels are written
            then=lambda: first_task_wrote.update(_labeled_versions(s3_bucket)),
        )
        # every shard padded to a batch of 64 (a setting of the label program): each shard is
        # then a whole batch's work, so a reclaim seen from outside lands between two shards
        result = _label_run(site, instance, resources, batch_size=64)
        events = instance.all_logs(result.run_id)
    assert result.success, "\n".join(t["_stderr"][-3000:] for t in ecs.tasks.values())

    # one download task, then two label tasks: the reclaimed one and its retry
    download_task, first, second = ecs.tasks.values()
    assert download_task["taskDefinitionArn"].endswith("/coyo-download:1")
    for task in (first, second):
        assert task["taskDefinitionArn"].endswith("/coyo-label:1")
    assert (first["stopCode"], first["stoppedReason"]) == (SPOT["stopCode"], SPOT["stoppedReason"])
    [first_container] = first["containers"]
    assert first_container["exitCode"] in (128 + signal.SIGTERM, 128 + signal.SIGKILL)
    assert second["stopCode"] == "EssentialContainerExited"
    assert second["containers"][0]["exitCode"] == 0
    done_by_first = len(first_task_wrote)
    assert 0 < done_by_first < len(shards), (
        f"the first task was to be stopped mid-partition; it had written {done_by_first} of "
        f"{len(shards)} shards' labels"
    )

    # the retry labeled only the other shards: the first task's files are the same objects
    # (one write each, untouched), and every shard was written exactly once
    written = _labeled_versions(s3_bucket)
    assert len(written) == len(shards)
    assert {k: v for k, v in written.items() if k in first_task_wrote} == first_task_wrote
    assert all(len(versions) == 1 for versions in written.values()), written
    [labels] = result.asset_materializations_for_node("labeled_shards")
    assert labels.metadata["shards_skipped"].value == done_by_first
    assert labels.metadata["shards_labeled"].value == len(shards) - done_by_first

    # every downloaded image labeled once
    [download] = downloaded.asset_materializations_for_node("downloaded_shards")
    succeeded = (
        pl.scan_parquet(f"s3://{s3_bucket}/coyo/downloaded_shards/{PART}/*.parquet")
        .filter(pl.col("status") == "success")
        .select("id")
        .collect()
    )
    assert succeeded.height == download.metadata["succeeded"].value > 0
    rows = pl.scan_parquet(f"{labels.metadata['path'].value}/*.parquet").select("id").collect()
    assert rows.height == succeeded.height == rows["id"].n_unique()
    assert sorted(rows["id"].to_list()) == sorted(succeeded["id"].to_list())

    # what a user sees in the run's log: the first attempt failed because ECS stopped its task
    # for a spot interruption, and the step was retried
    retries = [e for e in events if e.dagster_event and e.dagster_event.is_step_up_for_retry]
    assert len(retries) == 1
    said = retries[0].dagster_event.event_specific_data.error.to_string()  # with its causes
    assert "SpotInterruption" in said and SPOT["stoppedReason"] in said, said
    assert str(first_container["exitCode"]) in said, said


def test_labeling_a_partition_never_downloaded_fails_at_once_without_a_task(
    site, source, s3_bucket, ecs
):
    """Bad input is not retried and launches nothing."""
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("coyo_parts", [PART])
        result = _label_run(site, instance, _ecs_resources(source, s3_bucket))
    assert not result.success
    assert ecs.tasks == {}
    assert not any(e.is_step_up_for_retry for e in result.all_events)
    [failure] = [e for e in result.all_events if e.is_step_failure]
    assert "no downloaded shards in s3://" in failure.step_failure_data.error.to_string()


def test_terminating_the_run_stops_its_ecs_task(site, source, s3_bucket, ecs, monkeypatch):
    """While the label task runs, the Dagster run is interrupted (terminated from the UI):
    the ECS task is stopped, on its cluster, with a reason."""
    import dagster._core.pipes.utils as pipes_utils

    # a stopped task writes no closing message, which Dagster waits 10 s for after the task ends;
    # here no message can come (the task never ran the program): no need to wait for one
    monkeypatch.setattr(pipes_utils, "WAIT_FOR_LOGS_AFTER_EXECUTION_INTERVAL", 0)
    resources = _ecs_resources(source, s3_bucket)
    boto3.client("s3").put_object(  # something to label: the pre-flight check passes
        Bucket=s3_bucket, Key=f"coyo/downloaded_shards/{PART}/00000.tar", Body=b""
    )
    ecs.interrupt_while_running = True
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("coyo_parts", [PART])
        result = dg.materialize(
            [PIPELINE[2]],
            partition_key=PART,
            instance=instance,
            resources=resources,
            raise_on_error=False,
        )
    assert not result.success
    # every task launched was stopped, on its cluster, with the reason (here the interrupted step
    # is also retried: in a real termination the whole run stops instead)
    assert ecs.tasks
    assert sorted(s["task"] for s in ecs.stopped) == sorted(ecs.tasks)
    for stop in ecs.stopped:
        assert (stop["cluster"], stop["reason"]) == ("coyo-test", "Dagster process was interrupted")
