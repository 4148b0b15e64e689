"""TRDataset: a map-style PyTorch dataset over a TorchRecord dataset directory.

Any PyTorch sampler can drive it (``len`` and ``__getitem__``). The codec and serializer are read
from the dataset itself; the LMDB shards are opened lazily in each worker process, read-only and
without a lock file, and the dataset pickles (for spawn workers) without them.
"""

from __future__ import annotations

import os
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch.utils.data as data

from .batchpool import Recycled, shared_tensor
from .codecs.base import plugin_bug, plugin_hint, record_label
from .codecs.jpeg import JPEGCodec
from .codecs.raw_rgb import RawRGBCodec
from .codecs.smart import SmartCodec
from .errors import DatasetError, RecordCorruptedError, ShardCorruptedError, TorchRecordError
from .format import CUSTOM_CODEC
from .reader import RecordReader
from .serializers.tensorprotos import TensorProtos
from .transforms import TRANSFORMS, default_transform, preload
from .writer import record_extras

# codecs whose tensor path reads only dims, byte_data and name: given record views (no copy)
VIEW_CODECS = (RawRGBCodec, JPEGCodec, SmartCodec)

ON_CORRUPT = ("raise", "warn", "skip")


def _remove_owned(path: str, owner: int) -> None:
    if os.getpid() == owner:  # never from a forked worker that inherited the finalizer
        try:
            os.unlink(path)
        except OSError:
            pass


_MAX_SUBSTITUTES = 64  # records tried in a row before giving up on a damaged region


class _WithExtras:
    """Adds the record's extra fields to what a built-in transform returns."""

    def __init__(self, transform: Callable[[Any], Any]):
        self.transform = transform

    def __call__(self, record: Any) -> tuple[Any, ...]:
        return (*self.transform(record), Extras(record_extras(record)))


class Extras(dict):
    """A record's extra fields as the built-in transforms return them: :func:`collate`
    batches them by kind (a dict a user's transform returns goes to ``default_collate``)."""


class Prebatched(Sequence):
    """The samples of one batch, built in place by :meth:`TRDataset.__getitems__`.

    :func:`collate` takes its two tensors as they are (and batches the samples' extra fields,
    if the dataset stores any). To anything else it is the sequence of samples it stands for,
    ``(image, int label)`` (and :class:`Extras`), so ``default_collate``, a user's
    ``collate_fn`` or ``Subset`` over the same dataset still work."""

    __slots__ = ("images", "labels", "ticket", "extras")

    def __init__(
        self, images: Any, labels: Any, ticket: Any = None, extras: list[Any] | None = None
    ):
        self.images, self.labels, self.ticket, self.extras = images, labels, ticket, extras

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, row: Any) -> Any:
        if isinstance(row, slice):
            return [self[i] for i in range(*row.indices(len(self)))]
        if not -len(self) <= row < len(self):
            raise IndexError(row)
        if self.extras is not None:
            return self.images[row], int(self.labels[row]), Extras(self.extras[row])
        return self.images[row], int(self.labels[row])

    def __add__(self, other: Any) -> list[Any]:
        return [*self, *other]


def collate(batch: Any, channels_last: bool = False) -> Any:
    """TorchRecord's ``collate_fn``: a :class:`Prebatched` batch as it is; samples with extra
    fields as ``[images, labels, {field: values}]`` (see :func:`collate_extras`); anything
    else through ``default_collate``. ``channels_last``: the images of batches that were not
    built in place are stacked in ``torch.channels_last`` memory format (built in place, they
    are in it already)."""
    if isinstance(batch, Prebatched):
        rest = [] if batch.extras is None else [collate_extras(batch.extras)]
        if batch.ticket is not None:  # a reusable buffer: its ticket travels with it
            return Recycled(batch.images, batch.labels, batch.ticket, *rest)
        return [batch.images, batch.labels, *rest]
    extras = None
    if (
        batch
        and isinstance(batch[0], tuple)
        and len(batch[0]) == 3
        and isinstance(batch[0][2], Extras)
    ):
        extras = collate_extras([sample[2] for sample in batch])
        batch = [sample[:2] for sample in batch]
    collated = _collate_channels_last(batch) if channels_last else data.default_collate(batch)
    return collated if extras is None else [*collated, extras]


