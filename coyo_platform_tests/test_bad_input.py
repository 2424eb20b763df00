"""Bad input fails before any expensive work, with a message naming the problem: a bad source
part fails its partition naming the file (and the column), and nothing is written to storage; a
label setting the label program cannot use (an unknown model, a checkpoint with the wrong number
of classes) fails in Dagster before the program starts, or in the program before it reads a
shard."""

from __future__ import annotations

import subprocess
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from coyo_platform import demo
from coyo_platform.assets.coyo700m_metadata import coyo700m_metadata
from coyo_platform.assets.label_stats import label_stats
from coyo_platform.assets.labeled_shards import labeled_shards
from coyo_platform.assets.subset_plan import subset_plan
from coyo_platform.definitions import local_resources
from coyo_platform.resources import ComputeResource
from coyo_platform_tests.conftest import label_cmd, write_tar

PART_FILE = "part-00000-17da4908-939c-46e5-91d0-15f256041956-c000.snappy.parquet"


def failure_text(result: dg.ExecuteInProcessResult) -> str:
    """The step failure's message with its causes, as the UI and the CLI show them."""
    [failure] = [e for e in result.all_events if e.is_step_failure]
    error, text = failure.step_failure_data.error, ""
    while error is not None:
        text += error.message
        error = error.cause
    return text


def materialize_metadata(source: Path, root: Path, part: str) -> dg.ExecuteInProcessResult:
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("coyo_parts", [part])
        return dg.materialize(
            [coyo700m_metadata],
            partition_key=part,
            instance=instance,
            resources=local_resources(source=str(source), data_root=str(root)),
            raise_on_error=False,
        )


def _good(source: Path) -> pl.DataFrame:
    return pl.read_parquet(next(source.glob("part-00000-*.parquet")))


def _missing_column(source: Path) -> list[str]:
    frame = _good(source).drop("image_phash")
    frame.write_parquet(source / PART_FILE)
    return ["missing COYO-700M column", "'image_phash'"]


def _wrong_type(source: Path) -> list[str]:
    _good(source).with_columns(pl.col("width").cast(pl.String)).write_parquet(source / PART_FILE)
    return ["column 'width'", "expected Int32 or Int64"]


def _empty(source: Path) -> list[str]:
    _good(source).head(0).write_parquet(source / PART_FILE)
    return ["has no rows"]


def _corrupt(source: Path) -> list[str]:
    (source / PART_FILE).write_bytes(b"PAR1 this is not a parquet file at all")
    return ["cannot be read as parquet"]


def _duplicate_ids(source: Path) -> list[str]:
    frame = _good(source)
    pl.concat([frame, frame.head(2)]).write_parquet(source / PART_FILE)
    return ["column 'id'", "duplicated"]


def _null_urls(source: Path) -> list[str]:
    frame = _good(source)
    ids = frame["id"]
    frame.with_columns(
        pl.when(pl.col("id").is_in([ids[3], ids[10]])).then(None).otherwise("url").alias("url")
    ).write_parquet(source / PART_FILE)
    return ["column 'url' has 2 null or empty value(s)", f"e.g. id {ids[3]}"]


@pytest.mark.parametrize(
    "make_bad", [_missing_column, _wrong_type, _empty, _corrupt, _duplicate_ids, _null_urls]
)
def test_bad_part_fails_clearly_and_writes_nothing(make_bad, source: Path, tmp_path: Path):
    expected = make_bad(source)
    root = tmp_path / "data"
    result = materialize_metadata(source, root, "part-00000")
    assert not result.success
    message = failure_text(result)
    assert PART_FILE in message
    for fragment in expected:
        assert fragment in message
    assert not root.exists() or not any(p.is_file() for p in root.rglob("*"))


def test_unknown_part_names_what_exists(source: Path, tmp_path: Path):
    result = materialize_metadata(source, tmp_path / "d", "part-00042")
    message = failure_text(result)
    assert "no part 'part-00042'" in message and "part-00000" in message


# -- the label settings --------------------------------------------------------------------------

TYPO = "tf_efficientnetv2_xxl"
UNKNOWN = f"unknown model '{TYPO}'"


def one_shard(site, folder: Path) -> Path:
    """A shards folder with one small webdataset tar of real photos."""
    shards = folder / "shards"
    shards.mkdir()
    photos = sorted(site.images.glob("*.jpg"))[:3]
    write_tar(
        shards / "00000.tar",
        [(f"{i:09d}", p.read_bytes(), {"id": i}) for i, p in enumerate(photos)],
    )
    return shards


