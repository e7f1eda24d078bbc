"""Data and where it lives: data sets by name, seeded batch order and augmentation, edge-held
shards, vertically partitioned records and their alignment by private set intersection, and
placement (central-held data, edge-held shards, or a vertical fleet's parties).

May import: config, and training.route for the batch record. Nothing distributed."""
