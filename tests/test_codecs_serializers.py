"""Every codec through every serializer: pixels, bytes and labels come back exactly."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import read_list
from PIL import Image

from torchrecord import (
    DataListError,
    RecordCorruptedError,
    SerializationError,
    TensorProtos,
    TRDataset,
    Writer,
    default_data_process_func,
    default_transform,
    get_codec,
    get_serializer,
)
from torchrecord import format as fmt
from torchrecord.codecs.base import fit

CODECS = ["raw_rgb", "jpeg"]
SERIALIZERS = ["tensorprotos", "msgpack"]


@pytest.mark.parametrize("serializer", SERIALIZERS)
@pytest.mark.parametrize("codec", CODECS)
def test_round_trip_through_writer_and_dataset(photos, tmp_path, codec, serializer):
    out = tmp_path / "records"
    Writer(photos, out, db_num=3, codec=codec, serializer=serializer, shuffle=False).write()
    dataset = TRDataset(out, transform=None)
    assert (dataset.codec, dataset.serializer, dataset.record_num) == (codec, serializer, 3)
    samples = read_list(photos)
    assert len(dataset) == len(samples)
    for i, (path, label) in enumerate(samples):  # no shuffle: records in list order
        record = dataset[i]
        image = record.protos[0]
        with Image.open(path) as img:
            rgb = img.convert("RGB")
        assert tuple(image.dims) == rgb.size
        if codec == "jpeg":
            assert image.byte_data == path.read_bytes()  # byte-identical passthrough
            assert image.name == "jpeg"
        else:
            assert image.byte_data == rgb.tobytes()
            assert image.name == ""  # raw pixels, exactly as TorchRecord 0.1 wrote them
        assert get_codec(codec).decode_image(record).tobytes() == rgb.tobytes()
        assert int(record.protos[1].byte_data) == label


@pytest.mark.parametrize("codec", CODECS)
def test_default_transform_gives_the_seed_output(photos, tmp_path, codec):
    out = tmp_path / "records"
    Writer(photos, out, codec=codec, shuffle=False).write()
    path, label = read_list(photos)[5]
    import torchvision.transforms as tvt

    with Image.open(path) as img:  # the seed's pipeline on the decoded photo, independently
        expected = tvt.ToTensor()(tvt.Resize((224, 224))(img.convert("RGB")))
    # asked for by name, 0.1's transform is exact, in the dataset and as a function
    for image, got_label in (
        TRDataset(out, transform=default_transform)[5],
        TRDataset(out, transform="pil")[5],
        default_transform(TRDataset(out, transform=None)[5]),
    ):
        assert torch.equal(image, expected) and got_label == label
    # the default takes the fast path: the same output up to one grey level of rounding
    image, got_label = TRDataset(out)[5]
    assert got_label == label and isinstance(got_label, int)
    assert image.shape == (3, 224, 224) and image.dtype == torch.float32
    assert (image - expected).abs().max().item() <= 1 / 255 + 1e-6


@pytest.mark.parametrize("name", SERIALIZERS)
def test_serializers_carry_every_field(name):
    record = TensorProtos()
    a = record.protos.add()
    a.dims.extend([2, 3])
    a.data_type = 1
    a.float_data.extend([0.5, -1.25, 3.0])
    a.name = "weights"
    b = record.protos.add()
    b.data_type = 10
    b.int64_data.extend([2**40, -7])
    b.string_data.extend([b"x", b"\x00\xff"])
    c = record.protos.add()
    c.data_type = 3
    c.byte_data = bytes(range(256))
    c.int32_data.extend([1, 2])
    c.double_data.append(2.5)
    serializer = get_serializer(name)
    again = serializer.loads(serializer.dumps(record))
    assert again == record


@pytest.mark.parametrize("name", SERIALIZERS)
def test_serializers_refuse_garbage_with_their_own_error(name):
    serializer = get_serializer(name)
    with pytest.raises(SerializationError):
        serializer.loads(b"\xff\xfe\xfd garbage that is no record")


def test_msgpack_refuses_unexpected_structure():
    import msgpack

    serializer = get_serializer("msgpack")
    for obj in ({"a": 1}, [1, 2], [{"dims": "not a list"}], [{"evil": 1}]):
        with pytest.raises(SerializationError):
            serializer.loads(msgpack.packb(obj))


def test_tensorprotos_bytes_are_what_the_seed_wrote(photos):
    """A raw_rgb record serialized by tensorprotos equals the seed's default_data_process_func."""
    path, label = read_list(photos)[0]
    record = default_data_process_func(f"{path} {label}")
    with Image.open(path) as img:
        rgb = img.convert("RGB")
    seed_style = TensorProtos()
    image = seed_style.protos.add()
    image.dims.extend(rgb.size)
    image.data_type = 3
    image.byte_data = rgb.tobytes()
    label_proto = seed_style.protos.add()
    label_proto.data_type = 3
    label_proto.byte_data = str.encode(str(label))
    assert record.SerializeToString() == seed_style.SerializeToString()


def _grey_process_func(data):
    """A user's 0.1-style data_process_func: greyscale pixels plus the label."""
    path, label = data.rsplit(" ", 1)
    protos = TensorProtos()
    with Image.open(path) as img:
        grey = img.convert("L")
    image = protos.protos.add()
    image.dims.extend(grey.size)
    image.data_type = 3
    image.byte_data = grey.tobytes()
    label_proto = protos.protos.add()
    label_proto.data_type = 3
    label_proto.byte_data = label.encode()
    return protos


def _grey_transform(protos):
    proto = protos.protos[0]
    return Image.frombytes("L", tuple(proto.dims), proto.byte_data), int(protos.protos[1].byte_data)


