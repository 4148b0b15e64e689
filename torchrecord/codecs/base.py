"""The codec interface and the record layout every image codec shares.

A record is a ``TensorProtos`` message with (at least) two protos, exactly as TorchRecord 0.1
wrote them:

* ``protos[0]``: the image. ``dims = [width, height]``, ``data_type = BYTE``, ``byte_data`` = the
  stored bytes, and ``name`` = the codec that wrote them (empty for raw RGB pixels, as in 0.1).
* ``protos[1]``: the label as ASCII digits in ``byte_data`` (``data_type = BYTE``).

Keeping that layout means the seed's ``default_transform`` reads ``raw_rgb`` records unchanged,
and old 0.1 datasets are simply ``raw_rgb`` datasets.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from ..errors import EncodeError

if TYPE_CHECKING:
    from PIL.Image import Image

    from ..serializers.tensorprotos import TensorProtos

BYTE = 3  # TensorProto.DataType.BYTE


def make_record(image_bytes: bytes, size: tuple[int, int], label: int | str, name: str = ""):
    """Build the two-proto record of the layout above."""
    from ..serializers.tensorprotos import TensorProtos

    record = TensorProtos()
    image = record.protos.add()
    image.dims.extend(size)
    image.data_type = BYTE
    image.byte_data = image_bytes
    if name:
        image.name = name
    label_proto = record.protos.add()
    label_proto.data_type = BYTE
    label_proto.byte_data = str(label).encode("ascii")
    return record


class RecordParts(NamedTuple):
    """A record of the layout above before it is built: what :func:`make_record` takes.

    ``image`` is the stored image bytes as ``bytes`` or any C-contiguous buffer (a numpy array
    of decoded pixels, for example): a serializer that writes the parts itself copies it once,
    straight into the serialized record, instead of into a message and then out of it."""

    image: Any
    size: tuple[int, int]
    label: int
    name: str = ""

    def record(self) -> TensorProtos:
        image = self.image if isinstance(self.image, bytes) else bytes(memoryview(self.image))
        return make_record(image, self.size, self.label, self.name)


def builds_record(encode_parts: Any) -> Any:
    """A codec's ``encode`` made of its ``encode_parts``: the same parameters (which the writer
    checks options against), the record built from what ``self.encode_parts`` gives (also in a
    subclass that overrides ``encode_parts``)."""
    import inspect
    from functools import wraps

    fast = encode_parts.__name__

    @wraps(encode_parts)
    def encode(self: Codec, path: str, label: Any, *args: Any, **options: Any) -> TensorProtos:
        return getattr(self, fast)(path, label, *args, **options).record()

    encode.__signature__ = inspect.signature(encode_parts).replace(  # type: ignore[attr-defined]
        return_annotation="TensorProtos"
    )
    encode.__name__ = "encode"
    encode.__qualname__ = encode_parts.__qualname__.rpartition(".")[0] + ".encode"
    encode.built_on = fast  # type: ignore[attr-defined]  (see plugins.fast_method)
    return encode


def record_label(record: TensorProtos) -> int:
    """The integer label of a record of the shared layout."""
    return int(record.protos[1].byte_data)


def parse_label(label: Any) -> int:
    """Labels are integers in this version; anything else is refused with a clear message."""
    try:
        value = int(label)
    except (TypeError, ValueError):
        raise EncodeError(f"label {label!r} is not an integer") from None
    if isinstance(label, float) and not float(label).is_integer():
        raise EncodeError(f"label {label!r} is not an integer")
    if not -(1 << 63) <= value < 1 << 63:
        raise EncodeError(
            f"label {label!r} does not fit in 64 bits (the loader's label tensors are int64)"
        )
    return value


# Pillow's limit is one global: while an image that max_size shrinks is opened without it,
# the other threads' checks still use the limit saved here
_LIMIT_LOCK = threading.Lock()
_lifted = 0  # opens in progress without the limit
_saved_limit: Any = None  # the limit they lifted


def pixel_limit() -> int | None:
    """The pixels beyond which Pillow refuses to open an image (its decompression-bomb check:
    twice ``PIL.Image.MAX_IMAGE_PIXELS``), or None when that check is off."""
    from PIL import Image as PILImage

    with _LIMIT_LOCK:
        limit = _saved_limit if _lifted else PILImage.MAX_IMAGE_PIXELS
    return None if limit is None else 2 * int(limit)


def check_pixels(path: str, size: tuple[int, int], max_size: int | None, warn: bool = True) -> None:
    """Refuse an image beyond Pillow's decompression-bomb limit, which reading it with Pillow
    (the ``pil`` transform) would refuse, unless ``max_size`` scales it down at write time; and
    warn, naming the file, of one beyond Pillow's warning size (half that limit), for which
    Pillow's own ``DecompressionBombWarning`` names none."""
    limit = pixel_limit()
    width, height = size
    if limit is None or width * height <= limit // 2:
        return
    shrunk = bool(max_size and max(size) > max_size)
    if width * height <= limit:
        if warn:
            from PIL.Image import DecompressionBombWarning

            then = (
                "it is stored scaled down (max_size)"
                if shrunk
                else "it is stored as it is. If you trust the file, raise "
                "PIL.Image.MAX_IMAGE_PIXELS (Pillow warns again whenever it decodes a JPEG this "
                "large, as the pil transform does with the jpeg codec's records); or scale it "
                "down while writing with max_size (--max-size)"
            )
            warnings.warn(
                f"{path} is {width}x{height} = {width * height:,} pixels, over Pillow's "
                f"decompression-bomb warning size of {limit // 2:,} (PIL.Image.MAX_IMAGE_PIXELS; "
                f"Pillow's own warning, where it gives one, names no file): {then}",
                DecompressionBombWarning,
                stacklevel=2,
            )
        return
    if shrunk:
        return
    raise EncodeError(
        f"{path} is {width}x{height} = {width * height:,} pixels, beyond Pillow's "
        f"decompression-bomb limit of {limit:,} (twice PIL.Image.MAX_IMAGE_PIXELS), so Pillow "
        "would refuse to read it back. Scale it down while writing with max_size (--max-size), "
        "or, if you trust the file, raise PIL.Image.MAX_IMAGE_PIXELS (None turns the check "
        "off) in the writing and the reading processes"
    )


