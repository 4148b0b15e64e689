"""Random access to the records of a dataset, without torch.

:class:`RecordReader` maps a global record index to (shard, key), opens each shard lazily in the
process that reads it (LMDB environments must not cross ``fork``), checks the shard's size before
the first memory-mapped read, verifies each record's CRC-32 and hands back the serializer's record.
The per-record index is two small numpy arrays, so DataLoader workers share it copy-on-write.
"""

from __future__ import annotations

import functools
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from . import format as fmt
from .checksum import crc32
from .codecs.base import plugin_bug, plugin_hint
from .environments import SHARED, exit_with_parent
from .errors import (
    DatasetError,
    PluginError,
    PluginVersionError,
    RecordCorruptedError,
    SerializationError,
    ShardCorruptedError,
    TorchRecordError,
    UnknownPluginError,
)
from .plugins import (
    adopt,
    carried,
    fast_method,
    for_written_version,
    get_codec,
    get_serializer,
    written_format_version,
)


class RecordReader:
    """Read records of one dataset by global index. Picklable; opens shards lazily."""

    def __init__(self, path: str | os.PathLike, verify_checksums: bool = True):
        self.path = Path(path)
        self.manifest = fmt.read_manifest(self.path)
        self.verify_checksums = verify_checksums and not self.manifest.legacy
        counts = np.array([s.num_records for s in self.manifest.shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.codec_name = self.manifest.codec
        self.serializer_name = self.manifest.serializer
        for kind in ("codec", "serializer"):  # (a damaged recorded version: said at once)
            written_format_version(self.manifest.extra, kind, self.path)
        self.max_open_shards: int | None = None  # None: keep every opened shard open
        self._state_init()

    # Past max_open_shards, the most recently used shards stay open while they take no more
    # than keep_open_bytes in all and number no more than keep_open_shards (block mode: see
    # loader.block_mode_keep_open). A worker gets the values its reader had when it started.
    keep_open_bytes = 0
    keep_open_shards = 0

    def _state_init(self) -> None:
        # shard -> environment, least recently used first, for the current generation
        self._envs: OrderedDict[int, Any] = OrderedDict()
        self._keys: dict[int, tuple] = {}  # shard -> the shared environment it holds
        self._dbs: dict[int, Any] = {}
        self._checksums: dict[int, np.ndarray] = {}
        self._legacy_keys: dict[int, list[bytes]] = {}
        self._generation = SHARED.generation
        self._serializer = None
        self._codec: tuple[Any, Any] | None = None  # (the registered codec, what reads)

    # -- pickling: environments never travel -------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in (
            "_envs",
            "_keys",
            "_dbs",
            "_checksums",
            "_legacy_keys",
            "_serializer",
            "_codec",
            "_generation",
        ):
            state.pop(key, None)
        # a codec or serializer registered at run time goes along (spawned workers)
        state["_carried"] = carried(
            (("codec", self.codec_name), ("serializer", self.serializer_name))
        )
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        adopt(state.pop("_carried", []))
        self.__dict__.update(state)
        self._state_init()

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_shards(self) -> int:
        return len(self.manifest.shards)

    @property
    def codec(self) -> Any:
        try:
            codec = get_codec(self.codec_name)
        except UnknownPluginError as exc:
            raise self._not_installed(exc, "codec") from None
        held = self._codec
        if held is None or held[0] is not codec:  # (a plugin registered again: checked again)
            held = self._codec = (codec, self._for_written("codec", codec))
        return held[1]

    @property
    def serializer(self) -> Any:
        if self._serializer is None:
            try:
                serializer = get_serializer(self.serializer_name)
            except UnknownPluginError as exc:
                raise self._not_installed(exc, "serializer") from None
            self._serializer = self._for_written("serializer", serializer)
        return self._serializer

    def check_plugin_versions(self) -> None:
        """Refuse now, not at the first record, a dataset whose codec or serializer is here in
        a format version that cannot read it (one not installed is said when it is needed)."""
        for kind in ("codec", "serializer"):
            if kind == "codec" and self.codec_name == fmt.CUSTOM_CODEC:
                continue
            try:
                getattr(self, kind)
            except UnknownPluginError:
                pass

    def _for_written(self, kind: str, obj: Any) -> Any:
        """The codec or serializer that reads the layout of the one that wrote the dataset
        (its format version, which the manifest records)."""
        extra = self.manifest.extra
        written = written_format_version(extra, kind, self.path)
        return for_written_version(kind, obj, written, self.path, extra)

    def _not_installed(self, exc: UnknownPluginError, kind: str) -> UnknownPluginError:
        """``exc``, saying which package (and version) the dataset was written with, as its
        manifest records it."""
        written = self.manifest.extra.get("plugins", {})
        who = written.get(kind) if isinstance(written, dict) else None
        if not isinstance(who, dict) or not who.get("distribution"):
            return exc
        dist = str(who["distribution"])
        if dist.startswith("("):  # registered at run time by the program that wrote it
            hint = (
                f"{self.path} was written with {kind} {exc.name!r} registered at run time: "
                "register the same plugin (torchrecord.plugins.register_plugin) before reading."
            )
        else:
            hint = (
                f"{self.path} was written with {kind} {exc.name!r} from {dist} "
                f"{who.get('version', '?')}: install that package (pip install '{dist}')."
            )
        return UnknownPluginError(exc.kind, exc.name, exc.available, hint)

    @functools.cached_property
    def fingerprint(self) -> str:
        """What identifies the dataset's records and their order: its shards in order, each
        with its record count and SHA-256 (size for 0.1 datasets, which record no hash). The
        same for copies of a dataset and for an identical rewrite; another for anything else,
        also for the same images written into other shards."""
        import hashlib
        import json

        shards = [
            [s.file, s.legacy_db, s.num_records, s.sha256 or s.bytes] for s in self.manifest.shards
        ]
        return hashlib.sha256(json.dumps(shards).encode()).hexdigest()[:16]

    def shard_path(self, shard: int) -> Path:
        return self.path / self.manifest.shards[shard].file

    def shard_label(self, shard: int) -> str:
        info = self.manifest.shards[shard]
        label = str(self.path / info.file)
        return f"{label}[{info.legacy_db}]" if info.legacy_db else label

    def locate(self, index: int) -> tuple[int, int]:
        """(shard, index inside the shard) of a global record index."""
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"record index {index} out of range for a dataset of {n} records")
        shard = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return shard, index - int(self.offsets[shard])

    # -- shards --------------------------------------------------------------------------------
    def _open(self, shard: int) -> Any:
        # the usual case costs two comparisons; the lock is taken only after a fork
        if (self._generation != SHARED.generation or SHARED.pid != os.getpid()) and (
            self._generation != SHARED.current_generation()
        ):
            # the environments were closed before a fork, or we are the forked child
            checksums, legacy_keys = self._checksums, self._legacy_keys
            self._state_init()
            self._checksums, self._legacy_keys = checksums, legacy_keys
        env = self._envs.get(shard)
        if env is not None:
            self._envs.move_to_end(shard)
            return env
        # in a DataLoader worker: leave with the training process, which PyTorch's own watch
        # misses under forkserver (see exit_with_parent; once a process, at its first read)
        exit_with_parent()
        import lmdb

        info = self.manifest.shards[shard]
        path = self.shard_path(shard)
        label = self.shard_label(shard)
        fmt.check_shard_file(path, info.bytes)
        try:
            if info.legacy_db is not None:
                env = self._acquire(
                    shard,
                    path,
                    lambda: lmdb.open(str(self.path), max_dbs=4096, **fmt.READ_OPTIONS),
                )
                self._check_pages(env, path, label)
                with SHARED.lock:  # LMDB: no two transactions open databases at once
                    db = env.open_db(info.legacy_db.encode(), create=False)
                with env.begin(db=db) as txn:
                    keys = list(txn.cursor().iternext(keys=True, values=False))
                if len(keys) != info.num_records:
                    raise ShardCorruptedError(label, "changed while it was being opened")
                # 0.1 keys are zero-padded decimal indices: numeric order is record order
                if not all(k.isdigit() for k in keys):
                    raise ShardCorruptedError(label, "holds a key that is not a decimal index")
                self._legacy_keys[shard] = sorted(keys, key=int)
                self._dbs[shard] = db
            else:
                check_structure(path, label, self.manifest.format_version)
                env = self._acquire(
                    shard, path, lambda: lmdb.open(str(path), subdir=False, **fmt.READ_OPTIONS)
                )
                self._check_pages(env, path, label)
                with env.begin() as txn:
                    meta = fmt.read_shard_meta(txn, label)
                    self._check_meta(meta, shard, label)
                    entries = txn.stat()["entries"]
                    if self.manifest.format_version >= 2:
                        keys = meta.get("num_keys")
                        if type(keys) is not int or not info.num_records <= keys:
                            raise ShardCorruptedError(
                                label, f"its metadata has an invalid num_keys {keys!r}"
                            )
                        what = f"{keys} record parts of {info.num_records} records"
                    else:
                        keys, what = info.num_records, f"{info.num_records} records"
                    if entries != keys + 2:
                        raise ShardCorruptedError(
                            label, f"holds {entries} keys, expected {what} and 2 metadata keys"
                        )
                    if self.verify_checksums or info.records_crc32 is not None:
                        raw = txn.get(fmt.CHECKSUMS_KEY)
                        if raw is None or len(raw) != 4 * info.num_records:
                            raise ShardCorruptedError(
                                label, "its checksum table is missing or has the wrong length"
                            )
                        raw = bytes(raw)
                        if info.records_crc32 is not None and crc32(raw) != info.records_crc32:
                            raise ShardCorruptedError(
                                label,
                                "it holds other records than the ones the manifest lists (a "
                                "shard of another write, copied or renamed over this one, or "
                                "rewritten since)",
                            )
                        if self.verify_checksums:
                            self._checksums[shard] = np.frombuffer(raw, dtype="<u4")
                self._dbs[shard] = None
        except lmdb.Error as exc:
            self._release(shard)
            raise ShardCorruptedError(label, f"LMDB cannot open it ({exc})") from exc
        except Exception:
            self._release(shard)
            raise
        self._envs[shard] = env
        while (
            self.max_open_shards
            and len(self._envs) > self.max_open_shards
            and (
                len(self._envs) > self.keep_open_shards
                or sum(self.manifest.shards[s].bytes for s in self._envs) > self.keep_open_bytes
            )
        ):
            oldest, _ = self._envs.popitem(last=False)
            self._release(oldest)
        return env

    def _acquire(self, shard: int, path: Path, opener: Callable[[], Any]) -> Any:
        key, env = SHARED.acquire(path, opener)
        self._keys[shard] = key
        return env

    def _release(self, shard: int) -> None:
        self._envs.pop(shard, None)
        self._dbs.pop(shard, None)
        key = self._keys.pop(shard, None)
        if key is not None:
            SHARED.release(key, self._generation)

    @property
    def open_shards(self) -> list[int]:
        """The shards this reader holds open in this process, least recently used first."""
        return list(self._envs)

    @staticmethod
    def _check_pages(env: Any, path: Path, label: str) -> None:
        used = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
        size = path.stat().st_size
        if used > size:
            raise ShardCorruptedError(
                label, f"is truncated: LMDB uses {used} bytes but the file has {size}"
            )

    def _check_meta(self, meta: dict[str, Any], shard: int, label: str) -> None:
        expected = {
            "format": fmt.FORMAT_NAME,
            "shard_index": shard,
            "checksum": fmt.CHECKSUM_ALGORITHM,
            "codec": self.codec_name,
            "serializer": self.serializer_name,
            "num_records": self.manifest.shards[shard].num_records,
            "format_version": self.manifest.format_version,
        }
        for key, value in expected.items():
            if meta.get(key) != value:
                raise ShardCorruptedError(
                    label,
                    f"its metadata says {key}={meta.get(key)!r} but the manifest says {value!r}",
                )

    def close(self) -> None:
        """Release this reader's shards (an environment closes when no reader holds it)."""
        keys, generation = getattr(self, "_keys", {}), getattr(self, "_generation", -1)
        for key in keys.values():
            SHARED.release(key, generation)
        checksums, legacy_keys = self._checksums, self._legacy_keys
        self._state_init()
        self._checksums, self._legacy_keys = checksums, legacy_keys

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- records -------------------------------------------------------------------------------
    def key_of(self, shard: int, local: int) -> bytes:
        if self.manifest.shards[shard].legacy_db is not None:
            with SHARED.reading():
                self._open(shard)
                return self._legacy_keys[shard][local]
        return fmt.record_key(local, self.manifest.format_version)

    def read_bytes(self, index: int) -> bytes:
        """The stored bytes of one record, checked against its CRC-32."""
        shard, local = self.locate(index)
        with SHARED.reading():  # (a fork in another thread waits for this read: see SHARED)
            env = self._open(shard)
            key = self.key_of(shard, local)
            try:
                if self.manifest.format_version >= 2:
                    value = _read_parts(env, key)
                else:
                    with env.begin(db=self._dbs.get(shard)) as txn:
                        value = txn.get(key)
            except Exception as exc:
                import lmdb

                if not isinstance(exc, lmdb.Error):
                    raise
                raise RecordCorruptedError(
                    self.shard_label(shard), key, local, f"LMDB cannot read it ({exc})"
                ) from exc
        if value is None:
            raise RecordCorruptedError(self.shard_label(shard), key, local, "the record is missing")
        checksums = self._checksums.get(shard)
        if checksums is not None and crc32(value) != int(checksums[local]):
            raise RecordCorruptedError(
                self.shard_label(shard),
                key,
                local,
                "its bytes do not match the stored CRC-32 (the file was damaged on disk)",
            )
        return value

    def read_record(self, index: int) -> Any:
        """One record, deserialized (a ``TensorProtos`` message)."""
        return self._loads(index, self.read_bytes(index))

    def read_view(self, index: int) -> Any:
        """One record for the built-in codecs' tensor transforms: a view that does not copy
        the image bytes where the serializer gives one (``loads_view``), else the message
        :meth:`read_record` gives."""
        value = self.read_bytes(index)
        loads_view = fast_method(self.serializer, "loads", "loads_view")
        if loads_view is not None:
            view = loads_view(value)
            if view is not None:
                return view
        return self._loads(index, value)

    def _loads(self, index: int, value: bytes) -> Any:
        try:
            return self.serializer.loads(value)
        except SerializationError as exc:
            shard, local = self.locate(index)
            raise RecordCorruptedError(
                self.shard_label(shard), self.key_of(shard, local), local, str(exc)
            ) from exc

    def __repr__(self) -> str:
        return (
            f"RecordReader({str(self.path)!r}, records={len(self)}, shards={self.num_shards}, "
            f"codec={self.codec_name!r}, serializer={self.serializer_name!r})"
        )


