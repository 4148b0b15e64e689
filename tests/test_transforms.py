"""Read-time transforms: 0.1's PIL path, the tensor ("fast") path and uint8 output agree."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms as tvt
from conftest import read_list
from PIL import Image

from torchrecord import TorchRecord, TRDataset, Writer
from torchrecord.transforms import pil_to_uint8, resize_224


@pytest.fixture(scope="module")
def datasets(photo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("transforms")
    paths = {}
    for codec in ("raw_rgb", "jpeg"):
        paths[codec] = out / codec
        Writer(
            photo_dir / "data_list.txt", paths[codec], db_num=2, codec=codec, shuffle=False
        ).write()
    return paths


@pytest.mark.parametrize("codec", ["raw_rgb", "jpeg"])
def test_fast_and_uint8_match_the_pil_path(photo_dir, datasets, codec):
    pil = TRDataset(datasets[codec], transform="pil")
    fast = TRDataset(datasets[codec], transform="fast")
    uint8 = TRDataset(datasets[codec], transform="uint8")
    samples = read_list(photo_dir / "data_list.txt")
    seed = tvt.Compose([tvt.Resize((224, 224)), tvt.ToTensor()])
    for i in range(0, len(samples), 5):
        path, label = samples[i]
        with Image.open(path) as img:
            reference = seed(img.convert("RGB"))
        a, la = pil[i]
        b, lb = fast[i]
        c, lc = uint8[i]
        assert la == lb == lc == label
        assert torch.equal(a, reference)
        assert b.shape == (3, 224, 224) and b.dtype == torch.float32
        # the tensor resize rounds differently from PIL's, by at most one level
        assert (a - b).abs().max().item() <= 1 / 255 + 1e-6
        assert (a - b).abs().mean().item() < 1e-3
        assert c.dtype == torch.uint8 and c.shape == (3, 224, 224)
        assert torch.equal(c.float().div(255), b)


@pytest.mark.parametrize("codec", ["raw_rgb", "jpeg"])
@pytest.mark.parametrize("transform", ["fast", "uint8"])
def test_batches_built_in_place_equal_the_samples_bit_for_bit(datasets, codec, transform):
    dataset = TRDataset(datasets[codec], transform=transform)
    samples = [dataset[i] for i in range(8)]
    dataset.prebatch = True  # as TorchRecord sets it
    batch = dataset.__getitems__(list(range(8)))
    assert torch.equal(batch.images, torch.stack([image for image, _ in samples]))
    assert batch.labels.tolist() == [label for _, label in samples]


def test_named_transforms_through_the_loader(datasets):
    loader = TorchRecord(
        datasets["jpeg"], batch_size=8, num_workers=2, transform="uint8", shuffle=False
    )
    batches = list(loader)
    assert [tuple(images.shape) for images, _ in batches] == [(8, 3, 224, 224)] * 3
    assert all(images.dtype == torch.uint8 for images, _ in batches)
    with pytest.raises(ValueError, match="unknown transform 'bilinear'"):
        TRDataset(datasets["jpeg"], transform="bilinear")


def test_tensor_helpers(photo_dir):
    path, _ = read_list(photo_dir / "data_list.txt")[0]
    with Image.open(path) as img:
        rgb = img.convert("RGB")
    chw = pil_to_uint8(rgb)
    assert chw.shape == (3, rgb.height, rgb.width)
    assert tuple(chw[:, 7, 11].tolist()) == rgb.getpixel((11, 7))
    assert resize_224(chw).shape == (3, 224, 224)
    small = resize_224(chw)
    assert torch.equal(resize_224(small), small)  # already 224x224: unchanged


def _in_channels_last(images: torch.Tensor) -> bool:
    """Each pixel's channels side by side in memory, not each channel's plane (3 > 1)."""
    return images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()


@pytest.mark.parametrize("codec", ["raw_rgb", "jpeg"])
@pytest.mark.parametrize("transform", ["auto", "uint8", "pil"])
@pytest.mark.parametrize("workers", [0, 2])
def test_channels_last_batches_hold_the_same_values(datasets, codec, transform, workers):
    """The images of every batch equal those of a loader in channel order, label for label,
    in ``torch.channels_last`` memory format: built in place (``auto``, ``uint8``) or stacked
    so (``pil``), in this process and from worker processes."""
    options = dict(batch_size=5, num_workers=workers, transform=transform, shuffle="global")
    plain = [(images.clone(), labels) for images, labels in TorchRecord(datasets[codec], **options)]
    last = TorchRecord(datasets[codec], channels_last=True, **options)
    batches = [(images.clone(), labels) for images, labels in last]  # (clone keeps strides)
    assert len(batches) == len(plain) == 5  # 24 records, the last batch of 4
    for (images, labels), (want, want_labels) in zip(batches, plain):
        assert want.is_contiguous() and _in_channels_last(images), images.stride()
        assert images.shape == want.shape and images.dtype == want.dtype
        assert torch.equal(images, want) and torch.equal(labels, want_labels)


@pytest.mark.parametrize("how", ["not recycled", "all held", "extra fields"])
@pytest.mark.parametrize("transform", ["auto", "pil"])
def test_channels_last_batches_from_workers_every_way(
    photo_dir, datasets, tmp_path, how, transform
):
    """From workers: without reused buffers, with every batch of two epochs held (the workers
    then take fresh buffers), and with extra fields (the third element of every batch)."""
    path = datasets["jpeg"]
    options = dict(batch_size=5, num_workers=2, transform=transform, shuffle="global")
    if how == "not recycled":
        options["recycle_batches"] = False
    if how == "extra fields":
        samples = read_list(photo_dir / "data_list.txt")
        path = tmp_path / "extras"
        rows = [
            {"path": str(p), "label": label, "box": [i, i + 1.5]}
            for i, (p, label) in enumerate(samples)
        ]
        Writer(rows, path, db_num=2, codec="jpeg", shuffle=False).write()
    reference = TorchRecord(path, **options)
    plain = [[b[0].clone(), *b[1:]] for _ in range(2) for b in reference]  # epochs 0 and 1
    last = TorchRecord(path, channels_last=True, **options)
    held = [batch for _ in range(2) for batch in last]
    assert len(held) == len(plain) == 10
    for batch, want in zip(held, plain):
        assert want[0].is_contiguous() and _in_channels_last(batch[0]), batch[0].stride()
        assert torch.equal(batch[0], want[0]) and torch.equal(batch[1], want[1])
        assert len(batch) == len(want) == (3 if how == "extra fields" else 2)
        if how == "extra fields":
            assert batch[2]["box"] == want[2]["box"] and len(batch[2]["box"]) == len(batch[1])


def test_channels_last_keeps_a_namedtuple_and_refuses_what_is_not_an_image(datasets):
    from collections import namedtuple

    Sample = namedtuple("Sample", "image label")
    uint8 = TRDataset(datasets["jpeg"], transform="uint8")

    def named(record):
        image, label = uint8.transform(record)
        return Sample(image, label)

    options = dict(batch_size=4, transform=named, channels_last=True, shuffle=False)
    batch = next(iter(TorchRecord(datasets["jpeg"], **options)))
    assert type(batch) is Sample and _in_channels_last(batch.image)
    assert torch.equal(batch.image, torch.stack([uint8[i][0] for i in range(4)]))
    assert batch.label.tolist() == [uint8[i][1] for i in range(4)]
    with pytest.raises(ValueError, match="collate_fn of your own"):
        TorchRecord(datasets["jpeg"], batch_size=4, channels_last=True, collate_fn=list)
    flat = TorchRecord(
        datasets["jpeg"],
        batch_size=4,
        channels_last=True,
        transform=lambda record: (torch.zeros(7), 0),
    )
    with pytest.raises(TypeError, match="gave tensors of shape 7"):
        next(iter(flat))
    hwc = TorchRecord(
        datasets["jpeg"],
        batch_size=4,
        channels_last=True,
        transform=lambda record: (uint8.transform(record)[0].permute(1, 2, 0).numpy(), 0),
    )
    with pytest.raises(TypeError, match="gave a ndarray as image"):
        next(iter(hwc))
