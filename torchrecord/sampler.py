"""TRSampler: the order in which records are read, as a function of ``(seed, epoch)`` alone.

Shuffle modes:

* ``"none"`` (``shuffle=False``): record order, shard after shard.
* ``"block"`` (``shuffle=True``, TorchRecord 0.1's shuffle, finished): the shard order is
  permuted, then the records of ``block_shards`` consecutive shards at a time are permuted
  together, so only a window of shards is the working set: the reason for 0.1's ``record_num``
  when a dataset is larger than memory. 0.1's item pool (``pool_size``) runs on top.
* ``"global"`` (``full_shuffle=True``): a new permutation of all records every epoch.

The order never depends on ``num_workers`` or ``batch_size``: it is computed in the main process
from ``(seed, epoch)``, and DataLoader workers only fetch what it says. Under ``torch.distributed``
(or given ``rank`` and ``world_size``) each rank takes every ``world_size``-th record of the
epoch's order: disjoint shares of equal length (the order is padded by repeating its first records,
of what remains of it in a resumed epoch, or its tail dropped with ``drop_last``) that cover the
whole dataset. ``start`` skips the first records of the epoch's order (counted over all ranks),
which is how a resumed job, of any world size, sees every remaining record exactly once.
"""

from __future__ import annotations

import hashlib
import operator
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch.utils.data as data

from .reader import RecordReader

MODES = ("none", "block", "global")
DEFAULT_POOL_SIZE = 64  # 0.1's min(4 * batch_size, 64) for any batch size of 16 or more


def item_pool_size(batch_size: int) -> int:
    """0.1's item pool: ``min(4 * batch_size, 64)``."""
    return min(4 * int(batch_size), 64)


def pool_shuffle(indices: np.ndarray, pool_size: int, rng: np.random.Generator) -> np.ndarray:
    """Pass ``indices`` through a shuffle pool of ``pool_size`` items (a permutation of them)."""
    if pool_size <= 1 or len(indices) <= 1:
        return indices
    out = np.empty_like(indices)
    pool = list(indices[:pool_size])
    picks = rng.integers(0, 1 << 62, size=len(indices))
    n_out = 0
    for i in range(pool_size, len(indices)):
        j = int(picks[n_out] % len(pool))
        out[n_out] = pool[j]
        pool[j] = indices[i]
        n_out += 1
    rest = np.array(pool, dtype=indices.dtype)
    rng.shuffle(rest)
    out[n_out:] = rest
    return out


def resolve_mode(shuffle: bool | str, full_shuffle: bool) -> str:
    if full_shuffle:
        return "global"
    if isinstance(shuffle, str):
        if shuffle not in MODES:
            raise ValueError(f"unknown shuffle mode {shuffle!r}; use one of {', '.join(MODES)}")
        return shuffle
    return "block" if shuffle else "none"


def _process_group() -> tuple[int, int] | None:
    """``(rank, world_size)`` of an initialised ``torch.distributed`` group, or None."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return None


def distributed_rank_and_size(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """``rank``/``world_size`` as given, else from an initialised ``torch.distributed``."""
    if rank is None or world_size is None:
        group = _process_group()
        if group is not None:
            rank = group[0] if rank is None else rank
            world_size = group[1] if world_size is None else world_size
        elif (rank is None) != (world_size is None):
            given = f"rank={rank}" if rank is not None else f"world_size={world_size}"
            raise ValueError(
                f"{given} without {'world_size' if rank is not None else 'rank'} and no "
                "torch.distributed process group: pass both, or create the loader after "
                "torch.distributed.init_process_group()"
            )
    rank, world_size = _count(rank, "rank", 0), _count(world_size, "world_size", 1)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    group = _process_group()
    if group is not None and world_size > group[1]:  # (replica groups may mean it: a warning)
        warnings.warn(
            f"world_size={world_size} but the torch.distributed process group has "
            f"{group[1]} processes: unless other process groups read the shares of ranks "
            f"{group[1]} to {world_size - 1}, their records are never read. Leave rank and "
            "world_size out to take the group's",
            RuntimeWarning,
            stacklevel=4,
        )
    return rank, world_size


def _count(value: Any, what: str, default: int | None = None) -> int:
    """``value`` as a non-negative int (``default`` for None); bools, floats and strings are
    refused, not rounded."""
    if value is None and default is not None:
        return default
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an integer, got {value!r}") from None
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an integer, got {value!r}")
    if number < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {value!r}")
    return number


def _entropy(seed: int, epoch: int) -> list[int]:
    """The seed material of ``(seed, epoch)``'s generator. numpy cuts integers into 32-bit
    words and pads with zero words, so ``[seed, epoch]`` would give seed ``2**32`` at epoch 0
    the order of seed 0 at epoch 1; larger seeds (rare) take a form that cannot meet another:
    their words, the epoch, then the count of words (never 0, where a short form has padding)."""
    if seed < 1 << 32:
        return [seed, epoch]  # (the orders of every seed and epoch under 2**32 stay as they were)
    words = []
    while seed:
        words.append(seed & 0xFFFFFFFF)
        seed >>= 32
    return [*words, epoch, len(words)]


def _digest_of(order: np.ndarray) -> str:
    """A short SHA-256 of an epoch's order (0.1 s for 10 million records)."""
    return hashlib.sha256(np.ascontiguousarray(order, dtype="<i8").data).hexdigest()[:16]