def _read_parts(env: Any, key: bytes) -> bytes | None:
    """A version 2 record: its first part, then the parts under the next keys, concatenated.

    ``key`` (the first part's, ``4*i``) ends in two zero bits: part ``p``'s key sets them to ``p``.
    Parts are consecutive keys (the structural check made sure), so the first one missing ends
    the record; a lost part shows as a CRC-32 mismatch."""
    with env.begin(buffers=True) as txn:  # views into the map: one copy, by the join
        first = txn.get(key)
        if first is None:
            return None
        stem, last = key[:-1], key[-1]
        pieces = [first]
        for part in range(1, fmt.PARTS_PER_RECORD):
            piece = txn.get(stem + bytes((last | part,)))
            if piece is None:
                break
            pieces.append(piece)
        return bytes(first) if len(pieces) == 1 else b"".join(pieces)


# the verdict on each shard file checked in this process: None (sound) or what is wrong
_CHECKED: dict[tuple[str, int, int, int, int, int, int], str | None] = {}


def check_structure(path: Path, label: str, layout: int = fmt.FORMAT_VERSION) -> None:
    """Check a shard's LMDB structure before LMDB maps it (see :mod:`torchrecord.lmdbcheck`);
    once per file (and version of it) per process. ``layout``: the format version, which says
    what keys the shard must hold."""
    from .lmdbcheck import validate

    try:
        st = os.stat(path)
        identity = (
            str(path),
            st.st_dev,
            st.st_ino,
            st.st_size,
            st.st_mtime_ns,
            st.st_ctime_ns,
            layout,
        )
        if identity not in _CHECKED:
            problems = validate(path, expected_size=st.st_size, layout=layout)
            _CHECKED[identity] = problems[0] if problems else None
    except OSError as exc:  # not a verdict on the shard: say what failed
        raise DatasetError(f"shard {label}: cannot read it to check it ({exc})") from exc
    problem = _CHECKED[identity]
    if problem is not None:
        raise ShardCorruptedError(
            label, f"its LMDB structure is damaged ({problem}); LMDB would misread it"
        )


