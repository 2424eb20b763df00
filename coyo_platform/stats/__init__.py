"""The stats stage: a partition's labels as exactly mergeable counts and its index for the plan
(``aggregate``), what they show a person (``report``: the card's threshold table and more;
``chart``: a PNG), and both into storage (``write``). Imports no ``dagster``."""
