"""TorchRecord(): a PyTorch ``DataLoader`` over a TorchRecord dataset, in one call."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from torch.utils.data import DataLoader

from .dataset import TRDataset
from .sampler import TRSampler
from .transforms import default_transform


class TorchRecord(DataLoader):
    """A ``DataLoader`` over a :class:`TRDataset`, driven by a :class:`TRSampler`.

    The first five parameters are TorchRecord 0.1's; the codec, serializer and number of shards
    are detected from the dataset (``record_num`` is checked when given). Any other keyword
    (``pin_memory``, ``persistent_workers``, ``prefetch_factor``, ``collate_fn``,
    ``drop_last``, ``multiprocessing_context``...) goes to ``DataLoader``.
    """

    def __init__(
        self,
        record_path: str | os.PathLike,
        record_num: int | None = None,
        shuffle: bool = False,
        batch_size: int = 1,
        num_workers: int = 0,
        transform: Callable[[Any], Any] | None = default_transform,
        *,
        full_shuffle: bool = False,
        seed: int = 0,
        pool_size: int | None = None,
        verify_checksums: bool = True,
        **loader_kwargs: Any,
    ):
        dataset = TRDataset(
            record_path,
            transform=transform,
            record_num=record_num,
            verify_checksums=verify_checksums,
        )
        sampler = TRSampler(
            dataset,
            record_num,
            shuffle=shuffle,
            full_shuffle=full_shuffle,
            batch_size=batch_size,
            num_workers=num_workers,
            seed=seed,
            pool_size=pool_size,
        )
        super().__init__(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=num_workers,
            **loader_kwargs,
        )

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order the next iteration yields."""
        self.sampler.set_epoch(epoch)
