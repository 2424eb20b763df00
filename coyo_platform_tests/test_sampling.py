"""Sampling at scale: the threshold table from partial aggregates equals a direct count for any
thresholds, the target-size threshold is exact to the row, deduplication and class caps keep what
the documented rule says, and the plan, the subsets and the manifest agree through Dagster."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from coyo_platform.assets.coyo_labeled_300m import card_schema, coyo_labeled_300m
from coyo_platform.assets.label_stats import label_stats
from coyo_platform.assets.label_stats_rollup import label_stats_rollup
from coyo_platform.assets.subset_manifest import subset_manifest
from coyo_platform.assets.subset_plan import subset_plan
from coyo_platform.common import labelspace, layout
from coyo_platform.common.formats import (
    CARD_SCHEMA,
    INDEX_SCHEMA,
    LABELED_FILE_OPTIONS,
    LABELED_SCHEMA,
)
from coyo_platform.common.storage import Storage
from coyo_platform.resources import StorageResource
from coyo_platform.sample import plan as plans
from coyo_platform.sample import rules
from coyo_platform.sample.card import size_category, write_card
from coyo_platform.sample.manifest import build_manifest
from coyo_platform.sample.subset import build_subset
from coyo_platform.stats import aggregate as stats
from coyo_platform.stats.report import threshold_rows
from coyo_platform_tests.conftest import HAND_LABELER, hand_label_folder

#: float32(0.7) is just below 0.7: an image at exactly that probability is not "above 0.7".
BELOW_07 = float(np.float32(0.7))
ODD_THRESHOLDS = (0.0, 0.013, 0.3, 0.7, 1.0)


def _rows(n: int, seed: int, first_id: int, shared_hashes: list[str]) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        if i % 23 == 0:
            rows.append({"id": first_id + i, "key": f"{i:09d}", "error": "decode: OSError"})
            continue
        top1 = rng.choice([BELOW_07, 0.3, 0.5, 1.0, *rng.random(6)])  # ties on purpose
        probs = np.sort(np.concatenate([[top1], top1 * rng.random(49)]))[::-1].astype(np.float32)
        labels = rng.choice(60, 50, replace=False).astype(np.int32)  # few classes: caps bite
        phash = (
            shared_hashes[i % len(shared_hashes)] if i % 5 == 0 else f"{rng.integers(2**63):016x}"
        )
        rows.append(
            {
                "id": first_id + i,
                "key": f"{i:09d}",
                "imagehash": phash,
                "labels": labels.tolist(),
                "label_probs": probs.tolist(),
                "width": 640,
                "height": 480,
                "error": None,
            }
        )
    return rows


def _write_partition(root: Path, key: str, rows: list[dict], shards: int = 3) -> None:
    folder = hand_label_folder(root, key)
    size = -(-len(rows) // shards)
    store = Storage(str(root))
    for s in range(shards):
        chunk = rows[s * size : (s + 1) * size]
        table = pa.Table.from_pylist(
            [{n: r.get(n) for n in LABELED_SCHEMA.names} for r in chunk], schema=LABELED_SCHEMA
        )
        store.write_parquet(str(folder / f"{s:05d}.parquet"), table, **LABELED_FILE_OPTIONS)
    meta = pl.DataFrame(
        {"id": [r["id"] for r in rows], "url": [f"http://x/{r['id']}" for r in rows]}
    )
    (root / "coyo700m_metadata").mkdir(exist_ok=True)
    meta.write_parquet(root / "coyo700m_metadata" / f"{key}.parquet")


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[Path, dict[str, list[dict]]]:
    shared = [f"{h:016x}" for h in (1, 2, 3, 2**63 + 5)]  # pHashes repeated across partitions
    parts = {
        f"part-0000{p}": _rows(n, seed=p, first_id=p * 10_000, shared_hashes=shared)
        for p, n in enumerate((700, 450, 300))
    }
    for key, rows in parts.items():
        _write_partition(tmp_path, key, rows)
    return tmp_path, parts


# ------------------------------------------------------------------ direct, row-by-row truths


def _ok(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["error"] is None]


def _above(p: float, t: float) -> bool:
    return float(np.float32(p)) >= t


def _direct(rows: list[dict], t: float) -> dict:
    ok = _ok(rows)
    kept = [r for r in ok if _above(r["label_probs"][0], t)]
    n_above = [sum(_above(p, t) for p in r["label_probs"]) for r in kept]
    classes: dict[str, int] = {}
    for r in kept:
        for lab, p in zip(r["labels"], r["label_probs"], strict=True):
            if _above(p, t):
                classes[str(lab)] = classes.get(str(lab), 0) + 1
    per_image: dict[str, int] = {}
    for n in n_above:
        per_image[str(n)] = per_image.get(str(n), 0) + 1
    return {
        "kept": len(kept),
        "labels_above": sum(n_above),
        "class_counts": classes,
        "labels_per_image": per_image,
    }


def test_partition_aggregates_equal_a_direct_count_over_all_rows(dataset):
    root, parts = dataset
    store = Storage(str(root))
    aggs = []
    for key in parts:
        files = sorted(
            str(f) for f in (root / "labeled_shards" / HAND_LABELER / key).glob("*.parquet")
        )
        url = layout.index(store, key)
        agg = stats.aggregate_files(files, ODD_THRESHOLDS, store, url, chunk_files=2)
        index = pq.read_table(url)
        # INDEX_SCHEMA's columns and types (DuckDB writes a column without nulls as required)
        assert [(f.name, f.type) for f in index.schema] == [(f.name, f.type) for f in INDEX_SCHEMA]
        aggs.append(agg)
        assert index.num_rows == len(_ok(parts[key]))
        assert index.column("phash").to_pylist() == sorted(index.column("phash").to_pylist())
    merged = stats.merge_aggregates(aggs)
    everything = [r for rows in parts.values() for r in rows]
    assert merged.images == len(_ok(everything))
    assert merged.failed == len(everything) - len(_ok(everything))
    for t, got in zip(ODD_THRESHOLDS, merged.thresholds, strict=True):
        want = _direct(everything, t)
        assert {k: getattr(got, k) for k in want} == want, t
    assert got.kept == sum(r["label_probs"][0] == 1.0 for r in _ok(everything))
    top1 = [np.float32(r["label_probs"][0]) for r in _ok(everything)]
    fine = np.bincount(stats.bin_of(np.array(top1), stats.FINE_BINS), minlength=stats.FINE_BINS)
    assert merged.top1_fine == {str(b): int(n) for b, n in enumerate(fine) if n}
    assert sum(merged.top1_histogram) == merged.images
    table = {r["threshold"]: r for r in threshold_rows(merged)}
    assert table[0.7]["images_kept"] == sum(float(p) >= 0.7 for p in top1)  # f32(0.7) < 0.7


def _closest(values: np.ndarray, target: int) -> tuple[float, int]:
    """Brute force: every distinct value as a threshold; closest size, ties to the lower one."""
    best = None
    for v in sorted(set(values.tolist())):  # ascending: the first of equals wins the tie
        size = int((values >= v).sum())
        if best is None or abs(size - target) < abs(best[1] - target):
            best = (v, size)
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_target_threshold_is_exact_to_the_row(seed: int):
    rng = np.random.default_rng(seed)
    values = np.concatenate(
        [rng.random(3000), rng.choice([0.25, 0.5, BELOW_07], 400), rng.random(50) * 1e-4, [1.0] * 7]
    ).astype(np.float32)
    bins = stats.bin_of(values, stats.FINE_BINS)
    histogram = {int(b): int(n) for b, n in zip(*np.unique(bins, return_counts=True), strict=True)}

    def values_in_bins(lo: int, hi: int) -> np.ndarray:
        return values[(bins >= lo) & (bins <= hi)]

    # a target exactly between two sizes: the tie goes to the lower threshold (more rows)
    distinct = np.unique(values)
    sizes = [int((values >= v).sum()) for v in distinct]
    ties = [
        (a + b) // 2
        for a, b in zip(sizes[1:], sizes, strict=False)
        if (b - a) % 2 == 0 and b - a > 1
    ]
    assert ties  # the repeated values make such gaps
    for target in (1, 5, 7, 8, 200, 1000, 1234, 2000, 3456, 3457, len(values), 10**6, *ties[:5]):
        want = _closest(values, target)
        got = rules.threshold_for_target(histogram, target, values_in_bins)
        assert got == want, target
        assert got[1] == int((values >= got[0]).sum())


def _brute_force_subset(parts: dict[str, list[dict]], sampling: rules.Sampling, t: float) -> set:
    ok = [r for rows in parts.values() for r in _ok(rows)]
    order = sorted(ok, key=lambda r: (-float(np.float32(r["label_probs"][0])), r["id"]))
    if sampling.dedup:
        seen, kept = set(), []
        for r in order:
            if r["imagehash"] not in seen:
                seen.add(r["imagehash"])
                kept.append(r)
        order = kept
    if sampling.class_cap:
        per_class: dict[int, int] = {}
        kept = []
        for r in order:
            c = r["labels"][0]
            if per_class.get(c, 0) < sampling.class_cap:
                per_class[c] = per_class.get(c, 0) + 1
                kept.append(r)
        order = kept
    return {r["id"] for r in order if _above(r["label_probs"][0], t)}


def _write_stats(root: Path, parts: dict[str, list[dict]]) -> Storage:
    """Each partition's label stats and index, as label_stats writes them."""
    store = Storage(str(root))
    for key in parts:
        files = sorted(
            str(f) for f in (root / "labeled_shards" / HAND_LABELER / key).glob("*.parquet")
        )
        agg = stats.aggregate_files(files, store=store, index_url=layout.index(store, key))
        store.write_json(layout.stats(store, key), agg.to_json())
    return store


