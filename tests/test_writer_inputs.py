"""Writer inputs and sharding: folders, iterables, string labels, extra fields, shard limits,
the skip policy and shard hashes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import read_list

from torchrecord import DataListError, RecordReader, TorchRecord, TRDataset, Writer


def contents(path):
    """(image bytes, label) of every record, in storage order."""
    dataset = TRDataset(path, transform=None)
    return [
        (r.protos[0].byte_data, int(r.protos[1].byte_data))
        for r in (dataset[i] for i in range(len(dataset)))
    ]


def test_image_folder_input(photo_dir, tmp_path):
    out = tmp_path / "folder"
    manifest = Writer(photo_dir, out, db_num=2, codec="jpeg", shuffle=False).write()
    classes = sorted(p.name for p in photo_dir.iterdir() if p.is_dir())
    assert manifest.extra["label_names"] == classes and len(classes) == 4
    dataset = TRDataset(out)
    assert dataset.classes == classes
    expected = sorted(
        (p.read_bytes(), classes.index(p.parent.name)) for p in photo_dir.rglob("*.jpg")
    )
    assert sorted(contents(out)) == expected


def test_a_bad_image_in_a_folder_is_named_by_its_place_not_a_line(photo_dir, tmp_path):
    import shutil

    folder = tmp_path / "folder"
    shutil.copytree(photo_dir, folder)
    bad = sorted((folder / "001.class_001").glob("*.jpg"))[1]
    bad.write_text("not an image")
    with pytest.raises(DataListError) as caught:
        Writer(folder, tmp_path / "out", codec="raw_rgb", shuffle=False).write()
    message = str(caught.value)
    assert message.startswith(f"{folder} (image ") and "in sorted order): " in message
    assert bad.name in message and "remove the file" in message and "line" not in message


def test_iterable_of_pairs_with_string_labels(photos, tmp_path):
    names = ["cat", "dog", "bird", "eel"]
    samples = read_list(photos)
    pairs = [(str(path), names[label]) for path, label in samples]
    out = tmp_path / "pairs"
    manifest = Writer(pairs, out, codec="jpeg", shuffle=False).write()
    assert manifest.extra["label_names"] == sorted(names)
    dataset = TRDataset(out)
    assert dataset.label_names == ["bird", "cat", "dog", "eel"]
    got = contents(out)
    assert [b for b, _ in got] == [p.read_bytes() for p, _ in samples]
    assert [dataset.label_names[label] for _, label in got] == [n for _, n in pairs]


def test_dicts_with_extra_fields_round_trip(photos, tmp_path):
    samples = read_list(photos)
    items = [
        {"path": path, "label": label, "bbox": [i, i + 1, 30, 40], "caption": f"photo number {i}"}
        for i, (path, label) in enumerate(samples)
    ]
    out = tmp_path / "extras"
    manifest = Writer(items, out, db_num=2, codec="jpeg", shuffle=False).write()
    assert manifest.extra["extra_fields"] == ["bbox", "caption"]
    dataset = TRDataset(out)
    image, label, extras = dataset[5]
    assert image.shape == (3, 224, 224) and label == samples[5][1]
    assert extras == {"bbox": [5, 6, 30, 40], "caption": "photo number 5"}
    # and through the loader's default collation, in worker processes
    loader = TorchRecord(out, batch_size=24, num_workers=2, shuffle=False)
    images, labels, batch_extras = next(iter(loader))
    assert batch_extras["caption"] == [f"photo number {i}" for i in range(24)]
    assert labels.tolist() == [label for _, label in samples]
    with pytest.raises(DataListError, match=r"<iterable>:2: a dict needs 'path' and 'label'"):
        Writer([items[0], {"label": 1}], tmp_path / "bad", codec="jpeg", shuffle=False).write()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_records_per_shard(photos, tmp_path, num_workers):
    manifest = Writer(
        photos,
        tmp_path / "r",
        records_per_shard=10,
        codec="jpeg",
        num_workers=num_workers,
        shuffle=False,
    ).write()
    assert [s.num_records for s in manifest.shards] == [10, 10, 4]
    assert [b for b, _ in contents(tmp_path / "r")] == [
        p.read_bytes() for p, _ in read_list(photos)
    ]


def test_bytes_per_shard_is_the_same_for_any_num_workers(photos, tmp_path):
    sizes = [p.stat().st_size for p, _ in read_list(photos)]
    limit = sum(sizes) // 5
    outs = []
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        manifest = Writer(
            photos, out, bytes_per_shard=limit, codec="jpeg", shuffle=True, num_workers=workers
        ).write()
        outs.append(([s.num_records for s in manifest.shards], contents(out)))
    assert outs[0] == outs[1]
    counts = outs[0][0]
    assert len(counts) >= 5 and sum(counts) == 24
    # each shard but the last holds at least `limit` bytes of records and one record fewer
    # would have held less
    reader = RecordReader(tmp_path / "w0")
    for shard in range(len(counts) - 1):
        values = [
            len(reader.read_bytes(i))
            for i in range(int(reader.offsets[shard]), int(reader.offsets[shard + 1]))
        ]
        assert sum(values) >= limit > sum(values[:-1])


def test_only_one_way_to_shard(photos, tmp_path):
    with pytest.raises(ValueError, match="choose one way to shard"):
        Writer(photos, tmp_path / "o", db_num=2, records_per_shard=5, shuffle=False)
    with pytest.raises(ValueError, match="choose one way to shard"):
        Writer(photos, tmp_path / "o", records_per_shard=5, bytes_per_shard=10, shuffle=False)


def test_skip_policy_reports_every_skipped_line(photos, tmp_path):
    lines = photos.read_text().splitlines()
    lines[3] = "missing/one.jpg 1"
    (photos.parent / "text.jpg").write_text("not an image")
    lines[10] = "text.jpg 2"
    photos.write_text("\n".join(lines) + "\n")
    out = tmp_path / "skip"
    manifest = Writer(photos, out, db_num=2, on_error="skip", num_workers=2, shuffle=False).write()
    assert manifest.num_records == 22 and manifest.extra["skipped"] == 2
    report = (out / "skipped.tsv").read_text().splitlines()
    assert report[0] == "line\tpath\treason\tdata_list"
    assert all(row.endswith(f"\t{photos}") for row in report[1:])
    assert report[1].startswith("4\t") and "does not exist" in report[1]
    assert report[2].startswith("11\t") and "not an image Pillow can read" in report[2]
    assert len(TRDataset(out)) == 22
    # the default still stops at the first bad line
    with pytest.raises(DataListError, match=r"data_list\.txt:4"):
        Writer(photos, tmp_path / "raise", shuffle=False).write()


def test_a_planned_shard_whose_samples_are_all_skipped(photos, tmp_path):
    """db_num=4 plans shards of 6 samples; when all 6 of the second are bad, the shards after it
    move up one number, with workers writing shards in parallel as in one process."""
    lines = photos.read_text().splitlines()
    for i in range(6, 12):
        lines[i] = f"missing/{i}.jpg 1"
    photos.write_text("\n".join(lines) + "\n")
    results = []
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        writer = Writer(photos, out, db_num=4, on_error="skip", num_workers=workers, shuffle=False)
        with pytest.warns(UserWarning, match="1 of the db_num=4 shards came out empty"):
            manifest = writer.write()
        # the shards written in parallel before going on in one process were not kept from
        # an earlier run: none ran
        assert writer.kept_shards == [] and writer.new_shards == manifest.shards
        results.append(
            (
                [(s.file, s.num_records, s.sha256) for s in manifest.shards],
                (out / "skipped.tsv").read_text(),
                manifest.extra["skipped"],
            )
        )
    assert results[0] == results[1]
    shards, report, skipped = results[0]
    assert [n for _, n, _ in shards] == [6, 6, 6] and skipped == 6
    assert [line.split("\t")[0] for line in report.splitlines()[1:]] == [
        str(i) for i in range(7, 13)
    ]
    labels = [int(r.protos[1].byte_data) for r in TRDataset(tmp_path / "w2", transform=None)]
    expected = [int(line.rsplit(" ", 1)[1]) for line in lines]
    assert labels == expected[:6] + expected[12:]


@pytest.mark.parametrize("workers", [0, 2])
def test_manifest_records_each_shard_hash(photos, tmp_path, workers):
    """Hashed by the writing process's hash thread (0 workers) or in each shard's worker (2)."""
    out = tmp_path / "hash"
    Writer(photos, out, db_num=3, codec="jpeg", num_workers=workers, shuffle=False).write()
    doc = json.loads((out / "manifest.json").read_text())
    for shard in doc["shards"]:
        assert shard["sha256"] == hashlib.sha256((out / shard["file"]).read_bytes()).hexdigest()
    assert doc["sharding"] == {"db_num": 3} and doc["skipped"] == 0


def test_label_mapping_keeps_integer_labels(photos, tmp_path):
    manifest = Writer(photos, tmp_path / "ints", codec="jpeg", shuffle=False).write()
    assert "label_names" not in manifest.extra
    assert TRDataset(tmp_path / "ints").label_names is None
    assert torch.tensor([label for _, label in contents(tmp_path / "ints")]).tolist() == [
        label for _, label in read_list(photos)
    ]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_progress_bar_shows_images_bytes_and_rate(photos, tmp_path, capsys, num_workers):
    Writer(
        photos,
        tmp_path / "r",
        db_num=3,
        codec="jpeg",
        num_workers=num_workers,
        progress=True,
    ).write()
    err = capsys.readouterr().err
    final = err.replace("\r", "\n").strip().splitlines()[-1]
    assert final.startswith("writing: 100%") and "24/24" in final, err
    assert "img/s" in final and "MB/s" in final and not final.endswith(" 0.0 MB/s]")


def test_data_list_paths_resolve_as_pathlib_resolves_them():
    """resolve_path skips pathlib for plain paths; every path gives pathlib's string."""
    import itertools
    import random
    from pathlib import Path

    from torchrecord.datalist import resolve_path

    parts = ["a", "b.jpg", ".", "..", "", ".hidden", "sp ace", "é", "x\\y"]
    rng = random.Random(0)
    paths = {"a", ".", "./a", "a/", "a/.", "/", "//a", "///a", "/a//b/./c/", "../a", "a/.."}
    for n in range(1, 5):
        for combo in itertools.product(parts, repeat=n):
            if rng.random() < 0.05:
                path = "/".join(combo)
                paths.update({path, "/" + path, path + "/"})
    paths.discard("")
    for base in ("/", "/data", "/data/set", "rel/base"):
        for path in paths:
            expected = str(Path(path) if path.startswith("/") else Path(base) / path)
            assert resolve_path(base, path) == expected, (base, path)


