"""TorchRecord: pack many small image files into a few LMDB shards and load them in PyTorch.

``import torchrecord`` is cheap: torch, torchvision and the plugins are loaded on first use. The
public API of TorchRecord 0.1 is here unchanged (``Writer``, ``TorchRecord``, ``TRSampler``,
``TRDataset``, ``default_data_process_func``, ``default_transform``, ``TensorProtos``); plugin
authors need only :data:`hookimpl` (and, for convenience, the :class:`Codec` base class).
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import (
    DataListError,
    DatasetError,
    DatasetExistsError,
    DatasetNotFoundError,
    DiskFullError,
    DuplicatePluginError,
    EncodeError,
    FormatVersionError,
    PluginError,
    RecordCorruptedError,
    SerializationError,
    ShardCorruptedError,
    TorchRecordError,
    UnknownPluginError,
)
from .hookspecs import hookimpl

__version__ = "0.3.0"

# name -> module that defines it, imported on first access (PEP 562)
_LAZY = {
    "Writer": ".writer",
    "TorchRecord": ".loader",
    "DataLoader": ".loader",  # (0.1 exported its DataLoader: PyTorch's is the one now)
    "TRDataset": ".dataset",
    "collate": ".dataset",
    "TRSampler": ".sampler",
    "RecordReader": ".reader",
    "default_transform": ".transforms",
    "default_data_process_func": ".codecs.raw_rgb",
    "TensorProtos": ".serializers.tensorprotos",
    "TensorProto": ".serializers.tensorprotos",
    "Codec": ".codecs.base",
    "make_record": ".codecs.base",
    "RecordParts": ".codecs.base",
    "get_codec": ".plugins",
    "get_serializer": ".plugins",
}

__all__ = [
    "__version__",
    "hookimpl",
    *_LAZY,
    "TorchRecordError",
    "PluginError",
    "UnknownPluginError",
    "DuplicatePluginError",
    "DataListError",
    "EncodeError",
    "DatasetError",
    "DatasetNotFoundError",
    "DatasetExistsError",
    "DiskFullError",
    "FormatVersionError",
    "ShardCorruptedError",
    "RecordCorruptedError",
    "SerializationError",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'torchrecord' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