@pytest.mark.parametrize("serializer", SERIALIZERS)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_custom_data_process_func(photos, tmp_path, serializer, num_workers):
    out = tmp_path / "records"
    Writer(
        photos,
        out,
        db_num=2,
        data_process_func=_grey_process_func,
        serializer=serializer,
        num_workers=num_workers,
        shuffle=False,
    ).write()
    dataset = TRDataset(out, transform=_grey_transform)
    assert dataset.codec == "custom"
    for i, (path, label) in enumerate(read_list(photos)):
        grey, got_label = dataset[i]
        with Image.open(path) as img:
            assert grey.tobytes() == img.convert("L").tobytes()
        assert got_label == label


def _path_only_process_func(data):
    """A data_process_func that never opens its file (it stores the path)."""
    path, label = data.rsplit(" ", 1)
    protos = TensorProtos()
    protos.protos.add().byte_data = path.encode()
    protos.protos.add().byte_data = label.encode()
    return protos


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_missing_file_is_refused_before_a_custom_data_process_func(photos, tmp_path, num_workers):
    """A function that does not open its file would not fail on a missing one: the writer
    checks first, as for the codecs."""
    lines = photos.read_text().splitlines()
    lines[4] = "missing/nowhere.jpg 1"
    photos.write_text("\n".join(lines) + "\n")
    expected = r"data_list\.txt:5: file .*nowhere\.jpg does not exist"
    with pytest.raises(DataListError, match=expected):
        Writer(
            photos,
            tmp_path / "out",
            data_process_func=_path_only_process_func,
            num_workers=num_workers,
            shuffle=False,
        ).write()


def test_verify_decode_leaves_a_custom_data_process_func_dataset_alone(photos, tmp_path):
    from torchrecord.reader import RecordReader, verify

    out = tmp_path / "records"
    Writer(photos, out, data_process_func=_grey_process_func, shuffle=False).write()
    assert list(verify(RecordReader(out), decode=True)) == []  # not 0.1's RGB: not decoded
    cli = Path(sys.executable).parent / "torchrecord"
    proc = subprocess.run(
        [str(cli), "verify", str(out), "--decode"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "24 records (not decoded: written by a custom data_process_func)" in proc.stdout


def test_jpeg_codec_refuses_a_png_naming_file_and_line(photos, tmp_path):
    png = photos.parent / "not_a_jpeg.png"
    with Image.open(read_list(photos)[0][0]) as img:
        img.save(png)
    lines = photos.read_text().splitlines()
    lines.insert(3, "not_a_jpeg.png 1")
    photos.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataListError) as info:
        Writer(photos, tmp_path / "out", codec="jpeg", shuffle=False).write()
    message = str(info.value)
    assert f"{photos}:4" in message and "not_a_jpeg.png" in message and "raw_rgb" in message
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_jpeg_codec_refuses_a_truncated_jpeg(photos, tmp_path):
    first = read_list(photos)[0][0]
    data = first.read_bytes()
    first.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataListError, match=r"data_list\.txt:1: .*truncated JPEG"):
        Writer(photos, tmp_path / "out", codec="jpeg", shuffle=False).write()


def test_jpeg_decode_matches_pillow(photos):
    path, _ = read_list(photos)[2]
    record = get_codec("jpeg").encode(str(path), 3)
    decoded = get_codec("jpeg").decode_image(record)
    assert decoded.tobytes() == Image.open(io.BytesIO(path.read_bytes())).convert("RGB").tobytes()


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"progressive": True},
        {"exif": b"Exif\x00\x00" + b"\x00" * 64},
        {"quality": 30, "subsampling": 0},
    ],
)
def test_jpeg_size_reads_the_frame_header(photos, tmp_path, options):
    from torchrecord.codecs.jpeg import jpeg_size

    path, _ = read_list(photos)[4]
    with Image.open(path) as img:
        out = tmp_path / "variant.jpg"
        img.crop((3, 5, 203, 155)).save(out, format="JPEG", **options)
    assert jpeg_size(out.read_bytes()) == (200, 150)
    for broken in (
        b"\xff\xd8\xff\xe0\x00",
        b"\xff\xd8" + b"\x00" * 20,
        b"\xff\xd8\xff\xda\x00\x08" + b"\x00" * 10,
    ):
        with pytest.raises(ValueError):
            jpeg_size(broken)


def test_jpeg_codec_falls_back_to_pillow_for_unusual_marker_layouts(photos, tmp_path):
    path, _ = read_list(photos)[1]
    data = path.read_bytes()
    app0_end = 4 + int.from_bytes(data[4:6], "big")  # junk bytes after the APP0 segment
    odd = tmp_path / "odd.jpg"
    odd.write_bytes(data[:app0_end] + b"\x00\x00" + data[app0_end:])
    record = get_codec("jpeg").encode(str(odd), 1)
    assert tuple(record.protos[0].dims) == Image.open(path).size
    assert record.protos[0].byte_data == odd.read_bytes()


@pytest.mark.parametrize("serializer", ["tensorprotos", "msgpack"])
def test_a_record_over_the_size_limit_is_refused_naming_its_line(
    photos, tmp_path, monkeypatch, serializer
):
    import importlib

    module = importlib.import_module(f"torchrecord.serializers.{serializer}")
    # the real limit is 2 GiB; below the smallest photo, the first line is already too large
    smallest = min(path.stat().st_size for path, _ in read_list(photos))
    monkeypatch.setattr(module, "MAX_RECORD_BYTES", smallest - 1)
    with pytest.raises(DataListError, match=r"data_list.txt:1: record of \d+ bytes exceeds"):
        Writer(
            photos, tmp_path / "records", codec="jpeg", serializer=serializer, shuffle=False
        ).write()
    assert not (tmp_path / "records" / "manifest.json").exists()


