"""One write, this checkout against a git revision: fresh processes, alternating.

    python -m benchmarks.writer_ab --base REV [--codec raw_rgb] [--workers 2] [--shards 1]
                                   [--rounds 6] [--num-images 2000]

(``--workers 0 --shards 8 --base e622dbe`` measures the writing process's heap change of
2026-12-07: a one-process ``raw_rgb`` write, its page faults among the figures.)

Each round writes the generated CUB-like JPEGs (in the page cache: read just before) with
``Writer(list, out, db_num=SHARDS, shuffle=False, codec=CODEC, num_workers=WORKERS)`` once with
the revision's code (a git worktree) and once with this checkout's, each in a fresh process with
torch loaded, the order alternating from round to round. Reported per version: the medians of the
wall time, of the CPU time of the writing process and of its workers, and of the writing
process's minor page faults (``getrusage``), and the median and range of the per-round ratios of
the wall times.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_ONE_WRITE = """
import json, os, resource, shutil, sys, time
sys.path.insert(0, {repo!r})
import torch, torchvision
from torchrecord import Writer
for line in open({data_list!r}).read().splitlines():
    with open(line.rsplit(" ", 1)[0], "rb") as f:
        f.read()
shutil.rmtree({out!r}, ignore_errors=True)
os.sync()
s0, c0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
t0 = time.perf_counter()
Writer({data_list!r}, {out!r}, db_num={shards}, shuffle=False, codec={codec!r},
       num_workers={workers}, progress=False).write()
t1 = time.perf_counter()
s1, c1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
shutil.rmtree({out!r}, ignore_errors=True)
print(json.dumps([t1 - t0, s1.ru_utime - s0.ru_utime + s1.ru_stime - s0.ru_stime,
                  c1.ru_utime - c0.ru_utime + c1.ru_stime - c0.ru_stime,
                  s1.ru_minflt - s0.ru_minflt]))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="git revision to compare with")
    parser.add_argument("--codec", default="raw_rgb")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--data", type=Path, default=REPO / "data")
    args = parser.parse_args(argv)

    from benchmarks.make_dataset import make_dataset
    from benchmarks.revision import absolute_list, alternate, ratio_line, worktree

    data_list = make_dataset(
        args.data / f"cub_like_{args.num_images}",
        num_images=args.num_images,
        num_classes=200,
        seed=0,
    )
    work = args.data / "writer_ab"
    list_path = absolute_list(Path(data_list), work / "list.txt")
    names = (args.base, "this checkout")
    with worktree(args.base, work) as base:
        results = alternate(
            args.rounds,
            dict(zip(names, (base, REPO))),
            lambda checkout: _ONE_WRITE.format(
                repo=str(checkout),
                data_list=str(list_path),
                out=str(work / "out"),
                shards=args.shards,
                codec=args.codec,
                workers=args.workers,
            ),
            lambda f: (
                f"{f[0]:.2f} s, CPU {f[1]:.2f} s in the writing process, {f[2]:.2f} s in its "
                f"workers, {f[3]:.0f} minor page faults in the writing process"
            ),
        )
    print(
        f"\n{args.codec}, {args.workers} workers, {args.shards} shard(s), "
        f"{args.num_images} images, median of {args.rounds} rounds:"
    )
    for name in names:
        wall, own, workers, faults = (statistics.median(col) for col in zip(*results[name]))
        print(
            f"  {name}: {wall:.2f} s; CPU {own:.2f} s writing process, {workers:.2f} s workers; "
            f"{faults:.0f} minor page faults"
        )
    print(ratio_line(results[args.base], results["this checkout"], args.base))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
