"""The Writer: a data list of ``path label`` lines -> a directory of LMDB shards.

Samples are encoded by a codec (optionally in worker processes), serialized, and written in
large append-only transactions into shards under a hidden staging directory. Only when every
shard is complete are they moved into place and the manifest written, so no partial dataset is
ever visible, and a failed write leaves an existing dataset as it was.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import format as fmt
from .codecs.raw_rgb import default_data_process_func
from .datalist import Entry, read_data_list
from .errors import DataListError, DatasetExistsError, TorchRecordError
from .plugins import get_codec, get_serializer

_INITIAL_MAP_SIZE = 256 << 20
_BATCH_RECORDS = 512
_BATCH_BYTES = 64 << 20


class Writer:
    """Pack the samples of a data list into ``db_num`` LMDB shards in ``output_dir``.

    The first five parameters are TorchRecord 0.1's. ``codec`` names how images are stored
    (``raw_rgb`` by default, ``jpeg``, or any plugin's); ``serializer`` how records become bytes
    (``tensorprotos`` by default, or ``msgpack``). A custom ``data_process_func(line)`` returning a
    ``TensorProtos`` replaces the codec, as in 0.1: it receives ``"<path> <label>"`` with the
    path already resolved. ``num_workers`` processes encode in parallel; the output is identical
    for any ``num_workers`` given the same ``seed``.
    """

    def __init__(
        self,
        data_list: str | os.PathLike,
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
    ):
        if int(db_num) < 1:
            raise ValueError(f"db_num must be at least 1, got {db_num}")
        if int(num_workers) < 0:
            raise ValueError(f"num_workers must be 0 or more, got {num_workers}")
        custom = data_process_func not in (None, default_data_process_func)
        if custom and codec is not None:
            raise ValueError(
                "give either a codec or a custom data_process_func, not both: the function "
                "replaces the codec"
            )
        self.data_list = data_list
        self.output_dir = Path(output_dir)
        self.db_num = int(db_num)
        self.shuffle = bool(shuffle)
        self.data_process_func = data_process_func if custom else None
        self.codec_name = fmt.CUSTOM_CODEC if custom else (codec or "raw_rgb")
        self.serializer_name = serializer
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.root = root
        self.overwrite = bool(overwrite)
        self.progress = sys.stderr.isatty() if progress is None else bool(progress)
        # Resolve names now: an unknown codec or serializer fails before any work is done.
        get_serializer(self.serializer_name)
        if not custom:
            get_codec(self.codec_name)

    # -- public ------------------------------------------------------------------------------
    def write(self) -> fmt.Manifest:
        """Write the dataset and return its manifest."""
        started = time.perf_counter()
        entries = read_data_list(self.data_list, root=self.root)
        if self.db_num > len(entries):
            raise ValueError(
                f"db_num={self.db_num} is more than the {len(entries)} samples of "
                f"{self.data_list}; use at most one shard per sample"
            )
        self._check_output_dir()
        order = list(range(len(entries)))
        if self.shuffle:
            random.Random(self.seed).shuffle(order)
        ordered = [entries[i] for i in order]
        bounds = _split_bounds(len(ordered), self.db_num)

        self.output_dir.mkdir(parents=True, exist_ok=True)
        staging = self.output_dir / f".tmp-{uuid.uuid4().hex[:12]}"
        staging.mkdir()
        try:
            shards = self._write_shards(ordered, bounds, staging)
            manifest = fmt.Manifest(
                codec=self.codec_name,
                serializer=self.serializer_name,
                shards=shards,
                extra=self._manifest_extra(len(ordered), time.perf_counter() - started),
            )
            self._publish(staging, manifest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return manifest

    # -- steps ---------------------------------------------------------------------------------
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

    def _write_shards(
        self, entries: list[Entry], bounds: list[tuple[int, int]], staging: Path
    ) -> list[fmt.ShardInfo]:
        import lmdb

        shards: list[fmt.ShardInfo] = []
        encoded = self._encoded(entries)
        bar = _progress_bar(len(entries), self.progress)
        try:
            for shard_index, (start, stop) in enumerate(bounds):
                name = fmt.shard_name(shard_index)
                path = staging / name
                env = lmdb.open(
                    str(path),
                    subdir=False,
                    map_size=_INITIAL_MAP_SIZE,
                    lock=False,
                    sync=False,
                    metasync=False,
                    map_async=False,
                    max_dbs=0,
                )
                checksums = bytearray()
                batch: list[tuple[bytes, bytes]] = []
                batch_bytes = 0
                try:
                    for local in range(stop - start):
                        value = next(encoded)
                        checksums += zlib.crc32(value).to_bytes(4, "little")
                        batch.append((fmt.record_key(local), value))
                        batch_bytes += len(value)
                        if len(batch) >= _BATCH_RECORDS or batch_bytes >= _BATCH_BYTES:
                            _put_batch(env, batch, path)
                            bar.update(len(batch))
                            batch, batch_bytes = [], 0
                    meta = {
                        "format": fmt.FORMAT_NAME,
                        "format_version": fmt.FORMAT_VERSION,
                        "codec": self.codec_name,
                        "serializer": self.serializer_name,
                        "num_records": stop - start,
                        "shard_index": shard_index,
                        "checksum": fmt.CHECKSUM_ALGORITHM,
                    }
                    batch.append((fmt.CHECKSUMS_KEY, bytes(checksums)))
                    batch.append((fmt.META_KEY, json.dumps(meta, sort_keys=True).encode()))
                    _put_batch(env, batch, path, append=False)
                    bar.update(len(batch) - 2)
                    env.sync(True)
                finally:
                    env.close()
                _fsync(path)
                shards.append(fmt.ShardInfo(name, stop - start, path.stat().st_size))
        finally:
            bar.close()
            encoded.close()
        return shards

    def _encoded(self, entries: list[Entry]) -> Iterator[bytes]:
        """Serialized records in order, encoded here or in worker processes.

        Workers get chunks of entries; at most a few chunks per worker are in flight, so memory
        stays bounded however fast the workers are, and a worker that dies raises
        ``BrokenProcessPool`` instead of hanging the write.
        """
        job = _EncodeJob(
            str(self.data_list), self.codec_name, self.serializer_name, self.data_process_func
        )
        if self.num_workers == 0:
            for entry in entries:
                yield job(entry)
            return
        from collections import deque
        from concurrent.futures import ProcessPoolExecutor

        size = max(1, min(32, len(entries) // (self.num_workers * 8) or 1))
        chunks = (entries[i : i + size] for i in range(0, len(entries), size))
        with ProcessPoolExecutor(self.num_workers) as pool:
            pending: deque = deque()
            try:
                for chunk in chunks:
                    pending.append(pool.submit(job.run_chunk, chunk))
                    if len(pending) >= 4 * self.num_workers:
                        yield from pending.popleft().result()
                while pending:
                    yield from pending.popleft().result()
            finally:
                for future in pending:
                    future.cancel()

    def _manifest_extra(self, num_records: int, seconds: float) -> dict[str, Any]:
        from . import __version__

        extra: dict[str, Any] = {
            "created_by": f"torchrecord {__version__}",
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": str(self.data_list),
            "shuffle": self.shuffle,
            "seed": self.seed,
        }
        if self.data_process_func is not None:
            func = self.data_process_func
            extra["data_process_func"] = f"{func.__module__}.{func.__qualname__}"
        return extra

    def _publish(self, staging: Path, manifest: fmt.Manifest) -> None:
        out = self.output_dir
        old_manifest = out / fmt.MANIFEST_NAME
        if self.overwrite:
            # The old dataset stops being a dataset first (its manifest goes), then its files.
            if old_manifest.exists():
                old_manifest.unlink()
                _fsync(out)
            for p in out.iterdir():
                if p.is_file() and (
                    p.name in (fmt.LEGACY_DATA_FILE, "lock.mdb")
                    or (p.name.startswith("shard-") and p.name.endswith(".lmdb"))
                ):
                    p.unlink()
        for shard in manifest.shards:
            os.replace(staging / shard.file, out / shard.file)
        _fsync(out)
        _atomic_write_text(old_manifest, json.dumps(manifest.to_json(), indent=2) + "\n")


class _EncodeJob:
    """Encodes one data-list entry to serialized bytes; picklable for worker processes."""

    def __init__(
        self,
        data_list: str,
        codec: str,
        serializer: str,
        data_process_func: Callable[[str], Any] | None,
    ):
        self.data_list = data_list
        self.codec = codec
        self.serializer = serializer
        self.data_process_func = data_process_func

    def run_chunk(self, entries: list[Entry]) -> list[bytes]:
        return [self(entry) for entry in entries]

    def __call__(self, entry: Entry) -> bytes:
        if not os.path.isfile(entry.path):
            what = "is a directory" if os.path.isdir(entry.path) else "does not exist"
            raise DataListError(
                self.data_list,
                entry.line_no,
                f"file {entry.path} {what}; fix the path or remove the line",
            )
        try:
            if self.data_process_func is not None:
                record = self.data_process_func(f"{entry.path} {entry.label}")
            else:
                record = get_codec(self.codec).encode(entry.path, entry.label)
            return get_serializer(self.serializer).dumps(record)
        except TorchRecordError as exc:
            raise DataListError(self.data_list, entry.line_no, str(exc)) from None
        except PermissionError as exc:
            raise DataListError(
                self.data_list, entry.line_no, f"cannot read {entry.path}: {exc.strerror}"
            ) from None
        except Exception as exc:
            kind = type(exc).__name__
            hint = (
                " (not an image Pillow can read)"
                if kind in ("UnidentifiedImageError", "DecompressionBombError")
                else ""
            )
            raise DataListError(
                self.data_list,
                entry.line_no,
                f"cannot encode {entry.path}{hint}: {kind}: {exc}; fix or remove the line",
            ) from None


def _split_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal parts (the first ``n % parts`` one longer), as 0.1 split."""
    size, extra = divmod(n, parts)
    bounds, start = [], 0
    for i in range(parts):
        stop = start + size + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


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
                            f"{path}: LMDB refused key {key.hex()} (duplicate "
                            "or out of order); this is a bug, please report it"
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


def _progress_bar(total: int, enabled: bool) -> Any:
    if enabled:
        from tqdm import tqdm

        return tqdm(total=total, unit="img", desc="writing", dynamic_ncols=True)

    class _Silent:
        def update(self, n: int) -> None:
            pass

        def close(self) -> None:
            pass

    return _Silent()


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
