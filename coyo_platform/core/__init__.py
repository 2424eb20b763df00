"""Dagster-free logic: every function here takes paths and values, so it runs (and is tested)
without an orchestrator. The asset modules in ``coyo_platform.assets`` are thin wrappers
around it."""
