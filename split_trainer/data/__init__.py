"""Data and where it lives: data sets by name, seeded batch order and augmentation, edge-held
shards, records split by feature and their alignment by private set intersection, and the
placements' data (central-held data, edge-held shards, parties holding features of the same
records), each the central's side and the edge's.

May import: core, config. Nothing distributed."""
