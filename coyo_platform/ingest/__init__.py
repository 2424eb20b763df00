"""The ingest stage: where COYO-700M parts come from (``sources``), the 17 columns they must have
(``schema``), and the copy of one part into storage (``metadata``). Imports no ``dagster``."""
