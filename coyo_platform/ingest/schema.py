"""COYO-700M's input schema: the 17 columns a source part must have, and their checks.

Source: kakaobrain/coyo-dataset README ("Meta-Attributes"), see ``../shared/reference/FACTS.md``
section 1. The output's schema (the card's) is ``common/formats.py``'s ``CARD_SCHEMA``.
"""

from __future__ import annotations

import polars as pl

INT = "int"
FLOAT = "float"
STR = "string"

#: COYO-700M's 17 columns, in the published order. Physical parquet types are not published, so
#: int32/int64 and float32/float64 are both accepted and normalized to the 64-bit type.
COYO700M_COLUMNS: dict[str, str] = {
    "id": INT,
    "url": STR,
    "text": STR,
    "width": INT,
    "height": INT,
    "image_phash": STR,
    "text_length": INT,
    "word_count": INT,
    "num_tokens_bert": INT,
    "num_tokens_gpt": INT,
    "num_faces": INT,
    "clip_similarity_vitb32": FLOAT,
    "clip_similarity_vitl14": FLOAT,
    "nsfw_score_opennsfw2": FLOAT,
    "nsfw_score_gantman": FLOAT,
    "watermark_score": FLOAT,
    "aesthetic_score_laion_v2": FLOAT,
}

_ACCEPTED: dict[str, tuple[type[pl.DataType], ...]] = {
    INT: (pl.Int32, pl.Int64),
    FLOAT: (pl.Float32, pl.Float64),
    STR: (pl.String,),
}
_CANONICAL: dict[str, pl.DataType] = {INT: pl.Int64(), FLOAT: pl.Float64(), STR: pl.String()}


class BadPartError(ValueError):
    """A source part that cannot be used; the message names the file and what is wrong."""


def check_coyo700m_schema(schema: pl.Schema, source_name: str) -> None:
    """Raise :class:`BadPartError` unless ``schema`` has all 17 COYO-700M columns in usable types.

    Args:
        schema: the part's schema as polars reads it.
        source_name: the file's path or URL, quoted in the error.
    """
    missing = [c for c in COYO700M_COLUMNS if c not in schema]
    if missing:
        raise BadPartError(
            f"{source_name}: missing COYO-700M column(s) {', '.join(repr(c) for c in missing)}; "
            f"a part needs all 17: {', '.join(COYO700M_COLUMNS)}"
        )
    for name, kind in COYO700M_COLUMNS.items():
        dtype = schema[name]
        if not isinstance(dtype, _ACCEPTED[kind]):
            accepted = " or ".join(t.__name__ for t in _ACCEPTED[kind])
            raise BadPartError(
                f"{source_name}: column {name!r} has type {dtype}, expected {accepted}"
            )


def normalize_coyo700m(frame: pl.LazyFrame) -> pl.LazyFrame:
    """The 17 columns in published order with 64-bit types; extra columns are dropped."""
    return frame.select(
        pl.col(name).cast(_CANONICAL[kind]) for name, kind in COYO700M_COLUMNS.items()
    )
