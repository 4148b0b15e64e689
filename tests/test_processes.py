"""Processes around one dataset: a DataLoader worker killed mid-epoch, many readers at once, and
no file descriptors or LMDB environments leaked over 100 epochs or 100 short-lived readers.

Real shards, real worker processes, no mocks. Whatever could hang runs in a subprocess with a
timeout, so a hang fails the test instead of blocking pytest.
"""

from __future__ import annotations

import gc
import json
import os
import re
import signal
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from itertools import zip_longest
from pathlib import Path

import psutil
import pytest
from conftest import fingerprint, read_list, run_python

from torchrecord import TorchRecord, TRDataset, Writer
from torchrecord.environments import SHARED

NUM_SHARDS = 4
NUM_RECORDS = 24
EPOCHS = 100


@pytest.fixture(scope="module")
def records(photo_dir, tmp_path_factory) -> Path:
    """24 JPEG records in 4 shards, written once for this module (its tests only read them)."""
    out = tmp_path_factory.mktemp("process-records") / "records"
    Writer(photo_dir / "data_list.txt", out, db_num=NUM_SHARDS, codec="jpeg", shuffle=False).write()
    return out


@pytest.fixture(scope="module")
def expected(photo_dir) -> list[tuple[int, int]]:
    """Sorted fingerprints of the source files: what every epoch must yield, each once."""
    listed = read_list(photo_dir / "data_list.txt")
    return sorted((zlib.crc32(path.read_bytes()), label) for path, label in listed)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def shared_state() -> tuple[int, int]:
    """(LMDB environments held by this process's SHARED registry, their references in all)."""
    return len(SHARED.envs), sum(SHARED.refs.values())


def probe(record) -> tuple[int, int, int, int, int]:
    """A transform that reports, from the process that read the record: its fingerprint, that
    process's pid and its SHARED registry (environments, references)."""
    return (*fingerprint(record), os.getpid(), *shared_state())


def one_epoch(loader) -> list[tuple[int, ...]]:
    """Every sample of one epoch as a tuple of ints: no batch tensor survives, and so none of
    the file descriptors that carry tensors from worker processes."""
    return [tuple(int(x) for x in row) for batch in loader for row in zip(*batch)]


def worker_pids(loader) -> list[int]:
    """The persistent workers of a loader that has been iterated (the DataLoader's iterator)."""
    return sorted(w.pid for w in loader._iterator._workers)


def fds_at_most(limit: int, seconds: float = 2) -> int:
    """The number of open fds once it is at most limit, or after seconds. The pipes of a
    finished worker's queues are closed by their feeder threads, a moment after the epoch."""
    deadline = time.monotonic() + seconds
    while (n := open_fds()) > limit and time.monotonic() < deadline:
        time.sleep(0.01)
    return n


def worker_fd_counts(loader, settled=None, seconds: float = 2) -> list[tuple[int, int, int]]:
    """Per persistent worker: (its open fds other than batch buffers and shards, its batch
    buffers, its open shards). The buffers of its batch pool are shared segments it makes as it
    needs them (more when the training process holds more batches at once), up to the pool's
    slots; the shards it holds open vary with what it read last (block mode): both counted
    apart. With ``settled``, waits up to ``seconds`` for the other fds to come back to those
    counts (a segment just sent is closed a moment after the training process takes it)."""

    def counts() -> list[tuple[int, int, int]]:
        out = []
        for pid in worker_pids(loader):
            targets = []
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
                except OSError:  # closed meanwhile
                    pass
            buffers = sum(1 for t in targets if t.startswith("/dev/shm/torch_"))
            shards = sum(1 for t in targets if t.endswith(".lmdb"))
            out.append((len(targets) - buffers - shards, buffers, shards))
        return out

    deadline = time.monotonic() + seconds
    now = counts()
    while settled is not None and [c[0] for c in now] != [c[0] for c in settled]:
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
        now = counts()
    return now


