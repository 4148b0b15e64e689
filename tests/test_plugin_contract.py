"""What a plugin's codec and serializer get from TorchRecord and must give back: the options
and labels a codec's ``encode`` receives, the decoded images it returns (checked), its bugs told
apart from damaged data, the names it may take, and plugins registered at run time reaching
worker processes started by spawn.

The codec is a real one (raw RGB pixels through Pillow, of real JPEG photographs), registered
at run time or installed as a distribution with an entry point; its faults are switched on per
test.
"""

from __future__ import annotations

import json
import os
import textwrap
import warnings

import pytest
import torch
from conftest import read_list, run_python
from PIL import Image
from test_plugins import (
    clashing_source,
    make_distribution,
    plugins_command,
    run_json,
    site_env,
)

import torchrecord
import torchrecord.plugins as plugins
from torchrecord.errors import PluginError, RecordCorruptedError
from torchrecord.reader import RecordReader, verify


class FaultyCodec(torchrecord.Codec):
    """RGB pixels, stored as they are; ``fault`` makes its decode break the contract."""

    name = "test_faulty"

    def __init__(self):
        self.fault: str | None = None
        self.labels: list = []

    def encode(self, path, label, max_size=None):
        self.labels.append(label)
        with Image.open(path) as img:
            rgb = img.convert("RGB")
        if max_size:
            rgb.thumbnail((max_size, max_size))
        return torchrecord.make_record(rgb.tobytes(), rgb.size, label, name=self.name)

    def decode_image(self, record):
        proto = record.protos[0]
        odd = int(record.protos[1].byte_data) % 2 == 1
        if self.fault == "none":
            return None
        if self.fault == "typeerror" and odd:
            raise TypeError("unsupported operand")  # a bug, whatever the data
        if self.fault == "valueerror" and odd:
            raise ValueError("the pixels end early")  # what bad data gives
        img = Image.frombytes("RGB", tuple(proto.dims), proto.byte_data)
        return img.convert("L") if self.fault == "grey" else img

    def decode_tensor(self, record):
        image = super().decode_tensor(record)
        if self.fault == "hwc":
            return image.permute(1, 2, 0)
        if self.fault == "float":
            return image.float()
        return image


class OptionsCodec(FaultyCodec):
    """Takes every option (``**options``) and remembers them."""

    name = "test_options"

    def encode(self, path, label, **options):
        self.options = options
        return super().encode(path, label, options.get("max_size"))


class _Plugin:
    def __init__(self, *codecs):
        self.codecs = codecs

    @torchrecord.hookimpl
    def torchrecord_register_codecs(self, register):
        for codec in self.codecs:
            register(codec)


@pytest.fixture
def faulty():
    codec, options = FaultyCodec(), OptionsCodec()
    name = plugins.register_plugin(_Plugin(codec, options), name="test-faulty-plugin")
    yield codec, options
    plugins.unregister_plugin(name=name)


def test_max_size_reaches_a_codec_that_takes_no_quality(faulty, photos, tmp_path):
    """max_size without quality works with a plugin's codec whose encode has max_size only
    (no quality is made up for it); quality asked of it is refused by name; a codec with
    **options gets both, quality at its default."""
    codec, options_codec = faulty
    out = tmp_path / "small"
    torchrecord.Writer(photos, out, codec="test_faulty", max_size=40, shuffle=False).write()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["image_policy"] == {"max_size": 40}
    reader = RecordReader(out)
    sizes = [tuple(reader.read_record(i).protos[0].dims) for i in range(len(reader))]
    assert len(sizes) == len(read_list(photos)) and max(max(s) for s in sizes) == 40
    reader.close()

    with pytest.raises(ValueError, match="'test_faulty' does not support quality"):
        torchrecord.Writer(photos, tmp_path / "q", codec="test_faulty", max_size=40, quality=80)

    torchrecord.Writer(photos, tmp_path / "all", codec="test_options", max_size=50).write()
    assert options_codec.options == {"max_size": 50, "quality": 90}


