"""LMDB environments shared by every reader of this process.

py-lmdb refuses to open one file twice in a process, so everything that reads a dataset (two
loaders over one dataset, the manifest reader of a 0.1 dataset) goes through :data:`SHARED`.
"""

from __future__ import annotations

import itertools
import os
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any


class SharedEnvironments:
    """LMDB environments shared by every reader of this process, reference counted.

    py-lmdb refuses to open one file twice in a process, so two readers of the same dataset (a
    train and an eval loader, say) must share the environment. A forked child counts as the same
    process too, and an environment must not be used (nor even closed: py-lmdb waits for the
    parent's transactions, which never end there) in a child: everything is closed in the parent
    just before ``fork``, and readers notice through :attr:`generation` and reopen lazily.

    Other threads of the parent may be reading at that moment (an eval loop in a thread while
    a loader starts its workers). Every read holds its thread's read lock (``with
    SHARED.reading():``, a C-level ``RLock``: reads nest, and an exception anywhere, Ctrl-C
    included, releases it). A fork takes the read locks of all other threads, so it waits for
    the reads in progress and holds back new ones, closes the environments, and gives the locks
    back once the child exists. Forks from several threads take turns.
    """

    def __init__(self) -> None:
        self._fresh_locks()
        self.pid = os.getpid()
        self.generation = 0
        self.envs: dict[tuple, Any] = {}
        self.refs: dict[tuple, int] = {}

    def _fresh_locks(self) -> None:
        # re-entrant: a reader finalised by the garbage collector releases its environments,
        # and the collector may run in this thread while it holds the lock (opening a shard
        # runs Python code)
        self.lock = threading.RLock()
        # held by a fork from before it to after it: no thread registers, no other fork starts
        self._forks = threading.Lock()
        self._fork_owner: int | None = None
        self._read_locks: dict[int, Any] = {}  # registration number -> a thread's read lock
        self._numbers = itertools.count()
        self._local = threading.local()

    def _check_pid(self) -> None:
        if self.pid != os.getpid():  # forked without the at-fork hooks: drop, never close
            self.pid, self.envs, self.refs = os.getpid(), {}, {}
            self.generation += 1

    def current_generation(self) -> int:
        with self.lock:
            self._check_pid()
            return self.generation

    def acquire(self, path: Path, opener: Callable[[], Any]) -> tuple[tuple, Any]:
        # the file's identity, not its spelling: py-lmdb refuses a second open of one file
        # under another path; a re-written dataset has new files (new inodes)
        st = path.stat()
        key = (st.st_dev, st.st_ino)
        with self.lock:
            self._check_pid()
            env = self.envs.get(key)
            if env is None:
                env = opener()
                self.envs[key], self.refs[key] = env, 0
            self.refs[key] += 1
            return key, env

    def release(self, key: tuple, generation: int) -> None:
        with self.lock:
            self._check_pid()
            if generation != self.generation or key not in self.refs:
                return
            self.refs[key] -= 1
            if self.refs[key] <= 0:
                self.envs.pop(key).close()
                del self.refs[key]

    # -- reads and forks -------------------------------------------------------------------------
    def reading(self) -> Any:
        """This thread's read lock: hold it (``with``) while using an environment (opening a
        shard, a transaction, the bytes it returns). Run no code of the user's under it."""
        local = self._local
        lock = getattr(local, "lock", None)
        if lock is None:
            lock, token, number = threading.RLock(), _Token(), next(self._numbers)
            with self._forks:  # (not while a fork is taking the read locks)
                self._read_locks[number] = lock
            local.lock, local.token = lock, token
            # when the thread ends, its thread-local values go, and its lock with them (also
            # for threads that the threading module does not know of)
            weakref.finalize(token, self._read_locks.pop, number, None)
        return lock

    def _before_fork(self) -> None:
        self._forks.acquire()
        self._fork_owner = threading.get_ident()
        own = getattr(self._local, "lock", None)  # a fork inside this thread's read: not waited
        held = self._local.held = []
        for lock in list(self._read_locks.values()):
            if lock is not own:
                held.append(lock)
                lock.acquire()  # waits for that thread's read in progress, holds back its next
        self.close_all()

    def _after_fork_in_parent(self) -> None:
        if self._fork_owner != threading.get_ident():
            return  # this thread's before-fork hook was interrupted before it took the turn
        held, self._local.held = getattr(self._local, "held", []), []
        for lock in held:
            try:
                lock.release()
            except RuntimeError:  # not acquired: the hook was interrupted before it
                pass
        self._fork_owner = None
        self._forks.release()

    def _after_fork_in_child(self) -> None:
        self._fresh_locks()  # the parent's threads, holding some of them, do not exist here
        self.pid, self.envs, self.refs = os.getpid(), {}, {}
        self.generation += 1

    def close_all(self) -> None:
        """Close every environment of this process; readers reopen what they read next."""
        with self.lock:
            if self.pid == os.getpid():
                for env in self.envs.values():
                    env.close()
            self.pid, self.envs, self.refs = os.getpid(), {}, {}
            self.generation += 1


class _Token:
    """A thread-local object whose end tells that its thread ended."""

    __slots__ = ("__weakref__",)


SHARED = SharedEnvironments()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=SHARED._before_fork,
        after_in_parent=SHARED._after_fork_in_parent,
        after_in_child=SHARED._after_fork_in_child,
    )


_watching: list[int] = []  # the process that watches its parent (one thread each)


def exit_with_parent() -> None:
    """Leave this child process the moment the process that started it is gone.

    A worker started by forkserver is a child of the fork server, which outlives a training
    process killed with SIGKILL: PyTorch's DataLoader workers (which watch their parent's pid)
    and the writer's workers would run on, holding their memory. ``multiprocessing`` gives
    every child a sentinel of the process that asked for it, whatever the start method: a
    daemon thread waits on it. Nothing happens in a process that no ``multiprocessing`` start
    made, or twice in one process."""
    import multiprocessing
    from multiprocessing.connection import wait

    parent = multiprocessing.parent_process()
    if parent is None or parent.sentinel is None or _watching == [os.getpid()]:
        return
    _watching[:] = [os.getpid()]

    def watch() -> None:
        wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="torchrecord-watch-parent", daemon=True).start()
