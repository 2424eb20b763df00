"""One module per asset, in data-flow order: coyo700m_metadata -> downloaded_shards ->
labeled_shards -> label_stats -> coyo_labeled_300m. Each is a thin wrapper: the logic lives in
``coyo_platform.core`` (and the two programs, ``downloader`` and ``worker``)."""

GROUP = "coyo_labeled_300m"
