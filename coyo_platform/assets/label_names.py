"""The card's label names and class hierarchy, as parquet: never the card's pickle.

The dataset card ships its hierarchy as ``imagenet21k_tree.pickle``; unpickling runs arbitrary
code, so the platform never loads it. Offline, timm's package data has the 21,841 fall11 wnids in
the card's label order, each synset's lemmas and its WordNet definition, but no is-a relations
(and nltk's WordNet is not installed). So ``classes.parquet`` is always built from timm, and
``hierarchy.parquet`` only from a file the user provides: ImageNet's ``wordnet.is_a.txt``
(``parent_wnid child_wnid`` per line), a local path or any fsspec URL. Logic in
``coyo_platform.common.taxonomy``.
"""

import dagster as dg

from coyo_platform.assets import GROUP, bad_input, metadata_table
from coyo_platform.common import taxonomy
from coyo_platform.resources import StorageResource

NOT_BUILT = "not built: timm ships no is-a relations; set is_a_file to ImageNet's wordnet.is_a.txt"


class LabelNamesConfig(dg.Config):
    is_a_file: str | None = None
    """A wordnet.is_a.txt-style file: local path or any fsspec URL such as s3://."""


@dg.asset(group_name=GROUP, kinds={"parquet"})
def label_names(config: LabelNamesConfig, storage: StorageResource) -> dg.MaterializeResult:
    """The 21,841 card classes (label, wnid, name, lemmas, definition) and, given ImageNet's
    wordnet.is_a.txt, each class's parents, ancestors and depth."""
    try:
        written = taxonomy.write_tables(storage.store(), config.is_a_file)
    except FileNotFoundError as exc:
        raise bad_input(str(exc)) from exc
    except ValueError as exc:  # a malformed line or a cycle: bad input, not retried
        raise bad_input(f"{config.is_a_file}: {exc}") from exc
    metadata: dict = {
        "classes": len(written.classes),
        "preview": metadata_table(taxonomy.preview_table(written.classes)),
        "classes_path": dg.MetadataValue.path(written.classes_url),
    }
    if written.hierarchy is None:
        metadata["hierarchy"] = NOT_BUILT
    else:
        metadata["hierarchy_path"] = dg.MetadataValue.path(written.hierarchy_url)
        metadata.update(taxonomy.hierarchy_summary(written.pairs, written.hierarchy))
    return dg.MaterializeResult(metadata=metadata)