def _dropped_ids(store: Storage, plan: plans.Plan, key: str) -> set[int]:
    duplicates, _ = plans.partition_filters(store, plan, key)
    return set() if duplicates is None else set(duplicates.collect()["id"].to_list())


@pytest.mark.parametrize(
    "sampling",
    [
        rules.Sampling(threshold=0.5),
        rules.Sampling(target_rows=400, dedup=True),
        rules.Sampling(target_fraction=0.35, class_cap=9),
        rules.Sampling(target_rows=250, dedup=True, class_cap=6),
    ],
    ids=["threshold", "target+dedup", "fraction+cap", "target+dedup+cap"],
)
def test_plan_keeps_exactly_what_the_rules_say(dataset, sampling: rules.Sampling, monkeypatch):
    root, parts = dataset
    store = _write_stats(root, parts)
    # small buckets and boundary-row groups, so that the bounded-memory paths really take several
    # passes (dedup: one per pHash range; caps: a second-pass group per capped class)
    monkeypatch.setattr(rules, "BUCKET_ROWS", 300)
    monkeypatch.setattr(rules, "CAP_ROWS", 1)
    logs: list[str] = []
    plan = plans.make_plan(store, sorted(parts), sampling, log=logs.append)
    if sampling.dedup:  # the patched bucket size took effect: several pHash ranges
        ranges = [int(m[1]) for m in map(re.compile(r"\((\d+) pHash range").search, logs) if m]
        assert ranges and ranges[0] > 1, logs
        # one duplicates file per partition that has any, holding only that partition's rows
        files = store.glob(plan.duplicates_glob)
        assert files and len(files) <= len(parts)
        for f in files:
            key = f.rsplit("/", 1)[-1].removesuffix(".parquet").removeprefix("crawl-")
            assert set(store.scan_parquet(f).collect()["partition"]) == {key}
    # the rule commutes with the threshold: rules first, then the cut, equals the brute force
    want = _brute_force_subset(parts, sampling, plan.threshold)
    got: set = set()
    for key in parts:
        duplicates, cutoffs = plans.partition_filters(store, plan, key)
        files = sorted(
            str(f) for f in (root / "labeled_shards" / HAND_LABELER / key).glob("*.parquet")
        )
        table, _ = build_subset(
            store.scan_parquet(files),
            store.scan_parquet(str(root / "coyo700m_metadata" / f"{key}.parquet")),
            plan.threshold,
            duplicates,
            cutoffs,
        )
        ids = set(table.column("id").to_pylist())
        assert len(ids) == table.num_rows == plan.rows_per_partition[key]
        assert not ids & got  # never the same image twice
        got |= ids
    assert got == want
    assert plan.rows == len(want)
    if sampling.dedup:  # a plan of version 3 (a duplicates file per pHash range) applies alike
        dropped = {k: _dropped_ids(store, plan, k) for k in parts}
        files = store.glob(plan.duplicates_glob)
        whole = pl.concat([pl.read_parquet(f) for f in files]).sort("partition", "id")
        for f in files:
            store.remove(f)
        store.write_parquet(layout.duplicates(plan.folder, "00000"), whole.to_arrow())
        old = dataclasses.replace(plan, version=3)
        assert {k: _dropped_ids(store, old, k) for k in parts} == dropped
        assert sum(map(len, dropped.values())) == plan.duplicates_dropped > 0
    if sampling.target_rows or sampling.target_fraction:
        target = sampling.target_rows or round(sampling.target_fraction * plan.images_labeled)
        eligible = _brute_force_subset(parts, sampling, 0.0)
        sizes = {len(_brute_force_subset(parts, sampling, t)) for t in (0.0, plan.threshold)}
        assert plan.target_rows == target and len(eligible) >= 1 and sizes
        # no threshold gets closer: every other candidate value is at least as far away
        values = sorted(
            {float(np.float32(r["label_probs"][0])) for rows in parts.values() for r in _ok(rows)}
        )
        best = min(abs(len(_brute_force_subset(parts, sampling, v)) - target) for v in values)
        assert abs(plan.rows - target) == best
    if sampling.class_cap:
        tops = [r["labels"][0] for rows in parts.values() for r in rows if r["id"] in got]
        assert max(tops.count(c) for c in set(tops)) <= sampling.class_cap


