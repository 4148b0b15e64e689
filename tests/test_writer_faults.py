"""Writer faults: a full disk, the file size limit, a tiny map. Clear errors, nothing published,
nothing already written lost, and the same write resumes."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest
from conftest import fingerprint, run_python

from torchrecord import TRDataset, Writer
from torchrecord.errors import DiskFullError
from torchrecord.reader import RecordReader, verify


def shard_hashes(out: Path) -> list[str]:
    return [s["sha256"] for s in json.loads((out / "manifest.json").read_text())["shards"]]


def content(out: Path) -> list[tuple[int, int]]:
    return [fingerprint(r) for r in TRDataset(out, transform=lambda r: r)]


def staged_files(out: Path) -> list[str]:
    """The shards (and done files) in staging: not its lock and its description."""
    return sorted(
        p.name
        for d in out.glob(".tmp-*")
        for p in d.iterdir()
        if p.name not in (".lock", "job.json")
    )


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("when", ["writing records", "creating the shard"])
def test_file_size_limit_is_a_disk_full_error_and_the_write_resumes(
    photos, tmp_path, when, workers
):
    reference = tmp_path / "reference"
    Writer(photos, reference, db_num=3, codec="raw_rgb", shuffle=False).write()
    sizes = [(reference / f"shard-{i:05d}.lmdb").stat().st_size for i in range(3)]
    # the first shard cannot be finished under the limit, or not even created (LMDB writes two
    # 4 KiB meta pages when it creates a file)
    limit = min(sizes) // 2 if when == "writing records" else 4096
    out = tmp_path / "records"
    result = run_python(
        f"""
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
from torchrecord import Writer
from torchrecord.errors import DiskFullError
try:
    Writer({str(photos)!r}, {str(out)!r}, db_num=3, codec="raw_rgb", num_workers={workers}).write()
except DiskFullError as exc:
    print("DiskFullError:", exc, "errno", exc.errno)
"""
    )
    assert result.returncode == 0, result.stderr
    assert "DiskFullError: disk full: the file size limit (ulimit -f)" in result.stdout
    assert "errno 27" in result.stdout  # EFBIG
    # with 2 workers, shards 0 and 1 are written at once: either may hit the limit first
    first = "shard-00000.lmdb" if workers == 0 else "shard-0000"
    assert f"of {limit:,} bytes was reached while writing {first}" in result.stdout
    assert "run the same write again" in result.stdout
    assert not (out / "manifest.json").exists()
    assert staged_files(out) == []  # the unfinished shard gave its space back
    Writer(photos, out, db_num=3, codec="raw_rgb", shuffle=False).write()
    assert shard_hashes(out) == shard_hashes(reference)
    assert content(out) == content(reference)


@pytest.fixture
def small_tmpfs(tmp_path):
    """Mount a small tmpfs (needs root; the file size limit test covers the rest without)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(args, capture_output=True, text=True)

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = run("mount", "-t", "tmpfs", "-o", "size=4m", f"tr-{uuid.uuid4().hex[:8]}", str(mount))
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")

    def resize(megabytes: int) -> None:
        done = run("mount", "-o", f"remount,size={megabytes}m", str(mount))
        assert done.returncode == 0, done.stderr

    try:
        yield mount, resize
    finally:
        run("umount", "-l", str(mount))


def test_a_full_disk_keeps_the_old_dataset_and_the_finished_shards(photos, tmp_path, small_tmpfs):
    mount, resize = small_tmpfs
    reference = tmp_path / "reference"
    Writer(photos, reference, db_num=4, codec="raw_rgb", shuffle=False).write()
    raw_total = sum(p.stat().st_size for p in reference.glob("shard-*.lmdb"))
    resize(max(4, (raw_total >> 20) + 8))
    out = mount / "records"
    Writer(photos, out, db_num=2, codec="jpeg", shuffle=False).write()
    old = content(out)
    used = os.statvfs(mount)
    room = used.f_bavail * used.f_frsize
    # room for the first shard or two of the new dataset, not for all four
    first = (reference / "shard-00000.lmdb").stat().st_size
    free_target = first + (raw_total - first) // 3
    filler = mount / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * (room - free_target))
    with pytest.raises(DiskFullError, match=r"disk full: the disk is full \(\d[\d,]* bytes free"):
        Writer(photos, out, db_num=4, codec="raw_rgb", overwrite=True, shuffle=False).write()
    # the old dataset is whole and unchanged; the new one is not published
    assert content(out) == old
    assert list(verify(RecordReader(out))) == []
    assert json.loads((out / "manifest.json").read_text())["codec"] == "jpeg"
    # the finished shards wait for the resume; the unfinished one gave its space back
    staged = staged_files(out)
    assert "shard-00000.lmdb" in staged and "shard-00000.lmdb.done" in staged
    assert all(name + ".done" in staged for name in staged if name.endswith(".lmdb"))
    # free space and run the same write again: it completes, equal to an uninterrupted one
    filler.unlink()
    Writer(photos, out, db_num=4, codec="raw_rgb", overwrite=True, shuffle=False).write()
    assert shard_hashes(out) == shard_hashes(reference)
    assert content(out) == content(reference)
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        *(f"shard-{i:05d}.lmdb" for i in range(4)),
    ]


def test_a_tiny_map_grows_and_keeps_every_record(photos, tmp_path, monkeypatch):
    import torchrecord.writer as writer

    reference = tmp_path / "reference"
    Writer(photos, reference, codec="raw_rgb", shuffle=False).write()
    # a map smaller than one record: every batch has to grow it, some more than once
    monkeypatch.setattr(writer, "_INITIAL_MAP_SIZE", 64 << 10)
    monkeypatch.setattr(writer, "_BATCH_RECORDS", 1)
    out = tmp_path / "records"
    Writer(photos, out, codec="raw_rgb", shuffle=False).write()
    assert content(out) == content(reference)
    assert len(content(out)) == 24
    assert list(verify(RecordReader(out))) == []
