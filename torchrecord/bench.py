"""``torchrecord bench PATH``: how fast can this machine read one of your datasets?

Measures, on the dataset as it is:

* records/s without decoding (fetch, CRC-32 check, deserialize) in this process, in random order;
* images/s through ``TorchRecord`` with a transform (``"auto"`` by default, as ``TorchRecord``
  does), for each requested number of DataLoader workers, batches of 32, full shuffle; in
  ``channels_last`` batches if asked.

The page cache is left as it is: the first pass warms it, later passes are timed.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

from . import checksum


def _records_per_second(path: str | os.PathLike, limit: int, seed: int) -> float:
    import numpy as np

    from .reader import RecordReader

    reader = RecordReader(path)
    try:
        order = np.random.default_rng(seed).permutation(len(reader))[:limit].tolist()
        for index in order:  # warm the cache and open every shard
            reader.read_record(index)
        started = time.perf_counter()
        for index in order:
            reader.read_record(index)
        return len(order) / (time.perf_counter() - started)
    finally:
        reader.close()


def _images_per_second(
    path: str | os.PathLike,
    workers: int,
    transform: Any,
    batch_size: int,
    limit: int,
    epochs: int,
    channels_last: bool = False,
) -> float:
    import torch

    from .loader import TorchRecord

    loader = TorchRecord(
        path,
        batch_size=batch_size,
        num_workers=workers,
        transform=transform,
        full_shuffle=True,
        persistent_workers=workers > 0,
        channels_last=channels_last,
    )
    batches = max(1, min(len(loader), -(-limit // batch_size)))
    rates = []
    for epoch in range(epochs + 1):  # the first pass warms up workers and the page cache
        started, count = time.perf_counter(), 0
        for i, (images, labels) in enumerate(loader):
            if images.dtype == torch.uint8:
                images = images.float().div_(255)  # what a training step would do first
            count += len(labels)
            if i + 1 >= batches:
                break
        if epoch:
            rates.append(count / (time.perf_counter() - started))
    return statistics.median(rates)


def run_bench(
    path: str | os.PathLike,
    workers: list[int],
    transform: str = "auto",
    batch_size: int = 32,
    limit: int = 2000,
    epochs: int = 3,
    seed: int = 0,
    echo=print,
    channels_last: bool = False,
) -> dict[str, Any]:
    """Measure and print a short report; returns the figures."""
    from .reader import describe

    info = describe(path)
    echo(
        f"dataset   {info['path']}: {info['records']} records in {len(info['shards'])} shards, "
        f"codec {info['codec']}, serializer {info['serializer']}, "
        f"{info['bytes'] / 1e6:.1f} MB"
    )
    limit = min(limit, info["records"])
    result: dict[str, Any] = {"records": info["records"], "limit": limit}
    rps = _records_per_second(path, limit, seed)
    result["records_per_s"] = rps
    mb = info["bytes"] / max(1, info["records"]) * rps / 1e6
    echo(
        f"read      {rps:9.0f} records/s in one process, no decode (fetch, CRC-32 by "
        f"{checksum.IMPLEMENTATION}, deserialize; about {mb:.0f} MB/s), {limit} records in "
        "random order"
    )
    result["crc32"] = checksum.IMPLEMENTATION
    result["images_per_s"] = {}
    for n in workers:
        ips = _images_per_second(
            path, n, transform, batch_size, limit, epochs, channels_last=channels_last
        )
        result["images_per_s"][n] = ips
        passes = f"{epochs} pass{'es' if epochs != 1 else ''}"
        layout = " in channels_last" if channels_last else ""
        echo(
            f"load      {ips:9.0f} images/s with {n} worker{'s' if n != 1 else ''}, transform "
            f"{transform!r}, batch {batch_size}{layout} (median of {passes} over {limit} "
            "records)"
        )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    echo(f"machine   {cores} cores available; warm page cache after the first pass")
    return result
