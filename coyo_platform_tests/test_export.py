"""Publishing: `coyo-platform export --to URL` copies the subset, its card and manifest to S3
(moto's server on loopback) or a folder, verified there; a rerun copies only what differs, an
earlier export's extra parts are deleted, and an incomplete subset is refused."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import dagster as dg
import polars as pl
import pytest

from coyo_platform.assets.coyo_labeled_300m import coyo_labeled_300m
from coyo_platform.assets.label_stats import label_stats
from coyo_platform.assets.label_stats_rollup import label_stats_rollup
from coyo_platform.assets.subset_manifest import subset_manifest
from coyo_platform.assets.subset_plan import subset_plan
from coyo_platform.cli import main
from coyo_platform_tests.test_sampling import _materialize, dataset  # noqa: F401 (a fixture)


def _stats(root: Path, instance, keys: list[str]) -> None:
    instance.add_dynamic_partitions("coyo_parts", keys)
    for key in keys:
        assert _materialize([label_stats], instance, root, key).success
    assert _materialize([label_stats_rollup], instance, root).success


def _subset(root: Path, parts: list[str], instance, threshold: float) -> None:
    assert _materialize([subset_plan], instance, root, config={"threshold": threshold}).success
    for key in parts:
        assert _materialize([coyo_labeled_300m], instance, root, key).success
    assert _materialize([subset_manifest], instance, root).success


def _keys(bucket: str, prefix: str) -> dict[str, int]:
    s3 = boto3.client("s3")
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {o["Key"].removeprefix(prefix): o["Size"] for o in listed}


def test_export_to_s3_copies_verifies_and_resumes(dataset, s3_bucket, capsys):  # noqa: F811
    root, parts = dataset
    keys = sorted(parts)
    with dg.instance_for_test() as instance:
        _stats(root, instance, keys)
        _subset(root, keys[:2], instance, 0.5)  # part-00002 has no subset yet

        to = f"s3://{s3_bucket}/published/coyo"
        with pytest.raises(SystemExit, match="incomplete .*part-00002: planned, no subset file"):
            main(["export", "--to", to, "--data-root", str(root)])
        assert not _keys(s3_bucket, "published/")  # nothing copied

        _subset(root, keys, instance, 0.5)
        main(["export", "--to", to, "--data-root", str(root)])
        said = capsys.readouterr().out
        folder = root / "coyo_labeled_300m"
        local = {
            str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()
        }
        assert _keys(s3_bucket, "published/coyo/") == local  # every file, same sizes
        assert {"README.md", ".coyo/manifest.json", ".coyo/top1.png"} <= set(local)
        written = pl.read_parquet(folder / "*.parquet").sort("id")
        exported = pl.read_parquet(f"{to}/*.parquet").sort("id")
        assert exported.equals(written)
        assert f"exported {written.height:,} rows" in said and "0 already there" in said

        # again: nothing to copy; a stale part of an earlier export goes; a damaged file is
        # copied again, alone
        s3 = boto3.client("s3")
        s3.put_object(Bucket=s3_bucket, Key="published/coyo/part-00099.parquet", Body=b"old")
        s3.put_object(Bucket=s3_bucket, Key="published/coyo/part-00001.parquet", Body=b"torn")
        main(["export", "--to", to, "--data-root", str(root)])
        said = capsys.readouterr().out
        assert "copied part-00001.parquet" in said and said.count("copied ") == 1, said
        assert "1 stale files deleted" in said
        assert _keys(s3_bucket, "published/coyo/") == local

        # a new plan: the parts it changed are copied, the card and manifest follow
        _subset(root, keys, instance, 0.8)
        main(["export", "--to", to, "--data-root", str(root)])
        capsys.readouterr()
        exported = pl.read_parquet(f"{to}/*.parquet").sort("id")
        assert exported.equals(pl.read_parquet(folder / "*.parquet").sort("id"))
        assert exported["label_probs"].list.first().min() >= 0.8
        manifest = json.loads(
            s3.get_object(Bucket=s3_bucket, Key="published/coyo/.coyo/manifest.json")["Body"].read()
        )
        assert manifest["threshold"] == 0.8 and manifest["complete"]


def test_export_to_a_folder_loads_as_the_subset(dataset, tmp_path: Path, capsys):  # noqa: F811
    root, parts = dataset
    keys = sorted(parts)
    with dg.instance_for_test() as instance:
        _stats(root, instance, keys)
        _subset(root, keys, instance, 0.3)
    dest = tmp_path / "published"
    main(["export", "--to", str(dest), "--data-root", str(root)])
    folder = root / "coyo_labeled_300m"
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == files
    assert f"{len(files)} files copied" in capsys.readouterr().out
    got = pl.read_parquet(dest / "*.parquet").sort("id")
    assert got.equals(pl.read_parquet(root / "coyo_labeled_300m" / "*.parquet").sort("id"))
    assert (dest / "README.md").read_text().startswith("---\n")
    assert not list(dest.glob("*.tmp-*"))
