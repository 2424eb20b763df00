"""One module per asset, in data-flow order: coyo700m_metadata -> downloaded_shards ->
labeled_shards -> label_stats -> (label_stats_rollup, subset_plan) -> coyo_labeled_300m ->
subset_manifest; and label_names beside them. Each is a thin wrapper over its stage package
(``ingest``, ``download``, ``label``, ``stats``, ``sample``); what they share is here: the group,
the automation and retry policies, the launchpad config derived from each stage's settings, and
metadata tables."""

from __future__ import annotations

import os
import typing
import warnings
from typing import Any, ClassVar

import dagster as dg
import pydantic

from coyo_platform.common import settings as declared
from coyo_platform.common.tables import Table

GROUP = "coyo_labeled_300m"

# Partitioned asset checks and backfill policies are marked beta/preview in Dagster 1.13; the
# platform relies on both, knowingly, and users need not see the notice at every load.
warnings.filterwarnings("ignore", message="Parameter `backfill_policy` of function `asset`")
warnings.filterwarnings("ignore", message="Specifying a partitions_def on an AssetCheckSpec")

#: How label stats, their roll-up and the subset keep up with new labels: declarative automation,
#: ``eager``: after an upstream partition is materialized (a labeling run started by the sensor,
#: a backfill, a rerun), the downstream partition is requested once its inputs are all present and
#: none is in progress; nothing upstream is ever re-run. Chosen over a sensor because it reads
#: Dagster's own materialization records (no storage listing) and shows its reasons per partition
#: in the UI. Needs the default automation condition sensor (on in `dagster dev`'s daemon).
REFRESH = dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed()

#: The roll-up over all partitions refreshes whenever any partition's stats change, without waiting
#: for every registered partition to have stats (plain ``eager`` would: its dependency is all of
#: ``label_stats``'s partitions).
REFRESH_ROLLUP = dg.AutomationCondition.eager().without(~dg.AutomationCondition.any_deps_missing())

#: What a person starts and automation keeps current: the webdataset shards of a partition are
#: requested after its subset part changes, once they exist (a person materializes them first:
#: they hold the partition's kept images again, a large copy), never for a new partition.
_AFTER_UPDATES = (
    dg.AutomationCondition.any_deps_updated().since_last_handled()
    & ~dg.AutomationCondition.any_deps_in_progress()
    & ~dg.AutomationCondition.in_progress()
)
KEEP_CURRENT = (
    _AFTER_UPDATES
    & ~dg.AutomationCondition.missing()
    & ~dg.AutomationCondition.any_deps_missing()
    & dg.AutomationCondition.all_deps_blocking_checks_passed()
)
#: The webdataset manifest: after any partition's shards change (not before the first).
REFRESH_AFTER_UPDATES = _AFTER_UPDATES

#: Backfills run each partition on its own (downloads and labeling are hours each at full size;
#: stats and subset carry per-partition metadata); one policy for all, so that jobs mixing the
#: assets stay one run per partition. That is Dagster's own single-partition behavior (no
#: ``BackfillPolicy``): each run is tagged ``dagster/partition`` like a run launched by hand or by
#: a sensor, so the one-run-per-partition limit (infra/dagster.yaml) and the sensors' check for a
#: partition's runs in progress see backfill runs too. ``BackfillPolicy.multi_run(1)`` makes the
#: same runs but tags them with a partition range only (``dagster/asset_partition_range_start``
#: and ``_end``, Dagster 1.13), which neither sees (coyo_platform_tests/test_backfill.py).
ONE_PARTITION_PER_RUN = None

#: The base delay of :func:`transient_retries`, in seconds (the test suite sets it to 0).
RETRY_DELAY_VARIABLE = "COYO_RETRY_DELAY_SECONDS"


def transient_retries() -> dg.RetryPolicy:
    """Steps that run a program (network, S3, a GPU instance that can be reclaimed) are retried
    twice, after 0-20 s then 20-40 s (exponential backoff from a 10 s base, with jitter); bad
    input raises ``dg.Failure(allow_retries=False)`` instead and is never retried."""
    delay = float(os.environ.get(RETRY_DELAY_VARIABLE, "10"))
    return dg.RetryPolicy(
        max_retries=2, delay=delay, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS
    )


