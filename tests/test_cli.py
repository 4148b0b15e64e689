"""The ``torchrecord`` console script, run as a real subprocess: write, info, verify, plugins."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import flip_record_byte, read_list

from torchrecord import TRDataset, checksum
from torchrecord import format as fmt

TORCHRECORD = Path(sys.executable).parent / "torchrecord"


def run_cli(*args: object) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "TORCHRECORD_STRICT_PLUGINS": "",
        "TORCHRECORD_DISABLE_PLUGIN_AUTOLOAD": "",
    }
    return subprocess.run(
        [str(TORCHRECORD), *map(str, args)], env=env, capture_output=True, text=True, timeout=120
    )


def info_fields(stdout: str) -> dict[str, str]:
    """The ``key   value`` lines of ``torchrecord info``."""
    fields = {}
    for line in stdout.splitlines():
        key, _, value = line.strip().partition(" ")
        fields.setdefault(key, value.strip())
    return fields


@pytest.fixture(scope="module")
def written(photo_dir, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A jpeg dataset of 2 shards written by the CLI from the photo data list."""
    assert TORCHRECORD.is_file(), f"the console script is not installed: {TORCHRECORD}"
    out = tmp_path_factory.mktemp("cli") / "records"
    proc = run_cli(
        "write", photo_dir / "data_list.txt", out, "--db-num", 2, "--codec", "jpeg", "-q"
    )
    return out, proc


def test_write_then_info(written, photo_dir):
    out, proc = written
    num_lines = len(read_list(photo_dir / "data_list.txt"))
    assert num_lines == 24
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"wrote {num_lines} records into 2 shards")
    assert "codec jpeg" in proc.stdout
    assert proc.stderr == ""  # -q: no progress bar

    info = run_cli("info", out)
    assert info.returncode == 0, info.stderr
    fields = info_fields(info.stdout)
    assert fields["codec"] == "jpeg"
    assert fields["serializer"] == "tensorprotos"
    assert fields["records"] == "24"
    assert fields["shards"] == "2"
    assert fields["format"] == "version 2"
    assert "0.1 layout" not in info.stdout

    as_json = run_cli("info", out, "--json")
    assert as_json.returncode == 0, as_json.stderr
    doc = json.loads(as_json.stdout)
    assert doc["records"] == num_lines
    assert doc["codec"] == "jpeg"
    assert doc["legacy"] is False
    assert [s["file"] for s in doc["shards"]] == ["shard-00000.lmdb", "shard-00001.lmdb"]
    assert [s["records"] for s in doc["shards"]] == [12, 12]
    assert doc["bytes"] == sum((out / s["file"]).stat().st_size for s in doc["shards"])


def test_existing_dataset_needs_overwrite(photos, tmp_path):
    out = tmp_path / "records"
    first = run_cli("write", photos, out, "--codec", "jpeg", "-q")
    assert first.returncode == 0, first.stderr
    manifest = (out / "manifest.json").read_text()

    again = run_cli("write", photos, out, "--codec", "raw_rgb", "-q")
    assert again.returncode == 2
    assert "--overwrite" in again.stderr
    assert again.stderr.startswith("torchrecord write: error:")
    assert (out / "manifest.json").read_text() == manifest  # untouched

    # the same write again: nothing to do, and it says so (images may have changed meanwhile)
    same = run_cli("write", photos, out, "--codec", "jpeg", "-q")
    assert same.returncode == 0, same.stderr
    assert same.stdout.startswith(f"nothing to do: {out} holds this write already")
    assert "--overwrite" in same.stdout and "wrote" not in same.stdout
    assert (out / "manifest.json").read_text() == manifest

    replaced = run_cli("write", photos, out, "--codec", "raw_rgb", "--overwrite", "-q")
    assert replaced.returncode == 0, replaced.stderr
    doc = json.loads(run_cli("info", out, "--json").stdout)
    assert doc["codec"] == "raw_rgb"
    assert doc["records"] == len(read_list(photos))