def wait_gone(pids, seconds: float = 10) -> list[int]:
    """Wait until none of pids runs any more (a zombie counts as gone); those still running."""
    deadline = time.monotonic() + seconds
    while True:
        running = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    running.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not running or time.monotonic() > deadline:
            return running
        time.sleep(0.02)


# -- 1. a worker killed mid-epoch: the DataLoader's RuntimeError, not a hang ------------------

KILL_TIMEOUT = 90

# argv: dataset, "1" for persistent workers, "tensors" (default collate: tensors travel as
# file descriptors) or "lists" (plain lists travel by value)
KILL_SCRIPT = r"""
import gc, json, os, signal, sys, time, zlib

import psutil

from torchrecord import TorchRecord


def fingerprint(record):
    return zlib.crc32(record.protos[0].byte_data), int(record.protos[1].byte_data)


def as_lists(samples):
    return [[int(x) for x in column] for column in zip(*samples)]


def children():
    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                out.append(child.pid)
        except psutil.NoSuchProcess:
            pass
    return sorted(out)


records, persistent, batches, mode = sys.argv[1], sys.argv[2] == "1", sys.argv[3], sys.argv[4]
extra = {"collate_fn": as_lists} if batches == "lists" else {}
report = {}
loader = TorchRecord(
    records, shuffle=True, batch_size=2, num_workers=2, transform=fingerprint,
    persistent_workers=persistent, **extra,
)
it = iter(loader)
first = next(it)
seen = len(first[0])
workers = children()
report["workers"] = workers
if persistent:  # the DataLoader's own iterator, which the loader keeps between epochs
    report["iterator_workers"] = sorted(w.pid for w in loader._iterator._workers)
victim = workers[-1]
killed_at = time.monotonic()
try:
    os.kill(victim, signal.SIGKILL)
    if batches == "tensors" and mode != "immediate":
        # let the worker finish dying (torch's SIGCHLD handler raises in here when it has):
        # reading a batch the victim queued while it is being torn down fails in
        # multiprocessing.resource_sharer with ConnectionResetError instead
        while time.monotonic() - killed_at < 5:
            time.sleep(0.01)
    for crcs, labels in it:
        seen += len(crcs)
except RuntimeError as exc:
    report["error"] = str(exc)
report["seconds_to_error"] = time.monotonic() - killed_at
report["seen_before_error"] = seen
report["victim"] = victim

# the failed loader lets its other worker go, and a new loader reads the whole dataset
del it, loader, first
gc.collect()
deadline = time.monotonic() + 10
while children() and time.monotonic() < deadline:
    time.sleep(0.02)
report["children_left"] = children()
fresh = TorchRecord(records, batch_size=5, num_workers=2, transform=fingerprint)
report["after"] = sorted([int(c), int(l)] for crcs, labels in fresh for c, l in zip(crcs, labels))
print("REPORT " + json.dumps(report), flush=True)
"""


def run_script(script: str, *argv: str, timeout: float):
    """Run script with argv in a fresh interpreter; (parsed REPORT line, seconds, result)."""
    code = f"import sys\nsys.argv = {['script', *argv]!r}\n" + script
    start = time.monotonic()
    result = run_python(code, timeout=timeout)
    elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stderr[-4000:]
    lines = [x for x in result.stdout.splitlines() if x.startswith("REPORT ")]
    assert lines, result.stdout[-2000:] + result.stderr[-2000:]
    return json.loads(lines[-1][len("REPORT ") :]), elapsed, result


