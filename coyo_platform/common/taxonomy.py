"""The card's 21,841 classes as tables: names from timm's bundled files, and the WordNet is-a
hierarchy from a user-provided ``wordnet.is_a.txt``. Never a pickle.

The dataset card ships the hierarchy as ``imagenet21k_tree.pickle``; loading a pickle runs
whatever code it holds, so the platform does not. What is available offline, in timm's package
data (``timm.data._info``):

* ``imagenet22k_synsets.txt``: the 21,841 fall11 WordNet ids; line ``i`` is the card's label ``i``;
* ``imagenet_synset_to_lemma.txt`` and ``imagenet_synset_to_definition.txt``: wnid, a tab, then
  the synset's lemmas ("table lamp") or its WordNet gloss.

What is not: any is-a (parent/child) relation. timm ships none, and nltk's WordNet is not
installed. So the hierarchy comes from a file in the format image-net.org published alongside
fall11, ``wordnet.is_a.txt``: one ``parent_wnid child_wnid`` pair per line (about 75k lines).
WordNet's is-a graph is a DAG: a synset can have several parents.

Imports only the standard library, fsspec, polars and the label space (no dagster, no torch).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import fsspec
import polars as pl

from coyo_platform.common import layout
from coyo_platform.common.labelspace import NUM_CLASSES, class_names, timm_info_lines
from coyo_platform.common.storage import Storage
from coyo_platform.common.tables import Table

_WNID = re.compile(r"n\d{8}")


def _tab_map(name: str) -> dict[str, str]:
    """``wnid -> text`` from one of timm's tab-separated synset files (empty text dropped)."""
    out: dict[str, str] = {}
    for line in timm_info_lines(name):
        wnid, _, text = line.partition("\t")
        if text.strip():
            out[wnid.strip()] = text.strip()
    return out


def classes_table() -> pl.DataFrame:
    """One row per card class, in label order: ``label`` (int32, 0..21840), ``wnid``, ``name``
    (the first lemma, as ``labelspace.class_names()``), ``lemmas`` (the whole lemma line) and
    ``definition`` (WordNet's gloss, null where timm has none)."""
    wnids = timm_info_lines("imagenet22k_synsets.txt")
    names = class_names()  # checks the 21,841 lines
    lemmas, glosses = (
        _tab_map("imagenet_synset_to_lemma.txt"),
        _tab_map("imagenet_synset_to_definition.txt"),
    )
    return pl.DataFrame(
        {
            "label": range(NUM_CLASSES),
            "wnid": wnids,
            "name": names,
            "lemmas": [lemmas.get(w, w) for w in wnids],
            "definition": [glosses.get(w) for w in wnids],
        },
        schema={
            "label": pl.Int32,
            "wnid": pl.String,
            "name": pl.String,
            "lemmas": pl.String,
            "definition": pl.String,
        },
    )


