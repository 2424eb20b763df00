"""Publishing the subset: its parquet parts, its dataset card and the card's hidden folder
(manifest, chart, summaries) copied to any fsspec URL (a folder, ``s3://``, ``hf://`` where
credentials exist), each file verified after the copy (a part's size, row count and footer
metadata, another file's bytes), parts first and the card and manifest last, so that a
destination with a manifest holds the whole subset. Parquet files at the destination that the
subset does not hold (an earlier export's parts) are deleted: a dataset loader would read them
too. A rerun copies only what differs.

The webdataset shards go to a URL of their own (a parquet loader given the subset's folder would
read every file under it): the shards, then timm's ``_info.json``, the manifest last (the
destination's earlier two removed first). A shard is copied unless the destination's earlier
manifest gave it the same sha256 and it has its size there; each copy is verified by its size;
an earlier export's shards that the manifest does not list are deleted.
Imports no ``dagster``.
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
from coyo_platform.sample.wds import stored_sizes


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


#: How a copy is verified: a part by size, row count and footer, a shard by size, a file by bytes.
PART, SHARD, FILE = "part", "shard", "file"


def _verify(
    store: Storage, dest: Storage, src: str, dst: str, size: int, kind: str, same: bool = True
) -> str | None:
    """What differs between ``dst`` at the destination and ``src`` (None: it is a copy): a part's
    size, row count and footer metadata (its plan digest), another file's bytes; a shard's size,
    and ``same``: whether the destination's earlier manifest gave it the shard's sha256 (a
    rewritten shard may have the old one's size: tars grow in 10 KB records)."""
    if not dest.exists(dst):
        return "missing"
    got = dest.size(dst)
    if got != size:
        return f"{got:,} bytes, not {size:,}"
    if kind == SHARD and not same:
        return "another shard of the same size"
    if kind == PART:
        found, want = dest.parquet_metadata(dst), store.parquet_metadata(src)
        if found != want:
            return f"{found[0]:,} rows ({found[1].get(PLAN_DIGEST_KEY)}), not {want[0]:,}"
    elif kind == FILE and dest.fs.cat_file(dst) != store.fs.cat_file(src):
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
    manifest = _manifest(
        store,
        layout.manifest(store),
        allow_incomplete,
        missing="materialize subset_manifest first (it writes the manifest and the dataset card)",
        incomplete="the subset is incomplete ({problems}): materialize what is missing and "
        "subset_manifest again, or export it as it is with --allow-incomplete",
    )
    dest = Storage(to, endpoint_url=endpoint_url)
    if dest.root == store.url(layout.SUBSET):
        raise ExportRefused(f"{to} is the subset's own folder")
    files, sizes = [], {}
    for p in manifest["parts"]:  # by partition: the root may have moved
        url = layout.subset(store, p["partition"])
        files.append((url, PART, int(p["rows"])))
        sizes[url] = int(p["bytes"])
    meta = store.find(store.url(layout.SUBSET, layout.SUBSET_META))
    manifest_url = layout.manifest(store)
    rest = [f for f in meta if f != manifest_url] + [layout.card(store), manifest_url]
    for url in (f for f in rest if store.exists(f)):  # the manifest last
        files.append((url, FILE, None))
        sizes[url] = store.size(url)
    return _publish(store, dest, layout.SUBSET, files, sizes, "*.parquet", [manifest_url], log)


def export_wds(
    store: Storage,
    to: str,
    endpoint_url: str | None = None,
    allow_incomplete: bool = False,
    log: Callable[[str], Any] = print,
) -> Exported:
    """Copy the webdataset shards under ``store`` (``sample/wds.py``) to ``to``, verified there.
    ``rows`` in the report counts samples."""
    manifest = _manifest(
        store,
        layout.wds_manifest(store),
        allow_incomplete,
        missing="materialize coyo_labeled_300m_wds for the partitions, then wds_manifest",
        incomplete="the webdataset shards are incomplete ({problems}): materialize "
        "coyo_labeled_300m_wds where they lack and wds_manifest again, or export them as they "
        "are with --allow-incomplete",
    )
    dest = Storage(to, endpoint_url=endpoint_url)
    if dest.root == store.url(layout.WDS):
        raise ExportRefused(f"{to} is the shards' own folder")
    files, sizes = [], {}
    for part in manifest["partitions"]:
        folder = layout.wds(store, part["partition"])
        stored = stored_sizes(store, folder)
        for shard in part["shards"]:
            url = f"{folder}/{shard['name']}"
            if stored.get(shard["name"]) != shard["bytes"]:
                raise ExportRefused(
                    f"{url} is not as the shards' manifest lists it (missing, or rewritten "
                    "since): materialize coyo_labeled_300m_wds for it and wds_manifest again"
                )
            files.append((url, SHARD, shard["samples"]))
            sizes[url] = shard["bytes"]
    info, manifest_url = layout.wds_info(store), layout.wds_manifest(store)
    for url in (info, manifest_url):  # the manifest last
        files.append((url, FILE, None))
        sizes[url] = store.size(url)
    # which shards the destination holds already: its earlier manifest's sha256 of each
    there = dest.url(manifest_url.removeprefix(store.url(layout.WDS)).lstrip("/"))
    held = _shard_digests(dest.read_json_if_exists(there) or {})
    same = {n for n, sha in _shard_digests(manifest).items() if sha and held.get(n) == sha}
    claims = [info, manifest_url]  # timm reads _info.json: it goes first, with the manifest
    return _publish(store, dest, layout.WDS, files, sizes, "*/*.tar", claims, log, same)


def _manifest(
    store: Storage, url: str, allow_incomplete: bool, missing: str, incomplete: str
) -> dict[str, Any]:
    """The manifest at ``url``, or a refusal: none there (``missing`` says what to run), or
    incomplete without ``allow_incomplete`` (``incomplete``, with its first ``{problems}``)."""
    manifest = store.read_json_if_exists(url)
    if manifest is None:
        raise ExportRefused(f"no manifest at {url}: {missing}")
    if not manifest["complete"] and not allow_incomplete:
        raise ExportRefused(incomplete.format(problems="; ".join(manifest["problems"][:5])))
    return manifest


def _shard_digests(manifest: dict[str, Any]) -> dict[str, str | None]:
    """``{"part/NNNNN.tar": sha256}`` of a webdataset manifest's shards."""
    return {
        f"{p['partition']}/{s['name']}": s.get("sha256")
        for p in manifest.get("partitions", [])
        for s in p["shards"]
    }


def _publish(
    store: Storage,
    dest: Storage,
    folder: str,
    files: list[tuple[str, str, int | None]],
    sizes: dict[str, int],
    data_glob: str,
    claims: list[str],
    log: Callable[[str], Any],
    same: set[str] | None = None,
) -> Exported:
    """Copy ``files`` (``(url, kind, rows)``, under ``folder``, the data first and the manifest
    last) to ``dest``: what is there and verified stays, the rest is copied and verified; files
    at the destination matching ``data_glob`` that ``files`` does not hold are deleted first,
    and so are earlier ``claims`` that differ (the manifest, timm's index: until they are
    written, last, the destination does not claim a whole copy). ``same``: the shards (by
    ``part/NNNNN.tar``) the destination holds as they are here."""
    report = Exported(destination=dest.root)
    base = store.url(folder)
    depth = data_glob.count("/") + 1  # compared: "part-00000.parquet", "part-00000/00000.tar"

    def there(url: str) -> str:
        return dest.url(url.removeprefix(base).lstrip("/"))

    def name(url: str) -> str:
        return "/".join(url.rstrip("/").split("/")[-depth:])

    for claim in claims:
        old = there(claim)
        if dest.exists(old) and dest.fs.cat_file(old) != store.fs.cat_file(claim):
            dest.remove(old)

    keep = {name(url) for url, kind, _ in files if kind != FILE}
    for old in dest.glob(dest.url(data_glob)):
        if name(old) not in keep:
            dest.remove(old)
            report.deleted.append(old)
            log(f"deleted {old}: not in this copy")
    for src, kind, rows in files:
        dst, size = there(src), sizes[src]
        held = same is None or name(src) in same
        if _verify(store, dest, src, dst, size, kind, held) is None:
            report.skipped.append(dst)
        else:
            _copy(store, dest, src, dst)
            problem = _verify(store, dest, src, dst, size, kind)
            if problem is not None:
                raise OSError(f"{dst} after the copy: {problem}; run the export again")
            report.copied.append(dst)
            rel = src.removeprefix(base).lstrip("/")
            log(f"copied {rel} ({size:,} bytes{f', {rows:,} rows' if rows is not None else ''})")
        report.bytes += size
        report.rows += rows or 0
    return report
