"""The platform's two seams, as Dagster resources: storage (where data lives) and compute (where
the two programs, ``download`` and ``label``, run). ``definitions.py`` picks one set per
deployment."""

from __future__ import annotations

import json
import sys
import warnings
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from contextlib import contextmanager

import dagster as dg
from dagster_aws.pipes import PipesECSClient, PipesS3ContextInjector, PipesS3MessageReader

from coyo_platform.common.reporting import ERROR, FAILURE
from coyo_platform.common.storage import Storage
from coyo_platform.ingest.sources import HUB_SOURCE

# Dagster's own Pipes plumbing trips its preview warning on every run; it is not ours to act on.
warnings.filterwarnings("ignore", message=".*expected_writer_count.*")


class SourceResource(dg.ConfigurableResource):
    """Where COYO-700M parts are read from: a folder, an ``s3://`` prefix or an ``hf://`` path."""

    location: str = HUB_SOURCE


class StorageResource(dg.ConfigurableResource):
    """The storage root every asset reads and writes below (a local folder or ``s3://``).
    Credentials: the standard AWS chain only. ``endpoint_url`` (else ``AWS_ENDPOINT_URL``) for
    S3-compatible stores."""

    root: str = "./data"
    endpoint_url: str | None = None

    def store(self) -> Storage:
        return Storage(self.root, endpoint_url=self.endpoint_url)


#: The two programs the compute seam runs, by name: each is ``python -m <module>``, and on ECS the
#: container of the same name in its task definition.
PROGRAMS = {"download": "coyo_platform.download", "label": "coyo_platform.label"}
#: The program that needs a GPU.
GPU_PROGRAM = "label"


def _check_program(program: str) -> str:
    if program not in PROGRAMS:
        raise ValueError(f"unknown program {program!r}; known: {', '.join(PROGRAMS)}")
    return PROGRAMS[program]


class ComputeResource(dg.ConfigurableResource):
    """Runs one of the platform's Dagster-free programs for an asset, through Dagster Pipes, and
    returns the materialization the program reported."""

    @abstractmethod
    def run_program(
        self,
        context: dg.AssetExecutionContext,
        program: str,
        args: Sequence[str],
        env: Mapping[str, str] | None = None,
    ) -> dg.MaterializeResult:
        """Run ``program`` (a key of ``PROGRAMS``) with ``args``, ``env`` added to its
        environment."""

    @staticmethod
    def result(run, program: str) -> dg.MaterializeResult:
        """The materialization the program reported, or the failure it reported: bad input or
        mismatched state (``reporting.FAILURE``) as a failure that is not retried, anything
        else (``reporting.ERROR``: an outage, say) as one the retry policy retries."""
        messages = [m for m in run.get_custom_messages() if isinstance(m, dict)]
        for kind, retried in ((FAILURE, False), (ERROR, True)):
            said = [m[kind] for m in messages if kind in m]
            if said:
                raise dg.Failure(description=f"{program}: {said[0]}", allow_retries=retried)
        # no implicit materialization: a program that ended without reporting one failed
        return run.get_materialize_result(implicit_materialization=False)


class LocalCompute(ComputeResource):
    """Runs the program as a subprocess of this machine (``PipesSubprocessClient``)."""

    def run_program(
        self,
        context: dg.AssetExecutionContext,
        program: str,
        args: Sequence[str],
        env: Mapping[str, str] | None = None,
    ) -> dg.MaterializeResult:
        command = [sys.executable, "-m", _check_program(program), *args]
        context.log.info(f"running {' '.join(command)}")
        run = dg.PipesSubprocessClient().run(context=context, command=command, env=dict(env or {}))
        return self.result(run, program)


ECS_OVERRIDES_LIMIT = 8192  # characters of a run_task's overrides, ECS's own cap


