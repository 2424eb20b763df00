"""The download stage, and its program ``python -m coyo_platform.download`` (``__main__``): one
COYO-700M part into webdataset shards. ``settings`` (every setting, once), ``fetch`` (the guard:
no private address, time and size cuts), ``inspect`` (bombs from the header, pHash drift),
``shard`` (one shard written whole), ``run`` (a partition, resumable), ``summary`` (what the
shards say), ``statuses`` (every row's outcome). Imports no ``dagster``: the program runs in the
programs image, which has none."""
