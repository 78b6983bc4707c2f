"""Rank discovery from every launcher's variables, the NCCL unique-id exchange, and who may join
(challenge–response, the run token's sources); no GPU."""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import sys
import threading
import time
import types

import pytest
from wiretap import Wiretap, replay

from cuparing.comm import rendezvous, sockets
from cuparing.comm.rendezvous import (
    MAGIC,
    UNIQUE_ID_BYTES,
    VERSION,
    RankInfo,
    exchange_payload,
    first_host,
    id_bytes,
    share_run_token,
)
from cuparing.launch import free_port

# --- environment parsing ---


def test_no_launcher_is_a_world_of_one():
    info = RankInfo.from_env({})
    assert (info.rank, info.world_size, info.local_rank, info.launcher) == (0, 1, 0, "none")


def test_torchrun():
    env = dict(RANK="3", WORLD_SIZE="8", LOCAL_RANK="1", MASTER_ADDR="node7", MASTER_PORT="29500")
    info = RankInfo.from_env(env)
    assert (info.rank, info.world_size, info.local_rank) == (3, 8, 1)
    assert (info.master_addr, info.master_port, info.launcher) == ("node7", 29500, "torchrun")
    assert info.run_token == "port=29500/world=8"


def test_run_token_from_env_wins():
    env = dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_PORT="1234",
               CUPARING_RUN_TOKEN="abc")  # fmt: skip
    assert RankInfo.from_env(env).run_token == "abc"


def test_openmpi_single_host_gets_loopback_and_derived_port():
    env = dict(OMPI_COMM_WORLD_RANK="2", OMPI_COMM_WORLD_SIZE="4", OMPI_COMM_WORLD_LOCAL_RANK="2",
               OMPI_COMM_WORLD_LOCAL_SIZE="4", OMPI_MCA_ess_base_jobid="777")  # fmt: skip
    info = RankInfo.from_env(env)
    assert (info.rank, info.world_size, info.local_rank, info.launcher) == (2, 4, 2, "openmpi")
    assert info.master_addr == "127.0.0.1"
    assert 15000 <= info.master_port < 32000
    assert RankInfo.from_env(env).master_port == info.master_port  # every rank derives the same


def test_openmpi_multi_host_needs_master_addr():
    env = dict(OMPI_COMM_WORLD_RANK="5", OMPI_COMM_WORLD_SIZE="16", OMPI_COMM_WORLD_LOCAL_RANK="5",
               OMPI_COMM_WORLD_LOCAL_SIZE="8")  # fmt: skip
    assert RankInfo.from_env(env).master_addr is None
    env.update(MASTER_ADDR="head", MASTER_PORT="4000")
    info = RankInfo.from_env(env)
    assert (info.master_addr, info.master_port) == ("head", 4000)


def test_mpich_hydra():
    env = dict(PMI_RANK="1", PMI_SIZE="2", MPI_LOCALRANKID="1", MPI_LOCALNRANKS="2",
               PMI_KVSNAME="kvs_42_0")  # fmt: skip
    info = RankInfo.from_env(env)
    assert (info.rank, info.world_size, info.local_rank, info.launcher) == (1, 2, 1, "mpich")
    assert info.master_addr == "127.0.0.1" and info.master_port is not None


def test_slurm_nodelist_and_job_port():
    env = dict(SLURM_PROCID="9", SLURM_NTASKS="16", SLURM_LOCALID="1",
               SLURM_JOB_NODELIST="gpu[007-008,010],login1", SLURM_JOB_ID="123456")  # fmt: skip
    info = RankInfo.from_env(env)
    assert (info.rank, info.world_size, info.local_rank, info.launcher) == (9, 16, 1, "slurm")
    assert info.master_addr == "gpu007"
    other_step = RankInfo.from_env({**env, "SLURM_STEP_ID": "1"})
    assert info.master_port != other_step.master_port  # concurrent steps do not collide
    explicit = RankInfo.from_env({**env, "MASTER_ADDR": "h", "MASTER_PORT": "555"})
    assert (explicit.master_addr, explicit.master_port) == ("h", 555)


