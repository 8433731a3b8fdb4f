"""glibc's malloc, set for servers that make and drop the same large buffers every step.

A decode step's hidden rows (64 rows of an 8B model: 512 KiB) pass through several buffers on
each side of a hop: the tensor's bytes, the message's, the serialized message, the socket's.
By default glibc serves each from fresh pages (mmap above 128 KiB, or a heap it trims as soon
as its top is free), and the kernel faults every page in again: in a VM ~4 us a page. One
64-row message's work took 2.2 ms on the dev machine (~480 faults), 0.6 ms once the freed memory
is kept (`python -m bench.malloc_probe`). So a serving process keeps what it frees for reuse:
- buffers up to MMAP_THRESHOLD come from the heap, not from their own mmap;
- the heap gives memory back only once more than TRIM_THRESHOLD of it is free at its top.
Loading a range still hands everything freed back at once (range_holder.release_freed_memory).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest on 64 bits (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 256 << 20


def keep_freed_buffers() -> bool:
    """Sets glibc's thresholds for this process; False where malloc is not glibc's."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # musl, macOS: nothing to set
        return False
    done = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    done = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and done
    if not done:
        log.warning("malloc thresholds not set: large step buffers fault their pages each step")
    return done
