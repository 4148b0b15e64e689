"""The on-disk format: shard metadata, keys, versions, and refusing damaged datasets clearly."""

from __future__ import annotations

import json
import struct
import zlib

import lmdb
import pytest
from conftest import flip_record_byte, run_python

from torchrecord import (
    DatasetError,
    DatasetNotFoundError,
    FormatVersionError,
    RecordCorruptedError,
    RecordReader,
    ShardCorruptedError,
    TRDataset,
    UnknownPluginError,
    Writer,
)
from torchrecord import format as fmt
from torchrecord.reader import verify


@pytest.fixture
def records(photos, tmp_path):
    out = tmp_path / "records"
    Writer(photos, out, db_num=2, codec="jpeg", serializer="msgpack", shuffle=False).write()
    return out


def raw_items(shard_path):
    env = lmdb.open(str(shard_path), subdir=False, **fmt.READ_OPTIONS)
    try:
        with env.begin() as txn:
            return list(txn.cursor())
    finally:
        env.close()


@pytest.mark.parametrize("version", [1, 2])
def test_shard_layout(photos, tmp_path, version):
    records = tmp_path / "records"
    Writer(
        photos,
        records,
        db_num=2,
        codec="jpeg",
        serializer="msgpack",
        format_version=version,
        shuffle=False,
    ).write()
    manifest = json.loads((records / "manifest.json").read_text())
    assert manifest["format"] == "torchrecord" and manifest["format_version"] == version
    assert (manifest["codec"], manifest["serializer"], manifest["num_records"]) == (
        "jpeg",
        "msgpack",
        24,
    )
    for index, shard in enumerate(manifest["shards"]):
        path = records / shard["file"]
        assert shard["file"] == f"shard-{index:05d}.lmdb"
        assert path.stat().st_size == shard["bytes"]
        items = raw_items(path)
        keys = [k for k, _ in items]
        record_keys = [k for k in keys if len(k) == 8]
        assert keys[-2:] == [b"__checksums__", b"__torchrecord__"]
        meta = json.loads(dict(items)[b"__torchrecord__"])
        assert meta["format_version"] == version and meta["shard_index"] == index
        assert (meta["codec"], meta["serializer"], meta["num_records"]) == (
            "jpeg",
            "msgpack",
            shard["num_records"],
        )
        # fixed-width big-endian keys in record order (version 2: then part order)
        numbers = [struct.unpack(">Q", k)[0] for k in record_keys]
        assert numbers == sorted(numbers)
        records_ = {}
        for number, (_key, value) in zip(numbers, items):
            record, part = (number, 0) if version == 1 else divmod(number, 4)
            assert part == len(records_.setdefault(record, []))  # parts 0, 1, ... no gaps
            records_[record].append(value)
        assert list(records_) == list(range(shard["num_records"]))
        whole = [b"".join(parts) for parts in records_.values()]
        reader = RecordReader(records)
        first = sum(s["num_records"] for s in manifest["shards"][:index])
        assert whole == [reader.read_bytes(first + i) for i in range(len(whole))]
        reader.close()
        crcs = struct.unpack(f"<{shard['num_records']}I", dict(items)[b"__checksums__"])
        assert list(crcs) == [zlib.crc32(v) for v in whole]
        if version == 1:
            assert all(len(parts) == 1 for parts in records_.values())
            continue
        assert meta["num_keys"] == len(record_keys)
        # a first part that LMDB stores on overflow pages fills them exactly (16-byte page
        # header); every other part is small enough for a leaf page
        env = lmdb.open(str(path), subdir=False, **fmt.READ_OPTIONS)
        overflow_pages = env.stat()["overflow_pages"]
        env.close()
        big = [parts[0] for parts in records_.values() if len(parts[0]) > fmt.inline_max(4096)]
        assert big and all((len(v) + 16) % 4096 == 0 for v in big)
        assert overflow_pages * 4096 == sum(len(v) + 16 for v in big)
        small = [v for parts in records_.values() for v in parts if len(v) <= 2022]
        assert len(big) + len(small) == len(record_keys)
        assert any(len(parts) > 1 for parts in records_.values())


