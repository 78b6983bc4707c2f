"""A side channel that tells every rank at once when one rank of the ring fails.

Ring watchdogs are progress-based: when a rank dies, only its neighbours stall at first, and the
others notice one timeout per hop later. This channel short-cuts that. Rank 0 runs a
:class:`HealthServer`; every rank (rank 0 included) holds one :class:`HealthClient` connected to
it. The wire format is newline-terminated UTF-8 lines:

- joining, a challenge–response over fresh nonces (:mod:`cuparing.comm.handshake`; the secret is
  the run token): server -> client ``CPRG-HEALTH <version> <server nonce hex>``; client -> server
  ``CPRG-HEALTH <version> <rank> <world> <client nonce hex> <proof hex>``; the server answers
  ``OK <its own proof hex>`` or ``REFUSED <reason>`` (and closes). Only a proven connection may
  report a failure, and a client accepts no ``ABORT`` from a server that did not prove itself, so
  a stranger who reaches the port can abort nothing; a recorded hello is useless on a new
  connection (a new nonce).
- client -> server: ``FAIL <rank> <reason>`` (its watchdog fired, NCCL failed), ``BYE`` (clean
  close: the connection ending after it means nothing).
- server -> clients: ``ABORT <rank> <reason>`` (rank ``rank`` failed), ``CLOSING`` (rank 0 closed
  its ring cleanly: the channel goes away when rank 0's process ends, which is not a failure).

A client whose connection ends without its ``BYE`` has died (the OS closes the sockets of a dead
process, ``os._exit`` and SIGKILL included): the server broadcasts ``ABORT <rank> connection
lost``. A client that loses the server without ``CLOSING`` reports rank 0 as failed. The server
broadcasts only the first failure (the cause; what follows is its consequence) and repeats it to
clients that connect later. TCP keepalive bounds how long a peer host that vanished without
closing its sockets (power loss, a cut cable) goes unnoticed (about 25 s). This module needs
neither CuPy nor a GPU.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable

from .handshake import Transcript, new_nonce
from .rendezvous import MAGIC, bind_host
from .sockets import DialTimeout, Retry, dial, tune

PROTOCOL = f"{MAGIC.decode()}-HEALTH"
VERSION = 2  # 2: challenge-response (1 sent sha256(run token))
_PURPOSE = "health"
_MAX_LINE = 4096  # a longer line is not ours: drop the connection
_POLL_S = 0.05  # how often the server thread looks at close requests


def encode_address(host: str, port: int) -> bytes:
    """``(host, port)`` as the bytes rank 0 appends to its rendezvous payload."""
    return f"{host} {port}".encode()


def decode_address(data: bytes) -> tuple[str, int] | None:
    """Inverse of :func:`encode_address`; empty bytes (rank 0 runs no channel) give ``None``."""
    if not data:
        return None
    host, port = data.decode().rsplit(" ", 1)
    return host, int(port)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[: _MAX_LINE // 2]


class _Peer:
    """The server's view of one connection."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buffer, self.rank, self.said_bye = sock, b"", None, False
        self.nonce = new_nonce()  # the challenge this connection must answer


