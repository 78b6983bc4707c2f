"""Who am I in the job, and how the ranks agree on an NCCL unique id.

:class:`RankInfo` reads rank, world size and local rank from the launcher's environment
(torchrun, Open MPI, MPICH/Hydra, Slurm, or :mod:`cuparing.launch`). :func:`exchange_payload`
hands rank 0's setup bytes (the 128-byte NCCL id, plus where its failure channel listens: see
:mod:`cuparing.comm.health`) to every other rank. Three routes:

- TCP (default): rank 0 serves the id at ``master_addr:master_port`` until every other rank has
  fetched it; the others connect with retry and backoff.
- a file (``init_file=path``) on a file system every rank sees: rank 0 writes it atomically, the
  others poll for it and acknowledge; rank 0 removes it once everyone has read it.
- torchrun's agent store: under torchrun (``TORCHELASTIC_USE_AGENT_STORE=True``) the launcher
  process itself listens on ``MASTER_PORT``, so we cannot bind it; the id goes through that
  store instead (torch is importable there by definition).

Who may fetch the id over TCP: a rank that proves it knows the run token, by a challenge–response
over fresh nonces (:mod:`cuparing.comm.handshake`); rank 0 proves it too, with the id it hands
out. A stray connection, a rank of another job that reuses the port, a replayed hello or a
stranger posing as rank 0 is refused. The file route carries the same kind of proof and is
readable by its owner only. The token is ``CUPARING_RUN_TOKEN`` (``cuparing.launch`` sets a random
one), else one rank 0 makes and shares through torchrun's store (:func:`share_run_token`), else
one derived from ``MASTER_PORT`` and the world size, which keeps other runs out but not someone
who guesses it (README, "On GPUs", says what protects a run under each launcher). This module
needs neither CuPy nor a GPU.
"""

from __future__ import annotations

import dataclasses
import errno
import hmac
import os
import re
import secrets
import socket
import struct
import tempfile
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .handshake import NONCE_BYTES, PROOF_BYTES, Transcript, new_nonce, proof
from .sockets import DialTimeout, Retry, dial, recv_exact

UNIQUE_ID_BYTES = 128
MAGIC = b"CPRG"
VERSION = 3  # 3: challenge-response (2 sent sha256(token), 1 carried exactly UNIQUE_ID_BYTES)
MAX_PAYLOAD = 1 << 16
# server -> client, at once: magic, version, the server's nonce
_CHALLENGE = struct.Struct(f"!4sH{NONCE_BYTES}s")
# client -> server: magic, version, rank, world size (the hello), then its nonce and proof
_HELLO = struct.Struct("!4sHII")
# server -> client: magic, version, status, _LENGTH, then the payload (ok) or a UTF-8 reason
# (refused), then the server's proof of all of that
_REPLY = struct.Struct("!4sHB")
_LENGTH = struct.Struct("!I")
_OK, _REFUSED = 0, 1
_PURPOSE, _FILE_PURPOSE = "rendezvous", "rendezvous-file"
# ports derived from a job id stay below Linux's default ephemeral range (32768-60999), where the
# kernel hands out client ports that could already hold the one we derive
_DERIVED_PORT_BASE, _DERIVED_PORT_SPAN = 15000, 17000