def _reference_cutoffs(frames: list[pl.DataFrame], cap: int) -> pl.DataFrame:
    """The class cap's rule in one sort over every row: per class over ``cap``, its cap-th
    image in (top1 descending, id ascending)."""
    schema = {"top1_class": pl.Int32, "cut_top1": pl.Float32, "cut_id": pl.Int64}
    rows = pl.concat(frames) if frames else pl.DataFrame(schema={**schema, "top1": pl.Float32})
    if not rows.height:
        return pl.DataFrame(schema=schema)
    ranked = rows.sort(["top1", "id"], descending=[True, False]).with_columns(
        rank=pl.int_range(pl.len()).over("top1_class")
    )
    return (
        ranked.filter(pl.col("rank") == cap - 1)
        .join(ranked.filter(pl.col("rank") == cap).select("top1_class"), on="top1_class")
        .select("top1_class", cut_top1="top1", cut_id="id")
        .cast(schema)
        .sort("top1_class")
    )


def _random_indexes(seed: int, parts: int) -> list[pl.DataFrame]:
    rng = np.random.default_rng(seed)
    ties = np.array([0.0, 0.1, BELOW_07, 0.7, 0.9999999, 1.0, *rng.random(3)], dtype=np.float32)
    ids = rng.permutation(parts * 400) + 1_000  # ids not in row order
    frames = []
    for p in range(parts):
        n = int(rng.integers(0, 400))  # some partitions empty
        frames.append(
            pl.DataFrame(
                {
                    "id": ids[p * 400 : p * 400 + n].astype(np.int64),
                    "phash": rng.integers(2**63, size=n).astype(np.uint64),
                    "top1": rng.choice(ties, n),  # few values: ties across ids everywhere
                    "top1_class": rng.choice([0, 3, 7, 500, 21_840], n).astype(np.int32),
                }
            )
        )
    return frames


