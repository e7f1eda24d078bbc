"""Privacy: the defences at the cut (applied on the edge), a curious central's attacks, and the
audit that runs them on a checkpoint.

May import: config, model, data, training.route, training.stage (on_cpu), records."""
