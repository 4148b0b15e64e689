"""TorchRecord against loose files and its peers, side by side, in one command.

    python -m benchmarks.compare [--num-images 2000] [--epochs 3] [--cold] [--only NAME,...]

On one generated CUB-like dataset (``benchmarks/make_dataset.py``) every method converts the
JPEGs into its own format (timed), then reads them back as batches of 32 float 3x224x224 tensors
and int labels, shuffled, with 2 DataLoader workers. After one warm-up epoch per method the
methods run interleaved, round after round, so that they share the machine's state; a method's
images/s is the median over rounds and its ratio to ImageFolder the median of the per-round
ratios. Also reported: bytes on disk, the time to copy the method's directory (``cp -r`` from a
cold cache, then ``sync``), the peak memory of the whole process tree (PSS: shared pages are
split between the processes that map them, so the sum does not count them twice), and each
method's share of the 2-core ideal of its pipeline (``benchmarks/limit.py``).

``--cold`` evicts each method's files from the page cache (``posix_fadvise(DONTNEED)``) before
every epoch, so every epoch reads from the disk; otherwise each method reads data it touched
in its previous epoch (warm cache).

Writes ``benchmarks/results/compare[-cold].md`` and ``.json``, and ``compare[-cold].png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BASELINE = "ImageFolder (loose files)"

# which per-core pipeline of benchmarks/limit.py each method runs
PIPELINE_OF = {
    BASELINE: "PIL (jpeg)",
    "WebDataset": "PIL (jpeg)",
    "MosaicML Streaming": "PIL (jpeg)",
    "LitData": "PIL (jpeg)",
    "TorchRecord raw_rgb (0.1 transform)": "PIL (raw)",
    "TorchRecord jpeg (0.1 transform)": "PIL (jpeg)",
    "TorchRecord raw_rgb fast": "tensor (raw)",
    "TorchRecord jpeg fast": "tensor (jpeg)",
    "TorchRecord raw_rgb uint8": "tensor uint8 (raw)",
    "TorchRecord jpeg uint8": "tensor uint8 (jpeg)",
    "TorchRecord raw_rgb, defaults": "tensor (raw)",
    "TorchRecord jpeg, defaults": "tensor (jpeg)",
    # (batches in the resize's order, as the limit writes them: no channel-order limit)
    "TorchRecord raw_rgb, channels_last": "tensor (raw)",
    "TorchRecord jpeg, channels_last": "tensor (jpeg)",
}
# the same pipelines with their output in channel order, as the loaders yield it (limit.py)
CHW_PIPELINE_OF = {
    name: f"{pipeline}, CHW"
    for name, pipeline in PIPELINE_OF.items()
    if pipeline in ("tensor (raw)", "tensor (jpeg)") and "channels_last" not in name
}


# -- measuring helpers -------------------------------------------------------------------------
def evict(directory: Path) -> None:
    """Drop every file of ``directory`` from the page cache (dirty pages are written first:
    the kernel cannot drop them before)."""
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def copy_seconds(directory: Path) -> float:
    """``cp -r`` of the directory from a cold cache, including ``sync`` of the copy."""
    evict(directory)
    with tempfile.TemporaryDirectory(dir=directory.parent) as tmp:
        started = time.perf_counter()
        subprocess.run(["cp", "-r", str(directory), str(Path(tmp) / "copy")], check=True)
        subprocess.run(["sync", "-f", str(Path(tmp) / "copy")], check=True)
        return time.perf_counter() - started


class PeakMemory:
    """Samples the PSS of this process and the worker processes of one loader; keeps the peak.

    Workers of other loaders (persistent ones stay alive, idle) are left out: they belong to
    another method.
    """

    def __init__(self, loader: Any, interval: float = 0.25) -> None:
        import psutil

        self.psutil, self.interval, self.peak = psutil, interval, 0
        self.loader = loader
        me = psutil.Process()
        self.before = {p.pid for p in me.children(recursive=True)}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _own_pids(self) -> set[int]:
        inner = getattr(self.loader, "loader", self.loader)  # unwrap benchmark adapters
        iterator = getattr(inner, "_iterator", None)
        return {w.pid for w in getattr(iterator, "_workers", []) if w.pid}

    def _sample(self) -> int:
        me = self.psutil.Process()
        own = self._own_pids()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            if proc.pid != me.pid and proc.pid in self.before and proc.pid not in own:
                continue  # an idle persistent worker of another method
            try:
                total += proc.memory_full_info().pss
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def trim_heap() -> None:
    """Give the free memory glibc's allocator keeps back to the system (``malloc_trim``).

    The training process keeps freed batches' memory in its heap: after the methods that convert
    uint8 batches to float in this process, it holds about 1 GB more than it uses, which the
    next method's peak would otherwise include."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def run_epoch(loader: Any, expected: int) -> float:
    """Images/s of one full epoch; checks every batch is the agreed shape."""
    started, count = time.perf_counter(), 0
    for images, labels in loader:
        if images.shape[1:] != (3, 224, 224) or str(images.dtype) != "torch.float32":
            raise AssertionError(f"unexpected batch {tuple(images.shape)} {images.dtype}")
        count += len(labels)
    seconds = time.perf_counter() - started
    if count != expected:
        raise AssertionError(f"an epoch yielded {count} samples, expected {expected}")
    return count / seconds


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "cores": cores,
        "memory_gib": round(memory / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in (
        "torchrecord",
        "torch",
        "torchvision",
        "pillow",
        "lmdb",
        "protobuf",
        "numpy",
        "zlib-ng",
        "webdataset",
        "mosaicml-streaming",
        "litdata",
    ):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    from torchrecord import checksum

    out["records' CRC-32 by"] = checksum.IMPLEMENTATION  # (TORCHRECORD_CRC32=zlib: Python's)
    return out


def shuffle_quality(dataset_dir: Path, batch_size: int) -> dict[str, dict[str, float]]:
    """How well each TorchRecord shuffle mode mixes one epoch (from the sampler's order).

    ``correlation``: Spearman rank correlation of read position and storage position (0 for a
    perfect shuffle, 1 for none); ``displacement``: mean |read position - storage position| / n
    (about 1/3 for a uniform permutation); ``shards_per_batch``: distinct shards in a batch (the
    working set a batch touches).
    """
    import numpy as np

    from torchrecord import TRSampler

    results = {}
    for mode in ("none", "block", "global"):
        sampler = TRSampler(dataset_dir, shuffle=mode, seed=0)
        order = sampler.order(0)
        n = len(order)
        positions = np.arange(n)
        correlation = float(np.corrcoef(positions, order)[0, 1]) if mode != "none" else 1.0
        shard_of = np.searchsorted(sampler.offsets, order, side="right") - 1
        per_batch = [
            len(set(shard_of[i : i + batch_size].tolist())) for i in range(0, n, batch_size)
        ]
        results[mode] = {
            "correlation": abs(correlation),
            "displacement": float(np.abs(order - positions).mean() / n),
            "shards_per_batch": float(np.mean(per_batch)),
            "shards": sampler.record_num,
            "pool_size": sampler.pool_size,
            "block_shards": sampler.block_shards,
        }
    return results


def round_order(methods: list[Any], round_index: int) -> list[Any]:
    """The methods in their order, but every other round a method's limit (its twin with the
    records in memory, listed right after it) runs first: neither always gets the cache or the
    machine's state the other leaves behind."""
    order = list(methods)
    if round_index % 2:
        i = 0
        while i < len(order) - 1:
            if getattr(order[i + 1], "limit_of", None) == order[i].name:
                order[i], order[i + 1] = order[i + 1], order[i]
                i += 1
            i += 1
    return order


# -- the run -----------------------------------------------------------------------------------
def build_methods(workdir: Path, only: set[str] | None) -> list[Any]:
    from benchmarks import peers
    from benchmarks.torchrecord_methods import torchrecord_methods

    methods = [
        peers.ImageFolderMethod(workdir),
        peers.WebDatasetMethod(workdir),
        peers.StreamingMethod(workdir),
        peers.LitDataMethod(workdir),
        *torchrecord_methods(workdir),
    ]
    if only:
        methods = [m for m in methods if m.name == BASELINE or any(o in m.name for o in only)]
    return methods


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--num-classes", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=3, help="timed rounds after the warm-up")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cold", action="store_true", help="evict the data before every epoch")
    parser.add_argument("--only", default="", help="comma-separated parts of method names")
    parser.add_argument("--data", type=Path, default=REPO / "data")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    from benchmarks.limit import PIPELINES, limit_meter
    from benchmarks.make_dataset import make_dataset
    from benchmarks.peers import Source

    data_list = make_dataset(
        args.data / f"cub_like_{args.num_images}",
        num_images=args.num_images,
        num_classes=args.num_classes,
        seed=0,
        workers=args.workers,
    )
    source = Source.from_data_list(data_list)
    workdir = args.data / f"compare_{args.num_images}"
    only = {o.strip() for o in args.only.split(",") if o.strip()} or None
    methods = build_methods(workdir, only)
    if args.cold:
        # a persistent worker keeps its shards mapped, and mapped pages cannot be evicted:
        # cold epochs are measured with workers that start afresh, as for every peer
        methods = [m for m in methods if not getattr(m, "persistent", False)]
    n = len(source.entries)
    print(
        f"{n} images, {dir_bytes(source.root) / 1e6:.1f} MB of JPEGs; "
        f"{'cold' if args.cold else 'warm'} cache; {len(methods)} methods",
        flush=True,
    )

    rows: dict[str, dict[str, Any]] = {}
    prepared: dict[Path, dict[str, float]] = {}
    for method in methods:
        key = method.data_dir() if hasattr(method, "is_prepared") else None
        if key is not None and key in prepared:  # TorchRecord configurations share a dataset
            method.source = source
            rows[method.name] = dict(prepared[key], shared=True)
            continue
        started = time.perf_counter()
        method.prepare(source)
        row = {"write_s": time.perf_counter() - started}
        row["bytes"] = dir_bytes(method.data_dir())
        row["copy_s"] = copy_seconds(method.data_dir())
        rows[method.name] = row
        if key is not None:
            prepared[key] = row
        print(
            f"prepared {method.name:<38} {row['write_s']:6.1f} s  "
            f"{row['bytes'] / 1e6:8.1f} MB  copy {row['copy_s']:5.2f} s",
            flush=True,
        )

    loaders = {
        m.name: m.loader(batch_size=args.batch_size, num_workers=args.workers, seed=0)
        for m in methods
    }
    rates: dict[str, list[float]] = {m.name: [] for m in methods}
    peaks: dict[str, int] = {m.name: 0 for m in methods}
    # the limits are measured after every round, so that each round's shares of them compare
    # figures taken under the same conditions (this machine's speed varies by the minute)
    meter = limit_meter([p for p, _ in source.entries])
    round_limits: list[dict[str, dict[str, float]]] = []
    for round_index in range(args.epochs + 1):  # round 0 is the warm-up
        for method in round_order(methods, round_index):
            if args.cold:
                evict(method.data_dir())
            rate = run_epoch(loaders[method.name], n)
            if round_index:
                rates[method.name].append(rate)
        if round_index:
            round_limits.append(meter(repeats=1))
            print(
                f"round {round_index}: "
                + ", ".join(
                    f"{name.split(' (')[0] if name == BASELINE else name}={r[-1]:.0f}"
                    for name, r in rates.items()
                ),
                flush=True,
            )

    # memory in one more epoch per method, untimed: sampling every process's PSS (smaps) takes
    # CPU from the two cores and would slow the timed epochs by about 5%
    for method in methods:
        if args.cold:
            evict(method.data_dir())
        trim_heap()  # not charged for what the previous methods left in the allocator
        with PeakMemory(loaders[method.name]) as memory:
            run_epoch(loaders[method.name], n)
        peaks[method.name] = memory.peak

    limits = {  # each step's median over the rounds
        pipeline: {
            step: statistics.median(r[pipeline][step] for r in round_limits)
            for step in round_limits[0][pipeline]
        }
        for pipeline in round_limits[0]
    }
    jpeg_dirs = [m.data_dir() for m in methods if getattr(m, "codec", None) == "jpeg"]
    quality = shuffle_quality(jpeg_dirs[0], args.batch_size) if jpeg_dirs else {}
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "command": "python -m benchmarks.compare " + " ".join(argv or sys.argv[1:]),
        "cache": "cold" if args.cold else "warm",
        "images": n,
        "epochs": args.epochs,
        "workers": args.workers,
        "batch_size": args.batch_size,
        "machine": machine(),
        "versions": versions(),
        "limits": limits,
        "limit_rounds": round_limits,
        "pipelines": PIPELINES,
        "shuffle_quality": quality,
        "methods": {},
    }
    limits_of = {m.limit_of: m.name for m in methods if getattr(m, "limit_of", None)}
    for method in methods:
        name = method.name
        ratios = [r / b for r, b in zip(rates[name], rates[BASELINE])]
        # (a loader's limit, its twin with the records in memory, runs its pipeline)
        pipeline = PIPELINE_OF.get(name) or PIPELINE_OF.get(getattr(method, "limit_of", None))
        median = statistics.median(rates[name])
        # the share of the ideal: the median of each round's rate over that round's ideal
        ideals = [
            rate / (r[pipeline]["images_per_s"] * args.workers)
            for rate, r in zip(rates[name], round_limits)
            if pipeline
        ]
        chw = CHW_PIPELINE_OF.get(name) or CHW_PIPELINE_OF.get(getattr(method, "limit_of", None))
        chw_ideals = [
            rate / (r[chw]["images_per_s"] * args.workers)
            for rate, r in zip(rates[name], round_limits)
            if chw and chw in r
        ]
        results["methods"][name] = {
            **rows[name],
            "describe": method.describe(),
            "images_per_s": median,
            "rounds": rates[name],
            "ratio": statistics.median(ratios),
            "peak_pss": peaks[name],
            "pipeline": pipeline,
            "of_ideal": statistics.median(ideals) if ideals else None,
            "of_ideal_range": [min(ideals), max(ideals)] if ideals else None,
            "chw_pipeline": chw,
            "of_chw_ideal": statistics.median(chw_ideals) if chw_ideals else None,
            "of_chw_ideal_range": [min(chw_ideals), max(chw_ideals)] if chw_ideals else None,
        }
        if name in limits_of:  # the same loader with its records in memory: its limit
            twin = limits_of[name]
            shares = [r / m for r, m in zip(rates[name], rates[twin])]
            results["methods"][name].update(
                limit=twin,
                of_limit=statistics.median(shares),
                of_limit_range=[min(shares), max(shares)],
            )
    write_report(results, args.out)
    return 0


