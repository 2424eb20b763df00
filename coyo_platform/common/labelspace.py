"""The card's label space: 21,841 ImageNet-21k (fall11) classes, not the model's 21,843 outputs.

timm's ``tf_efficientnetv2_xl.in21k`` emits 21,843 logits in Google's ImageNet-21k ordering. The
card's indices are in the 21,841-class fall11 ordering (``imagenet22k_synsets.txt``): index 11054 is
"table lamp" there. timm ships the mapping as ``imagenet21k_goog_to_22k_indices.txt``: line ``i``
gives the position, among the 21,843 outputs, of fall11 class ``i``. Outputs 9205 ("picture, image,
icon") and 15027 ("bleacher") have no fall11 class and are dropped. So: select those 21,841
outputs in fall11 order, then take the top 50.

Imports only numpy and reads timm's data files without importing timm (which imports torch:
4.8-9.1 s and an 877 MB peak in every stats process on the 2-core Xeon, found by
``benchmarks/scale_stages.py``), and no dagster,
so the stats assets can name classes cheaply.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np

NUM_MODEL_OUTPUTS = 21_843
NUM_CLASSES = 21_841


@functools.cache
def _timm_info() -> Path:
    """timm's ``data/_info`` folder, found without importing timm (its ``__init__`` imports
    torch)."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("timm is not installed: its label files name the classes")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "_info"


def timm_info_lines(name: str) -> list[str]:
    """The non-blank lines of one of timm's bundled label files (``timm.data._info``)."""
    text = (_timm_info() / name).read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


@functools.cache
def goog_to_fall11() -> np.ndarray:
    """int64 array of length 21,841: entry ``i`` is the model output that is fall11 class ``i``."""
    index = np.array([int(x) for x in timm_info_lines("imagenet21k_goog_to_22k_indices.txt")])
    if index.shape != (NUM_CLASSES,) or index.max() >= NUM_MODEL_OUTPUTS:
        raise RuntimeError("timm's imagenet21k_goog_to_22k_indices.txt is not the expected mapping")
    return index


@functools.cache
def class_names() -> list[str]:
    """The 21,841 fall11 class names (first lemma of each synset), in the card's index order."""
    synsets = timm_info_lines("imagenet22k_synsets.txt")
    lemmas = dict(
        line.split("\t", 1)
        for line in timm_info_lines("imagenet_synset_to_lemma.txt")
        if "\t" in line
    )
    if len(synsets) != NUM_CLASSES:
        raise RuntimeError(f"timm's imagenet22k_synsets.txt has {len(synsets)} lines, not 21841")
    return [lemmas.get(s, s).split(",")[0].strip() for s in synsets]