def test_version_2_shards_are_smaller_and_version_1_datasets_still_read(photos, tmp_path):
    """The same input in both layouts: the same records come back; version 2 wastes less."""
    sizes, contents = {}, {}
    for version in (1, 2):
        out = tmp_path / f"v{version}"
        Writer(photos, out, db_num=2, codec="jpeg", format_version=version, shuffle=False).write()
        reader = RecordReader(out)
        assert reader.manifest.format_version == version
        contents[version] = [reader.read_bytes(i) for i in range(len(reader))]
        sizes[version] = sum(s.bytes for s in reader.manifest.shards)
        payload = sum(len(v) for v in contents[version])
        assert [r for r, _ in verify_all(out)] == []
        # appending keeps the dataset's layout
        Writer(photos, out, codec="jpeg", append=True, shuffle=False, allow_duplicates=True).write()
        appended = RecordReader(out)
        assert appended.manifest.format_version == version and len(appended) == 2 * len(reader)
        assert [appended.read_bytes(i) for i in range(len(reader), len(appended))] == contents[
            version
        ]
    assert contents[1] == contents[2]
    # version 1 loses about half a 4 KiB page per record to overflow pages (24 records here;
    # measured: 66.8 KB against 42.2 KB of file beyond the records' bytes)
    waste = {v: sizes[v] - payload for v in (1, 2)}
    assert waste[2] < waste[1] - 24 * 600, (waste, payload)


def verify_all(path):
    return [(str(e), e) for e in verify(RecordReader(path))]


def _set_version(records, version):
    path = records / "manifest.json"
    doc = json.loads(path.read_text())
    doc["format_version"] = version
    path.write_text(json.dumps(doc))


def test_newer_format_version_is_refused_clearly(records):
    _set_version(records, fmt.FORMAT_VERSION + 1)
    with pytest.raises(FormatVersionError, match="format version 3.*Upgrade TorchRecord"):
        TRDataset(records)


def test_newer_shard_version_is_refused_clearly(records):
    path = records / "shard-00001.lmdb"
    env = lmdb.open(str(path), subdir=False, lock=False)
    with env.begin(write=True) as txn:
        meta = json.loads(txn.get(b"__torchrecord__"))
        meta["format_version"] = 7
        txn.put(b"__torchrecord__", json.dumps(meta).encode())
    env.close()
    _resize_in_manifest(records, "shard-00001.lmdb")
    dataset = TRDataset(records, transform=None)
    assert dataset[0] is not None  # shard 0 is fine
    with pytest.raises(
        FormatVersionError, match="shard .*shard-00001.lmdb uses TorchRecord format version 7"
    ):
        dataset[23]


def _resize_in_manifest(records, name, table=None):
    """The manifest made to agree with a shard edited in place: its size, and with ``table``
    (its new checksum table) the CRC-32 that names its records, so that only the deeper checks
    can tell."""
    path = records / "manifest.json"
    doc = json.loads(path.read_text())
    for shard in doc["shards"]:
        if shard["file"] == name:
            shard["bytes"] = (records / name).stat().st_size
            if table is not None and "records_crc32" in shard:
                shard["records_crc32"] = zlib.crc32(table)
    path.write_text(json.dumps(doc))


def test_directory_without_manifest(records, tmp_path):
    (records / "manifest.json").unlink()
    with pytest.raises(DatasetNotFoundError, match="no manifest.json.*interrupted"):
        TRDataset(records)
    with pytest.raises(DatasetNotFoundError, match="holds no TorchRecord dataset"):
        TRDataset(tmp_path)
    with pytest.raises(DatasetNotFoundError, match="nope does not exist; expected a directory"):
        TRDataset(tmp_path / "nope")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DatasetNotFoundError, match="afile is a file, not a directory"):
        TRDataset(tmp_path / "afile")


def test_unknown_codec_names_the_missing_plugin(records):
    path = records / "manifest.json"
    doc = json.loads(path.read_text())
    doc["codec"] = "webp_from_a_plugin"
    path.write_text(json.dumps(doc))
    with pytest.raises(UnknownPluginError, match="webp_from_a_plugin.*may not be installed"):
        TRDataset(records)


def test_manifest_disagreeing_with_shard_metadata(records):
    path = records / "manifest.json"
    doc = json.loads(path.read_text())
    doc["shards"][0]["num_records"] -= 1
    doc["shards"][1]["num_records"] += 1
    path.write_text(json.dumps(doc))
    with pytest.raises(
        ShardCorruptedError,
        match="shard-00000.lmdb: its metadata says num_records=12 but the manifest says 11",
    ):
        TRDataset(records, transform=None)[0]
    doc["shards"][0]["num_records"] += 1
    doc["shards"][1]["num_records"] -= 1
    doc["serializer"] = "tensorprotos"
    path.write_text(json.dumps(doc))
    with pytest.raises(
        ShardCorruptedError,
        match="metadata says serializer='msgpack' but the manifest says 'tensorprotos'",
    ):
        TRDataset(records, transform=None)[0]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(format_version=True), "invalid format_version True"),
        (lambda d: d["shards"][0].update(bytes="123"), "bytes must be a non-negative integer"),
        (lambda d: d["shards"][1].update(file=d["shards"][0]["file"]), "listed twice"),
        (lambda d: d["shards"][0].update(file="../elsewhere.lmdb"), "is not allowed"),
        (lambda d: d.update(checksum="md5"), "unknown checksum algorithm 'md5'"),
        (lambda d: d.update(num_records=25), "num_records 25 disagrees"),
    ],
    ids=["bool-version", "string-bytes", "duplicate-file", "path-escape", "checksum", "count"],
)
def test_manifest_fields_are_checked_strictly(records, edit, message):
    path = records / "manifest.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match=message):
        TRDataset(records)