def _memory_format(channels_last: bool) -> Any:
    import torch

    return torch.channels_last if channels_last else torch.contiguous_format


def _collate_channels_last(batch: list[Any]) -> Any:
    """``default_collate(batch)`` with the images (the samples, or their first elements)
    stacked straight into a ``torch.channels_last`` batch: in a worker, in shared memory, as
    ``default_collate`` stacks (so that sending it copies nothing)."""
    import torch

    first = batch[0] if batch else None
    alone = isinstance(first, torch.Tensor)  # samples that are images only
    images = batch if alone else None
    if isinstance(first, (tuple, list)) and first and isinstance(first[0], torch.Tensor):
        images = [sample[0] for sample in batch]
    shape = tuple(images[0].shape) if images else ()
    if images is None or len(shape) != 3 or any(image.shape != shape for image in images):
        if images is None:
            thing = first[0] if isinstance(first, (tuple, list)) and first else first
            got = "an empty batch" if first is None else f"a {type(thing).__name__} as image"
        else:
            got = ", ".join(sorted({"x".join(map(str, image.shape)) for image in images}))
            got = f"tensors of shape {got}"
        raise TypeError(
            "channels_last=True stacks the images of a batch (C x H x W tensors of one shape, "
            f"each sample's first element) in torch.channels_last, but the transform gave "
            f"{got}. Return (image tensor, label) from the transform, or leave channels_last out"
        )
    size, dtype = (len(images), *shape), images[0].dtype
    if data.get_worker_info() is not None:
        stacked = shared_tensor(size, dtype, channels_last=True)
    else:
        stacked = torch.empty(size, dtype=dtype, memory_format=torch.channels_last)
    torch.stack(images, out=stacked)
    if alone:
        return stacked
    rest = data.default_collate([tuple(sample[1:]) for sample in batch])
    if isinstance(first, tuple) and hasattr(first, "_fields"):  # a namedtuple stays one
        return type(first)(stacked, *rest)
    return [stacked, *rest]


def collate_extras(extras: list[dict[str, Any]]) -> dict[str, Any]:
    """A batch's extra fields, field by field: numbers become a tensor of the batch, anything
    else (strings, lists, dicts) the list of the samples' values as stored. By the values'
    kind, never by their lengths: a field of boxes comes back as a list whatever the number
    of boxes per image, and ``torch.tensor(batch["bbox"])`` stacks boxes of equal length."""
    batched = {}
    for key in extras[0]:
        values = [sample[key] for sample in extras]
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        batched[key] = data.default_collate(values) if numbers else values
    return batched


