"""The wire and the transports: what crosses a cut and how it is counted (wire), the central's
link to one edge (link), which hosts a job admits (admission: the job's secret), the transport interface with its two implementations (rpc: torch RPC
under torchrun; loopback: the edges in this process, one thread each), and who is who in a
torchrun job (topology).

May import: config, training (the edge object the transports serve), data, records.
``torch.distributed.rpc`` is imported only by rpc and topology."""
