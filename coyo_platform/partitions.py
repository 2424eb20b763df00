"""The one partitioning of the platform: a dynamic partition per COYO-700M source part.

Keys are part short names (``part-00000``): 128 for the full dataset, far below Dagster's
100,000-partition limit.
"""

import dagster as dg

coyo_parts = dg.DynamicPartitionsDefinition(name="coyo_parts")
