"""How the two programs (``download``, ``label``) talk back: Dagster Pipes when Dagster started
them, plain stderr/stdout when a person runs them from a shell. Imports no ``dagster``."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from dagster_pipes import (
    PipesEnvVarParamsLoader,
    PipesS3ContextLoader,
    PipesS3MessageWriter,
    open_dagster_pipes,
)

from coyo_platform.common.tables import Table


def path(url: str) -> dict[str, Any]:
    return {"raw_value": url, "type": "path"}


def json_value(value: Any) -> dict[str, Any]:
    return {"raw_value": value, "type": "json"}


def table(value: Table) -> dict[str, Any]:
    """A :class:`Table` in Pipes' ``table`` form (the UI shows it as ``MetadataValue.table``)."""
    schema = [{"name": name, "type": kind} for name, kind in value.columns.items()]
    rows = [{name: r.get(name) for name in value.columns} for r in value.records]
    return {"raw_value": {"records": rows, "schema": schema}, "type": "table"}


class Reporter:
    """Progress lines and the final materialization metadata of one program run."""

    def __init__(self, pipes: Any | None) -> None:
        self._pipes = pipes
        if pipes is not None:
            self.log: logging.Logger = pipes.log
        else:
            self.log = logging.getLogger("coyo_platform")
            if not self.log.handlers:
                handler = logging.StreamHandler(sys.stderr)
                handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
                self.log.addHandler(handler)
                self.log.setLevel(logging.INFO)

    def report(self, metadata: dict[str, Any]) -> None:
        if self._pipes is not None:
            self._pipes.report_asset_materialization(metadata=metadata)
        else:
            plain = {k: v["raw_value"] if isinstance(v, dict) else v for k, v in metadata.items()}
            print(json.dumps(plain, indent=1, default=str))


def _pipes_channels() -> dict[str, Any]:
    """S3 context loader and message writer when Dagster passed S3 locations (as the ECS compute
    does: ECS caps a task's overrides at 8 KB), else Pipes' defaults (files, for subprocesses)."""
    params = PipesEnvVarParamsLoader()
    context, messages = params.load_context_params(), params.load_messages_params()
    if "bucket" not in context and "bucket" not in messages:
        return {}
    import boto3  # the standard AWS chain; AWS_ENDPOINT_URL for S3-compatible stores

    s3 = boto3.client("s3")
    channels: dict[str, Any] = {}
    if "bucket" in context:
        channels["context_loader"] = PipesS3ContextLoader(s3)
    if "bucket" in messages:
        channels["message_writer"] = PipesS3MessageWriter(s3, interval=5)
    return channels


@contextmanager
def open_reporter() -> Iterator[Reporter]:
    """Pipes when this process was launched through Dagster Pipes, else the terminal."""
    if PipesEnvVarParamsLoader().is_dagster_pipes_process():
        with open_dagster_pipes(**_pipes_channels()) as pipes:
            yield Reporter(pipes)
    else:
        yield Reporter(None)
