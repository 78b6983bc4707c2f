"""Ranks must agree: compare one call's description across every rank of a ring.

A call of the ring (its shapes, dtype, layout, mask, ...) is described by *fields*, a mapping of
names to strings. :func:`encode` turns them into canonical bytes (what travels),
:func:`disagreement` reads every rank's bytes and names the first field on which this rank differs
from another. :meth:`cuparing.comm.base.Ring.agree` puts them together, and skips the collective
only for a call equal to the rank's previous (agreed) one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping


class CallFields(Mapping):
    """One call's fields, frozen (what the library's ring calls hand to ``Ring.agree``): since
    nothing can change them, ``agree`` takes the very object it agreed on last as the same call
    without reading it again (a kept plan passes its own on every repeat).

    Args:
        fields: names to values, both ``str``.
    """

    __slots__ = ("_fields",)

    def __init__(self, fields: Mapping[str, str]):
        self._fields = dict(fields)

    def __getitem__(self, name: str) -> str:
        return self._fields[name]

    def __iter__(self):
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __repr__(self) -> str:
        return f"CallFields({self._fields!r})"


_ABSENT = "<absent>"
REFUSED = "refused"  # field of a call a rank could not make (Ring.refuse): reported first


def call_key(fields: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """``fields`` as a sorted tuple of ``(name, value)``: the cache key of one call.

    Raises:
        TypeError: ``fields`` is not a mapping, or a name or value is not a ``str``.
    """
    if not isinstance(fields, Mapping):
        raise TypeError(f"fields must be a mapping of str to str, got {type(fields).__name__}")
    for name, value in fields.items():
        if not isinstance(name, str):
            raise TypeError(f"fields names must be str, got {name!r} ({type(name).__name__})")
        if not isinstance(value, str):
            raise TypeError(f"fields[{name!r}] must be a str, got {type(value).__name__} {value!r}")
    return tuple(sorted(fields.items()))


def encode(key: tuple[tuple[str, str], ...]) -> bytes:
    """The canonical bytes of a :func:`call_key` (UTF-8 JSON object, names sorted)."""
    return json.dumps(dict(key), separators=(",", ":"), ensure_ascii=False).encode()


def _decode(data: bytes) -> dict[str, str]:
    try:
        fields = json.loads(data.decode())
    except (UnicodeDecodeError, ValueError):
        return {"<fields>": f"unreadable bytes {data[:32]!r}"}
    return fields if isinstance(fields, dict) else {"<fields>": repr(fields)}


def disagreement(rank: int, key: tuple[tuple[str, str], ...], gathered: list[bytes]) -> str | None:
    """Why this rank's call differs from another's, or ``None`` when every rank agrees.

    Args:
        rank: this rank.
        key: this rank's :func:`call_key`.
        gathered: every rank's :func:`encode` bytes, in rank order.

    Returns:
        A message naming the first differing field (sorted by name), this rank's value and the
        value of the lowest-numbered rank that differs; the same rule on every rank, so each
        names a partner it really differs from.
    """
    mine = dict(key)
    for other, data in enumerate(gathered):
        theirs = _decode(data)
        if other == rank or theirs == mine:
            continue
        if REFUSED in theirs and REFUSED not in mine:
            return (
                f"rank {rank}: rank {other} could not make this call: {theirs[REFUSED]}; every "
                f"rank must make the same call"
            )
        name = min(n for n in set(mine) | set(theirs) if mine.get(n) != theirs.get(n))
        return (
            f"rank {rank}: the ranks disagree on {name}: this rank has "
            f"{name}={mine.get(name, _ABSENT)!r}, rank {other} has "
            f"{name}={theirs.get(name, _ABSENT)!r}; every rank must make the same call"
        )
    return None
