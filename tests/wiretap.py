"""An attacker between a client and a server, for the replay tests of the ring's host channels.

:class:`Wiretap` listens where the client is told the server is. The first connection it takes
is intercepted: the server's challenge reaches the client, but what the client answers (a hello
that was valid for that challenge) is recorded in :attr:`Wiretap.recorded` and never delivered.
The client, seeing its connection closed, retries; the wiretap holds that retry until
:attr:`Wiretap.release` is set and then relays it both ways, so the client does join, after the
test has had the chance to :func:`replay` the recording to the server itself.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while chunk := src.recv(65536):
            dst.sendall(chunk)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


def _hang_up(sock: socket.socket) -> None:
    """Close now: shutdown first, since a close alone does not end a connection another thread
    is still reading (the peer would never see it end)."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


class Wiretap:
    """Records the client's first answer to ``upstream`` and withholds it (see the module doc)."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = tuple(upstream)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = self._listener.getsockname()[:2]
        self.recorded = b""
        self.intercepted = threading.Event()  # set once `recorded` holds the client's answer
        self.release = threading.Event()  # set by the test: relay the client's retries
        self._socks: list[socket.socket] = [self._listener]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        first = True
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._socks.append(client)
            threading.Thread(target=self._relay, args=(client, first), daemon=True).start()
            first = False

    def _relay(self, client: socket.socket, intercept: bool) -> None:
        if not intercept:
            self.release.wait(30)
        upstream = socket.create_connection(self.upstream, timeout=10)
        upstream.settimeout(None)
        self._socks.append(upstream)
        threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()
        if not intercept:
            _pump(client, upstream)
            return
        client.settimeout(0.3)
        data, deadline = b"", time.monotonic() + 10
        while time.monotonic() < deadline:  # the answer, once the client has gone quiet
            try:
                chunk = client.recv(65536)
            except TimeoutError:
                if data:
                    break
                continue
            if not chunk:
                break
            data += chunk
        self.recorded = data
        for sock in (client, upstream):
            _hang_up(sock)
        self.intercepted.set()

    def close(self) -> None:
        self.release.set()
        for sock in self._socks:
            _hang_up(sock)


def replay(address: tuple[str, int], data: bytes, timeout: float = 5.0) -> bytes:
    """Connect to ``address``, take its challenge, send ``data``; returns what it says after the
    challenge (until it closes, or ``timeout`` of silence)."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.recv(65536)  # the challenge: one small write, one segment on loopback
        sock.sendall(data)
        reply = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                reply += chunk
    return reply
