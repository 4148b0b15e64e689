"""``raw_rgb``: decode once at write time and store RGB pixels (TorchRecord 0.1's format).

Reading needs no image decode, which makes it the fastest codec to read; the price is about ten
times the bytes of the source JPEGs on disk.

Pillow opens every image (it decides what the file is, its size and mode, and what it refuses)
and decodes it, except where :func:`use_libjpeg` is on (the writer turns it on when it pays).
There a JPEG that Pillow opened as RGB is decoded by libjpeg-turbo straight into the stored
layout (``torchvision.io.decode_jpeg``), which saves about a fifth of the time of encoding
with Pillow's decode and ``tobytes()``, with the same pixels: both use libjpeg-turbo's default
(exact) IDCT and upsampling; and a JPEG whose header is plain (:func:`plain_rgb_jpeg_size`:
nothing in it Pillow could refuse or treat specially) is not opened with Pillow at all: its
header is read here, as Pillow would read it, in a tenth of the time. A self-check, once per
process, compares the two decoders on JPEGs made on the spot and keeps Pillow when they differ;
anything the fast decoder refuses goes to Pillow, whose error is the one reported.
"""

from __future__ import annotations

import io
from functools import lru_cache
from typing import Any

from ..hookspecs import hookimpl
from .base import (
    Codec,
    RecordParts,
    builds_record,
    fit,
    open_image,
    parse_label,
    pixel_limit,
    to_rgb,
)


class RawRGBCodec(Codec):
    name = "raw_rgb"
    description = "RGB pixels decoded at write time (Pillow's pixels); no decode when reading"

    def encode_parts(self, path: str, label: Any, max_size: int | None = None) -> RecordParts:
        label = parse_label(label)
        tried = False  # the fast decoder, on this file
        if _libjpeg_on:
            with open(path, "rb", buffering=0) as f:
                data = f.read(3)  # (anything but a JPEG is left to Pillow unread)
                if data == b"\xff\xd8\xff":
                    data += f.read()  # one read of the rest
            size = plain_rgb_jpeg_size(data)
            if size is not None and not (max_size and max(size) > max_size):
                pixels, tried = _libjpeg_rgb(data, size), True
                if pixels is not None:
                    return RecordParts(pixels, size, label)
        with open_image(path, max_size) as img:  # Pillow decides what the file is, or refuses it
            if _libjpeg_on and not tried and img.format == "JPEG" and img.mode == "RGB":
                if not (max_size and max(img.size) > max_size):
                    img.fp.seek(0)
                    pixels = _libjpeg_rgb(img.fp.read(), img.size)
                    if pixels is not None:
                        return RecordParts(pixels, img.size, label)
            rgb = fit(to_rgb(img), max_size)
            return RecordParts(rgb.tobytes(), rgb.size, label)

    encode = builds_record(encode_parts)

    def decode_image(self, record):
        from PIL import Image

        proto = record.protos[0]
        return Image.frombytes("RGB", tuple(proto.dims), proto.byte_data)

    def decode_tensor(self, record):
        from ..transforms import tensor_view

        proto = record.protos[0]
        width, height = proto.dims
        return tensor_view(proto.byte_data).view(height, width, 3).permute(2, 0, 1)


_libjpeg_on = False  # see use_libjpeg()
_libjpeg_chosen: bool | None = None  # what the user asked with use_libjpeg(); None: each write

# The markers of a JPEG header read without Pillow (plain_rgb_jpeg_size): SOF0-2 (baseline,
# extended and progressive Huffman frames), DHT, DQT, DRI, APP0-15 and COM. Anything else sends
# the file through Pillow.
_PLAIN_FRAMES = frozenset((0xC0, 0xC1, 0xC2))
_PLAIN_TABLES = frozenset((0xC4, 0xDB, 0xDD, 0xFE, *range(0xE0, 0xF0)))


def plain_rgb_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG whose header Pillow would open as an 8-bit, 3-channel RGB JPEG
    without a doubt; None when there is any doubt (Pillow then opens the file, as it always
    did, and decides).

    Opening a JPEG with Pillow parses its header in Python (its quantization tables above all):
    about a tenth of what writing a ``raw_rgb`` record costs here. This walk reads only what it
    needs and gives up on everything Pillow treats specially or could refuse: other markers and
    frame types, junk between segments, malformed quantization tables, short JFIF, Adobe or ICC
    segments, EXIF without a JFIF resolution (Pillow then parses the EXIF), Photoshop and
    multi-picture (MPO) segments, and images over Pillow's decompression-bomb warning size."""
    if not data.startswith(b"\xff\xd8\xff"):
        return None
    pos, end, size, dpi, exif = 2, len(data), None, False, False
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker not in _PLAIN_TABLES and marker not in _PLAIN_FRAMES and marker != 0xDA:
            return None
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        body = data[pos + 4 : pos + 2 + length]
        if length < 2 or len(body) != length - 2:
            return None
        if marker == 0xDA:  # start of scan: the header is over
            break
        if marker in _PLAIN_FRAMES:
            # (exactly the three components' entries: Pillow refuses a longer segment)
            if size is not None or len(body) != 6 + 3 * 3 or body[0] != 8 or body[5] != 3:
                return None
            size = (int.from_bytes(body[3:5], "big"), int.from_bytes(body[1:3], "big"))
        elif marker == 0xDB:  # quantization tables, as Pillow checks them
            at = 0
            while at < len(body):
                at += 1 + (64 if body[at] < 16 else 128)
            if at != len(body):
                return None
        elif marker == 0xE0 and body.startswith(b"JFIF"):
            if len(body) < 12:
                return None
            dpi = dpi or body[7] in (1, 2)  # (Pillow then leaves the EXIF alone)
        elif marker == 0xE1 and body.startswith(b"Exif\0\0"):
            exif = True
        elif marker == 0xE2 and body.startswith((b"MPF\0", b"ICC_PROFILE\0")):
            if body.startswith(b"MPF") or len(body) < 14:
                return None
        elif marker == 0xED and body.startswith(b"Photoshop 3.0\0"):
            return None
        elif marker == 0xEE and body.startswith(b"Adobe") and len(body) < 7:
            return None
        pos += 2 + length
    else:
        return None  # no start of scan
    if size is None or not all(size) or (exif and not dpi):
        return None
    limit = pixel_limit()  # (twice Pillow's warning size; not lifted by another thread)
    if limit is not None and size[0] * size[1] > limit // 2:
        return None
    return size


