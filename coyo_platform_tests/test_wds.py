"""Webdataset shards of the kept images: read with the webdataset package and with timm's `wds/`
reader, every sample equals the subset's row of its id and holds the image as downloaded; a run
cut short resumes to the same bytes; a changed plan rewrites exactly the partitions whose rows
changed (automation asks for those that have shards); S3 gives the same shards as a folder, and
`export --wds-to` copies them, verified."""

from __future__ import annotations

import collections
import io
import json
import tarfile
from pathlib import Path

import boto3
import dagster as dg
import numpy as np
import polars as pl
import pytest
import webdataset
from PIL import Image

from coyo_platform.assets.coyo_labeled_300m import card_schema, coyo_labeled_300m
from coyo_platform.assets.coyo_labeled_300m_wds import coyo_labeled_300m_wds
from coyo_platform.assets.subset_manifest import subset_manifest
from coyo_platform.assets.subset_plan import subset_plan
from coyo_platform.assets.wds_manifest import wds_manifest
from coyo_platform.cli import main
from coyo_platform.common import layout
from coyo_platform.common.shards import clear_partition
from coyo_platform.common.storage import Storage
from coyo_platform.sample.wds import WdsSettings, write_wds, write_wds_manifest
from coyo_platform_tests.test_export import _keys, _stats
from coyo_platform_tests.test_sampling import _materialize, _write_partition

#: Part A's top-1 probabilities spread over 0.4-0.8 (a threshold from 0.5 to 0.6 changes its
#: rows); part B's are 0.2 or 0.95 (the same change keeps its rows); part C never gets shards.
TOPS = {"part-00000": (0.4, 0.8), "part-00001": (0.2, 0.95), "part-00002": (0.2, 0.95)}
ROWS = 120
SHARD_BYTES = 40_000  # several shards a partition


def _image(row_id: int) -> tuple[str, bytes]:
    """A tiny image of its own per id (its id in a comment), a PNG for every 7th."""
    image = Image.new("RGB", (8, 8), (row_id % 256, (row_id * 7) % 256, 90))
    buf = io.BytesIO()
    if row_id % 7 == 0:
        image.save(buf, "PNG")
        return "png", buf.getvalue()
    image.save(buf, "JPEG", quality=90, comment=str(row_id).encode())
    return "jpg", buf.getvalue()


def _rows(p: int, key: str) -> list[dict]:
    rng = np.random.default_rng(p)
    low, high = TOPS[key]
    rows = []
    for i in range(ROWS):
        row_id = p * 10_000 + i
        if i % 17 == 0:  # a failed decode: no label, no image in the tar
            rows.append({"id": row_id, "key": f"{i:09d}", "error": "decode: OSError"})
            continue
        top1 = rng.uniform(low, high) if p == 0 else rng.choice([low, high])
        probs = np.sort(np.concatenate([[top1], top1 * rng.random(49)]))[::-1].astype(np.float32)
        rows.append(
            {
                "id": row_id,
                "key": f"{i:09d}",
                "imagehash": f"{rng.integers(2**63):016x}",
                "labels": rng.choice(21_841, 50, replace=False).astype(np.int32).tolist(),
                "label_probs": probs.tolist(),
                "width": 8,
                "height": 8,
                "error": None,
            }
        )
    return rows


