"""LMDB environments shared by every reader of this process.

py-lmdb refuses to open one file twice in a process, so everything that reads a dataset (two
loaders over one dataset, the manifest reader of a 0.1 dataset) goes through :data:`SHARED`.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
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
    a loader starts its workers): reads go through a gate (:meth:`enter_read`,
    :meth:`leave_read`), and the fork closes the environments only once no read is inside and
    keeps the gate shut until the child exists. A read waits for the fork, then reopens.
    """

    def __init__(self) -> None:
        self._fresh_locks()
        self.pid = os.getpid()
        self.generation = 0
        self.envs: dict[tuple, Any] = {}
        self.refs: dict[tuple, int] = {}

    def _fresh_locks(self) -> None:
        self.lock = threading.Lock()
        # reads in progress, one entry (the thread's id) per read; deque appends, removes and
        # len() are atomic, which keeps a read's cost at a few tenths of a microsecond
        self._reads: deque[int] = deque()
        self._forking = False

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
    def enter_read(self) -> None:
        """Before using an environment (opening a shard, a transaction): waits while a fork
        closes them. Pair each call with :meth:`leave_read`."""
        me = threading.get_ident()
        while True:
            self._reads.append(me)
            if not self._forking:  # (checked after the append: see _before_fork)
                return
            self._reads.remove(me)  # a fork is closing the environments: let it, then read
            while self._forking:
                time.sleep(0.0002)

    def leave_read(self) -> None:
        self._reads.remove(threading.get_ident())

    def _before_fork(self) -> None:
        # Set the flag, then look at the reads: a read that started before sees it, backs off
        # and waits; one that started after waits. (The GIL runs these steps one at a time.)
        self._forking = True
        me = threading.get_ident()  # a fork from inside this thread's own read is not waited for
        while any(thread != me for thread in list(self._reads)):
            time.sleep(0.0002)
        self.close_all()  # the gate stays shut until the child exists

    def _after_fork_in_parent(self) -> None:
        self._forking = False

    def _after_fork_in_child(self) -> None:
        self._fresh_locks()  # a thread of the parent may have held them: it does not exist here
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
