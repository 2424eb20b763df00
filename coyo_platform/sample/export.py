"""Publishing the subset: its parquet parts, its dataset card and the card's hidden folder
(manifest, chart, summaries) copied to any fsspec URL (a folder, ``s3://``, ``hf://`` where
credentials exist), each file verified after the copy (a part's size, row count and footer
metadata, another file's bytes), parts first and the card and manifest last, so that a
destination with a manifest holds the whole subset. Parquet files at the destination that the
subset does not hold (an earlier export's parts) are deleted: a dataset loader would read them
too. A rerun copies only what differs. Imports no ``dagster``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from coyo_platform.common import layout
from coyo_platform.common.storage import Storage
from coyo_platform.sample.subset import PLAN_DIGEST_KEY


class ExportRefused(ValueError):
    """The subset cannot be exported as it is."""


@dataclass
class Exported:
    destination: str
    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already there, verified
    deleted: list[str] = field(default_factory=list)
    rows: int = 0
    bytes: int = 0


def _verify(store: Storage, dest: Storage, src: str, dst: str, size: int, part: bool) -> str | None:
    """What differs between ``dst`` at the destination and ``src`` (None: it is a copy): a part's
    size, row count and footer metadata (its plan digest), another file's bytes."""
    if not dest.exists(dst):
        return "missing"
    got = dest.size(dst)
    if got != size:
        return f"{got:,} bytes, not {size:,}"
    if part:
        found, want = dest.parquet_metadata(dst), store.parquet_metadata(src)
        if found != want:
            return f"{found[0]:,} rows ({found[1].get(PLAN_DIGEST_KEY)}), not {want[0]:,}"
    elif dest.fs.cat_file(dst) != store.fs.cat_file(src):
        return "other bytes"
    return None


def _copy(store: Storage, dest: Storage, src: str, dst: str) -> None:
    """One file, through a local temp file, written whole at the destination."""
    with tempfile.TemporaryDirectory(prefix="coyo-export-") as tmp:
        local = os.path.join(tmp, os.path.basename(src))
        store.fs.get_file(src, local)
        dest.write_file(dst, lambda path: os.replace(local, path))


def export_subset(
    store: Storage,
    to: str,
    endpoint_url: str | None = None,
    allow_incomplete: bool = False,
    log: Callable[[str], Any] = print,
) -> Exported:
    """Copy the subset under ``store`` to ``to`` and verify it there."""
    manifest = store.read_json_if_exists(layout.manifest(store))
    if manifest is None:
        raise ExportRefused(
            f"no manifest at {layout.manifest(store)}: materialize subset_manifest first (it "
            "writes the manifest and the dataset card)"
        )
    if not manifest["complete"] and not allow_incomplete:
        problems = "; ".join(manifest["problems"][:5])
        raise ExportRefused(
            f"the subset is incomplete ({problems}): materialize what is missing and "
            "subset_manifest again, or export it as it is with --allow-incomplete"
        )
    dest = Storage(to, endpoint_url=endpoint_url)
    if dest.root == store.url(layout.SUBSET):
        raise ExportRefused(f"{to} is the subset's own folder")
    report = Exported(destination=dest.root)
    base = store.url(layout.SUBSET)
    files: list[tuple[str, int, int | None]] = [  # by partition: the root may have moved
        (layout.subset(store, p["partition"]), int(p["bytes"]), int(p["rows"]))
        for p in manifest["parts"]
    ]
    meta = store.find(store.url(layout.SUBSET, layout.SUBSET_META))
    manifest_url = layout.manifest(store)
    rest = [f for f in meta if f != manifest_url] + [layout.card(store), manifest_url]
    files += [(f, store.size(f), None) for f in rest if store.exists(f)]  # the manifest last
    keep = {os.path.basename(path) for path, _, _ in files[: len(manifest["parts"])]}
    # an earlier export's manifest goes first: until this one's is written last, the
    # destination does not claim to hold a whole subset
    there = dest.url(manifest_url.removeprefix(base).lstrip("/"))
    if dest.exists(there) and dest.fs.cat_file(there) != store.fs.cat_file(manifest_url):
        dest.remove(there)
    for old in dest.glob(dest.url("*.parquet")):
        if os.path.basename(old) not in keep:
            dest.remove(old)
            report.deleted.append(old)
            log(f"deleted {old}: not a part of this subset")
    for src, size, rows in files:
        rel = src.removeprefix(base).lstrip("/")
        dst = dest.url(rel)
        if _verify(store, dest, src, dst, size, rows is not None) is None:
            report.skipped.append(dst)
        else:
            _copy(store, dest, src, dst)
            problem = _verify(store, dest, src, dst, size, rows is not None)
            if problem is not None:
                raise OSError(f"{dst} after the copy: {problem}; run the export again")
            report.copied.append(dst)
            log(f"copied {rel} ({size:,} bytes{f', {rows:,} rows' if rows is not None else ''})")
        report.bytes += size
        report.rows += rows or 0
    return report