def verify(
    reader: RecordReader,
    quick: bool = False,
    decode: bool = False,
    tally: dict[str, int] | None = None,
) -> Iterator[DatasetError]:
    """Check a dataset; yield one error per bad shard or record, naming it.

    ``quick``: every shard's size, LMDB page count, key count and metadata against the manifest.
    Otherwise also each shard file's SHA-256 (when the manifest has it) and every record's
    CRC-32 and deserialization; with ``decode``, also that every record's image decodes, as
    the loader's default transform decodes it (a JPEG whose tables are damaged passes the
    other checks: it was stored that way). ``decode`` needs the dataset's codec installed, and
    skips datasets written by a custom ``data_process_func`` (their records hold whatever the
    function made, which only the user's own transform knows how to read). ``tally["records"]``
    counts the records checked (not those of a shard that cannot be read); ``tally["parsed"]``
    is 0 when the serializer is not installed, and the records were checked by their CRC-32
    only (neither it nor the codec is needed for that).
    """
    tally = {} if tally is None else tally
    tally["records"] = 0
    tally["parsed"] = 1  # 0: the serializer is not installed, records checked by CRC-32 only
    try:
        decoder = _decoder(reader) if decode and not quick else None
        if decoder is None and not quick:
            try:
                _ = reader.serializer  # (installed here, in a version that reads them?)
            except (UnknownPluginError, PluginVersionError):
                tally["parsed"] = 0
        for shard in range(reader.num_shards):
            try:
                with SHARED.reading():
                    reader._open(shard)
            except DatasetError as exc:
                yield exc
                continue  # nothing more can be read from this shard
            if quick:
                continue
            info = reader.manifest.shards[shard]
            if info.sha256 is not None:
                from .writer import file_sha256

                actual = file_sha256(reader.shard_path(shard))
                if actual != info.sha256:
                    yield ShardCorruptedError(
                        reader.shard_label(shard),
                        f"its SHA-256 is {actual[:16]}... but the manifest recorded "
                        f"{info.sha256[:16]}... (modified after it was written)",
                    )
            for index in range(int(reader.offsets[shard]), int(reader.offsets[shard + 1])):
                tally["records"] += 1
                try:
                    if tally["parsed"]:
                        record = reader.read_record(index)
                    else:
                        reader.read_bytes(index)
                except ShardCorruptedError as exc:
                    yield exc
                    break  # the rest of this shard cannot be read either
                except DatasetError as exc:
                    exc.dataset_index = index  # (the index TRDataset and the loader use)
                    yield exc
                    continue
                if decoder is None:
                    continue
                try:
                    decoder(record)
                except PluginError:
                    raise  # (a bug in the codec, not damage: checking the rest says no more)
                except NotImplementedError:
                    raise TorchRecordError(
                        f"{reader.path}: the codec {reader.codec_name!r} cannot decode its "
                        "records: the plugin that provides it does not implement decode_image "
                        "(see `torchrecord plugins`); the dataset itself may be sound"
                    ) from None
                except Exception as exc:
                    local = index - int(reader.offsets[shard])
                    bug = plugin_bug(
                        reader.codec_name,
                        exc,
                        f"record {local} of {reader.shard_label(shard)} (record {index})",
                    )
                    if bug is not None:
                        raise bug from exc
                    problem = RecordCorruptedError(
                        reader.shard_label(shard),
                        reader.key_of(shard, local),
                        local,
                        f"its image does not decode ({type(exc).__name__}: {exc})",
                        hint="It was stored as it was written: fix or remove its source image "
                        "and write the dataset again." + plugin_hint(reader.codec_name),
                    )
                    problem.dataset_index = index
                    yield problem
    finally:
        reader.close()


