"""The subset's manifest: every part file with its row count, size and the plan it was written
under, so a consumer can check they have all of it (``subset/_manifest.json``).

Row counts come from each file's parquet footer (no data read). A part is *current* when it was
written under the current plan's digest and, where the plan counted its rows, has that many rows.
"""

from __future__ import annotations

import pyarrow.parquet as pq

from coyo_platform.core.storage import SUBSET, Storage

MANIFEST_FILE = "_manifest.json"
PLAN_DIGEST_KEY = "coyo.plan_digest"


def build_manifest(store: Storage, plan: dict) -> dict:
    files = [f for f in store.glob(store.url(SUBSET, "*.parquet"))]
    parts, problems = [], []
    for url in files:
        key = url.rsplit("/", 1)[-1].removesuffix(".parquet")
        with store.fs.open(url, "rb") as fh:
            meta = pq.ParquetFile(fh).metadata
        written_under = (meta.metadata or {}).get(PLAN_DIGEST_KEY.encode(), b"").decode()
        expected = plan.get("rows_per_partition", {}).get(key)
        part = {
            "partition": key,
            "path": url,
            "rows": meta.num_rows,
            "bytes": store.size(url),
            "plan_digest": written_under,
        }
        parts.append(part)
        if written_under != plan["digest"]:
            problems.append(
                f"{key}: written under plan {written_under or '?'}, not the current one"
            )
        elif expected is not None and expected != meta.num_rows:
            problems.append(f"{key}: {meta.num_rows:,} rows, the plan counted {expected:,}")
    present = {p["partition"] for p in parts}
    missing = sorted(set(plan.get("partitions", [])) - present)
    problems += [f"{key}: planned, no subset file" for key in missing]
    return {
        "plan_digest": plan["digest"],
        "threshold": plan["threshold"],
        "sampling": plan["sampling"],
        "parts": parts,
        "partitions": len(parts),
        "rows": sum(p["rows"] for p in parts),
        "bytes": sum(p["bytes"] for p in parts),
        "rows_planned": plan.get("rows"),
        "missing": missing,
        "problems": problems,
        "complete": not problems,
    }
