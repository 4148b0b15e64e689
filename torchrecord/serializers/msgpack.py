"""``msgpack``: the alternative serializer, a compact MessagePack encoding of the same records.

A record is a MessagePack array of maps, one per proto, holding only the fields that are set
(``dims``, ``data_type``, ``byte_data``, ``name``, and the numeric lists). Unpacking uses explicit
size limits, ``raw=False``, string map keys only and no extension types: bytes from a stranger
cannot make it allocate without bound or run code.
"""

from __future__ import annotations

import msgpack

from ..errors import SerializationError
from ..hookspecs import hookimpl
from . import MAX_RECORD_BYTES
from .tensorprotos_pb2 import TensorProtos

_SCALAR = ("data_type", "name")
_LISTS = ("dims", "float_data", "int32_data", "string_data", "double_data", "int64_data")


class MsgpackSerializer:
    name = "msgpack"
    description = "MessagePack arrays of maps, unpacked with explicit limits"

    def dumps(self, record: TensorProtos) -> bytes:
        items = []
        for proto in record.protos:
            item: dict = {}
            for field in _LISTS:
                values = getattr(proto, field)
                if len(values):
                    item[field] = list(values)
            for field in _SCALAR:
                if proto.HasField(field):
                    item[field] = getattr(proto, field)
            if proto.HasField("byte_data"):
                item["byte_data"] = proto.byte_data
            items.append(item)
        data = msgpack.packb(items, use_bin_type=True)
        if len(data) > MAX_RECORD_BYTES:
            raise SerializationError(f"record of {len(data)} bytes exceeds the 2 GiB limit")
        return data

    def loads(self, data: bytes) -> TensorProtos:
        limit = min(len(data), MAX_RECORD_BYTES)
        try:
            items = msgpack.unpackb(
                data,
                raw=False,
                strict_map_key=True,
                max_bin_len=limit,
                max_str_len=limit,
                max_array_len=limit,
                max_map_len=64,
                max_ext_len=0,
            )
        except Exception as exc:  # msgpack raises a zoo of types on hostile input
            raise SerializationError(f"bytes are not a msgpack record: {exc}") from exc
        record = TensorProtos()
        if not isinstance(items, list):
            raise SerializationError(f"a msgpack record is an array, got {type(items).__name__}")
        try:
            for item in items:
                if not isinstance(item, dict):
                    raise SerializationError("a msgpack record holds maps, one per proto")
                proto = record.protos.add()
                for field, value in item.items():
                    if field in _LISTS:
                        getattr(proto, field).extend(value)
                    elif field in _SCALAR or field == "byte_data":
                        setattr(proto, field, value)
                    else:
                        raise SerializationError(f"unknown field {field!r} in a msgpack record")
        except SerializationError:
            raise
        except (TypeError, ValueError, AttributeError) as exc:
            raise SerializationError(f"malformed msgpack record: {exc}") from exc
        return record


SERIALIZER = MsgpackSerializer()


@hookimpl
def torchrecord_register_serializers(register):
    register(SERIALIZER)