def test_launcher_precedence_torchrun_over_slurm_over_nothing():
    env = dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", SLURM_PROCID="0", SLURM_NTASKS="1",
               SLURM_LOCALID="0", OMPI_COMM_WORLD_RANK="0", OMPI_COMM_WORLD_SIZE="1",
               OMPI_COMM_WORLD_LOCAL_RANK="0")  # fmt: skip
    assert RankInfo.from_env(env).launcher == "torchrun"
    del env["RANK"]
    assert RankInfo.from_env(env).launcher == "openmpi"
    for key in [k for k in env if k.startswith("OMPI")]:
        del env[key]
    assert RankInfo.from_env(env).launcher == "slurm"


@pytest.mark.parametrize(
    "env, names",
    [
        (dict(RANK="x", WORLD_SIZE="2", LOCAL_RANK="0"), "RANK must be an integer"),
        (dict(RANK="2", WORLD_SIZE="2", LOCAL_RANK="0"), "RANK=2 must be < WORLD_SIZE=2"),
        (dict(RANK="0", WORLD_SIZE="0", LOCAL_RANK="0"), "WORLD_SIZE must be >= 1"),
        (dict(RANK="0", LOCAL_RANK="0"), "WORLD_SIZE is not set"),
        (dict(RANK="1", WORLD_SIZE="2"), "LOCAL_RANK is not set"),
        (dict(RANK="-1", WORLD_SIZE="2", LOCAL_RANK="0"), "RANK must be >= 0"),
        (dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_PORT="70000"), "MASTER_PORT"),
        (dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_PORT="http"), "MASTER_PORT"),
        (dict(OMPI_COMM_WORLD_RANK="4", OMPI_COMM_WORLD_SIZE="4", OMPI_COMM_WORLD_LOCAL_RANK="0"),
         "OMPI_COMM_WORLD_RANK=4 must be < OMPI_COMM_WORLD_SIZE=4"),
        (dict(PMI_RANK="0", PMI_SIZE="2.5", MPI_LOCALRANKID="0"), "PMI_SIZE must be an integer"),
        (dict(SLURM_PROCID="0", SLURM_NTASKS="2"), "SLURM_LOCALID is not set"),
        (dict(SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_LOCALID="0",
              SLURM_JOB_NODELIST="a[1-2]b[3-4]"), "SLURM_JOB_NODELIST"),
    ],
)  # fmt: skip
def test_inconsistent_env_names_the_variable(env, names):
    with pytest.raises(ValueError, match=names.replace("[", r"\[").replace(".", r"\.")):
        RankInfo.from_env(env)


@pytest.mark.parametrize(
    "nodelist, host",
    [
        ("node1", "node1"),
        ("node1,node2", "node1"),
        ("gpu[07-09,12]", "gpu07"),
        ("gpu[3,1],cpu[1-2]", "gpu3"),
        ("rack1-n[0010-0020].cluster", "rack1-n0010.cluster"),
    ],
)
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host


# --- unique-id exchange ---


def _info(rank, world, port, token="t", addr="127.0.0.1"):
    return RankInfo(rank, world, rank, addr, port, token, "torchrun")


def _run_ranks(world, target):
    """Run ``target(rank)`` on ``world`` threads; returns (results, errors) by rank."""
    results, errors = {}, {}

    def run(rank):
        try:
            results[rank] = target(rank)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            errors[rank] = exc

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results, errors


def test_world_of_one_needs_no_network():
    uid = os.urandom(UNIQUE_ID_BYTES)
    assert exchange_payload(RankInfo(0, 1, 0), lambda: uid) == uid


def test_id_bytes_accepts_cupy_tuple_form():
    raw = bytes(range(128))
    signed = tuple(b - 256 if b > 127 else b for b in raw)
    assert id_bytes(signed) == raw and id_bytes(raw) == raw
    with pytest.raises(RuntimeError, match="128 bytes"):
        id_bytes(b"short")