# -- output ------------------------------------------------------------------------------------
def render_markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"Measured {results['date']} with `{results['command'].strip()}`: {results['images']} "
        f"CUB-like JPEGs, batch {results['batch_size']}, {results['workers']} workers, shuffled, "
        f"3x224x224 float output, {results['cache']} page cache, median of "
        f"{results['epochs']} rounds after a warm-up. Machine: {m['cpu']}, {m['cores']} cores, "
        f"{m['memory_gib']} GiB.",
        "",
        "| method | images/s | x ImageFolder | share of 2-core ideal | write s | MB on disk "
        "| copy s | peak memory MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results["methods"].items():
        ideal = f"{r['of_ideal']:.0%} of {r['pipeline']}" if r["of_ideal"] else ""
        write = "(shared)" if r.get("shared") else f"{r['write_s']:.1f}"
        lines.append(
            f"| {name} | {r['images_per_s']:.0f} | {r['ratio']:.2f} | {ideal} | {write} | "
            f"{r['bytes'] / 1e6:.1f} | {r['copy_s']:.2f} | {r['peak_pss'] / 2**20:.0f} |"
        )
    lines += [
        "",
        "Per-core limit (one process, data in memory, ms per image; measured after every "
        "round, medians; a method's share of its 2-core ideal is the median of its per-round "
        "shares, each against that round's limit):",
        "",
        "| pipeline | decode | resize | to-tensor | total | images/s per core |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, t in results["limits"].items():
        to_tensor = f"{t['to-tensor'] * 1e3:.2f}" if "to-tensor" in t else "-"
        lines.append(
            f"| {name}: {results['pipelines'][name]} | {t['decode'] * 1e3:.2f} | "
            f"{t['resize'] * 1e3:.2f} | {to_tensor} | {t['total'] * 1e3:.2f} | "
            f"{t['images_per_s']:.0f} |"
        )
    methods = results["methods"]
    lines += _share_table(
        "The share of the 2-core ideal of the same pipeline with its output in channel order "
        "(3 x 224 x 224, as the loaders and ToTensor yield it; the tensor pipelines above leave "
        "the resize's height-width-channel order), median and range of the per-round shares:",
        "pipeline",
        "---",
        [
            (n, r, r["chw_pipeline"], r["of_chw_ideal"], r["of_chw_ideal_range"])
            for n, r in methods.items()
            if r.get("of_chw_ideal")
        ],
    )
    lines += _share_table(
        "Against the same loader with every record already in its workers' memory (run next "
        "to it, each first in turn): the share of its images/s, per round (median and range):",
        "with records in memory",
        "---:",
        [
            (n, r, f"{methods[r['limit']]['images_per_s']:.0f}", r["of_limit"], r["of_limit_range"])
            for n, r in methods.items()
            if r.get("limit")
        ],
    )
    if results.get("shuffle_quality"):
        lines += [
            "",
            "Shuffle quality of TorchRecord's modes (one epoch of the sampler's order):",
            "",
            "| mode | rank correlation (0 = ideal) | mean displacement / n (ideal 0.33) "
            "| shards per batch |",
            "|---|---:|---:|---:|",
        ]
        for mode, q in results["shuffle_quality"].items():
            lines.append(
                f"| {mode} | {q['correlation']:.3f} | {q['displacement']:.3f} | "
                f"{q['shards_per_batch']:.1f} of {q['shards']} |"
            )
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items())]
    return "\n".join(lines) + "\n"


