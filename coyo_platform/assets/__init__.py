"""One module per asset, in data-flow order: coyo700m_metadata -> downloaded_shards ->
labeled_shards -> label_stats -> coyo_labeled_300m. Each is a thin wrapper: the logic lives in
``coyo_platform.core`` (and the two programs, ``downloader`` and ``worker``)."""

GROUP = "coyo_labeled_300m"

import warnings  # noqa: E402

import dagster as dg  # noqa: E402

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

#: Steps that run a program (network, S3, a GPU instance that can be reclaimed) are retried twice,
#: after 0-20 s then 20-40 s (exponential backoff, 10 s base, with jitter); bad input raises
#: ``dg.Failure(allow_retries=False)`` instead and is never retried.
#: Backfills run each partition on its own (downloads and labeling are hours each at full size;
#: stats and subset carry per-partition metadata); one policy for all, so that jobs mixing the
#: assets stay one run per partition.
ONE_PARTITION_PER_RUN = dg.BackfillPolicy.multi_run(max_partitions_per_run=1)

TRANSIENT_RETRIES = dg.RetryPolicy(
    max_retries=2, delay=10, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS
)
