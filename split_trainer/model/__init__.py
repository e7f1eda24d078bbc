"""The model and its cuts: architectures (the registry, import paths), plans that cut a model into
segments, and the standalone model file.

May import: config. Nothing distributed."""
