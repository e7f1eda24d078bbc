"""The ground floor: the words every layer shares, importing nothing of the package.

The batch record (batch), hops and what crosses the wire around them (hops), the errors a run
reports in one line (errors), failures on purpose (faults), files that are whole or absent
(files), and small tensor helpers (tensors).

May import: nothing of split_trainer. Everything else may import it (the layers are written once,
in setup.cfg's ``[importlinter]`` contract, and checked by tests/test_layers.py).
"""
