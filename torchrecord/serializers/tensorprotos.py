"""``tensorprotos``: the default serializer, protobuf ``TensorProtos`` as in TorchRecord 0.1.

The schema is ``tensorprotos.proto`` next to this file (Caffe2's field numbers), so records of
0.1.1 and Caffe2 ``TensorProtos`` parse unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from google.protobuf.message import DecodeError, EncodeError

from ..errors import SerializationError
from ..hookspecs import hookimpl
from . import MAX_RECORD_BYTES
from .tensorprotos_pb2 import TensorProto, TensorProtos

if TYPE_CHECKING:
    from ..codecs.base import RecordParts

__all__ = ["TensorProto", "TensorProtos", "TensorProtosSerializer"]


class TensorProtosSerializer:
    name = "tensorprotos"
    description = "protobuf TensorProtos (Caffe2 schema, as TorchRecord 0.1)"

    def dumps(self, record: TensorProtos) -> bytes:
        if not isinstance(record, TensorProtos):
            raise SerializationError(
                f"the tensorprotos serializer needs a TensorProtos record, got {type(record)}"
            )
        # serialized once, then measured (upb's ByteSize serializes too: twice the work)
        try:
            data = record.SerializeToString()
        except EncodeError as exc:
            if not record.IsInitialized():  # not a size problem
                raise SerializationError(f"record cannot be serialized: {exc}") from exc
            size = sum(len(proto.byte_data) for proto in record.protos)
            raise SerializationError(  # upb refuses a message of 2 GiB or more
                f"record of at least {size} bytes exceeds protobuf's 2 GiB limit; downscale "
                "the image"
            ) from exc
        if len(data) > MAX_RECORD_BYTES:
            raise SerializationError(
                f"record of {len(data)} bytes exceeds protobuf's 2 GiB limit; downscale the image"
            )
        return data

    def dumps_parts(self, parts: RecordParts, more: TensorProtos | None = None) -> bytes:
        """The bytes of :meth:`dumps` for ``parts.record()`` with the protos of ``more`` after
        its two, byte for byte, but with the image copied once, straight into the result
        (raw RGB pixels are most of a record: building a message would copy them twice more).

        Written here in protobuf's wire format, fields in number order as protobuf writes
        them; tests compare the two over many records."""
        image = memoryview(parts.image)
        if not (_plain_size(parts.size) and image.c_contiguous and isinstance(parts.name, str)):
            return self.dumps(_with(parts.record(), more))  # protobuf says what it makes of it
        width, height = parts.size
        image = image.cast("B") if image.nbytes else b""  # (bytes.join takes flat buffers)
        head = b"".join(
            (b"\x08", _varint(width), b"\x08", _varint(height), b"\x10\x03\x2a")
        ) + _varint(len(image))
        name = parts.name.encode()
        tail = b"\x3a" + _varint(len(name)) + name if name else b""
        label = str(parts.label).encode("ascii")
        label_proto = b"\x10\x03\x2a" + _varint(len(label)) + label
        rest = b"\x0a" + _varint(len(label_proto)) + label_proto
        if more is not None:
            rest += more.SerializeToString()
        first = len(head) + len(image) + len(tail)
        start = b"\x0a" + _varint(first)
        if len(start) + first + len(rest) > MAX_RECORD_BYTES:
            raise SerializationError(
                f"record of {len(start) + first + len(rest)} bytes exceeds protobuf's 2 GiB "
                "limit; downscale the image"
            )
        return b"".join((start, head, image, tail, rest))

    def loads_view(self, data: bytes) -> RecordView | None:
        """The record in ``data`` as a :class:`RecordView`, which copies no image bytes, for
        the built-in codecs' tensor transforms; None when it holds anything but the fields
        they write, or is under ``VIEW_MIN_BYTES`` (then :meth:`loads` parses it: parsed here,
        in Python, a view only pays for large records)."""
        if len(data) < VIEW_MIN_BYTES:
            return None
        view = memoryview(data)
        protos: list[ProtoView] = []
        pos, end = 0, len(data)
        while pos < end:
            if data[pos] != 0x0A:  # TensorProtos.protos, length-delimited
                return None
            length, pos = _read_varint(data, pos + 1, end)
            if length < 0 or pos + length > end:
                return None
            proto = _proto_view(data, view, pos, pos + length, not protos)
            if proto is None:
                return None
            protos.append(proto)
            pos += length
        return RecordView(protos)

    def loads(self, data: bytes) -> TensorProtos:
        record = TensorProtos()
        try:
            record.ParseFromString(data)
        except (DecodeError, ValueError, RuntimeError) as exc:
            raise SerializationError(f"bytes are not a TensorProtos message: {exc}") from exc
        return record


class ProtoView:
    """The fields of one ``TensorProto`` that codecs use, read from a record's bytes."""

    __slots__ = ("dims", "data_type", "byte_data", "name")

    def __init__(self, dims: list[int], data_type: int, byte_data: Any, name: str):
        self.dims, self.data_type, self.byte_data, self.name = dims, data_type, byte_data, name