def test_a_codec_gets_the_labels_as_integers(faulty, photos, tmp_path):
    """Labels written "07" or "+3" in a data list reach a codec as 7 and 3, and are stored so
    (as the built-in codecs store them)."""
    codec, _ = faulty
    samples = read_list(photos)[:4]
    written = ["07", "+3", "0", "12"]
    data_list = tmp_path / "odd_labels.txt"
    data_list.write_text("".join(f"{p} {label}\n" for (p, _), label in zip(samples, written)))
    out = tmp_path / "out"
    torchrecord.Writer(data_list, out, codec="test_faulty", shuffle=False).write()
    assert codec.labels == [7, 3, 0, 12]
    reader = RecordReader(out)
    assert [reader.read_record(i).protos[1].byte_data for i in range(4)] == [
        b"7",
        b"3",
        b"0",
        b"12",
    ]
    reader.close()


@pytest.fixture
def faulty_dataset(faulty, photos, tmp_path):
    codec, _ = faulty
    out = tmp_path / "faulty"
    torchrecord.Writer(photos, out, codec="test_faulty", shuffle=False).write()
    return codec, out


@pytest.mark.parametrize(
    "fault, transform, said",
    [
        ("hwc", "fast", "decode_tensor() returned a uint8 tensor of shape ("),
        ("float", "uint8", "decode_tensor() returned a float32 tensor of shape (3, "),
        ("none", "pil", "decode_image() returned NoneType"),
    ],
)
def test_what_a_codec_decodes_is_checked(faulty_dataset, fault, transform, said):
    """A decoded image of the wrong type or layout is the codec's error, named as such, under
    every transform and in `verify --decode`; not a shape error deep in collation, and not a
    damaged record."""
    codec, out = faulty_dataset
    codec.fault = fault
    dataset = torchrecord.TRDataset(out, transform=transform)
    with pytest.raises(PluginError) as caught:
        dataset[0]
    message = str(caught.value)
    assert said in message and "'test_faulty' (registered at run time)" in message
    assert "not damage to the dataset" in message
    loader = torchrecord.TorchRecord(out, transform=transform, batch_size=4, num_workers=0)
    with pytest.raises(PluginError, match="test_faulty"):
        next(iter(loader))
    if transform != "pil":  # (verify decodes as the default transform does: tensors)
        with pytest.raises(PluginError, match=r"decode_tensor\(\) returned"):
            list(verify(RecordReader(out), decode=True))
    dataset.close()


def test_a_grey_image_from_a_codec_comes_out_rgb_under_every_transform(faulty_dataset):
    codec, out = faulty_dataset
    codec.fault = "grey"
    shapes = {}
    for transform in ("pil", "fast", "uint8"):
        image, _ = torchrecord.TRDataset(out, transform=transform)[2]
        shapes[transform] = tuple(image.shape)
        assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    assert set(shapes.values()) == {(3, 224, 224)}


