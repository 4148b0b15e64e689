"""Setting up a large write: the time from ``Writer(...).write()`` to its first sample, and the
memory the data list's entries hold, for a data list of a million lines; this checkout against
a git revision, alternating fresh processes.

    python -m benchmarks.write_setup --base REV [--lines 1000000] [--rounds 5]

The data list names the generated CUB-like JPEGs over and over (a million distinct files are
not needed: nothing is encoded). Each process has torch and torchvision loaded, as a training
script that converts its data would, and stops the write where the first sample would be
encoded. Its figures: the seconds of the set-up (reading the list, labels, order, job ids; the
files are checked to exist, from the page cache), the garbage collector's share of them, and
the growth of the process's anonymous memory (``RssAnon``) over the set-up.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_SETUP = """
import gc, json, shutil, sys, time
sys.path.insert(0, {repo!r})
import torch, torchvision
import torchrecord.writer as W
from torchrecord import Writer

def anon_mb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) / 1024

class Stop(Exception):
    pass

def stop(self, *args, **kwargs):
    raise Stop

W.Writer._write_shards = W.Writer._write_planned_shards = stop
collecting = {{}}
spent = [0.0]
def watch(phase, info):
    if phase == "start":
        collecting["t"] = time.perf_counter()
    else:
        spent[0] += time.perf_counter() - collecting["t"]
gc.callbacks.append(watch)
writer = Writer({data_list!r}, {out!r}, db_num=8, codec="jpeg", progress=False)
before, started = anon_mb(), time.perf_counter()
try:
    writer.write()
except Stop:
    pass
seconds, grown = time.perf_counter() - started, anon_mb() - before
shutil.rmtree({out!r}, ignore_errors=True)
print(json.dumps([seconds, spent[0], grown]))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="git revision to compare with")
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--data", type=Path, default=REPO / "data")
    args = parser.parse_args(argv)

    from benchmarks.make_dataset import make_dataset
    from benchmarks.revision import absolute_list, alternate, ratio_line, worktree

    data_list = Path(
        make_dataset(args.data / "cub_like_2000", num_images=2000, num_classes=200, seed=0)
    )
    work = args.data / "write_setup"
    samples = absolute_list(data_list, work / "list.txt").read_text().splitlines()
    big = work / f"list_{args.lines}.txt"
    big.write_text("".join(f"{samples[i % len(samples)]}\n" for i in range(args.lines)))
    with worktree(args.base, work) as base:
        results = alternate(
            args.rounds,
            {args.base: base, "this checkout": REPO},
            lambda checkout: _SETUP.format(
                repo=str(checkout), data_list=str(big), out=str(work / "out")
            ),
            lambda f: (
                f"{f[0]:.2f} s (garbage collector {f[1]:.2f} s), anonymous memory +{f[2]:.0f} MB"
            ),
        )
    print(f"\nSet-up of a write of {args.lines} data-list lines, median of {args.rounds}:")
    for name, rows in results.items():
        seconds, collector, grown = (statistics.median(col) for col in zip(*rows))
        print(
            f"  {name}: {seconds:.2f} s (garbage collector {collector:.2f} s), "
            f"+{grown:.0f} MB ({grown * 2**20 / args.lines:.0f} bytes a line)"
        )
    print(ratio_line(results[args.base], results["this checkout"], args.base))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
