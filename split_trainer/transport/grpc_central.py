"""The grpc transport's central side: a gRPC server with mutual TLS on one port, which every
edge dials (nothing listens on an edge). Each edge keeps one bidirectional stream
(transport.grpc_common): the central's calls go down it as transport.codec ``Call`` messages and
each ``Answer`` comes up, matched to its call by id (an answer does not name its method: the
central keeps it per id and checks the reply against it).

An edge is who its client certificate says (transport.identity.peer_name; the TLS handshake has
checked it against the job's CA). Refused with one line on the central's log and an error status
to the edge, before anything of the job is sent: a revoked certificate (transport.revocation), a
name outside edge1..edgeN (topology.edges), and a second stream for a name already attached (the
first stays). A message from an edge that does not
decode, or that an edge may not send, is refused with one line, counted (``refusals``), and that
edge is dropped: its calls in flight fail with the line. Each stream has a number: an edge object
lives on the stream it was built on (``GrpcRemote``), so an edge that dialled again is a newcomer
to a live fleet (training.live), never the old edge object.
"""

from __future__ import annotations

import collections
import itertools
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import grpc

from split_trainer.config import Config, ConfigError
from split_trainer.core.errors import JobError, say, short
from split_trainer.transport import identity, revocation
from split_trainer.transport.base import FuturePending
from split_trainer.transport.codec import LIMITS, Answer, Call, Connect, Heartbeat, Hello, Relay, Sealed, decode, encode
from split_trainer.transport.grpc_common import (ADDRESS_FILE, CERTS_FOLDER, CONNECT_ID, METHOD, SERVICE,
                                                 channel_options, heartbeat_every, write_address)
from split_trainer.transport.schema import WireError, check_answer

END_GRACE_S = 1.0  # how long the server gives each stream to send its end before it cancels it


@dataclass(frozen=True)
class _End:
    """Ends a stream from the central's side: with an error status (``code``) or, None, OK."""
    code: Optional[grpc.StatusCode]
    line: str


class _Peer:
    """One attached edge: its stream's outbox, its calls in flight (id -> method, future), and
    when it was last heard."""

    def __init__(self, name: str, address: str, stream: int):
        self.name, self.address, self.stream = name, address, stream  # stream: this connection's number
        self.outbox: queue.Queue = queue.Queue()
        self.calls: dict[int, tuple[Optional[str], Future]] = {}
        self.lock = threading.Lock()
        self.last_heard = time.monotonic()
        self.closed: Optional[str] = None  # why the stream ended

    def call(self, id: int, method: Optional[str], data: bytes) -> Future:
        fut: Future = Future()
        with self.lock:
            if self.closed is not None:
                fut.set_exception(ConnectionError(self.closed))
                return fut
            self.calls[id] = (method, fut)
        self.outbox.put(data)
        return fut

    def answered(self, answer: Answer) -> None:
        with self.lock:
            method, fut = self.calls.pop(answer.id, (None, None))
        if fut is None:  # a call that timed out already, or an id never sent: nothing waits for it
            return
        try:
            if method is not None:
                check_answer(answer, method)
        except WireError as exc:
            fut.set_exception(ConnectionError(str(exc)))
            raise
        if answer.error is not None:
            fut.set_exception(RuntimeError(answer.error))
        else:
            fut.set_result(answer.result)

    def close(self, line: str, code: Optional[grpc.StatusCode] = None) -> None:
        """End this edge's stream: every call in flight fails with ``line``."""
        with self.lock:
            if self.closed is not None:
                return
            self.closed, calls, self.calls = line, self.calls, {}
        for _, fut in calls.values():
            if not fut.done():
                fut.set_exception(ConnectionError(line))
        self.outbox.put(_End(code, line))


class GrpcRemote:
    """One edge object, reached over the stream it was built on: an edge that dialled again is
    another edge object (its calls on this remote fail, as a lost edge's)."""

    def __init__(self, transport: "GrpcTransport", name: str, stream: int):
        self.transport, self.name, self.stream = transport, name, stream

    def send(self, method: str, args: tuple, timeout_s: float, seq: Optional[int] = None) -> FuturePending:
        return self.transport.call(self.name, method, args, timeout_s, seq, self.stream)

    def attached(self) -> bool:
        """Whether the stream this edge object lives on is still up."""
        return self.transport.stream_of(self.name) == self.stream


