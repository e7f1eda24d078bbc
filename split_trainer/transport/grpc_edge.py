"""The grpc transport's edge side (issue 36, in progress): an edge process dials the central over
mutual TLS and keeps one bidirectional stream (transport.grpc_common); nothing listens here.

On the stream: this edge says ``Hello`` (its certificate's name: the central reads the name from
the certificate, not from the message), hears the central's ``Connect`` (its config, refused
unless it names this host's own model: building it imports that code), builds its edge object
with its ``Host``, then serves each ``Call`` with ``Served.serve`` on a small pool of threads
(calls overlap; the edge object orders training calls by seq) and sends each ``Answer`` back. It
ends when the central ends the stream after ``finish``; a central silent for rpc.timeout_s (no
message, the heartbeat included), a refusal, or a message that does not decode ends it with one line.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import grpc
import torch

from split_trainer.config import Config, ConfigError
from split_trainer.core.errors import JobError, say, short
from split_trainer.transport import identity, sealing
from split_trainer.transport.base import Host, Served
from split_trainer.transport.codec import (LIMITS, NONCE_BYTES, Answer, Call, Connect, Heartbeat, Hello, Relay, Sealed,
                                           decode, decode_answer, encode)
from split_trainer.transport.grpc_common import (CERTS_FOLDER, CONNECT_ID, PATH, central_address, channel_options,
                                                 heartbeat_every)
from split_trainer.transport.schema import WireError
from split_trainer.transport.topology import edge_number

_BUILDING = threading.Lock()
"""Edges of one process build one at a time: a model's initialisation draws from the process's
random stream (one edge per process under torchrun; several in the in-process tests)."""
REFUSED = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)
MAX_BACKOFF_S = 2.0


def serve_edge_rank(name: str, own: Config, host: Callable[[], Host]) -> None:
    """An edge rank of a torchrun job on one machine (``__main__``): its own random stream, as an
    RPC edge rank seeds it, its data loaded (``host()``), then the central dialled."""
    torch.manual_seed(own.train.seed + edge_number(name))
    serve_edge_in_run_folder(Path(own.output.run_dir), name, host(), own)


def serve_edge_dialling(central: str, bundle: identity.Bundle, own: Config, host: Callable[[], Host]) -> None:
    """An edge process of a job across machines (``python -m split_trainer edge``): seeded as an
    edge rank is, its data loaded, then the central at ``central`` dialled."""
    torch.manual_seed(own.train.seed + edge_number(bundle.name))
    serve_edge_grpc(lambda: central, bundle, host(), own)


def serve_edges_dialling(central: str, bundles: list[identity.Bundle], own: Config,
                         host: Callable[[int], Host]) -> None:
    """Several edges in one process (``python -m split_trainer edges``), each on a thread of its own
    with its own bundle and stream; they share the process's random stream (seeded once). The first
    error, once every edge has ended (a refusal first: exit 2)."""
    torch.manual_seed(own.train.seed + edge_number(bundles[0].name))
    errors: list[BaseException] = []

    def edge(bundle: identity.Bundle) -> None:
        try:
            serve_edge_grpc(lambda: central, bundle, host(edge_number(bundle.name)), own)
        except BaseException as exc:
            errors.append(exc)
    threads = [threading.Thread(target=edge, args=(b,), name=f"edge-{b.name}", daemon=True) for b in bundles]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise next((e for e in errors if isinstance(e, ConfigError)), errors[0])


def serve_edge_in_run_folder(run_dir: Path, name: str, host: Host, own: Config) -> None:
    """An edge rank on the central's machine: the central's address and this edge's certificates
    from the run folder (``grpc.address``, ``certs/<name>``), both waited for: the central's rank
    makes them once it has loaded its data."""
    run_dir = Path(run_dir)
    address = central_address(run_dir, own.rpc.startup_timeout_s)
    address()
    bundle = identity.load_bundle(run_dir / CERTS_FOLDER / name)
    serve_edge_grpc(address, bundle, host, own)


def serve_edge_grpc(address: Callable[[], str], bundle: identity.Bundle, host: Host, own: Config) -> None:
    """Dial the central (``address()``, read again at each try: a central that restarts writes a
    new one), then serve it until it ends the job. A central not up yet, or gone mid-job (its
    process ended: a restarted one resumes the job), is dialled again with backoff for up to
    rpc.startup_timeout_s. A refusal is a ConfigError (exit 2); a central that ends the job with an
    error, or that stays away, a JobError; each one line."""
    creds = grpc.ssl_channel_credentials(root_certificates=bundle.ca_pem, private_key=bundle.key_pem,
                                         certificate_chain=bundle.cert_pem)
    deadline, backoff = time.monotonic() + own.rpc.startup_timeout_s, 0.1
    while True:
        target = address()
        session = _Session(bundle.name, bundle.edges_key, host, own)
        with grpc.secure_channel(target, creds, options=channel_options(own.rpc.timeout_s, server=False)) as channel:
            try:
                return session.run(channel.stream_stream(PATH)(session.outgoing()), target)
            except _Unavailable as exc:
                if _is_handshake(exc.details):  # no retry changes a certificate: a refusal (exit 2)
                    raise ConfigError(f"the TLS handshake with the central at {target} failed (are this bundle "
                                      f"and the central's of one job's CA?): {exc.details}") from None
                if exc.lost:  # it was serving us: give a restarted central the whole start-up time again
                    deadline, backoff = time.monotonic() + own.rpc.startup_timeout_s, 0.1
                    _say(bundle.name, f"the stream to the central at {target} ended ({exc.details}): dialling it "
                                      f"again for up to rpc.startup_timeout_s={own.rpc.startup_timeout_s:g} s")
                elif time.monotonic() + backoff > deadline:
                    raise JobError(f"cannot reach the central at {target} within rpc.startup_timeout_s="
                                   f"{own.rpc.startup_timeout_s:g} s: {exc.details}") from None
            finally:
                session.close()
        time.sleep(backoff)  # backoff between dials, not a synchronisation
        backoff = min(MAX_BACKOFF_S, 2 * backoff)


def _say(name: str, line: str) -> None:
    say(f"split_trainer: [{name}] warning: {line}")


class _Unavailable(Exception):
    """The central cannot be reached (``lost``: it was reached, and its process went away)."""

    def __init__(self, details: str, lost: bool = False):
        super().__init__(details)
        self.details, self.lost = details, lost


def _is_handshake(details: str) -> bool:
    """A TLS refusal (another CA, a certificate out of its dates): no retry will change it."""
    text = details.lower()
    return "handshake" in text or "certificate" in text or "ssl" in text


class _Session:
    """One stream to the central."""

    def __init__(self, name: str, key: Optional[bytes], host: Host, own: Config):
        self.name, self.key, self.host, self.own = name, key, host, own
        self.relays: dict[int, Future] = {}  # this edge's asks for a peer's replica, by id
        self.relay_ids = itertools.count(1)
        self.beat = heartbeat_every(min(own.rpc.timeout_s, own.rpc.startup_timeout_s))
        self.outbox: queue.Queue = queue.Queue()
        self.pool = ThreadPoolExecutor(own.rpc.num_worker_threads, thread_name_prefix=f"grpc-{name}")
        self.edge: Optional[Served] = None
        self.heard = False  # anything from the central yet (before that, it may not be up)
        self.last_heard = time.monotonic()
        self.why: Optional[str] = None  # why this side cancelled the stream
        self.done = threading.Event()
        self.finished = threading.Event()  # the central's finish call was served

    def outgoing(self) -> Iterator[bytes]:
        """What this edge sends: its hello, its answers, and a heartbeat whenever it has nothing to say."""
        yield encode(Hello(self.name))
        while not self.done.is_set():
            try:
                item = self.outbox.get(timeout=self.beat)
            except queue.Empty:
                item = encode(Heartbeat(time.time()))
            if item is None:
                return
            yield item

    def run(self, call: Any, target: str) -> None:
        threading.Thread(target=self._watch, args=(call,), name=f"grpc-watch-{self.name}", daemon=True).start()
        try:
            for data in call:
                self.heard, self.last_heard = True, time.monotonic()
                self._receive(data)
        except WireError as exc:
            call.cancel()
            raise JobError(f"the central ({target}) sent a message that is refused: {exc}") from None
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
            if self.why is not None:
                if self.own.topology.membership == "live":  # a live fleet takes an edge back at its next flush
                    raise _Unavailable(self.why, lost=True) from None
                raise JobError(self.why) from None
            if code in REFUSED:
                raise ConfigError(f"refused by the central ({target}): {details}") from None
            if code == grpc.StatusCode.UNAVAILABLE:  # no central there (yet, or any more): dial again
                raise _Unavailable(details, lost=self.heard) from None
            raise JobError(f"the central ({target}) ended the stream: {code.name}: {details}") from None
        if not self.finished.is_set():
            raise JobError(f"the central ({target}) ended the stream before the job was done")

    def _watch(self, call: Any) -> None:
        """A central that falls silent (no message, not even the heartbeat) ends this edge."""
        while not self.done.wait(self.beat):
            limit, key = ((self.own.rpc.timeout_s, "rpc.timeout_s") if self.edge is not None else
                          (self.own.rpc.startup_timeout_s, "rpc.startup_timeout_s"))
            silent = time.monotonic() - self.last_heard
            if silent > limit:
                self.why = f"no message from the central for {silent:.0f} s ({key}={limit:g})"
                call.cancel()
                return

    def _receive(self, data: bytes) -> None:
        message = decode(data, LIMITS, trusted_model=self.own.model.name)
        if isinstance(message, Call):
            self.pool.submit(self._serve, message)
        elif isinstance(message, Connect):
            self._connect(message)
        elif isinstance(message, Relay):
            self.pool.submit(self._seal_for, message)
        elif isinstance(message, Sealed):
            waiting = self.relays.get(message.id)
            if waiting is not None and not waiting.done():
                waiting.set_result(message)
        elif not isinstance(message, Heartbeat):
            raise WireError(f"the central may not send a {message.kind} message")

    def _connect(self, message: Connect) -> None:
        if message.edge != self.name:
            raise WireError(f"connect names {message.edge!r}; this edge's certificate says {self.name!r}")
        try:
            with _BUILDING:
                self.edge = self.host.build(self.name, message.config, self._ask_peer, None)
            answer = Answer(CONNECT_ID)
        except Exception as exc:
            answer = Answer.failed(CONNECT_ID, exc)
        self.outbox.put(encode(answer))

    def _serve(self, call: Call) -> None:
        try:
            if self.edge is None and call.method == "finish":  # a finished run's central releases its edges
                answer = Answer(call.id)
                self.finished.set()
            elif self.edge is None:
                raise RuntimeError(f"{self.name} has no edge object yet (no connect before {call.method})")
            elif call.method == "peer_state":  # the replica goes to peers only, sealed (_seal_for)
                raise RuntimeError(f"{self.name}'s replica goes sealed to its peers, never to the central")
            else:
                answer = Answer(call.id, self.edge.serve(call.method, call.args, call.seq))
                if call.method == "finish":
                    self.finished.set()
        except Exception as exc:
            answer = Answer.failed(call.id, exc)
        try:
            data = encode(answer)
        except WireError as exc:  # a reply the schema refuses: the call fails, the stream goes on
            data = encode(Answer.failed(call.id, exc))
        self.outbox.put(data)

    # -- edge to edge, sealed, through the central (privacy.edge_weights: edges) ---------------------
    def _ask_peer(self, peer: str) -> Callable[[], Any]:
        """Ask the central to relay ``peer``'s replica (Peers); returns the wait for it."""
        id, nonce, waiting = next(self.relay_ids), os.urandom(NONCE_BYTES), Future()
        self.relays[id] = waiting
        self.outbox.put(encode(Relay(id, peer, nonce)))

        def wait() -> Any:
            try:
                sealed = waiting.result(timeout=self.own.rpc.timeout_s)
            except TimeoutError:
                raise TimeoutError(f"{peer}'s replica did not come through the central within rpc.timeout_s="
                                   f"{self.own.rpc.timeout_s:g}") from None
            finally:
                self.relays.pop(id, None)
            if sealed.error is not None:
                raise RuntimeError(f"{peer}'s replica: {sealed.error}")
            plain = sealing.unseal(self._edges_key(), sealed.blob, sealing_context(peer, self.name, nonce))
            return decode_answer(plain, "peer_state").result  # checked as any reply: a state of tensors
        return wait

    def _seal_for(self, relay: Relay) -> None:
        """This edge's replica for the peer that asked, sealed so that only an edge opens it."""
        try:
            if self.edge is None:
                raise RuntimeError(f"{self.name} has no edge object yet")
            plain = encode(Answer(0, self.edge.serve("peer_state", ())))
            reply = Sealed(relay.id, sealing.seal(self._edges_key(), plain,
                                                   sealing_context(self.name, relay.peer, relay.nonce)))
        except Exception as exc:
            reply = Sealed(relay.id, b"", short(exc))
        self.outbox.put(encode(reply))

    def _edges_key(self) -> bytes:
        if self.key is None:
            raise ConfigError(f"{self.name}'s bundle holds no edges key (edges.key): it cannot seal or open a replica")
        return self.key

    def close(self) -> None:
        self.done.set()
        self.outbox.put(None)
        self.pool.shutdown(wait=False, cancel_futures=True)


def sealing_context(sender: str, receiver: str, nonce: bytes) -> bytes:
    """What a sealed replica is bound to: who sealed it, for whom, and the receiver's fresh nonce."""
    return b"split_trainer replica|" + sender.encode() + b"|" + receiver.encode() + b"|" + nonce
