"""Read-time transforms: from a record to what the training loop receives.

:func:`default_transform` gives what TorchRecord 0.1 gave: a 3x224x224 float tensor in [0, 1]
(``Resize((224, 224))`` then ``ToTensor()`` on a PIL image) and an int label. It reads records of
any image codec: the image proto's ``name`` says which codec wrote it (empty means raw RGB, as in
0.1).
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from typing import Any

TRANSFORMS = ("pil", "fast", "uint8")  # names accepted by TRDataset(transform=...)


@lru_cache(maxsize=1)
def _seed_pipeline() -> Any:
    import torchvision.transforms as tvt

    return tvt.Compose([tvt.Resize((224, 224)), tvt.ToTensor()])


def to_seed_tensor(img: Any) -> Any:
    """The seed's image pipeline: ``Resize((224, 224))`` then ``ToTensor()``."""
    return _seed_pipeline()(img)


def decode_image(record: Any) -> Any:
    """The RGB ``PIL.Image`` of a record of the shared two-proto layout, whatever its codec."""
    from PIL import Image

    proto = record.protos[0]
    if not proto.name:  # raw RGB pixels, as TorchRecord 0.1 wrote them
        return Image.frombytes("RGB", tuple(proto.dims), proto.byte_data)
    from .codecs.base import decoded_image
    from .plugins import get_codec

    return decoded_image(get_codec(proto.name), record)


def default_transform(tensor_protos: Any) -> tuple[Any, int]:
    """The seed's default transform: (3x224x224 float tensor in [0, 1], int label)."""
    img = to_seed_tensor(decode_image(tensor_protos))
    label = int(tensor_protos.protos[1].byte_data)
    return img, label


def tensor_view(data: bytes) -> Any:
    """A read-only uint8 tensor over ``data`` without copying it (nothing writes to it)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The given buffer is not writable"
        return torch.frombuffer(data, dtype=torch.uint8)


def pil_to_uint8(img: Any) -> Any:
    """A PIL RGB image as a uint8 ``3 x H x W`` tensor."""
    width, height = img.size
    return tensor_view(img.convert("RGB").tobytes()).view(height, width, 3).permute(2, 0, 1)


def resize_224(image: Any) -> Any:
    """Antialiased bilinear resize of a uint8 ``3 x H x W`` tensor to ``3 x 224 x 224``."""
    from torchvision.transforms.v2.functional import resize

    if tuple(image.shape[-2:]) == (224, 224):  # a copy (the image may be a read-only view),
        return image.clone()  # in its memory format, as the resize gives its own
    return resize(image, [224, 224], antialias=True)


def preload() -> None:
    """Import what the built-in transforms use, in this process.

    Forked DataLoader workers inherit the parent's modules; without this, every worker of every
    epoch (unless ``persistent_workers``) would import torchvision itself, about a second each.
    """
    import torchvision.transforms  # noqa: F401  (0.1's PIL pipeline)
    import torchvision.transforms.v2.functional  # noqa: F401  (resize_224)

    from .codecs.jpeg import _tensor_decoder

    _tensor_decoder()
