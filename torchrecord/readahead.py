"""Source readahead: the kernel reads the next source files while the writer encodes this one.

A conversion reads every source file once, in the order of the write, and most of them come
from disk: a dataset of millions of files is not in the page cache. Read one after the other,
each file costs the encoder a wait for the disk. A small helper process asks the kernel to read
the coming files (``posix_fadvise(WILLNEED)``, which queues the reads and returns at once), a
window ahead of the encoder, so that by the time the encoder opens a file it is in memory.
Measured here on 2,000 JPEGs of 35 KB from a cold cache, in one process alternating with it
off: a ``jpeg`` write took 0.37 s instead of 0.75 (medians of 5 rounds). When the files are in
the page cache already nothing is read ahead: the helper starts only once a probe finds a
coming file on disk.

The probe asks the kernel whether a file's first page is in memory (``mincore`` on a one-page
mapping), which reads nothing. The kernel answers that only for files the user owns or
may write; for others a one-byte read that must not wait for the disk (``RWF_NOWAIT``) stands in.
It can only err towards "in memory" (a miss starts a read, which may finish in time), so the
helper may start late, never for files that are in memory. Files it cannot probe (not regular
files, empty, on file systems that refuse both) start nothing.

A process, not a thread: a thread in the writing process would take Python's lock for every
file, and handing that lock back and forth with the encoder made a write from a warm cache 1.5
times slower here. The helper is a bare interpreter (``python -I -S``, nothing imported but
``os`` and ``sys``) in a session of its own (Ctrl-C in a terminal is the writer's to handle) that
reads NUL-separated paths from a pipe; the encoder's side writes the next names in bursts, never
waits for the pipe, and the helper ends when the pipe closes (also when the writer is killed).

The window is bounded in files, and each file is advised up to ``ADVISE_BYTES``, so what is read
ahead is still in the page cache when its turn comes, however large the dataset. Only a hint:
only regular files are opened, and a file the helper cannot open or advise is left to the
encoder, which reports what is wrong with it. On Linux only; nothing is read ahead elsewhere, or
if the helper cannot start (no ``sys.executable``, a frozen application).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Sequence

from .clib import libc

MIN_FILES = 128  # smaller writes (or shards) start no helper: it would not pay for itself
WINDOW_FILES = 256  # files advised ahead of the encoder, at most
BURST_FILES = 64  # names sent at once: the encoder writes to the pipe once per this many files
ADVISE_BYTES = 2 << 20  # of each file; the kernel's own readahead follows the encoder beyond
PROBES = 4  # files of the coming window probed for being in the page cache
PROBE_EVERY = 256  # files between probes, while the helper is not running
_NEVER = 1 << 62

# The helper: NUL-separated paths on stdin, each advised if it is a regular file.
_HELPER = """\
import os, sys
size = int(sys.argv[1])
flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
rest = b""
while chunk := os.read(0, 1 << 16):
    *names, rest = (rest + chunk).split(b"\\0")
    for name in names:
        try:
            if os.stat(name).st_mode & 0o170000 != 0o100000:  # not a regular file
                continue
            fd = os.open(name, flags)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, size, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        os.close(fd)
"""


def available() -> bool:
    return (
        sys.platform.startswith("linux")
        and hasattr(os, "posix_fadvise")
        and bool(sys.executable)
        and not getattr(sys, "frozen", False)
    )


def _cached(path: str | os.PathLike) -> bool | None:
    """Whether the first page of ``path`` is in the page cache; None when that cannot be
    told (not a regular file, empty, unreadable, a file system that answers neither probe)."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            return None  # (a FIFO or a device is never opened here)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError):
        return None
    try:
        if st.st_uid == os.geteuid() or os.access(path, os.W_OK):
            resident = _mincore_first_page(fd)
            if resident is not None:
                return resident
        try:
            return os.preadv(fd, [bytearray(1)], 0, os.RWF_NOWAIT) == 1
        except BlockingIOError:
            return False
        except (OSError, AttributeError):
            return None
    finally:
        os.close(fd)


def _mincore_first_page(fd: int) -> bool | None:
    """``mincore`` of a one-page shared read-only mapping of ``fd``: reads nothing."""
    lib = libc()
    if lib is None or not hasattr(lib, "mincore"):
        return None
    import ctypes

    page = os.sysconf("SC_PAGE_SIZE")
    address = lib.mmap(None, page, _PROT_READ, _MAP_SHARED, fd, 0)
    if address is None or address == ctypes.c_void_p(-1).value:
        return None
    try:
        vec = (ctypes.c_ubyte * 1)()
        if lib.mincore(address, page, vec) != 0:
            return None
        return bool(vec[0] & 1)
    finally:
        lib.munmap(address, page)


_PROT_READ, _MAP_SHARED = 1, 1