def test_damaged_manifest(records):
    (records / "manifest.json").write_text('{"format": "torchrecord", "format_')
    with pytest.raises(DatasetError, match="manifest.json is damaged"):
        TRDataset(records)


def test_flipped_byte_in_a_record_is_caught_by_its_checksum(records):
    flip_record_byte(records / "shard-00000.lmdb", 5)
    dataset = TRDataset(records, transform=None)
    assert dataset[4] is not None
    with pytest.raises(RecordCorruptedError) as info:
        dataset[5]
    message = str(info.value)
    assert "shard-00000.lmdb" in message and fmt.record_key(5).hex() in message
    assert "CRC-32" in message and "torchrecord verify" in message


@pytest.mark.parametrize("keep", ["half", "100", "0"])
def test_truncated_shard_raises_instead_of_sigbus(records, keep):
    """Cut after the dataset was opened (a dataset opened with a cut shard is refused at
    once: test_a_dataset_with_a_missing_or_cut_shard_is_refused_when_opened)."""
    shard = records / "shard-00001.lmdb"
    data = shard.read_bytes()
    size = {"half": len(data) // 2, "100": 100, "0": 0}[keep]
    # in a subprocess: a SIGBUS would kill it, and the test would see the signal
    code = f"""
from pathlib import Path
from torchrecord import TRDataset, ShardCorruptedError
ds = TRDataset({str(records)!r}, transform=None)
assert ds[0] is not None
shard = Path({str(shard)!r})
shard.write_bytes(shard.read_bytes()[:{size}])
try:
    ds[20]
except ShardCorruptedError as exc:
    print("CAUGHT", exc)
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert "CAUGHT shard" in result.stdout and "shard-00001.lmdb" in result.stdout
    assert "manifest recorded" in result.stdout


@pytest.mark.parametrize("damage", ["missing", "cut"])
def test_a_dataset_with_a_missing_or_cut_shard_is_refused_when_opened(records, damage):
    shard = records / "shard-00001.lmdb"
    if damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:8192])
    what = "shard-00001.lmdb is missing" if damage == "missing" else "is 8192 bytes but"
    with pytest.raises(DatasetError, match=f"{what}.* on_corrupt='skip'"):
        TRDataset(records)
    with pytest.warns(RuntimeWarning, match=f"{what}.* replaced by records of the next shards"):
        TRDataset(records, on_corrupt="skip")


def test_truncated_shard_with_a_manifest_that_agrees(records):
    """Even if the manifest is edited to the short size, LMDB's page count catches it."""
    shard = records / "shard-00001.lmdb"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    _resize_in_manifest(records, "shard-00001.lmdb")
    code = f"""
from torchrecord import TRDataset, ShardCorruptedError
try:
    TRDataset({str(records)!r}, transform=None)[20]
except ShardCorruptedError as exc:
    print("CAUGHT", exc)
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert "CAUGHT" in result.stdout and "truncated" in result.stdout


def test_legacy_dataset_is_detected(legacy_fixture):
    manifest = fmt.read_manifest(legacy_fixture / "record")
    assert manifest.legacy and manifest.codec == "raw_rgb"
    assert [(s.legacy_db, s.num_records) for s in manifest.shards] == [("db0", 20), ("db1", 20)]
    reader = RecordReader(legacy_fixture / "record")
    assert reader.key_of(1, 3) == b"03" and len(reader) == 40


def _rewrite_shard(records, name, edit):
    """Re-write a shard with its items edited, as a foreign tool might, with a manifest that
    agrees on the file's size: only the content is wrong."""
    path = records / name
    items = edit(raw_items(path))
    path.unlink()
    env = lmdb.open(str(path), subdir=False, map_size=64 << 20, lock=False)
    with env.begin(write=True) as txn:
        for key, value in items:
            assert txn.put(key, value)
    env.close()
    _resize_in_manifest(records, name, dict(items).get(b"__checksums__", b""))


@pytest.mark.parametrize("size", [0, 512])
def test_keys_lmdb_cannot_hold_are_refused_clearly(tmp_path, size):
    from torchrecord.errors import TorchRecordError
    from torchrecord.writer import _put_batch

    path = tmp_path / "keys.lmdb"
    env = lmdb.open(str(path), subdir=False, map_size=1 << 20, lock=False)
    try:
        assert env.max_key_size() == 511
        _put_batch(env, [(b"k" * 511, b"the longest key LMDB takes")], path)
        with pytest.raises(TorchRecordError, match=rf"keys must be 1 to 511 bytes.*\[{size}\]"):
            _put_batch(env, [(b"k" * size, b"value")], path, append=False)
        with env.begin() as txn:  # the refused batch left nothing behind
            assert txn.stat()["entries"] == 1
            assert txn.get(b"k" * 511) == b"the longest key LMDB takes"
    finally:
        env.close()


def test_a_record_under_a_foreign_key_or_a_stray_key_is_refused(records):
    record_3 = fmt.record_key(3)

    def rename(items):  # record 3 moves to a 511-byte key; the key count stays right
        return [(b"\xff" * 511 if k == record_3 else k, v) for k, v in items]

    _rewrite_shard(records, "shard-00000.lmdb", rename)
    _rewrite_shard(records, "shard-00001.lmdb", lambda items: [*items, (b"\x00", b"stray")])
    dataset = TRDataset(records, transform=None)
    for index in (3, 23):  # the shard is refused before LMDB maps it
        with pytest.raises(ShardCorruptedError, match="keys other than record keys and the two"):
            dataset[index]
    problems = [str(e) for e in verify(RecordReader(records))]
    assert len(problems) == 2 and "shard-00000.lmdb" in problems[0], problems
    assert "shard-00001.lmdb" in problems[1] and "LMDB structure is damaged" in problems[1]


class _Payload:
    """Unpickling this runs a shell command: what a hostile dataset would plant."""

    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.sentinel}",))


