"""Source readahead: the kernel reads the coming source files a window ahead of the encoder.

Observed in the real page cache: files are evicted (``POSIX_FADV_DONTNEED``), and ``mincore``
says which of their pages are in memory."""

from __future__ import annotations

import ctypes
import json
import mmap
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from torchrecord import TRDataset, Writer
from torchrecord import readahead as ra
from torchrecord import writer as writer_module

pytestmark = pytest.mark.skipif(
    not (ra.available() and sys.platform.startswith("linux")), reason="Linux page cache only"
)


def _resident(path: Path) -> float:
    """Share of the file's pages in the page cache (mincore), without reading any of them."""
    libc = ctypes.CDLL(None, use_errno=True)
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        try:
            vec = (ctypes.c_ubyte * pages)()
            start = ctypes.c_char.from_buffer(mapping)
            rc = libc.mincore(ctypes.c_void_p(ctypes.addressof(start)), ctypes.c_size_t(size), vec)
            del start
            assert rc == 0, os.strerror(ctypes.get_errno())
            return sum(v & 1 for v in vec) / pages
        finally:
            mapping.close()


def _evict(paths: list[Path]) -> None:
    os.sync()  # (dirty pages cannot be dropped)
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    if any(_resident(p) for p in paths):
        pytest.skip("this file system keeps evicted pages (tmpfs?): nothing to read ahead")


def _wait_resident(paths: list[Path], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(_resident(p) == 1.0 for p in paths):
        assert time.monotonic() < deadline, [p.name for p in paths if _resident(p) < 1.0][:5]
        time.sleep(0.02)


@pytest.fixture
def many_photos(photo_dir, tmp_path) -> list[Path]:
    """300 JPEG files (the 24 photos over and over, under names of their own), not cached."""
    photos = sorted(photo_dir.rglob("*.jpg"))
    out = tmp_path / "many"
    out.mkdir()
    paths = []
    for i in range(300):
        path = out / f"{i:04d}.jpg"
        shutil.copyfile(photos[i % len(photos)], path)
        paths.append(path)
    _evict(paths)
    return paths


def test_reads_a_window_ahead_of_the_encoder_and_no_further(many_photos, tmp_path):
    fifo = tmp_path / "a-fifo"
    os.mkfifo(fifo)  # a data list may name anything: it must never be opened
    writer = threading.Thread(target=_open_for_writing, args=(fifo,), daemon=True)
    writer.start()  # blocks until someone opens the FIFO for reading
    paths = [fifo, *many_photos]  # position k + 1 is many_photos[k]
    ahead = ra.SourceReadahead(paths, window=64, burst=16).start()
    try:
        assert ahead._helper is not None
        _wait_resident(many_photos[:63])  # positions 1..63: the first window
        time.sleep(0.3)
        assert not any(_resident(p) for p in many_photos[63:])
        # the encoder jumps to position 150: the files it passed are not read any more,
        # the next window is
        ahead.advance(150)
        _wait_resident(many_photos[149:213])
        time.sleep(0.3)
        assert not any(_resident(p) for p in many_photos[63:149])
        assert not any(_resident(p) for p in many_photos[213:])
        helper = ahead._helper
    finally:
        ahead.close()
    assert helper.returncode is not None  # ended and reaped
    assert writer.is_alive()  # nobody opened the FIFO
    os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))  # (lets the thread go)
    writer.join(10)


def _open_for_writing(path: Path) -> None:
    try:
        with open(path, "wb"):
            pass
    except OSError:
        pass


def test_probe_tells_the_page_cache_apart_and_opens_regular_files_only(many_photos, tmp_path):
    on_disk, cached = many_photos[0], many_photos[1]
    cached.read_bytes()
    assert ra._cached(on_disk) is False
    assert _resident(on_disk) == 0  # the probe read nothing
    assert ra._cached(cached) is True
    empty = tmp_path / "empty.jpg"
    empty.touch()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for cannot_tell in (empty, fifo, tmp_path, tmp_path / "missing.jpg"):
        assert ra._cached(cannot_tell) is None
    # a window with nothing but such files (and cached ones) starts no helper
    paths = [empty, fifo, tmp_path, cached] * 64
    with ra.SourceReadahead(paths, window=16).start() as ahead:
        assert ahead._helper is None


