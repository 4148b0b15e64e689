"""Decoding untrusted bytes: only TorchRecord's own errors may escape, never a crash.

Record bytes from both serializers are truncated at every offset, bit-flipped, extended and
replaced by random bytes; ``loads`` must return a record or raise ``SerializationError``.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torchrecord import SerializationError, TensorProtos, get_codec, get_serializer

SERIALIZERS = ["tensorprotos", "msgpack"]


def sample_record() -> TensorProtos:
    record = TensorProtos()
    image = record.protos.add()
    image.dims.extend([7, 5])
    image.data_type = 3
    image.byte_data = bytes(range(7 * 5 * 3))
    image.name = "jpeg"
    label = record.protos.add()
    label.data_type = 3
    label.byte_data = b"42"
    numbers = record.protos.add()
    numbers.float_data.extend([0.5, 1.5])
    numbers.int64_data.extend([2**40, -3])
    numbers.string_data.extend([b"a", b"bc"])
    return record


def decode_or_own_error(name: str, data: bytes) -> None:
    try:
        result = get_serializer(name).loads(data)
    except SerializationError:
        return
    assert isinstance(result, TensorProtos)


@pytest.mark.parametrize("name", SERIALIZERS)
def test_truncation_at_every_offset(name):
    data = get_serializer(name).dumps(sample_record())
    for end in range(len(data)):
        decode_or_own_error(name, data[:end])


@pytest.mark.parametrize("name", SERIALIZERS)
@settings(max_examples=300, deadline=None)
@given(bit=st.integers(min_value=0))
def test_single_bit_flips(name, bit):
    data = bytearray(get_serializer(name).dumps(sample_record()))
    bit %= len(data) * 8
    data[bit // 8] ^= 1 << (bit % 8)
    decode_or_own_error(name, bytes(data))


@pytest.mark.parametrize("name", SERIALIZERS)
@settings(max_examples=300, deadline=None)
@given(noise=st.binary(max_size=512))
def test_random_bytes_and_trailing_bytes(name, noise):
    decode_or_own_error(name, noise)
    decode_or_own_error(name, get_serializer(name).dumps(sample_record()) + noise)


@settings(max_examples=200, deadline=None)
@given(noise=st.binary(max_size=256))
def test_codecs_decode_damaged_images_with_an_error_not_a_crash(noise):
    """A decoder meeting garbage raises a Python exception instead of crashing the process."""
    record = sample_record()
    record.protos[0].byte_data = b"\xff\xd8\xff" + noise
    with pytest.raises(Exception):  # noqa: B017 - any Python error; the point is no crash
        get_codec("jpeg").decode_tensor(record)