def test_a_bug_in_a_codec_is_not_skipped_as_a_corrupt_record(faulty_dataset):
    """A TypeError from a codec's decode of a record whose checksum holds is a bug in the
    plugin: an error naming it even with on_corrupt="skip", which would otherwise replace its
    records silently. A ValueError (what bad image data gives) stays a corrupt record, and the
    message names the codec."""
    codec, out = faulty_dataset
    codec.fault = "typeerror"
    loader = torchrecord.TorchRecord(
        out, shuffle=False, batch_size=4, num_workers=0, on_corrupt="skip"
    )
    with pytest.raises(PluginError, match="TypeError: unsupported operand") as caught:
        list(loader)
    assert "is a bug in the codec" in str(caught.value)
    assert loader.corrupt_records == []
    with pytest.raises(PluginError, match="TypeError"):
        list(verify(RecordReader(out), decode=True))

    codec.fault = "valueerror"
    odd = [i for i, label in _labels(out) if label % 2]
    with pytest.raises(RecordCorruptedError) as caught:
        torchrecord.TRDataset(out, transform="pil")[odd[0]]
    assert "'test_faulty' (registered at run time)" in str(caught.value)
    skipping = torchrecord.TorchRecord(
        out, shuffle=False, batch_size=4, num_workers=0, on_corrupt="skip"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        labels = torch.cat([batch[1] for batch in skipping])
    assert len(labels) == len(skipping.dataset) and (labels % 2 == 0).all()
    assert sorted(r["index"] for r in skipping.corrupt_records) == odd
    problems = list(verify(RecordReader(out), decode=True))
    assert len(problems) == len(odd) and all("test_faulty" in str(p) for p in problems)


def _labels(out):
    reader = RecordReader(out)
    try:
        return [(i, int(reader.read_record(i).protos[1].byte_data)) for i in range(len(reader))]
    finally:
        reader.close()


class _NoHooks:
    def torchrecord_register_codecs(self, register):  # no @hookimpl: pluggy ignores it
        register(FaultyCodec())


class _Named(FaultyCodec):
    name = "ｗｅｂｐ"  # full-width letters: alphanumeric, but not ASCII


def test_registration_mistakes_are_named():
    with pytest.raises(PluginError, match=r"register an instance: register\(FaultyCodec\(\)\)"):
        plugins.register_plugin(_Plugin(FaultyCodec), name="test-class-plugin")
    with pytest.raises(PluginError, match="use ASCII letters, digits and underscores"):
        plugins.register_plugin(_Plugin(_Named()), name="test-fullwidth-plugin")
    with pytest.warns(RuntimeWarning, match="implements no hook.*@torchrecord.hookimpl"):
        name = plugins.register_plugin(_NoHooks(), name="test-nohooks-plugin")
    plugins.unregister_plugin(name=name)
    assert "test_faulty" not in {info.name for info in plugins.list_codecs()}


SHADOW_SOURCE = clashing_source("jpeg")


def test_no_plugin_can_take_a_builtin_name(tmp_path, photos):
    """An installed plugin that registers "jpeg" is ignored for that name, with a warning and
    a line in `torchrecord plugins`: the built-in keeps working (before, the name became
    unusable, and with it every jpeg dataset). Strict mode, and registering at run time,
    make it an error."""
    site = tmp_path / "site"
    make_distribution(site, "shadowplug", "shadowplug_mod", SHADOW_SOURCE, "shadow")
    out = tmp_path / "jpeg"
    result = run_json(
        f"""
        import json, warnings
        import torchrecord, torchrecord.plugins as plugins
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            codec = plugins.get_codec("jpeg")
        torchrecord.Writer({str(photos)!r}, {str(out)!r}, codec="jpeg", shuffle=False).write()
        image, label = torchrecord.TRDataset({str(out)!r})[0]
        print(json.dumps({{
            "class": type(codec).__module__,
            "warnings": [str(w.message) for w in caught],
            "shape": list(image.shape),
            "label": label,
        }}))
        """,
        site_env(site),
    )
    assert result["class"] == "torchrecord.codecs.jpeg"
    assert result["shape"] == [3, 224, 224] and result["label"] == read_list(photos)[0][1]
    assert any(
        "shadowplug 1.0) registers a codec named 'jpeg', the name of TorchRecord's own" in w
        for w in result["warnings"]
    )
    proc = plugins_command(site)
    assert "failed:   TorchRecord plugin shadowplug:shadow" in proc.stdout
    assert any(
        line.split()[:3] == ["codec", "jpeg", "torchrecord"] for line in proc.stdout.splitlines()
    )

    strict = run_python(
        "import torchrecord.plugins as p; p.get_codec('raw_rgb')",
        env=site_env(site, TORCHRECORD_STRICT_PLUGINS="1"),
    )
    assert strict.returncode != 0 and "the name of TorchRecord's own codec" in strict.stderr

    class Shadow(FaultyCodec):
        name = "raw_rgb"

    with pytest.raises(torchrecord.DuplicatePluginError, match="TorchRecord's own codec"):
        plugins.register_plugin(_Plugin(Shadow()), name="test-shadow-plugin")
    assert type(plugins.get_codec("raw_rgb")).__module__ == "torchrecord.codecs.raw_rgb"


class StrSerializer:
    name = "test_str"

    def dumps(self, record):
        return record.SerializeToString().hex()  # a str: the bug

    def loads(self, data):
        raise NotImplementedError


class _SerializerPlugin:
    @torchrecord.hookimpl
    def torchrecord_register_serializers(self, register):
        register(StrSerializer())


def test_a_serializer_that_returns_text_is_named_not_blamed_on_a_line(photos, tmp_path):
    name = plugins.register_plugin(_SerializerPlugin(), name="test-str-plugin")
    try:
        out = tmp_path / "out"
        writer = torchrecord.Writer(
            photos, out, codec="jpeg", serializer="test_str", on_error="skip"
        )
        with pytest.raises(PluginError, match="serializer 'test_str' .* returned str, not bytes"):
            writer.write()
        assert not (out / "manifest.json").exists()  # nothing published
    finally:
        plugins.unregister_plugin(name=name)


PLUGIN_MODULE = '''
import torchrecord
from PIL import Image


class TinyCodec(torchrecord.Codec):
    """8x8 RGB thumbnails (a run-time plugin, in a module the spawned workers can import)."""

    name = "test_tiny"

    def encode(self, path, label):
        with Image.open(path) as img:
            small = img.convert("RGB").resize((8, 8))
        return torchrecord.make_record(small.tobytes(), small.size, label, name=self.name)

    def decode_image(self, record):
        proto = record.protos[0]
        return Image.frombytes("RGB", tuple(proto.dims), proto.byte_data)


class TinySerializer:
    """msgpack under another name, registered at run time too."""

    name = "test_tinyser"

    def dumps(self, record):
        from torchrecord.serializers.msgpack import MsgpackSerializer

        return MsgpackSerializer().dumps(record)

    def loads(self, data):
        from torchrecord.serializers.msgpack import MsgpackSerializer

        return MsgpackSerializer().loads(data)


class Plugin:
    @torchrecord.hookimpl
    def torchrecord_register_codecs(self, register):
        register(TinyCodec())

    @torchrecord.hookimpl
    def torchrecord_register_serializers(self, register):
        register(TinySerializer())
'''


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_a_plugin_registered_at_run_time_reaches_spawned_workers(photos, tmp_path, method):
    """register_plugin in the main process is enough for writer and loader workers started by
    spawn or forkserver (the default start method of Python 3.14 on Linux): they do not
    inherit the registry, so the codec and serializer go along with the job."""
    (tmp_path / "tinyplug.py").write_text(PLUGIN_MODULE)
    out = tmp_path / "out"
    result = run_python(
        f"""
import json, multiprocessing
multiprocessing.set_start_method({method!r})
import torch, torchrecord, torchrecord.plugins as plugins
import tinyplug
plugins.register_plugin(tinyplug.Plugin(), name="tiny")
torchrecord.Writer({str(photos)!r}, {str(out)!r}, db_num=2, codec="test_tiny",
                   serializer="test_tinyser", num_workers=2, shuffle=False).write()
loader = torchrecord.TorchRecord({str(out)!r}, shuffle=False, batch_size=5, num_workers=2,
                                 transform="uint8")
images, labels = zip(*loader)
print(json.dumps({{"labels": torch.cat(labels).tolist(),
                   "first": torch.cat(images)[0, :, 0, 0].tolist()}}))
""",
        env={"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.splitlines()[-1])
    samples = read_list(photos)
    assert got["labels"] == [label for _, label in samples]
    with Image.open(samples[0][0]) as img:
        corner = img.convert("RGB").resize((8, 8)).getpixel((0, 0))
    assert got["first"] == list(corner)  # an 8x8 image resized up: its corner pixel


def test_verify_without_the_serializer_checks_the_crcs(photos, tmp_path):
    """A dataset whose serializer is not installed where it is verified is still checked
    byte for byte (shard hashes, record CRC-32s), and says so; a flipped byte is found."""
    (tmp_path / "tinyplug.py").write_text(PLUGIN_MODULE)
    out = tmp_path / "out"
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    written = run_python(
        f"""
import torchrecord, torchrecord.plugins as plugins
import tinyplug
plugins.register_plugin(tinyplug.Plugin(), name="tiny")
torchrecord.Writer({str(photos)!r}, {str(out)!r}, codec="jpeg", serializer="test_tinyser",
                   shuffle=False).write()
""",
        env=env,
    )
    assert written.returncode == 0, written.stderr[-3000:]
    check = textwrap.dedent(
        f"""
        import sys
        from torchrecord.cli import main
        sys.exit(main(["verify", {str(out)!r}]))
        """
    )
    sound = run_python(check)
    assert sound.returncode == 0, sound.stdout + sound.stderr
    n = len(read_list(photos))
    assert f"OK: checked {n} records (by CRC-32 only: serializer 'test_tinyser'" in sound.stdout

    shard = out / "shard-00000.lmdb"
    data = bytearray(shard.read_bytes())
    photo = read_list(photos)[5][0].read_bytes()
    at = data.find(photo[2000:2100]) + 50
    assert at > 50
    data[at] ^= 0x01
    shard.write_bytes(bytes(data))
    damaged = run_python(check)
    assert damaged.returncode == 1, damaged.stdout + damaged.stderr
    assert "BAD" in damaged.stdout and "CRC-32" in damaged.stdout
