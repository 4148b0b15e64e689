"""The Writer: 0.1's signature, data lists, sharding, determinism, errors and atomic publish."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from conftest import read_list
from PIL import Image

from torchrecord import DataListError, DatasetExistsError, RecordReader, TRDataset, Writer
from torchrecord import default_data_process_func as seed_func


def all_bytes(path) -> list[bytes]:
    reader = RecordReader(path)
    try:
        return [reader.read_bytes(i) for i in range(len(reader))]
    finally:
        reader.close()


def test_seed_signature_positional(photos, tmp_path):
    out = tmp_path / "records"
    manifest = Writer(str(photos), str(out), 4, True, seed_func).write()
    assert manifest.codec == "raw_rgb" and manifest.serializer == "tensorprotos"
    assert [s.num_records for s in manifest.shards] == [6, 6, 6, 6]
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        *[f"shard-0000{i}.lmdb" for i in range(4)],
    ]
    # shuffled at write time: every line once, not in list order
    labels = [int(TRDataset(out, transform=None)[i].protos[1].byte_data) for i in range(24)]
    assert sorted(labels) == sorted(label for _, label in read_list(photos))


def test_unequal_split_is_contiguous(photos, tmp_path):
    manifest = Writer(photos, tmp_path / "r", db_num=5, shuffle=False).write()
    assert [s.num_records for s in manifest.shards] == [5, 5, 5, 5, 4]
    dataset = TRDataset(tmp_path / "r", transform=None)
    expected = [label for _, label in read_list(photos)]
    assert [int(dataset[i].protos[1].byte_data) for i in range(24)] == expected


@pytest.mark.parametrize("codec", ["raw_rgb", "jpeg"])
def test_output_is_identical_for_any_num_workers(photos, tmp_path, codec):
    """0 and 1 workers: one process writes; 2 and 3: each shard in its own worker process."""
    outs, hashes = [], []
    for workers in (0, 1, 2, 3):
        out = tmp_path / f"w{workers}"
        manifest = Writer(
            photos, out, db_num=3, shuffle=True, seed=11, codec=codec, num_workers=workers
        ).write()
        outs.append(all_bytes(out))
        hashes.append([s.sha256 for s in manifest.shards])
        assert sorted(p.name for p in out.iterdir()) == [
            "manifest.json",
            "shard-00000.lmdb",
            "shard-00001.lmdb",
            "shard-00002.lmdb",
        ]
    assert outs[0] == outs[1] == outs[2] == outs[3]
    assert len(outs[0]) == 24
    assert hashes[0] == hashes[1] == hashes[2] == hashes[3]  # the shard files, byte for byte


def _many(photos, tmp_path, missing: tuple[int, ...] = ()) -> os.PathLike:
    """A data list of the photos 8 times over (192 samples: a chunk of a 2-worker write holds
    12), the samples at ``missing`` (0-based) naming files that do not exist."""
    lines = [f"{path} {label}\n" for path, label in read_list(photos) * 8]
    for i in missing:
        lines[i] = f"{tmp_path / f'gone-{i}.jpg'} 0\n"
    many = tmp_path / "many.txt"
    many.write_text("".join(lines))
    return many


def _forked() -> bool:
    import multiprocessing

    return multiprocessing.get_start_method() == "fork"


@pytest.mark.parametrize("slot_bytes", [16 << 20, 2_000_000])
def test_encode_workers_hand_records_over_in_shared_memory(
    photos, tmp_path, monkeypatch, slot_bytes
):
    """Into one shard, workers encode and this process writes: records come back in shared
    memory where they fit in their chunk's slot, the others through the pool's pipe (with
    slots of 2 MB, a chunk of 12 records of raw pixels fits 4 or so), and the shard is the one
    a write in one process makes, byte for byte."""
    from torchrecord import writer

    monkeypatch.setattr(writer, "_SLOT_BYTES", slot_bytes)  # (forked workers inherit it)
    many = _many(photos, tmp_path)
    one = Writer(many, tmp_path / "one", codec="raw_rgb", seed=3).write()
    parallel = Writer(many, tmp_path / "two", codec="raw_rgb", seed=3, num_workers=2)
    two = parallel.write()
    assert [s.sha256 for s in two.shards] == [s.sha256 for s in one.shards]
    records = all_bytes(tmp_path / "two")
    assert len(records) == 192 and records == all_bytes(tmp_path / "one")
    if not _forked():  # (workers started otherwise inherit no shared memory: the pipe)
        assert parallel.records_handed_over == 0
    elif slot_bytes > 12 * max(len(r) for r in records):
        assert parallel.records_handed_over == 192
    else:
        assert 0 < parallel.records_handed_over < 192


def test_shared_memory_handover_with_skipped_and_bad_samples(photos, tmp_path, monkeypatch):
    """Slots that mix records with skipped samples, and a bad sample after records already in
    its chunk's slot: the same shards, skip report and error as a write in one process."""
    from torchrecord import writer

    monkeypatch.setattr(writer, "_SLOT_BYTES", 2_000_000)
    many = _many(photos, tmp_path, missing=(4, 5, 29, 99, 100, 101))
    kwargs = dict(codec="raw_rgb", seed=3, shuffle=False, on_error="skip")
    one = Writer(many, tmp_path / "one", **kwargs).write()
    parallel = Writer(many, tmp_path / "two", num_workers=2, **kwargs)
    two = parallel.write()
    assert [s.sha256 for s in two.shards] == [s.sha256 for s in one.shards]
    assert sum(s.num_records for s in two.shards) == 186
    report = (tmp_path / "one" / "skipped.tsv").read_text()
    assert report == (tmp_path / "two" / "skipped.tsv").read_text() and "gone-100.jpg" in report
    assert parallel.records_handed_over > 0 or not _forked()

    # a bad line in the middle of a chunk stops both writes at it; the shards finished
    # before it are kept, the same in both
    bad = _many(photos, tmp_path, missing=(29,))
    third = 60 * 1024 * 768  # (a few shards before line 30)
    errors = []
    for name, workers in (("bad-one", 0), ("bad-two", 2)):
        with pytest.raises(DataListError) as info:
            Writer(
                bad,
                tmp_path / name,
                codec="raw_rgb",
                shuffle=False,
                num_workers=workers,
                bytes_per_shard=third // 16,
            ).write()
        errors.append((info.value.line_no, str(info.value).replace(name, "")))
        staged = sorted(p for p in (tmp_path / name).rglob("shard-*.lmdb"))
        errors.append([(p.name, p.read_bytes()) for p in staged])
    assert errors[0][0] == 30 and errors[0] == errors[2]
    assert errors[1] and errors[1] == errors[3]


