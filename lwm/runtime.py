"""Process settings that imagination's speed depends on.

Planning steps a few dozen to a few hundred rows at a time, so every op allocates tensors of
tens of KB to a few MB and frees them microseconds later. glibc's malloc serves blocks past its
mmap threshold (128 KiB at first, then adapting to what is freed) with fresh mappings, and
gives freed memory at the top of its heap back to the kernel once more than its trim threshold
is free there. Either way the next allocation touches new pages, and each first touch is a page
fault. Measured on one imagined step of 512 rows (decode and encode, read the parents'
states, step the backbone): 1,565 page faults, and 18.9 ms against 15.2 ms with this setting
(about 2.4 us a fault). In whole warm CEM calls most processes settle at 3-5 faults a call, but
one of three processes in one series, and one of five in another, stayed at 4,028 and 2,738
faults a call: about 10 and 7 ms of a 110-130 ms call at that rate.

`keep_freed_memory` raises both thresholds, so freed blocks stay in the process and are
reused: the process keeps the peak of its small allocations (< 32 MiB each) mapped instead of
returning it. Planners call it once (`lwm.planning.base.PrefixTree`); set the environment
variable LWM_KEEP_FREED_MEMORY=0 to leave malloc as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20
"""Blocks below this are served from the heap and reused (glibc's largest allowed value)."""
TRIM_THRESHOLD = 2**31 - 1
"""Free memory at the top of the heap kept before any is returned to the kernel."""

_applied: bool | None = None  # None: not tried yet in this process


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse (module docstring), once per process.

    Returns whether the settings are in effect: False on other C libraries (nothing to do),
    when LWM_KEEP_FREED_MEMORY=0, or when glibc refused them.
    """
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    if os.environ.get("LWM_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success, 0 for a value out of range
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
