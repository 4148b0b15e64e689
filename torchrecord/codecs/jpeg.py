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
from .base import (
    Codec,
    RecordParts,
    builds_record,
    check_pixels,
    encode_jpeg,
    fit,
    open_image,
    parse_label,
    to_rgb,
)

JPEG_SOI = b"\xff\xd8\xff"
JPEG_EOI = b"\xff\xd9"


# Start-of-frame markers (baseline, extended, progressive, lossless, arithmetic): the segment
# that carries the image size. C4 (DHT), C8 (JPG) and CC (DAC) share the range but are not frames.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE_MARKERS = frozenset(range(0xD0, 0xD8)) | {0x01}  # RSTn and TEM carry no length


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a JPEG's frame header, walking its marker segments.

    About 30 times faster than opening the file with Pillow, which matters when a write is
    otherwise a copy. Raises ``ValueError`` when the segments do not lead to a frame header.
    """
    width, height, _ = _walk_header(data)
    return width, height


def _walk_header(data: bytes) -> tuple[int, int, int]:
    """(width, height, where the image data starts): the frame header's size and the offset
    of the first start-of-scan marker (0 when the walk stops before it)."""
    pos, end = 2, len(data)
    size = None
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            if size is not None:
                return (*size, 0)
            raise ValueError(f"expected a marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE_MARKERS:
            pos += 2
            continue
        if marker == 0xDA and size is not None:  # start of scan: the image data follows
            return (*size, pos)
        if marker in (0xD9, 0xDA):  # end of image, or scan data before any frame header
            break
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if length < 2 or pos + 2 + length > end:
            if size is not None:
                return (*size, 0)
            raise ValueError(f"segment {marker:#04x} at byte {pos} runs past the end")
        if marker in _SOF_MARKERS and size is None:
            if length < 7:
                raise ValueError("frame header too short")
            height = int.from_bytes(data[pos + 5 : pos + 7], "big")
            width = int.from_bytes(data[pos + 7 : pos + 9], "big")
            if not width or not height:
                raise ValueError(f"frame header says {width}x{height}")
            size = (width, height)
        pos += 2 + length
    if size is not None:
        return (*size, 0)
    raise ValueError("no frame header (SOF) before the image data")


def _pillow_size(path: str, data: bytes) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "JPEG":
                raise EncodeError(
                    f"{path} is a {img.format} image, not a JPEG. Use "
                    "codec='raw_rgb' for other image formats."
                )
            return img.size
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise EncodeError(f"{path} is not a readable JPEG file: {exc}") from None


class JPEGCodec(Codec):
    name = "jpeg"
    description = "original JPEG bytes, byte-identical; decoded when reading"

    def encode_parts(
        self, path: str, label: Any, max_size: int | None = None, quality: int = 90
    ) -> RecordParts:
        """The file's bytes, unchanged; or, when ``max_size`` is set and the image is larger,
        the image scaled down and re-encoded at ``quality``."""
        label = parse_label(label)
        with open(path, "rb", buffering=0) as f:  # unbuffered: one read of the whole file
            data = f.read()
        if not data.startswith(JPEG_SOI):
            raise EncodeError(
                f"{path} is not a JPEG file (it does not start with a JPEG marker); the 'jpeg' "
                "codec stores JPEG bytes unchanged. Use codec='raw_rgb' for other image formats."
            )
        try:  # from the frame header; the pixels are not decoded here
            width, height, scan = _walk_header(data)
            size = (width, height)
        except ValueError:
            size, scan = _pillow_size(path, data), 0  # unusual layouts that decoders tolerate
        # The end-of-image marker must follow the image data: an embedded thumbnail (in the
        # EXIF segment, before the scan) ends with one too. Inside the entropy-coded data a
        # 0xFF byte is always followed by 0x00 or a restart marker, never by 0xD9. Anything
        # may follow the marker (a Motion Photo's video, padding): searched from the end.
        lowest = scan if scan else max(0, len(data) - 65536)  # (unknown layout: the old rule)
        if data.rfind(JPEG_EOI, lowest) < 0:
            raise EncodeError(
                f"{path} is a truncated JPEG (no end-of-image marker): re-export or re-download "
                "the file, or remove its line from the data list."
            )
        check_pixels(path, size, max_size)
        if max_size and max(size) > max_size:
            with open_image(io.BytesIO(data), max_size, path, warn=False) as img:
                small = fit(to_rgb(img), max_size)
            return RecordParts(encode_jpeg(small, quality), small.size, label, self.name)
        return RecordParts(data, size, label, self.name)

    encode = builds_record(encode_parts)

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
    except Exception:  # not installed, or broken (a torch it was not built for raises here)
        return None
    return partial(decode_jpeg, mode=ImageReadMode.RGB)


CODEC = JPEGCodec()


@hookimpl
def torchrecord_register_codecs(register):
    register(CODEC)