@pytest.mark.parametrize("cap", [1, 2, 5, 60, 10_000])
@pytest.mark.parametrize("bins,cap_rows", [(512, None), (8, 3), (1, 1)])
@pytest.mark.parametrize("seed", [0, 1])
def test_class_cutoffs_equal_one_sort_over_every_row(seed, cap, bins, cap_rows, monkeypatch):
    # few bins and a tiny cap_rows: boundary bins with many rows, one pass 2 group per class
    monkeypatch.setattr(rules, "CAP_BINS", bins)
    frames = _random_indexes(seed, parts=5)
    indexes = [(str(i), f.lazy()) for i, f in enumerate(frames)]
    got = rules.class_cutoffs(indexes, cap, cap_rows)
    want = _reference_cutoffs(frames, cap)
    assert got.schema == want.schema
    assert got.equals(want)
    if cap <= 5:
        assert want.height >= 4  # the caps bite
    if cap == 60:  # a class with exactly its cap images is not capped
        exact = pl.concat(frames).filter(pl.col("top1_class") == 7).head(cap)
        assert exact.height == cap
        assert rules.class_cutoffs([("x", exact.lazy())], cap, cap_rows).height == 0
        assert _reference_cutoffs([exact], cap).height == 0
    # the cut keeps exactly min(cap, class size) images: one image off is a failure
    rows = pl.concat(frames)
    kept = rules.apply_caps(rows.lazy(), got).collect()["top1_class"].value_counts()
    sizes = rows["top1_class"].value_counts()
    assert kept.height == sizes.height
    for (c, n), (c2, total) in zip(
        kept.sort("top1_class").rows(), sizes.sort("top1_class").rows(), strict=True
    ):
        assert c == c2 and n == min(total, cap)