def test_shared_memory_that_cannot_be_mapped_falls_back_to_the_pipe(photos, tmp_path, monkeypatch):
    """Slots too large for this machine's address space (a stand-in for a process limit):
    the mapping is refused for real, and the write goes through the pipe, as before."""
    from torchrecord import writer

    monkeypatch.setattr(writer, "_SLOT_BYTES", 1 << 45)  # 8 slots of 32 TiB: 256 TiB
    monkeypatch.setattr(writer, "_HANDOVER_BYTES", 1 << 48)
    many = _many(photos, tmp_path)
    one = Writer(many, tmp_path / "one", codec="jpeg", seed=3).write()
    parallel = Writer(many, tmp_path / "two", codec="jpeg", seed=3, num_workers=2)
    assert [s.sha256 for s in parallel.write().shards] == [s.sha256 for s in one.shards]
    assert parallel.records_handed_over == 0


def test_shuffle_depends_on_seed_only(photos, tmp_path):
    a = all_bytes(
        Writer(photos, tmp_path / "a", shuffle=True, seed=1, codec="jpeg").write()
        and tmp_path / "a"
    )
    b = all_bytes(
        Writer(photos, tmp_path / "b", shuffle=True, seed=1, codec="jpeg").write()
        and tmp_path / "b"
    )
    c = all_bytes(
        Writer(photos, tmp_path / "c", shuffle=True, seed=2, codec="jpeg").write()
        and tmp_path / "c"
    )
    assert a == b and a != c and sorted(a) == sorted(c)


