"""``raw_rgb``: decode once at write time and store RGB pixels (TorchRecord 0.1's format).

Reading needs no image decode, which makes it the fastest codec to read; the price is about ten
times the bytes of the source JPEGs on disk.
"""

from __future__ import annotations

from typing import Any

from ..hookspecs import hookimpl
from .base import Codec, fit, make_record, parse_label


class RawRGBCodec(Codec):
    name = "raw_rgb"
    description = "RGB pixels decoded by Pillow at write time; no decode when reading"

    def encode(self, path: str, label: Any, max_size: int | None = None):
        from PIL import Image

        label = parse_label(label)
        with Image.open(path) as img:
            # (convert() of an RGB image would copy it: skip that)
            rgb = fit(img if img.mode == "RGB" else img.convert("RGB"), max_size)
            return make_record(rgb.tobytes(), rgb.size, label)

    def decode_image(self, record):
        from PIL import Image

        proto = record.protos[0]
        return Image.frombytes("RGB", tuple(proto.dims), proto.byte_data)

    def decode_tensor(self, record):
        from ..transforms import tensor_view

        proto = record.protos[0]
        width, height = proto.dims
        return tensor_view(proto.byte_data).view(height, width, 3).permute(2, 0, 1)


CODEC = RawRGBCodec()


@hookimpl
def torchrecord_register_codecs(register):
    register(CODEC)


def default_data_process_func(data: str):
    """TorchRecord 0.1's ``default_data_process_func``: one ``path label`` line -> record.

    The label is the last whitespace-separated token, so paths with spaces work here too.
    """
    parts = data.strip().rsplit(None, 1)
    if len(parts) != 2:
        raise ValueError(f"expected 'path label', got {data!r}")
    return CODEC.encode(parts[0], parts[1])
