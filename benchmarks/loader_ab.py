"""The defaults loader of two versions of TorchRecord, side by side in one run.

    python -m benchmarks.loader_ab --base REV [--rounds 6] [--epochs 4] [--journey]
        [--base-options JSON] [--this-options JSON] [--name loader_ab]

For a change to the loader: ``REV`` (a git revision of this repository, checked out into a
temporary worktree) against this checkout, on the same datasets (the benchmark's 2,000 JPEGs,
written once with each codec by this checkout into ``data/loader_ab``; the format is the
same). Each round runs one fresh process per version, alternating which goes first: it builds
``TorchRecord(path, shuffle=True, batch_size=32, num_workers=2)``, reads a warm-up epoch, then
``--epochs`` timed ones, and reports the median images/s and the CPU time per image of the
training process and its workers together (less noisy than images/s on a shared machine: time
the hypervisor takes away is not in it). The ratios are medians of the per-round ratios.

``--base-options`` and ``--this-options`` add keywords to either side's ``TorchRecord(...)``
(JSON, for example ``'{"channels_last": true}'``): with ``--base HEAD`` they compare two
settings of the same code.

``--journey`` measures the DataLoader's own work alone: the workers build no images (each batch
is a buffer taken as the loader would, with the labels filled in) and send them as they would.

Results land in ``benchmarks/results/NAME.md`` (``loader_ab.md``; ``loader_ab_journey.md`` with
``--journey``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# run in a fresh interpreter with one version's directory first on sys.path
_ONE = r"""
import json, statistics, sys, time
tree, path, epochs, journey = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
options = {"shuffle": True, "batch_size": 32, "num_workers": 2, **json.loads(sys.argv[5])}
sys.path.insert(0, tree)
import psutil, torch
from torch.utils import data
import torchrecord
from torchrecord import TorchRecord
from torchrecord.dataset import Prebatched
assert torchrecord.__file__.startswith(tree), torchrecord.__file__

class Journey:
    def __init__(self, dataset):
        self.dataset = dataset
    def __call__(self, indices):
        ds, ticket = self.dataset, None
        if ds.batch_pool is not None and data.get_worker_info() is not None:
            images, ticket = ds.batch_pool.take(len(indices), ds.batch_dtype)
        else:
            images = torch.empty((len(indices), 3, 224, 224), dtype=ds.batch_dtype)
        return Prebatched(images, torch.tensor(indices, dtype=torch.int64), ticket, None)

loader = TorchRecord(path, **options)
if journey:
    loader.dataset.__getitems__ = Journey(loader.dataset)
for _ in loader:  # the warm-up epoch; the workers persist
    pass
me = psutil.Process()
processes = [me, *me.children(recursive=True)]
def cpu():
    return sum(sum(p.cpu_times()[:2]) for p in processes)
rates, costs = [], []
for epoch in range(1, epochs + 1):
    loader.set_epoch(epoch)
    used, started, seen = cpu(), time.perf_counter(), 0
    for _, labels in loader:
        seen += len(labels)
    rates.append(seen / (time.perf_counter() - started))
    costs.append((cpu() - used) / seen * 1e3)
print(json.dumps([statistics.median(rates), statistics.median(costs)]))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="the git revision to compare against")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=4, help="timed epochs per process")
    parser.add_argument("--journey", action="store_true", help="workers build no images")
    parser.add_argument("--codecs", default="raw_rgb,jpeg")
    parser.add_argument("--data", type=Path, default=REPO / "data")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--base-options", default="{}", help="JSON keywords for the base's loader")
    parser.add_argument("--this-options", default="{}", help="JSON keywords for this loader")
    parser.add_argument("--name", help="the report's file name, without .md")
    args = parser.parse_args()
    options = {"base": json.loads(args.base_options), "this": json.loads(args.this_options)}

    from benchmarks.compare import machine
    from benchmarks.make_dataset import make_dataset
    from benchmarks.revision import git as _git
    from benchmarks.revision import worktree
    from torchrecord import Writer

    data_list = make_dataset(args.data / "cub_like_2000", num_images=2000, num_classes=200, seed=0)
    base_rev = _git("rev-parse", "--short", args.base)
    head = _git("rev-parse", "--short", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    this = f"{head}{' with uncommitted changes' if dirty else ''}"
    command = " ".join(["python -m benchmarks.loader_ab", *sys.argv[1:]])
    lines = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} with `{command}`: {base_rev} (base) "
        f"against {this} (this), {args.rounds} rounds of one process per version (each first "
        f"in turn), each the median of {args.epochs} epochs after a warm-up; the ratio is the "
        "median of the per-round ratios, with their range. CPU: the training process and its "
        "workers together. "
        + ("The workers build no images (--journey). " if args.journey else "")
        + "".join(
            f"The {name!r} loader has {json.dumps(extra)}. "
            for name, extra in options.items()
            if extra
        )
        + "Machine: {cpu}, {cores} cores.".format(**machine()),
        "",
        "| codec | figure | base | this | this / base (median of per-round ratios) |",
        "|---|---|---:|---:|---:|",
    ]
    with worktree(args.base, args.data) as base_tree:
        trees = {"base": base_tree, "this": REPO}
        for codec in args.codecs.split(","):
            records = args.data / "loader_ab" / f"records_{codec}"
            if not (records / "manifest.json").exists():
                Writer(data_list, records, db_num=8, codec=codec, progress=False).write()
            runs: dict[str, list[list[float]]] = {name: [] for name in trees}
            for r in range(args.rounds):
                for name in list(trees) if r % 2 == 0 else list(trees)[::-1]:
                    out = subprocess.run(
                        [
                            sys.executable,
                            "-c",
                            _ONE,
                            str(trees[name]),
                            str(records),
                            str(args.epochs),
                            "1" if args.journey else "0",
                            json.dumps(options[name]),
                        ],
                        check=True,
                        capture_output=True,
                        text=True,
                    ).stdout
                    runs[name].append(json.loads(out.strip().splitlines()[-1]))
                    print(codec, r, name, runs[name][-1], flush=True)
            for column, figure in enumerate(("images/s", "CPU ms an image")):
                base = [run[column] for run in runs["base"]]
                new = [run[column] for run in runs["this"]]
                ratios = [b / a for a, b in zip(base, new)]
                shown = "{:.0f}" if column == 0 else "{:.3f}"
                lines.append(
                    f"| {codec} | {figure} | {shown.format(statistics.median(base))} | "
                    f"{shown.format(statistics.median(new))} | "
                    f"{statistics.median(ratios):.2f} "
                    f"({min(ratios):.2f}-{max(ratios):.2f}) |"
                )
    args.out.mkdir(parents=True, exist_ok=True)
    report = "\n".join(lines) + "\n"
    name = args.name or f"loader_ab{'_journey' if args.journey else ''}"
    (args.out / f"{name}.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
