"""The labeler worker: a program of its own (``python -m coyo_platform.worker``), run locally or in
a GPU container. It imports no ``dagster``: only ``dagster_pipes``, torch, timm, pyarrow, Pillow
and imagehash (for the pHash). See ``__main__.py`` for usage and ``labeler.py`` for the recipe."""
