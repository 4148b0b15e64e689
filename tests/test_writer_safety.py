"""What the writer must never do: touch files it did not write, interleave two writes, let a
bad line reshape the labels, or accept an image it cannot read back. Each test is a case a
user review found."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import pytest
from conftest import REPO, read_list, run_python

from torchrecord import DataListError, DatasetExistsError, TorchRecord, TRDataset, Writer
from torchrecord.writer import join_parts


def labels_of(out):
    dataset = TRDataset(out, transform=None)
    return [int(dataset[i].protos[1].byte_data) for i in range(len(dataset))]


def image_bytes(out):
    dataset = TRDataset(out, transform=None)
    return [bytes(dataset[i].protos[0].byte_data) for i in range(len(dataset))]


def test_files_of_the_user_in_the_output_directory_are_never_removed(photos, tmp_path):
    out = tmp_path / "mixed"
    (out / ".tmp-build").mkdir(parents=True)
    (out / ".tmp-build" / "notes.txt").write_text("mine")
    (out / "skipped.tsv").write_text("my own table\n")
    (out / "lock.mdb").write_text("not an LMDB lock")
    (out / "README.txt").write_text("mine too")
    (out / "shard-00007.lmdb").write_text("my file, unluckily named")
    with pytest.raises(DatasetExistsError, match=r"shard-00007\.lmdb exists and was not written"):
        Writer(photos, out, codec="jpeg", shuffle=False).write()
    (out / "shard-00007.lmdb").rename(out / "moved-away")
    with pytest.raises(DatasetExistsError, match=r"skipped\.tsv exists and was not written"):
        Writer(photos, out, codec="jpeg", shuffle=False).write()
    (out / "skipped.tsv").rename(out / "my-table.tsv")

    Writer(photos, out, db_num=2, codec="jpeg", shuffle=False).write()
    for name, text in [
        (".tmp-build/notes.txt", "mine"),
        ("my-table.tsv", "my own table\n"),
        ("lock.mdb", "not an LMDB lock"),
        ("README.txt", "mine too"),
        ("moved-away", "my file, unluckily named"),
    ]:
        assert (out / name).read_text() == text
    # an overwrite replaces the dataset's own files and only those
    Writer(photos, out, db_num=1, codec="raw_rgb", overwrite=True, shuffle=False).write()
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00000.lmdb"]
    assert (out / ".tmp-build" / "notes.txt").read_text() == "mine"
    assert (out / "README.txt").read_text() == "mine too"
    assert len(labels_of(out)) == len(read_list(photos))


def test_a_killed_writes_staging_directory_is_removed_but_a_lookalike_is_not(photos, tmp_path):
    out = tmp_path / "records"
    Writer(photos, out, codec="jpeg", shuffle=False).write()
    killed = out / ".tmp-0123456789abcdef"  # what a killed write leaves: its lock file, a shard
    killed.mkdir()
    (killed / ".lock").touch()
    (killed / "shard-00000.lmdb").write_bytes(b"partial")
    lookalike = out / ".tmp-fedcba9876543210"  # named alike, but not a staging directory
    lookalike.mkdir()
    (lookalike / "data.bin").write_bytes(b"keep")
    Writer(photos, out, codec="raw_rgb", overwrite=True, shuffle=False).write()
    assert not killed.exists()
    assert (lookalike / "data.bin").read_bytes() == b"keep"


GATED_WRITE = """
import sys, time
from pathlib import Path
from torchrecord import Writer, default_data_process_func

def gate(line):
    while not Path(sys.argv[3]).exists():
        time.sleep(0.02)
    return default_data_process_func(line)