@pytest.mark.parametrize(
    "persistent, batches, mode",
    [
        (True, "tensors", "settled"),
        (False, "tensors", "settled"),
        (True, "lists", "settled"),
        (True, "tensors", "immediate"),
        (False, "tensors", "immediate"),
    ],
    ids=["persistent", "per-epoch", "persistent-list-batches", "read-at-once", "per-epoch-at-once"],
)
def test_killed_worker_raises_instead_of_hanging(records, expected, persistent, batches, mode):
    """ "settled": the main process reads on once PyTorch has seen the death; "immediate": at
    once, while the victim's queued batch is handed over (TorchRecord names the dead worker
    instead of multiprocessing's ConnectionResetError)."""
    report, elapsed, _ = run_script(
        KILL_SCRIPT,
        str(records),
        "1" if persistent else "0",
        batches,
        mode,
        timeout=KILL_TIMEOUT,
    )
    assert len(report["workers"]) == 2
    if persistent:
        assert report["iterator_workers"] == report["workers"]
    # torch names the dead worker: from its SIGCHLD handler, or from its own liveness check
    assert "error" in report, f"no error after a worker was killed: {report}"
    victim = report["victim"]
    assert re.fullmatch(
        rf"DataLoader worker \(pid {victim}\) is killed by signal: Killed\. ?"
        rf"|DataLoader worker \(pid\(s\) {victim}\) exited unexpectedly"
        r"( \(killed by signal 9\) while handing over a batch \(\w+Error: .*\))?",
        report["error"],
    ), report["error"]
    assert report["seconds_to_error"] < 10, report  # at once, not after a long timeout
    assert report["seen_before_error"] < NUM_RECORDS  # it was mid-epoch
    assert report["children_left"] == [], "the surviving worker was not shut down"
    assert [tuple(x) for x in report["after"]] == expected
    assert elapsed < KILL_TIMEOUT / 3, f"took {elapsed:.1f}s"


# argv: dataset. The batches of worker 0 (the first batch among them) cannot be unpickled
# (EOFError, as when the resource sharer of a dying worker hangs up) and worker 0 is SIGKILLed
# 0.3 s after its first: the main process sees the EOFError before PyTorch sees the death.
DYING_HANDOVER_SCRIPT = r"""
import json, os, signal, sys, threading

from torch.utils.data import get_worker_info

from torchrecord import TorchRecord


def hang_up():
    raise EOFError()


class Unreadable:
    def __reduce__(self):
        return hang_up, ()


def collate(samples):
    if get_worker_info().id == 0:
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGKILL)).start()
        return Unreadable()
    return samples


loader = TorchRecord(
    sys.argv[1], batch_size=2, num_workers=2, transform=lambda record: len(record.protos),
    persistent_workers=False, collate_fn=collate,
)
report = {"batches": 0}
try:
    for batch in loader:
        report["batches"] += 1
except RuntimeError as exc:
    report["error"] = str(exc)
print("REPORT " + json.dumps(report), flush=True)
"""


def test_worker_dying_while_its_batch_is_unpickled_is_named(records, tmp_path):
    """The EOFError of a batch whose worker is on its way down becomes a dead-worker error
    naming that worker, instead of a bare EOFError (seen once in CI)."""
    report, elapsed, _ = run_script(DYING_HANDOVER_SCRIPT, str(records), timeout=KILL_TIMEOUT)
    assert "error" in report, report
    # ours, or torch's own when its SIGCHLD handler fires while we wait for the death
    assert re.fullmatch(
        r"DataLoader worker \(pid\(s\) \d+\) exited unexpectedly \(killed by signal 9\) "
        r"while handing over a batch \(EOFError: \)"
        r"|DataLoader worker \(pid \d+\) is killed by signal: Killed\. ?",
        report["error"],
    ), report["error"]
    assert report["batches"] == 0  # the first batch was the unreadable one
    assert elapsed < KILL_TIMEOUT / 3, f"took {elapsed:.1f}s"


# -- 2. many readers of one dataset at once ---------------------------------------------------


