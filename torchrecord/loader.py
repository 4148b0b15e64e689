"""TorchRecord(): a PyTorch ``DataLoader`` over a TorchRecord dataset, in one call."""

from __future__ import annotations

import functools
import itertools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from torch.utils.data import DataLoader

from .batchpool import BatchPool
from .dataset import TRDataset, collate
from .sampler import TRSampler, _process_group

STATE_VERSION = 1
# how orders are drawn from (seed, epoch): 2 since seeds of 2**32 or more got their own
# seed material (sampler._entropy); states saved before carry no "order" key
ORDER_SCHEME = 2
# what must match for a saved position to mean the same records in the same order
_ENDED = object()  # (a batch that never came)
_SETTINGS = ("seed", "mode", "pool_size", "block_shards", "num_records")
# loaders created under torch.distributed, counted per line of code that creates them: the same
# loader of every rank has the same key (see TorchRecord._check_ranks_agree)
_CREATED_AT: dict[str, itertools.count] = {}


class TorchRecord(DataLoader):
    """A ``DataLoader`` over a :class:`TRDataset`, driven by a :class:`TRSampler`.

    The first five parameters are TorchRecord 0.1's; the codec, serializer and number of shards
    are detected from the dataset (``record_num`` is checked when given). ``shuffle`` is a bool
    (0.1) or a mode: ``"none"``, ``"block"`` or ``"global"``. Under ``torch.distributed`` each
    rank reads its own share. Any other keyword (``pin_memory``, ``persistent_workers``,
    ``prefetch_factor``, ``collate_fn``, ``drop_last``, ``multiprocessing_context``...) goes to
    ``DataLoader``; ``persistent_workers`` defaults to True when there are workers.
    :meth:`state_dict` and :meth:`load_state_dict` resume in the middle of an epoch, also with a
    different number of workers, batch size or world size.

    With the tensor transforms (``"auto"``, ``"fast"``, ``"uint8"``) and TorchRecord's own
    collation, workers build each batch in shared memory and reuse a few such buffers once the
    training process has dropped every reference to a batch (``recycle_batches``; see
    :mod:`torchrecord.batchpool`). The training process maps each buffer once; a batch sent on
    through a ``torch.multiprocessing`` queue leaves as a copy. Pass ``recycle_batches=False``
    if anything else shares a batch's memory with another process (a raw pointer handed to
    native code that outlives the batch, say).

    ``channels_last=True`` yields each batch of images in ``torch.channels_last`` memory
    format: the same ``N x 3 x 224 x 224`` shape and values, with each pixel's three channels
    side by side in memory, the order the resize gives them. Built in place, such a batch
    costs the workers less than one in channel order, and convolutional networks on the GPU
    prefer it (with mixed precision); ``images.view(N, -1)`` then needs ``reshape`` instead.
    """

    def __init__(
        self,
        record_path: str | os.PathLike,
        record_num: int | None = None,
        shuffle: bool | str = True,  # (0.1's default: its shuffle, "block")
        batch_size: int = 1,
        num_workers: int = 0,
        transform: Callable[[Any], Any] | str | None = "auto",
        *,
        full_shuffle: bool = False,
        seed: int = 0,
        pool_size: int | None = None,
        block_shards: int = 2,
        rank: int | None = None,
        world_size: int | None = None,
        verify_checksums: bool = True,
        on_corrupt: str = "raise",
        drop_last: bool = False,
        recycle_batches: bool = True,
        channels_last: bool = False,
        **loader_kwargs: Any,
    ):
        if batch_size is None or isinstance(batch_size, bool) or not int(batch_size) >= 1:
            raise ValueError(
                f"batch_size={batch_size!r}: TorchRecord yields batches (its resume counts "
                "them); pass a batch size of 1 or more (1 for one sample at a time)"
            )
        if not loader_kwargs.get("in_order", True):
            raise ValueError(
                "in_order=False hands batches over as workers finish them, out of order; "
                "TorchRecord's order (a function of seed and epoch) and its resume "
                "(state_dict counts the batches yielded) need them in order: leave in_order out"
            )
        dataset = TRDataset(
            record_path,
            transform=transform,
            record_num=record_num,
            verify_checksums=verify_checksums,
            on_corrupt=on_corrupt,
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
            block_shards=block_shards,
            rank=rank,
            world_size=world_size,
            drop_last=drop_last,
        )
        if sampler.mode == "block":
            dataset.reader.max_open_shards = block_mode_open_shards(dataset.reader, sampler)
            if not dataset.reader.manifest.legacy:  # (0.1's shards share one file and map)
                reader = dataset.reader
                reader.keep_open_bytes, reader.keep_open_shards = block_mode_keep_open()
        group = _process_group()
        if group is not None and (sampler.rank, sampler.world_size) == group and group[1] > 1:
            caller = sys._getframe(1)  # (a subclass's __init__: the line that made it is higher)
            while caller.f_code.co_name == "__init__" and isinstance(
                caller.f_locals.get("self"), TorchRecord
            ):
                caller = caller.f_back
            site = f"{caller.f_code.co_filename}:{caller.f_lineno}"
            self._serial = f"{site}#{next(_CREATED_AT.setdefault(site, itertools.count()))}"
        if loader_kwargs.get("collate_fn") in (None, collate):
            # our collate_fn takes the batches the dataset builds in place (see __getitems__)
            loader_kwargs["collate_fn"] = (
                functools.partial(collate, channels_last=True) if channels_last else collate
            )
            dataset.prebatch = True
            dataset.channels_last = bool(channels_last)
            if recycle_batches and dataset.batch_dtype is not None:
                dataset.batch_pool = BatchPool.for_batches(
                    num_workers,
                    loader_kwargs.get("prefetch_factor"),
                    (batch_size, 3, 224, 224),
                    dataset.batch_dtype,
                    dataset.channels_last,
                )
        elif channels_last:
            raise ValueError(
                "channels_last=True applies to the batches TorchRecord collates; with a "
                "collate_fn of your own, put the images into that format in it "
                "(images.contiguous(memory_format=torch.channels_last)), or leave out "
                "collate_fn"
            )
        if num_workers > 0:
            # the dataset never changes between epochs, so keeping the workers costs nothing
            # and saves their start-up (a fork and the first batches) at every epoch
            loader_kwargs.setdefault("persistent_workers", True)
        super().__init__(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=num_workers,
            drop_last=drop_last,
            **loader_kwargs,
        )
        self._progress: dict[str, int] | None = None  # the epoch being iterated
        if sampler.num_records > 0 and len(self) == 0:  # (only drop_last empties a share)
            import warnings

            warnings.warn(
                f"rank {sampler.rank} of {sampler.world_size} reads no batch in an epoch: its "
                f"share of the {sampler.num_records} records is {len(sampler)}, and "
                f"drop_last=True drops all of it (batch_size={batch_size}). Its epochs are "
                "empty: use fewer ranks or a smaller batch, or drop_last=False (which repeats "
                "records to fill every share and batch)",
                RuntimeWarning,
                stacklevel=2,
            )

    @property
    def corrupt_records(self) -> list[dict[str, Any]]:
        """Corrupt records replaced so far (``on_corrupt="warn"`` or ``"skip"``), from every
        worker: each with its index, error type and the message naming shard and key."""
        return self.dataset.corrupt_records()

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order the next iteration yields."""
        self.sampler.set_epoch(epoch)
        self._progress = None  # an interrupted epoch is abandoned

    def __iter__(self) -> Iterator[Any]:
        sampler: TRSampler = self.sampler
        sampler.check_world()
        if not self._ranks_checked:
            self._check_ranks_agree()
            self._ranks_checked = True
        progress = {
            "epoch": sampler.epoch,
            "start": sampler.start,
            "samples": 0,
            "share": len(sampler),
            "running": True,
        }
        self._progress = progress
        self._iterations = generation = getattr(self, "_iterations", 0) + 1
        iterator = super().__iter__()
        try:
            while True:
                try:
                    batch = next(iterator)
                except StopIteration:
                    if progress["samples"] >= progress["share"]:
                        break  # this iteration had all its batches (whoever used up the rest)
                    batch = _ENDED
                if self._iterations != generation and self.persistent_workers:
                    raise RuntimeError(
                        "this loader was iterated again (iter(), a nested for, zip(loader, "
                        "loader)) while this iteration was still in use: with persistent "
                        "workers (TorchRecord's default when num_workers > 0) both share one "
                        "worker iterator, which would repeat some records and skip others. "
                        "Finish or drop one iteration before starting the next, use two "
                        "loaders, or pass persistent_workers=False"
                    )
                if batch is _ENDED:
                    break
                # batches come back in sampler order whatever the number of workers
                progress["samples"] = min(progress["samples"] + self.batch_size, progress["share"])
                yield batch
        except (OSError, EOFError) as exc:  # EOFError is not an OSError
            _raise_if_a_worker_died(iterator, exc)
            raise
        finally:
            progress["running"] = False
        self._progress = None  # the epoch is complete: the sampler has moved to the next one

    _ranks_checked = False
    _serial: str | None = None  # where it was made, the same on every rank (see below)

    def _agreed_settings(self) -> dict[str, Any]:
        sampler: TRSampler = self.sampler
        return {
            "dataset": self.dataset.reader.fingerprint,
            "records": sampler.num_records,
            "world_size": sampler.world_size,
            **{key: getattr(sampler, key) for key in _SETTINGS if key != "num_records"},
            "drop_last": sampler.drop_last,
            "batch_size": self.batch_size,
        }

    def _check_ranks_agree(self) -> None:
        """Under ``torch.distributed``, at the first iteration: refuse to read when another rank's
        loader reads another dataset or with other order settings, batch size or world size.
        Each rank's share would then overlap others and miss records, silently, or the ranks
        would count other numbers of batches and wait for each other forever.

        The first rank to get here leaves its settings in the process group's store, under a
        key naming the line of code that made the loader (and how many loaders that line made
        before); every other rank compares its own with them in the same request
        (``compare_set``), and waits for none, so a loader one rank makes alone is never a
        reason to hang or to refuse. Loaders whose rank and world size are not the process
        group's (ranks that read in groups) are not compared, and nothing is when the store
        cannot do it."""
        group = _process_group()
        if group is None or self._serial is None:
            return
        mine = self._agreed_settings()
        attempt = "/".join(
            os.environ.get(name, "")
            for name in ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT")
        )
        key = f"torchrecord/{attempt}/{group[1]}/{self._serial}"
        try:
            from torch.distributed import distributed_c10d

            store = distributed_c10d._get_default_store()
            value = json.dumps({"rank": group[0], "settings": mine}, sort_keys=True)
            first = json.loads(store.compare_set(key, "", value))
            theirs, other = first["settings"], int(first["rank"])
        except Exception:  # (a store that cannot compare, such as the fake backend's)
            return
        differ = [k for k in sorted(mine) if mine.get(k) != theirs.get(k)]
        if differ:
            what = "; ".join(
                f"{k}: {theirs.get(k)!r} on rank {other}, {mine.get(k)!r} here" for k in differ
            )
            raise RuntimeError(
                f"rank {group[0]}'s TorchRecord loader disagrees with rank {other}'s ({what}). "
                "Every rank must read the same dataset with the same seed, shuffle settings, "
                "batch size and world size, or their shares overlap and miss records (and "
                "ranks that count other numbers of batches wait for each other forever). Vary "
                "augmentation by rank in the transform, not by the seed. (Loaders are matched "
                f"by the line of code that made them: {self._serial}.)"
            )

    def state_dict(self) -> dict[str, Any]:
        """Where reading stands: the epoch and how many of its records all ranks consumed."""
        sampler: TRSampler = self.sampler
        if self._progress is None:
            epoch, consumed = sampler.epoch, sampler.start
        else:
            epoch = self._progress["epoch"]
            consumed = min(
                sampler.num_records,
                self._progress["start"] + self._progress["samples"] * sampler.world_size,
            )
        return {
            "version": STATE_VERSION,
            "epoch": epoch,
            "consumed": consumed,
            "seed": sampler.seed,
            "mode": sampler.mode,
            "pool_size": sampler.pool_size,
            "block_shards": sampler.block_shards,
            "num_records": sampler.num_records,
            "dataset": self.dataset.reader.fingerprint,
            "order": ORDER_SCHEME,
            # the epoch's order itself, checked on resuming (and the numpy that drew it); at
            # an epoch's start or end no order is needed to resume, and none is computed
            "order_digest": (
                sampler.order_digest(epoch) if 0 < consumed < sampler.num_records else None
            ),
            "numpy": np.__version__,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`: the next iteration yields the rest of that epoch.

        Refused when the state comes from another dataset (another fingerprint: other shard
        contents, or the same images written into other shards) or other order settings."""
        sampler: TRSampler = self.sampler
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            version = state.get("version") if isinstance(state, dict) else None
            raise ValueError(
                f"not a TorchRecord loader state (version {version!r}; expected a dict from "
                f"TorchRecord.state_dict() with version {STATE_VERSION})"
            )
        missing = [k for k in ("epoch", "consumed", *_SETTINGS) if k not in state]
        if missing:
            raise ValueError(
                f"the saved TorchRecord state lacks {', '.join(missing)}: pass the dict "
                "TorchRecord.state_dict() returned, unchanged"
            )
        mine = self.dataset.reader.fingerprint
        if "dataset" in state and state["dataset"] != mine:  # (states saved before it: unchecked)
            raise ValueError(
                f"cannot resume: the saved state comes from another dataset than "
                f"{self.dataset.record_path} (dataset fingerprint {state['dataset']!r}, this "
                f"one's {mine!r}: other records, or the same images written into other "
                "shards), so its position would repeat some records and skip others; resume "
                "with the dataset the state was saved from"
            )
        for key in _SETTINGS:
            if state[key] != getattr(sampler, key):
                raise ValueError(
                    f"cannot resume: the saved state has {key}={state[key]!r} but this loader "
                    f"has {getattr(sampler, key)!r}; create the loader with the same dataset, "
                    "seed and shuffle settings"
                )
        if state.get("order", 1) != ORDER_SCHEME and sampler.seed >= 1 << 32:
            raise ValueError(
                "cannot resume: the state was saved by an earlier TorchRecord, whose orders for "
                "seeds of 2**32 or more differ from this one's (they could repeat another "
                "seed's); finish that epoch with the earlier version, or start it afresh"
            )
        epoch, consumed = state["epoch"], state["consumed"]
        previous = (sampler.epoch, sampler.start)
        try:  # both checked before either applies: a refused state changes nothing
            sampler.set_epoch(epoch)
            sampler.set_start(consumed)
            _check_same_order(state, sampler)
        except (TypeError, ValueError):
            sampler.epoch, sampler.start = previous
            raise
        self._progress = None

    def __len__(self) -> int:
        """Batches of the epoch being iterated, or else of the next one (its rest, after
        :meth:`load_state_dict`)."""
        progress = self._progress
        if progress is None or not progress["running"]:
            return super().__len__()
        share = progress["share"]
        return share // self.batch_size if self.drop_last else -(-share // self.batch_size)