def use_libjpeg(on: bool | None = True) -> bool:
    """Let ``raw_rgb`` decode RGB JPEGs with libjpeg-turbo in this process (and in processes
    forked from it from now on), or not (False); True when it will: torchvision decodes JPEGs
    here and gives Pillow's pixels. What is stored is the same either way.

    Off by default because loading torchvision takes seconds, which a small write never earns
    back: each ``Writer`` decides for itself as it pays (``Writer._libjpeg_pays_off``), unless
    this was called, whose choice every later write of this process keeps (False, say, where
    libjpeg's "Corrupt JPEG data" lines on stderr are unwelcome: Pillow decodes those files
    silently). ``None`` gives the choice back to each write (and turns the decode off)."""
    global _libjpeg_chosen
    _libjpeg_chosen = None if on is None else bool(on)
    return set_libjpeg(bool(on))


def set_libjpeg(on: bool) -> bool:
    """:func:`use_libjpeg` as a write sets it for itself: the user's choice is left as it is."""
    global _libjpeg_on
    _libjpeg_on = on and _fast_decoder() is not None
    return _libjpeg_on


def libjpeg_chosen() -> bool | None:
    """What :func:`use_libjpeg` was last asked in this process (None: each write decides)."""
    return _libjpeg_chosen


def libjpeg_on() -> bool:
    """Whether :func:`use_libjpeg` is on in this process."""
    return _libjpeg_on


def _libjpeg_rgb(data: bytes, size: tuple[int, int]) -> Any:
    """The RGB pixels of a JPEG Pillow opened as RGB, of ``size``: a uint8 H x W x 3 numpy
    array, whose memory holds the bytes of Pillow's ``tobytes()``. None when the fast decoder is
    unavailable, differs from Pillow here, or refuses the file (Pillow then decodes it, and
    reports what is wrong with it)."""
    decode = _fast_decoder()
    if decode is None:
        return None
    try:
        pixels = decode(data)
    except Exception:  # truncated or corrupt: Pillow's decode gives the error (or its policy)
        return None
    width, height = size
    if tuple(pixels.shape) != (height, width, 3):
        return None
    return pixels.contiguous().numpy()  # (a view: decode_jpeg's buffer is H x W x 3)


@lru_cache(maxsize=1)
def _fast_decoder():
    """``bytes -> uint8 H x W x 3 tensor`` through libjpeg-turbo, or None when torchvision cannot
    decode JPEGs (missing or broken) or its pixels differ from Pillow's (checked once per
    process). Never raises: the writer then goes on with Pillow."""
    from .jpeg import _tensor_decoder

    tensor_decoder = _tensor_decoder()
    if tensor_decoder is None:
        return None
    from ..transforms import tensor_view

    def decode(data: bytes):
        # decode_jpeg fills an H x W x 3 buffer and returns it as a 3 x H x W view: undo the view
        return tensor_decoder(tensor_view(data)).permute(1, 2, 0)

    try:
        same = _same_pixels_as_pillow(decode)
    except Exception:  # e.g. a Pillow built without a JPEG encoder cannot make the samples
        same = False
    return decode if same else None


def _same_pixels_as_pillow(decode) -> bool:
    """Whether ``decode`` gives Pillow's pixels for JPEGs of the kinds cameras and encoders
    write: chroma subsampled 4:2:0, 4:2:2 and 4:4:4, baseline and progressive, sizes that are
    not multiples of the block size."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    height, width = 37, 53
    ys, xs = np.mgrid[0:height, 0:width]
    gradient = np.stack([xs * 4, ys * 6, (xs + ys) * 3], axis=-1)
    noise = rng.integers(0, 64, size=(height, width, 3))
    image = Image.fromarray(np.clip(gradient + noise, 0, 255).astype(np.uint8), "RGB")
    for subsampling in (2, 1, 0):
        for progressive in (False, True):
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=85, subsampling=subsampling, progressive=progressive)
            data = buffer.getvalue()
            with Image.open(io.BytesIO(data)) as decoded:
                expected = decoded.tobytes()
            try:
                got = decode(data).contiguous().numpy().tobytes()
            except RuntimeError:
                return False
            if got != expected:
                return False
    return True


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