Writer(sys.argv[1], sys.argv[2], shuffle=False, data_process_func=gate).write()
"""


def test_two_writes_into_one_directory_at_once_are_refused(photos, tmp_path):
    """A real second writer process, held mid-write, against a write started here."""
    out, go = tmp_path / "records", tmp_path / "go"
    script = tmp_path / "gated.py"
    script.write_text(GATED_WRITE)
    first = subprocess.Popen(
        [sys.executable, str(script), str(photos), str(out), str(go)],
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob(".tmp-*")):  # the first write is encoding
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline, "the first write did not start"
            time.sleep(0.05)
        with pytest.raises(DatasetExistsError, match="another write into .* is running"):
            Writer(photos, out, codec="jpeg", shuffle=False).write()
        with pytest.raises(DatasetExistsError, match="another write into .* is running"):
            Writer(photos, out, codec="jpeg", overwrite=True, shuffle=False).write()
        part = tmp_path / "part"
        Writer(photos, part, codec="jpeg", db_num=2, shard_range=(0, 2), shuffle=False).write()
        with pytest.raises(DatasetExistsError, match="another write into .* is running"):
            join_parts(out, [part])
        go.touch()
        assert first.wait(timeout=300) == 0, first.stderr.read()
    finally:
        first.kill()
        first.wait()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["codec"] == "custom"  # the first write's dataset, whole
    assert labels_of(out) == [label for _, label in read_list(photos)]


def test_a_process_forked_during_a_write_does_not_keep_the_directory_locked(photos, tmp_path):
    """A child forked while a write runs (by another thread; or the writer's own pool workers)
    gets a copy of the lock's descriptor: it closes it, so the lock ends with the write."""
    import threading

    from torchrecord import default_data_process_func

    out, forked = tmp_path / "records", threading.Event()

    def slow(line):  # the first sample waits until the child exists
        forked.wait(60)
        return default_data_process_func(line)

    writer = threading.Thread(
        target=Writer(photos, out, data_process_func=slow, shuffle=False).write
    )
    writer.start()
    deadline = time.monotonic() + 60
    while not list(out.glob(".tmp-*")):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    child = os.fork()
    if child == 0:
        time.sleep(60)
        os._exit(0)
    try:
        forked.set()
        writer.join(120)
        assert (out / "manifest.json").exists()
        Writer(
            photos, out, codec="jpeg", overwrite=True, shuffle=False
        ).write()  # while the child lives
        assert json.loads((out / "manifest.json").read_text())["codec"] == "jpeg"
    finally:
        os.kill(child, 9)
        os.waitpid(child, 0)


def test_a_truncated_file_named_like_a_shard_is_refused_not_read(photos, tmp_path):
    """Reading a truncated LMDB file through its map would kill the writer with SIGBUS."""
    whole = tmp_path / "whole"
    Writer(photos, whole, db_num=2, codec="jpeg", shuffle=False).write()
    out = tmp_path / "out"
    out.mkdir()
    data = (whole / "shard-00001.lmdb").read_bytes()
    (out / "shard-00001.lmdb").write_bytes(data[: len(data) // 2])
    code = f"""
from torchrecord import Writer, DatasetExistsError
try:
    Writer({str(photos)!r}, {str(out)!r}, db_num=2, codec="jpeg").write()
except DatasetExistsError as exc:
    print("REFUSED", exc)
"""
    result = run_python(code, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "REFUSED" in result.stdout and "shard-00001.lmdb exists" in result.stdout


def test_append_refuses_files_of_the_user_too(photos, tmp_path):
    samples = read_list(photos)
    out = tmp_path / "records"
    Writer(samples[:12], out, codec="jpeg", db_num=2, shuffle=False).write()
    (out / "shard-00002.lmdb").write_text("user data")
    with pytest.raises(DatasetExistsError, match=r"shard-00002\.lmdb exists and was not written"):
        Writer(samples[12:], out, codec="jpeg", append=True, shuffle=False).write()
    (out / "shard-00002.lmdb").rename(out / "kept")
    (out / "skipped.tsv").write_text("my notes\nimportant line\n")
    with pytest.raises(DatasetExistsError, match=r"skipped\.tsv exists and was not written"):
        Writer(samples[12:], out, codec="jpeg", append=True, on_error="skip", shuffle=False).write()
    assert (out / "skipped.tsv").read_text() == "my notes\nimportant line\n"
    assert (out / "kept").read_text() == "user data"


def test_a_common_named_label_among_integers_is_a_class(photos, tmp_path):
    """Only a few stray labels are mistakes: 10 'background' among 14 '0' are a class."""
    samples = read_list(photos)
    listing = photos.parent / "two.txt"
    listing.write_text(
        "".join(f"{p} {'0' if i < 14 else 'background'}\n" for i, (p, _) in enumerate(samples))
    )
    with pytest.warns(UserWarning, match="14 labels are numbers .* and 10 are not"):
        manifest = Writer(
            listing, tmp_path / "out", codec="jpeg", on_error="skip", shuffle=False
        ).write()
    assert manifest.extra["label_names"] == ["0", "background"]
    assert manifest.extra["skipped"] == 0
    assert labels_of(tmp_path / "out") == [0] * 14 + [1] * 10


def test_a_spreadsheet_csv_with_a_byte_order_mark_and_a_header(photos, tmp_path):
    samples = read_list(photos)
    csv_path = photos.parent / "excel.csv"
    rows = ["path,label", *(f"{p},{label}" for p, label in samples)]
    csv_path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(rows).encode() + b"\r\n")
    for on_error in ("raise", "skip"):
        out = tmp_path / on_error
        manifest = Writer(csv_path, out, codec="jpeg", on_error=on_error, shuffle=False).write()
        assert "label_names" not in manifest.extra and manifest.extra["skipped"] == 0
        assert labels_of(out) == [label for _, label in samples]


def test_a_non_integer_label_among_integers_is_a_bad_line_not_a_new_label_scheme(photos, tmp_path):
    samples = read_list(photos)
    lines = [f"{p} {label}" for p, label in samples]
    lines[5] = f"{samples[5][0]} cat"
    bad = photos.parent / "typo.txt"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataListError, match=r"typo\.txt:6: label 'cat' is not an integer"):
        Writer(bad, tmp_path / "raise", codec="jpeg", shuffle=False).write()
    assert not (tmp_path / "raise" / "manifest.json").exists()
    out = tmp_path / "skip"
    manifest = Writer(bad, out, codec="jpeg", on_error="skip", shuffle=False).write()
    assert "label_names" not in manifest.extra and manifest.extra["skipped"] == 1
    assert labels_of(out) == [label for i, (_, label) in enumerate(samples) if i != 5]
    report = (out / "skipped.tsv").read_text().splitlines()
    assert report[1].startswith("6\t") and "not an integer" in report[1]


def test_a_skipped_header_line_does_not_become_a_class(photos, tmp_path):
    samples = read_list(photos)
    names = ["cat", "dog", "eel", "owl"]
    listing = photos.parent / "named.csv"
    rows = ["filename,class", *(f"{p},{names[label]}" for p, label in samples)]
    listing.write_text("\n".join(rows) + "\n")
    out = tmp_path / "named"
    manifest = Writer(listing, out, codec="jpeg", on_error="skip", shuffle=False).write()
    assert manifest.extra["label_names"] == names  # not "class" among them
    assert labels_of(out) == [label for _, label in samples]
    assert manifest.extra["skipped"] == 1
    assert "filename does not exist" in (out / "skipped.tsv").read_text()


def test_skip_goes_past_lines_without_a_label_or_with_extra_columns(photos, tmp_path):
    samples = read_list(photos)
    lines = [f"{p} {label}" for p, label in samples]
    lines.insert(3, str(samples[0][0]))  # no label
    txt = photos.parent / "holes.txt"
    txt.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataListError, match=r"holes\.txt:4: missing label"):
        Writer(txt, tmp_path / "raise", codec="jpeg", shuffle=False).write()
    manifest = Writer(txt, tmp_path / "txt", codec="jpeg", on_error="skip", shuffle=False).write()
    assert manifest.extra["skipped"] == 1
    assert labels_of(tmp_path / "txt") == [label for _, label in samples]

    rows = [f"{p},{label}" for p, label in samples]
    rows.insert(2, f'"{samples[1][0]}",1,extra')
    rows.insert(5, f'"{samples[2][0]}\nsecond line",2')  # a quoted cell over two lines
    csv_path = photos.parent / "holes.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    manifest = Writer(
        csv_path, tmp_path / "csv", codec="jpeg", on_error="skip", shuffle=False
    ).write()
    report = (tmp_path / "csv" / "skipped.tsv").read_text().splitlines()[1:]
    assert [row.split("\t")[0] for row in report] == ["3", "6"]  # where each row starts
    assert "expected two columns" in report[0] and "does not exist" in report[1]
    assert labels_of(tmp_path / "csv") == [label for _, label in samples]


