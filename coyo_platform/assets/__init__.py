"""One module per asset, in data-flow order: coyo700m_metadata -> downloaded_shards ->
labeled_shards -> label_stats -> coyo_labeled_300m. Each is a thin wrapper: the logic lives in
``coyo_platform.core`` (and the two programs, ``downloader`` and ``worker``)."""

GROUP = "coyo_labeled_300m"

import dagster as dg  # noqa: E402

#: How label stats, their roll-up and the subset keep up with new labels: declarative automation,
#: ``eager``: after an upstream partition is materialized (a labeling run started by the sensor,
#: a backfill, a rerun), the downstream partition is requested once its inputs are all present and
#: none is in progress; nothing upstream is ever re-run. Chosen over a sensor because it reads
#: Dagster's own materialization records (no storage listing) and shows its reasons per partition
#: in the UI. Needs the default automation condition sensor (on in `dagster dev`'s daemon).
REFRESH = dg.AutomationCondition.eager()
