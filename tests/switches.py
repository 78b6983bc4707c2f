"""Environment switches set for the length of a block (the simulated ranks are threads of this
process, so they all see it)."""

from __future__ import annotations

import contextlib
import os

from cuparing import schedule
from cuparing.schedule import GATHER_ENV


@contextlib.contextmanager
def kv_gather(on: bool):
    """``CUPARING_KV_GATHER`` on (``"1"``) or off (``"0"``) inside the block, as it was after
    it."""
    before = os.environ.get(GATHER_ENV)
    os.environ[GATHER_ENV] = "1" if on else "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(GATHER_ENV, None)
        else:
            os.environ[GATHER_ENV] = before


@contextlib.contextmanager
def ranks_calling(names=("gathered_forward", "gathered_backward"), ring_at: int = 1):
    """Inside the block, every call of the ``cuparing.schedule`` functions ``names`` (simulated
    ranks' included) records the rank of its ring, positional argument ``ring_at``; yields
    ``{name: [ranks]}``."""
    ran: dict[str, list[int]] = {name: [] for name in names}
    inner = {name: getattr(schedule, name) for name in ran}

    def counting(name):
        def counted(*args, **kwargs):
            ran[name].append(args[ring_at].rank)
            return inner[name](*args, **kwargs)

        return counted

    try:
        for name in ran:
            setattr(schedule, name, counting(name))
        yield ran
    finally:
        for name, function in inner.items():
            setattr(schedule, name, function)
