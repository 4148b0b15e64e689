"""Resume after SIGKILL, and append: the result always equals an uninterrupted write."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import read_list

from torchrecord import DataListError, DatasetExistsError, TRDataset, Writer

SLOW_MODULE = '''
import os, time
from torchrecord import default_data_process_func

def slow_process(line):
    """0.1-style data_process_func that takes a while and logs each call."""
    with open(os.environ["CALL_LOG"], "a") as log:
        log.write(line.rsplit(" ", 1)[0] + "\\n")
    time.sleep(0.01)
    return default_data_process_func(line)
'''

WRITE = """
import multiprocessing, sys
sys.path.insert(0, sys.argv[3])
if sys.argv[5]:
    multiprocessing.set_start_method(sys.argv[5])
from slowmod import slow_process
from torchrecord import Writer
Writer(sys.argv[1], sys.argv[2], data_process_func=slow_process, records_per_shard=6,
       shuffle=True, seed=3, num_workers=int(sys.argv[4])).write()
"""


@pytest.fixture
def slow_list(photos, tmp_path):
    """48 samples (the 24 photos twice, with different labels) and the slow encoder module."""
    lines = photos.read_text().splitlines()
    extra = [f"{line.rsplit(' ', 1)[0]} {int(line.rsplit(' ', 1)[1]) + 10}" for line in lines]
    photos.write_text("\n".join(lines + extra) + "\n")
    (tmp_path / "slowmod.py").write_text(SLOW_MODULE)
    return photos


def run_write(data_list, out, module_dir, log, kill_after=None, workers=0):
    """``workers``: a number, or "N-method" to start N workers with that start method."""
    count, _, method = str(workers).partition("-")
    env = {**os.environ, "CALL_LOG": str(log)}
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITE, str(data_list), str(out), str(module_dir), count, method],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    if kill_after is None:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        return True
    # kill once the writer has encoded `kill_after` samples (each one is logged): progress, not
    # time, so that a slow or busy machine kills at the same points
    deadline = time.monotonic() + 120
    while _lines(log) < kill_after and proc.poll() is None:
        assert time.monotonic() < deadline, "the writer made no progress"
        time.sleep(0.005)
    import psutil

    try:  # workers, and with forkserver the fork server and the workers it forked
        children = [str(c.pid) for c in psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        children = []
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)  # not communicate(): surviving workers would hold stderr open
    proc.stderr.close()
    # the writer's worker processes die with it (and so let go of the staging lock)
    deadline = time.monotonic() + 10
    while alive := [pid for pid in children if os.path.exists(f"/proc/{pid}")]:
        if time.monotonic() > deadline:
            for pid in alive:
                os.kill(int(pid), signal.SIGKILL)
            raise AssertionError(f"worker processes {alive} outlived the killed writer")
        time.sleep(0.05)
    return proc.returncode == 0


def _lines(path):
    try:
        return path.read_text().count("\n")
    except FileNotFoundError:
        return 0


def dataset_state(out):
    """None when no dataset is visible; else every record's bytes, in order."""
    if not (out / "manifest.json").exists():
        return None
    dataset = TRDataset(out, transform=None)
    try:
        return [dataset.reader.read_bytes(i) for i in range(len(dataset))]
    finally:
        dataset.close()


def kill_and_resume(slow_list, tmp_path, kill_points, workers=0):
    module_dir = tmp_path
    reference = tmp_path / "reference"
    run_write(slow_list, reference, module_dir, tmp_path / "ref.log")  # in one process
    expected = dataset_state(reference)
    assert len(expected) == 48
    resumed_with_work_saved = 0
    for i, samples in enumerate(kill_points):
        out = tmp_path / f"killed{i}"
        finished = run_write(
            slow_list, out, module_dir, tmp_path / f"kill{i}.log", samples, workers=workers
        )
        state = dataset_state(out)
        # either no dataset at all, or the complete one
        assert state is None or state == expected, f"partial dataset after a kill at {samples}"
        if finished:
            continue
        log = tmp_path / f"resume{i}.log"
        run_write(slow_list, out, module_dir, log, workers=workers)
        assert dataset_state(out) == expected
        assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
        calls = len(log.read_text().splitlines()) if log.exists() else 0
        if calls < 48:
            resumed_with_work_saved += 1
    return resumed_with_work_saved


@pytest.mark.parametrize("workers", [0, 2, "2-forkserver"])
def test_sigkill_then_resume_equals_an_uninterrupted_write(slow_list, tmp_path, workers):
    """workers=2 writes the 8 shards two at a time in worker processes: a kill leaves finished
    shards that need not be consecutive, and the resume keeps them all."""
    # killed after 0 to 48 of the 48 samples were encoded (48: while finishing and publishing)
    saved = kill_and_resume(slow_list, tmp_path, [0, 5, 13, 26, 38, 48], workers=workers)
    assert saved >= 1  # at least one resume kept finished shards instead of starting over


