"""LMDB environments shared by every reader of this process.

py-lmdb refuses to open one file twice in a process, so everything that reads a dataset (two
loaders over one dataset, the manifest reader of a 0.1 dataset) goes through :data:`SHARED`.
"""

from __future__ import annotations

import os
import threading
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
        self.lock = threading.Lock()
        # held by a fork from before it to after it: no thread registers, no other fork starts
        self._forks = threading.Lock()
        self._read_locks: dict[int, Any] = {}  # thread id -> that thread's read lock
        self._local = threading.local()
        self._held: list[Any] = []  # the read locks a fork in progress holds

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
        shard, a transaction, the bytes it returns)."""
        lock = getattr(self._local, "lock", None)
        if lock is None:
            lock = threading.RLock()
            with self._forks:  # (not while a fork is taking the read locks)
                self._read_locks[threading.get_ident()] = lock
            self._local.lock = lock
        return lock

    def _before_fork(self) -> None:
        self._forks.acquire()
        me = threading.get_ident()
        alive = {thread.ident for thread in threading.enumerate()}
        for ident, lock in list(self._read_locks.items()):
            if ident not in alive:
                del self._read_locks[ident]  # a thread that ended (its lock is free)
            elif ident != me:  # (a fork from inside this thread's own read is not waited for)
                self._held.append(lock)
                lock.acquire()  # waits for that thread's read in progress, holds back its next
        self.close_all()

    def _after_fork_in_parent(self) -> None:
        held, self._held = self._held, []
        for lock in held:
            try:
                lock.release()
            except RuntimeError:  # not acquired: the fork was interrupted before it
                pass
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


SHARED = SharedEnvironments()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=SHARED._before_fork,
        after_in_parent=SHARED._after_fork_in_parent,
        after_in_child=SHARED._after_fork_in_child,
    )