class EcsCompute(ComputeResource):
    """Runs each program as one ECS task per partition through ``PipesECSClient``: ``download``
    on the CPU capacity provider, ``label`` on the GPU one (one GPU per task). The Pipes context
    and the messages travel through S3 (``pipes_bucket``), so nothing depends on CloudWatch or on
    ECS's 8 KB override limit; the container's logs go to CloudWatch through ``awslogs``. When the
    Dagster run is terminated, the task is stopped (``forward_termination``).

    The task definitions (``infra/coyo-platform.yaml``) set each image's entrypoint
    (``python -m coyo_platform.download|label``); a run overrides only the arguments and the
    environment. Credentials: the standard AWS chain (the Dagster task's IAM role)."""

    cluster: str
    subnets: str
    """Comma-separated subnet ids for the tasks (awsvpc network mode)."""
    security_groups: str = ""
    pipes_bucket: str
    pipes_prefix: str = "dagster-pipes"
    download_task_definition: str
    label_task_definition: str
    cpu_capacity_provider: str
    gpu_capacity_provider: str
    region: str | None = None
    messages_interval: float = 5.0
    """Seconds between reads of a task's Pipes messages on S3 (progress lines, the report)."""

    def run_task_params(
        self, program: str, args: Sequence[str], env: Mapping[str, str] | None = None
    ) -> dict:
        """The ``run_task`` request for one program run, before Pipes adds its variables."""
        _check_program(program)
        gpu = program == GPU_PROGRAM
        override: dict = {
            "name": program,
            "command": list(args),
            "environment": [{"name": k, "value": v} for k, v in sorted((env or {}).items())],
        }
        if gpu:
            override["resourceRequirements"] = [{"type": "GPU", "value": "1"}]
        network = {"subnets": [s.strip() for s in self.subnets.split(",") if s.strip()]}
        groups = [g.strip() for g in self.security_groups.split(",") if g.strip()]
        if groups:
            network["securityGroups"] = groups
        network["assignPublicIp"] = "DISABLED"
        provider = self.gpu_capacity_provider if gpu else self.cpu_capacity_provider
        return {
            "cluster": self.cluster,
            "taskDefinition": self.label_task_definition if gpu else self.download_task_definition,
            "count": 1,
            "capacityProviderStrategy": [{"capacityProvider": provider, "weight": 1}],
            "networkConfiguration": {"awsvpcConfiguration": network},
            "overrides": {"containerOverrides": [override]},
            "propagateTags": "TASK_DEFINITION",
            "startedBy": "coyo-platform",
        }

    def pipes_client(self):
        import boto3

        s3 = boto3.client("s3", region_name=self.region)
        prefix = self.pipes_prefix.strip("/")
        return StopReasonECSClient(
            client=boto3.client("ecs", region_name=self.region),
            context_injector=PipesS3ContextInjector(
                bucket=self.pipes_bucket, client=s3, key_prefix=f"{prefix}/"
            ),
            message_reader=PrefixedS3MessageReader(
                prefix=prefix, bucket=self.pipes_bucket, client=s3, interval=self.messages_interval
            ),
            forward_termination=True,
        )

    def run_program(
        self,
        context: dg.AssetExecutionContext,
        program: str,
        args: Sequence[str],
        env: Mapping[str, str] | None = None,
    ) -> dg.MaterializeResult:
        params = self.run_task_params(program, args, env)
        size = len(json.dumps(params["overrides"]))
        if size > ECS_OVERRIDES_LIMIT // 2:  # Pipes adds two small variables on top
            raise ValueError(f"ECS overrides for {program} are {size} characters; keep them short")
        context.log.info(
            f"running {program} as an ECS task ({params['taskDefinition']} on "
            f"{params['capacityProviderStrategy'][0]['capacityProvider']}): {' '.join(args)}"
        )
        run = self.pipes_client().run(context=context, run_task_params=params)
        return self.result(run, program)


class StopReasonECSClient(PipesECSClient):
    """``PipesECSClient``, saying why ECS stopped a task that did not end by itself (its spot
    instance reclaimed, its instance drained...): dagster_aws 0.29 reports only a container's
    runtime id and that its exit code was not 0. The step fails with ECS's stop code and reason,
    and is retried as any failure that is not bad input. (It overrides a private method of the
    pinned dagster_aws 0.29.27: check it when upgrading; ``test_ecs.py`` fails if it breaks.)"""

    def _wait_for_completion(self, start_response, cluster=None, waiter_config=None):
        response = super()._wait_for_completion(start_response, cluster, waiter_config)
        for task in response["tasks"]:
            code = task.get("stopCode")
            unfinished = [c for c in task["containers"] if c.get("exitCode") != 0]
            if code not in (None, "EssentialContainerExited", "TaskFailedToStart") and unfinished:
                reason = task.get("stoppedReason", "no reason given")
                exits = ", ".join(f"{c['name']}: {c.get('exitCode', 'none')}" for c in unfinished)
                raise RuntimeError(
                    f"ECS stopped task {task['taskArn']} ({code}: {reason}); "
                    f"container exit codes: {exits}"
                )
        return response


class PrefixedS3MessageReader(PipesS3MessageReader):
    """Pipes messages under ``prefix/`` (dagster_aws 0.29 puts them at the bucket's root), so that
    the stack's lifecycle rule on that prefix expires them."""

    def __init__(self, *, prefix: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self._prefix = prefix

    @contextmanager
    def get_params(self):
        with super().get_params() as params:
            yield {**params, "key_prefix": f"{self._prefix}/{params['key_prefix']}"}