def test_the_job_id_is_the_json_of_every_entry(tmp_path):
    """The write's identity (its staging directory, found again by a resume) is the SHA-256 of
    its parameters and of each entry as JSON; the fast path for plain entries writes the same
    bytes, over more than one chunk."""
    from torchrecord.datalist import Entry

    names = ["plain.jpg", 'quote".jpg', "back\\slash.jpg", "tab\t.jpg", "é😀.jpg", "\x01.jpg"]
    entries = [
        Entry(i + 1, f"/d/{i}/{names[i % len(names)]}", ["3", "cat", 'a"b', "ü"][i % 4], "")
        for i in range(9000)
    ]
    entries += [Entry(9001, "/d/int.jpg", 7, ""), Entry(9002, "/d/x.jpg", "1", "", {"b": 1})]
    writer = Writer(tmp_path / "list.txt", tmp_path / "out", shuffle=False)
    digest = hashlib.sha256()
    digest.update(json.dumps(writer._job_params(0)).encode())
    for e in entries:
        digest.update(json.dumps([e.path, e.label, e.extras], sort_keys=True).encode())
    assert writer._job_id(entries, 0) == digest.hexdigest()


@pytest.mark.parametrize(
    "kind", ["float", "numpy float32", "tensor", "csv text 2.0"], ids=lambda k: k.replace(" ", "_")
)
def test_whole_number_labels_of_any_type_are_class_indices(photos, tmp_path, kind):
    """2.0, np.float32(2), torch.tensor(2) and a CSV's "2.0" (pandas writes integer columns
    with missing values so) are the class index 2, not the name "2.0" sorted as text, which
    made 10.0 class 2."""
    import numpy as np

    samples = read_list(photos)
    make = {
        "float": float,
        "numpy float32": np.float32,
        "tensor": torch.tensor,
    }
    if kind in make:
        source = [(str(path), make[kind](label * 5)) for path, label in samples]
    else:
        source = tmp_path / "list.csv"
        source.write_text(
            "path,label\n" + "".join(f"{path},{label * 5}.0\n" for path, label in samples)
        )
    manifest = Writer(source, tmp_path / "out", codec="jpeg", shuffle=False).write()
    assert "label_names" not in manifest.extra
    got = [label for _, label in contents(tmp_path / "out")]
    assert got == [label * 5 for _, label in samples] and max(got) == 15


