"""The platform's two seams, as Dagster resources: storage (where data lives) and compute (where
the downloader and the labeler run). ``definitions.py`` picks one set per deployment."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping, Sequence

import dagster as dg

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
    ``--flag`` / ``--no-flag`` (argparse's ``BooleanOptionalAction``)."""
    args: list[str] = []
    for name, value in config.model_dump().items():
        flag = name.replace("_", "-")
        if isinstance(value, bool):
            args.append(f"--{flag}" if value else f"--no-{flag}")
        elif value is not None:
            args += [f"--{flag}", str(value)]
    return args
