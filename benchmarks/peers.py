"""Other ways of storing and loading the same JPEG dataset, for ``benchmarks.compare``.

Each :class:`Method` converts a :class:`Source` (a folder of JPEGs in ImageFolder layout plus its
data list) into its own format with :meth:`Method.prepare` and reads it back with
:meth:`Method.loader`.  Every loader yields exactly what a TorchRecord 0.1 loader yields:
``images``, a float32 tensor ``(B, 3, 224, 224)`` in ``[0, 1]`` made by PIL decode ->
``convert("RGB")`` -> ``Resize((224, 224))`` -> ``ToTensor()``, and ``labels``, an int64 tensor
``(B,)``.  A loader is re-iterable: each ``for images, labels in loader`` is one shuffled epoch that
covers every sample exactly once, read by ``num_workers`` DataLoader worker processes.

All formats store the original JPEG bytes, so every method decodes JPEGs at read time.

WebDataset's workers each batch their own share of the samples, so its epochs end with up to one
partial batch per worker (e.g. ``..., 32, 8, 8`` for 400 images and 2 workers) instead of one
partial batch in total; no sample is dropped or repeated.  MosaicML Streaming and LitData assign
whole batches to workers and end with a single partial batch, like ImageFolder.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import multiprocessing
import os
import random
import shutil
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

Batch = tuple[torch.Tensor, torch.Tensor]

# Keep LitData offline: no PyPI version check (already off by default in recent releases).
os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")


@dataclass
class Source:
    """The dataset every method starts from."""

    root: Path  # folder with the JPEGs (ImageFolder layout) and the data list
    entries: list[tuple[Path, int]]  # (absolute path, label), in data-list order

    @classmethod
    def from_data_list(cls, data_list: str | os.PathLike[str]) -> Source:
        """Read a ``relative/path.jpg LABEL`` data list (paths relative to its folder)."""
        list_path = Path(data_list).resolve()
        root = list_path.parent
        entries: list[tuple[Path, int]] = []
        for line in list_path.read_text().splitlines():
            if line.strip():
                rel, label = line.rsplit(maxsplit=1)
                entries.append((root / rel, int(label)))
        return cls(root=root, entries=entries)


# ---------------------------------------------------------------------------------------------
# The shared read-time pipeline (TorchRecord 0.1's default transform)
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _seed_pipeline() -> Callable[[Image.Image], torch.Tensor]:
    import torchvision.transforms as tvt

    return tvt.Compose([tvt.Resize((224, 224)), tvt.ToTensor()])


def _load_pipeline() -> None:
    """Import torchvision in the calling process, so forked DataLoader workers inherit it instead
    of each importing it (about 2 s) at the start of every epoch."""
    _seed_pipeline()


def to_tensor(img: Image.Image) -> torch.Tensor:
    """``Resize((224, 224))`` then ``ToTensor()``: a 3x224x224 float32 tensor in [0, 1]."""
    return _seed_pipeline()(img)


def decode_jpeg(data: bytes) -> Image.Image:
    """Decode image bytes with PIL into an RGB image (what ImageFolder's PIL loader does)."""
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


def _bytes_to_sample(data: bytes, label: int) -> tuple[torch.Tensor, int]:
    return to_tensor(decode_jpeg(data)), int(label)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _reset_dir(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


class _Epochs:
    """Re-iterable loader: each iteration builds epoch ``k``'s iterable with ``make(k)``."""

    def __init__(self, make: Callable[[int], Iterable[Batch]]) -> None:
        self._make = make
        self.epoch = 0

    def __iter__(self) -> Iterator[Batch]:
        epoch = self.epoch
        self.epoch += 1
        yield from self._make(epoch)


# ---------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------


class Method(ABC):
    """One way of storing the dataset and loading it back."""

    name: str = ""
    slug: str = ""  # name of this method's subfolder of ``workdir``
    package: str = ""  # distribution that implements the method (for its version)
    module: str = ""  # its import name (optional)

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir) / self.slug
        self.source: Source | None = None
        if self.module:  # import it now, so that prepare() timings exclude its import time
            importlib.import_module(self.module)

    @abstractmethod
    def prepare(self, source: Source) -> None:
        """Convert ``source`` into this method's format, replacing any earlier output."""

    @abstractmethod
    def data_dir(self) -> Path:
        """The directory holding all of this method's files."""

    @abstractmethod
    def loader(self, batch_size: int = 32, num_workers: int = 2, seed: int = 0) -> Iterable[Batch]:
        """A re-iterable loader; each iteration is one full shuffled epoch."""

    @abstractmethod
    def describe(self) -> str:
        """One line: what is stored, and the package version."""

    def _require_source(self) -> Source:
        if self.source is None:
            raise RuntimeError(f"{self.name}: call prepare() before loader()")
        return self.source


class ImageFolderMethod(Method):
    """``torchvision.datasets.ImageFolder`` on the loose JPEG files; nothing to convert."""

    name = "ImageFolder (loose files)"
    slug = "imagefolder"
    package = "torchvision"
    module = "torchvision"

    def prepare(self, source: Source) -> None:
        from torchvision.datasets import ImageFolder

        folder = ImageFolder(str(source.root))
        found = {Path(path).resolve(): label for path, label in folder.samples}
        expected = {path.resolve(): label for path, label in source.entries}
        if found != expected:
            raise ValueError(
                f"ImageFolder({source.root}) does not reproduce the data list: its images or "
                "labels (from sorted class folder names) differ"
            )
        self.source = source

    def data_dir(self) -> Path:
        return self._require_source().root

    def loader(self, batch_size: int = 32, num_workers: int = 2, seed: int = 0) -> DataLoader:
        _load_pipeline()
        from torchvision.datasets import ImageFolder

        # The default loader is PIL: open the file, ``convert("RGB")``.
        dataset = ImageFolder(str(self._require_source().root), transform=to_tensor)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=True,
            num_workers=num_workers,
            generator=torch.Generator().manual_seed(seed),
        )

    def describe(self) -> str:
        return (
            f"loose JPEG files read by torchvision.datasets.ImageFolder "
            f"({self.package} {_version(self.package)})"
        )


