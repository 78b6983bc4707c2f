"""Environment switches set for the length of a block (the simulated ranks are threads of this
process, so they all see it)."""

from __future__ import annotations

import contextlib
import os

from cuparing.schedule import GATHER_ENV


@contextlib.contextmanager
def kv_gather(on: bool):
    """``CUPARING_KV_GATHER`` on (``"1"``) or unset inside the block, as it was after it."""
    before = os.environ.get(GATHER_ENV)
    if on:
        os.environ[GATHER_ENV] = "1"
    else:
        os.environ.pop(GATHER_ENV, None)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(GATHER_ENV, None)
        else:
            os.environ[GATHER_ENV] = before