FORKS_WHILE_READING = """
import json, os, sys, zlib
from concurrent.futures import ThreadPoolExecutor
from torchrecord import TRDataset

path, forking_threads, forks = sys.argv[1], int(sys.argv[2]), 30

def fingerprint(record):
    return zlib.crc32(record.protos[0].byte_data), int(record.protos[1].byte_data)

reader = TRDataset(path, transform=fingerprint)
reference = [reader[i] for i in range(len(reader))]
stop, errors, reads = False, [], [0]

def read_on():
    i = 0
    while not stop:
        try:
            assert reader[i % len(reference)] == reference[i % len(reference)]
            reads[0] += 1
        except Exception as exc:
            errors.append(repr(exc))
        i += 1

def fork_and_read():
    codes = []
    for n in range(forks):
        pid = os.fork()
        if pid == 0:  # the child reads through an environment of its own
            ok = False
            try:
                ok = reader[n % len(reference)] == reference[n % len(reference)]
            finally:
                os._exit(0 if ok else 3)
        codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    return codes

def open_and_read():  # new readers meanwhile: each opens the shards (0.1: opens databases)
    i = 0
    while not stop:
        try:
            assert TRDataset(path, transform=fingerprint)[i % len(reference)] == reference[
                i % len(reference)
            ]
        except Exception as exc:
            errors.append(repr(exc))
        i += 1

import _thread, threading
done = threading.Event()
def read_on_then_signal():
    try:
        read_on()
    finally:
        done.set()
_thread.start_new_thread(read_on_then_signal, ())  # a thread the threading module knows not
pool = ThreadPoolExecutor(max_workers=1 + forking_threads)
opening = pool.submit(open_and_read)
forkers = [pool.submit(fork_and_read) for _ in range(forking_threads)]
codes = [code for forker in forkers for code in forker.result()]
stop = True
opening.result()
done.wait()
print("REPORT " + json.dumps({"errors": errors[:3], "failed": len(errors), "reads": reads[0],
                              "codes": codes}), flush=True)
"""


@pytest.mark.parametrize("dataset", ["v2", "0.1"])
@pytest.mark.parametrize("forking_threads", [1, 2])
def test_a_thread_reads_on_while_other_threads_fork(
    records, legacy_fixture, dataset, forking_threads
):
    """Forks (loaders starting their workers, say) while an eval thread reads (one started
    with ``_thread``, unknown to ``threading``) and another opens new readers: no read meets a
    closed environment, forks from two threads take turns, and each child reads through
    environments of its own. A 0.1 dataset's reads nest (its keys are read through the shard
    too), and its readers open LMDB databases, which LMDB lets one transaction do at a time.
    In a subprocess: a deadlock fails the test by its timeout."""
    path = records if dataset == "v2" else legacy_fixture / "record"
    report, _, _ = run_script(FORKS_WHILE_READING, str(path), str(forking_threads), timeout=180)
    assert report["failed"] == 0, report["errors"]
    assert report["reads"] > 0 and report["codes"] == [0] * 30 * forking_threads


def test_three_loaders_interleaved_in_one_process(records, expected):
    parent = TRDataset(records, transform=fingerprint)
    reference = [parent[i] for i in range(NUM_RECORDS)]  # the parent holds shards before forks
    assert sorted(reference) == expected
    loaders = [
        TorchRecord(records, shuffle=False, batch_size=4, num_workers=2, transform=fingerprint),
        TorchRecord(
            records, shuffle=True, seed=1, batch_size=5, num_workers=2, transform=fingerprint
        ),
        TorchRecord(
            records,
            shuffle="block",
            block_shards=1,
            batch_size=3,
            num_workers=2,
            transform=fingerprint,
        ),
    ]
    orders = []
    for epoch in range(2):
        seen: list[list[tuple[int, int]]] = [[] for _ in loaders]
        for step, batches in enumerate(zip_longest(*loaders)):
            for out, batch in zip(seen, batches):
                if batch is not None:
                    out += [(int(c), int(label)) for c, label in zip(*batch)]
            # and the parent reads between the batches, through the same shared environments
            index = (7 * step + epoch) % NUM_RECORDS
            assert parent[index] == reference[index]
        for n, out in enumerate(seen):
            assert sorted(out) == expected, f"loader {n}, epoch {epoch}"
        assert seen[0] == reference  # no shuffle: dataset order
        orders.append(seen)
    assert orders[0][1] != orders[1][1]  # the shuffled loader moved to a new epoch
    pids = [pid for loader in loaders for pid in worker_pids(loader)]
    assert len(set(pids)) == 6 and wait_gone(pids, seconds=0) == pids  # persistent: alive
    del loaders
    gc.collect()
    assert wait_gone(pids) == [], "workers of dropped loaders still run"
    assert [parent[i] for i in range(NUM_RECORDS)] == reference


