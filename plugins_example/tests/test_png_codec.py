"""End-to-end tests of the torchrecord-png plugin, found through its installed entry point.

Nothing here registers the codec by hand: if ``pip install -e plugins_example`` was not run, or
the entry point is wrong, these tests fail.
"""

from __future__ import annotations

import io
from importlib import metadata

import pytest
from PIL import Image

import torchrecord
from torchrecord import plugins

DIST = "torchrecord-png"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def fresh_plugins(monkeypatch):
    """Load plugins from scratch, with autoloading on, so the entry point is what counts."""
    monkeypatch.delenv("TORCHRECORD_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    plugins.reset()
    yield
    plugins.reset()


def _photo_crops():
    """Eight 48x40 crops of real photographs (varied texture and colour), as uint8 RGB arrays."""
    from skimage import data

    astronaut, chelsea, coffee = data.astronaut(), data.chelsea(), data.coffee()
    boxes = [
        (astronaut, 60, 180),  # face
        (astronaut, 300, 100),  # suit and flag
        (astronaut, 150, 400),  # background
        (chelsea, 80, 150),  # fur
        (chelsea, 200, 300),  # whiskers
        (coffee, 100, 200),  # cup rim
        (coffee, 250, 300),  # coffee
        (coffee, 20, 500),  # table
    ]
    return [img[top : top + 40, left : left + 48] for img, top, left in boxes]


@pytest.fixture
def data_list(tmp_path):
    """A data list of ``rel/path.jpg LABEL`` lines over small JPEGs; returns (path, samples)."""
    samples = []
    lines = []
    for i, pixels in enumerate(_photo_crops()):
        rel = f"images/class{i % 3}/photo_{i}.jpg"
        src = tmp_path / rel
        src.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(src, format="JPEG", quality=90)
        label = 10 + i
        samples.append((src, label))
        lines.append(f"{rel} {label}")
    path = tmp_path / "train.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, samples


@pytest.fixture
def dataset_dir(tmp_path, data_list):
    out = tmp_path / "records"
    torchrecord.Writer(data_list[0], out, db_num=2, codec="png", shuffle=False).write()
    return out


def test_entry_point_is_installed():
    eps = metadata.entry_points(group="torchrecord")
    ours = [ep for ep in eps if ep.name == "png"]
    assert len(ours) == 1, f"expected one 'png' entry point, found {ours}"
    ep = ours[0]
    assert ep.value == "torchrecord_png"
    assert ep.dist is not None and ep.dist.metadata["Name"] == DIST


def test_list_codecs_reports_the_distribution():
    infos = {info.name: info for info in plugins.list_codecs()}
    assert "png" in infos, f"png codec not registered; codecs: {sorted(infos)}"
    info = infos["png"]
    assert info.kind == "codec"
    assert info.distribution == DIST
    assert info.version == metadata.version(DIST)
    assert info.plugin == f"{DIST}:png"
    import torchrecord_png

    assert info.obj is torchrecord_png.CODEC
    assert isinstance(info.obj, torchrecord.Codec)
    # the built-ins are still there next to it
    assert {"raw_rgb", "jpeg"} <= set(infos)


def test_round_trip_is_lossless(data_list, dataset_dir):
    _, samples = data_list
    records = torchrecord.TRDataset(dataset_dir, transform=None)
    assert records.codec == "png"
    assert records.record_num == 2
    assert len(records) == len(samples)
    for i, (src, label) in enumerate(samples):
        record = records[i]
        image_proto = record.protos[0]
        assert image_proto.name == "png"
        assert image_proto.byte_data.startswith(PNG_SIGNATURE)
        with Image.open(io.BytesIO(image_proto.byte_data)) as stored:
            assert stored.format == "PNG"
        expected = Image.open(src).convert("RGB")
        assert list(image_proto.dims) == list(expected.size)
        decoded = torchrecord.get_codec("png").decode_image(record)
        assert decoded.mode == "RGB"
        assert decoded.size == expected.size
        assert decoded.tobytes() == expected.tobytes(), f"pixels differ for {src}"
        # the codec-independent decoder of torchrecord finds the codec by the record's name
        from torchrecord.transforms import decode_image

        assert decode_image(record).tobytes() == expected.tobytes()
        assert int(record.protos[1].byte_data) == label
    records.close()


def test_default_transform(data_list, dataset_dir):
    import torch

    _, samples = data_list
    ds = torchrecord.TRDataset(dataset_dir)
    assert len(ds) == len(samples)
    for i, (_, label) in enumerate(samples):
        tensor, got = ds[i]
        assert isinstance(tensor, torch.Tensor)
        assert tensor.shape == (3, 224, 224)
        assert tensor.dtype == torch.float32
        assert 0.0 <= tensor.min().item() and tensor.max().item() <= 1.0
        assert tensor.std().item() > 0.01  # a photograph, not a flat colour
        assert type(got) is int and got == label
    ds.close()


def test_loader_with_workers(data_list, dataset_dir):
    _, samples = data_list
    loader = torchrecord.TorchRecord(dataset_dir, batch_size=4, num_workers=2, shuffle=False)
    labels = []
    for images, batch_labels in loader:
        assert images.shape[1:] == (3, 224, 224)
        labels.extend(int(x) for x in batch_labels)
    assert sorted(labels) == sorted(label for _, label in samples)


def test_non_integer_label_is_refused_by_the_codec(tmp_path):
    src = tmp_path / "cat.jpg"
    Image.fromarray(_photo_crops()[3]).save(src, format="JPEG")
    codec = torchrecord.get_codec("png")
    with pytest.raises(torchrecord.EncodeError, match="not an integer"):
        codec.encode(str(src), "tabby")
    # the Writer maps string labels to indices before the codec sees them
    data_list = tmp_path / "names.txt"
    data_list.write_text("cat.jpg tabby\ncat.jpg siamese\n", encoding="utf-8")
    torchrecord.Writer(data_list, tmp_path / "out", codec="png", shuffle=False).write()
    dataset = torchrecord.TRDataset(tmp_path / "out")
    assert dataset.label_names == ["siamese", "tabby"]
    assert [dataset[i][1] for i in range(2)] == [1, 0]
