"""What every stage shares: the storage root (``storage``) and every path below it (``layout``),
which shards are done (``shards``), the files stages hand each other (``formats``), the card's
label space and names (``labelspace``, ``taxonomy``), how settings are declared once
(``settings``) and how the programs report (``reporting``). Imports no ``dagster``."""
