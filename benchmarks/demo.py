"""The main job: pack a real image dataset into TorchRecord shards, read it back, report speed.

    python -m benchmarks.demo [--num-images 2000] [--workers 2] [--epochs 3]

1. makes a CUB-200-like dataset of JPEGs from real photographs (``benchmarks.make_dataset``);
2. writes it with the ``raw_rgb`` and the ``jpeg`` codec (4 shards, like the 0.1 README);
3. reads everything back with 2 DataLoader workers and batches of 32 as 3x224x224 float
   tensors and int labels, next to torchvision's ``ImageFolder`` on the loose files: through
   0.1's PIL transform, and with TorchRecord's defaults (the same output through tensor
   decoding and resizing), and prints images/s (median of the epochs after a warm-up epoch).

Every method reads data it touched within the last minute (warm page cache).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _epoch_rate(loader) -> float:
    started, count = time.perf_counter(), 0
    for images, labels in loader:
        assert images.shape[1:] == (3, 224, 224)
        count += len(labels)
    return count / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs after a warm-up")
    parser.add_argument("--data", type=Path, default=REPO / "data")
    args = parser.parse_args(argv)

    import torch
    import torchvision

    from benchmarks.make_dataset import make_dataset
    from torchrecord import TorchRecord, Writer, default_transform
    from torchrecord.transforms import to_seed_tensor

    source = args.data / f"cub_like_{args.num_images}"
    started = time.perf_counter()
    data_list = make_dataset(
        source, num_images=args.num_images, num_classes=200, seed=0, workers=args.workers
    )
    jpeg_bytes = sum(p.stat().st_size for p in source.rglob("*.jpg"))
    print(
        f"dataset: {args.num_images} JPEGs in 200 classes, {jpeg_bytes / 1e6:.1f} MB, "
        f"{source} ({time.perf_counter() - started:.1f} s)"
    )

    methods = {}
    for codec in ("raw_rgb", "jpeg"):
        out = args.data / f"records_{codec}_{args.num_images}"
        started = time.perf_counter()
        manifest = Writer(
            data_list,
            out,
            db_num=4,
            shuffle=True,
            codec=codec,
            num_workers=args.workers,
            overwrite=True,
            progress=False,
        ).write()
        seconds = time.perf_counter() - started
        size = sum(s.bytes for s in manifest.shards)
        print(
            f"write {codec:<8} {manifest.num_records} records, 4 shards, {size / 1e6:7.1f} MB, "
            f"{seconds:5.1f} s ({manifest.num_records / seconds:5.0f} images/s)"
        )
        # 0.1's PIL transform, exactly; then TorchRecord as it comes (the fast transform)
        methods[f"TorchRecord {codec}, 0.1 transform"] = TorchRecord(
            out,
            4,
            shuffle=True,
            batch_size=32,
            num_workers=args.workers,
            transform=default_transform,
        )
        methods[f"TorchRecord {codec}, defaults"] = TorchRecord(
            out, 4, shuffle=True, batch_size=32, num_workers=args.workers
        )

    folder = torchvision.datasets.ImageFolder(str(source), transform=to_seed_tensor)
    methods = {
        "ImageFolder (loose files)": torch.utils.data.DataLoader(
            folder, batch_size=32, shuffle=True, num_workers=args.workers, persistent_workers=True
        ),
        **methods,
    }

    rates: dict[str, list[float]] = {name: [] for name in methods}
    for loader in methods.values():  # warm-up: page cache, worker start, first decode
        _epoch_rate(loader)
    for _ in range(args.epochs):  # rounds interleave the methods so they share the machine state
        for name, loader in methods.items():
            rates[name].append(_epoch_rate(loader))

    base = statistics.median(rates["ImageFolder (loose files)"])
    print(
        f"\nread: batch 32, {args.workers} persistent workers, 3x224x224 float output, warm "
        f"cache, median of {args.epochs} epochs"
    )
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"  {name:<36} {median:7.0f} images/s   x{median / base:4.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