class RecordView:
    """A record read without building a message: ``protos`` are :class:`ProtoView`, the image's
    ``byte_data`` a memoryview into the record's bytes (no copy), the others' ``bytes``."""

    __slots__ = ("protos",)

    def __init__(self, protos: list[ProtoView]):
        self.protos = protos


# Below this, protobuf's own parser (in C) is faster than a view despite its copies: measured
# here, 11 against 16 us for a 35 KB JPEG record, 93 against 14 us for 560 KB of raw pixels.
VIEW_MIN_BYTES = 64 * 1024

# the values of TensorProto.DataType: another value is not a field protobuf would set
_DATA_TYPES = frozenset(TensorProto.DataType.values())
_INT64 = 1 << 64
_INT63 = 1 << 63


def _read_varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """``(value, position after it)``; ``(-1, end + 1)`` when it runs past ``end`` or is
    longer than a varint can be."""
    value = shift = 0
    while pos < end and shift < 64:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return (value, pos) if value < _INT64 else (-1, end + 1)
        shift += 7
    return -1, end + 1


def _proto_view(data: bytes, view: memoryview, pos: int, end: int, first: bool) -> Any:
    """The :class:`ProtoView` of the ``TensorProto`` in ``data[pos:end]``, or None when it holds
    a field other than dims (unpacked), data_type, byte_data and name, or one of the last three
    twice (protobuf would keep the last: its parser decides those)."""
    dims: list[int] = []
    data_type, byte_data, name = 1, None, None  # (the schema's defaults: FLOAT, b"", "")
    seen_type = False
    while pos < end:
        tag = data[pos]
        pos += 1
        if tag == 0x08:  # dims: int64
            value, pos = _read_varint(data, pos, end)
            if value < 0:
                return None
            dims.append(value - _INT64 if value >= 1 << 63 else value)
        elif tag == 0x10 and not seen_type:  # data_type: enum
            data_type, pos = _read_varint(data, pos, end)
            if data_type not in _DATA_TYPES:
                return None
            seen_type = True
        elif tag in (0x2A, 0x3A):  # byte_data, name: length-delimited
            length, pos = _read_varint(data, pos, end)
            if length < 0 or pos + length > end:
                return None
            if tag == 0x2A and byte_data is None:
                byte_data = view[pos : pos + length] if first else data[pos : pos + length]
            elif tag == 0x3A and name is None:
                try:
                    name = bytes(view[pos : pos + length]).decode()
                except UnicodeDecodeError:
                    return None
            else:
                return None
            pos += length
        else:
            return None
    if pos != end:
        return None
    return ProtoView(dims, data_type, b"" if byte_data is None else byte_data, name or "")


def _varint(value: int) -> bytes:
    """A non-negative integer as a protobuf varint."""
    if value < 0x4000:  # one or two bytes: every field of a record but the image's length
        return bytes((value,)) if value < 0x80 else bytes((value & 0x7F | 0x80, value >> 7))
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _plain_size(size: Any) -> bool:
    """Whether ``size`` is two ints that are int64 dims without sign (what images have)."""
    if not isinstance(size, tuple | list) or len(size) != 2:
        return False
    width, height = size
    return type(width) is type(height) is int and 0 <= width < _INT63 and 0 <= height < _INT63


def _with(record: TensorProtos, more: TensorProtos | None) -> TensorProtos:
    if more is not None:
        record.protos.extend(more.protos)
    return record


SERIALIZER = TensorProtosSerializer()


@hookimpl
def torchrecord_register_serializers(register):
    register(SERIALIZER)
