"""The label stage, and its program ``python -m coyo_platform.label`` (``__main__``): top 50 of
the card's 21,841 classes for every downloaded image. ``settings`` (every setting, the presets),
``weights`` (the model and checkpoints, never unpickled), ``samples`` (tars to tensors, in loader
processes), ``model`` (the device side), ``writer`` (finished shards to parquet), ``run`` (a
partition, resumable). Imports no ``dagster``: the program runs in the programs image, which has
none."""
