"""Privacy: the defences at the cut (applied on the edge), a curious central's attacks, and the
audit's machinery that runs them on a checkpoint's segments (the command is cli.audit).

May import: core, config, data, model, records."""