def test_when_every_sample_is_skipped_the_error_says_why(tmp_path):
    listing = tmp_path / "allbad.txt"
    listing.write_text("/nope/a.jpg 1\n/nope/b.jpg 2\n")
    with pytest.raises(DataListError) as caught:
        Writer(listing, tmp_path / "out", on_error="skip", shuffle=False).write()
    message = str(caught.value)
    assert "every one of the 2 samples was skipped" in message
    assert "line 1: file /nope/a.jpg does not exist" in message
    assert "line 2: file /nope/b.jpg does not exist" in message


def test_writing_twice_with_one_writer_counts_skips_once(photos, tmp_path):
    with photos.open("a") as f:
        f.write("missing.jpg 0\n")
    writer = Writer(
        photos, tmp_path / "out", codec="jpeg", on_error="skip", overwrite=True, shuffle=False
    )
    assert writer.write().extra["skipped"] == 1
    assert writer.write().extra["skipped"] == 1
    assert len((tmp_path / "out" / "skipped.tsv").read_text().splitlines()) == 2


def test_renamed_classes_are_a_new_write_not_a_finished_one(photos, tmp_path):
    samples = read_list(photos)
    first, second = photos.parent / "l.txt", photos.parent / "k.txt"
    first.write_text("".join(f"{p} l{label}\n" for p, label in samples))
    second.write_text("".join(f"{p} k{label}\n" for p, label in samples))
    out = tmp_path / "named"
    Writer(first, out, codec="jpeg", shuffle=False).write()
    with pytest.raises(DatasetExistsError, match="already holds a dataset"):
        Writer(second, out, codec="jpeg", shuffle=False).write()
    Writer(
        first, out, codec="jpeg", shuffle=False
    ).write()  # the very same write: done already, a no-op
    assert TRDataset(out).classes == ["l0", "l1", "l2", "l3"]


