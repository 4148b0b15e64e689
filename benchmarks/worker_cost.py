"""Where a loader worker's time goes, per image, against the per-core limit of its pipeline.

    python -m benchmarks.worker_cost [--records data/records_jpeg_2000] [--rounds 5]

In one process and one thread, with the records in memory, side by side in every round:

* ``steps``: the pipeline's steps one at a time over all images (decode all, resize all,
  convert all), as :mod:`benchmarks.limit` times the 2-core limit;
* ``per image``: the same steps, one image after the other, as a worker runs them.

Then a real ``TorchRecord(path, shuffle=True, batch_size=32, num_workers=2)`` epoch (persistent
workers, after a warm-up epoch): images/s, and the CPU time of the training process and of each
worker per image (``psutil``). Medians over rounds.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=Path, default=REPO / "data" / "records_jpeg_2000")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--images", type=int, default=320)
    args = parser.parse_args(argv)

    import psutil
    import torch

    from torchrecord import TorchRecord, TRDataset
    from torchrecord.transforms import resize_224

    torch.set_num_threads(1)
    dataset = TRDataset(args.records, transform="fast")
    codec = dataset.reader.codec
    order = list(range(len(dataset)))
    random.Random(0).shuffle(order)
    order = order[: args.images - args.images % 32]
    records = [dataset.reader.read_view(i) for i in order]  # the pipeline's input, in memory

    def steps() -> float:
        started = time.perf_counter()
        images = [codec.decode_tensor(r) for r in records]
        images = [resize_224(x) for x in images]
        [x.float().div_(255) for x in images]
        return (time.perf_counter() - started) / len(records)

    def per_image() -> float:
        started = time.perf_counter()
        for r in records:
            resize_224(codec.decode_tensor(r)).float().div_(255)
        return (time.perf_counter() - started) / len(records)

    timed: dict[str, list[float]] = {"steps": [], "per image": []}
    for _ in range(args.rounds):
        for name, fn in (("steps", steps), ("per image", per_image)):
            timed[name].append(fn())
    for name, values in timed.items():
        print(f"{name:<10} {statistics.median(values) * 1e3:6.3f} ms an image on one core")

    loader = TorchRecord(args.records, shuffle=True, batch_size=32, num_workers=2)
    for _ in loader:  # warm-up: the workers start and stay
        pass
    me = psutil.Process()
    workers = [psutil.Process(w.pid) for w in loader._iterator._workers]
    rates, main_ms, worker_ms = [], [], []
    for epoch in range(1, args.rounds + 1):
        loader.set_epoch(epoch)
        cpu = [p.cpu_times() for p in (me, *workers)]
        started, count = time.perf_counter(), 0
        for _, labels in loader:
            count += len(labels)
        seconds = time.perf_counter() - started
        used = [
            (b.user + b.system) - (a.user + a.system)
            for a, b in zip(cpu, [p.cpu_times() for p in (me, *workers)])
        ]
        rates.append(count / seconds)
        main_ms.append(used[0] / count * 1e3)
        worker_ms.append(sum(used[1:]) / count * 1e3)
    print(
        f"loader     {statistics.median(rates):6.0f} images/s with 2 workers; CPU an image: "
        f"workers {statistics.median(worker_ms):.3f} ms, training process "
        f"{statistics.median(main_ms):.3f} ms"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