def _share_table(
    intro: str, against: str, align: str, rows: list[tuple[str, dict, str, float, list]]
) -> list:
    """Markdown lines: ``intro``, then per method its images/s, what it is measured against
    (``against``), and the median and range of its per-round shares; none without rows."""
    if not rows:
        return []
    lines = [
        "",
        intro,
        "",
        f"| method | images/s | {against} | share, median | share, range |",
        f"|---|---:|{align}|---:|---:|",
    ]
    for name, r, what, median, (low, high) in rows:
        lines.append(
            f"| {name} | {r['images_per_s']:.0f} | {what} | {median:.0%} | {low:.0%}-{high:.0%} |"
        )
    return lines


def write_report(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = "compare" + ("-cold" if results["cache"] == "cold" else "")
    markdown = render_markdown(results)
    (out / f"{stem}.md").write_text(markdown)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n" + markdown)
    try:
        chart(results, out / f"{stem}.png")
        print(f"wrote {out / (stem + '.md')}, {stem}.json and {stem}.png")
    except ImportError:
        print(f"wrote {out / (stem + '.md')} and {stem}.json (install matplotlib for the chart)")


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["methods"])
    values = [results["methods"][n]["images_per_s"] for n in names]
    limits = {r["limit"] for r in results["methods"].values() if r.get("limit")}
    colours = [
        "#e3a5a7"  # a limit (records in memory): a measuring aid, not a setting
        if n in limits
        else "#c44e52"
        if n.startswith("TorchRecord")
        else "#8c8c8c"
        for n in names
    ]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(names) + 1.2))
    ax.barh(names[::-1], values[::-1], color=colours[::-1])
    for y, v in enumerate(values[::-1]):
        ax.text(v, y, f" {v:.0f}", va="center", fontsize=8)
    ax.set_xlabel(
        f"images/s ({results['workers']} workers, batch {results['batch_size']}, "
        f"3x224x224 float, {results['cache']} cache)"
    )
    ax.set_title(
        f"{results['images']} CUB-like JPEGs, {results['machine']['cores']} cores, "
        f"{results['date']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
