"""``smart``: raw pixels for small images, JPEG for large ones, chosen per image.

In the spirit of FFCV's ``smart`` mode: decoding a small JPEG costs about as much per pixel as a
large one while its raw pixels cost little disk, so images of at most ``raw_below`` pixels
(after ``max_size``) are stored as RGB pixels and the rest as JPEG (the original bytes when the
source is a JPEG that needs no resizing). Each record says which it holds: the image proto's
``name`` is ``"jpeg"`` for JPEG bytes and empty for raw pixels, as with the other codecs.
"""

from __future__ import annotations

from typing import Any

from ..hookspecs import hookimpl
from .base import (
    Codec,
    RecordParts,
    builds_record,
    encode_jpeg,
    fit,
    open_image,
    parse_label,
    to_rgb,
)
from .jpeg import CODEC as JPEG
from .jpeg import JPEG_SOI, jpeg_size
from .raw_rgb import CODEC as RAW

DEFAULT_RAW_BELOW = 256 * 256


class SmartCodec(Codec):
    name = "smart"
    description = "per image: RGB pixels when small, JPEG when large"

    def encode_parts(
        self,
        path: str,
        label: Any,
        max_size: int | None = None,
        quality: int = 90,
        raw_below: int = DEFAULT_RAW_BELOW,
    ) -> RecordParts:

        label = parse_label(label)
        with open(path, "rb") as f:
            head = f.read(3)
        size = None
        if head == JPEG_SOI:
            try:
                with open(path, "rb") as f:
                    size = jpeg_size(f.read())
            except ValueError:
                size = None  # let Pillow say what is wrong with it
        if size is None:
            with open_image(path, max_size, warn=False) as img:  # (the encode below warns)
                size = img.size
        scale = min(1.0, max_size / max(size)) if max_size else 1.0
        pixels = round(size[0] * scale) * round(size[1] * scale)
        if pixels <= raw_below:
            return RAW.encode_parts(path, label, max_size=max_size)
        if head == JPEG_SOI:
            return JPEG.encode_parts(path, label, max_size=max_size, quality=quality)
        with open_image(path, max_size) as img:
            rgb = fit(to_rgb(img), max_size)
        return RecordParts(encode_jpeg(rgb, quality), rgb.size, label, JPEG.name)

    encode = builds_record(encode_parts)

    def _codec_of(self, record: Any) -> Codec:
        return JPEG if record.protos[0].name == JPEG.name else RAW

    def decode_image(self, record):
        return self._codec_of(record).decode_image(record)

    def decode_tensor(self, record):
        return self._codec_of(record).decode_tensor(record)


CODEC = SmartCodec()


@hookimpl
def torchrecord_register_codecs(register):
    register(CODEC)
