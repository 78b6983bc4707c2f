"""Host-side messages between the ranks of one host: the handshake of the copy-engine ring.

:class:`PeerLinks` is a full mesh of loopback TCP connections (at most ``C (C - 1) / 2``, C <= 8
GPUs on one host) carrying small framed messages, each identified by ``(kind, channel, seq)``.
A daemon thread per peer reads them into an inbox; :meth:`PeerLinks.wait` blocks until a given
message from a given peer has arrived, the peer's connection ended, the links were interrupted
(the ring failed), or a deadline passed. Messages between two ranks arrive in the order sent.

Setup is collective: every rank calls :meth:`PeerLinks.listen` (its address and a random key go
to the others by some collective of the caller's choice, the NCCL all-gather for
:mod:`cuparing.comm.ipc`), then :meth:`PeerLinks.connect` with all of them: rank ``r`` connects
to every lower rank (the listener's backlog accepts it at once) and accepts every higher one. A
connection is a challenge–response over fresh nonces (:mod:`cuparing.comm.handshake`) whose
secret is the listener's key, which only the ring's members know: the connecting rank proves it
holds the key, then the listener proves it does too. The key never goes on the wire, and a
recorded hello is useless on a new connection.

This module needs neither CuPy nor a GPU.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass

from .handshake import NONCE_BYTES, PROOF_BYTES, Transcript, new_nonce
from .sockets import DialTimeout, Retry, dial, recv_exact, tune

MAGIC = b"CPRL"
KEY_BYTES = 16
HANDSHAKE_SECONDS = 5.0  # the longest one peer handshake may take (as the rendezvous)
_CHALLENGE = struct.Struct(f"!4s{NONCE_BYTES}s")  # listener -> dialer: magic, listener's nonce
_HELLO = struct.Struct("!II")  # dialer -> listener: rank, world size; then its nonce and proof
_ACCEPTED = b"\x01"  # listener -> dialer, then the listener's proof
_PURPOSE = "peerlink"
_HEADER = struct.Struct("!BIQI")  # kind, channel, seq, payload length
_MAX_PAYLOAD = 1 << 20
BYE = 0  # kind of the message a rank sends when it leaves cleanly
_GONE_GRACE = 1.0  # seconds a failed send waits for the reader to learn why the peer went


class LinkError(RuntimeError):
    """A wait on a peer failed. ``timed_out`` tells a deadline from a lost peer or an abort."""

    def __init__(self, message: str, timed_out: bool = False):
        super().__init__(message)
        self.timed_out = timed_out


@dataclass(frozen=True)
class Address:
    """Where one rank listens, and the key that a rank connecting to it must prove it holds."""

    host: str
    port: int
    key: bytes

    _RECORD = struct.Struct("!H16s46s")  # port, key, host (ASCII, NUL padded): 64 bytes

    def pack(self) -> bytes:
        return self._RECORD.pack(self.port, self.key, self.host.encode())

    @classmethod
    def unpack(cls, data: bytes) -> Address:
        port, key, host = cls._RECORD.unpack(bytes(data))
        return cls(host.rstrip(b"\0").decode(), port, key)


class PeerLinks:
    """This rank's end of the mesh. Build with :meth:`listen`, then :meth:`connect`."""

    def __init__(self, rank: int, size: int, listener: socket.socket, key: bytes):
        self.rank, self.size = rank, size
        self._listener, self._key = listener, key
        self._socks: dict[int, socket.socket] = {}
        self._send_locks: dict[int, threading.Lock] = {}
        self._threads: list[threading.Thread] = []
        self._cond = threading.Condition()
        self._inbox: dict[tuple[int, int, int, int], bytes] = {}
        self._gone: dict[int, str] = {}  # peer -> why its connection ended
        self._interrupted: str | None = None
        self._closed = False

    # --- setup ---

    @classmethod
    def listen(cls, rank: int, size: int, host: str = "127.0.0.1") -> tuple[PeerLinks, Address]:
        """Open this rank's listener; returns the links and the address to give every rank."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind((host, 0))
        listener.listen(max(size, 8))
        key = os.urandom(KEY_BYTES)
        return cls(rank, size, listener, key), Address(host, listener.getsockname()[1], key)

    def connect(self, addresses: list[Address], timeout: float) -> None:
        """Join every rank (``addresses[r]`` is rank r's :meth:`listen` result).

        Raises:
            RuntimeError: a rank could not be reached or did not connect within ``timeout``.
        """
        if len(addresses) != self.size:
            raise ValueError(f"need {self.size} addresses, got {len(addresses)}")
        deadline = time.monotonic() + timeout
        try:
            for peer in range(self.rank):
                self._dial(peer, addresses[peer], deadline)
            self._accept_all(deadline)
        finally:
            self._listener.close()
        for peer, sock in self._socks.items():
            thread = threading.Thread(target=self._read, args=(peer, sock), daemon=True,
                                      name=f"cuparing-link-{self.rank}-{peer}")  # fmt: skip
            thread.start()
            self._threads.append(thread)

    def _dial(self, peer: int, address: Address, deadline: float) -> None:
        hello = _HELLO.pack(self.rank, self.size)
        where = f"{address.host}:{address.port}"

        def handshake(sock: socket.socket) -> None:
            magic, listener_nonce = _CHALLENGE.unpack(recv_exact(sock, _CHALLENGE.size))
            if magic != MAGIC:
                raise Retry(f"not a cuparing peer link (magic {magic!r})")
            transcript = Transcript(address.key, _PURPOSE, listener_nonce, new_nonce(), hello)
            sock.sendall(hello + transcript.client_nonce + transcript.client_proof())
            reply = recv_exact(sock, len(_ACCEPTED) + PROOF_BYTES)  # closed: refused, retry
            status, claimed = reply[: len(_ACCEPTED)], reply[len(_ACCEPTED) :]
            if status != _ACCEPTED or not transcript.server_proven(status, claimed):
                raise RuntimeError(f"rank {self.rank}: the listener at {where} could not prove "
                                   f"it holds rank {peer}'s key")  # fmt: skip

        try:
            sock, _ = dial((address.host, address.port), deadline, handshake, max_delay=0.05)
        except DialTimeout as exc:
            raise RuntimeError(
                f"rank {self.rank}: could not connect to rank {peer} at {where} "
                f"({exc.last_error})"
            ) from None
        sock.settimeout(None)
        self._add(peer, sock)

    def _accept_all(self, deadline: float) -> None:
        waiting = set(range(self.rank + 1, self.size))
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(
                    f"rank {self.rank}: ranks {sorted(waiting)} did not connect within the "
                    "timeout (dead, or not using the same transport)"
                )
            self._listener.settimeout(left)
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            peer = self._challenge(sock, waiting, deadline)
            if peer is None:
                sock.close()  # not one of ours (or a duplicate): ignore it
                continue
            sock.settimeout(None)
            tune(sock)
            self._add(peer, sock)
            waiting.discard(peer)

    def _challenge(self, sock: socket.socket, waiting: set[int], deadline: float) -> int | None:
        """The listener's side of the handshake: the rank that proved it holds our key and is
        still expected (after our own proof went back), else ``None``."""
        listener_nonce = new_nonce()
        try:
            # a few seconds per handshake, not the whole setup deadline: a local process that
            # connects and stays silent must not hold the listener until setup fails
            sock.settimeout(min(HANDSHAKE_SECONDS, max(deadline - time.monotonic(), 0.1)))
            sock.sendall(_CHALLENGE.pack(MAGIC, listener_nonce))
            answer = recv_exact(sock, _HELLO.size + NONCE_BYTES + PROOF_BYTES)
            hello = answer[: _HELLO.size]
            peer, size = _HELLO.unpack(hello)
            client_nonce = answer[_HELLO.size : _HELLO.size + NONCE_BYTES]
            transcript = Transcript(self._key, _PURPOSE, listener_nonce, client_nonce, hello)
            if not transcript.client_proven(answer[-PROOF_BYTES:]):
                return None
            if size != self.size or peer not in waiting:
                return None
            sock.sendall(_ACCEPTED + transcript.server_proof(_ACCEPTED))
        except (OSError, struct.error):
            return None
        return peer

    def _add(self, peer: int, sock: socket.socket) -> None:
        self._socks[peer] = sock
        self._send_locks[peer] = threading.Lock()

    # --- messages ---

    def send(self, peer: int, kind: int, channel: int, seq: int, payload: bytes = b"") -> None:
        """Send one message (never blocks for long: the peer's reader drains its socket).

        Raises:
            LinkError: the peer's connection has ended.
        """
        frame = _HEADER.pack(kind, channel, seq, len(payload)) + payload
        try:
            with self._send_locks[peer]:
                self._socks[peer].sendall(frame)
        except OSError as exc:
            with self._cond:
                # a send into a connection the peer closed can fail before this side's reader
                # has read the peer's last message (its BYE) and seen the end: give the reader
                # (where one runs: not during the setup) a moment, so the error says why the
                # peer went, not how the write failed
                if self._threads and self._interrupted is None:
                    self._cond.wait_for(
                        lambda: peer in self._gone or self._interrupted is not None,
                        timeout=_GONE_GRACE,
                    )
                why = self._gone.get(peer, f"is unreachable ({exc})")
            raise LinkError(f"rank {peer} {why}") from exc

    def wait(self, peer: int, kind: int, channel: int, seq: int, timeout: float) -> bytes:
        """The payload of message ``(kind, channel, seq)`` from ``peer``, once it arrived.

        Raises:
            LinkError: ``timeout`` passed (``timed_out``), the peer's connection ended first, or
                :meth:`interrupt` was called.
        """
        key = (peer, kind, channel, seq)
        deadline = time.monotonic() + timeout
        with self._cond:
            while key not in self._inbox:
                if self._interrupted is not None:
                    raise LinkError(self._interrupted)
                if peer in self._gone:
                    raise LinkError(f"rank {peer} {self._gone[peer]}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LinkError(f"nothing from rank {peer} within {timeout:g} s",
                                    timed_out=True)  # fmt: skip
                self._cond.wait(min(left, 0.5))
            return self._inbox.pop(key)

    def interrupt(self, reason: str) -> None:
        """Make every current and later :meth:`wait` raise ``LinkError(reason)``."""
        with self._cond:
            if self._interrupted is None:
                self._interrupted = reason
            self._cond.notify_all()

    def close(self, timeout: float) -> None:
        """Say BYE to every peer, wait (up to ``timeout``) until each said BYE or is gone, and
        close the sockets. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for peer in list(self._socks):
            with contextlib.suppress(LinkError):
                self.send(peer, BYE, 0, 0)
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._gone) < len(self._socks) and self._interrupted is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.5))
        for sock in self._socks.values():
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(1.0)

    def _read(self, peer: int, sock: socket.socket) -> None:
        why = "closed its connection (it died, or left the ring)"
        try:
            while True:
                kind, channel, seq, length = _HEADER.unpack(recv_exact(sock, _HEADER.size))
                if length > _MAX_PAYLOAD:
                    why = f"sent a malformed message ({length} bytes)"
                    break
                payload = recv_exact(sock, length) if length else b""
                if kind == BYE:
                    why = "left the ring (closed it)"
                    break
                with self._cond:
                    self._inbox[(peer, kind, channel, seq)] = payload
                    self._cond.notify_all()
        except (OSError, ConnectionError):
            pass
        with self._cond:
            self._gone[peer] = why
            self._cond.notify_all()