class WebDatasetMethod(Method):
    """Tar shards (``NNNNNN.jpg`` original bytes + ``NNNNNN.cls`` label) read by WebDataset.

    WebDataset splits the *shards* among DataLoader workers (``split_by_worker``), so each worker
    reads ``shards[worker::num_workers]`` and every sample is read exactly once per epoch as long as
    every worker gets a shard.  The dataset is written as ``num_shards`` (default 24) shards of
    equal size (+-1 sample), so the workers get equal shares for any worker count that divides 24
    (1, 2, 3, 4, 6, 8, 12, 24).  The shard order is shuffled per worker and the samples pass
    through WebDataset's buffer shuffle (``shuffle(1000)``), seeded per epoch and worker.
    """

    name = "WebDataset"
    slug = "webdataset"
    package = "webdataset"
    module = "webdataset"

    def __init__(self, workdir: Path, num_shards: int = 24, shuffle_buffer: int = 1000) -> None:
        super().__init__(workdir)
        self.num_shards = num_shards
        self.shuffle_buffer = shuffle_buffer
        self.shards: list[str] = []

    def prepare(self, source: Source) -> None:
        import webdataset as wds

        _reset_dir(self.workdir)
        count = len(source.entries)
        num_shards = max(1, min(self.num_shards, count))
        # Equal-size shards.  (ShardWriter only caps a shard's size, which leaves the last shard
        # short and the workers unequal; writing each shard with TarWriter avoids that.)
        bounds = [shard * count // num_shards for shard in range(num_shards + 1)]
        shards: list[str] = []
        for shard in range(num_shards):
            path = self.workdir / f"shard-{shard:06d}.tar"
            with wds.TarWriter(str(path)) as sink:
                for index in range(bounds[shard], bounds[shard + 1]):
                    image_path, label = source.entries[index]
                    sink.write(
                        {"__key__": f"{index:08d}", "jpg": image_path.read_bytes(), "cls": label}
                    )
            shards.append(str(path))
        self.shards = shards
        self.source = source

    def data_dir(self) -> Path:
        return self.workdir

    def loader(self, batch_size: int = 32, num_workers: int = 2, seed: int = 0) -> _Epochs:
        _load_pipeline()
        if not self.shards:
            raise RuntimeError(f"{self.name}: call prepare() before loader()")
        shards = list(self.shards)
        if num_workers > len(shards):
            raise ValueError(f"{self.name}: {num_workers} workers but only {len(shards)} shards")

        def make(epoch: int) -> DataLoader:
            import webdataset as wds

            epoch_seed = seed * 1_000_003 + epoch
            dataset = (
                wds.WebDataset(
                    shards,
                    shardshuffle=len(shards),
                    seed=epoch_seed,
                    nodesplitter=wds.single_node_only,
                    workersplitter=wds.split_by_worker,
                )
                .compose(_WorkerSeededShuffle(self.shuffle_buffer, epoch_seed))
                .decode("pil")
                .to_tuple("jpg", "cls")
                .map_tuple(to_tensor, int)
            )
            return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)

        return _Epochs(make)

    def describe(self) -> str:
        return (
            f"{len(self.shards) or self.num_shards} tar shards of original JPEG bytes + label "
            f"({self.package} {_version(self.package)})"
        )


