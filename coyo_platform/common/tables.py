"""A small table for materialization metadata, built by the stage code (which imports no
``dagster``): the assets hand it to ``dg.MetadataValue.table``, the programs to Pipes' ``table``
type, and the UI shows both as a table."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Table:
    columns: dict[str, str]
    """Column name -> type (``string``, ``int``, ``float``), in display order."""
    records: list[dict[str, Any]] = field(default_factory=list)


def counts(values: dict[str, int], key: str, count: str) -> Table:
    """``{"success": 12, ...}`` as a two-column table, largest first."""
    ordered = sorted(values.items(), key=lambda kv: (-kv[1], kv[0]))
    return Table({key: "string", count: "int"}, [{key: k, count: n} for k, n in ordered])
