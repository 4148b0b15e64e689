"""TorchRecord's entries in the comparison, with the same interface as ``benchmarks/peers.py``.

One dataset per codec is written (8 shards, shuffled at write time, 2 encoding workers) and read
with a full shuffle by several configurations: 0.1's PIL transform, the tensor ("fast")
transform, uint8 batches converted to float in the training process, and the defaults. Each
defaults loader has a twin with every record already in its workers' memory: the limit of its
pipeline with the DataLoader's transport (a measuring aid, not a setting).
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterable, Iterator
from pathlib import Path

from benchmarks.peers import Method, Source
from torchrecord import TorchRecord, Writer


class _Float:
    """Wraps a uint8 loader: batches become float in [0, 1] in the consuming process."""

    def __init__(self, loader: Iterable) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator:
        for images, labels in self.loader:
            yield images.float().div_(255), labels


class _RecordsInMemory:
    """Stands in for a reader's ``read_view``: the first call, in whichever process makes it (a
    DataLoader worker), reads every record of the dataset once (fetch, CRC-32 check, parse) and
    keeps it; from then on reading a record is a list lookup. So a loader that reads through it
    does everything TorchRecord does but read records: the limit of its pipeline, transport
    included. Built in the workers, so the training process (whose memory is measured for every
    method) holds none of it."""

    def __init__(self, reader) -> None:
        self.reader = reader
        self.records: list | None = None

    def __call__(self, index: int):
        if self.records is None:  # (the class's read_view: the instance's is this object)
            read = type(self.reader).read_view
            self.records = [read(self.reader, i) for i in range(len(self.reader))]
        return self.records[index]


class TorchRecordMethod(Method):
    """TorchRecord with one codec and one read-time transform. ``limit_of``: the name of the
    method this one is the limit of: the same loader with every record already read into its
    workers' memory (see :class:`_RecordsInMemory`; a measuring aid, not a setting)."""

    def __init__(
        self,
        workdir: Path,
        codec: str,
        transform: str,
        name: str,
        num_workers_write: int = 2,
        persistent: bool = False,
        limit_of: str | None = None,
        channels_last: bool = False,
    ) -> None:
        self.slug = f"torchrecord_{codec}"  # transforms of one codec share its dataset
        super().__init__(workdir)
        self.codec, self.transform, self.name = codec, transform, name
        self.num_workers_write = num_workers_write
        self.persistent = persistent  # False like every peer; True is TorchRecord's default
        self.limit_of = limit_of
        self.channels_last = channels_last
        if limit_of and not persistent:  # (else every timed epoch would read them all again)
            raise ValueError("records in memory need persistent workers")

    def prepare(self, source: Source) -> None:
        self.source = source
        list_path = self.workdir.parent / f"{self.slug}.txt"
        list_path.parent.mkdir(parents=True, exist_ok=True)
        list_path.write_text("".join(f"{p} {label}\n" for p, label in source.entries))
        Writer(
            list_path,
            self.workdir,
            db_num=8,
            shuffle=True,
            codec=self.codec,
            num_workers=self.num_workers_write,
            overwrite=True,
            progress=False,
        ).write()

    def is_prepared(self) -> bool:
        return (self.workdir / "manifest.json").exists()

    def data_dir(self) -> Path:
        return self.workdir

    def loader(self, batch_size: int = 32, num_workers: int = 2, seed: int = 0) -> Iterable:
        loader = TorchRecord(
            self.workdir,
            batch_size=batch_size,
            num_workers=num_workers,
            transform=self.transform,
            full_shuffle=True,
            seed=seed,
            persistent_workers=self.persistent and num_workers > 0,
            channels_last=self.channels_last,
        )
        if self.limit_of:
            if loader.dataset.tensor_kind is None or num_workers == 0:
                raise ValueError("records in memory: tensor transforms and workers only")
            loader.dataset.reader.read_view = _RecordsInMemory(loader.dataset.reader)
        return _Float(loader) if self.transform == "uint8" else loader

    def describe(self) -> str:
        stored = {"raw_rgb": "RGB pixels", "jpeg": "original JPEG bytes"}[self.codec]
        how = {
            "pil": "0.1's PIL transform",
            "fast": "tensor decode + antialiased resize",
            "uint8": "uint8 batches, float conversion in the training process",
        }[self.transform]
        if self.limit_of:
            how += "; every record read into the workers' memory first (the pipeline's limit)"
        if self.channels_last:
            how += "; batches in torch.channels_last memory format"
        return (
            f"LMDB shards of {stored}; {how}; torchrecord "
            f"{importlib.metadata.version('torchrecord')}"
        )


def torchrecord_methods(workdir: Path) -> list[TorchRecordMethod]:
    return [
        TorchRecordMethod(workdir, "raw_rgb", "pil", "TorchRecord raw_rgb (0.1 transform)"),
        TorchRecordMethod(workdir, "jpeg", "pil", "TorchRecord jpeg (0.1 transform)"),
        TorchRecordMethod(workdir, "raw_rgb", "fast", "TorchRecord raw_rgb fast"),
        TorchRecordMethod(workdir, "jpeg", "fast", "TorchRecord jpeg fast"),
        TorchRecordMethod(workdir, "raw_rgb", "uint8", "TorchRecord raw_rgb uint8"),
        TorchRecordMethod(workdir, "jpeg", "uint8", "TorchRecord jpeg uint8"),
        # TorchRecord's defaults: the fast transform and persistent workers; each followed by
        # its limit, the same loader with its records in memory (run next to it, in turn first)
        *(
            TorchRecordMethod(workdir, codec, "fast", name, persistent=True, limit_of=limit_of)
            for codec in ("raw_rgb", "jpeg")
            for name, limit_of in (
                (f"TorchRecord {codec}, defaults", None),
                (
                    f"TorchRecord {codec}, defaults, records in memory",
                    f"TorchRecord {codec}, defaults",
                ),
            )
        ),
        # the defaults with channels_last=True (not part of `--only defaults`)
        *(
            TorchRecordMethod(
                workdir,
                codec,
                "fast",
                f"TorchRecord {codec}, channels_last",
                persistent=True,
                channels_last=True,
            )
            for codec in ("raw_rgb", "jpeg")
        ),
    ]


__all__ = ["TorchRecordMethod", "torchrecord_methods"]