class _WorkerSeededShuffle:
    """WebDataset's buffer shuffle with a seed derived from (epoch seed, DataLoader worker id).

    ``WebDataset.shuffle(n, seed=s)`` would give every worker the same random sequence; this
    stage gives each worker its own, reproducibly.
    """

    def __init__(self, bufsize: int, seed: int) -> None:
        self.bufsize = bufsize
        self.seed = seed

    def __call__(self, src: Iterator[Any]) -> Iterator[Any]:
        import webdataset as wds

        info = get_worker_info()
        worker = info.id if info is not None else 0
        rng = random.Random(self.seed * 1_009 + worker)
        return wds.filters.shuffle(self.bufsize, rng=rng)(src)


class StreamingMethod(Method):
    """MosaicML Streaming MDS shards (column ``image``: original JPEG bytes, ``label``: int).

    The ``jpeg`` MDS encoding is not used: it keeps the file's bytes only for a PIL image opened
    from a file that still exists, silently re-encodes (quality 75) otherwise, and decodes to an
    unconverted lazy PIL image.  Storing ``bytes`` keeps the original JPEG and lets the read path
    decode exactly like the other methods.

    Read with ``StreamingDataset(local=<the MDS folder>, remote=None)``: no download, no copy, no
    network.  Streaming partitions the sample ids over workers itself (``batch_size`` must match
    the DataLoader's) and reshuffles every epoch (seed + epoch, kept in shared memory).
    """

    name = "MosaicML Streaming"
    slug = "streaming"
    package = "mosaicml-streaming"
    module = "streaming"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.local: Path | None = None

    def prepare(self, source: Source) -> None:
        from streaming import MDSWriter

        _reset_dir(self.workdir)
        # A fresh folder name per prepare(): a StreamingDataset is identified by its ``local``
        # directory (registered in shared memory), so one still alive from an earlier prepare()
        # never shares a directory with the new shards.
        local = self.workdir / f"mds-{uuid.uuid4().hex[:12]}"
        with MDSWriter(out=str(local), columns={"image": "bytes", "label": "int"}) as writer:
            for image_path, label in source.entries:
                writer.write({"image": image_path.read_bytes(), "label": int(label)})
        self.local = local
        self.source = source

    def data_dir(self) -> Path:
        return self.workdir

    def loader(self, batch_size: int = 32, num_workers: int = 2, seed: int = 0) -> DataLoader:
        _load_pipeline()
        if self.local is None:
            raise RuntimeError(f"{self.name}: call prepare() before loader()")
        from streaming import StreamingDataset

        dataset = StreamingDataset(
            local=str(self.local),
            remote=None,
            shuffle=True,
            shuffle_seed=seed,
            batch_size=batch_size,
        )
        # The StreamingDataset is iterated inside each worker, where it picks that worker's share.
        return DataLoader(
            _MappedIterable(dataset, _mds_sample), batch_size=batch_size, num_workers=num_workers
        )

    def describe(self) -> str:
        return (
            f"MDS shards of original JPEG bytes + label ({self.package} {_version(self.package)})"
        )


class _MappedIterable(IterableDataset):
    """An iterable dataset with ``fn`` applied to every sample of ``inner``."""

    def __init__(self, inner: Iterable[Any], fn: Callable[[Any], Any]) -> None:
        self.inner = inner
        self.fn = fn

    def __iter__(self) -> Iterator[Any]:
        return map(self.fn, iter(self.inner))


def _mds_sample(sample: dict[str, Any]) -> tuple[torch.Tensor, int]:
    return _bytes_to_sample(sample["image"], sample["label"])


def _litdata_record(entry: tuple[str, int]) -> dict[str, Any]:
    """LitData ``optimize`` callback: one sample as the file's bytes and its label."""
    path, label = entry
    return {"image": Path(path).read_bytes(), "label": int(label)}


def _litdata_sample(item: dict[str, Any]) -> tuple[torch.Tensor, int]:
    return _bytes_to_sample(item["image"], item["label"])