@pytest.mark.long
@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_at_random_points_many_times(slow_list, tmp_path, workers):
    rng = random.Random(7)
    kill_and_resume(slow_list, tmp_path, [rng.randrange(49) for _ in range(25)], workers=workers)


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_append_adds_shards_and_leaves_the_published_ones(photos, tmp_path):
    out = tmp_path / "records"
    names = ["ant", "bee", "cow", "dog"]
    samples = read_list(photos)
    first = [(p, names[label]) for p, label in samples[:16]]
    second = [(p, names[label]) for p, label in samples[16:]]
    Writer(first, out, db_num=2, codec="jpeg", shuffle=False).write()
    before = {p.name: sha(p) for p in out.glob("shard-*.lmdb")}
    manifest = Writer(second, out, db_num=1, codec="jpeg", append=True, shuffle=False).write()
    assert [s.num_records for s in manifest.shards] == [8, 8, 8]
    assert {p.name: sha(p) for p in out.glob("shard-*.lmdb") if p.name in before} == before
    dataset = TRDataset(out)
    # the first write saw ant, bee, cow; the append adds dog after them
    assert len(dataset) == 24 and dataset.label_names == ["ant", "bee", "cow", "dog"]
    got = [
        (r.protos[0].byte_data, dataset.label_names[int(r.protos[1].byte_data)])
        for r in (TRDataset(out, transform=None)[i] for i in range(24))
    ]
    assert got == [(p.read_bytes(), n) for p, n in first + second]
    doc = json.loads((out / "manifest.json").read_text())
    assert doc["appended"] == 1 and doc["num_records"] == 24
    # appending needs the same codec, and a dataset to append to
    with pytest.raises(ValueError, match="append with the same ones"):
        Writer(second, out, codec="raw_rgb", append=True, shuffle=False).write()
    with pytest.raises(DatasetExistsError, match="holds no dataset to append to"):
        Writer(second, tmp_path / "nothing", codec="jpeg", append=True, shuffle=False).write()


def test_an_overwrite_leaves_only_the_new_dataset_behind(photos, tmp_path):
    out = tmp_path / "records"
    Writer(photos, out, codec="jpeg", shuffle=False).write()
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-00000.lmdb"]
    # a staging directory left by a killed write of different content is cleaned up
    (out / ".tmp-0123456789abcdef").mkdir()
    (out / ".tmp-0123456789abcdef" / ".lock").touch()
    (out / ".tmp-0123456789abcdef" / "shard-00000.lmdb").write_bytes(b"partial")
    Writer(photos, out, codec="raw_rgb", overwrite=True, shuffle=False).write()
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-00000.lmdb"]


@pytest.mark.parametrize("sharding", [{"db_num": 5}, {"records_per_shard": 7}])
def test_shard_ranges_written_apart_and_joined_equal_one_write(photos, tmp_path, sharding):
    from torchrecord.writer import join_parts

    whole = tmp_path / "whole"
    Writer(photos, whole, codec="jpeg", shuffle=True, seed=2, **sharding).write()
    expected = dataset_state(whole)
    n_shards = len(json.loads((whole / "manifest.json").read_text())["shards"])
    cut = n_shards // 2
    parts = []
    for i, (first, stop) in enumerate([(cut, n_shards), (0, cut)]):  # any order, any machine
        part = tmp_path / f"part{i}"
        Writer(
            photos, part, codec="jpeg", shuffle=True, seed=2, shard_range=(first, stop), **sharding
        ).write()
        with pytest.raises(Exception, match="part of a dataset.*torchrecord join"):
            TRDataset(part)
        parts.append(part)
    # a part written again is a no-op (a retried cluster job)
    Writer(
        photos,
        parts[0],
        codec="jpeg",
        shuffle=True,
        seed=2,
        shard_range=(cut, n_shards),
        **sharding,
    ).write()
    joined = tmp_path / "joined"
    manifest = join_parts(joined, parts)
    assert len(manifest.shards) == n_shards
    assert dataset_state(joined) == expected
    assert [s.sha256 for s in manifest.shards] == [
        s["sha256"] for s in json.loads((whole / "manifest.json").read_text())["shards"]
    ]


def test_join_refuses_gaps_and_foreign_parts(photos, tmp_path):
    from torchrecord.writer import join_parts

    a, b = tmp_path / "a", tmp_path / "b"
    Writer(photos, a, codec="jpeg", db_num=4, shard_range=(0, 2), shuffle=False).write()
    with pytest.raises(
        ValueError,
        match=r"shards 2..3 are missing: write them with "
        r"--shard-range 2:4 \(shard_range=\(2, 4\)\)",
    ):
        join_parts(tmp_path / "out", [a])
    Writer(photos, b, codec="jpeg", db_num=4, seed=9, shuffle=True, shard_range=(2, 4)).write()
    with pytest.raises(ValueError, match="different writes"):
        join_parts(tmp_path / "out", [a, b])
    with pytest.raises(ValueError, match="shard_range needs a plan"):
        Writer(photos, a, codec="jpeg", shard_range=(0, 1), shuffle=False)


def jpeg_parts(photos, tmp_path, db_num, ranges):
    """``shard_range`` parts of one jpeg write of the photos, in list order: their folders."""
    parts = []
    for first, stop in ranges:
        part = tmp_path / f"p{first}"
        Writer(
            photos, part, codec="jpeg", db_num=db_num, shard_range=(first, stop), shuffle=False
        ).write()
        parts.append(part)
    return parts


