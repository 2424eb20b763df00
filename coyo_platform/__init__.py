"""coyo_platform: rebuild COYO-Labeled-300M (and datasets like it) with Dagster.

This package's ``__init__`` imports nothing on purpose: ``python -m coyo_platform.label`` and
``python -m coyo_platform.download`` run on GPU/CPU machines that have no ``dagster`` installed.
The Dagster wiring lives in ``coyo_platform.definitions``.
"""
