"""The read-time policy for corrupt records: raise (default), warn or skip, with counts."""

from __future__ import annotations

import zlib

import pytest
from conftest import fingerprint, flip_record_byte, read_list

from torchrecord import (
    Codec,
    DatasetError,
    RecordCorruptedError,
    TorchRecord,
    TRDataset,
    Writer,
    hookimpl,
    make_record,
)
from torchrecord import format as fmt


@pytest.fixture
def damaged(photos, tmp_path):
    """A dataset whose record 5 of shard 0 has one flipped byte; returns (path, bad crc)."""
    out = tmp_path / "records"
    Writer(photos, out, db_num=2, codec="jpeg", shuffle=False).write()
    value = flip_record_byte(out / "shard-00000.lmdb", 5, mask=0x01)
    return out, zlib.crc32(
        TRDataset(out, transform=None).reader.serializer.loads(value).protos[0].byte_data
    )


def test_raise_is_the_default(damaged):
    out, _ = damaged
    loader = TorchRecord(out, batch_size=4, num_workers=2, transform=fingerprint, shuffle=False)
    with pytest.raises(RecordCorruptedError, match=fmt.record_key(5).hex()):
        for _ in loader:
            pass


def read_skipping(out, num_workers):
    """A loader with on_corrupt="skip" in stored order, and the (crc, label) of one epoch."""
    loader = TorchRecord(
        out,
        batch_size=5,
        num_workers=num_workers,
        transform=fingerprint,
        on_corrupt="skip",
        shuffle=False,
    )
    return loader, [(int(c), int(y)) for crcs, labels in loader for c, y in zip(crcs, labels)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_keeps_the_epoch_length_and_counts(photos, damaged, num_workers):
    out, bad_crc = damaged
    loader, seen = read_skipping(out, num_workers)
    assert len(seen) == 24  # the epoch keeps its length, and every batch its shape
    assert bad_crc not in {c for c, _ in seen}
    expected = sorted((zlib.crc32(p.read_bytes()), label) for p, label in read_list(photos))
    replacement = expected_of(photos, 6)
    assert sorted(seen) == sorted([x for x in expected if x[0] != bad_crc] + [replacement])
    corrupt = loader.corrupt_records
    assert len(corrupt) == 1 and corrupt[0]["index"] == 5
    assert corrupt[0]["error"] == "RecordCorruptedError"
    assert "shard-00000.lmdb" in corrupt[0]["message"]


def expected_of(photos, index):
    path, label = read_list(photos)[index]
    return zlib.crc32(path.read_bytes()), label


def test_warn_warns_and_substitutes(damaged):
    out, _ = damaged
    dataset = TRDataset(out, transform=fingerprint, on_corrupt="warn")
    with pytest.warns(RuntimeWarning, match="skipped corrupt record 5"):
        assert dataset[5] == dataset[6]
    assert [r["index"] for r in dataset.corrupt_records()] == [5]
    with pytest.raises(ValueError, match="on_corrupt must be one of"):
        TRDataset(out, on_corrupt="ignore")


def test_each_corrupt_record_is_listed_once(photos, tmp_path):
    """Records 5 and 6 both damaged: reading 5 tries 6 as its substitute and meets it too,
    then reading 6 meets it again; the list names each record once."""
    out = tmp_path / "records"
    Writer(photos, out, db_num=2, codec="jpeg", shuffle=False).write()
    for local in (5, 6):
        flip_record_byte(out / "shard-00000.lmdb", local, mask=0x01)
    loader = TorchRecord(out, batch_size=4, transform=fingerprint, on_corrupt="skip", shuffle=False)
    assert sum(len(labels) for _, labels in loader) == 24
    assert sum(len(labels) for _, labels in loader) == 24  # a second epoch meets them again
    corrupt = loader.corrupt_records
    assert [r["index"] for r in corrupt] == [5, 6]
    assert all(r["error"] == "RecordCorruptedError" for r in corrupt)


class WrongSizeCodec(Codec):
    """Odd labels' records claim more pixels than they hold: damaged, yet their CRC matches."""

    name = "test_wrong_size"

    def encode(self, path, label):
        size = (64, 48) if int(label) % 2 else (32, 24)
        return make_record(bytes(32 * 24 * 3), size, label, name=self.name)

    def decode_image(self, record):
        from PIL import Image

        proto = record.protos[0]
        return Image.frombytes("RGB", tuple(proto.dims), proto.byte_data)


class WrongSizePlugin:
    @hookimpl
    def torchrecord_register_codecs(self, register):
        register(WrongSizeCodec())


def test_an_image_that_does_not_decode_is_a_corrupt_record(photos, tmp_path):
    from torchrecord.plugins import register_plugin, unregister_plugin

    register_plugin(WrongSizePlugin(), name="test-wrong-size")
    try:
        lines = [f"{p} {i}" for i, (p, _) in enumerate(read_list(photos))]
        data_list = tmp_path / "list.txt"
        data_list.write_text("\n".join(lines) + "\n")
        out = tmp_path / "records"
        Writer(data_list, out, codec="test_wrong_size", shuffle=False).write()
        with pytest.raises(
            RecordCorruptedError, match=fmt.record_key(1).hex() + ".*does not decode"
        ):
            TRDataset(out)[1]
        assert TRDataset(out)[0][1] == 0  # even labels hold the pixels they claim
        # a transform of the user's own keeps its own errors
        with pytest.raises(ValueError):
            TRDataset(out, transform=WrongSizeCodec().decode_image)[1]
        skipping = TorchRecord(out, batch_size=4, on_corrupt="skip", shuffle=False)
        labels = [int(x) for _, batch in skipping for x in batch]
        assert len(labels) == 24 and all(label % 2 == 0 for label in labels)
        assert sorted(r["index"] for r in skipping.corrupt_records) == list(range(1, 24, 2))
    finally:
        unregister_plugin(name="test-wrong-size")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_replaces_a_missing_shard_by_the_next_shards_records(photos, tmp_path, num_workers):
    """The records of a shard that cannot be read are replaced by the next shard's first
    record (they used to be tried one by one, 64 at most, and a shard of more records ended
    the epoch with an error naming no shard)."""
    out = tmp_path / "records"
    Writer(photos, out, db_num=4, codec="jpeg", shuffle=False).write()
    (out / "shard-00001.lmdb").unlink()
    with pytest.warns(RuntimeWarning, match="shard-00001.lmdb is missing"):
        loader, seen = read_skipping(out, num_workers)
    expected = [expected_of(photos, i) for i in range(24)]
    assert seen == expected[:6] + [expected[12]] * 6 + expected[12:]
    corrupt = loader.corrupt_records
    assert sorted(c["index"] for c in corrupt) == list(range(6, 12))  # (workers: any order)
    assert all(c["error"] == "ShardCorruptedError" for c in corrupt)
    assert all("shard-00001.lmdb" in c["message"] for c in corrupt)

    for name in ("shard-00000.lmdb", "shard-00002.lmdb", "shard-00003.lmdb"):
        (out / name).unlink()
    with pytest.warns(RuntimeWarning):
        dataset = TRDataset(out, transform=fingerprint, on_corrupt="skip")
    with pytest.raises(DatasetError, match="no sound record could stand in for record 3") as info:
        dataset[3]
    assert "shard-0000" in str(info.value) and info.value.__cause__ is not None
