"""Data and where it lives: data sets by name, seeded batch order and augmentation, edge-held
shards, and placement (central-held data or edge-held shards).

May import: config, and training.route for the batch record. Nothing distributed."""
