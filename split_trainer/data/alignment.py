"""Record alignment of a vertical fleet by private set intersection (OpenMined's ``openmined-psi``:
ECDH-based PSI, the server's set sent as a Golomb-compressed set).

The label party (the central) is the PSI client and each party a server, all at once: the central
sends every party the same request (its own ids, encrypted under its key), each party answers with
its setup (its ids, encrypted under its key) and the request encrypted once more, and the central
learns which of its own ids that party holds. It never sees an id in the clear, nor any id it does
not hold. The records every party holds (the intersection) go back to each party, which holds them
all, so no party learns an id outside the intersection; the parties never talk to each other.

What the central does learn, and docs/vertical.md says: for each party, which of the central's own
records it holds (pairwise PSI; a multi-party PSI that reveals only the whole intersection is not
in a maintained Python library). Ids travel as uint8 tensors so that the wire accounting counts
them (kind ``alignment``).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

Tensor = torch.Tensor
FALSE_POSITIVES = 1e-9
"""The setup's false-positive rate over the whole request; a party refuses an id it does not hold,
so a false positive stops the run instead of training on a record that is not there."""


def _psi() -> Any:
    import private_set_intersection.python as psi  # imported where used: horizontal runs never need it
    return psi


def as_tensor(data: bytes) -> Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


def as_bytes(tensor: Tensor) -> bytes:
    return tensor.numpy().tobytes()


def encode_ids(ids: Sequence[str]) -> Tensor:
    """Ids on the wire (newline-separated UTF-8, as a tensor)."""
    return as_tensor("\n".join(ids).encode())


def decode_ids(tensor: Tensor) -> list[str]:
    text = as_bytes(tensor).decode()
    return text.split("\n") if text else []


class Client:
    """The label party's side: one request for every party, the intersection with each one's answer."""

    def __init__(self, ids: Sequence[str]):
        psi = _psi()
        self.ids = list(ids)
        self._client = psi.client.CreateWithNewKey(True)
        self.request = as_tensor(self._client.CreateRequest(self.ids).SerializeToString())

    def shared(self, setup: Tensor, response: Tensor) -> set[int]:
        """The indices (into ``ids``) of the records the answering party holds."""
        psi = _psi()
        server_setup, reply = psi.ServerSetup(), psi.Response()
        server_setup.ParseFromString(as_bytes(setup))
        reply.ParseFromString(as_bytes(response))
        return set(self._client.GetIntersection(server_setup, reply))


def request_size(request: Tensor) -> int:
    """How many ids the label party's ``request`` asks about (its encrypted elements)."""
    parsed = _psi().Request()
    parsed.ParseFromString(as_bytes(request))
    return len(parsed.encrypted_elements)


def answer(ids: Sequence[str], request: Tensor, client_count: int) -> tuple[Tensor, Tensor]:
    """A party's side: (setup, response) to the label party's ``request`` of ``client_count`` ids,
    under a key of its own made for this answer."""
    psi = _psi()
    server = psi.server.CreateWithNewKey(True)
    setup = server.CreateSetupMessage(FALSE_POSITIVES, max(client_count, 1), list(ids), psi.DataStructure.GCS)
    parsed = psi.Request()
    parsed.ParseFromString(as_bytes(request))
    return as_tensor(setup.SerializeToString()), as_tensor(server.ProcessRequest(parsed).SerializeToString())


def intersect(client: Client, answers: list[tuple[Tensor, Tensor]]) -> list[str]:
    """The ids every answering party holds, sorted: the records' agreed order."""
    common = set(range(len(client.ids)))
    for setup, response in answers:
        common &= client.shared(setup, response)
    return sorted(client.ids[i] for i in common)