def _decoder(reader: RecordReader) -> Callable[[Any], Any] | None:
    """What the loader's default transform decodes a record with (the codec's tensor decode);
    None for records of a custom ``data_process_func``."""
    if reader.codec_name == fmt.CUSTOM_CODEC:
        return None
    from .codecs.base import decoded_tensor

    codec = reader.codec
    return lambda record: decoded_tensor(codec, record)


def shard_file_problems(root: Path, manifest: fmt.Manifest) -> list[str]:
    """The shard files that are missing or not the size the manifest recorded (one ``stat``
    each: nothing is opened)."""
    problems = []
    for s in manifest.shards:
        if s.legacy_db is not None:
            continue  # (0.1: one file for every shard, its size not in a manifest)
        try:
            size = os.stat(root / s.file).st_size
        except FileNotFoundError:
            problems.append(f"{s.file} is missing")
            continue
        if size != s.bytes:
            problems.append(f"{s.file} is {size} bytes but the manifest recorded {s.bytes}")
    return problems


def stray_files(root: Path, manifest: fmt.Manifest) -> list[str]:
    """What lies in a dataset's directory besides the dataset: shard files its manifest does
    not list (never read, and an append refuses to run over them) and staging directories of
    interrupted writes (their space is taken until they are resumed or removed)."""
    from .writer import _STAGING_NAME

    listed = {s.file for s in manifest.shards}
    notes = []
    for path in sorted(root.glob("shard-*.lmdb")):
        if path.name not in listed and not manifest.legacy:
            notes.append(
                f"{path.name} is a shard file the manifest does not list, so its records are "
                "not read (was manifest.json restored from an earlier copy?); restore the "
                "manifest that lists it, or move the file away"
            )
    for path in sorted(root.iterdir()):
        if not (_STAGING_NAME.fullmatch(path.name) and path.is_dir()):
            continue
        size = 0
        for f in path.iterdir():
            try:
                size += f.stat().st_size
            except OSError:  # (moved or removed meanwhile by a write that is running)
                pass
        notes.append(
            f"{path.name} holds the staging of a write that was interrupted or is running "
            f"({size / 1e6:.1f} MB): if none is running, run the same write again to resume "
            "it, or delete the directory"
        )
    return notes


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """A summary for ``torchrecord info``."""
    manifest = fmt.read_manifest(path)
    root = Path(path)
    files = {s.file for s in manifest.shards}
    total = sum((root / f).stat().st_size for f in files if (root / f).exists())
    if not manifest.shards:
        raise DatasetError(f"{root} has no shards")
    problems = shard_file_problems(root, manifest)
    return {
        "path": str(root),
        "format_version": manifest.format_version,
        "legacy": manifest.legacy,
        "codec": manifest.codec,
        "serializer": manifest.serializer,
        "records": manifest.num_records,
        "shards": [
            {
                "file": s.file + (f"[{s.legacy_db}]" if s.legacy_db else ""),
                "records": s.num_records,
                "bytes": s.bytes,
            }
            for s in manifest.shards
        ],
        "bytes": total,
        "problems": problems,
        "notes": stray_files(root, manifest),
        **{k: v for k, v in manifest.extra.items()},
    }