def test_append_needs_the_same_image_policy_and_extra_fields(photos, tmp_path):
    samples = read_list(photos)
    out = tmp_path / "records"
    Writer(samples[:12], out, codec="jpeg", max_size=64, shuffle=False).write()
    with pytest.raises(ValueError, match="image policy"):
        Writer(samples[12:], out, codec="jpeg", max_size=128, append=True, shuffle=False).write()
    Writer(samples[12:], out, codec="jpeg", max_size=64, append=True, shuffle=False).write()
    assert len(labels_of(out)) == len(samples)

    boxed = tmp_path / "boxed"
    Writer(
        [{"path": p, "label": y, "box": [1, 2]} for p, y in samples[:12]], boxed, shuffle=False
    ).write()
    with pytest.raises(ValueError, match=r"extra fields \[\]"):
        Writer(samples[12:], boxed, append=True, shuffle=False).write()


def test_append_takes_the_datasets_codec_serializer_and_image_policy(photos, tmp_path):
    samples = read_list(photos)
    first, second = photos.parent / "first.txt", photos.parent / "second.txt"
    first.write_text("".join(f"{p} {y}\n" for p, y in samples[:12]))
    second.write_text("".join(f"{p} {y}\n" for p, y in samples[12:]))
    out = tmp_path / "records"
    Writer(
        first, out, codec="jpeg", serializer="msgpack", max_size=64, quality=80, shuffle=False
    ).write()
    result = subprocess.run(  # as `torchrecord write --help` shows it: no codec given
        [sys.executable, "-m", "torchrecord.cli", "write", str(second), str(out), "--append"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["codec"], manifest["serializer"]) == ("jpeg", "msgpack")
    assert manifest["image_policy"] == {"max_size": 64, "quality": 80}
    from PIL import Image

    sizes = [Image.open(io.BytesIO(data)).size for data in image_bytes(out)]
    assert len(sizes) == 24 and max(max(size) for size in sizes) == 64  # all scaled down
    with pytest.raises(ValueError, match="append with the same ones"):
        Writer(second, out, codec="raw_rgb", append=True, shuffle=False).write()
    with pytest.raises(ValueError, match="append with the same max_size, quality and raw_below"):
        Writer(
            second, out, append=True, quality=70, shuffle=False
        ).write()  # given: not the dataset's 80


def test_every_sample_needs_the_same_extra_fields(photos, tmp_path):
    samples = read_list(photos)
    items = [{"path": p, "label": y, "box": [0, 0, 5, 5]} for p, y in samples]
    del items[4]["box"]
    with pytest.raises(DataListError, match=r"<iterable>:5: its extra fields \[\] differ"):
        Writer(items, tmp_path / "raise", codec="jpeg", shuffle=False).write()
    out = tmp_path / "skip"
    manifest = Writer(items, out, codec="jpeg", on_error="skip", shuffle=False).write()
    assert manifest.extra["skipped"] == 1 and manifest.extra["extra_fields"] == ["box"]
    images, labels, extras = next(iter(TorchRecord(out, shuffle=False, batch_size=32)))
    assert len(labels) == len(samples) - 1  # the default collation batches every field
    assert extras["box"] == [[0, 0, 5, 5]] * 23  # a list field: the samples' lists


def test_an_image_folder_around_its_output_and_with_an_empty_class(photo_dir, tmp_path):
    import shutil

    root = tmp_path / "folder"
    shutil.copytree(photo_dir, root, ignore=shutil.ignore_patterns("*.txt"))
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    out = root / "records"  # the dataset written inside the folder it reads
    Writer(root, out, codec="jpeg", shuffle=False).write()
    Writer(
        root, out, codec="jpeg", shuffle=False
    ).write()  # the same write again: a no-op, not a new class
    Writer(root, out, codec="jpeg", overwrite=True, shuffle=False).write()
    assert TRDataset(out).classes == classes
    assert len(labels_of(out)) == len(list(root.glob("*/*.jpg")))
    (root / "empty-class").mkdir()
    with pytest.raises(DataListError, match="'empty-class' hold no images"):
        Writer(root, root / "records", codec="jpeg", overwrite=True, shuffle=False).write()
    # elsewhere, the dataset's folder is one more folder without images: named too
    with pytest.raises(DataListError, match="'empty-class', 'records' hold no images"):
        Writer(root, tmp_path / "other", codec="jpeg", shuffle=False).write()


def jpeg_with_thumbnail(photo: bytes) -> bytes:
    """``photo`` with a small JPEG of itself in a comment segment before the frame, as cameras
    embed an EXIF thumbnail: a second end-of-image marker, early in the file."""
    from PIL import Image

    with Image.open(io.BytesIO(photo)) as img:
        thumb = io.BytesIO()
        img.resize((32, 24)).save(thumb, "JPEG", quality=70)
    data = thumb.getvalue()
    return photo[:2] + b"\xff\xfe" + (len(data) + 2).to_bytes(2, "big") + data + photo[2:]


def test_a_truncated_jpeg_with_an_embedded_thumbnail_is_refused(photos, tmp_path):
    from PIL import Image

    path, label = read_list(photos)[0]
    whole = jpeg_with_thumbnail(path.read_bytes())
    path.write_bytes(whole)
    with Image.open(path) as img:  # the whole file is a JPEG Pillow reads
        img.load()
    Writer(photos, tmp_path / "whole", codec="jpeg", shuffle=False).write()
    assert image_bytes(tmp_path / "whole")[0] == whole
    path.write_bytes(whole[: len(whole) * 2 // 3])
    for codec, options in [("jpeg", {}), ("smart", {"raw_below": 0})]:
        with pytest.raises(DataListError, match=r"data_list\.txt:1: .*truncated JPEG"):
            Writer(photos, tmp_path / codec, codec=codec, **options).write()


def test_a_jpeg_with_a_large_trailer_is_stored_as_it_is(photos, tmp_path):
    """A Motion Photo carries a video after the JPEG's end-of-image marker: no truncation."""
    path, _ = read_list(photos)[0]
    whole = path.read_bytes() + bytes(range(256)).replace(b"\xff", b"\x00") * 400  # 100 KB
    path.write_bytes(whole)
    Writer(photos, tmp_path / "out", codec="jpeg", shuffle=False).write()
    assert image_bytes(tmp_path / "out")[0] == whole


def test_options_that_cannot_work_are_refused_before_any_work(photos, tmp_path):
    with pytest.raises(ValueError, match="quality must be between 1 and 100"):
        Writer(photos, tmp_path / "q", codec="jpeg", max_size=64, quality=150, shuffle=False)
    with pytest.raises(ValueError, match="can be pickled"):
        Writer(
            photos,
            tmp_path / "l",
            data_process_func=lambda line: line,
            num_workers=2,
            shuffle=False,
        )
    assert not (tmp_path / "q").exists() and not (tmp_path / "l").exists()


def test_join_names_overlapping_and_missing_parts(photos, tmp_path):
    parts = []
    for first, stop in [(0, 2), (1, 3), (3, 4)]:
        parts.append(tmp_path / f"part{first}")
        Writer(
            photos, parts[-1], codec="jpeg", db_num=4, shard_range=(first, stop), shuffle=False
        ).write()
    with pytest.raises(ValueError, match=r"part1 holds shards 1\.\.2 and .*part0 holds shards"):
        join_parts(tmp_path / "joined", parts)
    with pytest.raises(ValueError, match=r"shards 2\.\.2 are missing before .*part3"):
        join_parts(tmp_path / "joined", [parts[0], parts[2]])


def test_cli_reports_a_system_error_without_a_traceback(photos, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = subprocess.run(
        [sys.executable, "-m", "torchrecord.cli", "write", str(photos), str(blocker / "out")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "torchrecord write: error:" in result.stderr and str(blocker) in result.stderr


def test_a_shard_of_another_write_of_the_same_shape_is_refused(photos, tmp_path):
    """Two writes of the same images in other orders give shards of the same size; one copied
    over the other's used to pass `verify --quick` and be read as if it belonged. Each shard's
    manifest entry now names its records (the CRC-32 of its checksum table), checked whenever
    the shard is opened."""
    from PIL import Image

    from torchrecord.errors import ShardCorruptedError
    from torchrecord.reader import RecordReader, verify

    lines = []
    for i, (path, label) in enumerate(read_list(photos)[:12]):
        with Image.open(path) as img:
            small = img.convert("RGB").resize((40, 30))
        small.save(tmp_path / f"same_{i}.png")
        lines.append(f"{tmp_path / f'same_{i}.png'} {label}\n")
    (tmp_path / "same.txt").write_text("".join(lines))
    first, second = tmp_path / "first", tmp_path / "second"
    Writer(tmp_path / "same.txt", first, db_num=2, codec="raw_rgb", seed=1).write()
    Writer(tmp_path / "same.txt", second, db_num=2, codec="raw_rgb", seed=2).write()
    shard = "shard-00000.lmdb"
    assert (first / shard).stat().st_size == (second / shard).stat().st_size
    assert labels_of(first) != labels_of(second)  # (other orders: other records)
    (first / shard).write_bytes((second / shard).read_bytes())

    problems = list(verify(RecordReader(first), quick=True))
    assert len(problems) == 1 and isinstance(problems[0], ShardCorruptedError)
    assert shard in str(problems[0]) and "other records than the ones the manifest" in str(
        problems[0]
    )
    with pytest.raises(ShardCorruptedError, match="other records than the ones the manifest"):
        TRDataset(first)[0]
    assert TRDataset(first)[8][1] == labels_of(second)[8]  # the other shard is sound


def test_a_shard_the_manifest_does_not_list_is_named_and_never_replaced(photos, tmp_path):
    """An append's shard, left beside a manifest restored from before the append, is named by
    info and verify, and a new append refuses to replace it; a staging directory of an
    interrupted write is named too."""
    from torchrecord.cli import main

    out = tmp_path / "out"
    Writer(photos, out, codec="jpeg", shuffle=False).write()
    before = (out / "manifest.json").read_bytes()
    Writer(photos, out, append=True, allow_duplicates=True).write()
    appended = (out / "shard-00001.lmdb").read_bytes()
    (out / "manifest.json").write_bytes(before)  # a backup restored
    (out / ".tmp-0123456789abcdef").mkdir()
    (out / ".tmp-0123456789abcdef" / "shard-00005.lmdb").write_bytes(b"\0" * 3_000_000)

    for command in (["info", str(out)], ["verify", str(out)]):
        proc = subprocess.run(
            [sys.executable, "-m", "torchrecord.cli", *command],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        assert "shard-00001.lmdb is a shard file the manifest does not list" in proc.stderr
        staging = ".tmp-0123456789abcdef holds the staging of a write that was interrupted"
        assert staging + " or is running (3.0 MB)" in proc.stderr
    with pytest.raises(DatasetExistsError, match="shard-00001.lmdb is a TorchRecord shard that"):
        Writer(photos, out, append=True, allow_duplicates=True).write()
    assert (out / "shard-00001.lmdb").read_bytes() == appended
    assert main(["verify", "--quick", str(out)]) == 0