def run_label(
    shards: Path, out: Path, checkpoint: Path, model: str = demo.DEMO_MODEL
) -> subprocess.CompletedProcess:
    """The label program as the asset starts it (without Pipes)."""
    command = label_cmd(shards, out, checkpoint, "--num-workers", "0", "--model", model)
    return subprocess.run(command, capture_output=True, text=True)


def test_checkpoint_with_the_wrong_class_count_fails_the_label_program_before_any_shard(
    site, tmp_path: Path
):
    import timm
    import torch

    in1k = tmp_path / "in1k.pth"
    torch.save(timm.create_model(demo.DEMO_MODEL, num_classes=1000).state_dict(), in1k)
    out = tmp_path / "out"
    done = run_label(one_shard(site, tmp_path), out, in1k)
    assert done.returncode != 0
    assert (
        f"checkpoint {in1k} does not fit {demo.DEMO_MODEL} with 21843 outputs: its classifier "
        "(classifier.weight) has 1,000 outputs; labeling needs 21,843"
    ) in done.stderr, done.stderr[-3000:]
    assert not out.exists() or not list(out.rglob("*.parquet"))


def test_unknown_model_fails_the_label_program_before_it_loads_anything(site, tmp_path: Path):
    done = run_label(one_shard(site, tmp_path), tmp_path / "out", site.checkpoint, TYPO)
    assert done.returncode != 0
    assert UNKNOWN in done.stderr, done.stderr[-3000:]
    assert "closest: tf_efficientnetv2_xl" in done.stderr
    assert "labeling" not in done.stderr  # failed on its settings, before the run began
    assert not (tmp_path / "out").exists()


class NeverRun(ComputeResource):
    """A compute seam that fails the test if a program is started."""

    def run_program(self, context, program, args, env=None):
        raise AssertionError(f"{program} was started: {args}")


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"model": TYPO}, [UNKNOWN, "closest: tf_efficientnetv2_xl"]),
        ({"model": "tf_efficientnetv2_xl.in21"}, ["no pretrained tag 'in21'", ".in21k"]),
        ({"preset": "jft"}, ["unknown preset 'jft'"]),
        ({"activation": "relu"}, ["activation must be one of"]),
        ({"batch_size": 0}, ["batch_size must be >= 1"]),
    ],
    ids=["unknown model", "unknown tag", "preset", "activation", "batch size"],
)
def test_bad_label_settings_fail_the_asset_before_the_label_program_starts(
    config, expected, tmp_path: Path
):
    """No shards exist either: the settings are checked first, and the step is not retried."""
    resources = {**local_resources(data_root=str(tmp_path / "data")), "compute": NeverRun()}
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("coyo_parts", ["part-00000"])
        result = dg.materialize(
            [labeled_shards],
            partition_key="part-00000",
            instance=instance,
            resources=resources,
            run_config={"ops": {"labeled_shards": {"config": config}}},
            raise_on_error=False,
        )
    assert not result.success
    message = failure_text(result)
    assert "labeled_shards: bad settings" in message
    for fragment in expected:
        assert fragment in message
    assert not [
        e
        for e in result.all_events
        if e.event_type_value in ("STEP_UP_FOR_RETRY", "STEP_RESTARTED")
    ]


@pytest.mark.parametrize(
    ("asset", "config", "expected"),
    [
        (label_stats, {"thresholds": [0.1, 1.5]}, "thresholds must be in [0, 1], got 1.5"),
        (label_stats, {"thresholds": []}, "give at least one threshold"),
        (label_stats, {"thresholds": [0.2, 0.2]}, "thresholds repeat"),
        (subset_plan, {"threshold": 1.5}, "threshold must be in [0, 1], got 1.5"),
        (subset_plan, {"threshold": -0.1}, "threshold must be in [0, 1], got -0.1"),
        (subset_plan, {"target_fraction": 0.0}, "target_fraction must be in (0, 1]"),
        (subset_plan, {"class_cap": 0}, "class_cap must be >= 1"),
    ],
    ids=["stats >1", "stats none", "stats repeat", "plan >1", "plan <0", "fraction", "cap"],
)
def test_bad_thresholds_fail_before_anything_is_read(asset, config, expected, tmp_path: Path):
    """Storage is empty: a check made after the first read would fail on the missing labels."""
    root = tmp_path / "data"
    partitioned = asset.partitions_def is not None
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("coyo_parts", ["part-00000"])
        result = dg.materialize(
            [asset],
            partition_key="part-00000" if partitioned else None,
            instance=instance,
            resources=local_resources(data_root=str(root)),
            run_config={"ops": {asset.key.path[-1]: {"config": config}}},
            raise_on_error=False,
        )
    assert not result.success
    assert expected in failure_text(result)
    assert not root.exists() or not any(p.is_file() for p in root.rglob("*"))
    assert not [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
