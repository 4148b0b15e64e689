"""Batch buffers in shared memory that DataLoader workers reuse once the training process is
done with them.

A worker that builds a batch in place (``TRDataset.__getitems__``) writes it into shared memory,
which the training process then maps. A fresh segment for every batch costs the worker a page
fault and a page of zeroes for every 4 KiB it writes: 147 pages per 3x224x224 float image, about
a fifth of the CPU a worker spends on a JPEG. Reusing a few segments per worker avoids that cost.

A segment may be written again only when the training process holds no reference to the batch
any more. The training process learns that from the batch's storage: PyTorch keeps a storage's
Python object alive as long as any tensor, view or numpy array uses that memory, so a finalizer
on it runs exactly when the last user lets go. It then writes the batch's ticket (a random
token) into a shared array, one cell per worker and slot. A worker reuses a slot's segment only
when that cell holds the token it sent the segment with. Anything else makes it take a fresh
segment, as PyTorch does, and a buffer whose ticket does not come back is let go of (never
reused): a batch the training process keeps, one that left the worker through another
``collate_fn``, one that failed to build.

When the training process forks while it holds batches, their tickets are withdrawn: the child
shares those pages, and nothing tells when it is done with them. What no finalizer can see is a
batch sent on to another process (``torch.multiprocessing`` queues, spawn ``Process`` arguments):
pass ``recycle_batches=False`` to ``TorchRecord`` for that, or send clones.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import math
import multiprocessing
import os
import secrets
import weakref
from typing import Any

# per worker, at most this many bytes of batch buffers are kept for reuse
MAX_POOL_BYTES = 256 * 2**20

_POOLS: weakref.WeakValueDictionary[str, BatchPool] = weakref.WeakValueDictionary()


class BatchPool:
    """The reusable batch buffers of one loader's workers (see the module's docstring).

    Created in the training process before the workers start; each worker keeps its own
    buffers, the ``released`` array is shared by all of them and the training process."""

    def __init__(self, num_workers: int, slots: int, batch_shape: tuple[int, ...], dtype: Any):
        self.uid = secrets.token_hex(8)
        self.num_workers, self.slots = num_workers, slots
        self.batch_shape, self.dtype = tuple(batch_shape), dtype
        # the ticket of the last batch the training process let go of, per worker and slot
        self.released = multiprocessing.RawArray(ctypes.c_int64, num_workers * slots)
        self._local: dict[int, _Slot] = {}  # this worker's buffers
        self._owner = os.getpid()
        _POOLS[self.uid] = self

    @classmethod
    def for_batches(
        cls, num_workers: int, prefetch_factor: int | None, batch_shape: tuple[int, ...], dtype: Any
    ) -> BatchPool | None:
        """A pool with room for the batches a worker has in flight (queued, being consumed,
        being pinned), within ``MAX_POOL_BYTES``; None when not even two buffers fit."""
        import torch

        if num_workers < 1 or not storage_outlives_its_wrapper():
            return None
        nbytes = torch.empty((), dtype=dtype).element_size() * math.prod(batch_shape)
        slots = min((prefetch_factor or 2) + 2, MAX_POOL_BYTES // max(nbytes, 1))
        return cls(num_workers, slots, batch_shape, dtype) if slots >= 2 else None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_local"] = {}
        if not _spawning():  # pickled for anything but starting a worker: no shared cells
            state["released"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._owner = os.getpid()

    def take(self, rows: int, dtype: Any) -> tuple[Any, Ticket | None]:
        """A ``rows x ...`` batch tensor in shared memory, and its ticket (None: not reusable).

        In a worker of this pool's loader, a free slot's buffer (or a new one while there are
        free slots); otherwise a fresh segment, as PyTorch's collation makes."""
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        if os.getpid() != self._owner:  # a process forked from one that had buffers
            self._local, self._owner = {}, os.getpid()
        usable = (
            self.released is not None
            and info is not None
            and info.id < self.num_workers
            and dtype == self.dtype
            and rows <= self.batch_shape[0]
        )
        if not usable:
            return shared_tensor((rows, *self.batch_shape[1:]), dtype), None
        base = info.id * self.slots
        for slot, held in list(self._local.items()):
            held.age += 1
            # never sent through collate (another collate_fn, a failed batch), or its ticket
            # is long overdue (a batch kept, a training process that cannot hand it back)
            overdue = held.age > 4 * self.slots and self.released[base + slot] != held.token
            if not held.sent or overdue:
                del self._local[slot]
        for slot in range(self.slots):
            held = self._local.get(slot)
            if held is None:
                held = self._local[slot] = _Slot(shared_tensor(self.batch_shape, dtype))
            elif self.released[base + slot] != held.token:
                continue  # still in use
            held.token, held.sent, held.age = secrets.randbits(63) | 1, False, 0
            return held.buffer[:rows], Ticket(self, info.id, slot, held.token)
        return shared_tensor((rows, *self.batch_shape[1:]), dtype), None


