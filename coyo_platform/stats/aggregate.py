"""Label statistics as small, exactly mergeable partial aggregates, computed in bounded memory.

A partition's labels are read a chunk of shard files at a time (``aggregate_files``) by DuckDB,
whose parquet reader and SQL engine do the counting (``benchmarks/stats.py`` measures it against
DuckDB's own best query over all rows); each chunk is reduced to counts, and aggregates are summed
(``merge_aggregates``). The roll-up over all partitions is the sum of the partition aggregates: no
step ever holds more than one chunk's compact rows, and no step reads all rows at once.

Definitions, matching the card's threshold table (kakaobrain/coyo-dataset,
subset/COYO-Labeled-300M/README.md), for a threshold ``t``, with "above" meaning ``p >= t``:

- share of images kept: images whose top-1 probability is above ``t``, over all labeled images;
- labels per image: labels above ``t``, averaged over the kept images;
- unique labels: distinct classes that are above ``t`` in at least one image.

Probabilities are float32 (the card's ``label_probs``); ``p >= t`` is decided exactly as
``float64(p) >= t``, the comparison the subset uses, so the stats and the subset agree to the row.

Per partition the aggregate also carries a fine top-1 histogram (``FINE_BINS`` bins of width
2**-14, exact for float32 values) from which ``sample/plan.py`` finds a target size's threshold,
and the partition's *index* (``common.formats.INDEX_SCHEMA``: one row per labeled image, sorted by
pHash) for the exact threshold, deduplication and class caps. Imports no ``dagster``.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

import numpy as np
import polars as pl

from coyo_platform.common.formats import TOP_K
from coyo_platform.common.settings import setting
from coyo_platform.common.storage import Storage

#: The thresholds of the card's table.
CARD_THRESHOLDS: tuple[float, ...] = (0.05, 0.10, 0.15, 0.20, 0.25)
HISTOGRAM_BINS = 20
#: Fine top-1 histogram: bin ``b`` holds ``b / FINE_BINS <= p < (b + 1) / FINE_BINS`` (the last
#: bin also holds 1.0). Bin edges are powers of two apart, so float32 values fall in bins exactly.
FINE_BINS = 1 << 14
#: Label files read per chunk: 100 img2dataset shards of 10,000 images, ~1M rows, kept compact
#: while counted (id, pHash, top-1, its class, a count per threshold, the labels above the lowest).
CHUNK_FILES = 100
#: Rows per row group of a partition's index (DuckDB's default; it writes at least 2,048): the
#: index is sorted by pHash, so that dedup's pHash ranges read only the row groups they overlap
#: (a COYO part: ~48 row groups).
INDEX_ROW_GROUP = 122_880
#: DuckDB's memory for one partition's stats (beyond it, it spills to a temp folder).
DUCKDB_MEMORY = "1GB"
VERSION = 3  # 3: the labelers the stats were computed from


def check_thresholds(thresholds: Sequence[float]) -> tuple[float, ...]:
    """Thresholds sorted ascending; each in [0, 1], at least one, no repeats."""
    values = tuple(float(t) for t in thresholds)
    if not values:
        raise ValueError("give at least one threshold")
    bad = [t for t in values if not 0.0 <= t <= 1.0]
    if bad:
        raise ValueError(f"thresholds must be in [0, 1], got {bad[0]}")
    if len(set(values)) != len(values):
        raise ValueError(f"thresholds repeat: {list(values)}")
    return tuple(sorted(values))


@dataclass(frozen=True)
class StatsSettings:
    """Which thresholds label stats count for (the rows of the card's table)."""

    thresholds: tuple[float, ...] = setting(
        CARD_THRESHOLDS,
        "rows of the threshold table (default: the card's); every partition must use the same "
        "list for the roll-up",
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "thresholds", check_thresholds(self.thresholds))


Values = TypeVar("Values", pl.Expr, pl.Series, np.ndarray)


def bin_of(values: Values, bins: int) -> Values:
    """The histogram bin (of ``bins`` equal bins over [0, 1]; 1.0 in the last) of top-1 values,
    compared in float64 as everywhere else."""
    if isinstance(values, np.ndarray):
        scaled = np.floor(values.astype(np.float64) * bins)
        return np.clip(scaled, 0, bins - 1).astype(np.int64)
    return (values.cast(pl.Float64) * bins).floor().clip(0, bins - 1).cast(pl.Int64)


def f32_cut(t: float) -> np.float32:
    """The smallest float32 ``c`` with ``c >= t``: for float32 ``p``, ``p >= c`` iff
    ``float64(p) >= t``, so comparisons run on float32 lists without casting them."""
    c = np.float32(t)
    if float(c) < t:
        c = np.nextafter(c, np.float32(np.inf))
    return c


@dataclass
class ThresholdCounts:
    threshold: float
    kept: int  # images whose top-1 is above the threshold
    labels_above: int  # (label, image) pairs above it, over the kept images
    class_counts: dict[str, int]  # class -> images where it is above the threshold
    labels_per_image: dict[str, int]  # labels above it -> kept images with that many


@dataclass
class Aggregate:
    """Counts only, so that aggregates add up exactly. Dict keys are strings (class ids, bins),
    as in the JSON each partition's stats are stored as."""

    images: int
    failed: int
    thresholds: list[ThresholdCounts]
    top1_counts: dict[str, int]
    top1_histogram: list[int]  # HISTOGRAM_BINS bins
    top1_fine: dict[str, int]  # FINE_BINS bins, the empty ones left out
    labelers: list[str] = field(default_factory=list)  # the label sets counted (labeler ids)
    version: int = VERSION

    def to_json(self) -> dict[str, Any]:
        """The fields as JSON values (the count dicts shared, not copied: ``asdict``'s deep copy
        took 0.21 s for a 3M-row part's counts on the 2-core Xeon, RESULTS.md)."""
        value = {f.name: getattr(self, f.name) for f in fields(self)}
        return {**value, "thresholds": [dict(vars(t)) for t in self.thresholds]}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Aggregate:
        if value.get("version") != VERSION:
            raise ValueError(
                "label stats written by an older version of the platform; "
                f"rematerialize label_stats (version {VERSION})"
            )
        thresholds = [ThresholdCounts(**t) for t in value["thresholds"]]
        return cls(**{**value, "thresholds": thresholds})

    @property
    def threshold_values(self) -> list[float]:
        return [t.threshold for t in self.thresholds]


def _sql_cut(t: float) -> str:
    """``f32_cut(t)`` as a DuckDB FLOAT literal (exact: a float32's repr round-trips)."""
    return f"{float(f32_cut(t))!r}::FLOAT"


def _sql_above(column: str, t: float) -> str:
    """How many of a row's probabilities (``column``, sorted descending) are above ``t``, as a
    galloping search of CASE expressions over list positions: positions 1, 2, 4, 8 and 16 until
    one is below ``t``, then a binary search between the last two (past 16: 16-50). A row reads
    1 element for a count of 0, 2 for 1, 4 for 2-3 and at most 11, where a plain binary search
    reads 6 and a ``list_filter`` pass all 50 (in the stats benchmark's data a row has 2.66
    labels above 0.05 on average). A position past a list's end reads NULL, which counts as
    below; a list longer than ``TOP_K`` is counted whole. The label program never writes a NULL
    or NaN inside a list (a failed image has no lists at all)."""
    whole = f"len(list_filter({column}, lambda x: x >= {_sql_cut(t)}))"
    return f"CASE WHEN len({column}) <= {TOP_K} THEN {_sql_gallop(column, t, 1)} ELSE {whole} END"


def _sql_gallop(column: str, t: float, k: int) -> str:
    """The count, given that it is at least ``k // 2``."""
    if 2 * k > TOP_K:  # past position 16: a binary search of 16-50
        return _sql_search(column, t, k // 2, TOP_K)
    above, below = _sql_gallop(column, t, 2 * k), _sql_search(column, t, k // 2, k - 1)
    return f"CASE WHEN {column}[{k}] >= {_sql_cut(t)} THEN {above} ELSE {below} END"


def _sql_search(column: str, t: float, lo: int, hi: int) -> str:
    """The count, given that it lies in [lo, hi]: a binary search."""
    if lo == hi:
        return str(lo)
    mid = (lo + hi + 1) // 2
    above, below = _sql_search(column, t, mid, hi), _sql_search(column, t, lo, mid - 1)
    return f"CASE WHEN {column}[{mid}] >= {_sql_cut(t)} THEN {above} ELSE {below} END"


def _sql_bin(column: str, bins: int) -> str:
    """``bin_of`` in SQL: the same float64 product, floored and clipped."""
    return f"least(greatest(floor({column}::DOUBLE * {bins}), 0), {bins - 1})::INTEGER"


def _sql_files(files: Sequence[str]) -> str:
    quoted = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
    return f"read_parquet([{quoted}], hive_partitioning = false)"


class _Reducer:
    """Label rows reduced to counts in one DuckDB connection, a chunk of rows at a time.

    Each chunk is read once into a compact table (per labeled row: its top-1, top-1 class,
    pHash and id, how many labels clear each threshold, and the labels above the lowest one, a
    prefix since labels are sorted by probability); its count tables are appended to small
    accumulator tables
    and its index rows to the partition's index table, then the chunk is dropped. ``aggregate``
    sums the accumulators, ``index`` sorts the index. DuckDB runs on every core and spills
    beyond ``DUCKDB_MEMORY`` to a temp folder of its own.
    """

    def __init__(self, thresholds: tuple[float, ...], filesystem: Any = None) -> None:
        import duckdb  # the orchestrator's: only label stats use it

        self.ts = thresholds
        self._tmp = tempfile.TemporaryDirectory(prefix="coyo-stats-")
        self.con = duckdb.connect(
            config={
                "memory_limit": DUCKDB_MEMORY,
                "temp_directory": self._tmp.name,
                # counts do not depend on row order, and the index is sorted: every thread may
                # append to a chunk's table as it goes
                "preserve_insertion_order": False,
            }
        )
        if filesystem is not None:  # s3:// through the storage's own fsspec filesystem
            self.con.register_filesystem(filesystem)
        per_threshold = ", ".join(f"n{i} INTEGER" for i in range(len(thresholds)))
        for table in (
            "levels (cls INTEGER, lvl INTEGER, n BIGINT)",
            f"per_image ({per_threshold}, n BIGINT)",
            "top1c (cls INTEGER, n BIGINT)",
            "bins (fine INTEGER, coarse INTEGER, n BIGINT)",
            "ix (id BIGINT, phash UBIGINT, top1 FLOAT, top1_class INTEGER)",
        ):
            self._run(f"CREATE TEMP TABLE {table}")
        self.images = self.failed = 0

    def _run(self, sql: str) -> list[tuple]:
        return self.con.execute(sql).fetchall()

    def __enter__(self) -> _Reducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.con.close()
        self._tmp.cleanup()

    def add(self, source: str, with_index: bool = True) -> None:
        """Reduce the rows of ``source`` (a DuckDB table expression with ``labels``,
        ``label_probs``, ``error`` and, ``with_index``, ``id`` and ``imagehash``)."""
        ts = self.ts
        ids = "id::BIGINT AS id, TRY_CAST('0x' || imagehash AS UBIGINT) AS phash, "
        n = [f"n{i}" for i in range(len(ts))]
        above = ", ".join(f"{_sql_above('label_probs', t)} AS {n[i]}" for i, t in enumerate(ts))
        self._run(
            f"""
            CREATE OR REPLACE TEMP TABLE c AS
            SELECT error IS NULL AS ok, {ids if with_index else ""}label_probs[1] AS top1,
                   labels[1] AS cls1, {", ".join(n)}, labels[1:n0] AS l
            FROM (SELECT *, {above} FROM {source})
            """
        )
        ((images, rows),) = self._run("SELECT count(*) FILTER (WHERE ok), count(*) FROM c")
        self.images += images
        self.failed += rows - images
        self._run("DELETE FROM c WHERE NOT ok")
        # a label's level: how many thresholds it clears, from its place against the row's counts
        level = " + ".join(f"(i <= {k})::INTEGER" for k in n)
        self._run(
            f"INSERT INTO levels SELECT cls, {level}, count(*) FROM (SELECT unnest(l) AS cls, "
            f"generate_subscripts(l, 1) AS i, {', '.join(n)} FROM c) GROUP BY ALL"
        )
        self._run(f"INSERT INTO per_image SELECT {', '.join(n)}, count(*) FROM c GROUP BY ALL")
        self._run("INSERT INTO top1c SELECT cls1, count(*) FROM c GROUP BY ALL")
        fine, coarse = _sql_bin("top1", FINE_BINS), _sql_bin("top1", HISTOGRAM_BINS)
        self._run(f"INSERT INTO bins SELECT {fine}, {coarse}, count(*) FROM c GROUP BY ALL")
        if with_index:
            self._run("INSERT INTO ix SELECT id, phash, top1, cls1 FROM c")
        self._run("DROP TABLE c")

    def _counts(self, sql: str) -> dict[str, int]:
        return {str(k): int(n) for k, n in self._run(sql)}

    def aggregate(self) -> Aggregate:
        per_threshold = []
        for i, t in enumerate(self.ts):
            dist = self._counts(
                f"SELECT n{i}, sum(n) FROM per_image WHERE n{i} > 0 GROUP BY 1 ORDER BY 1"
            )
            per_threshold.append(
                ThresholdCounts(
                    threshold=t,
                    kept=sum(dist.values()),
                    labels_above=sum(int(k) * n for k, n in dist.items()),
                    class_counts=self._counts(
                        f"SELECT cls, sum(n) FROM levels WHERE lvl > {i} GROUP BY 1 ORDER BY 1"
                    ),
                    labels_per_image=dist,
                )
            )
        histogram = [0] * HISTOGRAM_BINS
        for b, n in self._run("SELECT coarse, sum(n) FROM bins GROUP BY 1"):
            histogram[b] = int(n)
        return Aggregate(
            images=self.images,
            failed=self.failed,
            thresholds=per_threshold,
            top1_counts=self._counts("SELECT cls, sum(n) FROM top1c GROUP BY 1 ORDER BY 1"),
            top1_histogram=histogram,
            top1_fine=self._counts("SELECT fine, sum(n) FROM bins GROUP BY 1 ORDER BY 1"),
        )

    def write_index(self, path: str) -> None:
        """The index rows into a local parquet file (``INDEX_SCHEMA``'s columns and types, lz4;
        DuckDB writes a column without nulls as required), sorted by pHash (rows without one
        last), then id."""
        self._run(
            "COPY (SELECT * FROM ix ORDER BY phash NULLS LAST, id) TO "
            + "'"
            + path.replace("'", "''")
            + f"' (FORMAT parquet, COMPRESSION lz4, ROW_GROUP_SIZE {INDEX_ROW_GROUP})"
        )


def partial_aggregate(
    labels: pl.LazyFrame, thresholds: Sequence[float] = CARD_THRESHOLDS
) -> Aggregate:
    """Reduce labeled rows (``labels``, ``label_probs``, ``error`` columns) to an aggregate."""
    ts = check_thresholds(thresholds)
    rows = labels.select(
        pl.col("labels").cast(pl.List(pl.Int32)),
        pl.col("label_probs").cast(pl.List(pl.Float32)),
        pl.col("error").cast(pl.String),
    ).collect()
    with _Reducer(ts) as reducer:
        reducer.con.register("rows", rows.to_arrow())
        reducer.add("rows", with_index=False)
        return reducer.aggregate()


def aggregate_files(
    files: Sequence[str],
    thresholds: Sequence[float] = CARD_THRESHOLDS,
    store: Storage | None = None,
    index_url: str | None = None,
    chunk_files: int = CHUNK_FILES,
) -> Aggregate:
    """A partition's aggregate, reading ``chunk_files`` label files at a time (from ``store``'s
    filesystem; local paths without one), and, given ``index_url``, its index written there
    (``INDEX_SCHEMA``, written whole through ``store``).

    Memory is one chunk's compact rows plus the index (24 bytes a row, ~140 MB for a COYO part).
    """
    ts = check_thresholds(thresholds)
    filesystem = None if store is None or store.is_local else store.fs
    with _Reducer(ts, filesystem) as reducer:
        for start in range(0, len(files), chunk_files):
            reducer.add(_sql_files(files[start : start + chunk_files]), index_url is not None)
        if index_url is not None:
            store = store or Storage(os.path.dirname(index_url))
            store.write_file(index_url, reducer.write_index)
        return reducer.aggregate()


def empty_aggregate(thresholds: Sequence[float] = CARD_THRESHOLDS) -> Aggregate:
    with _Reducer(check_thresholds(thresholds)) as reducer:
        return reducer.aggregate()


def _sum_counts(dicts: Iterable[dict[str, int]]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for d in dicts:
        total.update(d)
    return dict(total)


def merge_aggregates(aggregates: Iterable[Aggregate]) -> Aggregate:
    """Sum aggregates computed with the same thresholds into one (exact: counts only)."""
    aggregates = list(aggregates)
    if not aggregates:
        raise ValueError("no aggregates to merge")
    thresholds = aggregates[0].threshold_values
    for agg in aggregates[1:]:
        if agg.threshold_values != thresholds:
            raise ValueError(
                "cannot merge label stats computed with different thresholds: "
                f"{thresholds} and {agg.threshold_values}"
            )
    merged = []
    for i, t in enumerate(thresholds):
        per_t = [a.thresholds[i] for a in aggregates]
        merged.append(
            ThresholdCounts(
                threshold=t,
                kept=sum(p.kept for p in per_t),
                labels_above=sum(p.labels_above for p in per_t),
                class_counts=_sum_counts(p.class_counts for p in per_t),
                labels_per_image=_sum_counts(p.labels_per_image for p in per_t),
            )
        )
    return Aggregate(
        images=sum(a.images for a in aggregates),
        failed=sum(a.failed for a in aggregates),
        thresholds=merged,
        top1_counts=_sum_counts(a.top1_counts for a in aggregates),
        top1_histogram=[
            sum(col) for col in zip(*(a.top1_histogram for a in aggregates), strict=True)
        ],
        top1_fine=_sum_counts(a.top1_fine for a in aggregates),
        labelers=sorted({labeler for a in aggregates for labeler in a.labelers}),
    )
