"""The model and its cuts: architectures (the registry, import paths), plans that cut a model into
segments, a vertical fleet's model (a first segment per party, the merge), and the standalone model
file.

May import: config, and data for the data set's shape and a vertical fleet's regions. Nothing
distributed."""
