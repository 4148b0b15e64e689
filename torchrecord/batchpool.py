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

The training process maps each buffer once. A buffer travels to it as PyTorch sends shared
memory only the first time: a file descriptor, passed through a fresh socket connection to the
worker with an authentication handshake, about 0.4 ms a tensor here. The training process keeps
that mapping, marks the buffer as mapped in a second shared array, and from then on the worker
sends only which buffer a batch is in (and the labels as numbers, not as a tensor of their
own). Each batch the training process receives is a new tensor with a storage of its own over
the mapped buffer, so its finalizer still runs exactly when that batch is let go of.

When the training process forks while it holds batches, their tickets are withdrawn: the child
shares those pages, and nothing tells when it is done with them. What no finalizer can see is a
batch sent on to another process by anything but PyTorch's pickling (which copies a batch into
new shared memory as it leaves, since its storage is not shared memory itself): pass
``recycle_batches=False`` to ``TorchRecord`` for that, or send clones.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import math
import multiprocessing
import os
import secrets
import threading
import weakref
from typing import Any

# per worker, at most this many bytes of batch buffers are kept for reuse
MAX_POOL_BYTES = 256 * 2**20

_POOLS: weakref.WeakValueDictionary[str, BatchPool] = weakref.WeakValueDictionary()


class BatchPool:
    """The reusable batch buffers of one loader's workers (see the module's docstring).

    Created in the training process before the workers start; each worker keeps its own
    buffers, the ``released`` array is shared by all of them and the training process."""

    def __init__(
        self,
        num_workers: int,
        slots: int,
        batch_shape: tuple[int, ...],
        dtype: Any,
        channels_last: bool = False,
    ):
        self.uid = secrets.token_hex(8)
        self.num_workers, self.slots = num_workers, slots
        self.batch_shape, self.dtype = tuple(batch_shape), dtype
        self.channels_last = channels_last  # the buffers' memory format (see shared_tensor)
        # the ticket of the last batch the training process let go of, per worker and slot
        self.released = multiprocessing.RawArray(ctypes.c_int64, num_workers * slots)
        # the buffer the training process has mapped, per worker and slot (its ident)
        self.mapped = multiprocessing.RawArray(ctypes.c_int64, num_workers * slots)
        self._local: dict[int, _Slot] = {}  # this worker's buffers
        # in the training process: per worker process (pid) and slot, (ident, the mapped
        # buffer as numpy); by pid, as two iterators of a loader without persistent workers
        # have a worker 0 each, and so share the cells of ``mapped``
        self._maps: dict[tuple[int, int], tuple[int, Any]] = {}
        self._owner = os.getpid()
        _POOLS[self.uid] = self

    @classmethod
    def for_batches(
        cls,
        num_workers: int,
        prefetch_factor: int | None,
        batch_shape: tuple[int, ...],
        dtype: Any,
        channels_last: bool = False,
    ) -> BatchPool | None:
        """A pool with room for the batches a worker has in flight (queued, being consumed,
        being pinned), within ``MAX_POOL_BYTES``; None when not even two buffers fit."""
        import torch

        if num_workers < 1 or not storage_outlives_its_wrapper():
            return None
        nbytes = torch.empty((), dtype=dtype).element_size() * math.prod(batch_shape)
        slots = min((prefetch_factor or 2) + 2, MAX_POOL_BYTES // max(nbytes, 1))
        if slots < 2:
            return None
        return cls(num_workers, slots, batch_shape, dtype, channels_last)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_local"], state["_maps"] = {}, {}
        if not _spawning():  # pickled for anything but starting a worker: no shared cells
            state["released"] = state["mapped"] = None
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
            self._local, self._owner = {}, os.getpid()  # (_maps: see _after_fork_in_child)
        usable = (
            self.released is not None
            and info is not None
            and info.id < self.num_workers
            and dtype == self.dtype
            and rows <= self.batch_shape[0]
        )
        layout = self.channels_last
        if not usable:
            return shared_tensor((rows, *self.batch_shape[1:]), dtype, layout), None
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
                held = self._local[slot] = _Slot(shared_tensor(self.batch_shape, dtype, layout))
            elif self.released[base + slot] != held.token:
                continue  # still in use
            held.token, held.sent, held.age = secrets.randbits(63) | 1, False, 0
            return held.buffer[:rows], Ticket(self, info.id, slot, held.token, held.ident)
        return shared_tensor((rows, *self.batch_shape[1:]), dtype, layout), None


class _Slot:
    __slots__ = ("buffer", "ident", "token", "sent", "age")

    def __init__(self, buffer: Any):
        self.buffer, self.token, self.sent, self.age = buffer, 0, False, 0
        self.ident = secrets.randbits(63) | 1  # which buffer: a slot's may be replaced


class Ticket:
    """Which buffer a batch was built in: it goes with the batch to the training process."""

    __slots__ = ("pool", "worker", "slot", "token", "ident")

    def __init__(self, pool: BatchPool, worker: int, slot: int, token: int, ident: int):
        self.pool, self.worker, self.slot, self.token = pool, worker, slot, token
        self.ident = ident

    def send(self) -> tuple[str, int, int, int, int, int, bool]:
        """The batch leaves through TorchRecord's collate: its ticket can come back. Also
        whether the training process has this buffer mapped already (then the batch goes
        without it)."""
        held = self.pool._local.get(self.slot)
        if held is not None and held.token == self.token:
            held.sent = True
        mapped = self.pool.mapped
        known = (
            mapped is not None
            and held is not None
            and held.ident == self.ident
            and mapped[self.worker * self.pool.slots + self.slot] == self.ident
        )
        return self.pool.uid, self.worker, self.slot, self.token, self.ident, os.getpid(), known


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


def shared_tensor(shape: tuple[int, ...], dtype: Any, channels_last: bool = False) -> Any:
    """An uninitialised tensor in shared memory: sending it to another process copies
    nothing. ``channels_last``: an ``N x C x H x W`` tensor whose memory holds each pixel's
    channels together (``torch.channels_last``)."""
    import torch

    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(math.prod(shape))
    return _shaped(torch.empty(0, dtype=dtype).new(storage), shape, channels_last)


def _shaped(flat: Any, shape: tuple[int, ...], channels_last: bool) -> Any:
    """``flat`` (a tensor over a whole buffer) as an ``N x C x H x W`` tensor, its memory in
    channel order or, ``channels_last``, with each pixel's channels together."""
    if channels_last:
        n, c, h, w = shape
        return flat.view(n, h, w, c).permute(0, 3, 1, 2)
    return flat.view(shape)


class Recycled(list):
    """``[images, labels]`` (and the batch's extra fields, if any) on its way from a worker to
    the training process, where it is unpickled as a plain list, with a finalizer that hands
    the ticket back when the training process drops the images."""

    def __init__(self, images: Any, labels: Any, ticket: Ticket, *rest: Any):
        super().__init__((images, labels, *rest))
        self.sent = ticket.send()

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        images, labels = self[0], self[1]
        uid, worker, slot, token, ident, pid, known = self.sent
        # a buffer the training process has mapped goes as its row count alone; the labels as
        # numbers (a tensor of their own would be one more shared segment to pass)
        return _arrived, (
            len(images) if known else images,
            (labels.tolist(), labels.dtype),
            uid,
            worker,
            slot,
            token,
            ident,
            pid,
            *self[2:],
        )


# finalizers of the batches the training process holds (withdrawn when it forks); finalize
# objects take no weak references, so the ones that ran are dropped as new ones come
_HELD: set[weakref.finalize] = set()
_HELD_LOCK = threading.Lock()


def _arrived(
    images: Any,
    labels: tuple[list[int], Any],
    uid: str,
    worker: int,
    slot: int,
    token: int,
    ident: int,
    pid: int,
    *rest: Any,
) -> list:
    """A batch unpickled from a worker (see :class:`Recycled`): ``images`` is the batch tensor,
    or its row count when this process has the buffer mapped already."""
    import torch
    from torch.utils.data import get_worker_info

    pool = _POOLS.get(uid)
    here = pool is not None and pool.released is not None and get_worker_info() is None
    cell = worker * pool.slots + slot if pool is not None else None
    if isinstance(images, int):  # the worker sent no buffer: this process has it mapped
        known = pool._maps.get((pid, slot)) if here else None
        if known is None or known[0] != ident:
            raise RuntimeError(
                f"a batch of worker {worker} came without its buffer, which this process "
                "has not mapped: TorchRecord's recycled batches can be received only by the "
                "process that made the loader. Pass recycle_batches=False to TorchRecord if "
                "the worker results go elsewhere"
            )
        images = torch.from_numpy(known[1][:images])
    elif here:
        array = _mapped_buffer(pool, images)
        if array is not None:  # from now on the worker sends only the row count
            _forget_dead_workers(pool)
            pool._maps[pid, slot] = (ident, array)  # (a buffer the slot had before: dropped)
            pool.mapped[cell] = ident
            images = torch.from_numpy(array[: len(images)])
    labels = torch.tensor(labels[0], dtype=labels[1])
    if here:
        # images has a storage of its own (from_numpy makes one at every batch): it ends when
        # the last tensor, view or array of this batch does
        done = weakref.finalize(
            images.untyped_storage(), _release, pool, os.getpid(), worker, slot, token
        )
        done.atexit = False
        with _HELD_LOCK:  # (the pin-memory thread unpickles; a fork may come meanwhile)
            if len(_HELD) >= 64:
                _HELD.difference_update([f for f in _HELD if not f.alive])
            _HELD.add(done)
    return [images, labels, *rest]


def _mapped_buffer(pool: BatchPool, images: Any) -> Any:
    """The whole buffer behind ``images`` as a numpy array (which keeps the mapping), or None
    when it is not one of the pool's buffers as :meth:`BatchPool.take` makes them."""
    import torch

    storage, row = images.untyped_storage(), pool.batch_shape[1:]
    rows = storage.nbytes() // max(images.element_size() * math.prod(row), 1)
    layout = torch.channels_last if pool.channels_last else torch.contiguous_format
    if (
        images.storage_offset() != 0
        or not images.is_contiguous(memory_format=layout)
        or tuple(images.shape[1:]) != row
        or rows != pool.batch_shape[0]
    ):
        return None
    flat = torch.empty(0, dtype=images.dtype).set_(storage, 0, (rows * math.prod(row),))
    whole = _shaped(flat, (rows, *row), pool.channels_last)  # (numpy and from_numpy keep strides)
    try:
        return whole.numpy()
    except (TypeError, RuntimeError):  # a dtype numpy does not have
        return None


def _release(pool: BatchPool, pid: int, worker: int, slot: int, token: int) -> None:
    if os.getpid() == pid:  # never from a forked child dropping its copy of the batch
        pool.released[worker * pool.slots + slot] = token


def _withdraw_held() -> None:
    """Before a fork: the child shares the pages of every batch held now, so none of them may
    be written again (their slots are let go of; the workers make new buffers)."""
    _HELD_LOCK.acquire()  # (released on both sides of the fork)
    for done in _HELD:
        done.detach()
    _HELD.clear()


def _after_fork_in_parent() -> None:
    _HELD_LOCK.release()


def _after_fork_in_child() -> None:
    """A forked child (a worker of another loader, a process of the user's) lets go of the
    buffers this process had mapped: it never receives batches in them."""
    _HELD_LOCK.release()
    for pool in list(_POOLS.values()):
        pool._maps = {}


def _forget_dead_workers(pool: BatchPool) -> None:
    """Drop the mappings of buffers whose worker has exited (workers that are not persistent
    start afresh every epoch): batches still held keep their own."""
    for pid in {pid for pid, _ in pool._maps}:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            for key in [key for key in pool._maps if key[0] == pid]:
                del pool._maps[key]
        except PermissionError:  # alive, another user's (a reused pid): not ours to judge
            pass


os.register_at_fork(
    before=_withdraw_held,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)