def parse_is_a(text: str) -> list[tuple[str, str]]:
    """``(parent_wnid, child_wnid)`` pairs from ``wordnet.is_a.txt``-style text, in file order.
    Blank lines and lines starting with ``#`` are skipped; any other line must be exactly two
    whitespace-separated WordNet ids (``n`` and 8 digits), else ValueError names the line."""
    pairs: list[tuple[str, str]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        tokens = stripped.split()
        if len(tokens) != 2 or not all(_WNID.fullmatch(t) for t in tokens):
            raise ValueError(
                f"is-a file line {number}: expected 'parent_wnid child_wnid' "
                f"(two ids like n00004475), got {line!r}"
            )
        pairs.append((tokens[0], tokens[1]))
    return pairs


def _parents(pairs: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """``child -> sorted distinct parents``."""
    parents: dict[str, set[str]] = {}
    for parent, child in pairs:
        parents.setdefault(child, set()).add(parent)
    return {child: sorted(ps) for child, ps in parents.items()}


def _walk(
    parents: dict[str, list[str]], starts: Iterable[str]
) -> tuple[dict[str, frozenset[str]], dict[str, int]]:
    """All ancestors and the longest path to a root (0 for a root) of each of ``starts`` and every
    wnid above them: one iterative depth-first walk (no recursion limit), each wnid settled once
    and its ancestors built from its parents' (memoized). A cycle raises ValueError naming the
    wnids on it."""
    ancestors: dict[str, frozenset[str]] = {}
    depth: dict[str, int] = {}
    for start in starts:
        if start in ancestors:
            continue
        on_path = {start: 0}  # wnid -> position on the current path, for cycle reports
        stack = [(start, iter(parents.get(start, ())))]
        while stack:
            node, todo = stack[-1]
            for parent in todo:
                if parent in on_path:
                    cycle = [n for n, _ in stack[on_path[parent] :]] + [parent]
                    raise ValueError(
                        f"is-a relations have a cycle through {parent}: {' -> '.join(cycle)} "
                        "(each is a parent of the one before)"
                    )
                if parent not in ancestors:
                    on_path[parent] = len(stack)
                    stack.append((parent, iter(parents.get(parent, ()))))
                    break
            else:
                stack.pop()
                del on_path[node]
                ps = parents.get(node, ())
                found = set(ps)
                for p in ps:
                    found |= ancestors[p]
                ancestors[node] = frozenset(found)
                depth[node] = max((depth[p] + 1 for p in ps), default=0)
    return ancestors, depth


def hierarchy_table(pairs: Iterable[tuple[str, str]], classes: pl.DataFrame) -> pl.DataFrame:
    """One row per row of ``classes`` (needs ``label`` and ``wnid``), in its order: ``parents``
    (sorted parent wnids), ``ancestors`` (every ancestor, distinct, sorted), ``depth`` (int32: the
    longest path up to a root; null for a class with no parent in ``pairs``) and ``parent_labels``
    (int32, ascending: the parents that are themselves card classes). ValueError on a cycle
    anywhere in ``pairs``."""
    parents = _parents(pairs)
    wnids = classes["wnid"].to_list()
    label_of = dict(zip(wnids, classes["label"].to_list(), strict=True))
    # every wnid in the file, not only the classes: any cycle means it is no is-a graph
    ancestors, depth = _walk(parents, [*wnids, *parents])
    rows_parents = [parents.get(w, []) for w in wnids]
    return pl.DataFrame(
        {
            "label": classes["label"],
            "wnid": wnids,
            "parents": rows_parents,
            "ancestors": [sorted(ancestors[w]) for w in wnids],
            "depth": [depth[w] if parents.get(w) else None for w in wnids],
            "parent_labels": [
                sorted(label_of[p] for p in ps if p in label_of) for ps in rows_parents
            ],
        },
        schema={
            "label": pl.Int32,
            "wnid": pl.String,
            "parents": pl.List(pl.String),
            "ancestors": pl.List(pl.String),
            "depth": pl.Int32,
            "parent_labels": pl.List(pl.Int32),
        },
    )


def hierarchy_summary(pairs: list[tuple[str, str]], hierarchy: pl.DataFrame) -> dict[str, int]:
    """Figures for metadata: the file's distinct pairs, wnids and roots (wnids that are never a
    child), and how many card classes have a parent there, have none (a root or absent), or do
    not appear in the file at all, plus the deepest class's depth."""
    distinct = set(pairs)
    children = {c for _, c in distinct}
    in_file = children | {p for p, _ in distinct}
    wnids = hierarchy["wnid"].to_list()
    with_parent = sum(w in children for w in wnids)
    return {
        "pairs": len(distinct),
        "wnids_in_file": len(in_file),
        "roots": len(in_file - children),
        "classes_with_parent": with_parent,
        "classes_without_parent": len(wnids) - with_parent,
        "classes_missing_from_file": sum(w not in in_file for w in wnids),
        "max_depth": int(hierarchy["depth"].max() or 0),
    }


def preview_table(classes: pl.DataFrame, n: int = 5) -> Table:
    """The first ``n`` classes, for metadata."""
    columns = {"label": "int", "wnid": "string", "name": "string", "definition": "string"}
    rows = classes.head(n).select(list(columns)).to_dicts()
    return Table(columns, [{**r, "definition": r["definition"] or ""} for r in rows])


def read_text(store: Storage, path: str) -> str:
    """A user's file (local path or any fsspec URL), through the storage root's filesystem (and
    endpoint) when it shares its protocol. ``FileNotFoundError`` when it is not there."""
    same = fsspec.utils.get_protocol(path) == fsspec.utils.get_protocol(store.root)
    fs = store.fs if same else fsspec.core.url_to_fs(path)[0]
    if not fs.exists(path):
        raise FileNotFoundError(f"is_a_file not found: {path}")
    with fs.open(path, "rb") as fh:
        return fh.read().decode()


@dataclass
class Written:
    classes: pl.DataFrame
    classes_url: str
    pairs: list[tuple[str, str]] | None = None
    hierarchy: pl.DataFrame | None = None
    hierarchy_url: str | None = None


def write_tables(store: Storage, is_a_file: str | None) -> Written:
    """``taxonomy/classes.parquet`` always; ``taxonomy/hierarchy.parquet`` from ``is_a_file``.
    Nothing is written when the file is missing (``FileNotFoundError``), malformed or cyclic
    (``ValueError``)."""
    classes = classes_table()
    written = Written(classes, layout.taxonomy(store, "classes"))
    if is_a_file:
        written.pairs = parse_is_a(read_text(store, is_a_file))
        written.hierarchy = hierarchy_table(written.pairs, classes)
        written.hierarchy_url = layout.taxonomy(store, "hierarchy")
    store.write_parquet(written.classes_url, classes.to_arrow())
    if written.hierarchy is not None:
        store.write_parquet(written.hierarchy_url, written.hierarchy.to_arrow())
    return written
