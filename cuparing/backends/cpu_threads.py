"""BLAS threads for simulated ranks: C ranks sharing one machine split its cores between them.

Each simulated rank is a thread calling NumPy, whose BLAS (OpenBLAS, MKL, ...) runs a pool of one
thread per core by default, so C ranks start C x cores threads on ``cores`` cores and the pools
fight over them: a C=4 simulate on 2 cores ran 2.4x slower for full attention and 23x slower
for causal striped (PERF.md, "CPU backend"). While a simulated ring runs, every BLAS and OpenMP
pool of the process is capped at ``cores // C`` threads (at least 1; never raised).

The cap needs ``threadpoolctl`` (``pip install "cuparing[cpu]"``, also in the ``test`` extra);
without it nothing is limited and everything still works, only slower with several ranks.
"""

from __future__ import annotations

import contextlib
import os


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def threads_per_rank(world_size: int, cores: int | None = None) -> int:
    """BLAS threads each of ``world_size`` ranks may use on ``cores`` cores (default: usable)."""
    cores = usable_cores() if cores is None else cores
    return max(1, cores // max(1, world_size))


def limit_for_ranks(world_size: int) -> contextlib.AbstractContextManager:
    """A context in which the process's thread pools use at most ``threads_per_rank(world_size)``
    threads each; pools already smaller keep their size. Restores the previous sizes on exit.

    The limit is process-wide (a BLAS library has one setting), so two simulated rings run at
    once from different threads would restore each other's limits out of order; the answers
    stay right either way. Without ``threadpoolctl`` this does nothing.
    """
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # optional: the cap is a speed-up, never needed for a right answer
        return contextlib.nullcontext()
    cap = threads_per_rank(world_size)
    controller = ThreadpoolController()
    limits = {
        lib.prefix: min(lib.num_threads, cap)
        for lib in controller.lib_controllers
        if lib.num_threads > cap
    }
    if not limits:
        return contextlib.nullcontext()
    return controller.limit(limits=limits)
