"""Proving membership of a run: a challenge–response over fresh nonces, in both directions.

Whoever knows a run's secret may join it (the run token for the rendezvous and the failure
channel; a listener's random key, handed out through the ring's own collective, for peer links).
The secret never goes on the wire, and nothing that does can be replayed:

1. The server (the listening side) sends a fresh random nonce ``ns``.
2. The client answers with its hello (what it claims: rank, world size), a fresh nonce ``nc``
   and ``HMAC-SHA256(secret, purpose, "client", ns, nc, hello)``.
3. The server checks that proof (a recorded answer is worthless: ``ns`` is new on every
   connection), then sends its reply with ``HMAC-SHA256(secret, purpose, "server", ns, nc, hello,
   reply)``, which the client checks: the server knows the secret too, and the reply (the NCCL
   unique id, an ``OK``) is the one it sent. A stranger listening on the port can neither hand out
   a forged id nor have a client accept its ``ABORT``.

``purpose`` keeps the channels apart (a proof for one is useless on another) and the roles keep
the directions apart (a proof cannot be reflected back to its sender). Each part enters the MAC
with its length, so no two different transcripts share one. This module needs neither CuPy nor a
GPU, and no third-party package (``hmac``, ``hashlib``, ``secrets``).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from dataclasses import dataclass

NONCE_BYTES = 32
PROOF_BYTES = 32  # SHA-256


def new_nonce() -> bytes:
    """A fresh random nonce (from the OS's cryptographic source)."""
    return secrets.token_bytes(NONCE_BYTES)


def proof(secret: bytes, purpose: str, role: str, *parts: bytes) -> bytes:
    """``HMAC-SHA256(secret, purpose, role, *parts)``, each part length-prefixed."""
    mac = hmac.new(secret, digestmod=hashlib.sha256)
    for part in (purpose.encode(), role.encode(), *parts):
        mac.update(struct.pack("!I", len(part)))
        mac.update(part)
    return mac.digest()


@dataclass(frozen=True)
class Transcript:
    """One connection's challenge and hello, as both sides see them.

    Attributes:
        secret: what both sides must know (the run token's bytes, a listener's key).
        purpose: the channel (``"rendezvous"``, ``"health"``, ``"peerlink"``).
        server_nonce, client_nonce: the two fresh nonces (:data:`NONCE_BYTES` each).
        hello: the client's claims, exactly as sent.
    """

    secret: bytes
    purpose: str
    server_nonce: bytes
    client_nonce: bytes
    hello: bytes

    def client_proof(self) -> bytes:
        """What the client sends to show it knows the secret."""
        return proof(self.secret, self.purpose, "client", self.server_nonce, self.client_nonce,
                     self.hello)  # fmt: skip

    def server_proof(self, reply: bytes) -> bytes:
        """What the server sends with ``reply`` to show it knows the secret and sent ``reply``."""
        return proof(self.secret, self.purpose, "server", self.server_nonce, self.client_nonce,
                     self.hello, reply)  # fmt: skip

    def client_proven(self, claimed: bytes) -> bool:
        """Whether ``claimed`` is this transcript's client proof (constant-time compare)."""
        return hmac.compare_digest(claimed, self.client_proof())

    def server_proven(self, reply: bytes, claimed: bytes) -> bool:
        """Whether ``claimed`` is this transcript's server proof of ``reply``."""
        return hmac.compare_digest(claimed, self.server_proof(reply))
