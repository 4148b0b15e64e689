"""Memory of DataLoader workers over a dataset of 1,000,000 tiny records.

    python -m benchmarks.memory [--records 1000000] [--workers 2]

MosaicML Streaming's out-of-memory reports come from per-record Python objects that every
DataLoader worker copies as it touches them (reference counts write to the pages). TorchRecord's
index is a numpy array of shard offsets and the sampler's order lives in the main process, so a
worker's private memory should not grow with the number of records. This writes a dataset of
tiny records (a label each), reads one full epoch with a global shuffle, and samples each
worker's USS (private memory) and the main process's RSS.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def private_dirty(pid: int) -> int:
    """Bytes of a process's private dirty pages (what it allocated and wrote: its heap). The
    rest of its USS is clean pages, here the shards' file pages that only it maps, which the
    kernel drops under pressure (page cache, counted as private while one process maps it)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Private_Dirty:"):
                return int(line.split()[1]) * 1024
    return 0


def tiny_record(line: str):
    """A 0.1-style data_process_func: a record holding only the label."""
    from torchrecord import TensorProtos

    record = TensorProtos()
    proto = record.protos.add()
    proto.data_type = 3
    proto.byte_data = line.rsplit(" ", 1)[1].encode()
    return record


def label_of(record) -> int:
    return int(record.protos[0].byte_data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data", type=Path, default=REPO / "data")
    args = parser.parse_args(argv)

    import psutil

    from torchrecord import TorchRecord, Writer

    out = args.data / f"tiny_{args.records}"
    if not (out / "manifest.json").exists():
        with tempfile.TemporaryDirectory() as tmp:
            one_file = Path(tmp) / "x.bin"
            one_file.write_bytes(b"x")
            data_list = Path(tmp) / "list.txt"
            data_list.write_text("".join(f"x.bin {i % 1000}\n" for i in range(args.records)))
            started = time.perf_counter()
            Writer(
                data_list,
                out,
                db_num=16,
                shuffle=False,
                data_process_func=tiny_record,
                overwrite=True,
            ).write()
            print(f"wrote {args.records} tiny records in {time.perf_counter() - started:.1f} s")

    loader = TorchRecord(
        out, shuffle="global", batch_size=256, num_workers=args.workers, transform=label_of
    )
    me = psutil.Process()
    peaks = {"main_rss": 0, "worker_uss": 0, "worker_dirty": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peaks["main_rss"] = max(peaks["main_rss"], me.memory_info().rss)
            for child in me.children(recursive=True):
                try:
                    peaks["worker_uss"] = max(peaks["worker_uss"], child.memory_full_info().uss)
                    peaks["worker_dirty"] = max(peaks["worker_dirty"], private_dirty(child.pid))
                except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
                    pass
            stop.wait(0.5)

    thread = threading.Thread(target=sample, daemon=True)
    started = time.perf_counter()
    thread.start()
    seen = 0
    for labels in loader:
        seen += len(labels)
    stop.set()
    thread.join()
    seconds = time.perf_counter() - started
    assert seen == args.records, seen
    print(
        f"{seen} records in one epoch, {args.workers} workers, batch 256: {seconds:.1f} s "
        f"({seen / seconds:.0f} records/s)"
    )
    print(
        f"peak private memory (USS) of a worker: {peaks['worker_uss'] / 2**20:.0f} MB, of which "
        f"private dirty (its heap) {peaks['worker_dirty'] / 2**20:.0f} MB; "
        f"peak RSS of the main process: {peaks['main_rss'] / 2**20:.0f} MB"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
