"""The wire and the transports: what crosses a cut and how it is counted (wire), the central's
link to one edge (link), which hosts a job admits (admission: the job's secret), who a host is by
certificate and the edges' sealed replicas (identity: for the grpc transport to come), the
transport interface with its two implementations (rpc: torch RPC under torchrun; loopback: the
edges in this process, one thread each), and who is who in a torchrun job (topology). A transport
serves whatever edge object its ``Host`` builds (transport.base): what an edge is made of is
training's.

May import: core, config, data, model, records. ``torch.distributed.rpc`` is imported only by rpc
and topology."""
