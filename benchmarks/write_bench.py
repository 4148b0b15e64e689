"""Write (conversion) throughput: TorchRecord against its peers and ``cp -r``, side by side.

    python -m benchmarks.write_bench [--num-images 2000] [--rounds 3] [--source warm|cold]

Every method converts the same generated CUB-like JPEGs into its own format; rounds interleave
the methods and a figure is the median over rounds. The source files are in the page cache
before every method (``--source warm``: each method reads them first) or dropped from it
(``--source cold``, ``posix_fadvise(DONTNEED)``: every method reads them from disk, as a
conversion of a dataset too large for memory does). ``cp -r`` of the source folder is the
floor any conversion is measured against. The original TorchRecord 0.1.1 writer runs too: its
own code, fetched from PyPI, against today's protobuf (see ``benchmarks/original_writer.py``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data", type=Path, default=REPO / "data")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument(
        "--source",
        choices=("warm", "cold"),
        default="warm",
        help="source files in the page cache before each method, or read from disk",
    )
    args = parser.parse_args(argv)

    from benchmarks import original_writer, peers
    from benchmarks.compare import dir_bytes, evict, machine, versions
    from benchmarks.make_dataset import make_dataset
    from torchrecord import Writer

    data_list = make_dataset(
        args.data / f"cub_like_{args.num_images}",
        num_images=args.num_images,
        num_classes=200,
        seed=0,
    )
    source = peers.Source.from_data_list(data_list)
    work = args.data / f"write_bench_{args.num_images}"
    work.mkdir(parents=True, exist_ok=True)
    list_path = work / "list.txt"
    list_path.write_text("".join(f"{p} {label}\n" for p, label in source.entries))

    def cp() -> Path:
        target = work / "cp"
        subprocess.run(["cp", "-r", str(source.root), str(target)], check=True)
        return target

    def torchrecord(codec: str, workers: int, shards: int = 8):
        def run() -> Path:
            target = work / f"tr_{codec}_{workers}_{shards}"
            Writer(
                list_path,
                target,
                db_num=shards,
                shuffle=False,  # (in list order, as the peers write)
                codec=codec,
                num_workers=workers,
                overwrite=True,
                progress=False,
            ).write()
            return target

        return run

    def original() -> Path:
        return original_writer.write(list_path, work / "original", db_num=8)

    def peer(method):
        def run() -> Path:
            method.prepare(source)
            return method.data_dir()

        return run

    webdataset, mds, litdata = (
        peers.WebDatasetMethod(work),
        peers.StreamingMethod(work),
        peers.LitDataMethod(work),
    )
    # each method with the directory its output goes to, removed before it is timed: the
    # figures are conversions, not the deletion of the last round's output
    methods = {
        "cp -r (the floor)": (cp, work / "cp"),
        "WebDataset ShardWriter": (peer(webdataset), webdataset.workdir),
        "MosaicML MDSWriter": (peer(mds), mds.workdir),
        "LitData optimize": (peer(litdata), litdata.workdir),
        "TorchRecord jpeg, 1 process": (torchrecord("jpeg", 0), work / "tr_jpeg_0_8"),
        "TorchRecord jpeg, 2 workers": (torchrecord("jpeg", 2), work / "tr_jpeg_2_8"),
        "TorchRecord 0.1.1 writer (raw RGB, 1 process)": (original, work / "original"),
        "TorchRecord raw_rgb, 1 process": (torchrecord("raw_rgb", 0), work / "tr_raw_rgb_0_8"),
        "TorchRecord raw_rgb, 2 workers": (torchrecord("raw_rgb", 2), work / "tr_raw_rgb_2_8"),
        # one shard: the workers encode, this process writes it (and hashes it at the end)
        "TorchRecord raw_rgb, 2 workers, one shard": (
            torchrecord("raw_rgb", 2, 1),
            work / "tr_raw_rgb_2_1",
        ),
    }
    # As the peers' modules are imported before they are timed, so is torchvision, raw_rgb's
    # JPEG decoder: with it loaded, the writer uses it whatever the size of the write (a fresh
    # process loads it only for writes of LIBJPEG_MIN_IMAGES or more).
    from torchrecord.codecs.raw_rgb import set_libjpeg

    set_libjpeg(True)
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    sizes: dict[str, int] = {}
    for _ in range(args.rounds):
        for name, (run, output) in methods.items():
            shutil.rmtree(output, ignore_errors=True)
            os.sync()  # no method pays for writing back another's output
            if args.source == "warm":  # every method finds the source files alike
                for path, _ in source.entries:
                    path.read_bytes()
            else:
                evict(source.root)
            started = time.perf_counter()
            target = run()
            seconds[name].append(time.perf_counter() - started)
            sizes[name] = dir_bytes(target)
        print("round: " + ", ".join(f"{n}={s[-1]:.2f}s" for n, s in seconds.items()), flush=True)

    n = len(source.entries)
    src_bytes = sum(p.stat().st_size for p, _ in source.entries)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    fastest_peer = min(
        medians[k] for k in methods if k.split()[0] in ("WebDataset", "MosaicML", "LitData")
    )
    original_key = "TorchRecord 0.1.1 writer (raw RGB, 1 process)"
    where = (
        "source files in the page cache"
        if args.source == "warm"
        else "source files dropped from the page cache before each method (read from disk)"
    )
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} with `python -m benchmarks.write_bench`: {n} "
        f"CUB-like JPEGs ({src_bytes / 1e6:.1f} MB), {where}, median of {args.rounds} "
        f"rounds. Machine: {machine()['cpu']}, {machine()['cores']} cores.",
        "",
        "| method | seconds | images/s | x fastest peer | x cp -r | x 0.1.1 | MB on disk "
        "| x source bytes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, value in medians.items():
        lines.append(
            f"| {name} | {value:.2f} | {n / value:.0f} | {fastest_peer / value:.2f} | "
            f"{medians['cp -r (the floor)'] / value:.2f} | {medians[original_key] / value:.2f} | "
            f"{sizes[name] / 1e6:.1f} | "
            f"{sizes[name] / src_bytes:.3f} |"
        )
    lines += ["", *goal_lines(seconds, original_key)]
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in versions().items())]
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / ("write.md" if args.source == "warm" else "write-cold.md")).write_text(text)
    print("\n" + text)
    return 0


def goal_lines(seconds: dict[str, list[float]], original_key: str) -> list[str]:
    """The writing issue's goals as ratios of times within each round (methods of one round ran
    minutes apart at most, so a ratio is less exposed to this machine's slow and fast hours than
    a ratio of medians): their median and range."""
    peers = [k for k in seconds if k.split()[0] in ("WebDataset", "MosaicML", "LitData")]
    rounds = range(len(seconds[original_key]))
    jpeg, raw = seconds["TorchRecord jpeg, 1 process"], seconds["TorchRecord raw_rgb, 2 workers"]
    goals = [
        (
            "`raw_rgb`, 2 workers, x the 0.1.1 writer",
            [seconds[original_key][r] / raw[r] for r in rounds],
            1.8,
        ),
        (
            "`jpeg`, 1 process, x the fastest peer",
            [min(seconds[k][r] for k in peers) / jpeg[r] for r in rounds],
            3.0,
        ),
        (
            "`jpeg`, 1 process, times the time of `cp -r`",
            [jpeg[r] / seconds["cp -r (the floor)"][r] for r in rounds],
            2.0,
        ),
    ]
    lines = [
        "Goals, per round (ratio of the two times in each round):",
        "",
        "| goal | median | range | per round | goal |",
        "|---|---:|---:|---|---:|",
    ]
    for name, ratios, goal in goals:
        lines.append(
            f"| {name} | {statistics.median(ratios):.2f} | {min(ratios):.2f}-{max(ratios):.2f} "
            f"| {', '.join(f'{x:.2f}' for x in ratios)} | {goal} |"
        )
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
