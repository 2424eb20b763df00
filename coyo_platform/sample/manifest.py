"""The subset's manifest: every part file with its row count, size and the plan it was written
under, so a consumer can check they have all of it (``coyo_labeled_300m/_manifest.json``).

Row counts come from each file's parquet footer (no data read). A part is *current* when it was
written under the current plan's digest and, where the plan counted its rows, has that many rows.
Imports no ``dagster``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow.parquet as pq

from coyo_platform.common import layout
from coyo_platform.common.storage import Storage
from coyo_platform.sample.plan import Plan
from coyo_platform.sample.subset import PLAN_DIGEST_KEY


@dataclass
class ManifestPart:
    partition: str
    path: str
    rows: int
    bytes: int
    plan_digest: str


@dataclass
class Manifest:
    plan_digest: str
    threshold: float
    sampling: dict[str, Any]
    parts: list[ManifestPart] = field(default_factory=list)
    rows_planned: int | None = None
    missing: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "partitions": len(self.parts),
            "rows": sum(p.rows for p in self.parts),
            "bytes": sum(p.bytes for p in self.parts),
            "complete": self.complete,
        }


def _part(store: Storage, key: str, url: str) -> ManifestPart:
    with store.fs.open(url, "rb") as fh:
        meta = pq.ParquetFile(fh).metadata
    written_under = (meta.metadata or {}).get(PLAN_DIGEST_KEY.encode(), b"").decode()
    return ManifestPart(key, url, meta.num_rows, store.size(url), written_under)


def build_manifest(store: Storage, plan: Plan) -> Manifest:
    planned = None if plan.default else plan.rows
    manifest = Manifest(plan.digest, plan.threshold, asdict(plan.sampling), rows_planned=planned)
    for key, url in layout.subset_files(store).items():
        part = _part(store, key, url)
        manifest.parts.append(part)
        expected = plan.rows_per_partition.get(part.partition)
        if part.plan_digest != plan.digest:
            manifest.problems.append(
                f"{part.partition}: written under plan {part.plan_digest or '?'}, "
                "not the current one"
            )
        elif expected is not None and expected != part.rows:
            manifest.problems.append(
                f"{part.partition}: {part.rows:,} rows, the plan counted {expected:,}"
            )
    present = {p.partition for p in manifest.parts}
    manifest.missing = sorted(set(plan.partitions) - present)
    manifest.problems += [f"{key}: planned, no subset file" for key in manifest.missing]
    return manifest


def write_manifest(store: Storage, plan: Plan) -> tuple[Manifest, str]:
    manifest = build_manifest(store, plan)
    url = layout.manifest(store)
    store.write_json(url, manifest.to_json())
    return manifest, url