def test_verify_ok_then_names_the_damaged_record(written, tmp_path):
    source, _ = written
    ok = run_cli("verify", source)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.startswith("OK: checked 24 records in 2 shards")
    assert "BAD" not in ok.stdout

    out = tmp_path / "records"
    shutil.copytree(source, out)
    shard = out / "shard-00000.lmdb"
    flip_record_byte(shard, 3, mask=0xFF)
    data = shard.read_bytes()

    bad = run_cli("verify", out)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    problems = [line for line in bad.stdout.splitlines() if line.startswith("BAD")]
    assert len(problems) == 2, bad.stdout
    # the shard's hash no longer matches the manifest, and the record is named
    assert str(shard) in problems[0] and "SHA-256" in problems[0]
    assert str(shard) in problems[1]
    assert f"record key {fmt.record_key(3).hex()} (record 3 of" in problems[1]
    assert "CRC-32" in problems[1]
    assert "2 problem(s): checked 24 records" in bad.stdout
    assert "torchrecord verify" not in bad.stdout  # (the loader's advice, not verify's)
    assert "write the dataset again from its source" in bad.stdout
    # --quick checks sizes, pages, keys and metadata only: a flipped byte passes it
    quick = run_cli("verify", out, "--quick")
    assert quick.returncode == 0 and "OK: checked sizes, pages, keys and metadata" in quick.stdout
    with open(shard, "r+b") as f:
        f.truncate(len(data) - 4096)
    truncated = run_cli("verify", out, "--quick")
    assert truncated.returncode == 1
    assert "shard-00000.lmdb" in truncated.stdout and "manifest recorded" in truncated.stdout


def test_write_format_version_1_for_older_readers(photo_dir, tmp_path):
    out = tmp_path / "v1"
    proc = run_cli("write", photo_dir / "data_list.txt", out, "--format-version", 1, "-q")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "manifest.json").read_text())["format_version"] == 1
    assert info_fields(run_cli("info", out).stdout)["format"] == "version 1"
    ok = run_cli("verify", out)
    assert ok.returncode == 0 and ok.stdout.startswith("OK: checked 24 records"), ok.stdout
    bad = run_cli("write", photo_dir / "data_list.txt", tmp_path / "v3", "--format-version", 3)
    assert bad.returncode == 2 and "invalid choice: 3" in bad.stderr


def test_write_help_and_plugins():
    help_ = run_cli("write", "--help")
    assert help_.returncode == 0
    text = " ".join(help_.stdout.split())
    assert "'path label' lines" in text
    assert ".csv file with two columns, path and label" in text
    assert "raw_rgb decode with Pillow at write time" in text
    assert "jpeg store the original JPEG bytes unchanged" in text
    assert "--codec NAME" in text
    assert "--no-readahead" in text

    listed = run_cli("plugins")
    assert listed.returncode == 0, listed.stderr
    rows = {tuple(line.split()[:2]): line for line in listed.stdout.splitlines()[1:]}
    for kind, name in [
        ("codec", "raw_rgb"),
        ("codec", "jpeg"),
        ("serializer", "tensorprotos"),
        ("serializer", "msgpack"),
    ]:
        assert (kind, name) in rows, listed.stdout
        assert "torchrecord (built-in)" in rows[kind, name]


def test_missing_file_names_the_data_list_line(photos, tmp_path):
    samples = read_list(photos)
    missing_line = 5
    samples[missing_line - 1][0].unlink()
    out = tmp_path / "records"
    proc = run_cli("write", photos, out, "--db-num", 2, "--codec", "jpeg", "-q")
    assert proc.returncode == 2
    assert f"data_list.txt:{missing_line}:" in proc.stderr
    assert samples[missing_line - 1][0].name in proc.stderr
    assert "does not exist" in proc.stderr
    assert not (out / "manifest.json").exists()


def test_info_on_a_legacy_dataset(legacy_fixture):
    proc = run_cli("info", legacy_fixture / "record")
    assert proc.returncode == 0, proc.stderr
    fields = info_fields(proc.stdout)
    assert fields["records"] == "40"
    assert fields["shards"] == "2"
    assert fields["codec"] == "raw_rgb"
    assert "(TorchRecord 0.1 layout)" in fields["dataset"]


