"""Sealing what edges send each other through the central (privacy.edge_weights: edges on the grpc
transport): AES-GCM under the edges' key (``edges.key``, made by transport.identity, which the
central's bundle never holds), bound to a context that is authenticated but not sent, so that a
blob relayed for one sender, receiver or request does not open as another's."""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from split_trainer.core.errors import ConfigError, JobError
from split_trainer.transport.identity import EDGES_KEY_BYTES

NONCE_BYTES = 12  # GCM's 96-bit nonce: random, so at most ~2**32 seals per key keep collisions negligible
TAG_BYTES = 16


class SealError(JobError):
    """A sealed blob that does not open: the wrong key, altered or cut short, or another context."""


def seal(key: bytes, plaintext: bytes, context: bytes) -> bytes:
    """``plaintext`` encrypted and authenticated under the edges key: a random 96-bit nonce, then
    AES-GCM's ciphertext and tag. ``context`` (e.g. job id, sender, step) is authenticated but not
    sent: ``unseal`` must be given the same, so a blob relayed for one step or sender does not
    open as another's."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + _aead(key).encrypt(nonce, plaintext, context)


def unseal(key: bytes, blob: bytes, context: bytes) -> bytes:
    """The plaintext of a ``seal``ed blob, or SealError (one line) when it does not open."""
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise SealError(f"a sealed blob of {len(blob)} bytes is cut short (at least {NONCE_BYTES + TAG_BYTES})")
    try:
        return _aead(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], context)
    except InvalidTag:
        raise SealError("a sealed blob does not open: another key (not this job's edges key), altered on the way, "
                        "or sealed for another context (job, sender or step)") from None


def _aead(key: bytes) -> AESGCM:
    if len(key) != EDGES_KEY_BYTES:
        raise ConfigError(f"the edges key has {len(key)} bytes: it must have {EDGES_KEY_BYTES} (edges.key)")
    return AESGCM(key)
