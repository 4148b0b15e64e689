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
when that cell holds the token it sent the segment with; anything else (a batch still held, a
ticket that never came back) makes it take a fresh segment, as PyTorch does. The cost of a lost
ticket is a slot that stops being reused, never a batch overwritten while in use.

What the finalizer cannot see is a batch handed on to another process
(``torch.multiprocessing``): pass ``recycle_batches=False`` to ``TorchRecord`` for that, or clone
the tensors you send.
"""

from __future__ import annotations

import ctypes
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
        self._local: dict[int, tuple[Any, int]] = {}  # slot -> (buffer, ticket sent with it)
        self._owner = os.getpid()
        _POOLS[self.uid] = self

    @classmethod
    def for_batches(
        cls, num_workers: int, prefetch_factor: int | None, batch_shape: tuple[int, ...], dtype: Any
    ) -> BatchPool | None:
        """A pool with room for the batches a worker has in flight (queued, being consumed,
        being pinned), within ``MAX_POOL_BYTES``; None when not even two buffers fit."""
        import torch

        if num_workers < 1:
            return None
        nbytes = torch.empty((), dtype=dtype).element_size()
        for n in batch_shape:
            nbytes *= n
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

    def take(self, rows: int, dtype: Any) -> tuple[Any, tuple[str, int, int, int] | None]:
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
        if usable:
            base = info.id * self.slots
            for slot in range(self.slots):
                held = self._local.get(slot)
                if held is None:
                    buffer = shared_tensor(self.batch_shape, dtype)
                elif self.released[base + slot] == held[1]:
                    buffer = held[0]
                else:
                    continue
                ticket = secrets.randbits(63)
                self._local[slot] = (buffer, ticket)
                return buffer[:rows], (self.uid, info.id, slot, ticket)
        return shared_tensor((rows, *self.batch_shape[1:]), dtype), None

    def give_back(self, ticket: tuple[str, int, int, int] | None) -> None:
        """A batch that will not be sent after all (its building failed): free its slot."""
        if ticket is not None:  # its slot's cell: no batch of this slot is held elsewhere
            _, worker, slot, token = ticket
            self.released[worker * self.slots + slot] = token

    def release(self, worker: int, slot: int, token: int) -> None:
        self.released[worker * self.slots + slot] = token


def _spawning() -> bool:
    from multiprocessing.context import get_spawning_popen

    return get_spawning_popen() is not None


def shared_tensor(shape: tuple[int, ...], dtype: Any) -> Any:
    """An uninitialised tensor in shared memory: sending it to another process copies
    nothing."""
    import torch

    count = 1
    for n in shape:
        count *= n
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(count)
    return torch.empty(0, dtype=dtype).new(storage).view(shape)


class Recycled:
    """A batch on its way from a worker to the training process: unpickled there as the plain
    ``[images, labels]`` list, with a finalizer that hands the ticket back when the training
    process drops the images."""

    __slots__ = ("images", "labels", "ticket")

    def __init__(self, images: Any, labels: Any, ticket: tuple[str, int, int, int]):
        self.images, self.labels, self.ticket = images, labels, ticket

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return _arrived, (self.images, self.labels, *self.ticket)


def _arrived(images: Any, labels: Any, uid: str, worker: int, slot: int, token: int) -> list:
    pool = _POOLS.get(uid)
    if pool is not None and pool.released is not None and os.getpid() == pool._owner:
        done = weakref.finalize(images.untyped_storage(), pool.release, worker, slot, token)
        done.atexit = False
    return [images, labels]