def test_paths_with_spaces_csv_and_root(photos, tmp_path):
    samples = read_list(photos)
    spaced = tmp_path / "my photos" / "a b.jpg"
    spaced.parent.mkdir()
    shutil.copy(samples[0][0], spaced)
    txt = tmp_path / "list.txt"
    txt.write_text(f"my photos/a b.jpg 3\n\n{samples[1][0]} 4\n")  # blank line ignored
    dataset = TRDataset(
        Writer(txt, tmp_path / "t", codec="jpeg", shuffle=False).write() and tmp_path / "t",
        transform=None,
    )
    assert [dataset[i].protos[0].byte_data for i in range(2)] == [
        spaced.read_bytes(),
        samples[1][0].read_bytes(),
    ]
    assert [int(dataset[i].protos[1].byte_data) for i in range(2)] == [3, 4]

    csv_list = tmp_path / "lists" / "train.csv"
    csv_list.parent.mkdir()
    csv_list.write_text('path,label\n"my photos/a b.jpg",5\n')
    Writer(csv_list, tmp_path / "c", codec="jpeg", root=tmp_path, shuffle=False).write()
    record = TRDataset(tmp_path / "c", transform=None)[0]
    assert record.protos[0].byte_data == spaced.read_bytes()
    assert int(record.protos[1].byte_data) == 5


def _break_line(photos, line_no, new_text):
    lines = photos.read_text().splitlines()
    lines[line_no - 1] = new_text
    photos.write_text("\n".join(lines) + "\n")


def _text_file_as_image(photos, line_no):
    (photos.parent / "notes.jpg").write_text("hello, I am text")
    _break_line(photos, line_no, "notes.jpg 1")


@pytest.mark.parametrize(
    ("make_bad", "expected"),
    [
        (
            lambda p: _break_line(p, 7, "missing/nowhere.jpg 2"),
            r"data_list\.txt:7: file .*"
            r"nowhere\.jpg does not exist",
        ),
        (
            lambda p: _break_line(p, 3, p.read_text().splitlines()[2].rsplit(" ", 1)[0]),
            r"data_list\.txt:3: missing label",
        ),
        (
            lambda p: _text_file_as_image(p, 5),
            r"data_list\.txt:5: (cannot encode .*notes\.jpg \(not an image Pillow can read\)"
            r"|.*notes\.jpg is not a JPEG file)",  # (raw_rgb | jpeg)
        ),
        (
            lambda p: _break_line(p, 4, "000.class_000 1"),
            r"data_list\.txt:4: file .* is a "
            r"directory",
        ),
    ],
    ids=["missing-file", "missing-label", "not-an-image", "directory"],
)
@pytest.mark.parametrize(
    ("codec", "num_workers"), [("raw_rgb", 0), ("raw_rgb", 2), ("jpeg", 0), ("jpeg", 2)]
)
def test_bad_line_names_list_and_line(photos, tmp_path, make_bad, expected, codec, num_workers):
    make_bad(photos)
    out = tmp_path / "out"
    with pytest.raises(DataListError, match=expected) as info:
        Writer(photos, out, db_num=2, codec=codec, num_workers=num_workers, shuffle=False).write()
    assert info.value.data_list == str(photos)
    # nothing published; a shard finished before the bad line is kept for the fixed rerun,
    # and the error says so; without one, not even the directory it created is left
    assert not (out / "manifest.json").exists()
    kept = list(out.glob(".tmp-*/shard-*.done")) if out.exists() else []
    assert ("finished so far are kept" in str(info.value)) == bool(kept)
    if not kept:
        assert not out.exists()


def test_truncated_image_names_line(photos, tmp_path):
    path = read_list(photos)[9][0]
    data = path.read_bytes()
    path.write_bytes(data[:200])
    with pytest.raises(DataListError, match=r"data_list\.txt:10: cannot encode"):
        Writer(photos, tmp_path / "out", shuffle=False).write()


def test_empty_and_missing_list(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataListError, match="empty.txt: the data list is empty"):
        Writer(empty, tmp_path / "o", shuffle=False).write()
    with pytest.raises(DataListError, match="nothere.txt: the data list does not exist"):
        Writer(tmp_path / "nothere.txt", tmp_path / "o", shuffle=False).write()


