"""Another git revision of this repository, checked out beside it for an A/B run."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def git(*args: str) -> str:
    """A git command in this repository; its output."""
    done = subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True)
    return done.stdout.decode().strip()


@contextmanager
def worktree(revision: str, under: Path) -> Iterator[Path]:
    """``revision`` checked out in a temporary git worktree in ``under``, removed afterwards."""
    under.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=under) as scratch:
        where = Path(scratch) / "base"
        git("worktree", "add", "--detach", "-q", str(where), revision)
        try:
            yield where
        finally:
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(where)],
                check=False,
                capture_output=True,
            )


def absolute_list(data_list: Path, target: Path) -> Path:
    """``data_list`` (``relative/path label`` lines) written to ``target`` with absolute paths,
    for a process whose working directory is elsewhere."""
    root = data_list.parent.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("".join(f"{root / line}\n" for line in data_list.read_text().splitlines()))
    return target


def alternate(
    rounds: int,
    versions: dict[str, Path],
    code: Callable[[Path], str],
    shown: Callable[[list[float]], str],
) -> dict[str, list[list[float]]]:
    """Per round, ``code(checkout)`` in a fresh interpreter for each version (name: checkout),
    the order alternating from round to round; the JSON list each prints last, by version.
    Each result is printed as it comes, through ``shown``."""
    import json
    import sys

    results: dict[str, list[list[float]]] = {name: [] for name in versions}
    for r in range(rounds):
        order = list(versions.items())
        for name, checkout in order if r % 2 == 0 else order[::-1]:
            done = subprocess.run(
                [sys.executable, "-c", code(checkout)], capture_output=True, text=True, check=True
            )
            results[name].append(json.loads(done.stdout.splitlines()[-1]))
            print(f"round {r + 1} {name}: {shown(results[name][-1])}", flush=True)
    return results


def ratio_line(base: list[list[float]], this: list[list[float]], name: str) -> str:
    """The per-round ratios of the first figure (a time), base over this: median, range, and
    each round's."""
    import statistics

    ratios = [b[0] / t[0] for b, t in zip(base, this)]
    return (
        f"  {name} / this checkout, time per round: median {statistics.median(ratios):.2f} "
        f"({min(ratios):.2f}-{max(ratios):.2f}): {', '.join(f'{x:.2f}' for x in ratios)}"
    )