def test_a_helper_that_cannot_start_is_not_tried_again(many_photos, monkeypatch):
    import subprocess

    calls = []
    real_popen = subprocess.Popen

    def counting_popen(*args, **kwargs):
        calls.append(args)
        return real_popen(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", counting_popen)
    monkeypatch.setattr(sys, "executable", str(many_photos[0].parent / "no-such-python"))
    with ra.SourceReadahead(many_photos, window=16).start() as ahead:
        for _ in range(20):
            ahead.advance(10)  # each chunk the worker pool is given starts it again
            ahead.start()
        assert ahead._helper is None
    assert len(calls) == 1


def test_starts_once_a_coming_file_is_not_in_the_page_cache(many_photos, monkeypatch):
    monkeypatch.setattr(ra, "PROBE_EVERY", 32)
    for path in many_photos[:150]:
        path.read_bytes()  # the first 150 files are in the page cache, the others on disk
    ahead = ra.SourceReadahead(many_photos, window=64, burst=16).start()
    try:
        for _ in range(2):
            ahead.advance(40)
            assert ahead._helper is None  # probes at 0, 40 and 80 found their windows cached
        ahead.advance(40)  # the window from 120 reaches files on disk
        assert ahead._helper is not None
        _wait_resident(many_photos[150:184])
        time.sleep(0.3)
        assert not any(_resident(p) for p in many_photos[184:])
    finally:
        ahead.close()


def test_small_sets_of_files_start_no_helper(many_photos):
    few = many_photos[: ra.MIN_FILES - 1]
    with ra.SourceReadahead(few).start() as ahead:
        assert ahead._helper is None
        ahead.advance(10)
        assert ahead._helper is None
    assert not any(_resident(p) for p in few[10:])


def test_helper_ends_when_the_writer_is_killed(many_photos, tmp_path):
    listing = tmp_path / "paths.json"
    listing.write_text(json.dumps([str(p) for p in many_photos]))
    code = f"""
import json, sys, time
from torchrecord.readahead import SourceReadahead
paths = json.load(open({str(listing)!r}))
ahead = SourceReadahead(paths, window=16).start()
print(ahead._helper.pid, flush=True)
time.sleep(60)
"""
    import subprocess

    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        helper = int(proc.stdout.readline())
        assert _alive(helper)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 10
        while _alive(helper):
            assert time.monotonic() < deadline, "the helper outlived the killed writer"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its new parent to reap it has ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


class _Spy(ra.SourceReadahead):
    """The real readahead, which also notes in a file (worker processes write there too) what
    it was given and whether its helper ran."""

    log: Path

    def __init__(self, paths, *args, **kwargs):
        self.given = [str(p) for p in paths]
        super().__init__(paths, *args, **kwargs)

    def close(self) -> None:
        helper = self._helper
        kept = helper is not None and helper is ra._kept_helper()
        super().close()
        with open(self.log, "a") as f:
            row = {
                "paths": self.given,
                "taken": self.taken,
                "helper": helper is not None,
                "pid": helper.pid if helper is not None else None,
                "kept": kept,
                "reaped": helper is None or helper.returncode is not None,
            }
            f.write(json.dumps(row) + "\n")


@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("source", ["on disk", "cached"])
def test_writes_read_their_sources_ahead_in_write_order(
    many_photos, tmp_path, monkeypatch, workers, source
):
    """0: one process; 1: a pool of encoders, read ahead by the writing process; 2: shard
    workers, each reading its shards ahead (4 shards: a worker keeps its helper for the next)."""
    if workers == 2 and multiprocessing.get_start_method() != "fork":
        pytest.skip("the spy reaches shard workers through fork")
    monkeypatch.setattr(ra, "MIN_FILES", 32)  # (shards of 70 files read ahead too)
    shards = 4 if workers == 2 else 2
    log = tmp_path / "readahead.jsonl"
    monkeypatch.setattr(_Spy, "log", log, raising=False)
    monkeypatch.setattr(writer_module, "SourceReadahead", _Spy)
    data_list = tmp_path / "list.txt"
    data_list.write_text("".join(f"{p} {i % 5}\n" for i, p in enumerate(many_photos[:280])))
    if source == "cached":
        for path in many_photos:
            path.read_bytes()
    out = tmp_path / f"out{workers}"
    Writer(
        data_list,
        out,
        db_num=shards,
        shuffle=True,
        codec="jpeg",
        num_workers=workers,
        progress=False,
    ).write()
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    # one readahead per encoding loop: the whole write in one process, each shard in a worker;
    # its helper ran only when the sources were on disk
    assert len(rows) == (shards if workers == 2 else 1)
    assert [row["helper"] for row in rows] == [source == "on disk"] * len(rows)
    pids = {row["pid"] for row in rows if row["helper"]}
    if workers == 2:  # kept by each worker for its next shard, ended when the worker exits
        assert all(row["kept"] for row in rows if row["helper"])
        assert len(pids) <= 2
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in pids):
            assert time.monotonic() < deadline, "a kept helper outlived its worker"
            time.sleep(0.05)
    else:  # the writing process ends its helper with the loop
        assert not any(row["kept"] for row in rows)
        assert all(row["reaped"] for row in rows)
    assert all(row["taken"] == len(row["paths"]) for row in rows)  # (pool: handed to workers)
    # each loop was given its sources in the order it wrote them: its shard's records
    dataset = TRDataset(out, transform=None)
    written = [bytes(dataset[i].protos[0].byte_data) for i in range(len(dataset))]
    per_shard = [written] if workers < 2 else [written[k : k + 70] for k in range(0, 280, 70)]
    given = [tuple(Path(p).read_bytes() for p in row["paths"]) for row in rows]
    assert sorted(given) == sorted(map(tuple, per_shard))
    assert sorted(map(str, many_photos[:280])) == sorted(p for row in rows for p in row["paths"])


@pytest.mark.parametrize("workers", [0, 2])
def test_readahead_can_be_turned_off(many_photos, tmp_path, monkeypatch, workers):
    if workers == 2 and multiprocessing.get_start_method() != "fork":
        pytest.skip("the spy reaches shard workers through fork")
    log = tmp_path / "readahead.jsonl"
    monkeypatch.setattr(_Spy, "log", log, raising=False)
    monkeypatch.setattr(writer_module, "SourceReadahead", _Spy)
    data_list = tmp_path / "list.txt"
    data_list.write_text("".join(f"{p} 0\n" for p in many_photos))
    Writer(
        data_list,
        tmp_path / "out",
        db_num=2,
        codec="jpeg",
        num_workers=workers,
        progress=False,
        readahead=False,
        shuffle=False,
    ).write()
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(rows) == (2 if workers == 2 else 1)
    assert not any(row["helper"] for row in rows)  # (the sources were on disk)
