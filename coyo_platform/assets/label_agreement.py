"""Two label sets compared (logic in ``stats.agreement``): how a team checks a new labeling
model, checkpoint or precision against the one it replaces, on a few partitions, before paying
for all of them."""

import dagster as dg
import pydantic

from coyo_platform.assets import GROUP, bad_input, code_version, metadata_table
from coyo_platform.assets.labeled_shards import labeled_shards
from coyo_platform.common import layout
from coyo_platform.resources import StorageResource
from coyo_platform.stats.agreement import agreement_table, compare_label_sets, thresholds_table


class AgreementConfig(dg.Config):
    """The two label sets (labeler ids, as ``labeled_shards`` reports them in its ``labeler``
    metadata, or ``ls <root>/labeled_shards``); with only two sets under the root, both may be
    left out (the older one is the baseline)."""

    baseline: str | None = pydantic.Field(None, description="labeler id of the labels in use")
    candidate: str | None = pydantic.Field(None, description="labeler id of the new labels")
    partitions: list[str] | None = pydantic.Field(
        None, description="partitions to compare (default: every one both sets have)"
    )


def pick(store, config: AgreementConfig) -> tuple[str, str]:
    if config.baseline and config.candidate:
        return config.baseline, config.candidate
    found = layout.labelers(store)
    if len(found) != 2:
        raise ValueError(
            f"give baseline and candidate (labeler ids): {len(found)} label sets under "
            f"{layout.label_sets(store)}: {', '.join(found) or 'none'}"
        )
    made = {s: store.fs.modified(layout.labeler_record(layout.label_sets(store), s)) for s in found}
    older, newer = sorted(found, key=lambda s: made[s])
    return older, newer


@dg.asset(
    deps=[labeled_shards],
    group_name=GROUP,
    kinds={"polars"},
    code_version=code_version("label_agreement"),
)
def label_agreement(config: AgreementConfig, storage: StorageResource) -> dg.MaterializeResult:
    """Top-1 agreement, top-5 overlap and the mean absolute difference of the top-1 probability
    between two label sets, per partition and in all, and both sets' threshold tables side by
    side. Materialized by a person (launchpad or ``coyo-platform compare``), never by automation."""
    store = storage.store()
    try:
        baseline, candidate = pick(store, config)
        found = compare_label_sets(store, baseline, candidate, keys=config.partitions)
    except ValueError as err:
        raise bad_input(f"label_agreement: {err}") from err
    url = layout.agreement(store, baseline, candidate)
    store.write_json(url, found.to_json())
    total = found.total
    return dg.MaterializeResult(
        metadata={
            "baseline": baseline,
            "candidate": candidate,
            "images_compared": total.images,
            "top1_agreement": total.top1_agreement,
            "top5_overlap": total.top5_overlap,
            "top1_prob_mean_abs_diff": total.top1_prob_mean_abs_diff,
            "partitions": len(found.partitions),
            "agreement": metadata_table(agreement_table(found)),
            "threshold_tables": metadata_table(thresholds_table(found)),
            "path": dg.MetadataValue.path(url),
        }
    )