@dataclass(frozen=True)
class RankInfo:
    """This process's place in the job.

    Attributes:
        rank: global rank, ``0 <= rank < world_size``.
        world_size: number of processes (one per GPU).
        local_rank: rank among the processes of this host; selects the GPU.
        master_addr: host of rank 0 (``None`` when the launcher gives none: then only
            ``init_file`` rendezvous works, unless ``world_size == 1``).
        master_port: port rank 0 serves the unique id on (``None`` likewise).
        run_token: shared by the ranks of one run; every channel demands proof of it.
        launcher: which environment family was read (``"torchrun"``, ``"openmpi"``,
            ``"mpich"``, ``"slurm"`` or ``"none"``).
        token_source: where ``run_token`` came from: ``"env"`` (``CUPARING_RUN_TOKEN``),
            ``"derived"`` (from the port and world size: guessable), ``"torchrun-store"``
            (random, shared by :func:`share_run_token`) or ``"given"`` (built by hand).
    """

    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None = None
    master_port: int | None = None
    run_token: str = ""
    launcher: str = "none"
    token_source: str = "given"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RankInfo:
        """Read the launcher's variables (``os.environ`` by default).

        Families are tried in this order, the first whose rank variable is set wins:
        torchrun (``RANK WORLD_SIZE LOCAL_RANK MASTER_ADDR MASTER_PORT``), Open MPI
        (``OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK``), MPICH/Hydra (``PMI_RANK PMI_SIZE
        MPI_LOCALRANKID``), Slurm (``SLURM_PROCID SLURM_NTASKS SLURM_LOCALID``). None set: a world
        of 1. ``MASTER_ADDR``/``MASTER_PORT`` override the address for every family; Slurm
        otherwise uses the first host of ``SLURM_JOB_NODELIST`` and a port derived from
        ``SLURM_JOB_ID``; MPI families derive a port from their job id and use 127.0.0.1 when
        all ranks share one host.

        Raises:
            ValueError: a variable is not an integer, is out of range, or the family is incomplete
                (the message names the variable and its value).
        """
        env = os.environ if env is None else env
        for reader in (_torchrun, _openmpi, _mpich, _slurm):
            info = reader(env)
            if info is not None:
                return info
        return cls(0, 1, 0, None, None, *_run_token(env, None, 1, "none"))


