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
    process too: everything is closed in the parent just before ``fork`` (readers notice through
    :attr:`generation` and reopen lazily), and a child never touches its parent's handles.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pid = os.getpid()
        self.generation = 0
        self.envs: dict[tuple, Any] = {}
        self.refs: dict[tuple, int] = {}

    def _check_pid(self) -> None:
        if self.pid != os.getpid():  # inherited: drop, never close, the parent's handles
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

    def close_all(self) -> None:
        with self.lock:
            if self.pid == os.getpid():
                for env in self.envs.values():
                    env.close()
            self.pid, self.envs, self.refs = os.getpid(), {}, {}
            self.generation += 1


SHARED = SharedEnvironments()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=SHARED.close_all)
