"""``jpeg``: store the original JPEG file bytes unchanged and decode them when reading.

The smallest records (the bytes on disk equal the source files), at the cost of a JPEG decode per
sample at read time. Only real JPEG files are accepted: anything else is refused with an error
that suggests ``raw_rgb``.
"""

from __future__ import annotations

import io
import warnings
from functools import lru_cache, partial
from typing import Any

from ..errors import EncodeError
from ..hookspecs import hookimpl
from .base import Codec, make_record, parse_label

JPEG_SOI = b"\xff\xd8\xff"
JPEG_EOI = b"\xff\xd9"


class JPEGCodec(Codec):
    name = "jpeg"
    description = "original JPEG bytes, byte-identical; decoded when reading"

    def encode(self, path: str, label: Any):
        from PIL import Image, UnidentifiedImageError

        label = parse_label(label)
        with open(path, "rb") as f:
            data = f.read()
        if not data.startswith(JPEG_SOI):
            raise EncodeError(
                f"{path} is not a JPEG file (it does not start with a JPEG marker); the 'jpeg' "
                "codec stores JPEG bytes unchanged. Use codec='raw_rgb' for other image formats."
            )
        try:
            with Image.open(io.BytesIO(data)) as img:
                if img.format != "JPEG":
                    raise EncodeError(
                        f"{path} is a {img.format} image, not a JPEG. Use codec='raw_rgb' for "
                        "other image formats."
                    )
                size = img.size  # from the header; the pixels are not decoded here
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise EncodeError(f"{path} is not a readable JPEG file: {exc}") from exc
        if data.rfind(JPEG_EOI, max(0, len(data) - 65536)) < 0:
            raise EncodeError(
                f"{path} is a truncated JPEG (no end-of-image marker): re-export or re-download "
                "the file, or remove its line from the data list."
            )
        return make_record(data, size, label, name=self.name)

    def decode_image(self, record):
        from PIL import Image

        with Image.open(io.BytesIO(record.protos[0].byte_data)) as img:
            return img.convert("RGB")

    def decode_tensor(self, record):
        decode = _tensor_decoder()
        if decode is None:  # a torchvision without image decoding: Pillow's path
            return super().decode_tensor(record)
        from ..transforms import tensor_view

        return decode(tensor_view(record.protos[0].byte_data))


@lru_cache(maxsize=1)
def _tensor_decoder():
    """``torchvision.io.decode_jpeg`` (libjpeg-turbo into a uint8 CHW tensor), or None.

    torchvision 0.29 deprecates its image decoders in favour of TorchCodec; they still work and
    decode faster than Pillow's path into a tensor, so we use them while they exist.
    """
    warnings.filterwarnings(
        "ignore",
        message="The image decoding and encoding capabilities of TorchVision",
        category=DeprecationWarning,
    )
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return None
    return partial(decode_jpeg, mode=ImageReadMode.RGB)


CODEC = JPEGCodec()


@hookimpl
def torchrecord_register_codecs(register):
    register(CODEC)
