"""Bad source parts fail their partition with a message naming the file (and the column), and
nothing is written to storage."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from coyo_platform.assets.coyo700m_metadata import coyo700m_metadata
from coyo_platform.definitions import local_resources

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


@pytest.mark.parametrize(
    "make_bad", [_missing_column, _wrong_type, _empty, _corrupt, _duplicate_ids]
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