def test_names_that_are_numbers_sort_by_value_and_a_mix_is_warned_about(photos, tmp_path):
    samples = read_list(photos)
    names = ["2.5", "10.5", "0.5", "1"]  # not integers: names, in numeric order
    pairs = [(str(path), names[label]) for path, label in samples]
    manifest = Writer(pairs, tmp_path / "numbers", codec="jpeg", shuffle=False).write()
    assert manifest.extra["label_names"] == ["0.5", "1", "2.5", "10.5"]
    got = [label for _, label in contents(tmp_path / "numbers")]
    assert [manifest.extra["label_names"][i] for i in got] == [n for _, n in pairs]

    # integers and words, more words than a stray line or two: names, numbers first, warned
    mixed = [
        (str(path), "unknown" if i % 3 == 0 else str(label))
        for i, (path, label) in enumerate(samples)
    ]
    with pytest.warns(UserWarning, match=r"<iterable>: \d+ labels are numbers .* and 8 are not"):
        manifest = Writer(mixed, tmp_path / "mixed", codec="jpeg", shuffle=False).write()
    present = sorted({label for _, label in mixed if label != "unknown"}, key=int)
    assert manifest.extra["label_names"] == [*present, "unknown"]


def test_numpy_and_tensor_extra_fields_are_stored_as_lists(photos, tmp_path):
    import numpy as np

    samples = read_list(photos)
    items = [
        {
            "path": path,
            "label": label,
            "boxes": np.full((2, 4), i, dtype=np.float32),
            "score": np.float64(i / 4),
            "ids": torch.tensor([i, i + 1]),
        }
        for i, (path, label) in enumerate(samples)
    ]
    Writer(items, tmp_path / "np", codec="jpeg", shuffle=False).write()
    _, _, extras = TRDataset(tmp_path / "np")[3]
    assert extras == {"boxes": [[3.0] * 4, [3.0] * 4], "score": 0.75, "ids": [3, 4]}

    items[2]["score"] = object()  # not JSON data: a bad line, named, or skipped on request
    with pytest.raises(DataListError, match=r"<iterable>:3: extra field 'score' is not JSON"):
        Writer(items, tmp_path / "bad", codec="jpeg", shuffle=False).write()
    manifest = Writer(
        items, tmp_path / "skip", codec="jpeg", on_error="skip", shuffle=False
    ).write()
    assert manifest.num_records == len(samples) - 1 and manifest.extra["skipped"] == 1