def test_an_append_run_again_is_a_no_op(photos, tmp_path):
    out = tmp_path / "records"
    samples = read_list(photos)
    Writer([(p, label) for p, label in samples[:12]], out, codec="jpeg", shuffle=False).write()
    more = [(p, label) for p, label in samples[12:]]
    Writer(more, out, codec="jpeg", append=True, shuffle=False).write()
    again = Writer(more, out, codec="jpeg", append=True, shuffle=False)  # e.g. a retried job
    manifest = again.write()
    assert again.already_written
    assert manifest.num_records == 24 and len(TRDataset(out)) == 24
    assert json.loads((out / "manifest.json").read_text())["appended"] == 1
    # the whole script run again (write, then append): both find themselves done; the write
    # used to refuse, the directory holding a dataset
    first = Writer([(p, label) for p, label in samples[:12]], out, codec="jpeg", shuffle=False)
    assert first.write().num_records == 24 and first.already_written
    again = Writer(more, out, codec="jpeg", append=True, shuffle=False)
    assert again.write().num_records == 24 and again.already_written
    # another first write is still refused
    with pytest.raises(DatasetExistsError, match="already holds a dataset"):
        Writer([(p, label) for p, label in samples[:11]], out, codec="jpeg").write()


def test_an_append_of_samples_the_dataset_holds_is_refused(photos, tmp_path):
    """The same samples appended in another order or other shards would be stored twice: refused,
    nothing written; allow_duplicates adds them (to weight them twice, say)."""
    out = tmp_path / "records"
    samples = read_list(photos)
    first, second = samples[:12], samples[12:]
    Writer(first, out, db_num=2, codec="jpeg", shuffle=False).write()
    Writer(second, out, db_num=1, codec="jpeg", append=True, shuffle=False).write()
    before = {p.name: sha(p) for p in out.glob("shard-*.lmdb")}
    manifest_before = (out / "manifest.json").read_text()
    for again, which in ((first, "its first write"), (second, "an append")):
        with pytest.raises(DatasetExistsError, match=f"these 12 samples already, from {which}"):
            Writer(again, out, db_num=3, codec="jpeg", append=True, shuffle=True, seed=4).write()
    # the same set in another order: the same samples
    with pytest.raises(DatasetExistsError, match="pass allow_duplicates=True"):
        Writer(first[::-1], out, codec="jpeg", append=True, shuffle=False).write()
    assert {p.name: sha(p) for p in out.glob("shard-*.lmdb")} == before
    assert (out / "manifest.json").read_text() == manifest_before
    assert not list(out.glob(".tmp-*"))  # refused before anything was staged
    # samples the dataset does not hold as a set (one more, one less) are appended
    Writer(first[:11], out, codec="jpeg", append=True, shuffle=False).write()
    assert len(TRDataset(out)) == 35
    manifest = Writer(
        first,
        out,
        db_num=3,
        codec="jpeg",
        append=True,
        shuffle=True,
        seed=4,
        allow_duplicates=True,
    ).write()
    assert manifest.num_records == 47
    stored = [
        (r.protos[0].byte_data, int(r.protos[1].byte_data))
        for r in (TRDataset(out, transform=None)[i] for i in range(47))
    ]
    wanted = [(p.read_bytes(), label) for p, label in first + second + first[:11]]
    assert stored[:35] == wanted  # (written without shuffling)
    assert sorted(stored[35:]) == sorted((p.read_bytes(), label) for p, label in first)
    assert len(json.loads((out / "manifest.json").read_text())["input_digests"]) == 4
    # that very append again: a retried job, done already; with another seed, another append
    settings = dict(db_num=3, codec="jpeg", append=True, shuffle=True, allow_duplicates=True)
    again = Writer(first, out, seed=4, **settings)
    assert again.write().num_records == 47 and again.already_written
    assert Writer(first, out, seed=5, **settings).write().num_records == 59
    with pytest.raises(ValueError, match="allow_duplicates=True .--allow-duplicates. is for app"):
        Writer(first, tmp_path / "new", codec="jpeg", allow_duplicates=True)


APPEND = """
import sys
sys.path.insert(0, sys.argv[3])
from slowmod import slow_process
from torchrecord import Writer
Writer(sys.argv[1], sys.argv[2], data_process_func=slow_process, records_per_shard=6,
       shuffle=True, seed=3, append=True, allow_duplicates=sys.argv[4] == "1").write()
"""


def test_an_unfinished_append_of_duplicates_is_named_when_its_rerun_forgets_the_flag(
    slow_list, tmp_path
):
    """An append with allow_duplicates killed half way, run again without the flag: refused
    (the samples are duplicates), naming the staging it left; with the flag it finishes."""
    out = tmp_path / "records"
    run_write(slow_list, out, tmp_path, tmp_path / "first.log")
    log = tmp_path / "append.log"
    env = {**os.environ, "CALL_LOG": str(log)}

    def append(flag: str) -> subprocess.Popen:
        command = [sys.executable, "-c", APPEND, str(slow_list), str(out), str(tmp_path), flag]
        return subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)

    proc = append("1")
    deadline = time.monotonic() + 120
    while _lines(log) < 20 and proc.poll() is None:
        assert time.monotonic() < deadline, "the append made no progress"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert dataset_state(out) is not None and len(dataset_state(out)) == 48  # untouched
    (staged,) = out.glob(".tmp-*")
    refused = append("")
    _, err = refused.communicate(timeout=300)
    assert refused.returncode != 0
    assert "holds these 48 samples already, from its first write" in err
    assert f"cut short and is staged in {staged}" in err
    assert staged.is_dir()  # the refusal leaves it
    done = append("1")
    _, err = done.communicate(timeout=300)
    assert done.returncode == 0, err
    state = dataset_state(out)
    assert len(state) == 96 and sorted(state[48:]) == sorted(state[:48])
    assert not list(out.glob(".tmp-*"))


