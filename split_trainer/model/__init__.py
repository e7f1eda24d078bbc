"""The model and its cuts: architectures (the registry, import paths), plans that cut a model into
segments, a model of parties (a first segment per party, the merge), the training loss, and the
standalone model file.

May import: core, config, data (the data set's shape, the parties' features). Nothing distributed."""
