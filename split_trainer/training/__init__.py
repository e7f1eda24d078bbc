"""The run itself: the central's run, one driver per placement (chosen once, in
drivers), the edge object and how an edge is put together for any transport (hosting), the fleet
of links, the engines, the schedule (dispatch and turns), the route of a batch, stages, evaluation,
optimizers, checkpoint parts, training's log, failures.

May import: core, config, data, model, records, transport, privacy. Never imports
``torch.distributed.rpc``: that is the RPC transport's business (transport.rpc)."""