def test_bench_reports_every_worker_count(photos, tmp_path):
    out = tmp_path / "bench"
    run_cli("write", str(photos), str(out), "--codec", "jpeg", "-q")
    result = run_cli(
        "bench",
        str(out),
        "--workers",
        "0,2",
        "--limit",
        "24",
        "--epochs",
        "1",
        "--transform",
        "fast",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "24 records in 1 shards, codec jpeg" in lines[0]
    read = [line for line in lines if line.startswith("read")]
    load = [line for line in lines if line.startswith("load")]
    assert len(read) == 1 and float(read[0].split()[1]) > 0
    assert f"CRC-32 by {checksum.IMPLEMENTATION}," in read[0]
    assert [line.split()[4] for line in load] == ["0", "2"]
    assert all(float(line.split()[1]) > 0 for line in load)
    assert not any("channels_last" in line for line in load)


def test_bench_measures_channels_last_batches(photos, tmp_path, monkeypatch, capsys):
    """--channels-last reads through TorchRecord(channels_last=True): every batch the timed
    loader yields is in that memory format (seen by a subclass of the real loader, which
    bench imports from torchrecord.loader when it runs)."""
    import torch

    from torchrecord import loader
    from torchrecord.cli import main

    out = tmp_path / "bench"
    run_cli("write", str(photos), str(out), "--codec", "raw_rgb", "-q")
    layouts = []

    class Spy(loader.TorchRecord):
        def __iter__(self):
            for images, labels in super().__iter__():
                layouts.append(images.is_contiguous(memory_format=torch.channels_last))
                yield images, labels

    monkeypatch.setattr(loader, "TorchRecord", Spy)
    args = ["bench", str(out), "--workers", "0", "--limit", "24", "--epochs", "1"]
    assert main([*args, "--channels-last"]) == 0
    assert layouts and all(layouts)
    assert "batch 32 in channels_last (median" in capsys.readouterr().out
    layouts.clear()
    assert main(args) == 0
    assert layouts and not any(layouts)


def test_shard_ranges_and_join_from_the_command_line(photos, tmp_path):
    parts = []
    for first, stop in ((0, 2), (2, 3)):
        part = tmp_path / f"part{first}"
        result = run_cli(
            "write",
            str(photos),
            str(part),
            "--codec",
            "jpeg",
            "--db-num",
            "3",
            "--shard-range",
            f"{first}:{stop}",
            "-q",
        )
        assert result.returncode == 0, result.stderr
        parts.append(str(part))
    refused = run_cli("info", parts[0])
    assert refused.returncode == 2 and "torchrecord join" in refused.stderr
    joined = run_cli("join", str(tmp_path / "joined"), *parts)
    assert joined.returncode == 0, joined.stderr
    assert "24 records in 3 shards" in joined.stdout
    assert run_cli("verify", str(tmp_path / "joined")).returncode == 0


def test_write_without_readahead(photo_dir, tmp_path):
    out = tmp_path / "no_readahead"
    done = run_cli("write", photo_dir / "data_list.txt", out, "--no-readahead", "-q")
    assert done.returncode == 0, done.stderr
    assert TRDataset(out, transform=None).reader.num_shards == 1
    assert len(TRDataset(out)) == 24


def test_verify_decode_finds_an_image_that_was_bad_when_written(photos, tmp_path):
    """A JPEG whose Huffman table is damaged has a sound frame header, so the writer stores it
    and its CRC-32 matches: only decoding tells. `verify --decode` names it, and the loader's
    error points there."""
    from torchrecord.errors import RecordCorruptedError

    samples = read_list(photos)
    path = samples[5][0]
    data = bytearray(path.read_bytes())
    table = data.find(b"\xff\xc4")  # DHT: marker, length, class, then 16 code counts
    data[table + 5 : table + 21] = b"\xff" * 16  # more codes than a table can hold
    path.write_bytes(bytes(data))
    out = tmp_path / "records"
    assert run_cli("write", photos, out, "--codec", "jpeg", "-q").returncode == 0

    plain = run_cli("verify", out)
    assert plain.returncode == 0 and plain.stdout.startswith("OK")
    decoded = run_cli("verify", out, "--decode")
    assert decoded.returncode == 1, decoded.stdout + decoded.stderr
    bad = [line for line in decoded.stdout.splitlines() if line.startswith("BAD")]
    assert len(bad) == 1
    assert "shard-00000.lmdb, record key" in bad[0]
    assert "(record 5 of the shard, record 5 of the dataset)" in bad[0]
    assert "does not decode" in bad[0] and "fix or remove its source image" in bad[0]
    assert "1 problem(s): checked 24 records (decoded) in 1 shards" in decoded.stdout

    dataset = TRDataset(out)
    assert dataset[4][0].shape == (3, 224, 224)
    with pytest.raises(RecordCorruptedError, match=r"verify --decode"):
        dataset[5]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("write", "list.txt", ""), "argument OUTPUT_DIR: an empty path"),
        (("write", "", "out"), "argument DATA_LIST: an empty path"),
        (("verify", ""), "argument PATH: an empty path"),
        (("join", "out", ""), "argument PART: an empty path"),
        (("write", "list.txt", "out", "--bytes-per-shard", "inf"), "not a size: 'inf'"),
        (("write", "list.txt", "out", "--bytes-per-shard", "1e400"), "not a size: '1e400'"),
        (("bench", "x", "--workers", "a,b"), "not a list of worker counts"),
        (("bench", "x", "--workers", "-1"), "worker counts must be 0 or more"),
        (("bench", "x", "--epochs", "0"), "--epochs: must be 1 or more"),
        (("bench", "x", "--limit", "0"), "--limit: must be 1 or more"),
        (("write", "list.txt", "out", "--raw-below", "-1"), "--raw-below: must be 0 or more"),
    ],
)
def test_bad_arguments_are_one_line_errors(tmp_path, args, message):
    """An unset shell variable must not make the current directory the dataset."""
    proc = subprocess.run(
        [str(TORCHRECORD), *args], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written anywhere


def test_a_label_beyond_64_bits_is_refused_at_write_time(photos, tmp_path):
    lines = photos.read_text().splitlines()
    lines[2] = lines[2].rsplit(" ", 1)[0] + " 99999999999999999999999"
    photos.write_text("\n".join(lines) + "\n")
    proc = run_cli("write", photos, tmp_path / "out", "--codec", "jpeg", "-q")
    assert proc.returncode == 2
    assert "data_list.txt:3:" in proc.stderr and "does not fit in 64 bits" in proc.stderr


def test_a_manifest_nested_thousands_deep_is_a_clear_error(tmp_path):
    (tmp_path / "manifest.json").write_text("[" * 100_000)
    info = run_cli("info", tmp_path)  # could not describe it
    assert info.returncode == 2, info.stderr
    assert "manifest.json is damaged" in info.stderr and "Traceback" not in info.stderr
    verify = run_cli("verify", tmp_path)  # found a problem: a damaged manifest is one
    assert verify.returncode == 1, verify.stdout + verify.stderr
    assert verify.stdout.startswith("BAD  ") and "manifest.json is damaged" in verify.stdout
    assert "Traceback" not in verify.stderr
    assert run_cli("verify", tmp_path / "nothing").returncode == 2  # no dataset: could not run


def test_info_warns_about_a_missing_or_cut_shard(photos, tmp_path):
    out = tmp_path / "records"
    assert run_cli("write", photos, out, "--db-num", 2, "--codec", "jpeg", "-q").returncode == 0
    shard = out / "shard-00001.lmdb"
    shard.write_bytes(shard.read_bytes()[:8192])
    (out / "shard-00000.lmdb").unlink()
    proc = run_cli("info", out)
    assert proc.returncode == 0, proc.stderr
    assert "warning: shard-00000.lmdb is missing; run `torchrecord verify`" in proc.stderr
    assert "warning: shard-00001.lmdb is 8192 bytes but the manifest recorded" in proc.stderr
    doc = json.loads(run_cli("info", out, "--json").stdout)
    assert len(doc["problems"]) == 2 and doc["bytes"] == 8192


def test_the_summary_of_an_append_counts_the_appended_records(photo_dir, tmp_path):
    lines = (photo_dir / "data_list.txt").read_text().splitlines()
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    first.write_text("".join(f"{photo_dir / line}\n" for line in lines[:16]))
    second.write_text("".join(f"{photo_dir / line}\n" for line in lines[16:]))
    out = tmp_path / "records"
    assert run_cli("write", first, out, "--db-num", 2, "--codec", "jpeg", "-q").returncode == 0
    proc = run_cli("write", second, out, "--append", "--codec", "jpeg", "-q")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"appended 8 records into 1 new shards of {out} ")
    assert "the dataset now has 24 records in 3 shards" in proc.stdout


