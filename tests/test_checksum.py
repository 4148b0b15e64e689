"""The records' CRC-32: zlib-ng's where it is installed, Python's zlib otherwise, with the same
values, so that a dataset written with either is read and checked with the other."""

from __future__ import annotations

import array
import json
import sys
import types
import zlib

import pytest
from conftest import flip_record_byte, run_python
from hypothesis import given, settings
from hypothesis import strategies as st

from torchrecord import RecordCorruptedError, TRDataset, Writer, checksum
from torchrecord import format as fmt


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=70_000), start=st.integers(0, 2**32 - 1))
def test_the_same_values_as_zlib(data, start):
    assert checksum.crc32(data) == zlib.crc32(data)
    assert checksum.crc32(data, start) == zlib.crc32(data, start)


def test_the_buffers_the_format_passes():
    table = array.array("I", range(5000))  # a shard's checksum table
    assert checksum.crc32(table) == zlib.crc32(table)
    raw = bytes(range(256)) * 2000
    assert checksum.crc32(memoryview(raw)[3:]) == zlib.crc32(raw[3:])
    assert checksum.crc32(bytearray(raw)) == zlib.crc32(raw)


def test_zlib_ng_is_used_where_installed(monkeypatch):
    pytest.importorskip("zlib_ng")
    monkeypatch.delenv(checksum.ENV, raising=False)
    assert checksum._choose()[0] == "zlib-ng"
    monkeypatch.setenv(checksum.ENV, "zlib")
    assert checksum._choose() == ("zlib", zlib.crc32)
    monkeypatch.setenv(checksum.ENV, "crc32c")
    with pytest.raises(ValueError, match="use 'zlib' or 'zlib-ng'"):
        checksum._choose()


def test_without_zlib_ng_python_s_zlib_does_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "zlib_ng", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "zlib_ng.zlib_ng", None)
    monkeypatch.delenv(checksum.ENV, raising=False)
    assert checksum._choose() == ("zlib", zlib.crc32)
    monkeypatch.setenv(checksum.ENV, "zlib-ng")  # asked for by name: an error, not a fallback
    with pytest.raises(ImportError, match=r"pip install 'torchrecord\[fast\]'"):
        checksum._choose()


def test_a_build_that_disagrees_with_zlib_is_not_used(monkeypatch):
    """A zlib-ng that got one length wrong would call sound records damaged: zlib is kept."""

    def off_by_one_length(data, value=0):
        return zlib.crc32(data, value) ^ (len(data) == 64)

    fake = types.ModuleType("zlib_ng.zlib_ng")
    fake.crc32 = off_by_one_length
    package = types.ModuleType("zlib_ng")
    package.zlib_ng = fake
    monkeypatch.setitem(sys.modules, "zlib_ng", package)
    monkeypatch.setitem(sys.modules, "zlib_ng.zlib_ng", fake)
    monkeypatch.delenv(checksum.ENV, raising=False)
    with pytest.warns(RuntimeWarning, match="differs from zlib's here .on 64 bytes"):
        assert checksum._choose() == ("zlib", zlib.crc32)
    monkeypatch.setenv(checksum.ENV, "zlib-ng")  # asked for by name: an error
    with pytest.raises(ImportError, match="reinstall zlib-ng, or unset TORCHRECORD_CRC32"):
        checksum._choose()


def test_the_reader_and_the_writer_check_with_the_chosen_crc32():
    import torchrecord.reader
    import torchrecord.writer

    assert torchrecord.reader.crc32 is checksum.crc32
    assert torchrecord.writer.crc32 is checksum.crc32


READ_WITH_ZLIB = """
import json, sys
from torchrecord import RecordCorruptedError, TRDataset, checksum
assert checksum.IMPLEMENTATION == "zlib", checksum.IMPLEMENTATION
dataset = TRDataset(sys.argv[1], transform=None)
out = {"crc32s": [], "bad": []}
for i in range(len(dataset)):
    try:
        out["crc32s"].append(checksum.crc32(dataset.reader.read_bytes(i)))
    except RecordCorruptedError as exc:
        out["bad"].append([i, str(exc)])
print(json.dumps(out))
"""


def test_written_with_one_read_and_checked_with_the_other(photos, tmp_path):
    pytest.importorskip("zlib_ng")
    if checksum.IMPLEMENTATION != "zlib-ng":
        pytest.skip(f"{checksum.ENV} keeps Python's zlib in this run")
    fast, plain = tmp_path / "zlib-ng", tmp_path / "zlib"
    Writer(photos, fast, db_num=2, codec="jpeg", shuffle=False).write()
    done = run_python(
        "import sys\nfrom torchrecord import Writer, checksum\n"
        "assert checksum.IMPLEMENTATION == 'zlib'\n"
        f"Writer({str(photos)!r}, {str(plain)!r}, db_num=2, codec='jpeg', shuffle=False).write()",
        env={checksum.ENV: "zlib"},
    )
    assert done.returncode == 0, done.stderr
    for name in ("shard-00000.lmdb", "shard-00001.lmdb"):  # the same CRC-32s, the same bytes
        assert (fast / name).read_bytes() == (plain / name).read_bytes()

    flip_record_byte(plain / "shard-00001.lmdb", 4)  # record 12 + 4 of the dataset
    dataset = TRDataset(plain, transform=None)
    with pytest.raises(RecordCorruptedError, match=fmt.record_key(4).hex()):
        dataset.reader.read_bytes(16)
    by_zlib = run_python(
        READ_WITH_ZLIB.replace("sys.argv[1]", repr(str(plain))), env={checksum.ENV: "zlib"}
    )
    assert by_zlib.returncode == 0, by_zlib.stderr
    seen = json.loads(by_zlib.stdout)
    assert [i for i, _ in seen["bad"]] == [16]
    assert "shard-00001.lmdb" in seen["bad"][0][1] and "CRC-32" in seen["bad"][0][1]
    sound = TRDataset(fast, transform=None).reader
    assert seen["crc32s"] == [zlib.crc32(sound.read_bytes(i)) for i in range(24) if i != 16]
