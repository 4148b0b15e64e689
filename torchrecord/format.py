"""The on-disk layout of a TorchRecord dataset (see ``docs/FORMAT.md``).

A dataset is a directory::

    manifest.json            written last: a directory without it is not a dataset
    shard-00000.lmdb         one single-file LMDB environment per shard
    shard-00001.lmdb
    ...

Inside each shard, record ``i`` is stored in 1 to 4 parts under the 8-byte big-endian keys
``4*i + p`` (version 2; keys sort in record order, then part order), the JSON metadata under
:data:`META_KEY`, and the CRC-32 of every whole record under :data:`CHECKSUMS_KEY`
(little-endian ``uint32``, one per record). Splitting fills LMDB's 4 KiB overflow pages exactly:
a large value's first part takes whole pages, its remainder goes into small parts that LMDB packs
into ordinary leaf pages (:func:`split_record`). Version 1 stored record ``i`` whole under key
``i``; both versions are read. TorchRecord 0.1 datasets (one LMDB
environment with sub-databases ``db0``..``dbN-1``) are recognised and read as ``raw_rgb``.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DatasetError, DatasetNotFoundError, FormatVersionError, ShardCorruptedError

FORMAT_NAME = "torchrecord"
FORMAT_VERSION = 2  # what the writer writes; versions 1 and 2 are read
MANIFEST_NAME = "manifest.json"
SHARD_TEMPLATE = "shard-{:05d}.lmdb"
META_KEY = b"__torchrecord__"
CHECKSUMS_KEY = b"__checksums__"
KEY_STRUCT = struct.Struct(">Q")
CHECKSUM_ALGORITHM = "crc32"
LEGACY_DATA_FILE = "data.mdb"
CUSTOM_CODEC = "custom"  # records written by a user's data_process_func (no codec plugin)

# Options for opening a finished shard: no lock file (works in read-only directories and on
# read-only media), nothing kept between transactions. Readahead stays on: image records span
# many pages, and from a cold cache reading them page by page was 1.6x slower (measured on 2,000
# JPEG records of 36 KB: 860 -> 1,390 images/s with 2 workers).
READ_OPTIONS = dict(readonly=True, lock=False, readahead=True, max_spare_txns=0, meminit=False)


PARTS_PER_RECORD = 4  # version 2: record i's parts are keys 4*i .. 4*i+3
PAGE_HEADER = 16  # LMDB's page header (64-bit builds)


def inline_max(page_size: int) -> int:
    """The largest value LMDB keeps inside a leaf page under an 8-byte key: a node may take
    ``((page_size - 16) / 2 & -2) - 2`` bytes (mdb.c's ``me_nodemax``), less its 8-byte header and
    the key; 2022 bytes with 4 KiB pages. Larger values go to overflow pages of their own."""
    return (((page_size - PAGE_HEADER) // 2) & -2) - 2 - 8 - KEY_STRUCT.size


def record_key(index: int, version: int = FORMAT_VERSION, part: int = 0) -> bytes:
    """The key of part ``part`` of record ``index`` inside its shard."""
    if version >= 2:
        return KEY_STRUCT.pack(index * PARTS_PER_RECORD + part)
    return KEY_STRUCT.pack(index)


def split_record(value: bytes, page_size: int = 4096) -> list[bytes]:
    """Split a record value into the parts a version 2 shard stores (1 to 4 of them).

    LMDB stores a value too large for a leaf page in whole overflow pages (a 16-byte header, then
    the value, rounded up to the page): about half a page per record is lost, 6% for 35 KB JPEGs.
    So the first part is the largest prefix that fills whole pages exactly, and the rest
    (under one page) is cut into at most three equal parts small enough to sit in leaf pages,
    which LMDB packs densely when it appends. Readers just concatenate the parts.
    """
    inline = inline_max(page_size)
    n = len(value)
    if n <= inline:
        return [value]
    head = (n + PAGE_HEADER) // page_size * page_size - PAGE_HEADER
    if head <= inline:
        head = 0
    rest = n - head
    if rest == 0:
        return [value]
    count = -(-rest // inline)
    if count + (1 if head else 0) > PARTS_PER_RECORD:  # only with pages under 4 KiB
        return [value]
    size = -(-rest // count)
    view = memoryview(value)
    parts = [view[:head]] if head else []
    parts += [view[head + k * size : head + min((k + 1) * size, rest)] for k in range(count)]
    return parts


def shard_name(index: int) -> str:
    return SHARD_TEMPLATE.format(index)


@dataclass(frozen=True)
class ShardInfo:
    """What the manifest says about one shard."""

    file: str
    num_records: int
    bytes: int
    legacy_db: str | None = None  # sub-database name, for TorchRecord 0.1 datasets
    sha256: str | None = None  # of the whole shard file
    # CRC-32 of the shard's checksum table: which records it holds, checked whenever the shard
    # is opened (a shard of another write of the same shape has other records)
    records_crc32: int | None = None

    @classmethod
    def from_entry(cls, item: dict[str, Any]) -> ShardInfo:
        """From a shard's entry in a manifest (or a part's, or a resume's record), as written:
        :func:`read_manifest` validates, this does not."""
        return cls(
            item["file"],
            item["num_records"],
            item["bytes"],
            sha256=item.get("sha256"),
            records_crc32=item.get("records_crc32"),
        )


@dataclass
class Manifest:
    """The dataset-level description; for 0.1 datasets it is built from the LMDB itself."""

    codec: str
    serializer: str
    shards: list[ShardInfo]
    format_version: int = FORMAT_VERSION
    legacy: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_records(self) -> int:
        return sum(s.num_records for s in self.shards)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "codec": self.codec,
            "serializer": self.serializer,
            "num_records": self.num_records,
            "checksum": CHECKSUM_ALGORITHM,
            "shards": [
                {"file": s.file, "num_records": s.num_records, "bytes": s.bytes}
                | ({"sha256": s.sha256} if s.sha256 else {})
                | ({"records_crc32": s.records_crc32} if s.records_crc32 is not None else {})
                for s in self.shards
            ],
            **self.extra,
        }


def _count(value: Any, where: str, what: str) -> int:
    if type(value) is not int or value < 0:
        raise DatasetError(f"{where}: {what} must be a non-negative integer, got {value!r}")
    return value


def check_format_version(version: Any, where: str) -> None:
    if type(version) is not int or version < 1:
        raise DatasetError(f"{where}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        from . import __version__

        raise FormatVersionError(
            f"{where} uses TorchRecord format version {version}, but this TorchRecord "
            f"({__version__}) reads versions up to {FORMAT_VERSION}. Upgrade TorchRecord "
            "(pip install -U torchrecord) to read it."
        )


def is_legacy_dataset(path: Path) -> bool:
    return (path / LEGACY_DATA_FILE).is_file() and not (path / MANIFEST_NAME).exists()


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Read a dataset's manifest, or describe a TorchRecord 0.1 dataset."""
    root = Path(path)
    if not root.is_dir():
        what = "is a file, not" if root.exists() else "does not exist; expected"
        raise DatasetNotFoundError(f"{root} {what} a directory holding a TorchRecord dataset")
    if is_legacy_dataset(root):
        return _legacy_manifest(root)
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        hint = ""
        if any(root.glob(".tmp-*")) or any(root.glob("shard-*.lmdb")):
            hint = (
                " It holds shard files but no manifest: a write was interrupted or is still "
                "running; run the same write again."
            )
        raise DatasetNotFoundError(
            f"{root} holds no TorchRecord dataset (no {MANIFEST_NAME}).{hint}"
        )
    try:
        doc = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # (JSON nested thousands deep: a hostile file)
        raise DatasetError(f"{manifest_path} is damaged ({exc}); re-write the dataset") from exc
    where = str(manifest_path)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise DatasetError(f"{where} is not a TorchRecord manifest")
    check_format_version(doc.get("format_version"), where)
    if "part" in doc:
        raise DatasetError(
            f"{where} describes part of a dataset (shards {doc['part'].get('first_shard')} to "
            f"{doc['part'].get('stop_shard')} of {doc['part'].get('total_shards')}, written "
            "with shard_range); join the parts with `torchrecord join OUTPUT PART...`"
        )
    if doc.get("checksum", CHECKSUM_ALGORITHM) != CHECKSUM_ALGORITHM:
        raise DatasetError(f"{where}: unknown checksum algorithm {doc.get('checksum')!r}")
    shard_docs = doc.get("shards")
    if not isinstance(shard_docs, list) or not shard_docs:
        raise DatasetError(f"{where}: 'shards' must be a non-empty list; re-write the dataset")
    shards = []
    for i, item in enumerate(shard_docs):
        if not isinstance(item, dict):
            raise DatasetError(f"{where}: shard {i} is not an object")
        name = item.get("file")
        if not isinstance(name, str) or Path(name).name != name or name.startswith("."):
            raise DatasetError(f"{where}: shard file name {name!r} is not allowed")
        sha256 = item.get("sha256")
        if sha256 is not None and (
            not isinstance(sha256, str)
            or len(sha256) != 64
            or not all(c in "0123456789abcdef" for c in sha256)
        ):
            raise DatasetError(f"{where}: shard {name} sha256 must be 64 lowercase hex digits")
        records_crc32 = item.get("records_crc32")
        if records_crc32 is not None:
            _count(records_crc32, where, f"shard {name} records_crc32")
        shards.append(
            ShardInfo(
                name,
                _count(item.get("num_records"), where, f"shard {name} num_records"),
                _count(item.get("bytes"), where, f"shard {name} bytes"),
                sha256=sha256,
                records_crc32=records_crc32,
            )
        )
    if len({s.file for s in shards}) != len(shards):
        raise DatasetError(f"{where}: a shard file is listed twice")
    for key in ("codec", "serializer"):
        if not isinstance(doc.get(key), str) or not doc[key]:
            raise DatasetError(f"{where}: {key!r} must be a non-empty string")
    known = {"format", "format_version", "codec", "serializer", "num_records", "checksum", "shards"}
    manifest = Manifest(
        codec=doc["codec"],
        serializer=doc["serializer"],
        shards=shards,
        format_version=doc["format_version"],
        extra={k: v for k, v in doc.items() if k not in known},
    )
    if doc.get("num_records") != manifest.num_records:
        raise DatasetError(
            f"{where}: num_records {doc.get('num_records')!r} disagrees with the sum of "
            f"its shards ({manifest.num_records}); re-write the dataset"
        )
    return manifest


def _legacy_manifest(root: Path) -> Manifest:
    import lmdb

    from .environments import SHARED

    names, counts = [], []
    with SHARED.reading():
        generation = SHARED.current_generation()
        shared_key, env = SHARED.acquire(
            root / LEGACY_DATA_FILE, lambda: lmdb.open(str(root), max_dbs=4096, **READ_OPTIONS)
        )
        try:  # (LMDB: no two transactions open databases at once)
            with SHARED.lock, env.begin() as txn:
                for db_key, _ in txn.cursor():
                    name = db_key.decode("ascii", "replace")
                    if name.startswith("db") and name[2:].isdigit():
                        names.append(name)
                names.sort(key=lambda n: int(n[2:]))
                for name in names:
                    db = env.open_db(name.encode(), txn=txn, create=False)
                    counts.append(txn.stat(db)["entries"])
        finally:
            SHARED.release(shared_key, generation)
    if not names:
        raise DatasetError(f"{root}/{LEGACY_DATA_FILE} holds no TorchRecord 0.1 sub-databases")
    size = (root / LEGACY_DATA_FILE).stat().st_size
    shards = [
        ShardInfo(LEGACY_DATA_FILE, n, size, legacy_db=name) for name, n in zip(names, counts)
    ]
    return Manifest("raw_rgb", "tensorprotos", shards, format_version=0, legacy=True)


def read_shard_meta(txn: Any, shard: str) -> dict[str, Any]:
    raw = txn.get(META_KEY)
    if raw is None:
        raise ShardCorruptedError(shard, "has no TorchRecord metadata key")
    try:
        meta = json.loads(bytes(raw))
    except (ValueError, RecursionError) as exc:
        raise ShardCorruptedError(shard, f"metadata is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise ShardCorruptedError(shard, "metadata is not a JSON object")
    check_format_version(meta.get("format_version"), f"shard {shard}")
    return meta


def check_shard_file(path: Path, expected_bytes: int) -> None:
    """Refuse a shard whose size is not what the manifest recorded.

    LMDB maps the file and a read past the end of a truncated file kills the process with SIGBUS,
    so this runs before the first read of every shard.
    """
    try:
        actual = path.stat().st_size
    except FileNotFoundError:
        raise ShardCorruptedError(str(path), "is missing") from None
    if actual != expected_bytes:
        raise ShardCorruptedError(
            str(path),
            f"is {actual} bytes but the manifest recorded {expected_bytes} "
            "(truncated or modified after it was written)",
        )
