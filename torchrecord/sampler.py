"""TRSampler: the order in which records are read, as a function of ``(seed, epoch)`` alone.

Modes:

* ``shuffle=False``: record order, shard after shard.
* ``shuffle=True``: TorchRecord 0.1's shuffle, finished: the shard order is permuted, records are
  permuted inside each shard (so one shard at a time is the working set, the reason for 0.1's
  ``record_num``), and the stream passes through an item pool of ``min(4 * batch_size, 64)``.
* ``full_shuffle=True``: a new permutation of all records every epoch (0.1's unfinished mode).

Each epoch visits every record exactly once. The order never depends on ``num_workers``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch.utils.data as data

from .reader import RecordReader


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


def _offsets_of(source: Any) -> np.ndarray:
    reader = getattr(source, "reader", source)
    if not isinstance(reader, RecordReader):
        reader = RecordReader(source)
    return reader.offsets


class TRSampler(data.Sampler[int]):
    """Yields global record indices for one epoch at a time.

    ``record_path`` may be a dataset directory, a :class:`TRDataset` or a ``RecordReader``.
    ``record_num`` (0.1's number of shards) is checked when given. ``num_workers`` is accepted
    for 0.1 compatibility: the order does not depend on it.
    """

    def __init__(
        self,
        record_path: Any,
        record_num: int | None = None,
        shuffle: bool = False,
        full_shuffle: bool = False,
        batch_size: int = 1,
        num_workers: int = 1,
        *,
        seed: int = 0,
        pool_size: int | None = None,
    ):
        self.offsets = _offsets_of(record_path)
        num_shards = len(self.offsets) - 1
        if record_num is not None and int(record_num) != num_shards:
            raise ValueError(
                f"record_num={record_num} but {_where(record_path)} has {num_shards} shards; "
                "omit record_num to detect it"
            )
        self.record_num = num_shards
        self.shuffle = bool(shuffle)
        self.full_shuffle = bool(full_shuffle)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.pool_size = item_pool_size(batch_size) if pool_size is None else int(pool_size)
        self.epoch = 0

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields (as DistributedSampler)."""
        self.epoch = int(epoch)

    def indices(self, epoch: int) -> np.ndarray:
        """The whole order of one epoch, as an int64 array."""
        n = len(self)
        if not (self.shuffle or self.full_shuffle):
            return np.arange(n, dtype=np.int64)
        rng = np.random.default_rng([self.seed, epoch])
        if self.full_shuffle:
            return rng.permutation(n).astype(np.int64)
        parts = []
        for shard in rng.permutation(self.record_num):
            start, stop = int(self.offsets[shard]), int(self.offsets[shard + 1])
            parts.append(start + rng.permutation(stop - start))
        order = np.concatenate(parts).astype(np.int64) if parts else np.arange(0)
        return pool_shuffle(order, self.pool_size, rng)

    def __iter__(self) -> Iterator[int]:
        epoch = self.epoch
        self.epoch += 1  # the next epoch shuffles differently unless set_epoch() says otherwise
        yield from self.indices(epoch).tolist()


def _where(source: Any) -> str:
    reader = getattr(source, "reader", source)
    return (
        str(getattr(reader, "path", source))
        if not isinstance(source, (str, os.PathLike))
        else str(source)
    )