def test_class_cutoffs_of_nothing():
    schema = {"top1_class": pl.Int32, "cut_top1": pl.Float32, "cut_id": pl.Int64}
    assert rules.class_cutoffs([], 3).equals(pl.DataFrame(schema=schema))
    empty = pl.from_arrow(INDEX_SCHEMA.empty_table())
    got = rules.class_cutoffs([("0", empty.lazy()), ("1", empty.lazy())], 1)
    assert got.equals(pl.DataFrame(schema=schema)) and got.schema == pl.Schema(schema)


def test_plan_refuses_contradictory_or_out_of_range_settings():
    with pytest.raises(ValueError, match="one of threshold, target_rows, target_fraction"):
        rules.Sampling(threshold=0.3, target_rows=10)
    with pytest.raises(ValueError, match="threshold must be in"):
        rules.Sampling(threshold=1.5)
    with pytest.raises(ValueError, match="target_fraction must be in"):
        rules.Sampling(target_fraction=0.0)
    with pytest.raises(ValueError, match="class_cap must be >= 1"):
        rules.Sampling(class_cap=0)
    with pytest.raises(ValueError, match="thresholds must be in"):
        stats.check_thresholds([0.1, 2.0])


# ---------------------------------------------------------------------------- through Dagster


def _materialize(assets, instance, root, partition=None, config=None):
    run_config = {"ops": {assets[0].key.path[-1]: {"config": config}}} if config else None
    return dg.materialize(
        assets,
        partition_key=partition,
        instance=instance,
        resources={"storage": StorageResource(root=str(root))},
        run_config=run_config,
        raise_on_error=False,
    )


