"""Checkpoints and records: checkpoint folders (atomic, verified, resumable), named stateful parts
saved and put back (state), a checkpoint's parts read in one process (parts), and the run's
metrics log.

May import: core, config, data, model."""
