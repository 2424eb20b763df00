"""The download program: img2dataset over one COYO-700M part. Imports no ``dagster``."""