def test_msgpack_reads_no_record_over_its_limit(photos, tmp_path, monkeypatch):
    import torchrecord.serializers.msgpack as module

    out = tmp_path / "records"
    Writer(photos, out, codec="jpeg", serializer="msgpack", shuffle=False).write()
    monkeypatch.setattr(module, "MAX_RECORD_BYTES", 1000)
    with pytest.raises(
        RecordCorruptedError,
        match=rf"shard-00000.lmdb, record key {fmt.record_key(2).hex()} .*msgpack",
    ):
        TRDataset(out, transform=None)[2]


def _count_libjpeg_decodes(monkeypatch) -> list[tuple[int, int]]:
    """The sizes of the images raw_rgb's libjpeg path decodes from now on (the real decoder
    runs; this only takes note)."""
    from torchrecord.codecs import raw_rgb

    decoded, real = [], raw_rgb._libjpeg_rgb

    def noting(data, size):
        pixels = real(data, size)
        if pixels is not None:
            decoded.append(tuple(size))
        return pixels

    monkeypatch.setattr(raw_rgb, "_libjpeg_rgb", noting)
    return decoded


def _pillow_pixels(path) -> tuple[tuple[int, int], bytes]:
    with Image.open(path) as img:
        rgb = img.convert("RGB")
        return rgb.size, rgb.tobytes()


@pytest.mark.parametrize(
    ("subsampling", "progressive", "crop"),
    [(2, False, (0, 0, 301, 203)), (1, False, (5, 3, 260, 250)), (0, True, (1, 1, 97, 333))],
    ids=["4:2:0", "4:2:2", "4:4:4-progressive"],
)
def test_raw_rgb_decodes_jpegs_to_exactly_pillows_pixels(
    photos, tmp_path, monkeypatch, subsampling, progressive, crop
):
    """raw_rgb decodes RGB JPEGs with libjpeg-turbo directly (not through Pillow): the stored
    pixels must be Pillow's, byte for byte, for the chroma layouts and sizes cameras write."""
    from torchrecord.codecs import raw_rgb

    assert raw_rgb.use_libjpeg(), "this torchvision decodes JPEGs like Pillow: path expected"
    path, label = read_list(photos)[0]
    out = tmp_path / "photo.jpg"
    with Image.open(path) as img:
        img.crop(crop).save(out, quality=88, subsampling=subsampling, progressive=progressive)
    decoded = _count_libjpeg_decodes(monkeypatch)
    record = get_codec("raw_rgb").encode(str(out), label)
    assert decoded == [(crop[2] - crop[0], crop[3] - crop[1])]  # libjpeg decoded it
    size, pixels = _pillow_pixels(out)
    assert tuple(record.protos[0].dims) == size
    assert record.protos[0].byte_data == pixels
    assert int(record.protos[1].byte_data) == label


@pytest.mark.parametrize("kind", ["grey JPEG", "CMYK JPEG", "PNG", "RGB JPEG, max_size"])
def test_raw_rgb_gives_pillows_pixels_for_what_it_leaves_to_pillow(
    photos, tmp_path, monkeypatch, kind
):
    from torchrecord.codecs import raw_rgb

    assert raw_rgb.use_libjpeg()
    path, label = read_list(photos)[1]
    out = tmp_path / ("photo.png" if kind == "PNG" else "photo.jpg")
    with Image.open(path) as img:
        mode = {"grey JPEG": "L", "CMYK JPEG": "CMYK"}.get(kind, "RGB")
        img.convert(mode).save(out)
    options = {"max_size": 64} if "max_size" in kind else {}
    decoded = _count_libjpeg_decodes(monkeypatch)
    record = get_codec("raw_rgb").encode(str(out), label, **options)
    assert decoded == []  # Pillow decoded it
    with Image.open(out) as img:
        expected = fit(img.convert("RGB"), options.get("max_size"))
    assert tuple(record.protos[0].dims) == expected.size
    assert record.protos[0].byte_data == expected.tobytes()


@pytest.mark.parametrize("codec, options", [("raw_rgb", {}), ("smart", {"raw_below": 10**7})])
def test_a_16_bit_greyscale_png_is_scaled_not_clipped(photos, tmp_path, codec, options):
    """Pillow opens a 16-bit greyscale PNG as one 32-bit integer channel, and its own
    conversion to RGB clips every value above 255 (a photograph comes out white). The codecs
    scale it: a photograph's grey levels, written as 16 bits (v * 257), come back exactly."""
    import numpy as np

    path, label = read_list(photos)[2]
    with Image.open(path) as img:
        grey = np.asarray(img.convert("L"))
    deep = tmp_path / "deep.png"
    Image.fromarray(grey.astype(np.uint16) * 257).save(deep)
    with Image.open(deep) as img:
        assert img.mode.startswith("I") and np.asarray(img).max() > 255
    record = get_codec(codec).encode(str(deep), label, **options)
    assert record.protos[0].name == ""  # raw pixels
    image = get_codec(codec).decode_image(record)
    assert np.array_equal(np.asarray(image), np.repeat(grey[:, :, None], 3, axis=2))


