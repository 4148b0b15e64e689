"""``tensorprotos``: the default serializer, protobuf ``TensorProtos`` as in TorchRecord 0.1.

The schema is ``tensorprotos.proto`` next to this file (Caffe2's field numbers), so records of
0.1.1 and Caffe2 ``TensorProtos`` parse unchanged.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError, EncodeError

from ..errors import SerializationError
from ..hookspecs import hookimpl
from . import MAX_RECORD_BYTES
from .tensorprotos_pb2 import TensorProto, TensorProtos

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

    def loads(self, data: bytes) -> TensorProtos:
        record = TensorProtos()
        try:
            record.ParseFromString(data)
        except (DecodeError, ValueError, RuntimeError) as exc:
            raise SerializationError(f"bytes are not a TensorProtos message: {exc}") from exc
        return record


SERIALIZER = TensorProtosSerializer()


@hookimpl
def torchrecord_register_serializers(register):
    register(SERIALIZER)
