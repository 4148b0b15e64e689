"""The C library, on Linux, for the few calls Python's ``os`` module does not offer: ``prctl`` and
``mallopt`` (in the writer's workers), ``sync_file_range`` (sealed shards), ``mmap``, ``mincore``
and ``munmap`` (the source readahead's probe)."""

from __future__ import annotations

import functools
import sys
from typing import Any


@functools.cache
def libc() -> Any:
    """The C library with the pointer-taking calls typed; None when not on Linux."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        lib = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    try:
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    except AttributeError:  # a C library without them: the probe does without
        pass
    return lib