class TRDataset(data.Dataset):
    """Records of one dataset by index, passed through ``transform``.

    The default ``transform="auto"`` gives what 0.1 gave (a 3x224x224 float tensor in [0, 1]
    and an int label) through the codec's fastest path (``"fast"``: tensor decoding and an
    antialiased tensor resize, within one grey level of PIL's result). ``"pil"`` or
    ``default_transform`` is 0.1's exact PIL path, ``"uint8"`` the 3x224x224 uint8 image (for
    normalising on the GPU); ``transform=None`` returns the record itself (a
    ``TensorProtos``). Datasets written by a custom ``data_process_func`` get 0.1's
    ``default_transform`` unless you pass your own.
    ``shuffle``, ``batch_size`` and ``proto`` are accepted for TorchRecord 0.1 compatibility;
    ordering is the sampler's job.
    """

    def __init__(
        self,
        record_path: str | os.PathLike = "",
        transform: Callable[[Any], Any] | str | None = "auto",
        record_num: int | None = None,
        shuffle: bool = False,
        batch_size: int = 1,
        proto: type = TensorProtos,
        *,
        verify_checksums: bool = True,
        on_corrupt: str = "raise",
    ):
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(
                f"on_corrupt must be one of {', '.join(ON_CORRUPT)}, got {on_corrupt!r}"
            )
        self.on_corrupt = on_corrupt
        # where every process appends the corrupt records it met (workers included)
        self.corrupt_log: str | None = None
        if on_corrupt != "raise":
            import tempfile

            handle, self.corrupt_log = tempfile.mkstemp(
                prefix="torchrecord-corrupt-", suffix=".tsv"
            )
            os.close(handle)
            weakref.finalize(self, _remove_owned, self.corrupt_log, os.getpid())
        self.reader = RecordReader(record_path, verify_checksums=verify_checksums)
        self._check_shard_files()
        if record_num is not None and int(record_num) != self.reader.num_shards:
            raise ValueError(
                f"record_num={record_num} but {record_path} has {self.reader.num_shards} shards; "
                "omit record_num to detect it"
            )
        self.reader.check_plugin_versions()
        builtin = isinstance(transform, str) or transform is default_transform
        if self.reader.codec_name == CUSTOM_CODEC:
            if transform in ("auto", default_transform):
                transform = default_transform  # 0.1: the user's records, 0.1's transform
        elif transform == "auto":
            transform = self.reader.codec.fast_transform  # resolves the codec by name, now
        elif transform is default_transform:
            transform = self.reader.codec.transform  # asked for by name: 0.1's exact PIL path
        if isinstance(transform, str):
            transform = self._named_transform(transform)
        if transform is not None:
            preload()  # import torchvision once, here, not in every worker of every epoch
        # batches can be built in place when the transform is the codec's own tensor path
        self.tensor_kind = None
        if self.reader.codec_name != CUSTOM_CODEC and transform is not None:
            from .codecs.base import Codec

            codec = self.reader.codec
            for kind, name in (("fast", "fast_transform"), ("uint8", "uint8_transform")):
                if transform == getattr(codec, name) and getattr(type(codec), name) is getattr(
                    Codec, name
                ):
                    self.tensor_kind = kind
        # the built-in codecs' tensor paths read records as views, without copying the image
        self._views = self.tensor_kind is not None and type(self.reader.codec) in VIEW_CODECS
        if self.extra_fields and builtin:
            transform = _WithExtras(transform)
        self.transform = self._tensor_transform = transform
        self._builtin_transform = builtin  # its errors mean a damaged record, not a user bug
        self.record_path = str(record_path)

    def _check_shard_files(self) -> None:
        """Missing or cut shards, said at once rather than in the middle of an epoch: an error
        (``on_corrupt="raise"``), or a warning (their records will be replaced)."""
        from .reader import shard_file_problems

        problems = shard_file_problems(self.reader.path, self.reader.manifest)
        if not problems:
            return
        what = "; ".join(problems)
        if self.on_corrupt == "raise":
            raise DatasetError(
                f"{self.reader.path}: {what}. Restore the shards from a copy or write the "
                "dataset again (`torchrecord verify` checks the rest); or read the other shards "
                "with on_corrupt='skip', which replaces their records"
            )
        warnings.warn(
            f"{self.reader.path}: {what}; with on_corrupt={self.on_corrupt!r} their records "
            "are replaced by records of the next shards",
            RuntimeWarning,
            stacklevel=3,
        )

    def _named_transform(self, name: str) -> Callable[[Any], Any]:
        if name not in TRANSFORMS:
            raise ValueError(
                f"unknown transform {name!r}; use one of {', '.join(TRANSFORMS)}, "
                "a callable, or None"
            )
        if self.reader.codec_name == CUSTOM_CODEC:
            raise ValueError(
                f"transform={name!r} needs a codec, but {self.reader.path} was "
                "written by a custom data_process_func: pass your own transform"
            )
        codec = self.reader.codec
        return {
            "pil": codec.transform,
            "fast": codec.fast_transform,
            "uint8": codec.uint8_transform,
        }[name]

    @property
    def batch_dtype(self) -> Any:
        """The dtype of batches built in place (None: the transform is not a tensor path)."""
        import torch

        return {"fast": torch.float32, "uint8": torch.uint8}.get(self.tensor_kind)

    @property
    def label_names(self) -> list[str] | None:
        """Names of the labels (string labels or ImageFolder classes), index = label."""
        return self.reader.manifest.extra.get("label_names")

    classes = label_names  # torchvision's name for the same thing

    @property
    def extra_fields(self) -> list[str]:
        """Extra per-sample fields stored with the records (built-in transforms return them)."""
        return list(self.reader.manifest.extra.get("extra_fields", []))

    @property
    def codec(self) -> str:
        return self.reader.codec_name

    @property
    def serializer(self) -> str:
        return self.reader.serializer_name

    @property
    def record_num(self) -> int:
        return self.reader.num_shards

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> Any:
        view = self._views and self.transform is self._tensor_transform
        return self._substituting(int(index), self.transform, view)

    def __getitems__(self, indices: list[int]) -> Any:
        """The samples of one batch (``DataLoader`` asks for a batch at once).

        A :class:`TorchRecord` loader that collates with its own function turns on
        ``prebatch``: then the codec's tensor transforms write each image straight into the
        batch tensor (in shared memory, inside a worker), without a float tensor per image and
        without ``default_collate`` copying them all once more. Same values, less work."""
        if not hasattr(indices, "__iter__"):  # one index where DataLoader expects a batch
            raise TypeError(
                f"TRDataset got the single index {indices!r} where DataLoader expects a batch "
                "of them: TRSampler yields record indices (a Sampler, as PyTorch's samplers "
                "now are), where TorchRecord 0.1's yielded batches for DataLoader's "
                "batch_sampler=. Pass it as DataLoader(dataset, sampler=TRSampler(...), "
                "batch_size=N), or use TorchRecord(...), which does that for you"
            )
        kind = self.tensor_kind if self.prebatch else None
        if kind is None or self.transform is not self._tensor_transform:  # (pickling keeps "is")
            return [self[index] for index in indices]
        import torch

        from .codecs.base import decoded_tensor
        from .transforms import resize_224

        codec = self.reader.codec
        extras: list[Any] | None = [] if self.extra_fields else None

        def decode(record: Any) -> tuple[Any, int]:
            image, label = resize_224(decoded_tensor(codec, record)), record_label(record)
            if extras is not None:  # last: a record that fails adds none (its stand-in does)
                extras.append(record_extras(record))
            return image, label

        dtype = self.batch_dtype
        shape = (len(indices), 3, 224, 224)
        ticket = None
        layout = self.channels_last
        if data.get_worker_info() is None:
            images = torch.empty(shape, dtype=dtype, memory_format=_memory_format(layout))
        elif self.batch_pool is not None:  # a buffer the training process has let go of
            images, ticket = self.batch_pool.take(len(indices), dtype)
        else:  # shared memory: handing it to the training process copies nothing
            images = shared_tensor(shape, dtype, layout)
        labels = torch.empty(len(indices), dtype=torch.int64)
        for row, index in enumerate(indices):
            # (decoded_tensor made sure: a uint8 3 x H x W tensor, so 3 x 224 x 224 here)
            image, labels[row] = self._substituting(int(index), decode, self._views)
            if kind == "fast":
                # as .float().div_(255), bit for bit, in one pass over the row: a cast by
                # copy_ then an in-place division took 218 against 197 us an image into batch
                # rows not in the cache, as a worker's are (though 80 against 114 in a hot one)
                torch.div(image, 255, out=images[row])
            else:
                images[row].copy_(image)
        return Prebatched(images, labels, ticket, extras)

    prebatch = False  # set by TorchRecord when its collate_fn accepts a Prebatched batch
    channels_last = False  # set by TorchRecord: batches built in place in that memory format
    batch_pool = None  # set by TorchRecord with workers: batch buffers reused (see batchpool)

    def _substituting(
        self, index: int, transform: Callable[[Any], Any] | None, view: bool = False
    ) -> Any:
        """Sample ``index``; with ``on_corrupt`` "warn" or "skip", the next sound record
        stands in for a corrupt one: the next record after a corrupt record, the next shard's
        first record after a shard that cannot be read (missing, cut, damaged)."""
        if self.on_corrupt == "raise":
            return self._sample(index, transform, view)
        n = len(self)
        candidate, tried = index, []
        for _ in range(min(n, _MAX_SUBSTITUTES)):
            try:
                return self._sample(candidate, transform, view)
            except RecordCorruptedError as exc:
                self._log_corrupt(candidate, exc)
                tried.append((candidate, exc))
                candidate = (candidate + 1) % n
            except ShardCorruptedError as exc:
                self._log_corrupt(candidate, exc)
                tried.append((candidate, exc))
                shard, _ = self.reader.locate(candidate)
                candidate = int(self.reader.offsets[shard + 1]) % n
        last_index, last = tried[-1]
        raise DatasetError(
            f"{self.record_path}: no sound record could stand in for record {index}: the "
            f"{len(tried)} records tried from there (shards skipped whole where they cannot be "
            f"read) are all corrupt; the last, record {last_index}: {last}"
        ) from last

    def _sample(
        self, index: int, transform: Callable[[Any], Any] | None, view: bool = False
    ) -> Any:
        record = self.reader.read_view(index) if view else self.reader.read_record(index)
        if transform is None:
            return record
        if not self._builtin_transform:
            return transform(record)  # the user's own transform: its errors are its own
        try:
            return transform(record)
        except NotImplementedError as exc:  # a codec plugin without a decode: not the data
            codec = self.reader.codec_name
            raise TorchRecordError(
                f"{self.record_path}: the codec {codec!r} cannot decode its records "
                f"(NotImplementedError{': ' + str(exc) if str(exc) else ''}): the plugin that "
                "provides it does not implement decode_image (see `torchrecord plugins`); the "
                "dataset itself may be sound"
            ) from exc
        except Exception as exc:  # the stored image does not decode: name the record
            shard, local = self.reader.locate(index)
            bug = plugin_bug(
                self.reader.codec_name,
                exc,
                f"record {local} of {self.reader.shard_label(shard)} (record {index})",
            )
            if bug is not None:  # the plugin's, not the data's: never skipped as corrupt
                raise bug from exc
            if type(exc).__name__ == "DecompressionBombError":  # stored sound, refused here
                raise TorchRecordError(
                    f"{self.reader.shard_label(shard)}: record {local} "
                    f"({self.reader.key_of(shard, local)!r}) is larger than Pillow's "
                    f"decompression-bomb limit allows ({exc}); it was written with the limit "
                    "raised. Raise PIL.Image.MAX_IMAGE_PIXELS in this process too (DataLoader "
                    "workers started by fork inherit it; set it in worker_init_fn otherwise), or "
                    "use a tensor transform, which has no such limit"
                ) from exc
            raise RecordCorruptedError(
                self.reader.shard_label(shard),
                self.reader.key_of(shard, local),
                local,
                f"its image does not decode ({type(exc).__name__}: {exc})",
                hint="Run `torchrecord verify --decode` on the dataset to list every record "
                "that does not decode (an image that was bad when written is stored as it "
                "was), then fix or remove their source images and write the dataset again."
                + plugin_hint(self.reader.codec_name),
            ) from exc

    def _log_corrupt(self, index: int, exc: DatasetError) -> None:
        """Count a corrupt record (the next record takes its place, so shapes stay)."""
        line = f"{index}\t{type(exc).__name__}\t{exc}".replace("\n", " ") + "\n"
        if self.corrupt_log is not None:
            fd = os.open(self.corrupt_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode())  # one small append: atomic across processes
            finally:
                os.close(fd)
        if self.on_corrupt == "warn":
            warnings.warn(f"skipped corrupt record {index}: {exc}", RuntimeWarning, stacklevel=3)

    def corrupt_records(self) -> list[dict[str, Any]]:
        """The corrupt records met so far, in any process, each once (in the order first met,
        however often it was met: a corrupt record also meets the next one's reads when it is
        tried as their substitute): index, error type and message."""
        if self.corrupt_log is None or not os.path.exists(self.corrupt_log):
            return []
        out: dict[int, dict[str, Any]] = {}
        with open(self.corrupt_log, encoding="utf-8") as f:
            for line in f:
                index, kind, message = line.rstrip("\n").split("\t", 2)
                out.setdefault(int(index), {"index": int(index), "error": kind, "message": message})
        return list(out.values())

    def reset_corrupt_records(self) -> None:
        if self.corrupt_log is not None:
            open(self.corrupt_log, "w").close()

    def close(self) -> None:
        self.reader.close()

    def __repr__(self) -> str:
        return (
            f"TRDataset({self.record_path!r}, records={len(self)}, "
            f"shards={self.record_num}, codec={self.codec!r}, serializer={self.serializer!r})"
        )