def test_refuses_to_overwrite_and_keeps_the_old_dataset(photos, tmp_path):
    out = tmp_path / "records"
    Writer(photos, out, codec="jpeg", shuffle=False).write()
    before = all_bytes(out)
    with pytest.raises(DatasetExistsError, match="overwrite=True"):
        Writer(photos, out, codec="raw_rgb", shuffle=False).write()
    assert all_bytes(out) == before

    # a failing overwrite leaves the old dataset readable and unchanged
    _break_line(photos, 20, "gone.jpg 1")
    with pytest.raises(DataListError):
        Writer(photos, out, overwrite=True, shuffle=False).write()
    assert all_bytes(out) == before
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_overwrite_replaces_every_shard(photos, tmp_path):
    out = tmp_path / "records"
    Writer(photos, out, db_num=4, codec="jpeg", shuffle=False).write()
    Writer(photos, out, db_num=2, codec="raw_rgb", overwrite=True, shuffle=False).write()
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "shard-00000.lmdb",
        "shard-00001.lmdb",
    ]
    dataset = TRDataset(out, transform=None)
    assert dataset.codec == "raw_rgb" and len(dataset) == 24
    path, _ = read_list(photos)[0]
    with Image.open(path) as img:
        assert dataset[0].protos[0].byte_data == img.convert("RGB").tobytes()


def test_refuses_bad_arguments(photos, tmp_path):
    with pytest.raises(ValueError, match="db_num=25 is more than the 24 samples"):
        Writer(photos, tmp_path / "o", db_num=25, shuffle=False).write()
    with pytest.raises(ValueError, match="db_num must be at least 1"):
        Writer(photos, tmp_path / "o", db_num=0, shuffle=False)
    with pytest.raises(ValueError, match="either a codec or a custom data_process_func"):
        Writer(
            photos, tmp_path / "o", codec="jpeg", data_process_func=lambda line: None, shuffle=False
        )
    assert not (tmp_path / "o").exists()


def test_shards_are_readable_from_a_read_only_directory(photos, tmp_path):
    out = tmp_path / "records"
    Writer(photos, out, db_num=2, shuffle=False).write()
    os.chmod(out, 0o555)
    try:
        # no lock file is created next to the shards
        assert len(all_bytes(out)) == 24
        assert sorted(p.name for p in out.iterdir()) == [
            "manifest.json",
            "shard-00000.lmdb",
            "shard-00001.lmdb",
        ]
    finally:
        os.chmod(out, 0o755)


def _without_read_override():
    """Root reads any file: drop the two capabilities that let it, for the exec'd process."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            os._exit(77)  # not allowed here: the test skips


def test_unreadable_file_names_list_and_line(photos, tmp_path):
    """A file without read permission names its line (also when the tests run as root)."""
    import subprocess
    import sys

    locked = read_list(photos)[3][0]
    locked.chmod(0o000)
    out = tmp_path / "out"
    code = (
        "from torchrecord import Writer, DataListError\n"
        "try:\n"
        f"    Writer({str(photos)!r}, {str(out)!r}, db_num=2).write()\n"
        "except DataListError as exc:\n"
        "    print('ERROR', exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_without_read_override if os.geteuid() == 0 else None,
    )
    if result.returncode == 77:
        pytest.skip("cannot drop the capabilities that let root read any file")
    assert result.returncode == 0, result.stderr
    expected = f"ERROR {photos}:4: cannot read {locked}: Permission denied"
    assert expected in result.stdout, result.stdout
    assert not (out / "manifest.json").exists()


def _shard_hashes(out):
    return [s["sha256"] for s in json.loads((out / "manifest.json").read_text())["shards"]]


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_workers_started_by_spawn_or_forkserver(photos, tmp_path, method):
    """Worker processes that do not inherit the writer's descriptors (and, with forkserver,
    are not its children) write the same shards as forked ones: shards written by the workers
    (db_num), or records encoded by them and written by the main process (bytes_per_shard)."""
    from conftest import run_python

    third = sum(p.stat().st_size for p, _ in read_list(photos)) // 3
    for name, sharding in (("db_num", {"db_num": 3}), ("bytes", {"bytes_per_shard": third})):
        reference = tmp_path / f"fork-{name}"
        Writer(photos, reference, codec="jpeg", num_workers=2, **sharding).write()
        out = tmp_path / f"{method}-{name}"
        result = run_python(
            f"""
