"""Comparing two label sets: the figures for two small hand-written sets, counted by hand; a set
against a copy of itself; and the errors for label sets or partitions that are not there."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pytest

from coyo_platform.common import layout
from coyo_platform.common.formats import LABELED_SCHEMA
from coyo_platform.common.storage import Storage
from coyo_platform.stats.aggregate import CARD_THRESHOLDS
from coyo_platform.stats.agreement import agreement_table, compare_label_sets, thresholds_table

A = "model-aaaaaaaaaaaa"  # the baseline
B = "model-bbbbbbbbbbbb"  # the candidate
P0, P1, P_A_ONLY = "part-00000", "part-00001", "part-00002"
#: Thresholds for the hand-counted table: probabilities below are powers of two and their sums,
#: exact in float32, and none is equal to a threshold.
TS = (0.1, 0.3, 0.6)
HALVES = [0.5, 0.25, 0.125, 0.0625, 0.03125]


def ok(id_: int, labels: list[int], probs: list[float]) -> dict:
    return {
        "id": id_,
        "key": f"{id_:09d}",
        "imagehash": f"{id_:016x}",
        "labels": labels,
        "label_probs": probs,
        "width": 64,
        "height": 48,
        "error": None,
    }


def failed(id_: int) -> dict:
    return {
        "id": id_,
        "key": f"{id_:09d}",
        "imagehash": None,
        "labels": None,
        "label_probs": None,
        "width": None,
        "height": None,
        "error": "decode: OSError",
    }


def write_set(store: Storage, labeler: str, shards: dict[str, dict[str, list[dict]]]) -> None:
    """A label set as the label program leaves it: its record and one parquet per shard."""
    store.write_json(layout.labeler_record(layout.label_sets(store), labeler), {"model": "m"})
    for key, by_shard in shards.items():
        for shard, rows in by_shard.items():
            url = layout.shard_file(layout.labels(store, key, labeler), shard, ".parquet")
            store.write_parquet(url, pa.Table.from_pylist(rows, schema=LABELED_SCHEMA))


# Baseline. P0: shard 00001 only in A (its image must count nowhere); P_A_ONLY: not in B.
SET_A = {
    P0: {
        "00000": [
            ok(1, [1, 2, 3, 4, 5], HALVES),
            ok(2, [10, 11, 12, 13, 14], [0.75, 0.125, 0.0625, 0.03125, 0.015625]),
            ok(3, [20, 21, 22, 23, 24], [0.375, 0.25, 0.125, 0.0625, 0.03125]),
        ],
        "00001": [ok(4, [7, 8, 9, 10, 11], [0.875, 0.0625, 0.03125, 0.015625, 0.0078125])],
    },
    P1: {
        "00000": [
            ok(5, [30, 31, 32, 33, 34], HALVES),
            failed(6),
            ok(7, [40, 41, 42, 43, 44], [0.25, 0.125, 0.0625, 0.03125, 0.015625]),
        ],
        "00001": [ok(9, [60, 61, 62, 63, 64], HALVES)],
    },
    P_A_ONLY: {"00000": [ok(100, [1, 2, 3, 4, 5], HALVES)]},
}

# Candidate. P1: shard 00002 only in B; image 8 only in B's shard 00000.
SET_B = {
    P0: {
        "00000": [
            ok(1, [1, 2, 3, 4, 5], HALVES),  # the same
            ok(2, [11, 10, 12, 15, 16], HALVES),  # top-1 differs; top-5 shares 10, 11, 12
            failed(3),  # labeled in A alone
        ],
    },
    P1: {
        "00000": [
            # the same top-1; top-5 shares 30, 31, 32; top-1 prob 0.625 against 0.5
            ok(5, [30, 32, 31, 35, 36], [0.625, 0.125, 0.0625, 0.03125, 0.015625]),
            ok(6, [50, 51, 52, 53, 54], [0.875, 0.0625, 0.03125, 0.015625, 0.0078125]),
            ok(7, [40, 41, 42, 43, 44], [0.25, 0.125, 0.0625, 0.03125, 0.015625]),  # the same
            ok(8, [70, 71, 72, 73, 74], [0.125, 0.0625, 0.03125, 0.015625, 0.0078125]),
        ],
        # top-1 differs; the same five classes; top-1 prob 0.375 against 0.5
        "00001": [ok(9, [61, 60, 62, 63, 64], [0.375, 0.3125, 0.125, 0.0625, 0.03125])],
        "00002": [ok(10, [1, 2, 3, 4, 5], [0.9375, 0.03125, 0.015625, 0.0078125, 0.00390625])],
    },
}


@pytest.fixture
def store(tmp_path: Path) -> Storage:
    store = Storage(str(tmp_path / "root"))
    write_set(store, A, SET_A)
    write_set(store, B, SET_B)
    return store


def test_figures_per_partition_and_in_total(store: Storage):
    result = compare_label_sets(store, A, B, thresholds=TS)
    assert (result.baseline, result.candidate) == (A, B)
    assert [p.partition for p in result.partitions] == [P0, P1]  # P_A_ONLY is not in B
    p0, p1 = result.partitions

    # P0: images 1 and 2 (3 failed in B; 4's shard is not in B)
    assert (p0.shards, p0.shards_only_baseline, p0.shards_only_candidate) == (1, 1, 0)
    assert (p0.images, p0.top1_agree, p0.top5_shared) == (2, 1, 5 + 3)
    assert (p0.only_baseline, p0.only_candidate) == (1, 0)
    assert p0.top1_agreement == pytest.approx(0.5, abs=1e-6)
    assert p0.top5_overlap == pytest.approx(8 / 10, abs=1e-6)
    assert p0.top1_prob_mean_abs_diff == pytest.approx(0.25 / 2, abs=1e-6)

    # P1: images 5, 7, 9 (6 failed in A, 8 only in B; shard 00002 is not in A)
    assert (p1.shards, p1.shards_only_baseline, p1.shards_only_candidate) == (2, 0, 1)
    assert (p1.images, p1.top1_agree, p1.top5_shared) == (3, 2, 3 + 5 + 5)
    assert (p1.only_baseline, p1.only_candidate) == (0, 2)
    assert p1.top1_agreement == pytest.approx(2 / 3, abs=1e-6)
    assert p1.top5_overlap == pytest.approx(13 / 15, abs=1e-6)
    assert p1.top1_prob_mean_abs_diff == pytest.approx((0.125 + 0 + 0.125) / 3, abs=1e-6)

    # weighted by images: 3 of 5 agree, not (1/2 + 2/3) / 2
    total = result.total
    assert total.partition == "all"
    assert (total.images, total.only_baseline, total.only_candidate) == (5, 1, 2)
    assert (total.shards, total.shards_only_baseline, total.shards_only_candidate) == (3, 1, 1)
    assert total.top1_agreement == pytest.approx(3 / 5, abs=1e-6)
    assert total.top5_overlap == pytest.approx(21 / 25, abs=1e-6)
    assert total.top1_prob_mean_abs_diff == pytest.approx(0.5 / 5, abs=1e-6)


def test_threshold_table_over_the_shared_shards(store: Storage):
    result = compare_label_sets(store, A, B, thresholds=TS)
    # A's labeled images in shared shards: 1, 2, 3, 5, 7, 9 (4 is in a shard B lacks)
    #   >= 0.1: all 6, with 3+2+3+3+2+3 = 16 labels; >= 0.3: 1, 2, 3, 5, 9 with one label each;
    #   >= 0.6: 2 alone
    # B's: 1, 2, 5, 6, 7, 8, 9 (10 is in a shard A lacks)
    #   >= 0.1: all 7, with 3+3+2+1+2+1+3 = 15 labels; >= 0.3: 1, 2, 5, 6, and 9 with two
    #   (0.375, 0.3125); >= 0.6: 5 and 6
    table = thresholds_table(result)
    assert list(table.columns) == [
        "threshold",
        "images kept A",
        "images kept B",
        "labels per image A",
        "labels per image B",
    ]
    assert table.records == [
        {
            "threshold": "0.10",
            "images kept A": 6,
            "images kept B": 7,
            "labels per image A": round(16 / 6, 2),
            "labels per image B": round(15 / 7, 2),
        },
        {
            "threshold": "0.30",
            "images kept A": 5,
            "images kept B": 5,
            "labels per image A": 1.0,
            "labels per image B": 1.2,
        },
        {
            "threshold": "0.60",
            "images kept A": 1,
            "images kept B": 2,
            "labels per image A": 1.0,
            "labels per image B": 1.0,
        },
    ]
    t = result.total.thresholds[0]
    assert t.labels_per_image_baseline == pytest.approx(16 / 6, abs=1e-6)
    assert t.labels_per_image_candidate == pytest.approx(15 / 7, abs=1e-6)
    # per partition too: P0 has A's 1, 2, 3 and B's 1, 2 above 0.1
    assert [(t.kept_baseline, t.kept_candidate) for t in result.partitions[0].thresholds] == [
        (3, 2),
        (3, 2),
        (1, 0),
    ]


def test_default_thresholds_are_the_cards(store: Storage):
    result = compare_label_sets(store, A, B)
    assert result.thresholds == CARD_THRESHOLDS
    rows = thresholds_table(result).records
    assert [r["threshold"] for r in rows] == ["0.05", "0.10", "0.15", "0.20", "0.25"]
    # at 0.25 (>=): A keeps 1, 2, 3, 5, 7, 9; B keeps 1, 2, 5, 6, 7, 9 (8's 0.125 is below)
    assert (rows[-1]["images kept A"], rows[-1]["images kept B"]) == (6, 6)


def test_agreement_table_and_json(store: Storage):
    result = compare_label_sets(store, A, B, thresholds=TS)
    table = agreement_table(result)
    assert list(table.columns)[:5] == [
        "partition",
        "images",
        "top1_agreement",
        "top5_overlap",
        "top1_prob_mean_abs_diff",
    ]
    assert [(r["partition"], r["images"]) for r in table.records] == [
        (P0, 2),
        (P1, 3),
        ("all", 5),
    ]
    assert table.records[-1]["top1_agreement"] == pytest.approx(0.6, abs=1e-6)
    assert table.records[-1]["top5_overlap"] == pytest.approx(0.84, abs=1e-6)
    assert table.records[-1]["top1_prob_mean_abs_diff"] == pytest.approx(0.1, abs=1e-6)
    assert (table.records[-1]["only_baseline"], table.records[-1]["only_candidate"]) == (1, 2)

    value = json.loads(json.dumps(result.to_json()))  # plain JSON all the way down
    assert (value["baseline"], value["candidate"], value["thresholds"]) == (A, B, list(TS))
    assert [p["partition"] for p in value["partitions"]] == [P0, P1]
    assert value["total"]["images"] == 5
    assert value["total"]["top1_agreement"] == pytest.approx(0.6, abs=1e-6)
    assert value["total"]["thresholds"][1]["kept_candidate"] == 5
    assert value["partitions"][1]["only_candidate"] == 2
    # the same input gives the same output
    assert compare_label_sets(store, A, B, thresholds=TS).to_json() == result.to_json()


def test_a_copy_of_a_set_agrees_with_it_fully(store: Storage):
    sets = Path(layout.label_sets(store))
    copy = "model-cccccccccccc"
    shutil.copytree(sets / A, sets / copy)
    result = compare_label_sets(store, A, copy, thresholds=TS)
    assert [p.partition for p in result.partitions] == [P0, P1, P_A_ONLY]
    total = result.total
    # every labeled image of A: 1, 2, 3, 4 / 5, 7, 9 / 100
    assert (total.images, total.only_baseline, total.only_candidate) == (8, 0, 0)
    assert (total.shards_only_baseline, total.shards_only_candidate) == (0, 0)
    assert total.top1_agreement == 1.0
    assert total.top5_overlap == 1.0
    assert total.top1_prob_mean_abs_diff == 0.0
    for t in total.thresholds:
        assert t.kept_baseline == t.kept_candidate > 0
        assert t.labels_above_baseline == t.labels_above_candidate


def test_explicit_keys(store: Storage):
    result = compare_label_sets(store, A, B, keys=[P1], thresholds=TS)
    assert [p.partition for p in result.partitions] == [P1]
    assert result.total.images == 3
    with pytest.raises(ValueError, match=rf"{B}.*candidate.*{P_A_ONLY}"):
        compare_label_sets(store, A, B, keys=[P0, P_A_ONLY])


def test_unknown_label_sets_are_named(store: Storage):
    with pytest.raises(ValueError) as err:
        compare_label_sets(store, "model-nope", B)
    message = str(err.value)
    assert "'model-nope' (the baseline)" in message
    assert f"label sets there: {A}, {B}" in message

    with pytest.raises(ValueError, match=r"'model-gone' \(the candidate\).*" + B):
        compare_label_sets(store, A, "model-gone")

    with pytest.raises(ValueError, match="same label set"):
        compare_label_sets(store, A, A)


def test_unknown_label_set_in_an_empty_root(tmp_path: Path):
    store = Storage(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="label sets there: none"):
        compare_label_sets(store, A, B)


def test_sets_with_no_partition_in_common(store: Storage):
    other = "model-dddddddddddd"
    write_set(store, other, {"part-00009": {"00000": [ok(1, [1, 2, 3, 4, 5], HALVES)]}})
    with pytest.raises(ValueError, match=rf"{A}.*{other}.*share no partition"):
        compare_label_sets(store, A, other)
