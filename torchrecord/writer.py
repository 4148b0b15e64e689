"""The Writer: samples (a data list, an ImageFolder directory or an iterable) -> LMDB shards.

Samples are encoded by a codec (optionally in worker processes), serialized, and written in
large append-only transactions into shards under a hidden staging directory. Only when every
shard is complete are they moved into place and the manifest written, so no partial dataset is
ever visible, and a failed write leaves an existing dataset as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from . import format as fmt
from .codecs.raw_rgb import default_data_process_func
from .datalist import (
    ITERABLE_NAME,
    Entry,
    index_labels,
    read_data_list,
    read_image_folder,
    read_iterable,
)
from .errors import DataListError, DatasetExistsError, TorchRecordError
from .plugins import get_codec, get_serializer

_INITIAL_MAP_SIZE = 256 << 20
_BATCH_RECORDS = 512
_BATCH_BYTES = 64 << 20
EXTRAS_PROTO_NAME = "extras"  # the third proto of a record with extra fields (JSON)
SKIPPED_REPORT = "skipped.tsv"


class Writer:
    """Pack samples into LMDB shards in ``output_dir``.

    The first five parameters are TorchRecord 0.1's. ``data_list`` is a ``.txt``/``.csv`` data
    list, an ImageFolder-style directory (labels by sorted class folder), or an iterable of
    ``(path, label)`` pairs or dicts (``path``, ``label`` and extra fields that come back from
    the loader). String labels are mapped to indices; the names go into the manifest.

    ``codec`` names how images are stored (``raw_rgb`` by default, ``jpeg``, or any plugin's);
    ``serializer`` how records become bytes (``tensorprotos`` by default, or ``msgpack``). A
    custom ``data_process_func(line)`` returning a ``TensorProtos`` replaces the codec, as in
    0.1: it receives ``"<path> <label>"`` with the path already resolved.

    Shards: ``db_num`` equal parts (0.1), or a new shard every ``records_per_shard`` records or
    once a shard holds ``bytes_per_shard`` bytes. ``num_workers`` processes encode in parallel;
    the output is identical for any ``num_workers`` given the same ``seed``. ``on_error="skip"``
    writes every sample that cannot be encoded, with its reason, to ``skipped.tsv`` next to the
    dataset (and counts them in the manifest) instead of stopping.
    """

    def __init__(
        self,
        data_list: str | os.PathLike | Iterable[Any],
        output_dir: str | os.PathLike,
        db_num: int = 1,
        shuffle: bool = False,
        data_process_func: Callable[[str], Any] | None = None,
        *,
        codec: str | None = None,
        serializer: str = "tensorprotos",
        num_workers: int = 0,
        seed: int = 0,
        root: str | os.PathLike | None = None,
        overwrite: bool = False,
        progress: bool | None = None,
        records_per_shard: int | None = None,
        bytes_per_shard: int | None = None,
        on_error: str = "raise",
    ):
        if int(db_num) < 1:
            raise ValueError(f"db_num must be at least 1, got {db_num}")
        if int(num_workers) < 0:
            raise ValueError(f"num_workers must be 0 or more, got {num_workers}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        limits = [x for x in (records_per_shard, bytes_per_shard) if x is not None]
        if len(limits) > 1 or (limits and int(db_num) != 1):
            raise ValueError(
                "choose one way to shard: db_num, records_per_shard or bytes_per_shard"
            )
        if limits and int(limits[0]) < 1:
            raise ValueError(f"shard limits must be at least 1, got {limits[0]}")
        custom = data_process_func not in (None, default_data_process_func)
        if custom and codec is not None:
            raise ValueError(
                "give either a codec or a custom data_process_func, not both: the function "
                "replaces the codec"
            )
        self.data_list = data_list
        self.output_dir = Path(output_dir)
        self.db_num = int(db_num)
        self.records_per_shard = None if records_per_shard is None else int(records_per_shard)
        self.bytes_per_shard = None if bytes_per_shard is None else int(bytes_per_shard)
        self.shuffle = bool(shuffle)
        self.data_process_func = data_process_func if custom else None
        self.codec_name = fmt.CUSTOM_CODEC if custom else (codec or "raw_rgb")
        self.serializer_name = serializer
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.root = root
        self.overwrite = bool(overwrite)
        self.on_error = on_error
        self.progress = sys.stderr.isatty() if progress is None else bool(progress)
        self.skipped: list[tuple[Entry, str]] = []
        # Resolve names now: an unknown codec or serializer fails before any work is done.
        get_serializer(self.serializer_name)
        if not custom:
            get_codec(self.codec_name)

    # -- public ------------------------------------------------------------------------------
    def write(self) -> fmt.Manifest:
        """Write the dataset and return its manifest."""
        started = time.perf_counter()
        entries, source, label_names = self._entries()
        if self.db_num > len(entries):
            raise ValueError(
                f"db_num={self.db_num} is more than the {len(entries)} samples of "
                f"{source}; use at most one shard per sample"
            )
        if self.data_process_func is not None and any(e.extras for e in entries):
            raise ValueError(
                "extra fields need a codec; a custom data_process_func stores its own records"
            )
        self._check_output_dir()
        order = list(range(len(entries)))
        if self.shuffle:
            random.Random(self.seed).shuffle(order)
        ordered = [entries[i] for i in order]

        self.output_dir.mkdir(parents=True, exist_ok=True)
        staging = self.output_dir / f".tmp-{uuid.uuid4().hex[:12]}"
        staging.mkdir()
        try:
            shards = self._write_shards(ordered, source, staging)
            if not shards:
                raise DataListError(
                    source,
                    None,
                    f"every one of the {len(entries)} samples was skipped; see the reasons above",
                )
            extra = self._manifest_extra(source, label_names, ordered)
            extra["write_seconds"] = round(time.perf_counter() - started, 3)
            manifest = fmt.Manifest(self.codec_name, self.serializer_name, shards, extra=extra)
            self._publish(staging, manifest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return manifest

    # -- steps ---------------------------------------------------------------------------------
    def _entries(self) -> tuple[list[Entry], str, list[str] | None]:
        source = self.data_list
        if isinstance(source, (str, os.PathLike)):
            if Path(source).is_dir():
                entries, classes = read_image_folder(source)
                return entries, str(source), classes
            entries = read_data_list(source, root=self.root)
            name = str(source)
        else:
            entries = read_iterable(source, root=self.root)
            name = ITERABLE_NAME
        if self.data_process_func is not None:
            return entries, name, None  # 0.1: the function reads the label itself
        entries, label_names = index_labels(entries)
        return entries, name, label_names

    def _check_output_dir(self) -> None:
        out = self.output_dir
        if not out.exists():
            return
        if not out.is_dir():
            raise DatasetExistsError(f"{out} exists and is not a directory")
        existing = [
            p.name
            for p in out.iterdir()
            if p.name in (fmt.MANIFEST_NAME, fmt.LEGACY_DATA_FILE)
            or (p.name.startswith("shard-") and p.name.endswith(".lmdb"))
        ]
        if existing and not self.overwrite:
            raise DatasetExistsError(
                f"{out} already holds a dataset ({', '.join(sorted(existing)[:3])}...); "
                "refusing to write over it. Choose another output_dir, or pass overwrite=True "
                "(--overwrite) to replace it."
            )

    def _rollover_positions(self, n: int) -> set[int]:
        """Input positions that start a new shard in ``db_num`` mode (0.1's equal split)."""
        size, extra = divmod(n, self.db_num)
        starts, start = set(), 0
        for i in range(self.db_num):
            starts.add(start)
            start += size + (1 if i < extra else 0)
        return starts - {0}

    def _write_shards(
        self, entries: list[Entry], source: str, staging: Path
    ) -> list[fmt.ShardInfo]:
        shards: list[fmt.ShardInfo] = []
        splits = self._rollover_positions(len(entries)) if self.db_num > 1 else set()
        shard: _ShardWriter | None = None
        encoded = self._encoded(entries, source)
        bar = _progress_bar(len(entries), self.progress)
        try:
            for position, (entry, ok, value) in enumerate(encoded):
                if shard is not None and (
                    position in splits
                    or (self.records_per_shard and shard.count >= self.records_per_shard)
                    or (self.bytes_per_shard and shard.payload >= self.bytes_per_shard)
                ):
                    shards.append(shard.finish())
                    shard = None
                bar.update(1, len(value) if ok else 0)
                if not ok:
                    self.skipped.append((entry, value.decode()))
                    continue
                if shard is None:
                    shard = _ShardWriter(
                        staging, len(shards), self.codec_name, self.serializer_name
                    )
                shard.add(value)
            if shard is not None:
                shards.append(shard.finish())
        finally:
            if shard is not None:
                shard.close()
            bar.close()
            encoded.close()
        return shards

    def _encoded(self, entries: list[Entry], source: str) -> Iterator[tuple[Entry, bool, bytes]]:
        """``(entry, ok, bytes or reason)`` in order, encoded here or in worker processes.

        Workers get chunks of entries; at most a few chunks per worker are in flight, so memory
        stays bounded however fast the workers are, and a worker that dies raises
        ``BrokenProcessPool`` instead of hanging the write.
        """
        job = _EncodeJob(
            source,
            self.codec_name,
            self.serializer_name,
            self.data_process_func,
            self.on_error == "skip",
        )
        if self.num_workers == 0:
            for entry in entries:
                yield (entry, *job(entry))
            return
        from collections import deque
        from concurrent.futures import ProcessPoolExecutor

        size = max(1, min(32, len(entries) // (self.num_workers * 8) or 1))
        chunks = (entries[i : i + size] for i in range(0, len(entries), size))
        with ProcessPoolExecutor(self.num_workers) as pool:
            pending: deque = deque()

            def drain() -> Iterator[tuple[Entry, bool, bytes]]:
                chunk, future = pending.popleft()
                for entry, result in zip(chunk, future.result()):
                    yield (entry, *result)

            try:
                for chunk in chunks:
                    pending.append((chunk, pool.submit(job.run_chunk, chunk)))
                    if len(pending) >= 4 * self.num_workers:
                        yield from drain()
                while pending:
                    yield from drain()
            finally:
                for _, future in pending:
                    future.cancel()

    def _manifest_extra(
        self, source: str, label_names: list[str] | None, entries: list[Entry]
    ) -> dict[str, Any]:
        from . import __version__

        extra: dict[str, Any] = {
            "created_by": f"torchrecord {__version__}",
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": source,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "sharding": (
                {"records_per_shard": self.records_per_shard}
                if self.records_per_shard
                else {"bytes_per_shard": self.bytes_per_shard}
                if self.bytes_per_shard
                else {"db_num": self.db_num}
            ),
            "skipped": len(self.skipped),
        }
        if self.skipped:
            extra["skipped_report"] = SKIPPED_REPORT
        if label_names is not None:
            extra["label_names"] = label_names
        fields = sorted({key for e in entries if e.extras for key in e.extras})
        if fields:
            extra["extra_fields"] = fields
        if self.data_process_func is not None:
            func = self.data_process_func
            extra["data_process_func"] = f"{func.__module__}.{func.__qualname__}"
        return extra

    def _publish(self, staging: Path, manifest: fmt.Manifest) -> None:
        out = self.output_dir
        old_manifest = out / fmt.MANIFEST_NAME
        if self.skipped:
            lines = ["line\tpath\treason"] + [
                f"{e.line_no}\t{e.path}\t{reason}".replace("\n", " ") for e, reason in self.skipped
            ]
            (staging / SKIPPED_REPORT).write_text("\n".join(lines) + "\n", encoding="utf-8")
        if self.overwrite:
            # The old dataset stops being a dataset first (its manifest goes), then its files.
            if old_manifest.exists():
                old_manifest.unlink()
                _fsync(out)
            for p in out.iterdir():
                if p.is_file() and (
                    p.name in (fmt.LEGACY_DATA_FILE, "lock.mdb", SKIPPED_REPORT)
                    or (p.name.startswith("shard-") and p.name.endswith(".lmdb"))
                ):
                    p.unlink()
        for shard in manifest.shards:
            os.replace(staging / shard.file, out / shard.file)
        if self.skipped:
            os.replace(staging / SKIPPED_REPORT, out / SKIPPED_REPORT)
        _fsync(out)
        _atomic_write_text(old_manifest, json.dumps(manifest.to_json(), indent=2) + "\n")


class _ShardWriter:
    """One shard being written: append-only batches, then checksums and metadata, then sync."""

    def __init__(self, staging: Path, index: int, codec: str, serializer: str):
        import lmdb

        self.index, self.codec, self.serializer = index, codec, serializer
        self.name = fmt.shard_name(index)
        self.path = staging / self.name
        self.env = lmdb.open(
            str(self.path),
            subdir=False,
            map_size=_INITIAL_MAP_SIZE,
            lock=False,
            sync=False,
            metasync=False,
            map_async=False,
            max_dbs=0,
        )
        self.count = 0
        self.payload = 0
        self.checksums = bytearray()
        self.batch: list[tuple[bytes, bytes]] = []
        self.batch_bytes = 0

    def add(self, value: bytes) -> None:
        self.checksums += zlib.crc32(value).to_bytes(4, "little")
        self.batch.append((fmt.record_key(self.count), value))
        self.count += 1
        self.payload += len(value)
        self.batch_bytes += len(value)
        if len(self.batch) >= _BATCH_RECORDS or self.batch_bytes >= _BATCH_BYTES:
            self._flush()

    def _flush(self, append: bool = True) -> None:
        _put_batch(self.env, self.batch, self.path, append=append)
        self.batch, self.batch_bytes = [], 0

    def finish(self) -> fmt.ShardInfo:
        self._flush()
        meta = {
            "format": fmt.FORMAT_NAME,
            "format_version": fmt.FORMAT_VERSION,
            "codec": self.codec,
            "serializer": self.serializer,
            "num_records": self.count,
            "shard_index": self.index,
            "checksum": fmt.CHECKSUM_ALGORITHM,
        }
        self.batch = [
            (fmt.CHECKSUMS_KEY, bytes(self.checksums)),
            (fmt.META_KEY, json.dumps(meta, sort_keys=True).encode()),
        ]
        self._flush(append=False)
        self.env.sync(True)
        self.close()
        _fsync(self.path)
        return fmt.ShardInfo(
            self.name, self.count, self.path.stat().st_size, sha256=file_sha256(self.path)
        )

    def close(self) -> None:
        self.env.close()


class _EncodeJob:
    """Encodes one entry to serialized bytes; picklable for worker processes.

    Returns ``(True, bytes)``, or ``(False, reason)`` when skipping; raises a
    :class:`DataListError` naming the source and line otherwise.
    """

    def __init__(
        self,
        source: str,
        codec: str,
        serializer: str,
        data_process_func: Callable[[str], Any] | None,
        skip: bool,
    ):
        self.source = source
        self.codec = codec
        self.serializer = serializer
        self.data_process_func = data_process_func
        self.skip = skip

    def run_chunk(self, entries: list[Entry]) -> list[tuple[bool, bytes]]:
        return [self(entry) for entry in entries]

    def __call__(self, entry: Entry) -> tuple[bool, bytes]:
        try:
            return True, self.encode(entry)
        except DataListError as exc:
            if not self.skip:
                raise
            return False, exc.message.encode()

    def encode(self, entry: Entry) -> bytes:
        if not os.path.isfile(entry.path):
            what = "is a directory" if os.path.isdir(entry.path) else "does not exist"
            raise DataListError(
                self.source,
                entry.line_no,
                f"file {entry.path} {what}; fix the path or remove the line",
            )
        try:
            if self.data_process_func is not None:
                record = self.data_process_func(f"{entry.path} {entry.label}")
            else:
                record = get_codec(self.codec).encode(entry.path, entry.label)
                if entry.extras:
                    add_extras(record, entry.extras)
            return get_serializer(self.serializer).dumps(record)
        except TorchRecordError as exc:
            raise DataListError(self.source, entry.line_no, str(exc)) from None
        except PermissionError as exc:
            raise DataListError(
                self.source, entry.line_no, f"cannot read {entry.path}: {exc.strerror}"
            ) from None
        except Exception as exc:
            kind = type(exc).__name__
            hint = (
                " (not an image Pillow can read)"
                if kind in ("UnidentifiedImageError", "DecompressionBombError")
                else ""
            )
            raise DataListError(
                self.source,
                entry.line_no,
                f"cannot encode {entry.path}{hint}: {kind}: {exc}; fix or remove the line",
            ) from None


def add_extras(record: Any, extras: dict[str, Any]) -> None:
    """Append the extra fields to a record as a JSON proto named ``extras``."""
    try:
        data = json.dumps(extras, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TorchRecordError(f"extra fields must be JSON values: {exc}") from None
    proto = record.protos.add()
    proto.name = EXTRAS_PROTO_NAME
    proto.data_type = 4  # STRING
    proto.byte_data = data.encode()


def record_extras(record: Any) -> dict[str, Any]:
    """The extra fields stored with a record (``{}`` when it has none)."""
    for proto in record.protos[2:]:
        if proto.name == EXTRAS_PROTO_NAME:
            return json.loads(proto.byte_data)
    return {}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _put_batch(env: Any, batch: list[tuple[bytes, bytes]], path: Path, append: bool = True) -> None:
    """Commit one batch in one transaction, growing the map until it fits."""
    import lmdb

    while True:
        try:
            with env.begin(write=True) as txn:
                cursor = txn.cursor()
                for key, value in batch:
                    if not cursor.put(key, value, overwrite=False, append=append):
                        raise TorchRecordError(
                            f"{path}: LMDB refused key {key.hex()} (duplicate or out of order); "
                            "this is a bug, please report it"
                        )
            return
        except lmdb.MapFullError:
            env.set_mapsize(env.info()["map_size"] * 2)
        except lmdb.Error as exc:
            if "No space left" in str(exc) or "ENOSPC" in str(exc) or "Input/output" in str(exc):
                raise TorchRecordError(
                    f"disk full while writing {path}: {exc}. Free space and write again; nothing "
                    "was published."
                ) from exc
            raise


class _Progress:
    """A tqdm bar with images/s, MB/s and the ETA; silent when disabled."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        self.bytes = 0
        self.started = time.perf_counter()
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", desc="writing", dynamic_ncols=True)

    def update(self, images: int, nbytes: int) -> None:
        if self.bar is None:
            return
        self.bytes += nbytes
        self.bar.update(images)
        if self.bar.n % 64 == 0 or self.bar.n == self.bar.total:
            elapsed = max(time.perf_counter() - self.started, 1e-9)
            self.bar.set_postfix_str(f"{self.bytes / elapsed / 1e6:.1f} MB/s", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _progress_bar(total: int, enabled: bool) -> _Progress:
    return _Progress(total, enabled)


def _fsync(path: Path) -> None:
    """fsync a file or a directory (a directory's entry list, after a rename)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)