@pytest.mark.parametrize("delay_rank0", [0.0, 0.4])
def test_tcp_exchange_four_ranks(delay_rank0):
    port, uid = free_port(), os.urandom(UNIQUE_ID_BYTES)
    calls = []

    def rank_fn(rank):
        if rank == 0:
            time.sleep(delay_rank0)  # clients must retry until rank 0 listens
        return exchange_payload(_info(rank, 4, port), lambda: calls.append(1) or uid, timeout=20)

    results, errors = _run_ranks(4, rank_fn)
    assert not errors, errors
    assert [results[r] for r in range(4)] == [uid] * 4
    assert calls == [1]  # only rank 0 made the id


def test_stray_connection_is_ignored():
    port, uid = free_port(), os.urandom(UNIQUE_ID_BYTES)
    server = threading.Thread(
        target=lambda: exchange_payload(_info(0, 2, port), lambda: uid, timeout=20)
    )
    server.start()
    deadline = time.monotonic() + 10
    while True:  # a port scanner: connect, send junk, go away
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET / HTTP/1.0\r\n\r\n" + b"x" * 64)
            break
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert exchange_payload(_info(1, 2, port), lambda: b"", timeout=20) == uid
    server.join(20)
    assert not server.is_alive()


def test_wrong_token_is_refused():
    port, uid = free_port(), os.urandom(UNIQUE_ID_BYTES)

    def rank_fn(rank):
        token = "run-A" if rank == 0 else "run-B"
        return exchange_payload(_info(rank, 2, port, token), lambda: uid, timeout=2)

    results, errors = _run_ranks(2, rank_fn)
    assert not results
    assert "refused" in str(errors[1]) and "run token" in str(errors[1])
    # rank 0 never handed out the id, and says whom it waited for, and where
    assert "rank(s) [1]" in str(errors[0]) and f"127.0.0.1:{port}" in str(errors[0])


def test_world_size_mismatch_is_refused():
    port, uid = free_port(), os.urandom(UNIQUE_ID_BYTES)

    def rank_fn(rank):
        world = 2 if rank == 0 else 3
        info = RankInfo(rank, world, rank, "127.0.0.1", port, "same", "torchrun")
        return exchange_payload(info, lambda: uid, timeout=2)

    _, errors = _run_ranks(2, rank_fn)
    assert "world size 3" in str(errors[1])


def test_client_times_out_when_rank0_never_comes():
    port = free_port()
    start = time.monotonic()
    with pytest.raises(RuntimeError) as excinfo:
        exchange_payload(_info(2, 4, port), lambda: b"", timeout=0.6)
    elapsed = time.monotonic() - start
    assert 0.5 < elapsed < 5
    message = str(excinfo.value)
    assert "rank 2" in message and "rank 0" in message and f"127.0.0.1:{port}" in message


def test_server_times_out_naming_missing_ranks():
    port = free_port()
    with pytest.raises(RuntimeError, match=r"rank\(s\) \[1, 2, 3\] of 4"):
        exchange_payload(_info(0, 4, port), lambda: os.urandom(128), timeout=0.5)


def test_port_in_use_is_a_clear_error():
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=f"cannot listen on 127.0.0.1:{port}"):
            exchange_payload(_info(0, 2, port), lambda: os.urandom(128), timeout=60)
        # a port held for good fails after the bind's patience, not the rendezvous' timeout
        assert time.monotonic() - start < rendezvous._BIND_PATIENCE + 5


def test_rank0_takes_a_port_held_for_a_moment():
    # something may hold MASTER_PORT for a moment before rank 0 listens: rank 0 binds once it
    # is let go
    uid = os.urandom(UNIQUE_ID_BYTES)
    busy = socket.create_server(("127.0.0.1", 0))
    port = busy.getsockname()[1]
    threading.Timer(0.3, busy.close).start()
    results, errors = _run_ranks(
        2, lambda rank: exchange_payload(_info(rank, 2, port), lambda: uid, timeout=20)
    )
    assert not errors, errors
    assert [results[0], results[1]] == [uid, uid]