@contextlib.contextmanager
def _restored_process_state(**env: str) -> Iterator[None]:
    """Run with ``env`` added to ``os.environ``; afterwards undo every change to ``os.environ``
    and to the multiprocessing start method.

    ``litdata.optimize`` sets ``DATA_OPTIMIZER_*`` variables in the calling process and forces the
    global start method to ``spawn``, which would make every DataLoader created afterwards in this
    process (other methods' included) start its workers by spawning instead of forking.
    """
    saved_env = dict(os.environ)
    saved_method = multiprocessing.get_start_method(allow_none=True)
    os.environ.update(env)
    try:
        yield
    finally:
        for key in set(os.environ) - set(saved_env):
            del os.environ[key]
        for key, value in saved_env.items():
            if os.environ.get(key) != value:
                os.environ[key] = value
        if multiprocessing.get_start_method(allow_none=True) != saved_method:
            multiprocessing.set_start_method(saved_method, force=True)


def _litdata_num_samples(output: Path) -> int:
    index = json.loads((output / "index.json").read_text())
    return sum(int(chunk["chunk_size"]) for chunk in index["chunks"])


class LitDataMethod(Method):
    """LitData chunks (``image``: original JPEG bytes, ``label``: int) via ``litdata.optimize``.

    Bytes, not PIL images, are stored: LitData would store a PIL ``JpegImageFile`` as its file's
    bytes but decode it at read time with torchvision (not PIL) to a uint8 tensor, and any other
    PIL image as raw pixels.  Read with ``litdata.StreamingDataset(input_dir=<local folder>)``,
    which memory-maps the local chunks in place, and ``litdata.StreamingDataLoader``, which
    reshuffles every epoch (seed + epoch).  LitData's shuffle permutes the chunks and, inside a
    chunk, blocks of 256 samples and the samples within each block.
    """

    name = "LitData"
    slug = "litdata"
    package = "litdata"
    module = "litdata"

    def __init__(self, workdir: Path, chunk_bytes: str = "64MB", num_writers: int | None = None):
        super().__init__(workdir)
        self.chunk_bytes = chunk_bytes
        self.num_writers = num_writers or min(8, os.cpu_count() or 1)

    @property
    def _output(self) -> Path:
        return self.workdir / "optimized"

    def prepare(self, source: Source) -> None:
        import litdata

        _reset_dir(self.workdir)
        scratch = self.workdir / "scratch"  # optimize()'s staging folders, not part of the data
        inputs = [(str(path), int(label)) for path, label in source.entries]
        # optimize() runs its writers as spawned processes (LitData's default), so the driver's
        # main module must be import-safe (``if __name__ == "__main__":``).
        with _restored_process_state(
            DATA_OPTIMIZER_CACHE_FOLDER=str(scratch / "chunks"),
            DATA_OPTIMIZER_DATA_CACHE_FOLDER=str(scratch / "data"),
        ):
            litdata.optimize(
                fn=_litdata_record,
                inputs=inputs,
                output_dir=str(self._output),
                chunk_bytes=self.chunk_bytes,
                num_workers=self.num_writers,
                verbose=False,
            )
        shutil.rmtree(scratch, ignore_errors=True)
        # A writer process that fails (e.g. cannot import the main module) leaves an index
        # without chunks rather than raising, so check the result.
        written = _litdata_num_samples(self._output)
        if written != len(source.entries):
            raise RuntimeError(
                f"{self.name}: optimize() wrote {written} of {len(source.entries)} samples"
            )
        self.source = source

    def data_dir(self) -> Path:
        return self._output

    def loader(self, batch_size: int = 32, num_workers: int = 2, seed: int = 0) -> DataLoader:
        _load_pipeline()
        import litdata

        if not (self._output / "index.json").is_file():
            raise RuntimeError(f"{self.name}: call prepare() before loader()")
        dataset = litdata.StreamingDataset(
            input_dir=str(self._output),
            shuffle=True,
            seed=seed,
            transform=_litdata_sample,
        )
        return litdata.StreamingDataLoader(dataset, batch_size=batch_size, num_workers=num_workers)

    def describe(self) -> str:
        return (
            f"LitData chunks ({self.chunk_bytes}) of original JPEG bytes + label "
            f"({self.package} {_version(self.package)})"
        )


METHODS: tuple[type[Method], ...] = (
    ImageFolderMethod,
    WebDatasetMethod,
    StreamingMethod,
    LitDataMethod,
)
