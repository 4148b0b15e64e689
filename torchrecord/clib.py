"""The C library, on Linux, for the few calls Python's ``os`` module does not offer: ``prctl`` and
``mallopt`` (in the writer's workers), ``malloc`` and ``free`` (in a process that writes shards),
``sync_file_range`` (sealed shards), ``mmap``, ``mincore``
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
        lib.malloc.restype = ctypes.c_void_p
        lib.malloc.argtypes = [ctypes.c_size_t]
        lib.free.argtypes = [ctypes.c_void_p]
    except AttributeError:  # a C library without them: the probe does without
        pass
    return lib


@functools.cache
def let_heap_keep_large_blocks() -> None:
    """glibc: have this process serve blocks of up to 31 MB from its heap, and keep up to 62 MB
    of freed memory at the heap's top for the next ones, instead of mapping fresh zeroed pages
    for every block over 128 KB and giving them back at once.

    A process that writes shards allocates and frees the size of every record several times
    (the encoded record, the database's pages for it until the transaction commits). glibc
    raises both limits by itself once the program frees a block it had mapped, to that block's
    size (up to 32 MB); records of raw pixels (hundreds of kilobytes, in batches of 16 MB) stay
    above what it reached, so every page of them was faulted in and zeroed anew: 263,000 page
    faults and half of the system time for a one-process ``raw_rgb`` write of 908 MB, against
    12,500 after this call (measured here). The call frees one mapped block of 31 MB (never
    touched) as if the program had, which sets glibc's limits where they would be, and leaves
    its adjustment working; ``mallopt``, which the writer's worker processes use, would turn it
    off for the rest of the process, which may be a training job. A process that already set
    the limits with ``mallopt`` keeps them. Elsewhere (not glibc) it does nothing."""
    lib = libc()
    if lib is None or not hasattr(lib, "gnu_get_libc_version"):
        return
    block = lib.malloc(31 << 20)
    if block:
        lib.free(block)