def _self_connected_socket() -> socket.socket:
    """A TCP socket connected to itself (Linux: TCP's simultaneous open on a bound port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.connect(sock.getsockname())
    return sock


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="simultaneous open: Linux")
def test_dial_counts_a_connection_to_itself_as_a_failed_attempt(monkeypatch):
    selfish = _self_connected_socket()
    assert sockets.is_self_connection(selfish)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        address = listener.getsockname()
        real = socket.create_connection
        attempts = []

        def connect(where, timeout=None):
            attempts.append(where)
            return selfish if len(attempts) == 1 else real(where, timeout=timeout)

        monkeypatch.setattr(sockets.socket, "create_connection", connect)
        seen = []
        sock, result = sockets.dial(address, time.monotonic() + 10, lambda s: seen.append(
            s.getsockname()) or "done", first_delay=0.01)  # fmt: skip
        with sock:
            assert result == "done" and len(attempts) == 2
            assert not sockets.is_self_connection(sock)
            assert seen == [sock.getsockname()]  # the handshake never ran on the first
    assert selfish.fileno() == -1  # closed by the dial


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="simultaneous open: Linux")
def test_a_dial_that_connected_to_itself_leaves_the_port_to_rank0(monkeypatch):
    """The dial lets go of the port at once (a reset, no TIME_WAIT): rank 0 binds it at its
    first try, and the ranks meet there."""
    selfish = _self_connected_socket()
    port = selfish.getsockname()[1]
    uid = os.urandom(UNIQUE_ID_BYTES)
    real, handed = socket.create_connection, []

    def connect(where, timeout=None):
        if not handed:  # the first attempt connects to itself, as TCP may when nothing listens
            handed.append(selfish)
            return selfish
        return real(where, timeout=timeout)

    monkeypatch.setattr(sockets.socket, "create_connection", connect)
    monkeypatch.setattr(rendezvous, "_BIND_PATIENCE", 0.0)  # a port still held fails at once
    results = {}
    client = threading.Thread(target=lambda: results.update(
        {1: exchange_payload(_info(1, 2, port), lambda: b"", timeout=20)}))  # fmt: skip
    client.start()
    deadline = time.monotonic() + 10
    while not handed:  # rank 0 comes after the self-connected attempt
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.1)  # (the dial has closed it by now)
    assert exchange_payload(_info(0, 2, port), lambda: uid, timeout=20) == uid
    client.join(20)
    assert results == {1: uid}


def test_missing_address_without_init_file():
    info = RankInfo(1, 2, 1, None, None, "t", "openmpi")
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        exchange_payload(info, lambda: b"", timeout=1)


def test_file_exchange_four_ranks(tmp_path):
    path = tmp_path / "uid"
    uid = os.urandom(UNIQUE_ID_BYTES)
    path.write_bytes(b"stale file of an earlier run, any content")

    def rank_fn(rank):
        info = RankInfo(rank, 4, rank, None, None, "run-1", "slurm")
        if rank == 0:
            time.sleep(0.3)  # readers start first and must not take the stale file
        return exchange_payload(info, lambda: uid, timeout=20, init_file=path)

    results, errors = _run_ranks(4, rank_fn)
    assert not errors, errors
    assert [results[r] for r in range(4)] == [uid] * 4
    assert list(tmp_path.iterdir()) == []  # rank 0 cleans up once everyone has read it


def test_file_exchange_ignores_file_of_another_run(tmp_path):
    path = tmp_path / "uid"

    def writer():
        exchange_payload(RankInfo(0, 2, 0, run_token="old"), lambda: os.urandom(128),
                           timeout=0.5, init_file=path)  # fmt: skip

    thread = threading.Thread(target=lambda: pytest.raises(RuntimeError, writer))
    thread.start()
    with pytest.raises(RuntimeError, match="rank 1: rank 0 did not publish"):
        exchange_payload(RankInfo(1, 2, 1, run_token="new"), lambda: b"", timeout=0.8,
                           init_file=path)  # fmt: skip
    thread.join()


def test_file_exchange_rank0_timeout_names_missing_ranks(tmp_path):
    with pytest.raises(RuntimeError, match=r"rank\(s\) \[1, 2\] of 3 did not read"):
        exchange_payload(RankInfo(0, 3, 0, run_token="x"), lambda: os.urandom(128),
                           timeout=0.3, init_file=tmp_path / "uid")  # fmt: skip


@pytest.mark.parametrize("route", ["tcp", "file"])
def test_payload_of_any_length_reaches_every_rank(route, tmp_path):
    # what NcclRing.from_env sends: the unique id, then where rank 0's failure channel listens
    port, payload = free_port(), os.urandom(UNIQUE_ID_BYTES) + b"node-0.cluster 40123"
    init_file = tmp_path / "uid" if route == "file" else None

    def rank_fn(rank):
        return exchange_payload(_info(rank, 3, port), lambda: payload, 20, init_file)

    results, errors = _run_ranks(3, rank_fn)
    assert not errors, errors
    assert [results[r] for r in range(3)] == [payload] * 3


# --- who may join: challenge-response, the run token's sources ---


def _serving_rank0(port, world, payload, token="t"):
    """Rank 0 serving ``payload`` in a thread, once it listens; returns the thread."""
    thread = threading.Thread(
        target=lambda: exchange_payload(_info(0, world, port, token), lambda: payload, timeout=20)
    )
    thread.start()
    deadline = time.monotonic() + 10
    while True:  # a probe: rank 0 takes it for a stray connection
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return thread
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.02)


def test_a_replayed_hello_is_refused():
    port, uid = free_port(), os.urandom(UNIQUE_ID_BYTES)
    rank0 = _serving_rank0(port, 3, uid)
    tap = Wiretap(("127.0.0.1", port))
    got = {}
    rank1 = threading.Thread(target=lambda: got.update(
        {1: exchange_payload(_info(1, 3, tap.address[1]), lambda: b"", timeout=20)}))  # fmt: skip
    rank1.start()
    try:
        assert tap.intercepted.wait(10)
        # rank 1's answer to an earlier challenge, replayed while rank 1 is still expected
        reply = replay(("127.0.0.1", port), tap.recorded)
    finally:
        tap.release.set()
    assert reply.startswith(MAGIC) and b"run token differs" in reply and uid not in reply
    assert exchange_payload(_info(2, 3, port), lambda: b"", timeout=20) == uid
    rank1.join(20)
    rank0.join(20)
    tap.close()
    assert got == {1: uid}  # rank 1 itself, retrying through the relay, joined


def test_a_stranger_posing_as_rank0_is_not_believed():
    with socket.create_server(("127.0.0.1", 0)) as fake:
        port = fake.getsockname()[1]

        def pose():  # answers like rank 0, but cannot prove the token
            conn, _ = fake.accept()
            with conn:
                conn.sendall(rendezvous._CHALLENGE.pack(MAGIC, VERSION, os.urandom(32)))
                conn.recv(4096)
                forged = b"F" * UNIQUE_ID_BYTES
                head = rendezvous._REPLY.pack(MAGIC, VERSION, 0) + struct.pack("!I", len(forged))
                conn.sendall(head + forged + os.urandom(32))
                conn.recv(1)

        thread = threading.Thread(target=pose)
        thread.start()
        with pytest.raises(RuntimeError, match="could not prove it knows the run token"):
            exchange_payload(_info(1, 2, port), lambda: b"", timeout=5)
        thread.join(5)


def test_the_init_file_is_owner_only_and_sealed_with_the_token(tmp_path):
    path = tmp_path / "uid"
    uid = os.urandom(UNIQUE_ID_BYTES)
    writer = threading.Thread(target=lambda: exchange_payload(
        RankInfo(0, 2, 0, run_token="run-1"), lambda: uid, timeout=20, init_file=path))  # fmt: skip
    writer.start()
    deadline = time.monotonic() + 10
    while not path.exists():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert path.stat().st_mode & 0o777 == 0o600
    record = path.read_bytes()
    assert b"run-1" not in record and hashlib.sha256(b"run-1").digest() not in record
    assert rendezvous._parse_record(record, "run-2") is None  # another token: not this run's
    assert exchange_payload(RankInfo(1, 2, 1, run_token="run-1"), lambda: b"", timeout=20,
                            init_file=path) == uid  # fmt: skip
    writer.join(20)


def test_where_the_run_token_comes_from():
    env = dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="h", MASTER_PORT="29500")
    derived = RankInfo.from_env(env)
    assert (derived.run_token, derived.token_source) == ("port=29500/world=2", "derived")
    given = RankInfo.from_env({**env, "CUPARING_RUN_TOKEN": "s3cret"})
    assert (given.run_token, given.token_source) == ("s3cret", "env")
    assert RankInfo(0, 2, 0, run_token="x").token_source == "given"


class FakeStore:
    """torch.distributed.TCPStore over one dict: set/get, get waiting for the key."""

    data: dict = {}
    cond = threading.Condition()
    made: list = []

    def __init__(self, host, port, world_size, is_master, timeout):
        FakeStore.made.append((host, port, world_size, is_master))
        self.timeout = timeout.total_seconds()

    def set(self, key, value):
        with FakeStore.cond:
            FakeStore.data[key] = bytes(value)
            FakeStore.cond.notify_all()

    def get(self, key):
        with FakeStore.cond:
            if not FakeStore.cond.wait_for(lambda: key in FakeStore.data, self.timeout):
                raise RuntimeError(f"timeout waiting for {key}")
            return FakeStore.data[key]


@pytest.fixture
def torchrun_store(monkeypatch):
    """A torchrun agent store (fake torch.distributed.TCPStore) and torchrun's variables."""
    FakeStore.data, FakeStore.made = {}, []
    distributed = types.ModuleType("torch.distributed")
    distributed.TCPStore = FakeStore
    torch = types.ModuleType("torch")
    torch.distributed = distributed
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch.distributed", distributed)
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run-7")
    monkeypatch.delenv("CUPARING_RUN_TOKEN", raising=False)
    return FakeStore


