"""TCP plumbing shared by the ring's host channels: rendezvous, failure channel, peer links.

Three things each of those needs and none should write again: reading an exact number of bytes,
tuning a socket for tiny latency-bound messages, and dialling a listener that may not be up yet
(retry with exponential backoff until a deadline). This module needs neither CuPy nor a GPU.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

_RESET_ON_CLOSE = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() resets the connection

# seconds, seconds, probes: a peer host that vanished without closing its sockets (power loss, a
# cut cable) is noticed after about 10 + 5 * 3 = 25 s
_KEEPALIVE = {"TCP_KEEPIDLE": 10, "TCP_KEEPINTVL": 5, "TCP_KEEPCNT": 3}


class DialTimeout(RuntimeError):
    """:func:`dial` gave up at its deadline; ``last_error`` says what the last attempt saw."""

    def __init__(self, address: tuple[str, int], last_error: str):
        super().__init__(f"could not reach {address[0]}:{address[1]} (last error: {last_error})")
        self.address, self.last_error = address, last_error


class Retry(ConnectionError):
    """Raised by a :func:`dial` handshake for an answer worth retrying (not our listener yet)."""


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes from ``sock``.

    Raises:
        ConnectionError: the peer closed the connection first (the message says after how much).
        OSError: the socket's timeout passed, or the connection was reset.
    """
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(n - got)
        if not chunk:
            raise ConnectionError(f"peer closed the connection after {got} of {n} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def tune(sock: socket.socket, keepalive: bool = False) -> None:
    """No Nagle delay (our messages are tiny and urgent); with ``keepalive``, TCP keepalive probes
    that find a vanished peer host in about 25 s (Linux names; elsewhere system defaults)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if not keepalive:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in _KEEPALIVE.items():
        if hasattr(socket, name):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def is_self_connection(sock: socket.socket) -> bool:
    """Whether ``sock`` is connected to itself. Dialling a port of this host on which nothing
    listens yet can end in TCP's simultaneous open when the kernel picks that same port as the
    local end (the port is in the ephemeral range, as a free port handed out by the kernel is):
    the connection then "succeeds", and while it lives, or lingers in TIME_WAIT after an
    orderly close, the listener meant for the port cannot bind it."""
    try:
        return sock.getsockname() == sock.getpeername()
    except OSError:
        return False


def dial(address: tuple[str, int], deadline: float, handshake: Callable[[socket.socket], T],
         keepalive: bool = False, first_delay: float = 0.05,
         max_delay: float = 1.0) -> tuple[socket.socket, T]:  # fmt: skip
    """Connect to ``address`` and run ``handshake`` on the socket, retrying until ``deadline``.

    A listener that is not up yet, a reset, a timeout, a malformed answer, :class:`Retry` from
    ``handshake`` or a connection to itself counts as a failed attempt: the socket is closed and
    the next attempt follows after a delay that doubles from ``first_delay`` up to
    ``max_delay``. Any other exception from
    ``handshake`` (a refusal it decided on) closes the socket and propagates at once.

    Args:
        address: ``(host, port)``.
        deadline: ``time.monotonic()`` value after which no attempt starts.
        handshake: called with the connected, tuned socket (its timeout: at most 5 s, at most
            what is left); returns what the caller needs from the exchange.
        keepalive: as in :func:`tune`.

    Returns:
        The socket (still connected; blocking timeout as ``handshake`` left it) and the
        handshake's result.

    Raises:
        DialTimeout: the deadline passed without a successful attempt.
    """
    delay, last = first_delay, "no attempt made"
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise DialTimeout(address, last)
        sock = None
        try:
            sock = socket.create_connection(address, timeout=min(left, 5.0))
            if is_self_connection(sock):
                # closed with a reset, not the orderly close whose TIME_WAIT would keep the
                # port from the listener for a minute
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
                raise ConnectionRefusedError("connected to itself: nothing listens there yet")
            tune(sock, keepalive)
            return sock, handshake(sock)
        except (OSError, struct.error) as exc:  # ConnectionError and Retry included
            last = f"{type(exc).__name__}: {exc}"
        except BaseException:
            if sock is not None:
                sock.close()
            raise
        if sock is not None:
            sock.close()
        time.sleep(min(delay, max(deadline - time.monotonic(), 0.0)))
        delay = min(delay * 2, max_delay)