def test_a_refused_duplicate_append_counts_samples_not_bad_lines(photos, tmp_path):
    out = tmp_path / "records"
    listed = photos.parent / "list.txt"  # (the list's paths are relative to its folder)
    lines = photos.read_text().splitlines()
    unlabelled = lines[10].rsplit(" ", 1)[0]  # a line that names no sample: no label
    listed.write_text("\n".join([*lines[:10], unlabelled]) + "\n")
    Writer(listed, out, codec="jpeg", on_error="skip").write()
    with pytest.raises(DatasetExistsError) as refused:
        Writer(listed, out, codec="jpeg", on_error="skip", append=True).write()
    assert "holds these 10 samples (and 1 line that is not a sample) already" in str(refused.value)
    assert "staged" not in str(refused.value)


def test_the_same_files_under_other_class_names_are_other_samples(photos, tmp_path):
    """String labels are compared by name: each list numbers its own classes from 0, and the
    same files named as another class are new samples (mislabelled ones, perhaps)."""
    out = tmp_path / "records"
    files = [p for p, _ in read_list(photos)[:6]]
    Writer([(p, "dog") for p in files], out, codec="jpeg", shuffle=False).write()
    Writer([(p, "cat") for p in files], out, codec="jpeg", append=True, shuffle=False).write()
    dataset = TRDataset(out)
    assert len(dataset) == 12 and dataset.label_names == ["dog", "cat"]  # (new names last)
    with pytest.raises(DatasetExistsError, match="these 6 samples already, from an append"):
        Writer([(p, "cat") for p in files], out, db_num=2, codec="jpeg", append=True).write()


def test_a_joined_dataset_knows_the_samples_of_the_whole_write(photos, tmp_path):
    from torchrecord.writer import join_parts

    parts = jpeg_parts(photos, tmp_path, db_num=3, ranges=[(0, 1), (1, 3)])
    joined = tmp_path / "joined"
    join_parts(joined, parts)
    with pytest.raises(DatasetExistsError, match="these 24 samples already, from its first"):
        Writer(photos, joined, codec="jpeg", append=True, shuffle=True, seed=3).write()
    assert len(TRDataset(joined)) == 24


def test_an_append_to_a_dataset_from_before_the_inputs_were_kept(photos, tmp_path):
    """A manifest without ``inputs`` (an earlier version's) cannot tell: the append proceeds,
    and names its own inputs from then on."""
    out = tmp_path / "records"
    samples = read_list(photos)
    Writer(samples[:12], out, codec="jpeg", shuffle=False).write()
    doc = json.loads((out / "manifest.json").read_text())
    del doc["input_digests"]
    (out / "manifest.json").write_text(json.dumps(doc, indent=2) + "\n")
    Writer(samples[:12], out, db_num=2, codec="jpeg", append=True, shuffle=False).write()
    assert len(TRDataset(out)) == 24  # (what it could not tell)
    with pytest.raises(DatasetExistsError, match="from an append"):
        Writer(samples[:12], out, db_num=3, codec="jpeg", append=True, shuffle=False).write()


def test_join_over_an_existing_dataset_replaces_it_whole(photos, tmp_path):
    from torchrecord.writer import join_parts

    old = tmp_path / "joined"
    Writer(photos, old, codec="raw_rgb", db_num=5, shuffle=False).write()
    parts = jpeg_parts(photos, tmp_path, db_num=3, ranges=[(0, 1), (1, 3)])
    with pytest.raises(DatasetExistsError):
        join_parts(old, parts)
    join_parts(old, parts, overwrite=True)
    assert sorted(p.name for p in old.iterdir()) == [
        "manifest.json",
        "shard-00000.lmdb",
        "shard-00001.lmdb",
        "shard-00002.lmdb",
    ]
    dataset = TRDataset(old, transform=None)
    assert dataset.codec == "jpeg" and len(dataset) == 24


def test_join_takes_parts_from_machines_that_keep_the_images_elsewhere(photos, tmp_path):
    """Each machine has its copy of the images (and of the data list, with relative paths) at
    its own place: the parts are still one write."""
    import shutil

    from torchrecord.writer import join_parts

    elsewhere = tmp_path / "mnt" / "other_machine" / "photos"
    shutil.copytree(photos.parent, elsewhere)
    whole = tmp_path / "whole"
    Writer(photos, whole, codec="jpeg", db_num=4, shuffle=False).write()
    a, b = tmp_path / "a", tmp_path / "b"
    Writer(photos, a, codec="jpeg", db_num=4, shard_range=(0, 2), shuffle=False).write()
    Writer(
        elsewhere / "data_list.txt", b, codec="jpeg", db_num=4, shard_range=(2, 4), shuffle=False
    ).write()
    join_parts(tmp_path / "joined", [a, b])
    assert dataset_state(tmp_path / "joined") == dataset_state(whole)