def test_plan_subsets_and_manifest_through_dagster(dataset, monkeypatch):
    root, parts = dataset
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("coyo_parts", sorted(parts))
        for key in parts:
            assert _materialize([label_stats], instance, root, key).success
        assert _materialize([label_stats_rollup], instance, root).success
        config = {"target_rows": 500, "dedup": True}
        planned = _materialize([subset_plan], instance, root, config=config)
        assert planned.success
        [mat] = planned.asset_materializations_for_node("subset_plan")
        plan = plans.read_plan(Storage(str(root)))
        assert mat.metadata["rows"].value == plan.rows and plan.duplicates_dropped > 0
        assert abs(plan.rows - 500) <= 3  # the tied values leave a little slack here

        # the same decision again: plan.json refreshed, no new materialization, subsets kept
        again = _materialize([subset_plan], instance, root, config=config)
        assert again.success and not again.asset_materializations_for_node("subset_plan")

        # a run killed after writing plan.json but before Dagster recorded it: the rerun of the
        # same settings must record the plan (else the subsets would never refresh)
        store = Storage(str(root))
        killed = plans.make_plan(store, sorted(parts), rules.Sampling(threshold=0.5))
        plans.write_plan(store, killed)
        rerun = _materialize([subset_plan], instance, root, config={"threshold": 0.5})
        assert rerun.success and rerun.asset_materializations_for_node("subset_plan")
        back = _materialize([subset_plan], instance, root, config=config)
        assert back.asset_materializations_for_node("subset_plan")
        assert plans.read_plan(store).digest == plan.digest

        for key in list(parts)[:2]:
            assert _materialize([coyo_labeled_300m, card_schema], instance, root, key).success
        manifest = _materialize([subset_manifest], instance, root)
        [check] = manifest.get_asset_check_evaluations()
        assert not check.passed  # one planned part has no subset yet
        assert "part-00002: planned, no subset file" in check.metadata["problems"].value

        assert _materialize([coyo_labeled_300m], instance, root, "part-00002").success
        manifest = _materialize([subset_manifest], instance, root)
        [check] = manifest.get_asset_check_evaluations()
        assert check.passed
        written = pl.read_parquet(root / "coyo_labeled_300m" / "*.parquet")
        assert written.height == plan.rows and written["id"].n_unique() == written.height
        assert written["imagehash"].n_unique() == written.height  # deduplicated across parts
        _check_card(root, plan, written, monkeypatch)

        # a new plan makes the old subsets stale, and the manifest says which
        assert _materialize([subset_plan], instance, root, config={"threshold": 0.9}).success
        [check] = _materialize([subset_manifest], instance, root).get_asset_check_evaluations()
        assert not check.passed
        assert "written under plan" in check.metadata["problems"].value

        # a partition the global plan never saw fails clearly instead of guessing
        assert _materialize([subset_plan], instance, root, config=config).success
        instance.add_dynamic_partitions("coyo_parts", ["part-00009"])
        _write_partition(root, "part-00009", _rows(40, 9, 90_000, ["00000000000000aa"]))
        folders = [p for p in (root / "subset_plan").iterdir() if p.is_dir()]
        current = plans.read_plan(Storage(str(root))).folder.rsplit("/", 1)[-1]
        # the current plan's files; the earlier dedup plans' are gone (the last one had none)
        assert [p.name for p in folders] == [current]
        lonely = _materialize([coyo_labeled_300m], instance, root, "part-00009")
        assert not lonely.success
        [failure] = [e for e in lonely.all_events if e.is_step_failure]
        assert "made without part-00009" in failure.step_failure_data.error.message