@contextlib.contextmanager
def _no_pixel_limit() -> Iterator[None]:
    """Pillow's limit off while the block runs (in any thread: the last one out restores it)."""
    global _lifted, _saved_limit
    from PIL import Image as PILImage

    with _LIMIT_LOCK:
        if not _lifted:
            _saved_limit, PILImage.MAX_IMAGE_PIXELS = PILImage.MAX_IMAGE_PIXELS, None
        _lifted += 1
    try:
        yield
    finally:
        with _LIMIT_LOCK:
            _lifted -= 1
            if not _lifted:
                PILImage.MAX_IMAGE_PIXELS = _saved_limit


def open_image(
    source: Any, max_size: int | None, name: str | None = None, warn: bool = True
) -> Image:
    """``PIL.Image.open(source)``, where an image beyond Pillow's decompression-bomb limit is
    opened when ``max_size`` scales it down (the user asked for it smaller) and refused with
    :func:`check_pixels`'s explanation otherwise (``warn``: and one beyond its warning size is
    named in a warning; False where the caller has checked it already)."""
    from PIL import Image as PILImage

    try:
        img = PILImage.open(source)
    except PILImage.DecompressionBombError:
        if hasattr(source, "seek"):
            source.seek(0)
        with _no_pixel_limit():
            img = PILImage.open(source)
    try:  # (again when it opened: another thread may have lifted the limit meanwhile)
        check_pixels(name or str(source), img.size, max_size, warn)
    except EncodeError:
        img.close()
        raise
    return img