# argv: dataset, this reader's name, the other reader's name, barrier directory, num_workers
READER_SCRIPT = r"""
import json, sys, time, zlib
from pathlib import Path

from torchrecord import TorchRecord


def fingerprint(record):
    return zlib.crc32(record.protos[0].byte_data), int(record.protos[1].byte_data)


records, me, other, barriers, workers = sys.argv[1:6]
barriers = Path(barriers)


def barrier(tag):
    (barriers / f"{me}.{tag}").touch()
    deadline = time.monotonic() + 60
    while not (barriers / f"{other}.{tag}").exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"{other} never reached {tag}")
        time.sleep(0.005)


loader = TorchRecord(
    records, shuffle=True, seed=len(me), batch_size=4, num_workers=int(workers),
    transform=fingerprint,
)
epochs = []
barrier("start")
for epoch in range(3):
    rows = []
    for step, (crcs, labels) in enumerate(loader):
        rows += [[int(c), int(l)] for c, l in zip(crcs, labels)]
        if step == 1:  # both readers are in the middle of this epoch, with shards open
            barrier(f"epoch{epoch}")
    epochs.append(rows)
print("REPORT " + json.dumps({"epochs": epochs}), flush=True)
"""


def test_two_processes_read_one_dataset_at_once(records, expected, tmp_path):
    parent = TRDataset(records, transform=fingerprint)  # and this process reads meanwhile
    reference = [parent[i] for i in range(NUM_RECORDS)]
    runs = [("workers", "main", "2"), ("main", "workers", "0")]
    with ThreadPoolExecutor(len(runs)) as pool:
        futures = [
            pool.submit(
                run_script, READER_SCRIPT, str(records), me, other, str(tmp_path), n, timeout=120
            )
            for me, other, n in runs
        ]
        reads = 0
        while not all(f.done() for f in futures):
            index = reads % NUM_RECORDS
            assert parent[index] == reference[index]
            reads += 1
            time.sleep(0.005)  # leave the CPUs to the readers under test
        reports = [f.result()[0] for f in futures]
    assert reads >= NUM_RECORDS
    for report in reports:
        assert len(report["epochs"]) == 3
        for epoch in report["epochs"]:
            assert sorted(tuple(x) for x in epoch) == expected
        assert report["epochs"][0] != report["epochs"][1]  # shuffled anew each epoch


# -- 3. nothing leaks over 100 epochs or 100 short-lived readers ------------------------------

LOADER_PREFETCH = 2  # DataLoader's default prefetch_factor, which these loaders keep

LEAK_CASES = {
    # block mode with one shard per block, no item pool and no room past the bound: shards open
    # and close all the time
    "main-process": dict(
        num_workers=0, shuffle="block", block_shards=1, pool_size=0, keep_open_bytes=0
    ),
    "persistent-workers": dict(num_workers=2, shuffle=True),
    # past the bound (2), room for 3 of the 4 shards: workers keep 3 open and close one
    "persistent-workers-budget": dict(
        num_workers=2, shuffle="block", block_shards=1, pool_size=0, keep_open_bytes=3
    ),
    "per-epoch-worker": dict(num_workers=1, persistent_workers=False, shuffle=True),
}


