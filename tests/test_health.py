"""The failure channel (cuparing.comm.health) on the CPU: ranks as threads and as processes, and
who may join it (replays, wrong tokens and strangers are refused)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from wiretap import Wiretap, replay

from cuparing.comm.health import (
    PROTOCOL,
    VERSION,
    HealthClient,
    HealthServer,
    decode_address,
    encode_address,
)

ROOT = Path(__file__).resolve().parents[1]
PROMPT = 1.0  # seconds within which every rank must hear of a failure


class Calls:
    """Records the callbacks of the clients of one test, by the receiving rank."""

    def __init__(self):
        self.got: dict[int, tuple[int, str, float]] = {}
        self.cond = threading.Condition()

    def callback(self, rank: int):
        def on_abort(failed: int, reason: str) -> None:
            with self.cond:
                assert rank not in self.got, "a callback fired twice"
                self.got[rank] = (failed, reason, time.monotonic())
                self.cond.notify_all()

        return on_abort

    def wait_for(self, ranks, timeout: float = 5.0) -> None:
        with self.cond:
            self.cond.wait_for(lambda: set(ranks) <= set(self.got), timeout)
        assert set(ranks) <= set(self.got), f"no callback on {set(ranks) - set(self.got)}"


def _clients(server, ranks, calls, world=4, token="tok"):
    address = server.local_address
    return {r: HealthClient(address, r, world, token, calls.callback(r)) for r in ranks}


def _python(code: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip


@pytest.fixture
def server():
    srv = HealthServer(4, "tok", "127.0.0.1")
    yield srv
    srv.close(linger=False)
    assert srv.join(2)


def test_address_round_trip():
    assert decode_address(encode_address("node-7.cluster", 41234)) == ("node-7.cluster", 41234)
    assert decode_address(encode_address("::1", 5)) == ("::1", 5)
    assert decode_address(b"") is None


def test_fail_reaches_every_other_rank_at_once(server):
    calls = Calls()
    clients = _clients(server, range(4), calls)
    start = time.monotonic()
    clients[2].report("rank 2: exchange 'kv' #3 made no progress\nwithin 20 s")
    calls.wait_for({0, 1, 3})
    for rank in (0, 1, 3):
        failed, reason, at = calls.got[rank]
        assert failed == 2 and "made no progress within 20 s" in reason
        assert at - start < PROMPT
    time.sleep(0.2)
    assert 2 not in calls.got  # the failing rank is not told about itself
    clients[1].report("rank 1: consequence")  # later failures are consequences: not relayed
    time.sleep(0.2)
    assert all(calls.got[r][0] == 2 for r in (0, 1, 3))
    for client in clients.values():
        client.close()


def test_clean_bye_from_all_fires_nothing(server):
    calls = Calls()
    clients = _clients(server, range(4), calls)
    for client in clients.values():
        client.close()
        client.close()  # idempotent
    server.close()  # lingers only while ranks are connected: none are
    assert server.join(2)
    assert calls.got == {}


def test_close_is_prompt_when_rank0_is_gone():
    srv = HealthServer(2, "tok", "127.0.0.1")
    calls = Calls()
    client = HealthClient(srv.local_address, 1, 2, "tok", calls.callback(1))
    srv.close(linger=False)  # announces CLOSING, so its end is not a failure
    assert srv.join(2)
    start = time.monotonic()
    client.close()
    assert time.monotonic() - start < 1.5
    assert calls.got == {}


def test_killed_client_process_is_reported_as_connection_lost(server):
    host, port = server.local_address
    child = _python(
        "import os, sys\n"
        "from cuparing.comm.health import HealthClient\n"
        f"HealthClient(({host!r}, {port}), 3, 4, 'tok', lambda r, m: None)\n"
        "print('READY', flush=True)\n"
        "sys.stdin.readline()\n"
        "os._exit(1)\n"
    )
    try:
        assert child.stdout.readline().strip() == "READY"
        calls = Calls()
        clients = _clients(server, range(3), calls)
        start = time.monotonic()
        child.stdin.write("die\n")
        child.stdin.flush()
        calls.wait_for({0, 1, 2})
    finally:
        child.kill()
        child.wait()
    for rank in range(3):
        failed, reason, at = calls.got[rank]
        assert failed == 3 and "connection lost" in reason
        assert at - start < PROMPT
    for client in clients.values():
        client.close()


def _rank0_process(world: int) -> tuple[subprocess.Popen, int]:
    child = _python(
        "import os, sys, time\n"
        "from cuparing.comm.health import HealthServer\n"
        f"server = HealthServer({world}, 'tok', '127.0.0.1')\n"
        "print(server.address[1], flush=True)\n"
        "if sys.stdin.readline().strip() == 'close':\n"
        "    server.close()\n"
        "    time.sleep(0.3)\n"
        "os._exit(0)\n"
    )
    return child, int(child.stdout.readline())


def test_rank0_process_dying_is_noticed():
    child, port = _rank0_process(3)
    try:
        calls = Calls()
        clients = {r: HealthClient(("127.0.0.1", port), r, 3, "tok", calls.callback(r))
                   for r in (1, 2)}  # fmt: skip
        start = time.monotonic()
        child.stdin.write("die\n")
        child.stdin.flush()
        calls.wait_for({1, 2})
    finally:
        child.kill()
        child.wait()
    for rank in (1, 2):
        failed, reason, at = calls.got[rank]
        assert failed == 0 and "rank 0" in reason and at - start < PROMPT
    for client in clients.values():
        client.close()


def test_rank0_closing_cleanly_then_exiting_is_no_failure():
    child, port = _rank0_process(2)
    try:
        calls = Calls()
        client = HealthClient(("127.0.0.1", port), 1, 2, "tok", calls.callback(1))
        child.stdin.write("close\n")
        child.stdin.flush()
        child.wait(10)
        time.sleep(0.3)
        assert calls.got == {}
        client.close()
    finally:
        child.kill()
        child.wait()


def test_a_rank_joining_after_the_failure_hears_of_it(server):
    calls = Calls()
    early = _clients(server, [0, 1], calls)
    early[1].report("boom")
    calls.wait_for({0})
    late = _clients(server, [2], calls)
    calls.wait_for({2})
    assert calls.got[2][:2] == (1, "boom")
    for client in [*early.values(), *late.values()]:
        client.close()


def test_wrong_token_is_refused(server):
    with pytest.raises(RuntimeError, match="refused this rank: run token differs"):
        HealthClient(server.local_address, 1, 4, "another-run", lambda r, m: None, 2.0)


@pytest.mark.parametrize(
    "rank, world, message",
    [(4, 4, r"rank 4 is not in \[0, 4\)"), (1, 8, "world size 8"), (1, 4, "already connected")],
)
def test_bad_hello_is_refused(server, rank, world, message):
    first = HealthClient(server.local_address, 1, 4, "tok", lambda r, m: None)
    with pytest.raises(RuntimeError, match=message):
        HealthClient(server.local_address, rank, world, "tok", lambda r, m: None, 2.0)
    first.close()


def test_unreachable_server_times_out():
    srv = HealthServer(2, "tok", "127.0.0.1")
    address = srv.local_address
    srv.close(linger=False)
    assert srv.join(2)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="could not join the health server"):
        HealthClient(address, 1, 2, "tok", lambda r, m: None, connect_timeout=0.5)
    assert time.monotonic() - start < 3


# --- who may join, and who may abort ---


def test_a_replayed_hello_is_refused(server):
    calls = Calls()
    tap = Wiretap(server.local_address)
    joined = {}
    rank1 = threading.Thread(target=lambda: joined.update(
        {1: HealthClient(tap.address, 1, 4, "tok", calls.callback(1))}))  # fmt: skip
    rank1.start()
    try:
        assert tap.intercepted.wait(10)
        # rank 1's answer to an earlier challenge, replayed while rank 1 has not joined
        reply = replay(server.local_address, tap.recorded)
    finally:
        tap.release.set()
    assert reply.startswith(b"REFUSED run token differs")
    rank1.join(20)
    assert 1 in joined  # rank 1 itself, retrying through the relay, joined
    joined[1].close()
    tap.close()
    assert calls.got == {}


def test_a_stranger_cannot_abort_the_run(server):
    calls = Calls()
    clients = _clients(server, range(3), calls)
    zeros = "00" * 32
    for forged in (b"FAIL 2 rank 2 is dead\n",  # no hello at all
                   f"{PROTOCOL} {VERSION} 3 4 {zeros} {zeros}\n".encode()):  # posing as rank 3
        reply = replay(server.local_address, forged)
        assert reply.startswith(b"REFUSED"), reply
    time.sleep(0.3)
    assert calls.got == {}  # neither the forged FAIL nor the stranger leaving aborted anything
    # the forged hello did not take rank 3's place: the real rank 3 joins, and may report
    clients[3] = HealthClient(server.local_address, 3, 4, "tok", calls.callback(3))
    clients[3].report("rank 3: a real failure")
    calls.wait_for({0, 1, 2})
    for client in clients.values():
        client.close()


def test_a_server_that_cannot_prove_the_token_is_not_believed():
    calls = Calls()
    with socket.create_server(("127.0.0.1", 0)) as fake:

        def pose():  # speaks the protocol, but cannot prove the run token
            conn, _ = fake.accept()
            with conn:
                conn.sendall(f"{PROTOCOL} {VERSION} {'11' * 32}\n".encode())
                conn.recv(4096)
                conn.sendall(f"OK {'22' * 32}\nABORT 1 forged\n".encode())
                conn.recv(4096)

        thread = threading.Thread(target=pose)
        thread.start()
        with pytest.raises(RuntimeError, match="could not prove it knows the run token"):
            HealthClient(fake.getsockname()[:2], 2, 4, "tok", calls.callback(2), 2.0)
        thread.join(5)
    time.sleep(0.1)
    assert calls.got == {}