def _torchrun_info(rank, world=3):
    env = dict(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="h",
               MASTER_PORT="29500")  # fmt: skip
    return RankInfo.from_env(env)


def test_under_torchrun_rank0_shares_a_random_token_through_its_store(torchrun_store):
    def rank_fn(rank):
        info = share_run_token(_torchrun_info(rank), timeout=10)
        uid = exchange_payload(info, lambda: b"the id", timeout=10)  # as join_from_env does
        return info, uid

    results, errors = _run_ranks(3, rank_fn)
    assert not errors, errors
    tokens = {info.run_token for info, _ in results.values()}
    assert len(tokens) == 1 and len(tokens.pop()) == 64  # one random token, 256 bits, hex
    assert all(info.token_source == "torchrun-store" for info, _ in results.values())
    assert all(uid == b"the id" for _, uid in results.values())
    assert all(made == ("h", 29500, 3, False) for made in torchrun_store.made)  # clients only
    assert all(key.startswith("cuparing/run-7/0/") for key in torchrun_store.data)


def test_a_token_from_the_environment_or_no_torch_leaves_the_store_alone(torchrun_store,
                                                                        monkeypatch):  # fmt: skip
    monkeypatch.setenv("CUPARING_RUN_TOKEN", "mine")
    env = dict(RANK="1", WORLD_SIZE="3", LOCAL_RANK="1", MASTER_PORT="29500",
               CUPARING_RUN_TOKEN="mine")  # fmt: skip
    info = RankInfo.from_env(env)
    assert share_run_token(info, timeout=1) is info
    monkeypatch.setitem(sys.modules, "torch", None)  # torch not importable
    monkeypatch.setitem(sys.modules, "torch.distributed", None)
    derived = _torchrun_info(1)
    assert share_run_token(derived, timeout=1) is derived
    assert torchrun_store.made == []
