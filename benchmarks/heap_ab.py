"""The writing process's heap, A/B: a one-process write with the heap keeping its large blocks
(this checkout) against the same write without (64 MB batches, glibc's limits left where they
were: the writer before 2026-12-07's change), in fresh processes, alternating.

    python -m benchmarks.heap_ab [--rounds 5] [--codec raw_rgb] [--num-images 2000]

Reports per variant the wall time, user and system CPU time and minor page faults of the write
(``getrusage``; the source files read just before, so in the page cache), and the median and
range of the per-round ratios of the wall times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_ONE_WRITE = """
import json, resource, shutil, sys, time
sys.path.insert(0, {repo!r})
import torchrecord.writer as W
if {before!r}:
    W._BATCH_BYTES = 64 << 20
    W.let_heap_keep_large_blocks = lambda: None
from torchrecord import Writer
lines = open({data_list!r}).read().splitlines()
for line in lines:
    with open(line.rsplit(" ", 1)[0], "rb") as f:
        f.read()
shutil.rmtree({out!r}, ignore_errors=True)
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
Writer({data_list!r}, {out!r}, db_num=8, shuffle=False, codec={codec!r}, num_workers=0,
       progress=False).write()
t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
shutil.rmtree({out!r}, ignore_errors=True)
print(json.dumps([t1 - t0, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime,
                  r1.ru_minflt - r0.ru_minflt]))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--codec", default="raw_rgb")
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--data", type=Path, default=REPO / "data")
    args = parser.parse_args(argv)

    from benchmarks.make_dataset import make_dataset

    data_list = make_dataset(
        args.data / f"cub_like_{args.num_images}",
        num_images=args.num_images,
        num_classes=200,
        seed=0,
    )
    list_path = args.data / "heap_ab" / "list.txt"
    list_path.parent.mkdir(parents=True, exist_ok=True)
    root = Path(data_list).parent
    list_path.write_text(
        "".join(
            f"{root / line.rsplit(' ', 1)[0]} {line.rsplit(' ', 1)[1]}\n"
            for line in Path(data_list).read_text().splitlines()
        )
    )
    results: dict[str, list[list[float]]] = {"before": [], "now": []}
    for r in range(args.rounds):
        for variant in ("before", "now"):
            code = _ONE_WRITE.format(
                repo=str(REPO),
                before=variant == "before",
                data_list=str(list_path),
                out=str(args.data / "heap_ab" / "out"),
                codec=args.codec,
            )
            done = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, check=True
            )
            wall, user, system, faults = json.loads(done.stdout)
            results[variant].append([wall, user, system, faults])
            print(
                f"round {r + 1} {variant:6}: {wall:.2f} s, user {user:.2f} s, "
                f"system {system:.2f} s, {faults:.0f} minor faults",
                flush=True,
            )
    print(f"\n{args.codec}, one process, {args.num_images} images, median of {args.rounds}:")
    for variant, rows in results.items():
        medians = [statistics.median(col) for col in zip(*rows)]
        print(
            f"  {variant:6}: {medians[0]:.2f} s, user {medians[1]:.2f} s, system "
            f"{medians[2]:.2f} s, {medians[3]:.0f} minor faults"
        )
    ratios = [b[0] / n[0] for b, n in zip(results["before"], results["now"])]
    print(
        f"  before / now, per round: median {statistics.median(ratios):.2f} "
        f"({min(ratios):.2f}-{max(ratios):.2f}): {', '.join(f'{x:.2f}' for x in ratios)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