def test_a_class_whose_every_sample_is_skipped_keeps_its_index_and_is_warned_about(
    photos, tmp_path
):
    """Names come from the lines whose files exist: a class whose only files do not decode
    keeps its place, so the other classes' indices do not depend on which files failed."""
    root = photos.parent
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not a JPEG at all")
    lines = [
        f"{path.relative_to(root)} {'cat' if label < 2 else 'dog'}"
        for path, label in read_list(photos)
    ] + ["broken.jpg bird"]
    (root / "names.txt").write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match=r"class\(es\) 'bird' have no records"):
        manifest = Writer(
            root / "names.txt", tmp_path / "out", on_error="skip", shuffle=False
        ).write()
    assert manifest.extra["label_names"] == ["bird", "cat", "dog"]
    got = [label for _, label in contents(tmp_path / "out")]
    assert got == [1 if label < 2 else 2 for _, label in read_list(photos)]


def test_image_folders_follow_symlinked_folders_once(photo_dir, tmp_path):
    """As torchvision's ImageFolder (os.walk(followlinks=True)); a link back up is not walked
    around forever."""
    import shutil

    root = tmp_path / "folder"
    shutil.copytree(photo_dir, root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    extra = tmp_path / "elsewhere"
    extra.mkdir()
    first = next(iter(sorted((root / classes[0]).glob("*.jpg"))))
    shutil.copy(first, extra / "linked.jpg")
    (root / classes[1] / "more").symlink_to(extra, target_is_directory=True)
    (root / classes[1] / "loop").symlink_to(root / classes[1], target_is_directory=True)
    Writer(root, tmp_path / "out", codec="jpeg", shuffle=False).write()
    got = sorted(contents(tmp_path / "out"))
    expected = sorted(
        [(p.read_bytes(), classes.index(p.parent.name)) for p in photo_dir.rglob("*.jpg")]
        + [(first.read_bytes(), 1)]
    )
    assert got == expected


def test_extra_fields_of_any_length_batch_by_kind(photos, tmp_path):
    """Boxes per image (a list of any length): a list per batch, as torchvision's detection
    references batch targets; numbers: a tensor; strings: a list. The same in every batch,
    and through TRDataset in a plain DataLoader with torchrecord.collate."""
    from torch.utils.data import DataLoader

    import torchrecord

    samples = read_list(photos)
    items = [
        {
            "path": path,
            "label": label,
            "boxes": [[i, j, i + 5, j + 5] for j in range(i % 3)],
            "area": i * 1.5,
            "note": f"n{i}",
        }
        for i, (path, label) in enumerate(samples)
    ]
    out = tmp_path / "boxes"
    Writer(items, out, codec="jpeg", shuffle=False).write()
    seen = []
    for workers in (0, 2):
        loader = TorchRecord(out, batch_size=5, num_workers=workers, shuffle=False)
        for images, labels, extras in loader:
            assert images.shape[0] == labels.shape[0] == len(extras["boxes"])
            assert extras["area"].dtype == torch.float64 and isinstance(extras["note"], list)
            seen += [
                (int(area / 1.5), boxes, note)
                for area, boxes, note in zip(extras["area"], extras["boxes"], extras["note"])
            ]
    expected = [(i, item["boxes"], item["note"]) for i, item in enumerate(items)]
    assert seen == expected * 2
    # batches are built in place (and their buffers reused) with extra fields too: the same
    # images as sample by sample
    from torchrecord.dataset import Prebatched

    loader = TorchRecord(out, batch_size=5, num_workers=2, shuffle=False)
    assert loader.dataset.batch_pool is not None
    built = loader.dataset.__getitems__([3, 4])
    assert isinstance(built, Prebatched) and built.extras[1]["note"] == "n4"
    single = TRDataset(out)
    for images, labels, extras in loader:
        first = int(extras["area"][0] / 1.5)
        assert torch.equal(images[0], single[first][0]) and labels[0] == single[first][1]
    plain = DataLoader(TRDataset(out), batch_size=24, collate_fn=torchrecord.collate)
    _, labels, extras = next(iter(plain))
    assert extras["boxes"] == [item["boxes"] for item in items]


def test_a_dict_from_a_users_transform_is_collated_as_pytorch_collates(photos, tmp_path):
    """Only the stored extra fields batch by kind: tensors in a dict a user's transform returns
    are stacked by default_collate, as before."""
    Writer(photos, tmp_path / "out", codec="jpeg").write()

    def transform(record):
        label = int(record.protos[1].byte_data)
        return torch.zeros(2), label, {"mask": torch.full((3,), label)}

    loader = TorchRecord(tmp_path / "out", batch_size=4, transform=transform, shuffle=False)
    images, labels, extras = next(iter(loader))
    assert images.shape == (4, 2) and extras["mask"].shape == (4, 3)
    assert extras["mask"][:, 0].tolist() == labels.tolist()


def test_appending_integers_to_a_dataset_whose_names_are_numbers(photos, tmp_path):
    """Before 2.0 was the integer 2, a CSV of 2.0-style labels gave class names "0.0", "1.0"...
    (stood in for here by editing the manifest). Appending the same kind of list now maps its
    integer labels to those names by value, instead of refusing them."""
    samples = read_list(photos)
    out = tmp_path / "out"
    first = [(str(p), "abcd"[y]) for p, y in samples[:12]]
    Writer(first, out, codec="jpeg", shuffle=False).write()
    manifest_path = out / "manifest.json"
    doc = json.loads(manifest_path.read_text())
    doc["label_names"] = ["0.0", "1.0", "2.0", "3.0"]
    manifest_path.write_text(json.dumps(doc))
    more = [(str(p), f"{y}.0") for p, y in samples[12:]]
    manifest = Writer(more, out, codec="jpeg", append=True, shuffle=False).write()
    assert manifest.extra["label_names"] == ["0.0", "1.0", "2.0", "3.0"]
    got = [label for _, label in contents(out)]
    assert got[12:] == [y for _, y in samples[12:]]


@pytest.mark.parametrize("encoding", ["latin-1", "utf-16"])
def test_a_data_list_that_is_not_utf8_names_its_line_and_the_fix(photos, tmp_path, encoding):
    """A list saved as Latin-1 (a file name with an accent) or as UTF-16 (Windows' "Unicode")
    used to be reported by byte position, with Python's codec message."""
    samples = read_list(photos)
    accented = samples[2][0].with_name("café.jpg")
    samples[2][0].rename(accented)
    samples[2] = (accented, samples[2][1])
    lines = [f"{p.relative_to(photos.parent).as_posix()} {label}" for p, label in samples]
    listed = photos.parent / "list.txt"
    listed.write_text("\n".join(lines) + "\n", encoding=encoding)
    with pytest.raises(DataListError) as caught:
        Writer(listed, tmp_path / "out").write()
    if encoding == "latin-1":
        assert caught.value.line_no == 3
        assert "byte 0xe9 is not UTF-8 text (the line reads '" in str(caught.value)
        assert "café.jpg" in str(caught.value)
        assert "iconv -f LATIN1 -t UTF-8" in str(caught.value)
    else:
        assert caught.value.line_no is None
        assert "UTF-16" in str(caught.value) and "iconv -f UTF-16 -t UTF-8" in str(caught.value)
    listed.write_text("\n".join(lines) + "\n", encoding="utf-8")  # converted: it writes
    assert Writer(listed, tmp_path / "out").write().num_records == 24


def test_the_skip_report_of_an_appended_dataset_names_each_rows_data_list(photos, tmp_path):
    """After an append, line numbers of two data lists share one report: each row names its
    list. A report written before the column existed gets the dataset's list on its rows."""
    lines = photos.read_text().splitlines(keepends=True)
    first, second = photos.parent / "first.txt", photos.parent / "second.txt"
    first.write_text("".join(lines[:12]).replace(lines[2].split()[0], "missing.jpg", 1))
    second.write_text("".join(lines[12:]).replace(lines[14].split()[0], "gone.jpg", 1))
    out = tmp_path / "out"
    Writer(first, out, codec="jpeg", on_error="skip", shuffle=False).write()
    report = out / "skipped.tsv"
    old_style = report.read_text().replace("\tdata_list", "", 1).replace(f"\t{first}", "")
    report.write_text(old_style)  # (as an earlier version wrote it)
    clean = [(str(photos.parent / line.split()[0]), line.split()[1]) for line in lines[20:22]]
    Writer(clean, out, codec="jpeg", shuffle=False, append=True).write()  # (skips nothing)
    assert report.read_text().splitlines()[0].endswith("\tdata_list")  # (the column, now)
    Writer(second, out, codec="jpeg", on_error="skip", shuffle=False, append=True).write()
    tabbed = [(str(photos.parent / "bad\tname.jpg"), "1")]  # (a tab in a path, missing)
    Writer(tabbed + clean, out, codec="jpeg", on_error="skip", append=True).write()
    rows = [row.split("\t") for row in report.read_text().splitlines()]
    assert rows[0] == ["line", "path", "reason", "data_list"]
    assert {len(row) for row in rows} == {4}
    assert [(row[0], Path(row[1]).name, row[3]) for row in rows[1:]] == [
        ("3", "missing.jpg", str(first)),
        ("3", "gone.jpg", str(second)),
        ("1", "bad name.jpg", "<iterable>"),
    ]
