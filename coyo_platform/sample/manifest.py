"""The subset's manifest: every part file with its row count, size, the plan it was written
under and its provenance (the source part's digest, the labeler and its weights' digest), so a
consumer can check they have all of it, made one way (``coyo_labeled_300m/.coyo/manifest.json``).

Row counts come from each file's parquet footer (no data read). A part is *current* when it was
written under the current plan's digest and, where the plan counted its rows, has that many rows.
Parts labeled by different labelers are a problem too: a subset never mixes them.
Imports no ``dagster``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from coyo_platform.common import layout
from coyo_platform.common.storage import Storage
from coyo_platform.ingest.metadata import source_fingerprint
from coyo_platform.sample.plan import Plan
from coyo_platform.sample.subset import LABELER_KEY, PLAN_DIGEST_KEY


@dataclass
class ManifestPart:
    partition: str
    path: str
    rows: int
    bytes: int
    plan_digest: str
    labeler: str
    weights_sha256: str | None
    source_sha256: str | None  # the digest of the source part's ids and URLs
    source: str | None  # where the source part was read


@dataclass
class Manifest:
    plan_digest: str
    threshold: float
    sampling: dict[str, Any]
    parts: list[ManifestPart] = field(default_factory=list)
    labelers: list[str] = field(default_factory=list)
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


def _part(store: Storage, key: str, url: str, weights: dict[str, str | None]) -> ManifestPart:
    rows, pairs = store.parquet_metadata(url)
    labeler = pairs.get(LABELER_KEY, "")
    if labeler and labeler not in weights:
        record = store.read_json_if_exists(layout.labeler_record(layout.label_sets(store), labeler))
        weights[labeler] = (record or {}).get("weights_sha256")
    metadata = layout.metadata(store, key)
    source = source_fingerprint(store, metadata) if store.exists(metadata) else None
    return ManifestPart(
        partition=key,
        path=url,
        rows=rows,
        bytes=store.size(url),
        plan_digest=pairs.get(PLAN_DIGEST_KEY, ""),
        labeler=labeler,
        weights_sha256=weights.get(labeler),
        source_sha256=(source or {}).get("ids_and_urls_sha256"),
        source=(source or {}).get("location"),
    )


def build_manifest(store: Storage, plan: Plan) -> Manifest:
    planned = None if plan.default else plan.rows
    manifest = Manifest(plan.digest, plan.threshold, asdict(plan.sampling), rows_planned=planned)
    weights: dict[str, str | None] = {}
    for key, url in layout.subset_files(store).items():
        part = _part(store, key, url, weights)
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
    manifest.labelers = sorted({p.labeler for p in manifest.parts})
    if len(manifest.labelers) > 1:
        manifest.problems.append(
            f"the parts were labeled by {len(manifest.labelers)} labelers "
            f"({', '.join(manifest.labelers)}): relabel them with one"
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