def _int(env: Mapping[str, str], name: str, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None:
        raise ValueError(f"{name} is not set but the launcher's other variables are")
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {name}={raw!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {name}={value}")
    return value


def _optional_int(env: Mapping[str, str], name: str, minimum: int = 0) -> int | None:
    return _int(env, name, minimum) if env.get(name) is not None else None


def _port(env: Mapping[str, str], name: str = "MASTER_PORT") -> int | None:
    port = _optional_int(env, name, 1)
    if port is not None and port > 65535:
        raise ValueError(f"{name} must be a TCP port in [1, 65535], got {name}={port}")
    return port


def _derived_port(seed: str) -> int:
    return _DERIVED_PORT_BASE + zlib.crc32(seed.encode()) % _DERIVED_PORT_SPAN


def _run_token(env: Mapping[str, str], port: int | None, world_size: int,
               launcher: str) -> tuple[str, str, str]:  # fmt: skip
    """``(run_token, launcher, token_source)``: the last three fields of a :class:`RankInfo`."""
    token = env.get("CUPARING_RUN_TOKEN")
    if token:
        return token, launcher, "env"
    return f"port={port}/world={world_size}", launcher, "derived"


def _finish(
    env, launcher, rank, world, local_rank, names, addr, port, default_addr=None
) -> RankInfo:
    rank_name, world_name, local_name = names
    if world < 1:
        raise ValueError(f"{world_name} must be >= 1, got {world_name}={world}")
    if rank >= world:
        raise ValueError(f"{rank_name}={rank} must be < {world_name}={world}")
    if local_rank >= world:
        raise ValueError(f"{local_name}={local_rank} must be < {world_name}={world}")
    addr = env.get("MASTER_ADDR") or addr or default_addr
    port = _port(env) or port
    return RankInfo(rank, world, local_rank, addr, port, *_run_token(env, port, world, launcher))


def _torchrun(env):
    if env.get("RANK") is None:
        return None
    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE", 1)
    local = _int(env, "LOCAL_RANK") if world > 1 or env.get("LOCAL_RANK") else 0
    return _finish(env, "torchrun", rank, world, local, ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
                   None, None)  # fmt: skip


def _single_host_addr(env, local_size_name: str, world: int) -> str | None:
    local_size = _optional_int(env, local_size_name, 1)
    return "127.0.0.1" if local_size == world else None


def _mpi(env, launcher: str, names: tuple[str, str, str], job_names: tuple[str, ...],
         local_size_name: str, seed: str):  # fmt: skip
    """An MPI family's :class:`RankInfo`: a port derived from its job id, loopback when every
    rank is on this host (``local_size_name`` equals the world size)."""
    if env.get(names[0]) is None:
        return None
    rank, world, local = _int(env, names[0]), _int(env, names[1], 1), _int(env, names[2])
    job = next((env[name] for name in job_names if env.get(name)), None)
    port = _derived_port(f"{seed}/{job}") if job else None
    addr = _single_host_addr(env, local_size_name, world)
    return _finish(env, launcher, rank, world, local, names, addr, port)


def _openmpi(env):
    return _mpi(env, "openmpi",
                ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
                ("OMPI_MCA_ess_base_jobid", "PMIX_NAMESPACE", "PMIX_ID"),
                "OMPI_COMM_WORLD_LOCAL_SIZE", "ompi")  # fmt: skip


def _mpich(env):
    return _mpi(env, "mpich", ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
                ("PMI_KVSNAME", "PMI_JOBID"), "MPI_LOCALNRANKS", "pmi")  # fmt: skip


def _slurm(env):
    if env.get("SLURM_PROCID") is None:
        return None
    names = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
    rank, world, local = _int(env, names[0]), _int(env, names[1], 1), _int(env, names[2])
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    addr = first_host(nodelist) if nodelist and not env.get("MASTER_ADDR") else None
    job = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    # two job steps of one allocation may run side by side: keep their ports apart
    port = _derived_port(f"slurm/{job}/{env.get('SLURM_STEP_ID', '')}") if job else None
    return _finish(env, "slurm", rank, world, local, names, addr, port)


# each launcher family's count of the ranks on this host (Slurm: its count of nodes, below)
_LOCAL_SIZE_VARIABLES = {"torchrun": "LOCAL_WORLD_SIZE", "openmpi": "OMPI_COMM_WORLD_LOCAL_SIZE",
                         "mpich": "MPI_LOCALNRANKS"}  # fmt: skip
_SLURM_NODE_COUNTS = ("SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES")


def on_one_host(info: RankInfo, env: Mapping[str, str] | None = None) -> bool:
    """Whether the launcher says that every rank of ``info``'s job runs on this host: its count
    of this host's ranks (``LOCAL_WORLD_SIZE``, ``OMPI_COMM_WORLD_LOCAL_SIZE``,
    ``MPI_LOCALNRANKS``) equals the world size, or Slurm's step spans one node (the first of
    ``SLURM_STEP_NUM_NODES``, ``SLURM_NNODES``, ``SLURM_JOB_NUM_NODES`` that is set is 1). A
    world of one is on one host; where the launcher does not say, or says it unreadably, False.
    Every rank of a job reads the same answer from its launcher."""
    env = os.environ if env is None else env
    if info.world_size == 1:
        return True
    if info.launcher == "slurm":
        names = [name for name in _SLURM_NODE_COUNTS if env.get(name)]
        return bool(names) and env[names[0]].strip() == "1"
    name = _LOCAL_SIZE_VARIABLES.get(info.launcher)
    if name is None or not env.get(name):
        return False
    try:
        return int(env[name].strip()) == info.world_size
    except ValueError:
        return False


_HOSTLIST_ITEM = re.compile(r"^([^\[\],]*)\[([0-9,\-]+)\]([^\[\],]*)$")


def first_host(nodelist: str) -> str:
    """The first host of a Slurm host list: ``"gpu[07-09,12],cpu1"`` -> ``"gpu07"``.

    Handles plain names and one bracket group per item (zero padding kept).

    Raises:
        ValueError: a list this parser cannot read; set ``MASTER_ADDR`` instead.
    """
    text = nodelist.strip()
    depth, end = 0, len(text)
    for i, ch in enumerate(text):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    item = text[:end]
    if item and "[" not in item and "]" not in item:
        return item
    match = _HOSTLIST_ITEM.match(item)
    if not match:
        raise ValueError(
            f"cannot read the first host of SLURM_JOB_NODELIST={nodelist!r}; set MASTER_ADDR"
        )
    prefix, ranges, suffix = match.groups()
    first = ranges.split(",")[0].split("-")[0]
    if not first.isdigit():
        raise ValueError(
            f"cannot read the first host of SLURM_JOB_NODELIST={nodelist!r}; set MASTER_ADDR"
        )
    return f"{prefix}{first}{suffix}"


# ---------------------------------------------------------------------------------------------
# unique-id exchange


def exchange_payload(
    info: RankInfo,
    make_payload: Callable[[], bytes],
    timeout: float = 300.0,
    init_file: str | os.PathLike | None = None,
) -> bytes:
    """Give rank 0's bytes to every rank (by the route the module doc describes).

    Args:
        info: this rank's :class:`RankInfo`.
        make_payload: called on rank 0 only; at most :data:`MAX_PAYLOAD` bytes.
        timeout: seconds the whole exchange may take on this rank.
        init_file: use this file (on a file system all ranks share) instead of TCP.

    Returns:
        Rank 0's bytes, on every rank.

    Raises:
        RuntimeError: timeout (the message names the ranks waited for and the address or file),
            a peer of another run (token mismatch), or the port is taken.
        ValueError: no address to meet at (``MASTER_ADDR``/``MASTER_PORT`` unset, no init_file).
    """

    def make() -> bytes:
        payload = bytes(make_payload())
        if len(payload) > MAX_PAYLOAD:
            raise ValueError(f"a rendezvous payload has at most {MAX_PAYLOAD} bytes")
        return payload

    if info.world_size == 1:
        return make()
    if init_file is not None:
        return _file_exchange(info, make, timeout, os.fspath(init_file))
    store_class = _torchrun_store_class(info)
    if store_class is not None:
        return _store_share(info, store_class, "uid", make, timeout)
    if info.master_addr is None or info.master_port is None:
        raise ValueError(
            f"rank {info.rank}: no rendezvous address (launcher {info.launcher!r} gave "
            f"MASTER_ADDR={info.master_addr!r}, MASTER_PORT={info.master_port!r}); set both, "
            "or pass init_file= a path every rank can read"
        )
    if info.rank == 0:
        payload = make()
        _serve(info, payload, timeout)
        return payload
    return _fetch(info, timeout)


def id_bytes(raw) -> bytes:
    """A unique id as 128 bytes (accepts bytes or a tuple of ints, signed or not)."""
    data = bytes(raw) if isinstance(raw, (bytes, bytearray)) else bytes(x & 0xFF for x in raw)
    if len(data) != UNIQUE_ID_BYTES:
        raise RuntimeError(f"an NCCL unique id has {UNIQUE_ID_BYTES} bytes, got {len(data)}")
    return data


def bind_host(addr: str | None) -> str:
    """The interface rank 0 listens on when peers reach it as ``addr``: ``addr`` itself if it is
    a loopback address (the job is confined to this host), else every interface (``""``), since
    other hosts reach rank 0 by whatever name ``addr`` resolves to there."""
    if addr is None:
        return ""
    try:
        loopback = socket.gethostbyname(addr).startswith("127.")
    except OSError:
        loopback = False
    return addr if loopback else ""


# how long rank 0 retries a MASTER_PORT that is in use (at most the rendezvous' timeout): long
# enough for a brief holder to let go (a rank's dial that connected to itself before rank 0
# listened, reset at once by ``dial``), short enough that a port another job holds fails fast
_BIND_PATIENCE = 3.0


def _listen(info: RankInfo, patience: float = _BIND_PATIENCE) -> socket.socket:
    host = bind_host(info.master_addr)
    deadline = time.monotonic() + patience
    while True:
        try:
            return socket.create_server((host, info.master_port),
                                        backlog=max(16, info.world_size))  # fmt: skip
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE and time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            raise RuntimeError(
                f"rank 0: cannot listen on {host or '*'}:{info.master_port} for the NCCL "
                f"unique-id rendezvous ({exc}); another job may hold the port: pick another "
                "MASTER_PORT"
            ) from exc


def _serve(info: RankInfo, payload: bytes, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    waiting = set(range(1, info.world_size))
    where = f"{info.master_addr}:{info.master_port}"
    with _listen(info, min(_BIND_PATIENCE, timeout)) as server:
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(
                    f"rank 0: rank(s) {sorted(waiting)} of {info.world_size} did not fetch the "
                    f"NCCL unique id from {where} within {timeout:g} s; are they running, and do "
                    "they see the same MASTER_ADDR/MASTER_PORT (and CUPARING_RUN_TOKEN)?"
                )
            server.settimeout(min(left, 1.0))
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                served = _answer(conn, info, payload, min(5.0, max(left, 0.1)))
            if served is not None:
                waiting.discard(served)


def _answer(conn: socket.socket, info: RankInfo, payload: bytes, io_timeout: float) -> int | None:
    """Challenge one client; hand it the payload if it proves the run token and fits this run,
    else a refusal. Returns the rank served, or ``None``."""
    conn.settimeout(io_timeout)
    server_nonce = new_nonce()
    try:
        conn.sendall(_CHALLENGE.pack(MAGIC, VERSION, server_nonce))
        hello = recv_exact(conn, _HELLO.size)
        magic, version, rank, world = _HELLO.unpack(hello)
        if magic != MAGIC:
            return None  # a stray connection (port scan, health check): ignore it
        answer = recv_exact(conn, NONCE_BYTES + PROOF_BYTES)
    except (OSError, struct.error):
        return None
    transcript = Transcript(info.run_token.encode(), _PURPOSE, server_nonce,
                            answer[:NONCE_BYTES], hello)  # fmt: skip
    reason = None
    if version != VERSION:
        reason = f"protocol version {version}, server speaks {VERSION}"
    elif not transcript.client_proven(answer[NONCE_BYTES:]):
        reason = ("run token differs (no proof of it: a rank of another run, CUPARING_RUN_TOKEN "
                  "differs, or a replayed hello)")  # fmt: skip
    elif world != info.world_size:
        reason = f"world size {world}, server has {info.world_size}"
    elif not 0 < rank < info.world_size:
        reason = f"rank {rank} is not in [1, {info.world_size})"
    status, body = (_OK, payload) if reason is None else (_REFUSED, reason.encode())
    reply = _REPLY.pack(MAGIC, VERSION, status) + _LENGTH.pack(len(body)) + body
    try:
        conn.sendall(reply + transcript.server_proof(reply))
        if reason is not None:
            return None
        # let the client close first, so TIME_WAIT lands on its port, not on MASTER_PORT (which a
        # torch.distributed store may want to bind right after us)
        conn.recv(1)
    except OSError:
        return None
    return rank


def _fetch(info: RankInfo, timeout: float) -> bytes:
    where = (info.master_addr, info.master_port)
    server = f"the rendezvous server at {where[0]}:{where[1]}"
    hello = _HELLO.pack(MAGIC, VERSION, info.rank, info.world_size)

    def handshake(conn: socket.socket) -> bytes:
        magic, version, server_nonce = _CHALLENGE.unpack(recv_exact(conn, _CHALLENGE.size))
        if magic != MAGIC:
            raise Retry(f"not a cuparing rendezvous server (magic {magic!r})")
        if version != VERSION:
            raise RuntimeError(
                f"rank {info.rank}: {server} speaks protocol version {version}, this rank "
                f"{VERSION} (mixed cuparing versions)"
            )
        transcript = Transcript(info.run_token.encode(), _PURPOSE, server_nonce, new_nonce(),
                                hello)  # fmt: skip
        conn.sendall(hello + transcript.client_nonce + transcript.client_proof())
        head = recv_exact(conn, _REPLY.size + _LENGTH.size)
        _, _, status = _REPLY.unpack(head[: _REPLY.size])
        (length,) = _LENGTH.unpack(head[_REPLY.size :])
        if length > MAX_PAYLOAD:
            raise Retry(f"a reply of {length} bytes announced")
        body = recv_exact(conn, length)
        if status != _OK:  # unproven, but a refusal gives nothing away: report it as it came
            raise RuntimeError(
                f"rank {info.rank}: {server} refused this rank: {body.decode(errors='replace')}"
            )
        if not transcript.server_proven(head + body, recv_exact(conn, PROOF_BYTES)):
            raise RuntimeError(
                f"rank {info.rank}: {server} could not prove it knows the run token: it is not "
                "rank 0 of this run (another process holds MASTER_PORT?)"
            )
        return body

    try:
        conn, payload = dial(where, time.monotonic() + timeout, handshake)
    except DialTimeout as exc:
        raise RuntimeError(
            f"rank {info.rank}: could not fetch the NCCL unique id from rank 0 at "
            f"{where[0]}:{where[1]} within {timeout:g} s (last error: {exc.last_error}); is "
            "rank 0 running, and do all ranks see the same MASTER_ADDR/MASTER_PORT?"
        ) from None
    conn.close()
    return payload


# --- file route ---


def _file_record(info: RankInfo, payload: bytes) -> bytes:
    """Magic, version, a fresh nonce, rank 0's proof of (nonce, payload), then the payload."""
    nonce = new_nonce()
    seal = proof(info.run_token.encode(), _FILE_PURPOSE, "rank0", nonce, payload)
    return _REPLY.pack(MAGIC, VERSION, _OK) + nonce + seal + _LENGTH.pack(len(payload)) + payload


def _parse_record(data: bytes, run_token: str) -> bytes | None:
    """The payload of a complete record of this run and version, else ``None``."""
    header = _REPLY.size + NONCE_BYTES + PROOF_BYTES
    if len(data) < header + _LENGTH.size:
        return None
    magic, version, _ = _REPLY.unpack(data[: _REPLY.size])
    nonce = data[_REPLY.size : _REPLY.size + NONCE_BYTES]
    seal = data[_REPLY.size + NONCE_BYTES : header]
    (length,) = _LENGTH.unpack(data[header : header + _LENGTH.size])
    payload = data[header + _LENGTH.size :]
    if magic != MAGIC or version != VERSION or len(payload) != length:
        return None
    expected = proof(run_token.encode(), _FILE_PURPOSE, "rank0", nonce, payload)
    return payload if hmac.compare_digest(seal, expected) else None


def _write_atomic(path: str, data: bytes, mode: int = 0o644) -> None:
    # mkstemp: a fresh name created exclusively (O_EXCL, no link followed) with mode 0600, so no
    # other user can plant the temporary file or a link under it and read what is written
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # readers see the old file or the whole new one, never a torn write
    except BaseException:
        _remove(tmp)
        raise


def _ack_path(path: str, rank: int) -> str:
    return f"{path}.ack{rank}"


def _file_exchange(info, make_payload, timeout, path) -> bytes:
    deadline = time.monotonic() + timeout
    if info.rank == 0:
        payload = make_payload()
        for rank in range(1, info.world_size):  # acknowledgements of an earlier run
            _remove(_ack_path(path, rank))
        # owner-only: whoever can read the id can join NCCL's bootstrap
        _write_atomic(path, _file_record(info, payload), mode=0o600)
        waiting = set(range(1, info.world_size))
        while waiting:
            waiting = {r for r in waiting if not os.path.exists(_ack_path(path, r))}
            if not waiting:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"rank 0: rank(s) {sorted(waiting)} of {info.world_size} did not read the "
                    f"NCCL unique id from {path!r} within {timeout:g} s; do they see this file?"
                )
            time.sleep(0.02)
        # everyone has it: remove it, so a later run with the same path never reads a stale id
        for p in [path] + [_ack_path(path, r) for r in range(1, info.world_size)]:
            _remove(p)
        return payload
    while True:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            data = b""
        # a file of another run (token differs) may still be there: wait for rank 0 to replace it
        payload = _parse_record(data, info.run_token)
        if payload is not None:
            _write_atomic(_ack_path(path, info.rank), b"")
            return payload
        if time.monotonic() > deadline:
            found = "no such file" if not data else "a file of another run or version"
            raise RuntimeError(
                f"rank {info.rank}: rank 0 did not publish the NCCL unique id in {path!r} within "
                f"{timeout:g} s ({found}); is rank 0 running with the same init_file?"
            )
        time.sleep(0.02)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


# --- torchrun's store: the unique id under the agent store, and the run token ---

# shares made so far, by rank (one process holds one rank; tests run several in threads): every
# rank shares through the store in the same order, so its n-th key is every rank's n-th key
_store_calls: dict[int, int] = {}


def _torchrun_store_class(info: RankInfo):
    """torch's ``TCPStore`` when torchrun launched us and its agent serves a store at
    ``MASTER_ADDR:MASTER_PORT`` (``TORCHELASTIC_USE_AGENT_STORE=True``), else ``None``."""
    if info.launcher != "torchrun" or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    try:
        from torch.distributed import TCPStore
    except ImportError:
        return None
    return TCPStore


def _store_share(info: RankInfo, store_class, name: str, make: Callable[[], bytes],
                 timeout: float) -> bytes:  # fmt: skip
    """Rank 0's ``make()`` through torchrun's store, on every rank."""
    import datetime

    count = _store_calls[info.rank] = _store_calls.get(info.rank, 0) + 1
    # a restarted attempt of the run meets the same store: its keys must be new
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    key = f"cuparing/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{attempt}/{name}{count}"
    where = f"{info.master_addr}:{info.master_port}"
    try:
        store = store_class(
            info.master_addr, info.master_port, info.world_size, False,
            timeout=datetime.timedelta(seconds=timeout),
        )  # fmt: skip
        if info.rank == 0:
            value = make()
            store.set(key, value)
            return value
        return bytes(store.get(key))
    except RuntimeError as exc:
        raise RuntimeError(
            f"rank {info.rank}: sharing the {name} through torchrun's store at {where} failed "
            f"within {timeout:g} s: {exc}"
        ) from exc


def share_run_token(info: RankInfo, timeout: float = 300.0) -> RankInfo:
    """``info`` with the run token every rank will prove it knows.

    A token from ``CUPARING_RUN_TOKEN`` (or given by hand) stays. A derived one (guessable) is
    replaced, under torchrun with its agent store and torch importable, by a random token rank
    0 makes and shares through that store (``token_source="torchrun-store"``); elsewhere it
    stays, and only ``CUPARING_RUN_TOKEN`` can make the run harder to join (README, "On GPUs").
    Collective under torchrun: every rank calls it at the same point.

    Raises:
        RuntimeError: the store could not be reached within ``timeout``.
    """
    if info.token_source != "derived" or info.world_size == 1:
        return info
    store_class = _torchrun_store_class(info)
    if store_class is None:
        return info
    token = _store_share(info, store_class, "token", lambda: secrets.token_hex(32).encode(),
                         timeout).decode()  # fmt: skip
    return dataclasses.replace(info, run_token=token, token_source="torchrun-store")
