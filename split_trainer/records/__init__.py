"""Checkpoints and records: atomic files, checkpoint folders (verified, resumable), what a
checkpoint holds (state), and the run's metrics log.

May import: config, training (stage and fleet, for what a checkpoint gathers)."""