class SourceReadahead:
    """Has ``paths`` read ahead, in order, at most ``window`` files ahead of the encoder, which
    calls :meth:`advance` for each file it has taken.

    :meth:`start` starts it, :meth:`close` (or leaving a ``with`` block) ends it for good, also
    when the helper could not start. Start it after forking worker processes, so that they do
    not inherit its pipe.

    The helper runs only while it is needed: every ``PROBE_EVERY`` files (and at the start)
    a few files of the coming window are probed, and the helper starts the first time one of
    them is not in the page cache. Costly next to a write from the page cache (starting an
    interpreter, a system call per file), it is never started for one. ``keep_helper``: leave
    the helper to this process's next readahead instead of ending it (see ``_KEPT``);
    ``enabled=False``: read nothing ahead.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        window: int = WINDOW_FILES,
        burst: int = BURST_FILES,
        keep_helper: bool = False,
        enabled: bool = True,
    ):
        self.paths = paths
        self.enabled = enabled
        self.keep_helper = keep_helper
        self.window = max(1, window)
        self.burst = max(1, min(burst, self.window))
        self.taken = 0  # files the encoder has taken
        self.sent = 0  # files up to which names went to the helper
        self._pending = b""  # the rest of a name the pipe had no room for
        self._helper: subprocess.Popen | None = None
        self._probe_at = _NEVER  # position of the next probe while there is no helper
        self._closed = False

    def start(self) -> SourceReadahead:
        """Start watching (once; later calls do nothing)."""
        if self._probe_at == _NEVER and self._helper is None and not self._closed:
            if self.enabled and len(self.paths) >= MIN_FILES and available():
                self._probe_at = 0
                self._probe()
        return self

    def __enter__(self) -> SourceReadahead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def advance(self, files: int = 1) -> None:
        """The encoder has taken ``files`` more files."""
        self.taken += files
        if self._helper is not None:
            if self.taken + self.window - self.sent >= self.burst:
                self._send()
        elif self.taken >= self._probe_at:
            self._probe()

    def _probe(self) -> None:
        """Start the helper if a file of the coming window is not in the page cache."""
        count = len(self.paths)
        step = max(1, self.window // PROBES)
        ahead = range(self.taken, min(count, self.taken + self.window), step)
        if any(_cached(self.paths[k]) is False for k in ahead):
            self._probe_at = _NEVER
            self._spawn()
        else:
            self._probe_at = self.taken + PROBE_EVERY

    def _spawn(self) -> None:
        if self.keep_helper:
            self._helper = _kept_helper()
            if self._helper is not None:
                self._send()
                return
        try:
            self._helper = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _HELPER, str(ADVISE_BYTES)],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                close_fds=True,
                start_new_session=True,
            )
            os.set_blocking(self._helper.stdin.fileno(), False)
        except Exception:  # no helper, then: the write goes on, reading nothing ahead
            self.close()
            return
        if self.keep_helper:
            _keep(self._helper)
        self._send()

    def close(self) -> None:
        """End the helper (or leave it to the next readahead of this process, when it is
        kept); what it queued is in the kernel's hands already."""
        self._closed = True
        self._probe_at = _NEVER
        helper, self._helper = self._helper, None
        if helper is None:
            return
        if helper is _kept_helper():
            return
        _end(helper)

    def _send(self) -> None:
        """Names up to ``window`` files ahead of the encoder, as far as the pipe takes them
        (none of the files the encoder has reached already: no use reading those now)."""
        stop = min(len(self.paths), self.taken + self.window)
        first = max(self.sent, self.taken)
        names = [self._pending] if self._pending else []
        names += [os.fsencode(self.paths[k]) + b"\0" for k in range(first, stop)]
        self.sent = max(self.sent, stop)
        data = b"".join(names)
        if not data:
            return
        try:
            written = os.write(self._helper.stdin.fileno(), data)
        except BlockingIOError:  # the helper is behind: these go with the next burst
            written = 0
        except OSError:  # the helper is gone: read nothing ahead from now on
            self.close()
            return
        # a name cut short is finished next time; the names after it are dropped (the
        # encoder reads those files itself), so nothing piles up while the helper is behind
        end = data.find(b"\0", written) + 1 if written < len(data) else 0
        self._pending = data[written:end] if written < end else b""


def _end(helper: subprocess.Popen) -> None:
    if _KEPT.get("helper") is helper:
        _KEPT.clear()
    try:
        helper.stdin.close()
    except OSError:
        pass
    helper.kill()  # nothing it has left to do is worth waiting for
    try:
        helper.wait(timeout=10)
    except subprocess.TimeoutExpired:  # (stuck in the kernel: reaped when it gets out)
        pass


# A process that reads ahead again and again (a shard worker of a write, shard after shard)
# keeps its helper: starting an interpreter costs about 20 ms of CPU here, as much as encoding
# about 130 JPEGs in a ``jpeg`` write. It ends with that process (a multiprocessing
# finalizer; if the process is killed, the closed pipe ends it).
_KEPT: dict[str, object] = {}


def _kept_helper() -> subprocess.Popen | None:
    """This process's kept helper, if it still runs (not one inherited through fork)."""
    helper = _KEPT.get("helper")
    if helper is None or _KEPT.get("owner") != os.getpid():
        return None
    if helper.poll() is not None:  # it died: reaped now
        _KEPT.clear()
        return None
    return helper


def _keep(helper: subprocess.Popen) -> None:
    """Keep ``helper`` (a new one: the one kept before, if any, has died) for this process."""
    from multiprocessing import util

    _KEPT.update(helper=helper, owner=os.getpid())
    util.Finalize(None, _end_kept, exitpriority=0)  # (run when a multiprocessing worker exits)


def _end_kept() -> None:
    helper = _kept_helper()
    if helper is not None:
        _end(helper)
