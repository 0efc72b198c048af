"""Memory back to the system after a burst (glibc's ``malloc_trim``).

A large history read or a burst of big messages makes Python allocate many
large frames; once sent they are freed, but glibc keeps the freed heap mapped,
so the process's RSS stays at its peak for good (seen: 53 MiB idle, 368 MiB
after 20 clients read 60 KB messages, 319 MiB ten seconds later).  Asking
glibc to trim every few seconds gives it back: the same flood left the bridge
at its idle size (bench/history_flood.py).  Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

logger = logging.getLogger(__name__)

# Seconds between trims (a Panini task); a trim with nothing to give back costs microseconds.
INTERVAL = 10.0


@functools.cache
def _malloc_trim() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc: no malloc_trim
        return None


async def give_back() -> None:
    """Return freed heap memory to the system, where the C library can."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
