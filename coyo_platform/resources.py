"""The platform's two seams, as Dagster resources: storage (where data lives) and compute (where
the downloader and the labeler run). ``definitions.py`` picks one set per deployment."""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Mapping, Sequence
from contextlib import contextmanager

import dagster as dg
from dagster_aws.pipes import PipesECSClient, PipesS3ContextInjector, PipesS3MessageReader

from coyo_platform.core.sources import HUB_SOURCE
from coyo_platform.core.storage import Storage

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


class ComputeResource(dg.ConfigurableResource):
    """Runs one of the platform's Dagster-free programs for an asset, through Dagster Pipes, and
    returns the materialization the program reported."""

    def run_program(
        self,
        context: dg.AssetExecutionContext,
        module: str,
        args: Sequence[str],
        env: Mapping[str, str] | None = None,
    ) -> dg.MaterializeResult:
        """Run ``python -m module *args`` with ``env`` added to its environment."""
        raise NotImplementedError


class LocalCompute(ComputeResource):
    """Runs the program as a subprocess of this machine (``PipesSubprocessClient``)."""

    def run_program(
        self,
        context: dg.AssetExecutionContext,
        module: str,
        args: Sequence[str],
        env: Mapping[str, str] | None = None,
    ) -> dg.MaterializeResult:
        client = dg.PipesSubprocessClient()
        command = [sys.executable, "-m", module, *args]
        context.log.info(f"running {' '.join(command)}")
        run = client.run(context=context, command=command, env=dict(env or {}))
        return run.get_materialize_result()


def program_args(config: dg.Config) -> list[str]:
    """``--some-setting value`` for each setting of ``config`` that is set; booleans as
    ``--flag`` / ``--no-flag`` (argparse's ``BooleanOptionalAction``); lists comma-joined."""
    args: list[str] = []
    for name, value in config.model_dump().items():
        flag = name.replace("_", "-")
        if isinstance(value, bool):
            args.append(f"--{flag}" if value else f"--no-{flag}")
        elif isinstance(value, list):
            args += [f"--{flag}", ",".join(str(v) for v in value)]
        elif value is not None:
            args += [f"--{flag}", str(value)]
    return args


#: The programs the compute seam runs, and the ECS container that runs each.
PROGRAMS = {"coyo_platform.downloader": "downloader", "coyo_platform.worker": "labeler"}
ECS_OVERRIDES_LIMIT = 8192  # characters of a run_task's overrides, ECS's own cap


class EcsCompute(ComputeResource):
    """Runs each program as one ECS task per partition through ``PipesECSClient``: the downloader
    on the CPU capacity provider, the labeler on the GPU one (one GPU per task). The Pipes context
    and the messages travel through S3 (``pipes_bucket``), so nothing depends on CloudWatch or on
    ECS's 8 KB override limit; the container's logs go to CloudWatch through ``awslogs``. When the
    Dagster run is terminated, the task is stopped (``forward_termination``).

    The task definitions (``infra/coyo-platform.yaml``) set each image's entrypoint
    (``python -m coyo_platform.downloader|worker``); a run overrides only the arguments and the
    environment. Credentials: the standard AWS chain (the Dagster task's IAM role)."""

    cluster: str
    subnets: str
    """Comma-separated subnet ids for the tasks (awsvpc network mode)."""
    security_groups: str = ""
    pipes_bucket: str
    pipes_prefix: str = "dagster-pipes"
    downloader_task_definition: str
    labeler_task_definition: str
    cpu_capacity_provider: str
    gpu_capacity_provider: str
    region: str | None = None

    def run_task_params(
        self, module: str, args: Sequence[str], env: Mapping[str, str] | None = None
    ) -> dict:
        """The ``run_task`` request for one program run, before Pipes adds its variables."""
        if module not in PROGRAMS:
            raise ValueError(f"no ECS task for {module}; known: {', '.join(PROGRAMS)}")
        container = PROGRAMS[module]
        labeler = container == "labeler"
        override: dict = {
            "name": container,
            "command": list(args),
            "environment": [{"name": k, "value": v} for k, v in sorted((env or {}).items())],
        }
        if labeler:
            override["resourceRequirements"] = [{"type": "GPU", "value": "1"}]
        network = {"subnets": [s.strip() for s in self.subnets.split(",") if s.strip()]}
        groups = [g.strip() for g in self.security_groups.split(",") if g.strip()]
        if groups:
            network["securityGroups"] = groups
        network["assignPublicIp"] = "DISABLED"
        provider = self.gpu_capacity_provider if labeler else self.cpu_capacity_provider
        return {
            "cluster": self.cluster,
            "taskDefinition": (
                self.labeler_task_definition if labeler else self.downloader_task_definition
            ),
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
        return PipesECSClient(
            client=boto3.client("ecs", region_name=self.region),
            context_injector=PipesS3ContextInjector(
                bucket=self.pipes_bucket, client=s3, key_prefix=f"{prefix}/"
            ),
            message_reader=PrefixedS3MessageReader(
                prefix=prefix, bucket=self.pipes_bucket, client=s3, interval=5
            ),
            forward_termination=True,
        )

    def run_program(
        self,
        context: dg.AssetExecutionContext,
        module: str,
        args: Sequence[str],
        env: Mapping[str, str] | None = None,
    ) -> dg.MaterializeResult:
        params = self.run_task_params(module, args, env)
        size = len(json.dumps(params["overrides"]))
        if size > ECS_OVERRIDES_LIMIT // 2:  # Pipes adds two small variables on top
            raise ValueError(f"ECS overrides for {module} are {size} characters; keep them short")
        context.log.info(
            f"running {module} as an ECS task ({params['taskDefinition']} on "
            f"{params['capacityProviderStrategy'][0]['capacityProvider']}): {' '.join(args)}"
        )
        run = self.pipes_client().run(context=context, run_task_params=params)
        return run.get_materialize_result()


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
