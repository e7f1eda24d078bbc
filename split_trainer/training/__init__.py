"""The run itself: the central's driver, the edge object, the fleet of links, the engines, the
schedule (dispatch and turns), the route of a batch, stages, evaluation, optimizers, failures
and faults on purpose.

May import: config, model, data, transport, privacy.defences (and its adversary), records. Never imports
``torch.distributed.rpc``: that is the RPC transport's business (transport.rpc)."""
