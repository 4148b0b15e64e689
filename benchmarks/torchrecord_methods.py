"""TorchRecord's entries in the comparison, with the same interface as ``benchmarks/peers.py``.

One dataset per codec is written (8 shards, shuffled at write time, 2 encoding workers) and read
with a full shuffle by several configurations: 0.1's PIL transform, the tensor ("fast")
transform, and uint8 batches converted to float in the training process (the fastest).
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


class TorchRecordMethod(Method):
    """TorchRecord with one codec and one read-time transform."""

    def __init__(
        self,
        workdir: Path,
        codec: str,
        transform: str,
        name: str,
        num_workers_write: int = 2,
        persistent: bool = False,
    ) -> None:
        self.slug = f"torchrecord_{codec}"  # transforms of one codec share its dataset
        super().__init__(workdir)
        self.codec, self.transform, self.name = codec, transform, name
        self.num_workers_write = num_workers_write
        self.persistent = persistent  # False like every peer; True is TorchRecord's default

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
        )
        return _Float(loader) if self.transform == "uint8" else loader

    def describe(self) -> str:
        stored = {"raw_rgb": "RGB pixels", "jpeg": "original JPEG bytes"}[self.codec]
        how = {
            "pil": "0.1's PIL transform",
            "fast": "tensor decode + antialiased resize",
            "uint8": "uint8 batches, float conversion in the training process",
        }[self.transform]
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
        # TorchRecord's defaults: the fast transform and persistent workers
        TorchRecordMethod(
            workdir, "raw_rgb", "fast", "TorchRecord raw_rgb, defaults", persistent=True
        ),
        TorchRecordMethod(workdir, "jpeg", "fast", "TorchRecord jpeg, defaults", persistent=True),
    ]


__all__ = ["TorchRecordMethod", "torchrecord_methods"]