@pytest.mark.parametrize("case", LEAK_CASES)
def test_no_leak_over_100_epochs(records, expected, case):
    kwargs = dict(LEAK_CASES[case])
    keep_open_bytes = kwargs.pop("keep_open_bytes", None)
    num_workers = kwargs["num_workers"]
    persistent = kwargs.get("persistent_workers", num_workers > 0)
    max_envs = 2 if kwargs["shuffle"] == "block" else NUM_SHARDS
    if keep_open_bytes:  # that many shards, the smallest
        sizes = sorted(p.stat().st_size for p in records.glob("shard-*.lmdb"))
        keep_open_bytes, max_envs = sum(sizes[:keep_open_bytes]), keep_open_bytes
    gc.collect()
    base_fds, (base_envs, base_refs) = open_fds(), shared_state()

    loader = TorchRecord(records, batch_size=5, transform=probe, **kwargs)
    if keep_open_bytes is not None:
        loader.dataset.reader.keep_open_bytes = keep_open_bytes
    main_fds, main_shared, worker_fds, readers = [], [], [], []
    for epoch in range(EPOCHS):
        rows = one_epoch(loader)
        assert sorted(row[:2] for row in rows) == expected, f"epoch {epoch}"
        pids = {row[2] for row in rows}
        readers.append(pids)
        for pid, envs, refs in {row[2:] for row in rows}:
            if pid == os.getpid():
                envs, refs = envs - base_envs, refs - base_refs
            # one environment per open shard, and each held once, in every reading process
            assert 1 <= envs <= max_envs and refs == envs, (epoch, pid, envs, refs)
        # after the first couple of epochs, no growth (a leak of one fd per epoch adds 98)
        main_fds.append(fds_at_most(max(main_fds[:2])) if epoch >= 2 else open_fds())
        main_shared.append(shared_state())
        if persistent:
            worker_fds.append(worker_fd_counts(loader, worker_fds[1] if epoch >= 2 else None))

    if num_workers == 0:
        assert all(pids == {os.getpid()} for pids in readers)
    elif persistent:
        assert all(pids == readers[0] for pids in readers) and len(readers[0]) == num_workers
        assert sorted(readers[0]) == worker_pids(loader)
    else:  # a new worker every epoch
        assert len(set().union(*readers)) == EPOCHS
    assert max(main_fds[2:]) <= max(main_fds[:2]), main_fds
    assert max(main_shared[2:]) <= max(main_shared[:2]), main_shared
    if num_workers:  # the parent never opens a shard: its workers do
        assert set(main_shared) == {(base_envs, base_refs)}
    if worker_fds:  # idle persistent workers, between epochs: epoch 2 against epoch 100
        assert [c[0] for c in worker_fds[-1]] == [c[0] for c in worker_fds[1]], worker_fds
        # shared segments: the batches a worker has made and the training process has not
        # taken yet, or its pool's batch buffers, which it makes as it needs them: at most
        # prefetch_factor + 2 (the pool's slots) either way
        bound = LOADER_PREFETCH + 2
        assert all(c[1] <= bound for counts in worker_fds for c in counts), (bound, worker_fds)
        # shards: each worker holds one open at least, and no more than the reader may
        assert all(1 <= c[2] <= max_envs for counts in worker_fds for c in counts), worker_fds

    pids = worker_pids(loader) if persistent else []
    del loader
    gc.collect()
    assert wait_gone(pids) == []
    assert (fds_at_most(base_fds), shared_state()) == (base_fds, (base_envs, base_refs))


