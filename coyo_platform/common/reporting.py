"""How the two programs (``download``, ``label``) talk back: Dagster Pipes when Dagster started
them, plain stderr/stdout when a person runs them from a shell. Imports no ``dagster``."""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from dagster_pipes import (
    PipesEnvVarParamsLoader,
    PipesS3ContextLoader,
    PipesS3MessageWriter,
    open_dagster_pipes,
)

from coyo_platform.common.provenance import BadInput
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

    def report(self, metadata: dict[str, Any], data_version: str | None = None) -> None:
        """The materialization: its metadata and the data version downstream depends on."""
        if self._pipes is not None:
            self._pipes.report_asset_materialization(metadata=metadata, data_version=data_version)
        else:
            plain = {k: v["raw_value"] if isinstance(v, dict) else v for k, v in metadata.items()}
            print(json.dumps({**plain, "data_version": data_version}, indent=1, default=str))


#: A Pipes custom message of this form says the program stopped on bad input or mismatched state:
#: ``{FAILURE: "what, why, what to do"}``; the compute seam raises it as a failure not retried.
FAILURE = "coyo_failure"
#: ... and this one that it stopped on anything else (an outage, a dead machine's shards): a
#: failure that Dagster's retry policy retries, with the program's own message.
ERROR = "coyo_error"


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


#: What a program stops on without any retry helping: bad settings or input, a checkpoint that
#: is not weights or is not there, a fingerprint that does not match. Only these: a network
#: outage (the hub unreachable, a cut read) stays an error that Dagster retries.
FINAL_ERRORS = (BadInput,)


@contextmanager
def open_reporter() -> Iterator[Reporter]:
    """Pipes when this process was launched through Dagster Pipes, else the terminal. A final
    error (:data:`FINAL_ERRORS`) ends the program: through Pipes as a :data:`FAILURE` message
    (exit 0, no materialization: Dagster fails the step without retrying it), from a shell as one
    ``error:`` line and exit status 2. Through Pipes any other error is an :data:`ERROR` message
    (its traceback in the log): the step fails with the program's own message, and is retried."""
    if PipesEnvVarParamsLoader().is_dagster_pipes_process():
        with open_dagster_pipes(**_pipes_channels()) as pipes:
            try:
                yield Reporter(pipes)
            except FINAL_ERRORS as exc:
                pipes.report_custom_message({FAILURE: str(exc)})
            except Exception as exc:  # noqa: BLE001 - reported whole, then retried by Dagster
                pipes.log.error(traceback.format_exc())
                pipes.report_custom_message({ERROR: f"{type(exc).__name__}: {exc}"})
    else:
        try:
            yield Reporter(None)
        except FINAL_ERRORS as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