import multiprocessing
multiprocessing.set_start_method({method!r})
from torchrecord import Writer
Writer({str(photos)!r}, {str(out)!r}, codec="jpeg", num_workers=2, **{sharding!r}).write()
"""
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert len(_shard_hashes(out)) >= 3 and _shard_hashes(out) == _shard_hashes(reference)


def test_parallel_shards_report_the_first_bad_line_in_input_order(photos, tmp_path):
    """Shard 1's first sample and shard 0's last one are bad; shard 1 meets its bad line first,
    yet the error names line 12, as when one process writes."""
    _break_line(photos, 12, "missing/late.jpg 1")
    _break_line(photos, 13, "missing/early.jpg 1")
    out = tmp_path / "out"
    for _ in range(3):
        with pytest.raises(DataListError, match=r"data_list\.txt:12: file .*late\.jpg"):
            Writer(photos, out, db_num=2, num_workers=2, shuffle=False).write()
        assert not out.exists() or list(out.iterdir()) == []


def test_every_sample_skipped_leaves_nothing_behind(photos, tmp_path):
    photos.write_text("missing/a.jpg 1\nmissing/b.jpg 2\n")
    out = tmp_path / "out"
    with pytest.raises(DataListError, match="every one of the 2 samples was skipped"):
        Writer(photos, out, on_error="skip", shuffle=False).write()
    assert not out.exists() or list(out.iterdir()) == []


def _dirty_kib() -> int:
    """Page-cache data waiting to be written to disk, or being written, in KiB."""
    fields = dict(line.split(":") for line in open("/proc/meminfo"))
    return int(fields["Dirty"].split()[0]) + int(fields["Writeback"].split()[0])


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="Linux only")
def test_a_sealed_shard_starts_going_to_disk_before_its_fsync(photos, tmp_path, monkeypatch):
    """Each shard a worker seals starts its writeback at once (so that the fsync at the end of
    a write finds it mostly on disk): its dirty pages leave without any fsync, long before the
    kernel's own flush (30 s)."""
    import time
    import zlib

    from torchrecord import writer

    assert hasattr(writer._libc(), "sync_file_range")  # Linux: the writeback hint is in use
    shard = writer._ShardWriter(tmp_path, 0, "raw_rgb", "tensorprotos", 2)
    baseline = _dirty_kib()
    for _ in range(100):
        value = os.urandom(480_000)
        shard.add(value, zlib.crc32(value))
    shard.seal()  # 48 MB in the page cache, not yet on disk
    if _dirty_kib() - baseline < 32 << 10:
        pytest.skip("this file system wrote the shard at once: nothing to observe")
    writer._start_writeback(shard.path)
    deadline = time.monotonic() + 10
    while _dirty_kib() - baseline > 16 << 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _dirty_kib() - baseline <= 16 << 10
    # and shard workers do it for every shard they seal (forked: they inherit the patch)
    calls = tmp_path / "calls"
    real = writer._start_writeback

    def noting(path):
        with open(calls, "a") as f:
            f.write(f"{path.name}\n")
        real(path)

    import multiprocessing

    if multiprocessing.get_start_method() != "fork":
        return  # (spawned workers would not see the patch)
    monkeypatch.setattr(writer, "_start_writeback", noting)
    Writer(photos, tmp_path / "records", db_num=3, num_workers=2, shuffle=False).write()
    assert sorted(calls.read_text().split()) == [f"shard-0000{k}.lmdb" for k in range(3)]


def test_an_empty_output_dir_is_refused(photos, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="output_dir is empty"):
        Writer(photos, "", shuffle=False)
    with pytest.raises(ValueError, match="data_list is empty"):
        Writer("", tmp_path / "out", shuffle=False)  # (it would have packed the current directory)
    with pytest.raises(ValueError, match="root is empty"):
        Writer(photos, tmp_path / "out", root=" ", shuffle=False)
    assert list(tmp_path.iterdir()) == [photos.parent]  # nothing written here
