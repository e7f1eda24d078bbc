"""The wire and the transports: what crosses a cut and how it is counted (wire), the central's
link to one edge (link), which hosts a job admits (admission: the job's secret), the transport
interface with its two implementations (rpc: torch RPC under torchrun; loopback: the edges in this
process, one thread each), and who is who in a torchrun job (topology). A transport serves
whatever edge object its ``Host`` builds (transport.base): what an edge is made of is training's.
For the networked transport in progress (issue 36): its wire format, codec (messages as msgpack,
no code) and schema (what each call carries, and the only records a message can rebuild); and
identity (who a host is, by certificate, and the edges' sealed replicas); the transport itself:
grpc_central (the server every edge dials), grpc_edge (an edge's stream) and grpc_common.

May import: core, config, data, model, records. ``torch.distributed.rpc`` is imported only by rpc
and topology."""
