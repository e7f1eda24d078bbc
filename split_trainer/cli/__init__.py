"""The command line's parts: what the person sees (console), the one-process commands (``evaluate``
and ``export``: standalone; ``audit``; ``certs``: a job's certificates), and the generated
configuration reference.

May import: core, config, data, model, records, transport, privacy, training."""