def _check_same_order(state: dict[str, Any], sampler: TRSampler) -> None:
    """Refuse a state whose epoch this process would draw in another order (states saved
    before the digest: unchecked)."""
    saved = state.get("order_digest")
    if saved is None or saved == sampler.order_digest(sampler.epoch):
        return
    then, now = state.get("numpy"), np.__version__
    why = (
        f"the state was saved under numpy {then}, this is numpy {now}, whose permutations differ"
        if then and then != now
        else "the order differs (the state was changed, or saved by another TorchRecord)"
    )
    raise ValueError(
        f"cannot resume: this loader draws epoch {sampler.epoch} in another order than the "
        f"one the state was saved in: {why}. Its position would repeat some records and skip "
        f"others; resume under numpy {then or 'the state was saved with'}, or start epoch "
        f"{sampler.epoch} afresh (set_epoch({sampler.epoch}) without load_state_dict)"
    )


def block_mode_open_shards(reader: Any, sampler: TRSampler) -> int:
    """How many shards a process keeps open in block mode, at least (more within
    :func:`block_mode_keep_open`).

    The shards of one window, two when crossing into the next, plus those that records still
    waiting in the item pool come from: a record stays in the pool for ``pool_size`` draws on
    average, and for three times that with probability 5%. Fewer open shards than this makes a
    reader close and reopen the same small shards over and over.
    """
    smallest = max(1, min(s.num_records for s in reader.manifest.shards))
    pooled = -(-3 * sampler.pool_size // smallest) if sampler.pool_size > 1 else 0
    return max(1, min(reader.num_shards, 2 * sampler.block_shards + pooled))


KEEP_OPEN_CAP = 4 << 30


def block_mode_keep_open(cgroup_root: str = "/sys/fs/cgroup") -> tuple[int, int]:
    """``(bytes, shards)``: how much a process may keep open in block mode past
    :func:`block_mode_open_shards`, its most recently used shards first.

    Bytes: an eighth of the memory the process may use (the machine's, or its cgroup's limit
    when lower), at most ``KEEP_OPEN_CAP`` (4 GiB). Closing a shard unmaps it: reading it again
    faulted every page back into the process (about six faults per 454 KB record, every epoch,
    measured), though the pages were still in the page cache. A dataset within this is never
    closed, so from the second epoch on its reads fault no more; a larger one keeps its most
    recently used shards. Each process that reads maps what it keeps (page tables: 1/512 of the
    bytes it touched), hence the cap. Shards: a quarter of the open files the process may have
    (``RLIMIT_NOFILE``), as each open shard holds one.
    """
    try:
        import resource

        files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if files == resource.RLIM_INFINITY or files < 0:
            files = 1 << 20
    except (ImportError, OSError, ValueError):  # (not a POSIX system)
        files = 1024
    return min(usable_memory(cgroup_root) // 8, KEEP_OPEN_CAP), files // 4


def usable_memory(cgroup_root: str = "/sys/fs/cgroup", proc: str = "/proc/self/cgroup") -> int:
    """The machine's memory, or the lowest memory limit of this process's cgroup and its
    ancestors when lower (cgroup v2's ``memory.max``, else v1's ``memory.limit_in_bytes``)."""
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # (not a POSIX system)
        return 0
    try:
        with open(proc, encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    where = {}  # "v2" or "v1" -> the cgroup's path
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) == 3 and fields[0] == "0" and fields[1] == "":
            where["v2"] = fields[2]
        elif len(fields) == 3 and "memory" in fields[1].split(","):
            where["v1"] = fields[2]
    for version, directory, name in (
        ("v2", cgroup_root, "memory.max"),
        ("v1", os.path.join(cgroup_root, "memory"), "memory.limit_in_bytes"),
    ):
        found = False
        parts = [p for p in where.get(version, "/").split("/") if p and p not in (".", "..")]
        for depth in range(len(parts), -1, -1):  # the cgroup, then each ancestor to the root
            limit = _read_limit(os.path.join(directory, *parts[:depth], name))
            if limit is not None:
                found = True
                if limit > 0:
                    memory = min(memory, limit)
        if found:
            break
    return max(memory, 0)


def _read_limit(path: str) -> int | None:
    """The number in a cgroup limit file; 0 for "max"; None when there is no such file."""
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
    except (OSError, ValueError):  # (ValueError: not ASCII)
        return None
    return int(text) if text.isascii() and text.isdigit() else 0


def _raise_if_a_worker_died(iterator: Any, exc: OSError) -> None:
    """A batch whose worker was killed while handing it over (a new buffer or segment travels as
    a file descriptor) fails in ``multiprocessing`` with a connection error, before PyTorch notices
    the death: report it as PyTorch reports a dead worker."""
    workers = getattr(iterator, "_workers", [])
    if not workers:
        return
    # a connection torn down: the worker may still be on its way down, give it a moment
    patience = 1.0 if isinstance(exc, (ConnectionError, EOFError)) else 0.0
    deadline = time.monotonic() + patience
    while True:
        dead = [w for w in workers if w.exitcode is not None]
        if dead or time.monotonic() >= deadline:
            break
        time.sleep(0.01)
    if not dead:
        return
    pids = ", ".join(str(w.pid) for w in dead)
    codes = ", ".join(
        f"killed by signal {-w.exitcode}" if w.exitcode < 0 else f"exit code {w.exitcode}"
        for w in dead
    )
    raise RuntimeError(
        f"DataLoader worker (pid(s) {pids}) exited unexpectedly ({codes}) while handing over "
        f"a batch ({type(exc).__name__}: {exc})"
    ) from exc