def test_a_hostile_dataset_executes_nothing(records, tmp_path):
    import pickle
    import subprocess
    import sys
    from pathlib import Path

    sentinel = tmp_path / "code-ran"
    bomb = pickle.dumps(_Payload(sentinel))

    def plant(items):  # record 1 becomes a pickle, with a checksum that matches it
        items = dict(items)
        items[fmt.record_key(1)] = bomb
        for part in (1, 2, 3):  # a whole record in one part
            items.pop(fmt.record_key(1, 2, part), None)
        meta = json.loads(items[b"__torchrecord__"])
        meta["num_keys"] = sum(len(k) == 8 for k in items)
        items[b"__torchrecord__"] = json.dumps(meta).encode()
        table = bytearray(items[b"__checksums__"])
        table[4:8] = zlib.crc32(bomb).to_bytes(4, "little")
        items[b"__checksums__"] = bytes(table)
        return sorted(items.items())

    _rewrite_shard(records, "shard-00000.lmdb", plant)
    dataset = TRDataset(records, transform=None)
    assert dataset[0] is not None
    key = fmt.record_key(1).hex()
    with pytest.raises(RecordCorruptedError, match=f"record key {key} .*not a msgpack"):
        dataset[1]
    cli = Path(sys.executable).parent / "torchrecord"
    result = subprocess.run([cli, "verify", records], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert key in result.stdout + result.stderr
    # a manifest naming Python objects instead of plugins imports nothing
    path = records / "manifest.json"
    doc = json.loads(path.read_text())
    doc["codec"] = "os:system"
    path.write_text(json.dumps(doc))
    with pytest.raises(UnknownPluginError, match="unknown codec 'os:system'"):
        TRDataset(records)[0]
    assert not sentinel.exists()


def _lmdb_layout(data: bytes) -> dict:
    """Where things are in a single-file LMDB 0.9 shard (64-bit): the current and the older
    meta page, the first leaf page and its first node holding a large value."""
    psize = struct.unpack_from("<I", data, 40)[0]
    txnids = [struct.unpack_from("<Q", data, i * psize + 144)[0] for i in (0, 1)]
    current = txnids.index(max(txnids))
    meta = current * psize
    depth, root = (
        struct.unpack_from("<H", data, meta + 94)[0],
        struct.unpack_from("<Q", data, meta + 128)[0],
    )
    page = root * psize
    for _ in range(depth - 1):  # down the leftmost branch: node 0's page number (48 bits)
        node = page + struct.unpack_from("<H", data, page + 16)[0]
        lo, hi, flags = struct.unpack_from("<HHH", data, node)
        page = (lo | hi << 16 | flags << 32) * psize
    lower = struct.unpack_from("<H", data, page + 12)[0]
    pointers = struct.unpack_from(f"<{(lower - 16) // 2}H", data, page + 16)
    big = next(page + p for p in pointers if struct.unpack_from("<H", data, page + p + 4)[0] & 1)
    return {
        "psize": psize,
        "meta": meta,
        "older_meta": (1 - current) * psize,
        "depth": depth,
        "leaf": page,
        "big_node": big,
    }


# Flipped bits in LMDB's own structure: (offset in the file, xor mask). Each must end in a
# ShardCorruptedError before LMDB maps the file. Without the structural check the older meta's
# txnid makes LMDB serve a stale snapshot, and a large value's size makes it copy past the end
# of the map: the process dies of SIGBUS (checked on this machine's LMDB 0.9.36).
FLIPS = {
    "meta-last-page": lambda s: (s["meta"] + 136, 0x0F),
    "meta-older-snapshot-txnid": lambda s: (s["older_meta"] + 144, 0x02),
    "meta-main-db-flags": lambda s: (s["meta"] + 92, 0xFF),
    "leaf-page-lower": lambda s: (s["leaf"] + 12, 0x40),
    "leaf-page-flags": lambda s: (s["leaf"] + 10, 0x03),
    "leaf-node-value-size": lambda s: (s["big_node"] + 3, 0x40),
}


def _errors_reading_every_record(records) -> list[str]:
    """Read every record in a fresh interpreter (a signal would show as a negative return
    code); one line per record that raised: its index, the error type and the message."""
    code = f"""
from torchrecord import TRDataset, DatasetError
ds = TRDataset({str(records)!r}, transform=None)
for i in range(len(ds)):
    try:
        ds[i]
    except DatasetError as exc:
        print(i, type(exc).__name__, exc)
"""
    result = run_python(code)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    return result.stdout.splitlines()


@pytest.mark.parametrize("where", list(FLIPS))
def test_flipped_byte_in_a_page_header_or_the_meta_page(records, where):
    shard = records / "shard-00000.lmdb"
    data = bytearray(shard.read_bytes())
    layout = _lmdb_layout(bytes(data))
    assert layout["psize"] == 4096  # the offsets below assume it
    offset, mask = FLIPS[where](layout)
    data[offset] ^= mask
    shard.write_bytes(bytes(data))
    lines = _errors_reading_every_record(records)
    assert lines and lines[0].startswith("0 ShardCorruptedError shard"), lines
    assert "shard-00000.lmdb" in lines[0] and "LMDB structure is damaged" in lines[0], lines


def test_the_structural_check_accepts_what_lmdb_may_legitimately_write(tmp_path):
    """Junk in the pad field of pages (``meminit=False``) and overflow pages kept by a large
    value overwritten with a smaller one: LMDB reads both, so must the check."""
    from torchrecord.lmdbcheck import validate

    path = tmp_path / "foreign.lmdb"
    env = lmdb.open(str(path), subdir=False, map_size=64 << 20, lock=False, meminit=False)
    with env.begin(write=True) as txn:
        for i in range(300):
            txn.put(struct.pack(">Q", i), bytes([i % 251]) * (100 + 97 * i))
        txn.put(struct.pack(">Q", 299), b"smaller" * 1500)  # 10 KB over 29 KB: pages kept
        txn.put(struct.pack(">Q", 298), b"smaller" * 100)  # big -> inline
    env.close()
    assert validate(path, torchrecord=False) == []
    for layout in (1, 2):
        assert validate(path, torchrecord=True, layout=layout) == [
            "the keys are not record keys followed by the two metadata keys"
        ]


def test_flipped_byte_in_an_overflow_page_header_names_the_record(records):
    shard = records / "shard-00000.lmdb"
    data = bytearray(shard.read_bytes())
    node = _lmdb_layout(bytes(data))["big_node"]
    key_size = struct.unpack_from("<H", data, node + 6)[0]
    key = bytes(data[node + 8 : node + 8 + key_size])
    first_page = struct.unpack_from("<Q", data, node + 8 + key_size)[0]
    data[first_page * 4096 + 10] ^= 0x01  # P_OVERFLOW | P_BRANCH: LMDB refuses it when read
    shard.write_bytes(bytes(data))
    index = struct.unpack(">Q", key)[0] // 4  # the key of a record's first part is 4 * index
    assert key == fmt.record_key(index)
    lines = _errors_reading_every_record(records)
    assert len(lines) == 1 and lines[0].startswith(f"{index} RecordCorruptedError shard"), lines
    assert f"record key {key.hex()}" in lines[0] and "LMDB cannot read it" in lines[0]