class HealthServer:
    """Rank 0's relay of failures; serves in a daemon thread from construction on.

    Args:
        world_size: ranks expected (each may connect once).
        run_token: the run's token; clients must prove they know it (and the server proves it).
        host: interface to listen on (``""``: all).
        advertise: the host name other ranks connect to (what :meth:`address` reports).
    """

    def __init__(self, world_size: int, run_token: str, host: str = "", advertise: str = ""):
        self.world_size = world_size
        self._secret = run_token.encode()
        self._listener = socket.create_server((host, 0), backlog=max(16, world_size))
        port = self._listener.getsockname()[1]
        self.address = (advertise or host or socket.gethostname(), port)
        #: where a client in this process connects (an all-interfaces server is on loopback too)
        self.local_address = (host or "127.0.0.1", port)
        self._peers: dict[socket.socket, _Peer] = {}
        self._ranks: set[int] = set()  # ranks that said hello
        self._gone: set[int] = set()  # ranks whose connection ended (BYE or lost)
        self._abort: tuple[int, str] | None = None
        self._close_requested = self._stop_now = False
        self._announced = threading.Event()  # CLOSING went out
        self._thread = threading.Thread(target=self._run, name="cuparing-health-server",
                                        daemon=True)  # fmt: skip
        self._thread.start()

    @classmethod
    def for_rank0(cls, world_size: int, run_token: str, master_addr: str | None) -> HealthServer:
        """A server listening where rank 0's peers reach it: on ``master_addr`` (all interfaces
        unless that is loopback) or, without one, on this host's name."""
        host = bind_host(master_addr)
        return cls(world_size, run_token, host, master_addr or socket.gethostname())

    def close(self, linger: bool = True) -> None:
        """Announce ``CLOSING`` and stop serving; returns once ``CLOSING`` is sent (~0.05 s), so
        that the process may end right after without its end looking like a death.

        With ``linger`` the thread keeps relaying failures among the ranks still connected until
        every rank has said ``BYE`` or disconnected (or this process ends). Without, it closes
        every connection within ~0.1 s (see :meth:`join`). Idempotent.
        """
        self._close_requested = True
        self._stop_now = self._stop_now or not linger
        self._announced.wait(1.0)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the server thread to end; ``True`` if it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # --- the server thread ---

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._listener, selectors.EVENT_READ)
        announced = False
        try:
            while not self._stop_now:
                if self._close_requested and not announced:
                    announced = True
                    self._broadcast("CLOSING")
                    self._announced.set()
                if announced and self._gone >= set(range(self.world_size)):
                    break  # every rank is done with us
                for key, _ in selector.select(_POLL_S):
                    if key.fileobj is self._listener:
                        self._accept(selector)
                    elif key.fileobj in self._peers:
                        self._read(selector, self._peers[key.fileobj])
            if not announced:
                self._broadcast("CLOSING")
        finally:
            self._announced.set()
            for sock in [self._listener, *self._peers]:
                sock.close()
            selector.close()

    def _accept(self, selector) -> None:
        try:
            sock, _ = self._listener.accept()
        except OSError:
            return
        tune(sock, keepalive=True)  # notices are tiny and urgent; keepalive finds dead hosts
        sock.settimeout(1.0)  # bounds a send to a client that stopped reading
        peer = self._peers[sock] = _Peer(sock)
        selector.register(sock, selectors.EVENT_READ)
        self._send(peer, f"{PROTOCOL} {VERSION} {peer.nonce.hex()}")

    def _read(self, selector, peer: _Peer) -> None:
        try:
            data = peer.sock.recv(65536)
        except OSError:  # reset by a dying peer, or a keepalive timeout
            data = b""
        peer.buffer += data
        while b"\n" in peer.buffer and peer.sock in self._peers:
            line, peer.buffer = peer.buffer.split(b"\n", 1)
            self._handle(selector, peer, line.decode(errors="replace").strip())
        if peer.sock in self._peers and (not data or len(peer.buffer) > _MAX_LINE):
            self._drop(selector, peer)

    def _handle(self, selector, peer: _Peer, line: str) -> None:
        if peer.rank is None:
            reason, transcript = self._check_hello(peer, line)
            if reason is None:
                peer.rank = int(line.split()[2])
                self._ranks.add(peer.rank)
                self._send(peer, f"OK {transcript.server_proof(b'OK').hex()}")
                if self._abort is not None:  # it joined after the failure: tell it now
                    self._send(peer, "ABORT {} {}".format(*self._abort))
            else:
                self._send(peer, f"REFUSED {reason}")
                self._drop(selector, peer, refused=True)
        elif line == "BYE":
            peer.said_bye = True
            self._drop(selector, peer)
        elif line.startswith("FAIL "):
            # the connection's own rank, not the one claimed: a rank reports only itself
            self._failed(peer.rank, line.split(" ", 2)[2] if line.count(" ") >= 2 else "failed")

    def _check_hello(self, peer: _Peer, line: str) -> tuple[str | None, Transcript | None]:
        """``(None, transcript)`` for a proven hello of a rank this run still expects, else
        ``(reason, None)``."""
        words = line.split()
        if len(words) != 6 or words[0] != PROTOCOL:
            return "not a cuparing health hello", None
        if words[1] != str(VERSION):
            return f"protocol version {words[1]}, server speaks {VERSION}", None
        try:
            client_nonce, claimed = bytes.fromhex(words[4]), bytes.fromhex(words[5])
        except ValueError:
            return "not a cuparing health hello", None
        transcript = Transcript(self._secret, _PURPOSE, peer.nonce, client_nonce,
                                f"{words[2]} {words[3]}".encode())  # fmt: skip
        if not transcript.client_proven(claimed):
            return ("run token differs (no proof of it: a rank of another run, "
                    "CUPARING_RUN_TOKEN differs, or a replayed hello)"), None  # fmt: skip
        if words[3] != str(self.world_size):
            return f"world size {words[3]}, server has {self.world_size}", None
        if not (words[2].isdigit() and int(words[2]) < self.world_size):
            return f"rank {words[2]} is not in [0, {self.world_size})", None
        if int(words[2]) in self._ranks:
            return f"rank {words[2]} is already connected", None
        return None, transcript

    def _drop(self, selector, peer: _Peer, refused: bool = False) -> None:
        selector.unregister(peer.sock)
        del self._peers[peer.sock]
        peer.sock.close()
        if peer.rank is None or refused:
            return
        self._gone.add(peer.rank)
        if not peer.said_bye:
            self._failed(peer.rank, "connection lost (the process died or its host is gone)")

    def _failed(self, rank: int, reason: str) -> None:
        if self._abort is not None:
            return
        self._abort = (rank, _one_line(reason))
        self._broadcast("ABORT {} {}".format(*self._abort), skip=rank)

    def _broadcast(self, line: str, skip: int | None = None) -> None:
        for peer in list(self._peers.values()):
            if peer.rank is not None and peer.rank != skip:
                self._send(peer, line)

    def _send(self, peer: _Peer, line: str) -> None:
        # a failed send means that peer is gone too; its read side reports it
        with contextlib.suppress(OSError):
            peer.sock.sendall(line.encode() + b"\n")


