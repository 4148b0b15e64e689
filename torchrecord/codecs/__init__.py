"""Codecs: how one sample (an image file and its label) becomes a record, and back.

Each codec module registers itself through the ``torchrecord_register_codecs`` hook, exactly as a
third-party plugin does. :class:`Codec` is the base class both use.
"""

from .base import Codec, RecordParts, builds_record, make_record, record_label

__all__ = ["Codec", "RecordParts", "builds_record", "make_record", "record_label"]
