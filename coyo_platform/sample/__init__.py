"""The sample stage: which labeled images the subset keeps (``rules``: threshold or target size,
pHash dedup, class caps), decided once over all partitions (``plan``), applied per partition in
the card's schema (``subset``), and listed for consumers (``manifest``). Imports no ``dagster``."""