def test_an_append_of_the_samples_again_needs_allow_duplicates(photo_dir, tmp_path):
    listed = photo_dir / "data_list.txt"
    out = tmp_path / "records"
    assert run_cli("write", listed, out, "--codec", "jpeg", "-q").returncode == 0
    again = run_cli("write", listed, out, "--append", "--db-num", 2, "--shuffle", "-q")
    assert again.returncode == 2
    assert "holds these 24 samples already, from its first write" in again.stderr
    assert again.stderr.rstrip().endswith("say), pass --allow-duplicates")
    assert len(TRDataset(out)) == 24
    more = run_cli(
        "write", listed, out, "--append", "--db-num", 2, "--shuffle", "--allow-duplicates", "-q"
    )
    assert more.returncode == 0, more.stderr
    assert "the dataset now has 48 records in 3 shards" in more.stdout


def test_verify_counts_only_the_records_it_could_check(written, tmp_path):
    source, _ = written
    out = tmp_path / "records"
    shutil.copytree(source, out)
    (out / "shard-00001.lmdb").unlink()
    bad = run_cli("verify", out)
    assert bad.returncode == 1
    problems = [line for line in bad.stdout.splitlines() if line.startswith("BAD")]
    assert len(problems) == 1 and "shard-00001.lmdb" in problems[0] and "missing" in problems[0]
    assert "1 problem(s): checked 12 of the 24 records in 2 shards" in bad.stdout


