"""The command line's one-process parts: what the person sees (console), ``evaluate`` and
``export`` without a cluster (standalone), and the generated configuration reference.

May import: config, model, data, records, training (for the console's link snapshots)."""