class HealthClient:
    """One rank's connection to rank 0's :class:`HealthServer`.

    Connects and says hello in the constructor (retrying until ``connect_timeout``), then a daemon
    thread reads. ``on_abort(rank, reason)`` is called at most once, from that thread, when the
    server reports that ``rank`` failed, or with rank 0 when the connection to the server ends
    without the server having announced ``CLOSING`` and before :meth:`close`.

    Raises:
        RuntimeError: the server refused this rank (another run's token, a duplicate rank),
            could not prove it knows the run token, or could not be reached within
            ``connect_timeout``.
    """

    def __init__(self, address: tuple[str, int], rank: int, world_size: int, run_token: str,
                 on_abort: Callable[[int, str], None], connect_timeout: float = 10.0):  # fmt: skip
        self.rank, self.address = rank, tuple(address)
        self._on_abort = on_abort
        self._lock = threading.Lock()  # one writer at a time (report from any thread, close)
        self._closing = self._server_closing = self._fired = False
        self._sock, self._reader = self._connect(f"{rank} {world_size}", run_token.encode(),
                                                 connect_timeout)  # fmt: skip
        self._thread = threading.Thread(target=self._run, name=f"cuparing-health-rank{rank}",
                                        daemon=True)  # fmt: skip
        self._thread.start()

    def _connect(self, hello: str, secret: bytes, timeout: float):
        """Answer the server's challenge with ``hello`` (``"<rank> <world>"``) and a proof;
        returns the socket and its reader once the server has proven itself too."""
        server = f"the health server at {self._where()}"

        def handshake(sock: socket.socket):
            reader = sock.makefile("rb")
            try:
                return self._answer_challenge(sock, reader, hello, secret, server)
            except BaseException:
                reader.close()
                raise

        try:
            sock, reader = dial(self.address, time.monotonic() + timeout, handshake,
                                keepalive=True)  # fmt: skip
        except DialTimeout as exc:
            raise RuntimeError(
                f"rank {self.rank}: could not join {server} within {timeout:g} s (last error: "
                f"{exc.last_error})"
            ) from None
        sock.settimeout(None)  # from now on the reader blocks until a line or EOF
        return sock, reader

    def _answer_challenge(self, sock, reader, hello: str, secret: bytes, server: str):
        """The client's side of the module doc's join; returns ``reader`` once joined.

        Raises:
            Retry: not (yet) a cuparing health server at the address.
            RuntimeError: refused, mixed versions, or a server that cannot prove the token.
        """
        challenge = reader.readline(_MAX_LINE).decode(errors="replace").split()
        if len(challenge) != 3 or challenge[0] != PROTOCOL:
            raise Retry(f"not a cuparing health server (it said {' '.join(challenge)[:80]!r})")
        if challenge[1] != str(VERSION):
            raise RuntimeError(
                f"rank {self.rank}: {server} speaks protocol version {challenge[1]}, this rank "
                f"{VERSION} (mixed cuparing versions)"
            )
        try:
            server_nonce = bytes.fromhex(challenge[2])
        except ValueError:
            raise Retry("a malformed challenge") from None
        transcript = Transcript(secret, _PURPOSE, server_nonce, new_nonce(), hello.encode())
        sock.sendall(f"{PROTOCOL} {VERSION} {hello} {transcript.client_nonce.hex()} "
                     f"{transcript.client_proof().hex()}\n".encode())  # fmt: skip
        reply = reader.readline(_MAX_LINE).decode(errors="replace").strip()
        if reply.startswith("REFUSED"):
            raise RuntimeError(f"rank {self.rank}: {server} refused this rank: "
                               f"{reply[len('REFUSED ') :]}")  # fmt: skip
        words = reply.split()
        if len(words) != 2 or words[0] != "OK":
            raise Retry(f"unexpected reply {reply[:80]!r}")
        try:
            proven = transcript.server_proven(b"OK", bytes.fromhex(words[1]))
        except ValueError:
            proven = False
        if not proven:
            raise RuntimeError(f"rank {self.rank}: {server} could not prove it knows the run "
                               "token: it is not rank 0 of this run")  # fmt: skip
        return reader

    def _where(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    def report(self, reason: str) -> None:
        """Tell every other rank (through rank 0) that this rank failed. Never raises."""
        self._send(f"FAIL {self.rank} {_one_line(reason)}")

    def close(self) -> None:
        """Say ``BYE`` and stop the reader (waits ~1 s at most). Idempotent."""
        if self._closing:
            return
        self._closing = True
        self._send("BYE")
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)
        # the server closes its side on BYE; our reader then sees EOF and ends
        self._thread.join(1.0)
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # a server that did not answer: wake it
        self._thread.join(0.2)
        if not self._thread.is_alive():  # a reader still inside readline holds the buffer's lock
            self._reader.close()
        self._sock.close()

    def _send(self, line: str) -> None:
        with self._lock, contextlib.suppress(OSError):
            self._sock.sendall(line.encode() + b"\n")

    def _run(self) -> None:
        while True:
            try:
                raw = self._reader.readline(_MAX_LINE)
            except (OSError, ValueError):  # reset, keepalive timeout, or closed under us
                raw = b""
            if not raw:
                break
            words = raw.decode(errors="replace").strip().split(" ", 2)
            if words[0] == "ABORT" and len(words) >= 2 and words[1].isdigit():
                self._fire(int(words[1]), words[2] if len(words) > 2 else "failed")
            elif words[0] == "CLOSING":
                self._server_closing = True
        if not self._server_closing:
            self._fire(0, "connection to rank 0's health server lost (rank 0 died?)")

    def _fire(self, rank: int, reason: str) -> None:
        if self._closing or self._fired:
            return
        self._fired = True
        try:
            self._on_abort(rank, reason)
        except Exception as exc:  # noqa: BLE001 - a reader thread has nobody to raise to
            print(f"[cuparing] rank {self.rank}: health callback failed: {exc!r}",
                  file=sys.stderr, flush=True)  # fmt: skip