TRANSIENT_RETRIES = transient_retries()


class StageConfig(dg.Config):
    """A launchpad config derived from a stage's settings dataclass (:func:`config_for`)."""

    settings_class: ClassVar[type]

    def to_settings(self) -> Any:
        """The stage's settings (``ValueError`` for a bad value)."""
        values = self.model_dump()
        return self.settings_class(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        )


def config_for(settings_class: type, name: str) -> type[StageConfig]:
    """The ``dg.Config`` of a stage's settings: the same fields, defaults, help and types (a
    tuple setting is a list in the launchpad)."""
    fields: dict[str, Any] = {}
    for field, kind in declared.fields_of(settings_class):
        annotation: Any = list[kind.scalar] if kind.many else kind.scalar
        if kind.optional:
            annotation = annotation | None
        help_text = field.metadata[declared.HELP]
        if kind.many and field.default is not None:
            default = tuple(field.default)
            spec = pydantic.Field(default_factory=lambda d=default: list(d), description=help_text)
        else:
            spec = pydantic.Field(field.default, description=help_text)
        fields[field.name] = (annotation, spec)
    config = pydantic.create_model(
        name, __base__=StageConfig, __doc__=settings_class.__doc__, **fields
    )
    config.settings_class = settings_class
    return config


#: Bumped when an asset's code changes what it writes (not for a refactor that writes the same).
CODE_VERSIONS = {
    "coyo700m_metadata": 2,
    "downloaded_shards": 2,
    "labeled_shards": 2,
    "label_stats": 2,
    "label_stats_rollup": 2,
    "subset_plan": 2,
    "coyo_labeled_300m": 2,
    "subset_manifest": 2,
    "coyo_labeled_300m_wds": 1,
    "wds_manifest": 1,
    "label_agreement": 1,
}


def code_version(asset: str, settings_class: type | None = None) -> str:
    """The asset's code version: its number above and its settings' defaults, so that a deploy
    that changes either marks every materialized partition unsynced in the UI (nothing is run
    because of it: see ``REFRESH``; a person or a backfill decides)."""
    from dataclasses import MISSING, fields

    from coyo_platform.common.provenance import digest

    defaults = {}
    for f in fields(settings_class) if settings_class else ():
        default = f.default if f.default is not MISSING else None
        defaults[f.name] = list(default) if isinstance(default, tuple) else default
    return f"{CODE_VERSIONS[asset]}-{digest(defaults, 8)}"


def config_class_of(asset: dg.AssetsDefinition) -> type[StageConfig] | None:
    """The launchpad config an asset takes, if it is a stage's."""
    hints = typing.get_type_hints(asset.op.compute_fn.decorated_fn)
    config = hints.get("config")
    return config if isinstance(config, type) and issubclass(config, StageConfig) else None


def settings_or_fail(config: StageConfig, asset: str) -> Any:
    """The stage's settings, or a failure that names the asset and is not retried."""
    try:
        return config.to_settings()
    except ValueError as err:
        raise dg.Failure(description=f"{asset}: bad settings: {err}", allow_retries=False) from err


def bad_input(message: str) -> dg.Failure:
    """A failure of the input itself (a missing part, nothing downloaded): retrying won't help."""
    return dg.Failure(description=message, allow_retries=False)


def metadata_table(table: Table) -> dg.TableMetadataValue:
    columns = [dg.TableColumn(name, kind) for name, kind in table.columns.items()]
    records = [dg.TableRecord({k: r.get(k) for k in table.columns}) for r in table.records]
    return dg.MetadataValue.table(records, schema=dg.TableSchema(columns=columns))


def location(url: str) -> dg.MetadataValue:
    """A source or output location: a link for URLs, a path for folders."""
    return dg.MetadataValue.url(url) if "://" in url else dg.MetadataValue.path(url)
