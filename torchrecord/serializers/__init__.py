"""Serializers: how a record (a ``TensorProtos`` message) becomes bytes in a shard, and back.

Each serializer module registers itself through the ``torchrecord_register_serializers`` hook.
A serializer has a ``name``, ``dumps(record) -> bytes`` and ``loads(data) -> record``; ``loads``
raises :class:`torchrecord.errors.SerializationError` on bytes it cannot parse.
"""

MAX_RECORD_BYTES = 2**31 - 1  # protobuf's hard limit; msgpack keeps the same one for parity
