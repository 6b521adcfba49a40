"""How much freed memory a training process keeps: glibc's malloc thresholds, fixed for a training run.

glibc serves a request above its mmap threshold with a mapping of its own, unmapped (returned to the OS) when
freed, and anything below it from the heap, whose freed space it keeps for reuse. The threshold starts at 128 KiB
but is *dynamic*: freeing a mapped block raises it to that block's size, up to 32 MiB. A training step allocates
and frees tensors of tens of MiB at every step (activations, logits chunks, gradients), so after the first step
they all come from the heap, and the heap's freed space, fragmented between live tensors, stays in the process's
resident memory: the RSS a user sees (and an out-of-memory killer counts) sits well above what is live. Setting
the threshold (and the trim threshold) explicitly turns the dynamic adjustment off, so every tensor of 128 KiB
and more is its own mapping again and goes back to the OS when freed.

The price is a page fault per page the first time each new mapping is written (the kernel hands out zeroed
pages), at every step; docs/performance.md has the measured cost and gain. It only concerns host memory: on a
GPU run the tensors that matter live in the CUDA allocator, untouched by this.

A user who set glibc's own variables (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, or the GLIBC_TUNABLES
malloc settings) keeps them: this never overrides a choice made outside the process.
"""
import ctypes
import logging
import os
import sys

logger = logging.getLogger(__name__)

# mallopt() parameter numbers, from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
THRESHOLD_BYTES = 128 * 1024  # glibc's own initial value: only its growth is turned off
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def _user_chose_malloc_settings(environ):
    tunables = environ.get("GLIBC_TUNABLES", "")
    return any(name in environ for name in _USER_SETTINGS) or "glibc.malloc." in tunables


def fix_malloc_thresholds(environ=None, libc_name="libc.so.6"):
    """Fix glibc's mmap and trim thresholds at THRESHOLD_BYTES for this process (see the module docstring).

    Returns True when they were set; False (and nothing changes) off Linux, with another C library, or when the
    environment already sets glibc's malloc variables.
    """
    environ = os.environ if environ is None else environ
    if not sys.platform.startswith("linux") or _user_chose_malloc_settings(environ):
        return False
    try:
        libc = ctypes.CDLL(libc_name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc: no mallopt, nothing to fix
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, THRESHOLD_BYTES) == 1 and mallopt(_M_TRIM_THRESHOLD, THRESHOLD_BYTES) == 1
    if not ok:
        logger.warning("glibc refused the malloc thresholds: freed host memory may stay in the process.")
    return ok