def test_sizes_are_read_as_du_and_dd_write_them():
    from torchrecord.cli import _size

    assert [_size(t) for t in ("15M", "15MB", "1.5GiB", "2k", "500000", "3T")] == [
        15 * 2**20,  # du -h's 15M, dd's 15M
        15 * 10**6,
        3 * 2**29,
        2048,
        500000,
        3 * 2**40,
    ]


def test_info_shows_classes_policy_and_skipped_lines(photo_dir, tmp_path):
    lines = (photo_dir / "data_list.txt").read_text().splitlines()
    names = ["cat", "dog", "eel", "owl"]
    listing = tmp_path / "names.txt"
    listing.write_text(
        "".join(f"{photo_dir / p} {names[int(y)]}\n" for p, y in (x.rsplit(" ", 1) for x in lines))
        + "missing.jpg owl\n"
    )
    out = tmp_path / "records"
    proc = run_cli("write", listing, out, "--on-error", "skip", "--max-size", 100, "-q")
    assert proc.returncode == 0, proc.stderr
    fields = info_fields(run_cli("info", out).stdout)
    assert fields["classes"] == "4 (cat, dog, eel, owl)"
    assert fields["policy"] == "max_size=100"
    assert fields["skipped"] == f"1 input lines (see {out / 'skipped.tsv'})"


def test_errors_name_the_flags_not_the_python_parameters(photo_dir, tmp_path):
    listing = photo_dir / "data_list.txt"
    for args, expected in [
        (("--shard-range", "0:9", "--db-num", 4), "error: --shard-range 0:9 goes past the 4"),
        (("--codec", "jpeg", "--quality", 95), "error: --quality 95 would not be used"),
        (("--db-num", 99), "error: --db-num 99 is more than the 24 samples"),
    ]:
        proc = run_cli("write", listing, tmp_path / "out", *args)
        assert proc.returncode == 2 and expected in proc.stderr, proc.stderr
        assert not any(name in proc.stderr for name in ("max_size", "shard_range", "db_num"))
    from torchrecord.cli import _in_flags

    assert _in_flags(ValueError("/data/db_num/out already holds a dataset; db_num=2")) == (
        "/data/db_num/out already holds a dataset; --db-num 2"
    )


def test_sigterm_stops_a_write_that_then_resumes(photos, tmp_path):
    """SIGTERM (`timeout`, a scheduler preempting the job) is handled as Ctrl-C: exit 143, the
    finished shards kept, the way to resume said; the same command then resumes."""
    lines = photos.read_text().splitlines()
    big = photos.parent / "big.txt"
    big.write_text("".join(f"{line}\n" for line in lines * 40))  # 960 images
    out = tmp_path / "out"
    command = [str(TORCHRECORD), "write", str(big), str(out), "--records-per-shard", "60", "-q"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(out.glob(".tmp-*/shard-*.done")) and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "terminated; run the same command again to resume" in stderr
    assert "Traceback" not in stderr
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resumed: " in again.stdout
    assert run_cli("verify", out).stdout.startswith("OK: checked 960 records")


def test_python_names_become_flags_and_quick_decode_is_refused(photos, tmp_path):
    out = tmp_path / "out"
    assert run_cli("write", photos, out, "--codec", "jpeg", "-q").returncode == 0
    again = run_cli("write", photos, out, "--codec", "raw_rgb", "-q")  # another write
    both = run_cli("write", photos, out, "--overwrite", "--append", "-q")
    for proc in (again, both):
        assert proc.returncode == 2
        assert "overwrite=True" not in proc.stderr and "append=True" not in proc.stderr
    assert "--overwrite" in again.stderr and "--append" in again.stderr
    refused = run_cli("verify", out, "--quick", "--decode")
    assert refused.returncode == 2 and "--decode decodes every record" in refused.stderr
