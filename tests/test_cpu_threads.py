"""Simulated ranks share the machine's cores: BLAS pools are capped while a ring runs."""

from __future__ import annotations

import sys

import pytest

import cuparing as cr
from cuparing.backends.cpu_threads import threads_per_rank


def test_cores_are_split_between_ranks_and_every_rank_keeps_one():
    assert threads_per_rank(4, cores=16) == 4
    assert threads_per_rank(3, cores=16) == 5
    assert threads_per_rank(4, cores=2) == 1
    assert threads_per_rank(1, cores=2) == 2


def blas_threads() -> list[int]:
    from threadpoolctl import threadpool_info

    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


def test_blas_pools_are_capped_while_ranks_run_and_restored_after():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    import numpy  # noqa: F401 - loads the BLAS whose pool is checked

    world = 2
    cap = threads_per_rank(world)
    with threadpoolctl.threadpool_limits(limits=2 * cap, user_api="blas"):  # more than the cap
        seen = cr.simulate(world, lambda ring: blas_threads())
        after = blas_threads()
    assert after, "threadpoolctl found no BLAS pool behind NumPy"
    assert seen == [[cap] * len(after)] * world
    assert after == [2 * cap] * len(after)


def test_a_pool_already_smaller_than_the_share_is_not_enlarged():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    import numpy  # noqa: F401

    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        seen = cr.simulate(1, lambda ring: blas_threads())
    assert seen[0], "threadpoolctl found no BLAS pool behind NumPy"
    assert seen == [[1] * len(seen[0])]


def test_without_threadpoolctl_simulate_still_works(monkeypatch):
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)  # import now raises ImportError
    assert cr.simulate(3, lambda ring: ring.rank) == [0, 1, 2]