def test_join_says_what_makes_parts_different_writes(photos, tmp_path):
    from torchrecord.writer import join_parts

    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    Writer(photos, a, codec="jpeg", db_num=4, shard_range=(0, 2), shuffle=False).write()
    Writer(photos, b, codec="jpeg", db_num=4, shuffle=True, shard_range=(2, 4)).write()
    with pytest.raises(ValueError, match=r"a was written with shuffle=False and .*b with shuf"):
        join_parts(tmp_path / "out", [a, b])
    shorter = photos.parent / "shorter.txt"
    shorter.write_text("".join(photos.read_text().splitlines(keepends=True)[:-1]))
    Writer(shorter, c, codec="jpeg", db_num=4, shard_range=(2, 4), shuffle=False).write()
    with pytest.raises(ValueError, match=r"a was written from 24 samples and .*c from 23"):
        join_parts(tmp_path / "out", [a, c])
    assert (a / "manifest.json").exists()  # refused parts are left as they were


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "missing"])
def test_join_checks_every_part_shard_before_moving_anything(photos, tmp_path, damage):
    from torchrecord.errors import DatasetError
    from torchrecord.writer import join_parts

    whole = tmp_path / "whole"
    Writer(photos, whole, codec="jpeg", db_num=4, shuffle=False).write()
    a, b = tmp_path / "a", tmp_path / "b"
    Writer(photos, a, codec="jpeg", db_num=4, shard_range=(0, 2), shuffle=False).write()
    Writer(photos, b, codec="jpeg", db_num=4, shard_range=(2, 4), shuffle=False).write()
    shard = b / "shard-00003.lmdb"
    good = shard.read_bytes()
    if damage == "truncated":
        shard.write_bytes(good[: len(good) // 2])
        expected = r"shard-00003\.lmdb is \d+ bytes but the part's manifest recorded"
    elif damage == "flipped byte":
        middle = len(good) // 2
        shard.write_bytes(good[:middle] + bytes([good[middle] ^ 0xFF]) + good[middle + 1 :])
        expected = r"shard-00003\.lmdb does not match the SHA-256"
    else:
        shard.unlink()
        expected = r"shard-00003\.lmdb is missing"
    before = {p: sorted(x.name for x in p.iterdir()) for p in (a, b)}
    with pytest.raises(DatasetError, match=expected):
        join_parts(tmp_path / "joined", [a, b])
    assert {p: sorted(x.name for x in p.iterdir()) for p in (a, b)} == before  # nothing moved
    assert not (tmp_path / "joined" / "manifest.json").exists()
    if damage == "flipped byte":  # --quick checks sizes only: it would join this one
        assert "sha256" in json.loads((b / "manifest.json").read_text())["shards"][1]
    shard.write_bytes(good)  # copied again from where it was written: now it joins
    join_parts(tmp_path / "joined", [a, b])
    assert dataset_state(tmp_path / "joined") == dataset_state(whole)


@pytest.mark.parametrize("check_hashes", [True, False])
def test_join_over_a_dataset_with_a_part_shard_missing_keeps_the_dataset(
    photos, tmp_path, check_hashes
):
    """The old dataset's shard of the same name is not taken for the missing part shard."""
    from torchrecord.errors import DatasetError
    from torchrecord.writer import join_parts

    out = tmp_path / "joined"
    Writer(photos, out, codec="raw_rgb", db_num=2, shuffle=False).write()
    before = dataset_state(out)
    parts = jpeg_parts(photos, tmp_path, db_num=2, ranges=[(0, 1), (1, 2)])
    (parts[1] / "shard-00001.lmdb").unlink()
    with pytest.raises(DatasetError, match=r"p1/shard-00001\.lmdb is missing"):
        join_parts(out, parts, overwrite=True, check_hashes=check_hashes)
    assert dataset_state(out) == before  # untouched
    assert (parts[0] / "shard-00000.lmdb").exists()


def test_a_refused_join_leaves_no_directory(photos, tmp_path):
    from torchrecord.writer import join_parts

    parts = jpeg_parts(photos, tmp_path, db_num=2, ranges=[(0, 1), (1, 2)])
    (parts[0] / "shard-00000.lmdb").write_bytes(b"cut")
    with pytest.raises(Exception, match="bytes but the part's manifest recorded"):
        join_parts(tmp_path / "new" / "joined", parts)
    assert not (tmp_path / "new" / "joined").exists()


def test_a_resume_tells_the_shards_it_kept_from_those_it_wrote(slow_list, tmp_path, monkeypatch):
    """Writer.kept_shards: what the interrupted run had finished; the CLI's summary counts its
    rate over the others (it used to credit the resumed run with every record)."""
    out = tmp_path / "killed"
    assert not run_write(slow_list, out, tmp_path, tmp_path / "kill.log", 26)
    log = tmp_path / "resume.log"
    monkeypatch.setenv("CALL_LOG", str(log))
    monkeypatch.syspath_prepend(str(tmp_path))
    from slowmod import slow_process

    writer = Writer(
        slow_list,
        out,
        data_process_func=slow_process,
        records_per_shard=6,
        shuffle=True,
        seed=3,
    )
    manifest = writer.write()
    kept = sum(s.num_records for s in writer.kept_shards)
    assert kept >= 6 and kept % 6 == 0  # whole shards of 6
    assert len(log.read_text().splitlines()) == 48 - kept  # the kept ones were not encoded again
    assert (
        writer.new_shards == manifest.shards and writer.kept_shards == manifest.shards[: kept // 6]
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_a_bad_line_keeps_the_finished_shards_for_the_fixed_rerun(photos, tmp_path, workers):
    """A truncated JPEG near the end of a long write used to throw every finished shard away.
    They stay, the error says so, and the same write after the file is fixed resumes from
    them and gives the shards of a write that never failed."""
    samples = read_list(photos)
    bad_path = samples[21][0]
    good = bad_path.read_bytes()
    bad_path.write_bytes(good[: len(good) // 3])
    out = tmp_path / "out"
    options = {"codec": "jpeg", "shuffle": False, "num_workers": workers}
    with pytest.raises(DataListError, match=r"data_list.txt:22: .*The \d+ shard\(s\) finished"):
        Writer(photos, out, db_num=6, **options).write()
    bad_path.write_bytes(good)
    writer = Writer(photos, out, db_num=6, **options)
    writer.write()
    assert writer.kept_shards  # resumed, not started over
    reference = tmp_path / "reference"
    Writer(photos, reference, db_num=6, **options).write()
    hashes = [
        [s["sha256"] for s in json.loads((d / "manifest.json").read_text())["shards"]]
        for d in (out, reference)
    ]
    assert hashes[0] == hashes[1] and len(hashes[0]) == 6
    assert not list(out.glob(".tmp-*"))


def _shard_hashes(out):
    return [s["sha256"] for s in json.loads((out / "manifest.json").read_text())["shards"]]


def _break_line(photos, index):
    """Truncate the image of line ``index + 1``; returns a function that repairs it."""
    path = read_list(photos)[index][0]
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 3])
    return lambda: path.write_bytes(good)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_bad_line_then_a_skipping_rerun_resumes_from_the_finished_shards(
    photos, tmp_path, workers
):
    """The bad-line error offers two ways on; the second (skip bad lines) used to start over,
    throwing the finished shards away without a word. It resumes from them, and gives what a
    skipping write gives from the start."""
    _break_line(photos, 21)
    out = tmp_path / "out"
    options = {"codec": "jpeg", "shuffle": False, "num_workers": workers, "db_num": 6}
    with pytest.raises(DataListError, match=r"data_list.txt:22: .*on_error='skip', which resumes"):
        Writer(photos, out, **options).write()
    writer = Writer(photos, out, on_error="skip", **options)
    writer.write()
    # resumed from every shard before the bad line's (shards of 4: line 22 is in the sixth)
    assert [s.file for s in writer.kept_shards] == [f"shard-0000{i}.lmdb" for i in range(5)]
    assert [e.line_no for e, _ in writer.skipped] == [22]
    reference = tmp_path / "reference"
    Writer(photos, reference, on_error="skip", **options).write()
    assert _shard_hashes(out) == _shard_hashes(reference) and len(_shard_hashes(out)) == 6
    assert (out / "skipped.tsv").read_text() == (reference / "skipped.tsv").read_text()
    assert not list(out.glob(".tmp-*"))


def test_a_raising_rerun_keeps_no_shard_that_skipped_a_sample(photos, tmp_path, monkeypatch):
    """The other way round: a skipping write interrupted (Ctrl-C) after it finished shards, one
    of which skipped a bad line, then run again raising on bad lines. The rerun encodes the
    skipped line first and names it, discarding nothing; with the file repaired, it gives what a
    raising write gives from the start, keeping the shards before the one that skipped."""
    from torchrecord import writer as writer_module

    repair = _break_line(photos, 5)  # in the second of 6 shards of 4
    out = tmp_path / "out"
    options = {"codec": "jpeg", "shuffle": False, "db_num": 6}
    real_call = writer_module._EncodeJob.__call__
    calls = []

    def interrupted_after_17(job, entry):  # (Ctrl-C while the 5th shard is being encoded)
        calls.append(entry.line_no)
        if len(calls) > 17:
            raise KeyboardInterrupt
        return real_call(job, entry)

    monkeypatch.setattr(writer_module._EncodeJob, "__call__", interrupted_after_17)
    with pytest.raises(KeyboardInterrupt):
        Writer(photos, out, on_error="skip", **options).write()
    monkeypatch.setattr(writer_module._EncodeJob, "__call__", real_call)
    done = sorted(p.name for p in out.glob(".tmp-*/*"))
    assert sum(name.endswith(".done") for name in done) == 4  # the second skipped line 6
    with pytest.raises(DataListError, match=r"data_list.txt:6: .*The 4 shard\(s\)"):
        Writer(photos, out, **options).write()
    # the line is checked before anything is discarded: the skipping write can still resume
    assert sorted(p.name for p in out.glob(".tmp-*/*")) == done
    repair()
    writer = Writer(photos, out, **options)
    writer.write()
    assert [s.file for s in writer.kept_shards] == ["shard-00000.lmdb"]
    reference = tmp_path / "reference"
    Writer(photos, reference, **options).write()
    assert _shard_hashes(out) == _shard_hashes(reference)


def test_another_write_refuses_to_discard_an_interrupted_writes_shards(photos, tmp_path):
    """A write into a directory where another write (other settings, another data list) left
    finished shards used to delete them without a word. It refuses, saying how much work they
    hold and what differs; nothing is removed; overwrite=True discards them."""
    repair = _break_line(photos, 21)
    out = tmp_path / "out"
    with pytest.raises(DataListError, match="The 5 shard"):
        Writer(photos, out, codec="jpeg", shuffle=False, db_num=6).write()
    repair()
    staging = next(out.glob(".tmp-*"))
    before = sorted(p.name for p in staging.iterdir())
    assert sum(name.endswith(".done") for name in before) == 5
    with pytest.raises(DatasetExistsError) as caught:
        Writer(photos, out, codec="jpeg", shuffle=False, db_num=4).write()
    message = str(caught.value)
    assert "holds 5 shard(s) (" in message and "MB) finished by an interrupted write" in message
    assert "(db_num 6 there, 4 here)" in message and str(staging) in message
    assert sorted(p.name for p in staging.iterdir()) == before  # nothing removed

    fewer = photos.parent / "fewer.txt"  # the same settings, a line less
    fewer.write_text("".join(photos.read_text().splitlines(keepends=True)[1:]))
    with pytest.raises(DatasetExistsError, match=r"24 samples from .* there, 23 from .* here"):
        Writer(fewer, out, codec="jpeg", shuffle=False, db_num=6).write()
    assert sorted(p.name for p in staging.iterdir()) == before

    Writer(photos, out, codec="jpeg", shuffle=False, db_num=4, overwrite=True).write()
    reference = tmp_path / "reference"
    Writer(photos, reference, codec="jpeg", shuffle=False, db_num=4).write()
    assert _shard_hashes(out) == _shard_hashes(reference)
    assert not list(out.glob(".tmp-*"))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_bad_first_sample_of_a_shard_keeps_the_complete_shard_before_it(
    photos, tmp_path, workers
):
    """In one process a shard was finished only when the next sample came; a bad first sample
    of the next shard threw the complete shard before it away (workers kept it)."""
    repair = _break_line(photos, 12)  # the first sample of the third shard of 6
    out = tmp_path / "out"
    options = {"codec": "jpeg", "shuffle": False, "db_num": 4, "num_workers": workers}
    # (workers may finish the fourth shard meanwhile; in one process it comes after the bad line)
    with pytest.raises(DataListError, match=r"data_list.txt:13: .*The (\d) shard\(s\)") as caught:
        Writer(photos, out, **options).write()
    kept = int(re.search(r"The (\d) shard", str(caught.value)).group(1))
    assert kept == 2 if workers == 0 else kept in (2, 3)
    repair()
    writer = Writer(photos, out, **options)
    writer.write()
    files = [s.file for s in writer.kept_shards]
    assert files[:2] == ["shard-00000.lmdb", "shard-00001.lmdb"] and len(files) == kept


def test_an_interrupted_write_of_an_earlier_version_resumes(photos, tmp_path):
    """Before this version the staging directory was named by the whole job id and held no
    job.json: the same write, run by this version, resumes from it instead of refusing."""
    from torchrecord.writer import STAGING_PREFIX

    repair = _break_line(photos, 21)
    out = tmp_path / "out"
    options = {"codec": "jpeg", "shuffle": False, "db_num": 6}
    with pytest.raises(DataListError):
        Writer(photos, out, **options).write()
    repair()
    staging = next(out.glob(".tmp-*"))
    (staging / "job.json").unlink()
    writer = Writer(photos, out, **options)
    entries, _, names = writer._entries()
    writer._label_names = names
    staging.rename(out / f"{STAGING_PREFIX}{writer._job_id(entries, 0)[:16]}")  # (as it was)
    writer.write()
    assert len(writer.kept_shards) == 5 and not list(out.glob(".tmp-*"))


def test_a_completed_write_run_again_leaves_another_writes_shards_alone(photos, tmp_path):
    repair = _break_line(photos, 21)
    out = tmp_path / "out"
    Writer(photos, out, codec="jpeg", shuffle=False, db_num=3, on_error="skip").write()
    with pytest.raises(DataListError):  # another write into the same directory, interrupted
        Writer(photos, out, codec="jpeg", shuffle=False, db_num=6, overwrite=True).write()
    repair()
    staging = next(out.glob(".tmp-*"))
    before = sorted(p.name for p in staging.iterdir())
    again = Writer(photos, out, codec="jpeg", shuffle=False, db_num=3, on_error="skip")
    again.write()
    assert again.already_written and sorted(p.name for p in staging.iterdir()) == before
    resumed = Writer(photos, out, codec="jpeg", shuffle=False, db_num=6, overwrite=True)
    resumed.write()
    assert len(resumed.kept_shards) == 5


def test_a_completed_write_run_again_with_the_other_on_error(photos, tmp_path):
    """A write that raised and completed skipped nothing, so a skipping rerun finds itself
    written (and the other way round when nothing was skipped); a raising rerun of a write that
    skipped samples says so, instead of "already holds a dataset"."""
    options = {"codec": "jpeg", "shuffle": False, "db_num": 3}
    clean = tmp_path / "clean"
    Writer(photos, clean, **options).write()
    again = Writer(photos, clean, on_error="skip", **options)
    assert again.write().num_records == 24 and again.already_written
    clean_skip = tmp_path / "clean_skip"
    Writer(photos, clean_skip, on_error="skip", **options).write()
    again = Writer(photos, clean_skip, **options)
    assert again.write().num_records == 24 and again.already_written

    _break_line(photos, 4)
    skipped = tmp_path / "skipped"
    Writer(photos, skipped, on_error="skip", **options).write()
    with pytest.raises(DatasetExistsError, match=r"on_error='skip', which skipped 1 sample"):
        Writer(photos, skipped, **options).write()
    with pytest.raises(DatasetExistsError, match="already holds a dataset"):  # another write
        Writer(photos, skipped, on_error="skip", codec="jpeg", shuffle=False, db_num=2).write()


def test_a_completed_write_run_again_removes_no_staging_while_another_write_runs(photos, tmp_path):
    """A rerun of a completed write used to remove abandoned staging before it took the output
    directory's lock: a write starting there (its staging made, its lock not yet taken) lost
    it. It removes staging only under the lock, and not at all while another write holds it."""
    from torchrecord.writer import _OutputLock

    out = tmp_path / "out"
    Writer(photos, out, codec="jpeg", shuffle=False).write()
    starting = out / ".tmp-0123456789abcdef"
    starting.mkdir()  # (another write, between making its staging and locking it)
    with _OutputLock(out):  # (held by that other write)
        again = Writer(photos, out, codec="jpeg", shuffle=False)
        again.write()
        assert again.already_written and starting.is_dir()
    Writer(photos, out, codec="jpeg", shuffle=False).write()  # no write runs: it is abandoned
    assert not starting.exists()


def test_reruns_with_the_other_on_error_after_an_append(photos, tmp_path):
    """The first write's own skip count decides (the manifest's total counts the append's too),
    and an append rerun with the other on_error never adds its samples twice."""
    samples = read_list(photos)
    first = [(p, label) for p, label in samples[:12]]
    second = [(p, label) for p, label in samples[12:]]
    second[3] = (photos.parent / "gone.jpg", second[3][1])  # (the append skips one)
    out = tmp_path / "out"
    Writer(first, out, codec="jpeg", shuffle=False, on_error="skip").write()
    Writer(second, out, codec="jpeg", shuffle=False, on_error="skip", append=True).write()
    rerun = Writer(first, out, codec="jpeg", shuffle=False)  # raising: the first skipped none
    assert rerun.write().num_records == 23 and rerun.already_written
    with pytest.raises(DatasetExistsError, match="this very append already, made with"):
        Writer(second, out, codec="jpeg", shuffle=False, append=True).write()
    clean = second[:3] + second[4:]
    Writer(clean, out, codec="jpeg", shuffle=False, append=True).write()  # (raising, clean)
    again = Writer(clean, out, codec="jpeg", shuffle=False, on_error="skip", append=True)
    assert again.write().num_records == 34 and again.already_written
    assert len(TRDataset(out)) == 34


def test_workers_encoding_for_one_writer_keep_the_complete_shard_before_a_bad_sample(
    photos, tmp_path
):
    """A worker encoding a chunk of samples for the one writing process (here lines 4 to 6)
    used to lose the good ones before a bad sample in it, and with them a complete shard."""
    _break_line(photos, 4)  # line 5: the first sample of the second shard of 4
    out = tmp_path / "out"
    options = {"codec": "jpeg", "shuffle": False, "records_per_shard": 4, "num_workers": 1}
    with pytest.raises(DataListError, match=r"data_list.txt:5: .*The 1 shard\(s\)"):
        Writer(photos, out, **options).write()


def test_a_part_offers_no_skipping_rerun_and_string_labels_may_make_it_another_write(
    photos, tmp_path
):
    from torchrecord.writer import DataListError as Error

    _break_line(photos, 21)
    with pytest.raises(Error) as caught:
        Writer(
            photos, tmp_path / "part", codec="jpeg", shuffle=False, db_num=6, shard_range=(2, 6)
        ).write()
    assert "on_error='skip'" not in str(caught.value)
    names = ["ant", "bee", "cow", "dog"]
    samples = read_list(photos)
    named = photos.parent / "named.txt"
    lines = [f"{p.relative_to(photos.parent)} {names[label]}" for p, label in samples]
    lines[21] = f"missing.jpg {names[samples[21][1]]}"  # (the skipping write leaves it out)
    named.write_text("\n".join(lines) + "\n")
    with pytest.raises(Error) as caught:
        Writer(named, tmp_path / "named", codec="jpeg", shuffle=False, db_num=6).write()
    message = str(caught.value)
    assert "The 5 shard(s)" in message
    # (the skipping write labels a missing file's sample by its text: another write, which the
    # message says instead of promising a resume)
    assert "which is another write here" in message and "resumes from them" not in message
    writer = Writer(
        named, tmp_path / "named", codec="jpeg", shuffle=False, db_num=6, on_error="skip"
    )
    with pytest.raises(DatasetExistsError, match="holds 5 shard"):
        writer.write()


def test_the_refusal_names_each_differing_option_in_words():
    from torchrecord.writer import _difference

    assert _difference("db_num", 6, 4) == "db_num 6 there, 4 here"
    policy = _difference("image_policy", {"max_size": 64, "quality": 90}, {"max_size": 32})
    assert policy == "max_size 64 there, 32 here; quality 90 there, None here"
    names = ["ant", "bee", "cow", "dog"]
    assert _difference("label_names", names, ["ant", "bee", "cat", "dog"]) == (
        "class 2 is 'cow' there, 'cat' here"
    )
    assert _difference("label_names", names, names[:3]) == "4 classes there, 3 here"
    assert _difference("first_index", 2, 0) == "the first shard written is 2 there, 0 here"
    assert _difference("seed", "x" * 50, 1) == f"seed '{'x' * 36}... there, 1 here"