def _write_downloads(root: Path, key: str, rows: list[dict], shards: int = 3) -> None:
    """The partition's downloaded tars as img2dataset writes them (image, json, txt per sample,
    in key order), split into shards as ``_write_partition`` splits the labels."""
    folder = Path(layout.shards(Storage(str(root)), key))
    folder.mkdir(parents=True, exist_ok=True)
    size = -(-len(rows) // shards)
    for s in range(shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for row in rows[s * size : (s + 1) * size]:
                if row["error"] is not None:
                    continue
                ext, image = _image(row["id"])
                meta = json.dumps({"key": row["key"], "id": row["id"], "status": "success"})
                for name, data in ((ext, image), ("json", meta.encode()), ("txt", b"a caption")):
                    info = tarfile.TarInfo(f"{row['key']}.{name}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def downloaded(tmp_path: Path) -> tuple[Path, list[str]]:
    for p, key in enumerate(TOPS):
        rows = _rows(p, key)
        _write_partition(tmp_path, key, rows)
        _write_downloads(tmp_path, key, rows)
    return tmp_path, list(TOPS)


def _subset(root: Path, instance, keys: list[str], threshold: float) -> None:
    assert _materialize([subset_plan], instance, root, config={"threshold": threshold}).success
    for key in keys:
        assert _materialize([coyo_labeled_300m], instance, root, key).success
    assert _materialize([subset_manifest], instance, root).success


def _wds(root: Path, instance, key: str) -> dict:
    """Materialize the partition's shards; their materialization's metadata."""
    result = _materialize(
        [coyo_labeled_300m_wds], instance, root, key, config={"shard_bytes": SHARD_BYTES}
    )
    assert result.success
    [event] = result.asset_materializations_for_node("coyo_labeled_300m_wds")
    return {k: v.value for k, v in event.metadata.items()}


def _manifest(root: Path, instance) -> tuple[dict, bool]:
    result = _materialize([wds_manifest], instance, root)
    assert result.success
    [check] = result.get_asset_check_evaluations()
    assert check.severity == dg.AssetCheckSeverity.WARN  # a partition without shards: a choice
    return json.loads((root / layout.WDS / ".coyo" / "manifest.json").read_text()), check.passed


def _subset_rows(root: Path, key: str) -> pl.DataFrame:
    return pl.read_parquet(root / layout.SUBSET / f"{key}.parquet")


def _tars(root: Path, key: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / layout.WDS / key).glob("*.tar"))}


def test_shards_read_with_webdataset_and_timm_equal_the_subset(downloaded):
    root, keys = downloaded
    with dg.instance_for_test() as instance:
        _stats(root, instance, keys)
        _subset(root, instance, keys, 0.5)
        figures = {key: _wds(root, instance, key) for key in keys}
        manifest, passed = _manifest(root, instance)
    assert passed and manifest["complete"] and not manifest["problems"]
    subset = {key: _subset_rows(root, key) for key in keys}
    assert all(subset[k].height > 20 for k in keys)  # enough rows to matter
    for key in keys:
        assert figures[key]["samples"] == subset[key].height
        assert figures[key]["shards"] > 2 and figures[key]["shards_written"] > 2  # several
    assert manifest["samples"] == sum(f.height for f in subset.values())

    info = json.loads((root / layout.WDS / "_info.json").read_text())["splits"]["train"]
    urls = [str(root / layout.WDS / name) for name in info["filenames"]]
    assert sorted({name.split("/")[0] for name in info["filenames"]}) == keys
    assert info["num_samples"] == sum(info["shard_lengths"]) == manifest["samples"]

    # the webdataset package: every sample, in the subset's order, its row and its image
    read = list(webdataset.WebDataset(urls, shardshuffle=False, empty_check=False))
    every = pl.concat([subset[k] for k in keys])
    assert [int(s["__key__"]) for s in read] == every["id"].to_list()  # order, no duplicates
    for sample, row in zip(read, every.iter_rows(named=True), strict=True):
        meta = json.loads(sample["json"])
        assert set(meta) == {"id", "url", "imagehash", "labels", "label_probs", "width", "height"}
        assert meta["id"] == row["id"] and meta["url"] == row["url"]
        assert meta["imagehash"] == row["imagehash"]
        assert meta["labels"] == row["labels"]
        assert np.array_equal(  # the float32 the subset holds (written as exact doubles)
            np.asarray(meta["label_probs"], np.float32), np.asarray(row["label_probs"], np.float32)
        )
        assert (meta["width"], meta["height"]) == (row["width"], row["height"])
        assert int(sample["cls"]) == row["labels"][0]
        ext, image = _image(row["id"])
        assert sample[ext] == image  # the bytes as downloaded
        assert not ({"jpg", "png"} - {ext}) & set(sample) and "txt" not in sample  # no caption

    # timm's wds/ reader from _info.json: the images decode, the targets are the top-1 classes
    from timm.data import create_dataset

    dataset = create_dataset("wds/coyo", root=str(root / layout.WDS), split="train")
    assert len(dataset) == every.height
    targets = [target for image, target in dataset]
    assert collections.Counter(targets) == collections.Counter(r[0] for r in every["labels"])


class Died(BaseException):
    """The process dies here (not an error a caller handles)."""


def test_a_run_cut_short_resumes_to_the_same_bytes(downloaded, monkeypatch):
    root, keys = downloaded
    key = keys[0]
    store = Storage(str(root))
    settings = WdsSettings(shard_bytes=SHARD_BYTES)
    with dg.instance_for_test() as instance:
        _stats(root, instance, keys)
        _subset(root, instance, keys, 0.5)
    clean = write_wds(store, key, settings)
    want = _tars(root, key)
    assert len(want) == len(clean.shards) > 3 and clean.written == len(want)
    assert clear_partition(store, key, "coyo_labeled_300m_wds")  # start again from nothing
    assert not _tars(root, key)

    write_json = Storage.write_json

    def dies_recording_the_third(self, url, value):
        if url == layout.wds_progress(store, key) and len(value["shards"]) == 3:
            raise Died  # the third shard is written, not recorded
        return write_json(self, url, value)

    monkeypatch.setattr(Storage, "write_json", dies_recording_the_third)
    with pytest.raises(Died):
        write_wds(store, key, settings)
    monkeypatch.setattr(Storage, "write_json", write_json)
    assert len(_tars(root, key)) == 3  # one more than the progress record holds
    said: list[str] = []
    again = write_wds(store, key, settings, log=said.append)
    assert f"{key}: resuming after shard 2" in said
    assert (again.kept, again.written) == (2, len(want) - 2)
    assert _tars(root, key) == want  # byte for byte, none missing, none extra

    said.clear()
    rerun = write_wds(store, key, settings, log=said.append)
    assert (rerun.kept, rerun.written, said) == (len(want), 0, [])  # complete: nothing done
    assert _tars(root, key) == want

    folder = root / layout.WDS / key  # shards lost or cut short in storage: written again
    (folder / "00001.tar").unlink()
    (folder / "00003.tar").write_bytes(want["00003.tar"][:1000])
    problems = write_wds_manifest(store)["problems"]
    assert f"{key}: shard 00001.tar is missing or changed in storage" in problems
    said.clear()
    repaired = write_wds(store, key, settings, log=said.append)
    assert any("shard 00001.tar is missing or changed" in line for line in said)
    assert (repaired.kept, repaired.written) == (1, len(want) - 1)
    assert _tars(root, key) == want
    assert f"{key}: shard" not in " ".join(write_wds_manifest(store)["problems"])

    smaller = write_wds(store, key, WdsSettings(shard_bytes=SHARD_BYTES // 2))  # other settings
    assert smaller.written == len(smaller.shards) > len(want)
    assert sum(s["samples"] for s in smaller.shards) == clean.samples


def test_a_changed_plan_rewrites_exactly_the_partitions_whose_rows_changed(downloaded):
    root, keys = downloaded
    changes, same, never = keys  # part C (never) has a subset but no shards
    with dg.instance_for_test() as instance:
        _stats(root, instance, keys)
        _subset(root, instance, keys, 0.5)
        first = {key: _wds(root, instance, key) for key in (changes, same)}
        before = {key: _tars(root, key) for key in (changes, same)}
        _, passed = _manifest(root, instance)
        assert not passed  # part C has no shards: the check says so
        rows = {key: _subset_rows(root, key)["id"].to_list() for key in keys}

        # a new plan: the shards of its old subset parts are refused until they are rewritten
        assert _materialize([subset_plan], instance, root, config={"threshold": 0.6}).success
        refused = _materialize(
            [coyo_labeled_300m_wds], instance, root, changes, config={"shard_bytes": SHARD_BYTES}
        )
        assert not refused.success
        [failure] = [e for e in refused.all_events if e.is_step_failure]
        text = failure.step_failure_data.user_failure_data.description
        assert "written under plan" in text and "materialize coyo_labeled_300m" in text

        cursor = dg.evaluate_automation_conditions(defs=_defs(), instance=instance).cursor
        for key in keys:  # with the subset's blocking check, as every way to run it does
            assert _materialize([coyo_labeled_300m, card_schema], instance, root, key).success
        assert _materialize([subset_manifest], instance, root).success
        after = {key: _subset_rows(root, key)["id"].to_list() for key in keys}
        assert after[changes] != rows[changes] and after[same] == rows[same]  # as set up

        manifest, passed = _manifest(root, instance)  # shards of the old subset parts: stale
        assert not passed
        assert f"{changes}: its shards were written from an earlier subset part" in str(manifest)
        assert f"{same}: its shards were written from an earlier subset part" in str(manifest)

        # automation asks for the partitions that have shards, not for part C
        automation = dg.evaluate_automation_conditions(
            defs=_defs(), instance=instance, cursor=cursor
        )
        wanted = automation.get_requested_partitions(dg.AssetKey("coyo_labeled_300m_wds"))
        assert wanted == {changes, same}

        second = {key: _wds(root, instance, key) for key in (changes, same)}
        manifest, passed = _manifest(root, instance)
    assert second[same]["shards_written"] == 0 and _tars(root, same) == before[same]
    assert second[changes]["shards_written"] == second[changes]["shards"] > 0
    assert _tars(root, changes) != before[changes]
    assert second[changes]["samples"] == len(after[changes]) != first[changes]["samples"]
    assert not (root / layout.WDS / never).exists()
    assert [p["partition"] for p in manifest["partitions"]] == [changes, same]
    assert manifest["problems"] == [f"{never}: no webdataset shards"] and not passed


def _defs() -> dg.Definitions:
    from coyo_platform.definitions import defs

    return defs


def test_shards_on_s3_equal_the_folder_and_export_copies_them(downloaded, s3_bucket, capsys):
    root, keys = downloaded
    with dg.instance_for_test() as instance:
        _stats(root, instance, keys)
        _subset(root, instance, keys, 0.5)
    local = Storage(str(root))
    s3 = Storage(f"s3://{s3_bucket}/data")
    s3.fs.put(str(root) + "/", s3.root, recursive=True)  # the same run's output, on S3
    settings = WdsSettings(shard_bytes=SHARD_BYTES)
    for key in keys:
        assert write_wds(s3, key, settings).written > 0
        write_wds(local, key, settings)
    assert write_wds_manifest(s3)["complete"] and write_wds_manifest(local)["complete"]
    for key in keys:
        listed = _keys(s3_bucket, f"data/{layout.WDS}/{key}/")
        assert {name: size for name, size in listed.items() if name.endswith(".tar")} == {
            name: len(data) for name, data in _tars(root, key).items()
        }
        for name, data in _tars(root, key).items():
            assert s3.fs.cat_file(f"{layout.wds(s3, key)}/{name}") == data  # the same bytes

    # export: the subset to one URL, the shards to another, each verified there
    to, wds_to = f"s3://{s3_bucket}/published/coyo", f"s3://{s3_bucket}/published/coyo-wds"
    boto3.client("s3").put_object(
        Bucket=s3_bucket, Key="published/coyo-wds/part-00009/00000.tar", Body=b"stale"
    )
    main(["export", "--to", to, "--wds-to", wds_to, "--data-root", str(root)])
    said = capsys.readouterr().out
    shards = sum(len(_tars(root, key)) for key in keys)
    samples = sum(_subset_rows(root, key).height for key in keys)
    assert (
        f"exported {samples:,} samples" in said
        and f"{shards + 2} files copied, 0 already there and verified, 1 stale files deleted"
        in said
    )
    there = _keys(s3_bucket, "published/coyo-wds/")
    assert sorted(there) == sorted(
        [f"{key}/{name}" for key in keys for name in _tars(root, key)]
        + ["_info.json", ".coyo/manifest.json"]
    )
    main(["export", "--to", to, "--wds-to", wds_to, "--data-root", str(root)])
    assert f"0 files copied, {shards + 2} already there and verified" in capsys.readouterr().out

    # part A's rows change: its shards are rewritten, some at the old size (tars grow in 10 KB
    # records); the export copies every shard that differs, whatever its size
    before = {key: _tars(root, key) for key in keys}
    with dg.instance_for_test() as instance:
        _stats(root, instance, keys)
        _subset(root, instance, keys, 0.6)
    for key in keys:
        write_wds(local, key, settings)
    assert write_wds_manifest(local)["complete"]
    after = {key: _tars(root, key) for key in keys}
    changed = {(k, n) for k in keys for n, data in after[k].items() if before[k].get(n) != data}
    same_size = [(k, n) for k, n in changed if len(before[k].get(n, b"")) == len(after[k][n])]
    assert changed and same_size  # as set up: a rewritten shard of the old size
    main(["export", "--to", to, "--wds-to", wds_to, "--data-root", str(root)])
    said = capsys.readouterr().out
    assert f"{len(changed) + 2} files copied" in said.splitlines()[-1]
    for key in keys:
        for name, data in _tars(root, key).items():
            assert s3.fs.cat_file(f"s3://{s3_bucket}/published/coyo-wds/{key}/{name}") == data

    for wrong in (to, f"{to}/wds"):  # the shards where a parquet loader would read them
        with pytest.raises(SystemExit, match="is --to .* or inside it"):
            main(["export", "--to", to, "--wds-to", wrong, "--data-root", str(root)])
    with pytest.raises(SystemExit, match="is inside --wds-to"):
        main(["export", "--to", f"{wds_to}/x", "--wds-to", wds_to, "--data-root", str(root)])

    clear_partition(local, keys[0], "coyo_labeled_300m_wds")  # shards lacking: refused
    write_wds_manifest(local)
    with pytest.raises(SystemExit, match=f"incomplete .*{keys[0]}: no webdataset shards"):
        main(["export", "--to", to, "--wds-to", wds_to, "--data-root", str(root)])


def test_rows_and_digest_read_the_same_whatever_the_row_groups(tmp_path: Path, monkeypatch):
    """The subset file is read in order from any row (the resume's start) across row groups,
    and the content digest is the same for the same rows in other row groups."""
    import pyarrow.parquet as pq

    from coyo_platform.common.formats import CARD_SCHEMA
    from coyo_platform.sample import wds

    rows = [r for r in _rows(0, "part-00000") if r["error"] is None]
    rows = [{**r, "url": f"http://x/{r['id']}"} for r in rows]
    table = pl.DataFrame([{n: r[n] for n in CARD_SCHEMA.names} for r in rows]).to_arrow()
    table = table.cast(CARD_SCHEMA)
    index = pl.DataFrame({"shard": ["00000"] * len(rows), "id": table["id"].to_pylist()})
    index = index.with_columns(key=pl.col("id").cast(pl.String))
    store = Storage(str(tmp_path))
    digests = set()
    monkeypatch.setattr(wds, "DIGEST_ROWS", 16)
    for group in (7, 16, 1000):
        url = str(tmp_path / f"groups-{group}.parquet")
        pq.write_table(table, url, row_group_size=group)
        with open(url, "rb") as fh:
            reader = wds._Rows(fh, 37)
            got = reader.take(5) + reader.take(len(rows) - 42)
        assert [r["id"] for r in got] == table["id"].to_pylist()[37:]
        assert got[0]["label_probs"] == table["label_probs"][37].as_py()
        digests.add(wds.content_digest(store, url, index))
    assert len(digests) == 1
    changed = index.with_columns(key=pl.col("key") + "x")  # another sample key: other shards
    assert wds.content_digest(store, url, changed) not in digests