def test_readers_created_and_dropped_leave_nothing_behind(records, expected):
    reference = [fingerprint(TRDataset(records, transform=None)[i]) for i in range(NUM_RECORDS)]
    assert sorted(reference) == expected
    # once per process, torch sets up what a DataLoader with workers needs: not a leak
    warm = TorchRecord(records, batch_size=8, num_workers=2, transform=fingerprint, shuffle=False)
    assert sorted(one_epoch(warm)) == expected
    warm_pids = worker_pids(warm)
    del warm
    gc.collect()
    assert wait_gone(warm_pids) == []
    time.sleep(0.2)  # the feeder threads of its queues close their pipes
    base_fds, base_shared = open_fds(), shared_state()

    for i in range(EPOCHS):
        dataset = TRDataset(records, transform=fingerprint)
        firsts = [int(o) for o in dataset.reader.offsets[:-1]]  # one record in every shard
        k = i % (NUM_RECORDS // NUM_SHARDS)
        assert [dataset[j + k] for j in firsts] == [reference[j + k] for j in firsts]
        assert shared_state() == (base_shared[0] + NUM_SHARDS, base_shared[1] + NUM_SHARDS)
        loader = TorchRecord(records, shuffle=True, seed=i, batch_size=8, transform=fingerprint)
        assert sorted(one_epoch(loader)) == expected
        # two readers of one path share one environment per shard
        assert shared_state() == (base_shared[0] + NUM_SHARDS, base_shared[1] + 2 * NUM_SHARDS)
        del dataset, loader  # closed when dropped, not at the next garbage collection
        assert shared_state() == base_shared, f"round {i}"
    assert open_fds() == base_fds

    pids = []
    for i in range(10):  # loaders with persistent workers
        loader = TorchRecord(
            records, seed=i, batch_size=8, num_workers=2, transform=fingerprint, shuffle=False
        )
        assert sorted(one_epoch(loader)) == expected
        pids += worker_pids(loader)
        del loader
    gc.collect()
    assert wait_gone(pids) == [] and len(set(pids)) == 20
    assert (fds_at_most(base_fds), shared_state()) == (base_fds, base_shared)


def test_legacy_readers_created_and_dropped_leave_nothing_behind(legacy_fixture):
    """The same for a TorchRecord 0.1 dataset, whose manifest is read from its LMDB file."""
    record = legacy_fixture / "record"
    labels = [
        int(line.rsplit(" ", 1)[1])
        for line in (legacy_fixture / "data_list.txt").read_text().splitlines()
    ]
    gc.collect()
    base_fds, base_shared = open_fds(), shared_state()
    states = []
    try:
        for i in range(EPOCHS):
            dataset = TRDataset(record, transform=None)
            for index in (i % 20, 20 + i % 20):  # one record in each sub-database
                assert int(dataset[index].protos[1].byte_data) == labels[index]
            del dataset
            states.append(shared_state())
        fds = open_fds()
    finally:
        SHARED.close_all()  # whatever leaked, later tests start clean
    leaked = [i for i, state in enumerate(states) if state != base_shared]
    assert not leaked, (
        f"(environments, references) held by SHARED: {base_shared} before, {states[0]} after "
        f"one dataset was dropped, {states[-1]} after {EPOCHS}"
    )
    assert fds == base_fds


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_workers_leave_with_a_training_process_killed_by_sigkill(records, tmp_path, method):
    """A training process killed with SIGKILL (an OOM kill, a `kill -9` restart) takes its
    loader's workers with it. Under forkserver they are children of the fork server, which
    lives on, so PyTorch's own watch (the parent's pid) never fires: they used to run on,
    hundreds of MB each."""
    script = tmp_path / "trainer.py"
    script.write_text(
        f"""
import json, os, signal
from torchrecord import TorchRecord

if __name__ == "__main__":
    loader = TorchRecord({str(records)!r}, batch_size=2, num_workers=2,
                         multiprocessing_context={method!r})
    it = iter(loader)
    next(it)
    print(json.dumps(sorted(w.pid for w in loader._iterator._workers)), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""
    )
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    workers = json.loads(proc.stdout.splitlines()[-1])
    assert len(workers) == 2

    def alive(pid):
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + 30
    while any(map(alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid in workers if alive(pid)]
    for pid in left:  # (so that a failure leaves nothing running)
        os.kill(pid, signal.SIGKILL)
    assert left == []
