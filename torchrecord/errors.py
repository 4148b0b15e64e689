"""One exception hierarchy for TorchRecord.

Every error says what happened, where (the data list and line, or the shard and record key) and
what to do next, so that a failure at hour 30 of a training run can be acted on without a debugger.
"""

from __future__ import annotations

import os

__all__ = [
    "TorchRecordError",
    "PluginError",
    "UnknownPluginError",
    "DuplicatePluginError",
    "DataListError",
    "EncodeError",
    "DiskFullError",
    "DatasetError",
    "DatasetNotFoundError",
    "DatasetExistsError",
    "FormatVersionError",
    "ShardCorruptedError",
    "RecordCorruptedError",
    "SerializationError",
]


class TorchRecordError(Exception):
    """Base class of every error TorchRecord raises on purpose.

    Each subclass can also be built from its finished message alone, which is how PyTorch's
    DataLoader re-raises an exception from a worker process in the main one: the error keeps its
    type (``except RecordCorruptedError`` works) and its whole text.
    """


class PluginError(TorchRecordError):
    """A codec or serializer plugin is missing, broken or clashes with another."""


class UnknownPluginError(PluginError, KeyError):
    """No codec or serializer is registered under the requested name."""

    def __init__(
        self,
        kind: str,
        name: str | None = None,
        available: list[str] | None = None,
        hint: str = "",
    ):
        if name is None:  # rebuilt from its message (see TorchRecordError)
            self.kind, self.name, self.available, self.hint = "", "", [], ""
            super().__init__(kind)
            return
        self.kind, self.name, self.available, self.hint = kind, name, available or [], hint
        super().__init__(
            f"unknown {kind} {name!r}; available {kind}s: {', '.join(available) or '(none)'}. "
            f"The plugin that provides {kind} {name!r} may not be installed: install it "
            "(its package registers through the 'torchrecord' entry-point group) and check "
            "`torchrecord plugins`." + (f" {hint}" if hint else "")
        )

    def __str__(self) -> str:  # KeyError would otherwise print the repr of the message
        return self.args[0]

    def __reduce__(self):
        return (type(self), (self.kind, self.name, self.available, self.hint))


class DuplicatePluginError(PluginError):
    """Two plugins register the same codec or serializer name."""


class DataListError(TorchRecordError, ValueError):
    """A line of a data list cannot be turned into a record."""

    def __init__(self, data_list: str, line_no: int | None = None, message: str | None = None):
        if message is None:  # rebuilt from its message (see TorchRecordError)
            self.data_list, self.line_no, self.message = "", line_no, data_list
            super().__init__(data_list)
            return
        self.data_list, self.line_no = data_list, line_no
        self.message = message
        where = f"{data_list}:{line_no}" if line_no is not None else str(data_list)
        if line_no is not None and os.path.isdir(data_list):  # an image folder has no lines
            where = f"{data_list} (image {line_no} in sorted order)"
            message = message.replace("remove the line", "remove the file")
        super().__init__(f"{where}: {message}")

    def __reduce__(self):  # errors cross process boundaries (writer workers): keep them picklable
        return (type(self), (self.data_list, self.line_no, self.message))


class EncodeError(TorchRecordError, ValueError):
    """A codec cannot encode one input file (raised with the file; the writer adds the line)."""


class DiskFullError(TorchRecordError, OSError):
    """The writer ran out of disk space (or into the file size limit) and stopped.

    Nothing was published: an existing dataset in the output directory is untouched, and the
    shards finished so far stay in the staging directory, so the same write run again after
    freeing space resumes from them.
    """

    def __init__(self, code: int | str, message: str | None = None):
        if message is None:  # rebuilt from its message (see TorchRecordError)
            code, message = 0, str(code)
        super().__init__(message)
        self.errno = int(code) or None  # ENOSPC, EDQUOT or EFBIG
        self.message = message

    def __str__(self) -> str:  # OSError would otherwise format its (errno, strerror) pair
        return self.message

    def __reduce__(self):
        return (type(self), (self.errno or 0, self.message))


class DatasetError(TorchRecordError):
    """A dataset on disk cannot be opened or read."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """The path holds no TorchRecord dataset."""


class DatasetExistsError(DatasetError, FileExistsError):
    """The writer's output directory already holds a dataset."""


class FormatVersionError(DatasetError):
    """The dataset was written by a newer TorchRecord whose format this version cannot read."""


class PluginVersionError(DatasetError, PluginError):
    """The dataset's codec or serializer wrote a record layout the installed one cannot read."""


class ShardCorruptedError(DatasetError):
    """A shard file is truncated, damaged or disagrees with the manifest."""

    def __init__(self, shard: str, message: str | None = None):
        if message is None:  # rebuilt from its message (see TorchRecordError)
            self.shard, self.message = "", shard
            super().__init__(shard)
            return
        self.shard, self.message = shard, message
        super().__init__(
            f"shard {shard}: {message}. Run `torchrecord verify` on the dataset and re-write it "
            "from its source."
        )

    def __reduce__(self):
        return (type(self), (self.shard, self.message))


class RecordCorruptedError(DatasetError):
    """One record's bytes do not match its checksum or do not decode."""

    def __init__(
        self,
        shard: str,
        key: bytes = b"",
        index: int = -1,
        message: str | None = None,
        hint: str | None = None,
    ):
        if message is None:  # rebuilt from its message (see TorchRecordError)
            self.shard, self.key, self.index, self.message, self.hint = "", key, index, shard, None
            super().__init__(shard)
            return
        self.shard, self.key, self.index, self.message, self.hint = shard, key, index, message, hint
        hint = hint or "Run `torchrecord verify` on the dataset and re-write it from its source."
        super().__init__(
            f"shard {shard}, record key {key.hex()} (record {index} of the shard): {message}. "
            + hint
        )

    def __reduce__(self):
        return (type(self), (self.shard, self.key, self.index, self.message, self.hint))


class SerializationError(TorchRecordError, ValueError):
    """Bytes cannot be turned into a record, or a record into bytes, by a serializer."""
