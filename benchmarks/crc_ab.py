"""Python's zlib against zlib-ng for the records' CRC-32, side by side in one run.

    python -m benchmarks.crc_ab [--rounds 7]

The same CRC-32 either way (torchrecord/checksum.py); what differs is its cost. For each codec,
these figures, each a median over rounds that alternate the two implementations (first in turn):

* reading records without decoding in this process (fetch, CRC-32, deserialize), records/s;
* TorchRecord's defaults loader (2 persistent workers, batch 32, shuffled), images/s and the
  workers' CPU time per image: one loader per implementation, both warm, one epoch each per
  round;
* for ``raw_rgb``, the 2-worker write of the benchmark's 2,000 JPEGs (source in the page cache).

The implementation is switched where the reader and the writer look it up (their module's
``crc32``), before a loader's workers start or a write begins: forked workers keep it (the
benchmark forks them, whatever the platform's default). Results land in
``benchmarks/results/crc_ab.md``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _use(crc32) -> None:
    import torchrecord.reader
    import torchrecord.writer

    torchrecord.reader.crc32 = crc32
    torchrecord.writer.crc32 = crc32


def _shown(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.3f}"


def _workers_cpu(loader) -> float:
    """CPU seconds (user and system) the loader's persistent workers have used so far: less
    noisy than images/s on a shared machine, as time the hypervisor takes away is not in it."""
    import psutil

    return sum(sum(psutil.Process(w.pid).cpu_times()[:2]) for w in loader._iterator._workers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--data", type=Path, default=REPO / "data")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    import multiprocessing

    # workers must start from this process as it is, with the implementation just switched:
    # forked (the default start method changes to forkserver in Python 3.14)
    multiprocessing.set_start_method("fork", force=True)

    from benchmarks.compare import machine
    from benchmarks.make_dataset import make_dataset
    from torchrecord import TorchRecord, Writer, checksum
    from torchrecord.codecs.raw_rgb import set_libjpeg
    from torchrecord.reader import RecordReader

    if checksum.IMPLEMENTATION != "zlib-ng":
        raise SystemExit("zlib-ng is not in use: pip install 'torchrecord[fast]'")
    impls = {"zlib": zlib.crc32, "zlib-ng": checksum.crc32}
    set_libjpeg(True)  # (loaded beforehand, as a write of its size would: the choice stays free)
    data_list = make_dataset(args.data / "cub_like_2000", num_images=2000, num_classes=200, seed=0)
    work = args.data / "crc_ab"
    work.mkdir(parents=True, exist_ok=True)
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} with `python -m benchmarks.crc_ab --rounds "
        f"{args.rounds}`: medians of {args.rounds} rounds, the two implementations alternating "
        "(each first in turn); the ratio is the median of the per-round ratios, with their range. "
        "Machine: {cpu}, {cores} cores.".format(**machine()),
        "",
        "| codec | figure | zlib | zlib-ng | zlib-ng / zlib (median of per-round ratios) |",
        "|---|---|---:|---:|---:|",
    ]
    for codec in ("raw_rgb", "jpeg"):
        records = work / f"records_{codec}"
        if not (records / "manifest.json").exists():
            Writer(data_list, records, db_num=4, codec=codec, progress=False).write()
        figures: dict[str, dict[str, list[float]]] = {}

        def record(name: str, impl: str, value: float, _figures=figures) -> None:
            _figures.setdefault(name, {}).setdefault(impl, []).append(value)

        reader = RecordReader(records)
        loaders = {}
        for impl, fn in impls.items():  # each loader's workers start with their implementation
            _use(fn)
            loaders[impl] = TorchRecord(records, shuffle=True, batch_size=32, num_workers=2)
            for _ in loaders[impl]:  # the warm-up epoch
                pass
        for r in range(args.rounds):
            order = list(impls) if r % 2 == 0 else list(impls)[::-1]
            for impl in order:
                _use(impls[impl])
                started = time.perf_counter()
                for index in range(len(reader)):
                    reader.read_record(index)
                record(
                    "read, records/s in one process",
                    impl,
                    len(reader) / (time.perf_counter() - started),
                )
                busy, started, seen = _workers_cpu(loaders[impl]), time.perf_counter(), 0
                for _, labels in loaders[impl]:
                    seen += len(labels)
                record("defaults loader, images/s", impl, seen / (time.perf_counter() - started))
                record(
                    "defaults loader, workers' CPU ms an image",
                    impl,
                    (_workers_cpu(loaders[impl]) - busy) / seen * 1e3,
                )
                if codec == "raw_rgb":
                    out = work / "write"
                    shutil.rmtree(out, ignore_errors=True)
                    os.sync()
                    for line in data_list.read_text().splitlines():  # the source, cached
                        (data_list.parent / line.rsplit(" ", 1)[0]).read_bytes()
                    started = time.perf_counter()
                    Writer(
                        data_list,
                        out,
                        db_num=8,
                        shuffle=False,
                        codec=codec,
                        num_workers=2,
                        overwrite=True,
                        progress=False,
                    ).write()
                    written = len(reader) / (time.perf_counter() - started)  # (the same samples)
                    record("2-worker write, images/s", impl, written)
            print(
                f"{codec} round {r + 1}: "
                + ", ".join(
                    f"{name} {impl} {_shown(values[impl][-1])}"
                    for name, values in figures.items()
                    for impl in impls
                ),
                flush=True,
            )
        _use(checksum.crc32)
        reader.close()
        for name, values in figures.items():
            ratios = [b / a for a, b in zip(values["zlib"], values["zlib-ng"])]
            lines.append(
                f"| {codec} | {name} | {_shown(statistics.median(values['zlib']))} | "
                f"{_shown(statistics.median(values['zlib-ng']))} | {statistics.median(ratios):.2f} "
                f"({min(ratios):.2f}-{max(ratios):.2f}) |"
            )
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "crc_ab.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'crc_ab.md'}")


if __name__ == "__main__":
    main()