def test_raw_rgb_reports_a_truncated_jpeg_as_pillow_does(photos, tmp_path):
    """The fast decoder refuses a truncated JPEG; Pillow then decodes it, and its error (naming
    the file and line) is the one the user sees."""
    path, _ = read_list(photos)[0]
    broken = path.read_bytes()
    path.write_bytes(broken[: len(broken) // 2])
    message = r"data_list\.txt:1: cannot encode .*image file is truncated"
    with pytest.raises(DataListError, match=message):
        Writer(photos, tmp_path / "records", codec="raw_rgb", shuffle=False).write()


def test_raw_rgb_keeps_pillow_when_the_fast_decoder_disagrees():
    """The once-per-process self-check refuses a decoder whose pixels are not Pillow's (here
    off by one level in one channel), and accepts the real one."""
    from torchrecord.codecs import raw_rgb

    real = raw_rgb._fast_decoder()
    assert real is not None and raw_rgb._same_pixels_as_pillow(real)

    def off_by_one(data):
        pixels = real(data).clone()
        pixels[..., 2] ^= 1
        return pixels

    assert not raw_rgb._same_pixels_as_pillow(off_by_one)

    def refuses(data):
        raise RuntimeError("not supported")

    assert not raw_rgb._same_pixels_as_pillow(refuses)


@pytest.fixture(autouse=True)
def _libjpeg_as_it_was():
    """Tests here may turn raw_rgb's libjpeg decode on; the next test finds it as it was."""
    from torchrecord.codecs import raw_rgb

    was = raw_rgb._libjpeg_on, raw_rgb._libjpeg_chosen
    yield
    raw_rgb._libjpeg_on, raw_rgb._libjpeg_chosen = was


@pytest.mark.parametrize("codec", ["raw_rgb", "smart"])
def test_writes_are_identical_with_and_without_the_libjpeg_decode(
    photos, tmp_path, monkeypatch, codec
):
    from torchrecord.codecs import raw_rgb
    from torchrecord.reader import RecordReader

    outs = []
    for on in (False, True):
        monkeypatch.setattr(Writer, "_libjpeg_pays_off", lambda self, n, on=on: on)
        raw_rgb.use_libjpeg(False)
        out = tmp_path / f"libjpeg-{on}"
        smart_all_raw = {"raw_below": 10**9} if codec == "smart" else {}
        Writer(photos, out, db_num=2, codec=codec, num_workers=2, **smart_all_raw).write()
        assert raw_rgb._libjpeg_on is on  # (forked workers inherit it)
        reader = RecordReader(out)
        outs.append([reader.read_bytes(i) for i in range(len(reader))])
        reader.close()
    assert len(outs[0]) == len(read_list(photos)) and outs[0] == outs[1]


def test_the_writer_loads_torchvision_for_raw_rgb_only_when_it_pays(photos, tmp_path, monkeypatch):
    import sys

    from torchrecord.writer import LIBJPEG_MIN_IMAGES

    def pays(n, **kwargs):
        return Writer(photos, tmp_path / "unused", **kwargs)._libjpeg_pays_off(n)

    assert "torchvision" in sys.modules  # loaded: it costs nothing more
    assert (
        pays(10)
        and pays(10, codec="smart")
        and pays(10, data_process_func=default_data_process_func)
    )
    assert not pays(10**6, codec="jpeg")  # the jpeg codec decodes nothing
    assert not pays(10**6, data_process_func=str.upper)  # a user's function: not ours to speed up
    assert pays(10, num_workers=2)  # forked workers inherit what is loaded here
    monkeypatch.delitem(sys.modules, "torchvision")  # as in a fresh `torchrecord write`
    assert not pays(LIBJPEG_MIN_IMAGES - 1) and pays(LIBJPEG_MIN_IMAGES)
    assert pays(LIBJPEG_MIN_IMAGES, num_workers=2)  # loaded once, here, before the fork
    # spawned (or forkserver) workers each load it, whatever this process has loaded
    import multiprocessing

    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setattr(multiprocessing, "get_start_method", lambda *a, **k: "spawn")
    assert pays(10) and not pays(10, num_workers=2)
    assert not pays(2 * LIBJPEG_MIN_IMAGES - 1, num_workers=2)
    assert pays(2 * LIBJPEG_MIN_IMAGES, num_workers=2)


def _corrupt_but_decodable(photos, tmp_path) -> Path:
    """A data list of one JPEG with two stray bytes before its end-of-image marker: libjpeg
    decodes it and says "Corrupt JPEG data" on stderr; Pillow decodes it without a word."""
    path, label = read_list(photos)[0]
    data = path.read_bytes()
    assert data.endswith(b"\xff\xd9")
    odd = tmp_path / "odd.jpg"
    odd.write_bytes(data[:-2] + b"\x12\x34" + data[-2:])
    data_list = tmp_path / "odd.txt"
    data_list.write_text(f"{odd} {label}\n")
    return data_list


@pytest.mark.parametrize("choice", [None, False, True])
def test_use_libjpeg_is_a_choice_that_writes_keep(photos, tmp_path, monkeypatch, capfd, choice):
    """use_libjpeg(False) keeps every later write on Pillow (and libjpeg's stderr quiet);
    True and None (each write decides, and with torchvision loaded this one pays) decode with
    libjpeg. The stored pixels are the same."""
    import torchvision  # noqa: F401  (loaded: left to itself, a write of any size uses it)

    from torchrecord.codecs import raw_rgb
    from torchrecord.reader import RecordReader

    data_list = _corrupt_but_decodable(photos, tmp_path)
    decoded = []
    real = raw_rgb._libjpeg_rgb
    monkeypatch.setattr(raw_rgb, "_libjpeg_rgb", lambda *a: decoded.append(1) or real(*a))
    raw_rgb.use_libjpeg(choice)
    assert raw_rgb.libjpeg_chosen() is choice
    out = tmp_path / "out"
    capfd.readouterr()
    Writer(data_list, out, codec="raw_rgb", shuffle=False).write()
    stderr = capfd.readouterr().err
    assert bool(decoded) is (choice is not False), decoded
    assert ("Corrupt JPEG data" in stderr) is (choice is not False), stderr
    assert raw_rgb.libjpeg_chosen() is choice  # (the write kept the user's choice)
    ((path, label),) = [line.rsplit(" ", 1) for line in data_list.read_text().splitlines()]
    with Image.open(path) as img:
        expected = img.convert("RGB").tobytes()
    record = RecordReader(out).read_record(0)
    assert record.protos[0].byte_data == expected and int(record.protos[1].byte_data) == int(label)


def test_use_libjpeg_overrides_what_a_write_would_decide(photos, monkeypatch):
    import multiprocessing

    import torchvision  # noqa: F401  (loaded: with forked workers, any write repays it)

    from torchrecord.codecs import raw_rgb

    writer = Writer(photos, "unused", codec="raw_rgb", num_workers=2)
    jpegs = Writer(photos, "unused", codec="jpeg", num_workers=2)
    # with spawned workers a write of 24 images does not repay loading torchvision in each
    monkeypatch.setattr(multiprocessing, "get_start_method", lambda *a, **k: "spawn")
    for choice, expected in ((None, False), (True, True), (False, False)):
        raw_rgb.use_libjpeg(choice)
        assert writer._libjpeg_pays_off(24) is expected
        assert jpegs._libjpeg_pays_off(24) is None  # (the jpeg codec decodes nothing)
    monkeypatch.setattr(multiprocessing, "get_start_method", lambda *a, **k: "fork")
    for choice, expected in ((None, True), (True, True), (False, False)):  # (torch is loaded)
        raw_rgb.use_libjpeg(choice)
        assert writer._libjpeg_pays_off(24) is expected


@pytest.mark.parametrize("choice", [True, False])
def test_a_write_that_decodes_nothing_leaves_the_choice_in_force(photos, tmp_path, choice):
    """A jpeg write, or one with a data_process_func of its own (here one that calls 0.1's
    default_data_process_func, which is raw_rgb), leaves the decoder as the user set it."""
    from torchrecord.codecs import raw_rgb

    raw_rgb.use_libjpeg(choice)
    Writer(photos, tmp_path / "jpeg", codec="jpeg", shuffle=False).write()
    assert raw_rgb.libjpeg_on() is choice and raw_rgb.libjpeg_chosen() is choice
    decoded = []
    real = raw_rgb._libjpeg_rgb
    raw_rgb._libjpeg_rgb = lambda *a: decoded.append(1) or real(*a)
    try:
        Writer(
            photos,
            tmp_path / "custom",
            data_process_func=_wraps_the_default,
            shuffle=False,
        ).write()
    finally:
        raw_rgb._libjpeg_rgb = real
    assert bool(decoded) is choice and raw_rgb.libjpeg_on() is choice


def _wraps_the_default(line):
    from torchrecord import default_data_process_func

    return default_data_process_func(line)


def test_raw_rgb_refuses_what_pillow_refuses_also_with_libjpeg_on(photos, tmp_path):
    """Pillow opens every file, so a JPEG that libjpeg would decode but Pillow refuses (here a
    TEM marker right after the start of image) is refused the same way either way."""
    from torchrecord.codecs import raw_rgb

    path, label = read_list(photos)[0]
    data = path.read_bytes()
    odd = tmp_path / "tem.jpg"
    odd.write_bytes(data[:2] + b"\xff\x01" + data[2:])
    errors = []
    for on in (False, True):
        raw_rgb.use_libjpeg(on)
        with pytest.raises(Exception) as caught:
            get_codec("raw_rgb").encode(str(odd), label)
        errors.append((type(caught.value), str(caught.value)))
    assert errors[0] == errors[1] and "cannot identify image file" in errors[0][1]


def _jpeg_variants(path) -> dict[str, bytes]:
    """One photograph saved as the JPEG kinds datasets hold, keyed by kind."""
    with Image.open(path) as img:
        rgb = img.convert("RGB").crop((0, 0, 83, 61))
    kinds = {
        "baseline": {},
        "progressive": {"progressive": True},
        "4:4:4": {"subsampling": 0},
        "dpi": {"dpi": (300, 300)},
        "ICC profile": {"icc_profile": b"profile" * 40},
        "comment": {"comment": b"a comment"},
        "EXIF, no JFIF resolution": {"exif": Image.Exif().tobytes()},
    }
    out = {}
    for kind, options in kinds.items():
        buffer = io.BytesIO()
        rgb.save(buffer, "JPEG", quality=90, **options)
        out[kind] = buffer.getvalue()
    for mode in ("L", "CMYK"):
        buffer = io.BytesIO()
        rgb.convert(mode).save(buffer, "JPEG")
        out[mode] = buffer.getvalue()
    return out


def test_raw_rgb_reads_plain_jpeg_headers_without_pillow_as_pillow_does(photos):
    """raw_rgb reads the size of a JPEG whose header holds nothing Pillow could refuse or treat
    specially without opening it with Pillow. Every header it reads must be one Pillow opens as
    an RGB JPEG of that size: checked on the common kinds and on 3,000 headers with random
    bytes changed, removed or inserted; the doubtful kinds are left to Pillow."""
    import random
    import warnings

    from torchrecord.codecs.raw_rgb import plain_rgb_jpeg_size

    variants = _jpeg_variants(read_list(photos)[0][0])
    plain = {kind: plain_rgb_jpeg_size(data) for kind, data in variants.items()}
    assert plain == {
        **dict.fromkeys(["baseline", "progressive", "4:4:4", "dpi", "ICC profile"], (83, 61)),
        "comment": (83, 61),
        "EXIF, no JFIF resolution": None,  # (Pillow parses the EXIF: it decides)
        "L": None,
        "CMYK": None,
    }
    # segments Pillow refuses or treats specially, put after the start of image by hand
    baseline = variants["baseline"]

    def with_segment(marker: int, body: bytes) -> bytes:
        return (
            baseline[:2]
            + bytes((0xFF, marker))
            + (len(body) + 2).to_bytes(2, "big")
            + body
            + (baseline[2:])
        )

    def frame_header_plus(extra: int) -> bytes:  # the frame header with bytes added at its end
        at = baseline.find(b"\xff\xc0")
        length = int.from_bytes(baseline[at + 2 : at + 4], "big")
        end = at + 2 + length
        header = baseline[at : at + 2] + (length + extra).to_bytes(2, "big")
        return baseline[:at] + header + baseline[at + 4 : end] + b"\x01" * extra + baseline[end:]

    doubtful = {
        "short ICC": (with_segment(0xE2, b"ICC_PROFILE\0\x01"), "refused"),
        "short Adobe": (with_segment(0xEE, b"Adobe\0"), "refused"),
        "frame header 1 byte long": (frame_header_plus(1), "refused"),
        "frame header 2 bytes long": (frame_header_plus(2), "refused"),
        "multi-picture": (with_segment(0xE2, b"MPF\0" + bytes(40)), "opened"),
        "Photoshop": (with_segment(0xED, b"Photoshop 3.0\x008BIM\x04"), "opened"),
    }
    for kind, (data, pillow) in doubtful.items():
        assert plain_rgb_jpeg_size(data) is None, kind
        try:
            with warnings.catch_warnings(record=True), Image.open(io.BytesIO(data)):
                opened = "opened"  # (a malformed multi-picture file: with a warning)
        except Exception:
            opened = "refused"
        assert opened == pillow, kind  # (why the walk must leave them to Pillow)
    assert plain_rgb_jpeg_size(frame_header_plus(0)) == (83, 61)
    with Image.open(io.BytesIO(baseline)) as img:
        pixels = img.size[0] * img.size[1]
    limit = Image.MAX_IMAGE_PIXELS
    try:  # over Pillow's decompression-bomb warning size: Pillow warns, so Pillow opens it
        Image.MAX_IMAGE_PIXELS = pixels - 1
        assert plain_rgb_jpeg_size(baseline) is None
        Image.MAX_IMAGE_PIXELS = pixels
        assert plain_rgb_jpeg_size(baseline) == (83, 61)
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    from torchrecord.codecs.base import _no_pixel_limit

    try:  # while another thread opens an image with the limit lifted, the limit still holds
        Image.MAX_IMAGE_PIXELS = pixels - 1
        with _no_pixel_limit():
            assert Image.MAX_IMAGE_PIXELS is None  # (what a plain read of it would find)
            assert plain_rgb_jpeg_size(baseline) is None
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    rng = random.Random(0)
    read = 0
    for _ in range(3000):
        data = bytearray(rng.choice(list(variants.values())))
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(min(len(data), 700))  # (the headers are in the first 700 bytes)
            change = rng.random()
            if change < 0.6:
                data[at] = rng.randrange(256)
            elif change < 0.8:
                del data[at : at + rng.randint(1, 8)]
            else:
                data[at:at] = rng.randbytes(rng.randint(1, 8))
        size = plain_rgb_jpeg_size(bytes(data))
        if size is None:
            continue
        read += 1
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # (nor may Pillow warn about it)
            with Image.open(io.BytesIO(bytes(data))) as img:  # (raises if Pillow refuses it)
                assert (img.format, img.mode, img.size) == ("JPEG", "RGB", size), bytes(data)
    assert read > 500  # most changes hit the image data, not what the walk checks


def test_raw_rgb_writes_a_plain_jpeg_without_opening_it_with_pillow(photos, tmp_path, monkeypatch):
    """A plain JPEG is decoded by libjpeg without Pillow opening it; one with EXIF goes
    through Pillow first. Both store Pillow's pixels."""
    from torchrecord.codecs import base, raw_rgb

    assert raw_rgb.use_libjpeg()
    opened, real_open = [], base.open_image

    def noting(source, *args, **kwargs):
        opened.append(Path(source).name)
        return real_open(source, *args, **kwargs)

    monkeypatch.setattr(raw_rgb, "open_image", noting)
    decoded = _count_libjpeg_decodes(monkeypatch)
    variants = _jpeg_variants(read_list(photos)[0][0])
    for kind in ("baseline", "EXIF, no JFIF resolution"):
        path = tmp_path / f"{kind}.jpg"
        path.write_bytes(variants[kind])
        record = get_codec("raw_rgb").encode(str(path), 7)
        assert (tuple(record.protos[0].dims), record.protos[0].byte_data) == _pillow_pixels(path)
        assert int(record.protos[1].byte_data) == 7
    assert opened == ["EXIF, no JFIF resolution.jpg"] and decoded == [(83, 61), (83, 61)]


def test_a_broken_torchvision_leaves_raw_rgb_writes_to_pillow(photos, tmp_path):
    """A torchvision that raises when imported (built for another torch) must not stop a write
    that would have used it: the write goes on with Pillow and stores the same pixels."""
    from conftest import run_python

    from torchrecord.reader import RecordReader

    fake = tmp_path / "fake" / "torchvision"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        'raise RuntimeError("operator torchvision::nms does not exist")\n'
    )
    code = f"""
import sys
sys.path.insert(0, {str(tmp_path / "fake")!r})
import torchrecord.writer as w
w.LIBJPEG_MIN_IMAGES = 1  # this small write would load torchvision
from torchrecord import Writer
from torchrecord.codecs import raw_rgb
for workers in (0, 2):
    Writer({str(photos)!r}, {str(tmp_path)!r} + f"/out{{workers}}", db_num=2,
           num_workers=workers, shuffle=False).write()
print("libjpeg", raw_rgb.libjpeg_on(), "torchvision" in sys.modules)
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert "libjpeg False" in result.stdout
    Writer(photos, tmp_path / "reference", db_num=2, shuffle=False).write()  # here: with libjpeg
    expected = RecordReader(tmp_path / "reference")
    for workers in (0, 2):
        got = RecordReader(tmp_path / f"out{workers}")
        assert [got.read_bytes(i) for i in range(len(got))] == [
            expected.read_bytes(i) for i in range(len(expected))
        ]
        got.close()
    expected.close()


def test_parts_are_serialized_as_protobuf_serializes_the_record():
    """The writer's single-copy serialization gives protobuf's own bytes: images as bytes and
    as numpy pixels, sizes and lengths across varint widths, any label, names, extra fields."""
    import random

    import numpy as np

    from torchrecord.codecs.base import RecordParts
    from torchrecord.writer import add_extras

    serializer = get_serializer("tensorprotos")
    rng = random.Random(0)
    for i in range(600):
        size = (rng.choice([1, 127, 128, 16384, 2**21, 2**35]), rng.choice([1, 128, 375]))
        image = rng.randbytes(rng.choice([0, 1, 127, 128, 16383, 16384, 450_000]))
        if i % 2:
            image = np.frombuffer(image, np.uint8).reshape(1, -1, 1)  # pixels, not bytes
        name = rng.choice(["", "jpeg", "é" * 100, None])  # (UTF-8: more bytes than characters)
        parts = RecordParts(image, size, rng.choice([0, 7, -3, 10**12]), name)
        more = None
        if i % 3 == 0:
            more = TensorProtos()
            add_extras(more, {"bbox": [1, 2.5, i], "caption": "é" * rng.choice([1, 200])})
        record = parts.record()
        if more is not None:
            record.protos.extend(more.protos)
        assert serializer.dumps_parts(parts, more) == serializer.dumps(record), (i, size)
    # what a plugin's codec might hand over: protobuf's verdict, whatever it is
    pixels = np.arange(24, dtype=np.uint8).reshape(2, 4, 3)
    odd = [((2**63, 2), b"ab"), ((2**64, 2), b"ab"), ((True, 2), b"ab"), ((2, 3, 4), b"ab")]
    odd += [((4, 2), pixels[:, ::2]), ((4, 2), pixels.transpose(1, 0, 2)), ([4, 2], pixels)]
    for size, image in odd:
        parts = RecordParts(image, size, 1)
        try:
            expected: object = serializer.dumps(parts.record())
        except Exception as exc:
            expected = type(exc)
        try:
            got: object = serializer.dumps_parts(parts)
        except Exception as exc:
            got = type(exc)
        assert got == expected, size


@pytest.mark.parametrize("codec", ["raw_rgb", "jpeg", "smart"])
def test_writes_from_parts_equal_writes_from_records(photos, tmp_path, monkeypatch, codec):
    """Records of every built-in codec, with extra fields, are the same bytes whether the writer
    serializes the codec's parts or the record built from them (msgpack: always the record)."""
    from torchrecord import writer
    from torchrecord.reader import RecordReader

    items = [
        {"path": path, "label": label, "caption": f"photo {i}", "box": [i, 2]}
        for i, (path, label) in enumerate(read_list(photos))
    ]
    smart = {"raw_below": 300 * 300} if codec == "smart" else {}  # some raw, some JPEG
    outs = []
    for parts in (True, False):
        if not parts:
            monkeypatch.setattr(writer, "fast_method", lambda *args: None)
        out = tmp_path / f"parts-{parts}"
        Writer(items, out, db_num=2, codec=codec, **smart).write()
        reader = RecordReader(out)
        outs.append([reader.read_bytes(i) for i in range(len(reader))])
        reader.close()
    assert len(outs[0]) == len(items) and outs[0] == outs[1]
    names = {TensorProtos.FromString(value).protos[0].name for value in outs[0]}
    assert names == ({"", "jpeg"} if codec == "smart" else {"jpeg" if codec == "jpeg" else ""})


def test_a_subclass_that_overrides_the_slow_method_is_not_bypassed(photos, tmp_path):
    """The writer and readers use a fast form (``encode_parts``, ``dumps_parts``,
    ``loads_view``) only where it does what the method it stands for does: a subclass that
    overrides ``encode``, ``dumps`` or ``loads`` alone gets its own method called, and one that
    overrides ``encode_parts`` alone gets it called through ``encode`` too."""
    import zlib

    import numpy as np

    from torchrecord import hookimpl
    from torchrecord.codecs.base import Codec
    from torchrecord.codecs.raw_rgb import RawRGBCodec
    from torchrecord.plugins import fast_method, register_plugin, unregister_plugin
    from torchrecord.serializers.tensorprotos import TensorProtosSerializer

    class Watermarked(RawRGBCodec):  # a plugin's change to raw_rgb, through encode alone
        def encode(self, path, label, max_size=None):
            return super().encode(path, label, max_size)

    class Black(RawRGBCodec):  # ... through encode_parts alone
        def encode_parts(self, path, label, max_size=None):
            parts = super().encode_parts(path, label, max_size)
            return parts._replace(image=np.zeros(len(memoryview(parts.image).cast("B")), "u1"))

    class OnlyEncode(Codec):
        def encode(self, path, label):
            return None

    class Zlib(TensorProtosSerializer):  # a serializer that compresses protobuf's bytes
        name = "test_zlib"

        def dumps(self, record):
            return zlib.compress(super().dumps(record), 1)

        def loads(self, data):
            return super().loads(zlib.decompress(data))

    raw = get_codec("raw_rgb")
    assert fast_method(raw, "encode", "encode_parts") == raw.encode_parts
    assert fast_method(get_codec("jpeg"), "encode", "encode_parts") is not None
    assert fast_method(Watermarked(), "encode", "encode_parts") is None
    assert fast_method(OnlyEncode(), "encode", "encode_parts") is None
    assert fast_method(Black(), "encode", "encode_parts") is not None  # encode uses it
    path, label = read_list(photos)[0]
    assert not any(Black().encode(path, label).protos[0].byte_data)
    assert fast_method(Zlib(), "dumps", "dumps_parts") is None
    assert fast_method(Zlib(), "loads", "loads_view") is None
    tensorprotos = get_serializer("tensorprotos")
    assert fast_method(tensorprotos, "loads", "loads_view") == tensorprotos.loads_view

    class ZlibPlugin:
        @hookimpl
        def torchrecord_register_serializers(self, register):
            register(Zlib())

    register_plugin(ZlibPlugin(), name="test-zlib")
    try:  # written through Zlib.dumps, read through Zlib.loads, also by the tensor paths
        Writer(photos, tmp_path / "zlib", serializer="test_zlib", shuffle=False).write()
        Writer(photos, tmp_path / "plain", shuffle=False).write()
        zipped, plain = TRDataset(tmp_path / "zlib"), TRDataset(tmp_path / "plain")
        value = zipped.reader.read_bytes(0)
        assert zlib.decompress(value) == plain.reader.read_bytes(0)
        for i in range(len(plain)):
            (a, label_a), (b, label_b) = zipped[i], plain[i]
            assert label_a == label_b and torch.equal(a, b)
    finally:
        unregister_plugin(name="test-zlib")


def _view_fields(record):
    return [(list(p.dims), p.data_type, bytes(p.byte_data), p.name) for p in record.protos]


def test_record_views_hold_what_protobuf_parses_or_are_refused():
    """Whatever bytes a view is made of, its fields are protobuf's parse of them: valid records
    of the shared layout become views, and damaged or unusual ones (mutated, cut, with other
    fields, duplicates or packed dims) are either read right or left to protobuf."""
    import random

    from google.protobuf.message import DecodeError

    from torchrecord.codecs.base import RecordParts
    from torchrecord.serializers.tensorprotos import VIEW_MIN_BYTES, RecordView
    from torchrecord.writer import add_extras

    serializer = get_serializer("tensorprotos")
    rng = random.Random(1)
    valid = []
    for i in range(40):
        image = rng.randbytes(rng.choice([VIEW_MIN_BYTES, 200_000, 450_000]))
        record = RecordParts(image, (rng.randrange(1, 5000), 300), i, ["", "jpeg"][i % 2]).record()
        if i % 3 == 0:
            add_extras(record, {"caption": "x" * i})
        valid.append(record.SerializeToString())
    for data in valid:  # every valid record is a view, with protobuf's fields
        view = serializer.loads_view(data)
        assert isinstance(view, RecordView) and isinstance(view.protos[0].byte_data, memoryview)
        assert _view_fields(view) == _view_fields(TensorProtos.FromString(data))
    extra_field = TensorProtos()
    extra_field.protos.add().segment.begin = 1  # (a field the codecs never write)
    extra_field.protos[0].segment.end = 2
    odd = [
        valid[0] + extra_field.SerializeToString(),
        valid[1] + b"\x0a\x04\x10\x03\x10\x04",  # data_type twice: protobuf keeps the last
        valid[2] + b"\x0a\x04\x0a\x02\x01\x02",  # packed dims
        valid[3] + b"\x0a\x02\x10\x0b",  # a data type the enum does not have
        valid[6] + b"\x0a\x06\x2a\x01A\x2a\x01B",  # byte_data twice
        valid[4][:-1],
        valid[5][:100],
    ]
    views = 0
    for trial in range(3000):
        data = bytearray(rng.choice(valid + odd))
        for _ in range(rng.randrange(4) if trial >= len(odd) else 0):
            where = rng.choice([rng.randrange(40), rng.randrange(len(data))])
            data[where] = rng.randrange(256)
        data = bytes(data) if trial >= len(odd) else odd[trial]
        view = serializer.loads_view(data)
        if view is None:
            continue
        views += 1
        try:
            parsed = TensorProtos.FromString(data)
        except DecodeError:
            pytest.fail(f"a view of bytes protobuf refuses (trial {trial})")
        assert _view_fields(view) == _view_fields(parsed), trial
    assert views > 300  # (mutations in the pixels leave views that must still be right)
    small = RecordParts(b"\x01" * (VIEW_MIN_BYTES - 100), (10, 10), 1).record()
    assert serializer.loads_view(small.SerializeToString()) is None  # protobuf parses it faster


@pytest.mark.parametrize("codec", ["raw_rgb", "jpeg"])
def test_the_tensor_transforms_read_views_with_the_same_result(photos, tmp_path, codec):
    """Sample by sample and in batches built in place: the same tensors from views as from
    messages. (The JPEGs are made larger than the photos: views are for records of 64 KiB
    or more.)"""
    from torchrecord.serializers.tensorprotos import RecordView

    big = []
    for i, (path, label) in enumerate(read_list(photos)):
        with Image.open(path) as img:
            scale = 3
            large = img.resize((img.width * scale, img.height * scale))
        large.save(tmp_path / f"{i}.jpg", quality=95)
        big.append((str(tmp_path / f"{i}.jpg"), label))
    out = tmp_path / "records"
    Writer(big, out, codec=codec, shuffle=False).write()
    results = {}
    for views in (True, False):
        for transform in ("fast", "uint8"):
            dataset = TRDataset(out, transform=transform)
            dataset._views = views
            dataset.prebatch = True  # as TorchRecord sets it: batches built in place
            samples = [dataset[i] for i in range(len(dataset))]
            batch = dataset.__getitems__(list(range(8)))
            results[views, transform] = (samples, [batch[i] for i in range(8)])
    for transform in ("fast", "uint8"):
        (with_views, with_views_batch), (messages, messages_batch) = (
            results[True, transform],
            results[False, transform],
        )
        for (a, label_a), (b, label_b) in zip(
            with_views + with_views_batch, messages + messages_batch
        ):
            assert label_a == label_b and torch.equal(a, b)
    reader = TRDataset(out).reader
    large = [i for i in range(len(reader)) if len(reader.read_bytes(i)) >= 64 * 1024]
    assert len(large) >= len(reader) - 2  # (nearly all: the comparison above covered views)
    assert all(isinstance(reader.read_view(i), RecordView) for i in large)
