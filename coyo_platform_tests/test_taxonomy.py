"""Label names from timm's files and the is-a hierarchy from a wordnet.is_a.txt, as parquet."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from coyo_platform.assets.label_names import NOT_BUILT, label_names
from coyo_platform.common import labelspace, taxonomy
from coyo_platform.resources import StorageResource

# a small DAG: R is the root; C has two parents; D has a long and a short path up to R
R, A, B, C, D, X = (f"n{i:08d}" for i in range(1, 7))
DAG = [(R, A), (R, B), (A, C), (B, C), (C, D), (R, D), (A, C)]  # (A, C) twice
CLASSES = pl.DataFrame(
    {"label": [0, 1, 2, 3, 4], "wnid": [C, D, A, X, R]}, schema={"label": pl.Int32, "wnid": str}
)


def _timm_synsets() -> list[str]:
    return (
        resources.files("timm.data._info").joinpath("imagenet22k_synsets.txt").read_text().split()
    )


def test_classes_table_is_the_cards_label_space():
    classes = taxonomy.classes_table()
    assert classes.height == 21_841
    assert classes.schema == {
        "label": pl.Int32,
        "wnid": pl.String,
        "name": pl.String,
        "lemmas": pl.String,
        "definition": pl.String,
    }
    assert classes["label"].to_list() == list(range(21_841))
    assert classes["wnid"].n_unique() == 21_841
    assert classes["wnid"].to_list() == _timm_synsets()
    assert classes["name"].to_list() == labelspace.class_names()
    lamp = classes.row(11054, named=True)
    assert lamp["name"] == "table lamp"
    assert lamp["wnid"] == _timm_synsets()[11054] == "n04380533"
    assert lamp["definition"] == "a lamp that sits on a table"
    assert classes.row(0, named=True)["lemmas"] == "organism, being"


def test_parse_is_a_skips_blank_and_comment_lines():
    text = f"# parent child\n\n{R} {A}\n  {A}\t{C}  \r\n"
    assert taxonomy.parse_is_a(text) == [(R, A), (A, C)]


@pytest.mark.parametrize(
    "bad", [f"{R} {A} {B}", R, f"{R} x00000002", f"{R} n123", f"{R},{A}", f"N00000001 {A}"]
)
def test_parse_is_a_names_the_malformed_line(bad: str):
    with pytest.raises(ValueError, match=r"line 3\b") as info:
        taxonomy.parse_is_a(f"{R} {A}\n# ok\n{bad}\n{A} {C}\n")
    assert repr(bad) in str(info.value)


def test_hierarchy_of_a_small_dag():
    table = taxonomy.hierarchy_table(DAG, CLASSES)
    assert table.schema == {
        "label": pl.Int32,
        "wnid": pl.String,
        "parents": pl.List(pl.String),
        "ancestors": pl.List(pl.String),
        "depth": pl.Int32,
        "parent_labels": pl.List(pl.Int32),
    }
    assert table.to_dicts() == [
        {"label": 0, "wnid": C, "parents": [A, B], "ancestors": [R, A, B], "depth": 2,
         "parent_labels": [2]},
        {"label": 1, "wnid": D, "parents": [R, C], "ancestors": [R, A, B, C], "depth": 3,
         "parent_labels": [0, 4]},
        {"label": 2, "wnid": A, "parents": [R], "ancestors": [R], "depth": 1,
         "parent_labels": [4]},
        {"label": 3, "wnid": X, "parents": [], "ancestors": [], "depth": None,
         "parent_labels": []},
        {"label": 4, "wnid": R, "parents": [], "ancestors": [], "depth": None,
         "parent_labels": []},
    ]  # fmt: skip
    assert taxonomy.hierarchy_summary(DAG, table) == {
        "pairs": 6,
        "wnids_in_file": 5,
        "roots": 1,
        "classes_with_parent": 3,
        "classes_without_parent": 2,
        "classes_missing_from_file": 1,
        "max_depth": 3,
    }


@pytest.mark.parametrize(
    "pairs",
    [
        [(R, A), (A, B), (B, C), (C, A)],  # A -> B -> C -> A, below a root
        [(R, A), (A, A)],  # a self loop
        [(R, A), (E := "n00000099", F := "n00000098"), (F, E)],  # above no class at all
    ],
)
def test_hierarchy_cycle_is_an_error(pairs):
    cycle = {w for p in pairs for w in p} - {R}
    with pytest.raises(ValueError, match="cycle through") as info:
        taxonomy.hierarchy_table(pairs, CLASSES)
    named = str(info.value).split("cycle through ")[1].split(":")[0]
    assert named in cycle


def test_hierarchy_is_deep_and_large_without_trouble():
    # a chain deeper than Python's recursion limit
    chain = [f"n{i:08d}" for i in range(1500)]
    classes = pl.DataFrame({"label": range(1500), "wnid": chain}, schema=CLASSES.schema)
    table = taxonomy.hierarchy_table(list(zip(chain[:-1], chain[1:], strict=True)), classes)
    assert table["depth"][-1] == 1499 and len(table["ancestors"][-1]) == 1499
    # wordnet.is_a.txt's size: 75k pairs, every node below a 4-way tree, half with a 2nd parent
    nodes = [f"n{i:08d}" for i in range(60_001)]
    pairs = [(nodes[(i - 1) // 4], nodes[i]) for i in range(1, 60_001)]
    pairs += [(nodes[(i - 1) // 4 - 1], nodes[i]) for i in range(5, 60_001, 4)]
    pairs += [(nodes[(i - 1) // 4 - 2], nodes[i]) for i in range(10, 60_001, 4)]
    classes = pl.DataFrame({"label": range(21_841), "wnid": nodes[-21_841:]}, CLASSES.schema)
    table = taxonomy.hierarchy_table(pairs, classes)
    assert len(pairs) > 75_000 and table["depth"].null_count() == 0


def _lamp_is_a(tmp_path: Path) -> tuple[Path, list[str]]:
    """The real WordNet chain above "table lamp": source of illumination > lamp > table lamp."""
    names = labelspace.class_names()
    assert (names[10576], names[8087], names[11054]) == ("source of illumination", "lamp",
                                                          "table lamp")  # fmt: skip
    w = _timm_synsets()
    path = tmp_path / "wordnet.is_a.txt"
    path.write_text(f"{w[10576]} {w[8087]}\n{w[8087]} {w[11054]}\n")
    return path, w


def _materialize(root: Path, is_a_file: str | None = None, **kwargs):
    config = {"is_a_file": is_a_file} if is_a_file else {}
    return dg.materialize(
        [label_names],
        resources={"storage": StorageResource(root=str(root))},
        run_config={"ops": {"label_names": {"config": config}}},
        **kwargs,
    )


def test_asset_writes_classes_and_hierarchy(tmp_path: Path):
    is_a, w = _lamp_is_a(tmp_path)
    result = _materialize(tmp_path / "data", str(is_a))
    assert result.success
    classes = pl.read_parquet(tmp_path / "data" / "taxonomy" / "classes.parquet")
    assert classes.equals(taxonomy.classes_table())
    hierarchy = pl.read_parquet(tmp_path / "data" / "taxonomy" / "hierarchy.parquet")
    assert hierarchy.height == 21_841 and hierarchy["wnid"].to_list() == w
    assert hierarchy.row(11054, named=True) == {
        "label": 11054,
        "wnid": w[11054],
        "parents": [w[8087]],
        "ancestors": sorted([w[8087], w[10576]]),
        "depth": 2,
        "parent_labels": [8087],
    }
    assert hierarchy.row(10576, named=True)["depth"] is None
    assert hierarchy["depth"].null_count() == 21_841 - 2
    [mat] = result.asset_materializations_for_node("label_names")
    meta = {k: v.value for k, v in mat.metadata.items()}
    assert meta["classes"] == 21_841
    first = meta["preview"].records[0].data
    assert (first["label"], first["wnid"], first["name"]) == (0, "n00004475", "organism")
    assert (meta["classes_with_parent"], meta["roots"], meta["max_depth"]) == (2, 1, 2)
    assert meta["classes_missing_from_file"] == 21_841 - 3
    assert meta["hierarchy_path"].endswith("taxonomy/hierarchy.parquet")
    assert "hierarchy" not in meta


def test_asset_without_is_a_file_writes_classes_only(tmp_path: Path):
    result = _materialize(tmp_path)
    assert result.success
    assert sorted(p.name for p in (tmp_path / "taxonomy").iterdir()) == ["classes.parquet"]
    assert pl.read_parquet(tmp_path / "taxonomy" / "classes.parquet").height == 21_841
    [mat] = result.asset_materializations_for_node("label_names")
    assert mat.metadata["hierarchy"].value == NOT_BUILT
    assert "hierarchy_path" not in mat.metadata


@pytest.mark.parametrize("content", [None, "n00000001 n00000002 n00000003\n", "n1 n2\n"])
def test_asset_bad_is_a_file_fails_unretried_and_writes_nothing(tmp_path: Path, content):
    path = tmp_path / "wordnet.is_a.txt"
    if content is not None:
        path.write_text(content)
    with pytest.raises(dg.Failure) as info:
        _materialize(tmp_path / "data", str(path))
    assert str(path) in info.value.description
    assert ("not found" in info.value.description) == (content is None)
    assert info.value.allow_retries is False
    assert not (tmp_path / "data").exists()