def _offsets_of(source: Any) -> np.ndarray:
    reader = getattr(source, "reader", source)
    if not isinstance(reader, RecordReader):
        reader = RecordReader(source)
    return reader.offsets


class TRSampler(data.Sampler[int]):
    """Yields this rank's global record indices for one epoch at a time.

    ``record_path`` may be a dataset directory, a :class:`TRDataset` or a ``RecordReader``.
    ``record_num`` (0.1's number of shards) is checked when given. ``batch_size`` and
    ``num_workers`` are accepted for 0.1 compatibility: the order depends on neither.
    """

    def __init__(
        self,
        record_path: Any,
        record_num: int | None = None,
        shuffle: bool | str = False,
        full_shuffle: bool = False,
        batch_size: int = 1,
        num_workers: int = 1,
        *,
        seed: int = 0,
        pool_size: int | None = None,
        block_shards: int = 2,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
    ):
        self.offsets = _offsets_of(record_path)
        num_shards = len(self.offsets) - 1
        if record_num is not None and int(record_num) != num_shards:
            raise ValueError(
                f"record_num={record_num} but {_where(record_path)} has {num_shards} shards; "
                "omit record_num to detect it"
            )
        self.record_num = num_shards
        self.mode = resolve_mode(shuffle, full_shuffle)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.seed = _count(seed, "seed")
        if pool_size is None:
            pool_size = DEFAULT_POOL_SIZE if self.mode == "block" else 0
        self.pool_size = _count(pool_size, "pool_size")
        if int(block_shards) < 1:
            raise ValueError(f"block_shards must be at least 1, got {block_shards}")
        self.block_shards = int(block_shards)
        self.rank, self.world_size = distributed_rank_and_size(rank, world_size)
        # rank 0 of 1 for want of a process group, given nothing: checked again at iteration
        self._guessed_world = rank is None and world_size is None and _process_group() is None
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self._advanced = False  # the epoch was reached by iterating again, not by set_epoch()
        self._warned = False
        self.start = 0  # records of this epoch's order already consumed, over all ranks
        self._digest: tuple[int, str] | None = None  # (epoch, order_digest(epoch)), the last one

    # 0.1 attribute names
    @property
    def shuffle(self) -> bool:
        return self.mode != "none"

    @property
    def full_shuffle(self) -> bool:
        return self.mode == "global"

    @property
    def num_records(self) -> int:
        return int(self.offsets[-1])

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields (as DistributedSampler).

        A resumed position (:meth:`set_start`) is kept when ``epoch`` is the epoch it belongs
        to, so a training loop that calls ``set_epoch`` after ``load_state_dict`` resumes."""
        epoch = _count(epoch, "epoch")
        if epoch >= 1 << 32:  # (one 32-bit word of the generator's seed material: see _entropy)
            raise ValueError(f"epoch must be below 2**32, got {epoch}")
        if epoch != self.epoch:
            self.start = 0
        self.epoch = epoch
        self._advanced = False

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` records of the next epoch's order (counted over all ranks)."""
        start = _count(start, "start")
        if start > self.num_records:
            raise ValueError(f"start {start} is outside an epoch of {self.num_records} records")
        self.start = start

    def check_world(self) -> None:
        """Refuse to read when a process group has started since this sampler took its rank
        and world size from having none: every rank would read the whole dataset."""
        if not self._guessed_world:
            return
        group = _process_group()
        if group is not None and group[1] > 1:
            raise RuntimeError(
                f"this loader was created before torch.distributed.init_process_group(), so it "
                f"reads as rank 0 of 1 while this process is rank {group[0]} of {group[1]}: "
                "every rank would read every record. Create the loader after "
                "init_process_group(), or pass rank= and world_size="
            )

    def order(self, epoch: int) -> np.ndarray:
        """The whole order of one epoch over all ranks, as an int64 array."""
        n = self.num_records
        if self.mode == "none" and self.pool_size <= 1:
            return np.arange(n, dtype=np.int64)
        rng = np.random.default_rng(_entropy(self.seed, epoch))
        if self.mode == "none":  # the item pool alone, over the records in their order
            return pool_shuffle(np.arange(n, dtype=np.int64), self.pool_size, rng)
        if self.mode == "global":
            order = rng.permutation(n).astype(np.int64)
        else:
            shards = rng.permutation(self.record_num)
            parts = []
            for first in range(0, len(shards), self.block_shards):
                window = [
                    np.arange(self.offsets[s], self.offsets[s + 1], dtype=np.int64)
                    for s in shards[first : first + self.block_shards]
                ]
                parts.append(rng.permutation(np.concatenate(window)))
            order = np.concatenate(parts) if parts else np.arange(0, dtype=np.int64)
        return pool_shuffle(order, self.pool_size, rng)

    def order_digest(self, epoch: int) -> str:
        """A digest of :meth:`order` (``epoch``): a saved position names the same records only
        where the order is the same, and numpy does not promise the same permutations across
        its versions. Kept for the last epoch asked, as checkpoints ask again and again."""
        if self._digest is None or self._digest[0] != epoch:
            self._digest = (epoch, _digest_of(self.order(epoch)))
        return self._digest[1]

    def rank_indices(self, epoch: int, start: int = 0) -> np.ndarray:
        """This rank's share of epoch ``epoch`` after skipping ``start`` records."""
        order = self.order(epoch)
        if self._digest is None or self._digest[0] != epoch:  # (for a state saved mid-epoch)
            self._digest = (epoch, _digest_of(order))
        remaining = order[start:]
        world = self.world_size
        if world > 1:
            if self.drop_last:
                remaining = remaining[: len(remaining) // world * world]
            elif len(remaining) % world:
                pad = world - len(remaining) % world
                base = remaining if len(remaining) else self.order(epoch)
                remaining = np.concatenate([remaining, np.resize(base, pad)])
        return remaining[self.rank :: world]

    def __len__(self) -> int:
        remaining = self.num_records - self.start
        if self.world_size == 1:
            return remaining
        if self.drop_last:
            return remaining // self.world_size
        return -(-remaining // self.world_size)

    def __iter__(self) -> Iterator[int]:
        epoch, start = self.epoch, self.start
        if self._advanced and self.world_size > 1 and not self._warned:
            self._warned = True
            warnings.warn(
                f"rank {self.rank} of {self.world_size} reads epoch {epoch}, reached by "
                "iterating again without set_epoch(): the ranks read disjoint shares only if "
                "each iterates exactly as often. Call set_epoch(epoch) on every rank at every "
                "epoch, as with DistributedSampler",
                RuntimeWarning,
                stacklevel=3,
            )
        # the next epoch shuffles differently unless set_epoch() says otherwise
        self.epoch, self.start, self._advanced = epoch + 1, 0, True
        return iter(self.rank_indices(epoch, start).tolist())


def _where(source: Any) -> str:
    reader = getattr(source, "reader", source)
    return str(getattr(reader, "path", source))
