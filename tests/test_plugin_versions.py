"""Plugin format versions: a codec that changes its records' layout says so, TorchRecord records
the version with each dataset, and a codec of another version reads it only if it can.

The codecs here are registered at run time and store 8x8 thumbnails of the real photographs:
version 1 in RGB order, version 2 in BGR order (a layout version 1 would misread: swapped
channels), version 3 reads neither earlier layout.
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from conftest import read_list
from PIL import Image

import torchrecord
from torchrecord import TorchRecord, TRDataset, Writer, plugins
from torchrecord.errors import (
    DatasetError,
    DatasetExistsError,
    PluginError,
    PluginVersionError,
)
from torchrecord.writer import join_parts

NAME = "test_layout"


def thumbnail(path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB").resize((8, 8))


class LayoutV1(torchrecord.Codec):
    name = NAME

    def encode(self, path, label):
        small = thumbnail(path)
        return torchrecord.make_record(small.tobytes(), small.size, label, name=self.name)

    def decode_image(self, record):
        proto = record.protos[0]
        return Image.frombytes("RGB", tuple(proto.dims), proto.byte_data)


class LayoutV2(LayoutV1):
    format_version = 2

    def encode(self, path, label):
        small = thumbnail(path)
        bgr = Image.merge("RGB", small.split()[::-1])
        return torchrecord.make_record(bgr.tobytes(), small.size, label, name=self.name)

    def decode_image(self, record):
        bgr = super().decode_image(record)
        return Image.merge("RGB", bgr.split()[::-1])

    def for_format_version(self, version):
        return LayoutV1() if version == 1 else None


class LayoutV3(LayoutV2):
    format_version = 3

    def for_format_version(self, version):
        return None  # reads no earlier layout


class _Plugin:
    def __init__(self, codec=None, serializer=None):
        self.codec, self.serializer = codec, serializer

    @torchrecord.hookimpl
    def torchrecord_register_codecs(self, register):
        if self.codec is not None:
            register(self.codec)

    @torchrecord.hookimpl
    def torchrecord_register_serializers(self, register):
        if self.serializer is not None:
            register(self.serializer)


@contextlib.contextmanager
def use(codec):
    """``codec`` registered under NAME while the block runs (one version at a time)."""
    name = plugins.register_plugin(_Plugin(codec), name=f"test-layout-{codec.format_version}")
    try:
        yield
    finally:
        plugins.unregister_plugin(name=name)


@contextlib.contextmanager
def use_serializer(serializer):
    """``serializer`` registered while the block runs (one version at a time)."""
    tag = f"test-layout-ser-{serializer.format_version}"
    name = plugins.register_plugin(_Plugin(serializer=serializer), name=tag)
    try:
        yield
    finally:
        plugins.unregister_plugin(name=name)


def write(photos, out, codec, **options):
    with use(codec):
        return Writer(photos, out, db_num=2, codec=NAME, shuffle=False, **options).write()


def pixels(images) -> list[bytes]:
    return [image.tobytes() for image in images]


def test_the_version_is_recorded_and_a_lower_one_refuses_to_read(photos, tmp_path):
    out = tmp_path / "v2"
    write(photos, out, LayoutV2())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["plugins"]["codec"]["format_version"] == 2
    expected = pixels(thumbnail(path) for path, _ in read_list(photos))
    with use(LayoutV2()):
        dataset = TRDataset(out, transform=None)
        codec = dataset.reader.codec
        assert pixels(codec.decode_image(dataset[i]) for i in range(len(dataset))) == expected
    with use(LayoutV1()):  # it would swap the channels of every image
        for make in (lambda: TRDataset(out), lambda: TorchRecord(out, batch_size=4)):
            with pytest.raises(PluginVersionError) as caught:
                make()
            message = str(caught.value)
            assert str(out) in message and f"codec {NAME!r} format version 2" in message
            assert "reads versions up to 1" in message and "Register the version" in message


@pytest.mark.parametrize("workers", [0, 2])
def test_a_newer_codec_reads_older_records_through_for_format_version(photos, tmp_path, workers):
    out = tmp_path / "v1"
    write(photos, out, LayoutV1())
    samples = read_list(photos)
    expected = pixels(thumbnail(path) for path, _ in samples)
    options = dict(batch_size=4, num_workers=workers, shuffle=False, transform="uint8")
    with use(LayoutV1()):
        reference = [(images.clone(), labels) for images, labels in TorchRecord(out, **options)]
    with use(LayoutV2()):
        dataset = TRDataset(out, transform=None)
        assert type(dataset.reader.codec) is LayoutV1  # what LayoutV2 gives for version 1
        codec = dataset.reader.codec
        assert pixels(codec.decode_image(dataset[i]) for i in range(len(dataset))) == expected
        batches = [(images.clone(), labels) for images, labels in TorchRecord(out, **options)]
    assert len(batches) == len(reference) == len(samples) // 4
    for (images, labels), (want, want_labels) in zip(batches, reference):
        assert torch.equal(images, want) and torch.equal(labels, want_labels)


def test_a_codec_that_no_longer_reads_a_layout_says_so(photos, tmp_path):
    out = tmp_path / "v1"
    write(photos, out, LayoutV1())
    with use(LayoutV3()), pytest.raises(PluginVersionError, match="no longer reads"):
        TRDataset(out)


def test_append_keeps_one_layout_and_another_version_is_another_write(photos, tmp_path):
    out = tmp_path / "v1"
    write(photos, out, LayoutV1())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ValueError, match="format version 1, and the codec here .* version 2"):
        write(photos, out, LayoutV2(), append=True, allow_duplicates=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched
    with pytest.raises(DatasetExistsError) as caught:  # (a rerun: append is no way out here)
        write(photos, out, LayoutV2())
    assert "written with codec 'test_layout' format version 1" in str(caught.value)
    assert "--append" not in str(caught.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with use(LayoutV1()):  # (version 1 keeps the job ids of writes made before versions)
        assert Writer(photos, tmp_path / "a", codec=NAME)._job_params(0)[1] == NAME
    with use(LayoutV2()):
        assert Writer(photos, tmp_path / "b", codec=NAME)._job_params(0)[1] == f"{NAME}@2"
    assert Writer(photos, tmp_path / "c", codec="jpeg")._job_params(0)[1] == "jpeg"


def test_join_refuses_parts_of_two_layouts(photos, tmp_path):
    write(photos, tmp_path / "part0", LayoutV1(), shard_range=(0, 1))
    write(photos, tmp_path / "part1", LayoutV2(), shard_range=(1, 2))
    with pytest.raises(ValueError, match="different format versions of their codec"):
        join_parts(tmp_path / "joined", [tmp_path / "part0", tmp_path / "part1"])
    assert not (tmp_path / "joined" / "manifest.json").exists()


@pytest.mark.parametrize("bad", [0, "2", True, 1.0])
def test_a_format_version_that_is_not_a_positive_int_is_refused(bad):
    class Odd(LayoutV1):
        format_version = bad

    with pytest.raises(PluginError, match="format_version"):
        plugins.register_plugin(_Plugin(Odd()), name="test-layout-odd")
    assert NAME not in [info.name for info in plugins.list_codecs()]


def test_a_damaged_recorded_version_is_a_clear_error(photos, tmp_path, capsys):
    from torchrecord.cli import main

    out = tmp_path / "v1"
    write(photos, out, LayoutV1())
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["plugins"]["codec"]["format_version"] = "two"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with use(LayoutV1()):
        with pytest.raises(DatasetError, match="invalid plugins.codec.format_version 'two'"):
            TRDataset(out)
        assert main(["verify", str(out)]) == 1  # a damaged manifest: a problem found
    assert "BAD" in capsys.readouterr().out
    del manifest["plugins"]["codec"]["format_version"]  # as written before versions: 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    with use(LayoutV2()):
        assert type(TRDataset(out).reader.codec) is LayoutV1


def test_info_names_the_version_and_says_when_it_cannot_be_read_here(photos, tmp_path, capsys):
    from torchrecord.cli import main

    out = tmp_path / "v2"
    write(photos, out, LayoutV2())
    with use(LayoutV2()):
        assert main(["info", str(out)]) == 0
    shown = capsys.readouterr()
    assert "format version 2)" in shown.out and "cannot be read here" not in shown.err
    with use(LayoutV1()):
        assert main(["info", str(out)]) == 0
    shown = capsys.readouterr()
    assert "cannot be read here" in shown.err and "reads versions up to 1" in shown.err


class SerializerV1:
    """msgpack under another name; version 2 stores its bytes reversed."""

    name = "test_layout_ser"
    format_version = 1

    def dumps(self, record):
        from torchrecord.serializers.msgpack import MsgpackSerializer

        return MsgpackSerializer().dumps(record)

    def loads(self, data):
        from torchrecord.serializers.msgpack import MsgpackSerializer

        return MsgpackSerializer().loads(bytes(data))


class SerializerV2(SerializerV1):
    format_version = 2

    def dumps(self, record):
        return super().dumps(record)[::-1]

    def loads(self, data):
        return super().loads(bytes(data)[::-1])


def test_a_serializers_version_is_recorded_and_checked_the_same_way(photos, tmp_path):
    out = tmp_path / "ser2"
    name = plugins.register_plugin(_Plugin(serializer=SerializerV2()), name="test-ser-2")
    try:
        Writer(photos, out, db_num=2, codec="jpeg", serializer=SerializerV2.name).write()
        labels = sorted(label for _, label in TRDataset(out, transform="uint8"))
    finally:
        plugins.unregister_plugin(name=name)
    assert labels == sorted(label for _, label in read_list(photos))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["plugins"]["serializer"]["format_version"] == 2
    name = plugins.register_plugin(_Plugin(serializer=SerializerV1()), name="test-ser-1")
    try:
        with pytest.raises(PluginVersionError, match="serializer 'test_layout_ser' format"):
            TorchRecord(out, batch_size=4)
    finally:
        plugins.unregister_plugin(name=name)


class SerializerV3(SerializerV2):
    format_version = 3

    def dumps(self, record):  # (version 3 adds a byte before version 2's layout)
        return b"3" + super().dumps(record)

    def loads(self, data):
        return super().loads(bytes(data)[1:])

    def for_format_version(self, version):
        return SerializerV2() if version == 2 else None


def test_a_newer_serializer_reads_older_records_and_verify_checks_by_crc_when_it_cannot(
    photos, tmp_path, capsys
):
    from torchrecord.cli import main

    out = tmp_path / "ser2"
    with use(LayoutV1()), use_serializer(SerializerV2()):
        Writer(
            photos, out, db_num=2, codec=NAME, serializer=SerializerV2.name, shuffle=False
        ).write()
        assert Writer(photos, tmp_path / "x", serializer=SerializerV2.name)._job_params(0)[2] == (
            f"{SerializerV2.name}@2"
        )
    expected = pixels(thumbnail(path) for path, _ in read_list(photos))
    with use(LayoutV1()), use_serializer(SerializerV3()):
        dataset = TRDataset(out, transform=None)
        assert type(dataset.reader.serializer) is SerializerV2
        codec = dataset.reader.codec
        assert pixels(codec.decode_image(dataset[i]) for i in range(len(dataset))) == expected
        assert main(["verify", str(out), "--decode"]) == 0
    assert "24 records (decoded)" in capsys.readouterr().out
    with use(LayoutV1()), use_serializer(SerializerV1()):
        assert main(["verify", str(out)]) == 0  # sound bytes, which nothing here parses
    shown = capsys.readouterr()
    assert "by CRC-32 only" in shown.out and "reads versions up to 1" in shown.err


def test_a_built_in_of_a_later_torchrecord_says_to_upgrade_torchrecord(photos, tmp_path):
    out = tmp_path / "jpeg"
    Writer(photos, out, db_num=2, codec="jpeg").write()
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["plugins"]["codec"]["format_version"] = 2  # as a later release might write
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PluginVersionError, match=r"pip install -U 'torchrecord'"):
        TRDataset(out)