def to_rgb(img: Image) -> Image:
    """``img`` as RGB. Images of 16 bits a channel that Pillow opens as one integer channel
    (16-bit greyscale PNG and TIFF: modes ``I;16...`` and ``I``) are scaled to 8 bits first:
    Pillow's own conversion clips every value above 255, which turns a 16-bit photograph
    white. (Pillow reduces 16-bit RGB PNGs to 8 bits itself.)"""
    if img.mode == "RGB":
        return img
    if img.mode == "I" or img.mode.startswith("I;16"):
        import numpy as np
        from PIL import Image as PILImage

        values = np.asarray(img).astype(np.uint32)
        if img.mode == "I" and values.max(initial=0) <= 255:
            grey = values.astype(np.uint8)  # (an 8-bit image kept in a 32-bit mode)
        else:
            grey = ((np.minimum(values, 65535) * 255 + 32767) // 65535).astype(np.uint8)
        return PILImage.fromarray(grey, "L").convert("RGB")
    return img.convert("RGB")


def fit(img: Image, max_size: int | None) -> Image:
    """``img`` scaled down (Lanczos) so that its longer side is at most ``max_size``."""
    if not max_size or max(img.size) <= max_size:
        return img
    from PIL import Image as PILImage

    width, height = img.size
    scale = max_size / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return img.resize(size, PILImage.Resampling.LANCZOS, reducing_gap=3.0)


def encode_jpeg(img: Image, quality: int) -> bytes:
    import io

    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=int(quality))
    return buffer.getvalue()


class Codec:
    """Base class of codecs. Subclasses set ``name`` and implement the two image methods.

    ``encode(path, label)`` runs at write time, in worker processes, and returns a
    ``TensorProtos`` record; ``decode_image(record)`` runs at read time and returns an RGB
    ``PIL.Image``. ``transform(record)`` is the codec's default read-time transform: the seed's
    3x224x224 float tensor in [0, 1] and an int label.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    # the layout of the records this codec writes: raise it when an earlier version of the
    # codec would misread them (TorchRecord records it with each dataset, and refuses to read
    # a dataset with a codec of a lower version); see for_format_version
    format_version: ClassVar[int] = 1

    def for_format_version(self, version: int) -> Any:
        """The codec that reads records this codec's ``version`` wrote (an earlier one than
        its ``format_version``): this codec itself unless overridden. Return a codec that
        reads that layout, or None if this codec no longer reads it."""
        return self

    def encode(self, path: str, label: Any) -> TensorProtos:
        raise NotImplementedError

    def encode_parts(self, path: str, label: Any, **options: Any) -> RecordParts | None:
        """What :meth:`encode` stores, before the record is built, for the writer to serialize
        without an extra copy of the image; None when only :meth:`encode` knows (the default).
        The built-in codecs implement ``encode`` as ``encode_parts(...).record()``
        (:func:`builds_record`)."""
        return None

    def decode_image(self, record: TensorProtos) -> Image:
        raise NotImplementedError

    def decode_tensor(self, record: TensorProtos) -> Any:
        """The image as a uint8 ``3 x H x W`` torch tensor. Codecs override it with a faster
        path than this default, which goes through :meth:`decode_image`."""
        from ..transforms import pil_to_uint8

        return pil_to_uint8(self.decode_image(record))

    def transform(self, record: TensorProtos) -> tuple[Any, int]:
        """0.1's transform, exactly: PIL image, ``Resize((224, 224))``, ``ToTensor()``."""
        from ..transforms import to_seed_tensor

        return to_seed_tensor(decoded_image(self, record)), record_label(record)

    def fast_transform(self, record: TensorProtos) -> tuple[Any, int]:
        """The same output as :meth:`transform` (3x224x224 float in [0, 1], int label) through
        tensor decode and an antialiased tensor resize; values differ from PIL's by rounding."""
        from ..transforms import resize_224

        return resize_224(decoded_tensor(self, record)).float().div_(255), record_label(record)

    def uint8_transform(self, record: TensorProtos) -> tuple[Any, int]:
        """3x224x224 uint8 and the int label: convert to float on the GPU, in the batch."""
        from ..transforms import resize_224

        return resize_224(decoded_tensor(self, record)), record_label(record)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} codec {self.name!r}>"