class GrpcTransport:
    """The central's side. ``bundle``: the central's folder from the certs command (or the job's
    folder that holds it); None: on one machine, the job's certificates in the run folder, made
    there when absent. ``listen``: host:port (port 0: any free one), written to the run folder's
    ``grpc.address`` once it listens (the ranks of one machine read it there)."""
    name = "grpc"
    autograd = None  # the autograd engine is refused on this transport (config.whole)

    def __init__(self, cfg: Config, bundle: Optional[Path] = None, listen: str = "127.0.0.1:0"):
        self.cfg, self.listen = cfg, listen
        self.run_dir = Path(cfg.output.run_dir)
        self.bundle = None if bundle is None else Path(bundle)
        self.names = [f"edge{k}" for k in range(1, cfg.topology.edges + 1)]
        # Often enough for an edge still waiting to be connected, which gives up after rpc.startup_timeout_s.
        self.beat = heartbeat_every(min(cfg.rpc.timeout_s, cfg.rpc.startup_timeout_s))
        self.refusals: collections.Counter = collections.Counter()
        self._peers: dict[str, _Peer] = {}
        self._lock = threading.Condition()
        self._ids = itertools.count(CONNECT_ID + 1)
        self._streams = itertools.count(1)
        self._server: Optional[grpc.Server] = None
        self._folder, self._ca_pem = Path(), b""  # the central's bundle, once started
        self._relays: dict[int, tuple[str, _Peer, int]] = {}  # relay id -> (edge asked, edge asking, its id)
        self.address: Optional[str] = None
        self._connected = False
        # A live fleet lets a silent edge go and takes it back when it dials again (training.live).
        self._silent_code = grpc.StatusCode.UNAVAILABLE if cfg.topology.membership == "live" else \
            grpc.StatusCode.DEADLINE_EXCEEDED

    # -- up and down -------------------------------------------------------------------------------
    def start(self) -> None:
        """Listen. A second start (the serve command's next attempt) keeps the server and its edges."""
        if self._server is not None:
            return
        self._folder = self._central_bundle()
        bundle = identity.load_bundle(self._folder)
        self._ca_pem = bundle.ca_pem
        revocation.revoked(self._folder, self._ca_pem)  # a bad list is one line now, not at the first edge
        if bundle.name != identity.CENTRAL:
            raise ConfigError(f"--certs {self.bundle}: the bundle of {bundle.name}, not the central's "
                              f"(give DIR/central)")
        (self.run_dir / ADDRESS_FILE).unlink(missing_ok=True)  # a stale one would send edges to a dead port
        slots = len(self.names) + 4  # a stream holds a server thread while it lasts; refused ones end at once
        self._server = grpc.server(ThreadPoolExecutor(slots, thread_name_prefix="grpc-central"),
                                   options=channel_options(self.cfg.rpc.timeout_s, server=True),
                                   maximum_concurrent_rpcs=slots)
        handler = grpc.stream_stream_rpc_method_handler(self._attach)  # raw bytes both ways: no serializers
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler}),))
        creds = grpc.ssl_server_credentials([(bundle.key_pem, bundle.cert_pem)], root_certificates=bundle.ca_pem,
                                            require_client_auth=True)
        host = self.listen.rsplit(":", 1)[0]
        port = self._server.add_secure_port(self.listen, creds)
        if port == 0:
            raise JobError(f"the central cannot listen on {self.listen}")
        self._server.start()
        self.address = f"{host}:{port}"
        write_address(self.run_dir, self.address, self.cfg.rpc.startup_timeout_s)

    def _central_bundle(self) -> Path:
        """The central's folder. On one machine (no bundle given) the job's certificates are made in
        the run folder when absent, with any edge of the topology that has none: every rank reads its
        own bundle there."""
        if self.bundle is not None:
            held = self.bundle / identity.CENTRAL
            return held if (held / "cert.pem").exists() else self.bundle
        certs = self.run_dir / CERTS_FOLDER
        made = (certs / identity.CA / "ca.pem").exists()
        missing = [name for name in self.names if not (certs / name).exists()] if made else self.names
        if missing:
            identity.make_job(certs, missing)
        return certs / identity.CENTRAL

    def shutdown(self, graceful: bool) -> None:
        with self._lock:
            peers = list(self._peers.values())
        # ABORTED: the job failed, and the edges stop (a central that dies, UNAVAILABLE: they redial)
        for peer in peers:
            peer.close("the central shut down", None if graceful else grpc.StatusCode.ABORTED)
        if self._server is not None:
            # A grace even after a failure: with none, the server cancels each stream before its
            # ABORTED goes out, and an edge that saw only a broken stream dials the dead port
            # again for rpc.startup_timeout_s. The streams end at once, as their ends are queued.
            self._server.stop(grace=END_GRACE_S).wait(self.cfg.rpc.timeout_s)

    # -- the Transport protocol ----------------------------------------------------------------------
    def members(self) -> list[str]:
        """The edges attached: every edge of the topology, waited for up to rpc.startup_timeout_s
        (an elastic fleet goes on with topology.min_edges or more)."""
        deadline = time.monotonic() + self.cfg.rpc.startup_timeout_s
        with self._lock:
            self._lock.wait_for(lambda: len(self._attached()) == len(self.names),
                                max(0.0, deadline - time.monotonic()))
            here = self._attached()
        if len(here) < self.cfg.topology.fewest:
            absent = [name for name in self.names if name not in here]
            raise JobError(f"{', '.join(absent)} did not dial in within rpc.startup_timeout_s="
                           f"{self.cfg.rpc.startup_timeout_s:g} s ({len(here)} of {len(self.names)} attached"
                           f"{', need ' + str(self.cfg.topology.fewest) if self.cfg.topology.min_edges else ''})")
        return here

    def arrivals(self, known: list[str], need: int, timeout_s: float) -> list[str]:
        """The attached edges not in ``known`` (a live fleet's newcomers), waited for up to
        ``timeout_s`` while fewer than ``need``."""
        with self._lock:
            self._lock.wait_for(lambda: len(set(self._attached()) - set(known)) >= need, timeout_s if need else 0)
            return [name for name in self._attached() if name not in known]

    def drop(self, name: str, why: str, stream: int) -> None:
        """End edge ``name``'s stream number ``stream`` (a live fleet let it go; a newer one stays):
        UNAVAILABLE, so that an edge still running dials again and rejoins."""
        with self._lock:
            peer = self._peers.get(name)
        if peer is not None and peer.stream == stream:
            self._drop(peer, why, grpc.StatusCode.UNAVAILABLE, say=False)

    def _attached(self) -> list[str]:
        return [name for name in self.names if name in self._peers and self._peers[name].closed is None]

    def admit(self, names: list[str]) -> list[str]:
        """The certificate is the admission: the edges of ``names`` still attached."""
        with self._lock:
            here = [name for name in names if name in self._attached()]
        if len(here) < self.cfg.topology.fewest:
            raise JobError(f"{', '.join(n for n in names if n not in here)} left before the job began")
        return here

    def connect(self, names: list[str], cfg: Config) -> list[GrpcRemote]:
        """Each edge builds its edge object from ``cfg``, one after the other (an edge process
        seeds its model's initialisation from the config; in one process, edges take turns)."""
        streams = {}
        for name in names:
            streams[name] = self.stream_of(name)
            pending = self._send(name, None, Connect(name, cfg), CONNECT_ID, cfg.rpc.startup_timeout_s, streams[name])
            try:
                pending.wait()
            except Exception as exc:
                raise JobError(f"{name} ({self.where(name)}) could not build its edge: {short(exc)}") from exc
        self._connected = True
        return [GrpcRemote(self, name, streams[name]) for name in names]

    def stream_of(self, name: str) -> Optional[int]:
        """The number of edge ``name``'s stream, while it is up."""
        with self._lock:
            peer = self._peers.get(name)
            return peer.stream if peer is not None and peer.closed is None else None

    def call(self, name: str, method: str, args: tuple, timeout_s: float, seq: Optional[int],
             stream: Optional[int] = None) -> FuturePending:
        id = next(self._ids)
        return self._send(name, method, Call(id, method, tuple(args), float(timeout_s), seq), id, timeout_s, stream)

    def _send(self, name: str, method: Optional[str], message: Any, id: int, timeout_s: float,
              stream: Optional[int] = None) -> FuturePending:
        data = encode(message)  # a call the schema refuses fails here, on the central, before it is sent
        with self._lock:
            peer = self._peers.get(name)
        if peer is None or stream not in (None, peer.stream):
            fut: Future = Future()
            fut.set_exception(ConnectionError(f"{name} is not attached" if peer is None else
                                              f"{name} dialled again: the stream its edge object lived on ended"))
        else:
            fut = peer.call(id, method, data)
        return FuturePending(fut, timeout_s, name, method or "connect")

    def where(self, name: str) -> str:
        with self._lock:
            peer = self._peers.get(name)
        return peer.address if peer is not None else "not attached"

    def guard(self) -> AbstractContextManager[None]:
        return nullcontext()

    def finish(self, timeout_s: float) -> None:
        """Tell each attached edge the job is done, then end its stream (OK). A central that
        connected none (its run had finished already) first waits for them to dial in, as the
        edge ranks of its torchrun job do."""
        if not self._connected:
            try:
                self.members()
            except JobError:
                pass
        with self._lock:
            peers = [self._peers[name] for name in self._attached()]
        waits = [(peer, self.call(peer.name, "finish", (), timeout_s, None)) for peer in peers]
        for peer, pending in waits:
            try:
                pending.wait()
            except Exception as exc:
                self._say(f"{peer.name} did not hear the end of the job: {short(exc)}")
            peer.close("the job is done")

    # -- the streams -----------------------------------------------------------------------------------
    def _attach(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        """One edge's stream, for as long as it lasts: its messages are read on a thread of their
        own; this generator sends the central's (and a heartbeat whenever there is nothing to send)."""
        name, address = identity.peer_name(context), context.peer()
        refusal = self._revoked(name, address, context)
        peer, refusal = (None, refusal) if refusal else self._register(name, address)
        if peer is None:
            self._refuse("certificate", refusal)
            context.abort(grpc.StatusCode.PERMISSION_DENIED, refusal)
        threading.Thread(target=self._read, args=(peer, requests), name=f"grpc-read-{name}", daemon=True).start()
        try:
            yield encode(Heartbeat(time.time()))  # attached: the edge hears at once that it was not refused
            while True:
                try:
                    item = peer.outbox.get(timeout=self.beat)
                except queue.Empty:
                    item = None
                if isinstance(item, _End):
                    if item.code is not None:
                        context.abort(item.code, item.line)
                    return
                silent = time.monotonic() - peer.last_heard
                if silent > self.cfg.rpc.timeout_s:
                    self._drop(peer, f"{name} ({address}) fell silent: no message for {silent:.0f} s "
                                     f"(rpc.timeout_s={self.cfg.rpc.timeout_s:g})", self._silent_code)
                    continue
                yield encode(Heartbeat(time.time())) if item is None else item
        finally:
            peer.close(f"the stream to {name} ({address}) ended")
            with self._lock:
                if self._peers.get(name) is peer:
                    del self._peers[name]
                self._lock.notify_all()

    def _revoked(self, name: Optional[str], address: str, context: grpc.ServicerContext) -> str:
        """Why this client's certificate is refused as revoked (the list is read at every
        connection: a revocation needs no restart), or ""."""
        try:
            serials = revocation.revoked(self._folder, self._ca_pem)
        except ConfigError as exc:
            return f"a client from {address} is refused: the revocation list cannot be read: {exc}"
        serial = revocation.peer_serial(context)
        if serial in serials:
            return (f"a client from {address} with the certificate of {name!r} is refused: that certificate (serial "
                    f"{serial:x}) is revoked ({self._folder / revocation.CRL})")
        return ""

    def _register(self, name: Optional[str], address: str) -> tuple[Optional[_Peer], str]:
        with self._lock:
            if name not in self.names:
                return None, (f"a client from {address} with the certificate of {name!r} is refused: the job's "
                              f"edges are {self.names[0]}..{self.names[-1]} (topology.edges={len(self.names)})")
            if name in self._peers and self._peers[name].closed is None:
                return None, (f"a second connection for {name} from {address} is refused: {name} is attached from "
                              f"{self._peers[name].address} (the first connection stays)")
            self._peers[name] = peer = _Peer(name, address, next(self._streams))
            self._lock.notify_all()
            return peer, ""

    def _read(self, peer: _Peer, requests: Iterator[bytes]) -> None:
        try:
            for data in requests:
                peer.last_heard = time.monotonic()
                self._receive(peer, data)
        except WireError as exc:
            line = f"{peer.name} ({peer.address}) sent a message that is refused, and is dropped: {exc}"
            self._refuse("message", line)
            self._drop(peer, line, grpc.StatusCode.INVALID_ARGUMENT, say=False)
        except grpc.RpcError:  # the stream broke; a server's request iterator is told no reason
            self._drop(peer, f"the stream to {peer.name} ({peer.address}) broke: its process ended or its "
                             f"network failed", None)
        except Exception as exc:
            self._drop(peer, f"the stream to {peer.name} ({peer.address}) broke: {short(exc)}", None)
        else:
            self._drop(peer, f"{peer.name} ({peer.address}) ended its stream", None)

    def _receive(self, peer: _Peer, data: bytes) -> None:
        message = decode(data, LIMITS)
        if isinstance(message, Answer):
            peer.answered(message)
        elif isinstance(message, Relay):
            self._relay(peer, message)
        elif isinstance(message, Sealed):
            self._pass_on(peer, message)
        elif isinstance(message, Hello):
            if message.name != peer.name:
                raise WireError(f"hello names {message.name!r}, its certificate {peer.name!r}")
        elif not isinstance(message, Heartbeat):
            raise WireError(f"an edge may not send a {message.kind} message")

    def _relay(self, asker: _Peer, ask: Relay) -> None:
        """An edge asks for a peer's replica: the peer is asked to seal it for that edge."""
        with self._lock:
            target = self._peers.get(ask.peer) if ask.peer != asker.name else None
            if target is not None and target.closed is None:
                id = next(self._ids)
                self._relays[id] = (target.name, asker, ask.id)
        if target is None or target.closed is not None:
            asker.outbox.put(encode(Sealed(ask.id, b"", f"{ask.peer} is not attached to the central")))
            return
        target.outbox.put(encode(Relay(id, asker.name, ask.nonce)))

    def _pass_on(self, sender: _Peer, sealed: Sealed) -> None:
        """A sealed replica (which this side cannot open) goes on to the edge that asked for it."""
        with self._lock:
            entry = self._relays.pop(sealed.id, None)
        if entry is None:  # the asker gave up, or left: nothing waits for it
            return
        asked, asker, asker_id = entry
        if asked != sender.name:
            raise WireError(f"a sealed replica for relay {sealed.id}, which was asked of {asked}")
        asker.outbox.put(encode(Sealed(asker_id, sealed.blob, sealed.error)))

    def _drop(self, peer: _Peer, line: str, code: Optional[grpc.StatusCode], say: bool = True) -> None:
        if say and peer.closed is None and code is not None:
            self._say(line)
        peer.close(line, code)
        with self._lock:
            self._lock.notify_all()

    def _refuse(self, what: str, line: str) -> None:
        self.refusals[what] += 1
        self._say(f"{line} (refusal {sum(self.refusals.values())} of this job)")

    @staticmethod
    def _say(line: str) -> None:
        say(f"split_trainer: [central] warning: {line}")