def _check_card(root: Path, plan: plans.Plan, written: pl.DataFrame, monkeypatch) -> None:
    """The dataset card beside the parts says what the run made, in the card's form, and the
    folder loads as it is with the datasets package, exactly the parquet files' rows and types."""
    folder = root / "coyo_labeled_300m"
    card = (folder / "README.md").read_text()
    header = yaml.safe_load(card.split("---\n")[1])
    assert header["license"] == ["cc-by-4.0"]
    assert header["task_ids"] == ["multi-label-image-classification"]
    assert header["size_categories"] == ["n<1K"]  # some 500 rows
    assert header["source_datasets"] == ["kakaobrain/coyo-700m"]
    assert f"**{written.height:,} images**" in card and f"at least **{plan.threshold:g}**" in card
    for key, rows in written.group_by(pl.col("id") // 10_000).len().iter_rows():
        assert f"| part-{key:05d} | {rows:,} |" in card  # the rows of every part
    top, count = written["labels"].list.first().value_counts(sort=True).row(0)
    assert f"| {top} | {labelspace.class_names()[top]} | {count:,} |" in card
    assert "| 0.05 |" in card  # the roll-up's threshold table
    assert (folder / ".coyo" / "top1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (folder / "_manifest.json").exists()
    # a part's summary lost (a run killed between the part and its summary): counted from the
    # part itself, the same card
    (folder / ".coyo" / "summary" / "part-00000.json").unlink()
    store = Storage(str(root))
    write_card(store, build_manifest(store, plans.read_plan(store)), plans.read_plan(store))
    assert (folder / "README.md").read_text() == card

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(root / "hf"))
    import datasets

    loaded = datasets.load_dataset(
        "parquet", data_dir=str(folder), split="train", cache_dir=str(root / "hf" / "cache")
    )
    assert loaded.features.arrow_schema.remove_metadata() == CARD_SCHEMA
    frame = pl.from_arrow(loaded.data.table)
    assert frame.sort("id").equals(written.sort("id"))


def test_bad_plan_settings_fail_before_any_work(dataset):
    root, _ = dataset
    with dg.instance_for_test() as instance:
        result = _materialize(
            [subset_plan], instance, root, config={"threshold": 0.2, "target_rows": 9}
        )
        assert not result.success
        [failure] = [e for e in result.all_events if e.is_step_failure]
        assert (
            "give one of threshold, target_rows, target_fraction"
            in failure.step_failure_data.error.message
        )
        assert not (root / "subset_plan").exists()


def test_the_default_threshold_is_one_the_card_allows():
    """The card's preview row (top-1 0.2763672) clears the default, as it cleared Kakao's; and the
    default is where the card's share-kept column, interpolated, keeps ~300M of ~490M labeled."""
    preview = pl.DataFrame({"top1": [rules.CARD_PREVIEW_TOP1]}, schema={"top1": pl.Float32})
    assert preview.select(rules.above(rules.DEFAULT_THRESHOLD)).item()
    (t0, s0), (t1, s1) = [(t, s) for t, s in rules.CARD_SHARE_KEPT.items() if t in (0.20, 0.25)]
    assert s1 < rules.CARD_KEPT_SHARE < s0  # the target share lies between those two rows
    interpolated = t0 + (t1 - t0) * (s0 - rules.CARD_KEPT_SHARE) / (s0 - s1)
    assert rules.DEFAULT_THRESHOLD == round(interpolated, 2) == 0.22
    assert rules.Sampling().fixed_threshold() == rules.DEFAULT_THRESHOLD


def test_a_target_beyond_the_eligible_images_keeps_them_all_and_says_so(dataset):
    root, parts = dataset
    store = _write_stats(root, parts)
    logs: list[str] = []
    sampling = rules.Sampling(target_rows=10**6, class_cap=6)
    plan = plans.make_plan(store, sorted(parts), sampling, log=logs.append)
    eligible = _brute_force_subset(parts, sampling, 0.0)
    assert plan.rows == len(eligible) < plan.images_labeled  # the caps dropped some
    said = [line for line in logs if "not reachable" in line]
    assert said and f"keeps {len(eligible):,}" in said[0], logs


@pytest.mark.parametrize(
    ("rows", "category"),
    [(0, "n<1K"), (999, "n<1K"), (1_000, "1K<n<10K"), (500, "n<1K"), (300_000_000, "100M<n<1B"),
     (747_000_000, "100M<n<1B"), (1_000_000_000, "1B<n<10B")],
)  # fmt: skip
def test_the_card_s_size_category_is_the_hub_s(rows: int, category: str):
    assert size_category(rows) == category
