"""What made each stage's output, and the rule for reusing it: only when it matches.

Every stage writes a *fingerprint* with its output, a flat JSON object of what decides the bytes:

* the source part (``coyo700m_metadata/<part>.parquet``'s key-value metadata): location, size,
  rows, and a digest of its ids and URLs (:func:`ids_and_urls_digest`);
* the downloads (``downloaded_shards/<part>/_fingerprint.json``): the source part's fingerprint and
  the download settings that change the bytes;
* the labeler (``labeled_shards/<labeler id>/_labeler.json``): model, a content digest of the
  weights, the resolved preprocessing, activation, precision, torch and timm versions; its digest
  is the labeler id, so the same weights under another path are the same labeler;
* the stats (the labeler, the thresholds), the plan (its digest, the labelers it was made from),
  the subset file (the plan digest and the labeler, in its parquet metadata).

:func:`check` compares a recorded fingerprint with the current one and raises :class:`Mismatch`
naming the first field that differs, its old and new value, and the command that starts over.
Imports no ``dagster``.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import polars as pl

#: The source part's fingerprint in its copy's parquet key-value metadata.
SOURCE_KEY = "coyo.source"


def digest(value: Any, length: int = 16) -> str:
    """sha256 of ``value``'s canonical JSON, in hex, cut to ``length``."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def file_digest(path: str) -> str:
    """sha256 of a local file's bytes (the whole hex digest)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def ids_and_urls_digest(frame: pl.DataFrame, chunk: int = 1_000_000) -> str:
    """sha256 over a part's ``id`` and ``url`` columns, row by row in file order (ids as
    little-endian int64, each URL's UTF-8 length, then the URLs' bytes), chunk by chunk."""
    h = hashlib.sha256()
    for part in frame.select("id", "url").iter_slices(chunk):
        h.update(part["id"].cast(pl.Int64).to_numpy().astype("<i8").tobytes())
        h.update(part["url"].str.len_bytes().cast(pl.Int64).to_numpy().astype("<i8").tobytes())
        h.update(part["url"].str.join("").item().encode())
    return h.hexdigest()


#: Recorded, never compared: where an input was read (the same content moved is the same input),
#: and the random id a fingerprint gets when its output is started (so that a part downloaded
#: again with the same settings is still another download, whose labels are other labels).
NOT_COMPARED = ("source_location", "made")


def compared(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The fields of a fingerprint that must match for its output to be reused."""
    return {k: v for k, v in fingerprint.items() if k not in NOT_COMPARED}


def identity(fingerprint: dict[str, Any]) -> str:
    """Which output this is: its fingerprint's digest, the ``made`` id included, the location
    not."""
    return digest({k: v for k, v in fingerprint.items() if k != "source_location"})


def slug(text: str) -> str:
    """``hf-hub:timm/x.y`` -> ``hf-hub_timm_x.y``: safe as a folder name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


class BadInput(ValueError):
    """Input or settings that no retry can fix: the programs report it as a final failure
    (``reporting.FINAL_ERRORS``), the assets as ``dg.Failure(allow_retries=False)``."""


class MissingInput(BadInput, FileNotFoundError):
    """An input that is not there (no shards yet, no such checkpoint)."""


class Mismatch(BadInput):
    """A stage's output was made from other inputs or settings than the ones asked for now."""

    def __init__(self, what: str, field: str, old: Any, new: Any, command: str) -> None:
        self.what, self.field, self.old, self.new, self.command = what, field, old, new, command
        super().__init__(
            f"{what}: made with {field}={_shown(old)}, but this run asks for {field}="
            f"{_shown(new)}; nothing was reused or overwritten. To start over: {command}"
        )


def _shown(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 120 else text[:117] + "..."


def differences(recorded: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list:
    """(field, old, new) for every field whose value differs, nested objects flattened with
    dots (``source.digest``), in sorted order."""
    found = []
    for name in sorted(set(recorded) | set(current)):
        old, new = recorded.get(name), current.get(name)
        if isinstance(old, dict) and isinstance(new, dict):
            found += differences(old, new, f"{prefix}{name}.")
        elif old != new:
            found.append((f"{prefix}{name}", old, new))
    return found


def check(recorded: dict[str, Any], current: dict[str, Any], what: str, command: str) -> None:
    """Raise :class:`Mismatch` for the first field that differs (all of them are listed in
    the log line of whoever catches it through :func:`differences`)."""
    found = differences(recorded, current)
    if found:
        field, old, new = found[0]
        raise Mismatch(what, field, old, new, command)


def start_over_command(root: str, key: str, stage: str) -> str:
    """The one command that deletes ``stage``'s output of partition ``key`` and everything
    built from it, so the next run makes them again."""
    return f"coyo-platform clear --data-root {root} --parts {key} --from {stage}"