class _Slot:
    __slots__ = ("buffer", "token", "sent", "age")

    def __init__(self, buffer: Any):
        self.buffer, self.token, self.sent, self.age = buffer, 0, False, 0


class Ticket:
    """Which buffer a batch was built in: it goes with the batch to the training process."""

    __slots__ = ("pool", "worker", "slot", "token")

    def __init__(self, pool: BatchPool, worker: int, slot: int, token: int):
        self.pool, self.worker, self.slot, self.token = pool, worker, slot, token

    def send(self) -> tuple[str, int, int, int]:
        """The batch leaves through TorchRecord's collate: its ticket can come back."""
        held = self.pool._local.get(self.slot)
        if held is not None and held.token == self.token:
            held.sent = True
        return self.pool.uid, self.worker, self.slot, self.token


@functools.lru_cache(maxsize=1)
def storage_outlives_its_wrapper() -> bool:
    """Whether this PyTorch keeps a storage's Python object alive while tensors use the
    storage (PyObject preservation, PyTorch 2.1 and later). Without it a finalizer on the
    storage would run as soon as the wrapper is dropped, long before the batch is: then no
    buffer is ever reused."""
    import torch

    ran: list[bool] = []
    tensor = torch.empty(1)
    weakref.finalize(tensor.untyped_storage(), ran.append, True)
    gc.collect()
    kept = not ran
    del tensor
    gc.collect()
    return kept and bool(ran)


def _spawning() -> bool:
    from multiprocessing.context import get_spawning_popen

    return get_spawning_popen() is not None


def shared_tensor(shape: tuple[int, ...], dtype: Any) -> Any:
    """An uninitialised tensor in shared memory: sending it to another process copies
    nothing."""
    import torch

    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(math.prod(shape))
    return torch.empty(0, dtype=dtype).new(storage).view(shape)


class Recycled(list):
    """``[images, labels]`` (and the batch's extra fields, if any) on its way from a worker to
    the training process, where it is unpickled as a plain list, with a finalizer that hands
    the ticket back when the training process drops the images."""

    def __init__(self, images: Any, labels: Any, ticket: Ticket, *rest: Any):
        super().__init__((images, labels, *rest))
        self.sent = ticket.send()

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return _arrived, (self[0], self[1], *self.sent, *self[2:])


# finalizers of the batches the training process holds (withdrawn when it forks); finalize
# objects take no weak references, so the ones that ran are dropped as new ones come
_HELD: set[weakref.finalize] = set()


def _arrived(
    images: Any, labels: Any, uid: str, worker: int, slot: int, token: int, *rest: Any
) -> list:
    from torch.utils.data import get_worker_info

    pool = _POOLS.get(uid)
    if pool is not None and pool.released is not None and get_worker_info() is None:
        done = weakref.finalize(
            images.untyped_storage(), _release, pool, os.getpid(), worker, slot, token
        )
        done.atexit = False
        if len(_HELD) >= 64:
            _HELD.difference_update([f for f in _HELD if not f.alive])
        _HELD.add(done)
    return [images, labels, *rest]


def _release(pool: BatchPool, pid: int, worker: int, slot: int, token: int) -> None:
    if os.getpid() == pid:  # never from a forked child dropping its copy of the batch
        pool.released[worker * pool.slots + slot] = token


def _withdraw_held() -> None:
    """Before a fork: the child shares the pages of every batch held now, so none of them may
    be written again (their slots are let go of; the workers make new buffers)."""
    for done in _HELD:
        done.detach()
    _HELD.clear()


os.register_at_fork(before=_withdraw_held)
