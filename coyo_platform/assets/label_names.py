"""The card's label names and class hierarchy, as parquet: never the card's pickle.

The dataset card ships its hierarchy as ``imagenet21k_tree.pickle``; unpickling runs arbitrary
code, so the platform never loads it. Offline, timm's package data has the 21,841 fall11 wnids in
the card's label order, each synset's lemmas and its WordNet definition, but no is-a relations
(and nltk's WordNet is not installed). So ``classes.parquet`` is always built from timm, and
``hierarchy.parquet`` only from a file the user provides: ImageNet's ``wordnet.is_a.txt``
(``parent_wnid child_wnid`` per line), a local path or any fsspec URL. Logic in
``coyo_platform.core.taxonomy``.
"""

import dagster as dg
import fsspec

from coyo_platform.assets import GROUP
from coyo_platform.core import taxonomy
from coyo_platform.core.storage import Storage
from coyo_platform.resources import StorageResource

TAXONOMY = "taxonomy"
NOT_BUILT = "not built: timm ships no is-a relations; set is_a_file to ImageNet's wordnet.is_a.txt"


class LabelNamesConfig(dg.Config):
    is_a_file: str | None = None
    """A wordnet.is_a.txt-style file: local path or any fsspec URL such as s3://."""


def _read_text(store: Storage, path: str) -> str:
    """The file's text, through the storage root's filesystem (and endpoint) when it shares its
    protocol. A missing file is bad input: a Failure that is not retried."""
    same = fsspec.utils.get_protocol(path) == fsspec.utils.get_protocol(store.root)
    fs = store.fs if same else fsspec.core.url_to_fs(path)[0]
    if not fs.exists(path):
        raise dg.Failure(description=f"is_a_file not found: {path}", allow_retries=False)
    with fs.open(path, "rb") as fh:
        return fh.read().decode()


@dg.asset(group_name=GROUP, kinds={"parquet"})
def label_names(config: LabelNamesConfig, storage: StorageResource) -> dg.MaterializeResult:
    """The 21,841 card classes (label, wnid, name, lemmas, definition) and, given ImageNet's
    wordnet.is_a.txt, each class's parents, ancestors and depth."""
    store = storage.store()
    classes = taxonomy.classes_table()
    hierarchy = None
    if config.is_a_file:
        try:
            pairs = taxonomy.parse_is_a(_read_text(store, config.is_a_file))
            hierarchy = taxonomy.hierarchy_table(pairs, classes)
        except ValueError as exc:  # a malformed line or a cycle: bad input, not retried
            raise dg.Failure(description=f"{config.is_a_file}: {exc}", allow_retries=False) from exc
    url = store.url(TAXONOMY, "classes.parquet")
    store.write_parquet(url, classes.to_arrow())
    metadata: dict = {
        "classes": len(classes),
        "preview": dg.MetadataValue.md(taxonomy.preview_markdown(classes)),
        "classes_path": dg.MetadataValue.path(url),
    }
    if hierarchy is None:
        metadata["hierarchy"] = NOT_BUILT
    else:
        hierarchy_url = store.url(TAXONOMY, "hierarchy.parquet")
        store.write_parquet(hierarchy_url, hierarchy.to_arrow())
        metadata["hierarchy_path"] = dg.MetadataValue.path(hierarchy_url)
        metadata.update(taxonomy.hierarchy_summary(pairs, hierarchy))
    return dg.MaterializeResult(metadata=metadata)