# -- what a codec's decode gives, checked -------------------------------------------------------
# A codec of a plugin that breaks the contract (a tensor of the wrong type or layout, no PIL
# image) would otherwise fail far away, in the resize or in collation, or give batches of other
# shapes under another transform. The checks cost a few microseconds an image.


def decoded_tensor(codec: Codec, record: TensorProtos) -> Any:
    """``codec.decode_tensor(record)``, which must be a uint8 ``3 x H x W`` torch tensor; a
    :class:`~torchrecord.errors.PluginError` naming the codec and its package otherwise."""
    import torch

    image = codec.decode_tensor(record)
    if (
        isinstance(image, torch.Tensor)
        and image.dtype == torch.uint8
        and image.dim() == 3
        and image.shape[0] == 3
    ):
        return image
    got = (
        f"a {str(image.dtype).removeprefix('torch.')} tensor of shape {tuple(image.shape)}"
        if isinstance(image, torch.Tensor)
        else f"{type(image).__name__}"
    )
    raise _contract_error(codec, f"decode_tensor() returned {got}", "a uint8 tensor 3 x H x W")


def decoded_image(codec: Codec, record: TensorProtos) -> Image:
    """``codec.decode_image(record)`` as an RGB PIL image (another mode is converted, as the
    tensor paths convert it); a :class:`~torchrecord.errors.PluginError` naming the codec and
    its package when it is no PIL image."""
    from PIL import Image as PILImage

    image = codec.decode_image(record)
    if not isinstance(image, PILImage.Image):
        raise _contract_error(
            codec, f"decode_image() returned {type(image).__name__}", "an RGB PIL.Image.Image"
        )
    return to_rgb(image)


def _contract_error(codec: Codec, what: str, must: str) -> Exception:
    from ..errors import PluginError
    from ..plugins import describe_provider

    return PluginError(
        f"codec {codec.name!r} ({describe_provider('codec', codec.name)}): {what}, but it must "
        f"return {must}. This is a bug in the codec, not damage to the dataset: its package "
        "needs fixing"
    )


# Exceptions that, raised by a plugin's decode of a record whose bytes passed their checksum,
# mean a bug in the plugin rather than a bad image
# (not LookupError or ArithmeticError: Pillow raises IndexError, KeyError and ZeroDivisionError
# on malformed TIFF and GIF data, which a plugin's codec may hand it)
_BUG_TYPES = (TypeError, AttributeError, NameError, ImportError, AssertionError, RecursionError)


def plugin_bug(codec_name: str, exc: BaseException, where: str) -> Exception | None:
    """For a codec of a plugin (not TorchRecord's own), a :class:`PluginError` when ``exc``,
    raised while it decoded a sound record (``where`` names it), looks like a bug in it; None
    for TorchRecord's own codecs and for errors that bad image data gives (``OSError``,
    ``ValueError``, ``RuntimeError``...), which are the record's."""
    from ..errors import PluginError
    from ..plugins import describe_provider

    if isinstance(exc, PluginError):
        return exc
    if not _a_plugins(codec_name) or not isinstance(exc, _BUG_TYPES):
        return None
    return PluginError(
        f"codec {codec_name!r} ({describe_provider('codec', codec_name)}) failed on {where} "
        f"with {type(exc).__name__}: {exc}. The record's bytes match their checksum, and this "
        "kind of error is a bug in the codec rather than a bad image: its package needs fixing"
    )


def plugin_hint(codec_name: str) -> str:
    """For a record a plugin's codec cannot decode: who to ask when every record fails."""
    from ..plugins import describe_provider

    if not _a_plugins(codec_name):
        return ""
    return (
        f" It was decoded by the codec {codec_name!r} ({describe_provider('codec', codec_name)}):"
        " if every record fails so, the codec cannot read back what it wrote; ask its author."
    )


def _a_plugins(codec_name: str) -> bool:
    """Whether a codec comes from a plugin: not TorchRecord's own, and not the ``custom`` of
    records a user's ``data_process_func`` wrote (0.1's transform reads those)."""
    from ..plugins import is_builtin

    return codec_name != "custom" and not is_builtin("codec", codec_name)
