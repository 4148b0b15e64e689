"""The Writer: samples (a data list, an ImageFolder directory or an iterable) -> LMDB shards.

Samples are encoded by a codec (optionally in worker processes), serialized, and written in
large append-only transactions into shards under a hidden staging directory. Only when every
shard is complete are they moved into place and the manifest written, so no partial dataset is
ever visible, and a failed write leaves an existing dataset as it was.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import re
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from decimal import Decimal
from json.encoder import encode_basestring_ascii as _quoted
from pathlib import Path
from typing import Any

from . import format as fmt
from .checksum import crc32
from .clib import let_heap_keep_large_blocks
from .clib import libc as _libc
from .codecs.raw_rgb import default_data_process_func, libjpeg_chosen, libjpeg_on, set_libjpeg
from .datalist import (
    ITERABLE_NAME,
    Entry,
    _name_order,
    index_labels,
    missing_file,
    read_data_list,
    read_image_folder,
    read_iterable,
    same_extra_fields,
)
from .environments import exit_with_parent
from .errors import (
    DataListError,
    DatasetError,
    DatasetExistsError,
    DiskFullError,
    PluginError,
    TorchRecordError,
)
from .plugins import adopt, carried, fast_method, get_codec, get_serializer
from .readahead import SourceReadahead

_INITIAL_MAP_SIZE = 256 << 20
_BATCH_RECORDS = 512
# (at most 16 MB: with the records and their pages, what the heap keeps between batches; see
# clib.let_heap_keep_large_blocks)
_BATCH_BYTES = 16 << 20
# records over glibc's first limit for blocks of their own: a write of them has its process keep
# large blocks in its heap (clib.let_heap_keep_large_blocks); one of smaller records (JPEGs)
# leaves the process as it was
_LARGE_RECORD = 128 << 10
# writes of at least this many images load torchvision for raw_rgb's JPEG decode (see
# Writer._libjpeg_pays_off)
LIBJPEG_MIN_IMAGES = 10_000
EXTRAS_PROTO_NAME = "extras"  # the third proto of a record with extra fields (JSON)
SKIPPED_REPORT = "skipped.tsv"
STAGING_PREFIX = ".tmp-"
_STAGING_NAME = re.compile(re.escape(STAGING_PREFIX) + "[0-9a-f]{16}")
_SKIPPED_HEADER = "line\tpath\treason\tdata_list"
_OLD_SKIPPED_HEADER = "line\tpath\treason"  # (before the data list was named: appends mixed)
_REASONS_SHOWN = 5  # skip reasons quoted when every sample was skipped
DONE_SUFFIX = ".done"


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
    the output is identical for any ``num_workers`` given the same ``seed``. One process writes
    each shard: with ``db_num`` > 1 (or ``records_per_shard``, when nothing is skipped) the
    workers write whole shards themselves, which for raw pixels is much faster than one shard.
    ``on_error="skip"``
    writes every sample that cannot be encoded, with its reason, to ``skipped.tsv`` next to the
    dataset (and counts them in the manifest) instead of stopping.
    """

    def __init__(
        self,
        data_list: str | os.PathLike | Iterable[Any],
        output_dir: str | os.PathLike,
        db_num: int = 1,
        shuffle: bool = True,  # (0.1's default)
        data_process_func: Callable[[str], Any] | None = None,
        *,
        codec: str | None = None,
        serializer: str | None = None,
        num_workers: int = 0,
        seed: int = 0,
        root: str | os.PathLike | None = None,
        overwrite: bool = False,
        progress: bool | None = None,
        records_per_shard: int | None = None,
        bytes_per_shard: int | None = None,
        on_error: str = "raise",
        append: bool = False,
        shard_range: tuple[int, int] | None = None,
        max_size: int | None = None,
        quality: int | None = None,
        raw_below: int | None = None,
        format_version: int = fmt.FORMAT_VERSION,
        readahead: bool = True,
        allow_duplicates: bool = False,
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
        asked_quality = quality  # (before an append fills in the dataset's)
        # appending: what is not given is the dataset's (codec, serializer, image policy)
        base = _base_settings(Path(output_dir)) if append and not custom else {}
        if base and max_size is None and raw_below is None:
            policy = base.get("image_policy") or {}
            max_size, raw_below = policy.get("max_size"), policy.get("raw_below")
            quality = policy.get("quality") if quality is None else quality
        if base.get("codec") != fmt.CUSTOM_CODEC:  # (a function's records: give the function)
            codec = codec or base.get("codec")
        serializer = serializer or base.get("serializer") or "tensorprotos"
        self.data_list = data_list
        for what, value in (("output_dir", output_dir), ("data_list", data_list), ("root", root)):
            if isinstance(value, str | bytes) and not value.strip():
                raise ValueError(
                    f'{what} is empty (an unset variable?); name the path, "." for the '
                    "current directory"
                )
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
        self.append = bool(append)
        self.shard_range = (
            None if shard_range is None else (int(shard_range[0]), int(shard_range[1]))
        )
        if self.shard_range is not None:
            if (
                self.append
                or bytes_per_shard is not None
                or (int(db_num) == 1 and records_per_shard is None)
            ):
                raise ValueError(
                    "shard_range needs a plan known before encoding: db_num > 1 or "
                    "records_per_shard, and no append or bytes_per_shard"
                )
            if on_error != "raise":
                raise ValueError(
                    "shard_range writes need on_error='raise': a shard whose samples were all "
                    "skipped would shift the numbering of the joined dataset"
                )
            if not 0 <= self.shard_range[0] < self.shard_range[1]:
                raise ValueError(f"shard_range {shard_range} is empty or negative")
        if self.append and self.overwrite:
            raise ValueError("append=True adds shards to a dataset; overwrite=True replaces it")
        if allow_duplicates and not self.append:
            raise ValueError(
                "allow_duplicates=True (--allow-duplicates) is for appends: pass append=True "
                "(--append) too"
            )
        if format_version not in (1, 2):
            raise ValueError(
                f"format_version must be 1 (readable by TorchRecord 0.2.0) or 2, got "
                f"{format_version!r}"
            )
        self.format_version = int(format_version)
        self.readahead = bool(readahead)  # source files read ahead when they are on disk
        # an append of the very samples the dataset holds from a write or append: refused
        # unless this is set (see _inputs_digest)
        self.allow_duplicates = bool(allow_duplicates)
        self._lock_fd: int | None = None  # the staging lock's descriptor, while write() runs
        self.progress = sys.stderr.isatty() if progress is None else bool(progress)
        self.skipped: list[tuple[Entry, str]] = []
        self.already_written = False  # set by write(): this very write had completed here
        # set by write(): the shards it wrote (an append's new ones only), and of those the
        # ones an interrupted run of the same write had finished, which it kept
        self.new_shards: list[fmt.ShardInfo] = []
        self.kept_shards: list[fmt.ShardInfo] = []
        self._label_names: list[str] | None = None
        # Resolve names now: an unknown codec or serializer fails before any work is done.
        get_serializer(self.serializer_name)
        self.image_policy: dict[str, Any] = {}
        if max_size is not None:
            self.image_policy["max_size"] = int(max_size)
            if self.image_policy["max_size"] < 1:
                raise ValueError(f"max_size must be at least 1, got {max_size}")
        if raw_below is not None or self.codec_name == "smart":
            from .codecs.smart import DEFAULT_RAW_BELOW

            self.image_policy["raw_below"] = int(
                DEFAULT_RAW_BELOW if raw_below is None else raw_below
            )
        quality = DEFAULT_QUALITY if quality is None else quality
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"quality must be between 1 and 100 (JPEG quality), got {quality}")
        codec = None if custom else get_codec(self.codec_name)
        if self.image_policy and self.codec_name != "raw_rgb":
            # a codec of a plugin that takes no quality gets none, unless it was asked for
            # (then _check_options refuses it by name)
            if asked_quality is not None or codec is None or _takes_option(codec, "quality"):
                self.image_policy["quality"] = int(quality)
        if asked_quality is not None and "quality" not in self.image_policy:
            raise ValueError(
                f"quality={asked_quality} would not be used: it is the JPEG quality of images "
                "re-encoded because of max_size (jpeg codec) or stored as JPEG by the smart "
                "codec; give max_size too, or leave quality out"
            )
        if codec is not None:
            _check_options(codec, self.image_policy)
        elif self.image_policy:
            raise ValueError(
                "max_size, quality and raw_below need a codec, not a custom data_process_func"
            )
        if custom and self.num_workers:
            import pickle

            try:  # the workers receive it pickled
                pickle.dumps(self.data_process_func)
            except Exception as exc:
                raise ValueError(
                    f"num_workers={self.num_workers} needs a data_process_func that can be "
                    f"pickled ({type(exc).__name__}: {exc}): define it at module level, not as "
                    "a lambda or nested function, or use num_workers=0"
                ) from None

    # -- public ------------------------------------------------------------------------------
    def write(self) -> fmt.Manifest:
        """Write the dataset and return its manifest."""
        started = time.perf_counter()
        self.skipped = []
        self.already_written = False
        self.new_shards, self.kept_shards = [], []
        entries, source, label_names = self._entries()
        self._label_names = label_names
        if self.db_num > len(entries):
            raise ValueError(
                f"db_num={self.db_num} is more than the {len(entries)} samples of "
                f"{source}; use at most one shard per sample"
            )
        if self.data_process_func is not None and any(e.extras for e in entries):
            raise ValueError(
                "extra fields need a codec; a custom data_process_func stores its own records"
            )
        entries = same_extra_fields(entries, source, self.on_error == "skip")
        order = list(range(len(entries)))
        if self.shuffle:
            random.Random(self.seed).shuffle(order)
        ordered = [entries[i] for i in order]
        # whose digest as a set the manifest keeps (a part's: the whole write's, so that its
        # parts agree); taken once the write is known not to be done already
        self._all_samples = (ordered, label_names)
        part = None
        if self.shard_range is not None:
            plan = self._plan(len(ordered))
            first, stop = self.shard_range
            if stop > len(plan):
                raise ValueError(
                    f"shard_range {self.shard_range} goes past the {len(plan)} shards of this write"
                )
            part = {
                "first_shard": first,
                "stop_shard": stop,
                "total_shards": len(plan),
                # the same on every machine, wherever it keeps the images (paths are taken
                # relative to the folder they all share)
                "plan": self._job_id(ordered, 0, strip=_common_folder_length(ordered)),
                "inputs": len(ordered),
                "settings": dict(zip(_JOB_PARAM_NAMES, self._job_params(0))),
            }
            offset = plan[first][0]
            ordered = ordered[offset : plan[stop - 1][1]]
            self.part_splits = {start - offset for start, _ in plan[first + 1 : stop]}

        finished = self._already_written(ordered, part["first_shard"] if part else 0, clean=False)
        if finished is not None:
            self.already_written = True
            try:  # (staging is removed only under the lock: a write may be starting there)
                with _OutputLock(self.output_dir):
                    _remove_stale_staging(self.output_dir, keep=None, finished=_leave_finished)
            except (DatasetExistsError, OSError):
                pass  # another write is running there: its staging is its own
            return finished
        self._check_output_dir()  # refused before anything is created
        with _made_dir(self.output_dir), _OutputLock(self.output_dir):
            # again, now that no other write can publish here meanwhile
            finished = self._already_written(ordered, part["first_shard"] if part else 0)
            if finished is not None:
                self.already_written = True
                return finished
            return self._write_locked(started, entries, ordered, source, label_names, part)

    def _write_locked(
        self,
        started: float,
        entries: list[Entry],
        ordered: list[Entry],
        source: str,
        label_names: list[str] | None,
        part: dict[str, Any] | None,
    ) -> fmt.Manifest:
        """The write, holding the output directory's lock."""
        base = self._check_output_dir()
        append_id = None
        inputs = _inputs_digest(*self._all_samples)
        if base is not None:
            append_id, other_append = self._job_and_other_mode(ordered, -1)
            done_appends = base.extra.get("appended_jobs", [])
            if other_append in done_appends and self.on_error == "raise":
                raise DatasetExistsError(
                    f"{self.output_dir} holds this very append already, made with "
                    "on_error='skip' (the samples it skipped, if any, are listed in "
                    f"{self.output_dir / SKIPPED_REPORT}); appending it again would add its "
                    "samples twice"
                )
            if append_id in done_appends or other_append in done_appends:
                # (this very append completed already, killed before it exited; or with
                # on_error='raise', which skipped nothing: what this skipping one would add)
                _remove_stale_staging(self.output_dir, keep=None, finished=_leave_finished)
                self.already_written = True
                return base
            written = base.extra.get("input_digests", [])
            if inputs in written and not self.allow_duplicates:
                # (a dataset written before the digests were kept lacks its first write's)
                first_kept = len(written) == base.extra.get("appended", 0) + 1
                which = "its first write" if first_kept and written[0] == inputs else "an append"
                samples = sum(1 for e in ordered if e.error is None)
                bad = len(ordered) - samples
                lines = (
                    ""
                    if not bad
                    else " (and 1 line that is not a sample)"
                    if bad == 1
                    else f" (and {bad} lines that are not samples)"
                )
                # (allow_duplicates is not part of a job's identity: such an append, cut short,
                # is staged where this one would be)
                _, key, _ = self._job_ids(
                    ordered, part["first_shard"] if part is not None else len(base.shards)
                )
                staged = self.output_dir / f"{STAGING_PREFIX}{key[:16]}"
                unfinished = (
                    f". An append of these very samples with the same settings was cut short "
                    f"and is staged in {staged}: if it was made with allow_duplicates=True "
                    "(--allow-duplicates), finish it by running it again with that; otherwise "
                    "remove that directory"
                    if staged.is_dir()
                    else ""
                )
                raise DatasetExistsError(
                    f"{self.output_dir} holds these {samples} samples{lines} already, from "
                    f"{which} (the same paths, labels and extra fields, in whatever order or "
                    "shards): appending them again would store every one of them twice. To "
                    "add them anyway (to weight them twice in training, say), pass "
                    f"allow_duplicates=True (--allow-duplicates){unfinished}"
                )
            ordered, label_names = _merge_label_names(base, ordered, label_names, source)
            fields = sorted({k for e in ordered if e.extras and e.error is None for k in e.extras})
            if fields != base.extra.get("extra_fields", []):
                raise ValueError(
                    f"cannot append {source}: its samples have the extra fields {fields}, the "
                    f"dataset's have {base.extra.get('extra_fields', [])}; the loader batches "
                    "them, so every sample needs the same"
                )
            self.format_version = base.format_version  # new shards are laid out like the old

        first_index = len(base.shards) if base is not None else 0
        if part is not None:
            first_index = part["first_shard"]
        job, key, other_job = self._job_ids(ordered, first_index)
        staging = self.output_dir / f"{STAGING_PREFIX}{key[:16]}"
        described = {
            "settings": self._job_settings(first_index),
            "data_list": source,
            "samples": len(ordered),
        }

        def discard(other: Path, finished: list[Path]) -> bool:
            if self.overwrite:
                return True
            raise DatasetExistsError(
                _unfinished_write_message(other, finished, described, not self.append)
            )

        for legacy_job in (job, other_job):
            _adopt_legacy_staging(self.output_dir, legacy_job, staging)
        _remove_stale_staging(self.output_dir, keep=staging, finished=discard)
        staging.mkdir(exist_ok=True)
        with _StagingLock(staging) as lock:
            self._lock_fd = lock.fd
            if not (staging / _STAGING_JOB).exists():  # what a later, other write names
                try:
                    _atomic_write_text(staging / _STAGING_JOB, json.dumps(described, default=str))
                except OSError:
                    pass  # (a description only: a full disk is reported by the shards)
            try:
                if self.on_error == "raise":
                    self._recheck_skipped(staging, ordered, source)
                shards = None
                plan = self._parallel_plan(len(ordered))
                if plan is not None:
                    shards = self._write_planned_shards(ordered, source, staging, first_index, plan)
                if shards is None:  # one process writes (or a planned shard came out empty)
                    # (after the parallel attempt, only what an earlier run left counts as kept)
                    earlier = None if plan is None else {s.file for s in self.kept_shards}
                    resumed = _resumable_shards(
                        staging, self.output_dir, first_index, self.on_error == "skip"
                    )
                    shards = self._write_shards(ordered, source, staging, first_index, resumed)
                    if earlier is not None:
                        self.kept_shards = [s for s in self.kept_shards if s.file in earlier]
            except OSError as exc:
                _raise_if_no_room(exc, staging)
                raise
            except DataListError as exc:
                # a bad line: the shards finished before it stay, as after Ctrl-C, so that the
                # same write resumes once the file is fixed (a changed data list is another
                # write, which removes them)
                indices = _done_indices(staging)
                if not indices or exc.line_no is None:
                    shutil.rmtree(staging, ignore_errors=True)
                    raise
                kept = len(indices)
                prefix = next(i for i in range(kept + 1) if first_index + i not in indices)
                skipping = _skipping_shards(staging)  # (a skipping run's, being rechecked)
                if self.on_error == "skip" or part is not None or skipping:
                    # (it skips already; a part writes with on_error='raise' only; a skipping
                    # run's shards are there: that route was taken)
                    skip_route = ""
                elif not self._skip_route_resumes(key, first_index, base):
                    skip_route = (
                        ", or run it again with on_error='skip', which is another write here "
                        "(string labels are indexed without the samples it skips), so it "
                        "refuses to start until that directory is deleted"
                    )
                elif prefix == kept:
                    skip_route = (
                        ", or run it again with on_error='skip', which resumes from them too "
                        "and skips the bad samples"
                    )
                elif prefix:
                    skip_route = (
                        ", or run it again with on_error='skip', which skips the bad samples "
                        f"and resumes from at least the first {prefix} of them (in one process "
                        "the shards after the first unfinished one are written again)"
                    )
                else:
                    skip_route = (
                        ", or run it again with on_error='skip', which skips the bad samples "
                        "and may write them again (in one process it resumes only from the "
                        "shards before the first unfinished one, and that is the first)"
                    )
                raise DataListError(
                    exc.data_list,
                    exc.line_no,
                    f"{exc.message.rstrip('.')}. The {kept} shard(s) finished so far are "
                    "kept in "
                    f"{staging}: fix the file and run the same write again to resume from "
                    + (
                        f"them ({skipping} of them skipped samples and are written again "
                        "once those encode; "
                        if skipping
                        else "them ("
                    )
                    + "they are kept by the paths and labels they hold: if you changed "
                    f"other images too, delete that directory first){skip_route}. Leaving the "
                    "sample out of the input makes another write, which refuses to start "
                    "until that directory is deleted"
                    + ("" if self.append else " or overwrite=True (--overwrite) is passed"),
                ) from None
            except ValueError:
                # bad options: nothing of this write can be used, leave nothing behind
                shutil.rmtree(staging, ignore_errors=True)
                raise
            if not shards:
                shutil.rmtree(staging, ignore_errors=True)  # bad input: leave nothing behind
                shown = "; ".join(
                    f"line {e.line_no}: {reason}" for e, reason in self.skipped[:_REASONS_SHOWN]
                )
                more = len(self.skipped) - _REASONS_SHOWN
                raise DataListError(
                    source,
                    None,
                    f"every one of the {len(entries)} samples was skipped, so no dataset was "
                    f"written: {shown}" + (f"; and {more} more" if more > 0 else ""),
                )
            self.new_shards = list(shards)
            if part is None and 1 < len(shards) + 1 <= self.db_num:
                warnings.warn(
                    f"{source}: {self.db_num - len(shards)} of the db_num={self.db_num} shards "
                    f"came out empty (every sample of theirs was skipped, see {SKIPPED_REPORT}), "
                    f"so this write made {len(shards)} shards; give a loader record_num="
                    f"{len(shards)} or none",
                    stacklevel=3,
                )
            if label_names is not None and base is None and part is None:
                _warn_empty_classes(label_names, ordered, self.skipped, source)
            extra = self._manifest_extra(source, label_names, ordered)
            extra["write_seconds"] = round(time.perf_counter() - started, 3)
            extra["job"] = job
            extra["job_skipped"] = len(self.skipped)  # (this write's own, kept through appends)
            extra["input_digests"] = [inputs]
            if part is not None:
                extra["part"] = part
            if base is not None:
                extra = {
                    **base.extra,
                    **extra,
                    "skipped": base.extra.get("skipped", 0) + extra["skipped"],
                    "appended": base.extra.get("appended", 0) + 1,
                    "appended_jobs": [*base.extra.get("appended_jobs", []), append_id],
                    # (a dataset from before they were kept names its appends' only)
                    "input_digests": [*base.extra.get("input_digests", []), inputs],
                }
                # still the first write's: run again (a script that writes, then appends), it
                # finds itself written (and the append finds itself in appended_jobs)
                extra.pop("job")
                if base.extra.get("job"):
                    extra["job"] = base.extra["job"]
                    first_skipped = base.extra.get(
                        "job_skipped",
                        None if base.extra.get("appended") else base.extra.get("skipped"),
                    )
                    extra.pop("job_skipped", None)
                    if first_skipped is not None:
                        extra["job_skipped"] = first_skipped
                if base.extra.get("skipped_report") or extra.get("skipped_report"):
                    extra["skipped_report"] = SKIPPED_REPORT
                new_files = {shard.file for shard in shards}
                shards = [*base.shards, *shards]
            manifest = fmt.Manifest(
                self.codec_name,
                self.serializer_name,
                shards,
                format_version=self.format_version,
                extra=extra,
            )
            try:
                self._publish(
                    staging,
                    manifest,
                    {shard.file for shard in shards} if base is None else new_files,
                )
            except OSError as exc:
                _raise_if_no_room(exc, staging)
                raise
        shutil.rmtree(staging, ignore_errors=True)
        return manifest

    def _already_written(
        self, entries: list[Entry], first_index: int, clean: bool = True
    ) -> fmt.Manifest | None:
        """The manifest, if this very write already completed here (killed before it exited);
        with ``clean`` (under the output directory's lock), abandoned staging is removed."""
        path = self.output_dir / fmt.MANIFEST_NAME
        if self.append or self.overwrite or not path.exists():
            return None
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        job, other_job = self._job_and_other_mode(entries, first_index)
        if doc.get("job") == other_job:
            # a write that raised and completed skipped nothing: it holds what this skipping
            # one would write; one that skipped samples is not what this raising one asks for
            # (the first write's own count: an append's skips are not its own)
            skipped = doc.get("job_skipped", None if doc.get("appended") else doc.get("skipped"))
            if self.on_error == "raise" and skipped is None:
                return None  # (unknown: "already holds a dataset", as for another write)
            if self.on_error == "raise" and skipped:
                raise DatasetExistsError(
                    f"{self.output_dir} holds this very write made with on_error='skip', which "
                    f"skipped {skipped} sample(s) (listed in {self.output_dir / SKIPPED_REPORT}); "
                    "this one raises on bad samples. "
                    + (
                        "It was appended to since: to write them too, write the whole dataset "
                        "again with them fixed into another directory"
                        if doc.get("appended")
                        else "To write them too, fix them and pass overwrite=True (--overwrite)"
                    )
                )
        elif doc.get("job") != job:
            return None
        if "part" not in doc:
            manifest = fmt.read_manifest(self.output_dir)
        else:  # a part is not readable as a dataset; describe it from its manifest
            shards = [fmt.ShardInfo.from_entry(s) for s in doc["shards"]]
            manifest = fmt.Manifest(
                doc["codec"],
                doc["serializer"],
                shards,
                format_version=doc["format_version"],
                extra={"job": doc["job"], "part": doc["part"]},
            )
        if clean:
            _remove_stale_staging(self.output_dir, keep=None, finished=_leave_finished)
        return manifest

    def _job_id(self, entries: list[Entry], first_index: int, strip: int = 0) -> str:
        """What makes two runs the same write (in the manifest: a rerun of a completed write
        is recognised). ``strip``: leave out the first characters of every path (their common
        folder)."""
        return _digests([self._job_params(first_index)], entries, strip)[0]

    def _job_and_other_mode(self, entries: list[Entry], first_index: int) -> tuple[str, str]:
        """The job id, and that of the same write with the other ``on_error``, in one pass."""
        params = self._job_params(first_index)
        job, other_job = _digests([params, _with_other_on_error(params)], entries)
        return job, other_job

    def _job_ids(self, entries: list[Entry], first_index: int) -> tuple[str, str, str]:
        """The job id, the key of the staging directory, and the job id with the other
        ``on_error`` (an earlier version named staging by it), in one pass over the entries.

        The key leaves out ``on_error``: the shards a write finished before a bad line hold no
        skipped sample, so a rerun that skips bad lines resumes from them (a rerun that raises
        keeps only finished shards that skipped nothing, see :func:`_done_shards`)."""
        params = self._job_params(first_index)
        key_params = [
            None if name == "on_error" else value for name, value in zip(_JOB_PARAM_NAMES, params)
        ]
        job, key, other_job = _digests([params, key_params, _with_other_on_error(params)], entries)
        return job, key, other_job

    def _skip_route_resumes(self, key: str, first_index: int, base: Any) -> bool:
        """Whether this write with on_error='skip' would find this one's staging: not when
        string labels are named after the samples it skips are left out (a missing file's
        class may have no other sample), which makes it another write."""
        saved = (self.on_error, self._label_names)
        try:
            self.on_error = "skip"
            entries, source, names = self._entries()
            self._label_names = names
            entries = same_extra_fields(entries, source, True)
            order = list(range(len(entries)))
            if self.shuffle:
                random.Random(self.seed).shuffle(order)
            ordered = [entries[i] for i in order]
            if base is not None:
                ordered, _ = _merge_label_names(base, ordered, names, source)
            return self._job_ids(ordered, first_index)[1] == key
        except Exception:  # (for a message only: when in doubt, not promised)
            return False
        finally:
            self.on_error, self._label_names = saved

    def _recheck_skipped(self, staging: Path, ordered: list[Entry], source: str) -> None:
        """A write that raises on bad samples, resuming one that skipped them: encode the
        samples the finished shards skipped first, so that one still bad stops the write (naming
        it) before any finished shard is discarded; once they all encode, the shards that
        skipped them are written again (see :func:`_done_shards`)."""
        rows = [row for done in _done_files(staging).values() for row in done.get("skipped") or []]
        if not rows:
            return
        position = {(e.line_no, e.path): i for i, e in enumerate(ordered)}
        found = sorted(position[key] for key in {(r[0], r[1]) for r in rows} if key in position)
        job = self._encode_job(source, len(found))
        for i in found:
            job.encode(ordered[i])  # (raises DataListError naming the sample)

    def _job_settings(self, first_index: int) -> dict[str, Any]:
        return dict(zip(_JOB_PARAM_NAMES, self._job_params(first_index)))

    def _job_params(self, first_index: int) -> list[Any]:  # (named in _JOB_PARAM_NAMES)
        """The settings that make two runs the same write (with the entries: :meth:`_job_id`)."""
        custom = self.data_process_func is not None
        return [
            self.format_version,
            self.codec_name if custom else _versioned_name("codec", self.codec_name),
            _versioned_name("serializer", self.serializer_name),
            self.db_num,
            self.records_per_shard,
            self.bytes_per_shard,
            self.shuffle,
            self.seed,
            self.on_error,
            first_index,
            _func_name(self.data_process_func),
            self.image_policy,
            self._label_names,  # (the entries hold indices: renamed classes are another write)
        ]

    # -- steps ---------------------------------------------------------------------------------
    def _entries(self) -> tuple[list[Entry], str, list[str] | None]:
        source, skip = self.data_list, self.on_error == "skip"
        if isinstance(source, (str, os.PathLike)):
            if Path(source).is_dir():
                entries, classes = read_image_folder(source, exclude=self.output_dir)
                return entries, str(source), classes
            entries = read_data_list(source, root=self.root, skip=skip)
            name = str(source)
        else:
            entries = read_iterable(source, root=self.root, skip=skip)
            name = ITERABLE_NAME
        if self.data_process_func is not None:
            return entries, name, None  # 0.1: the function reads the label itself
        entries, label_names = index_labels(entries, name, skip=skip)
        return entries, name, label_names

    def _check_output_dir(self) -> fmt.Manifest | None:
        """Refuse to write over a dataset unless asked; the dataset to append to, if any."""
        out = self.output_dir
        if not out.exists():
            if self.append:
                raise DatasetExistsError(
                    f"append=True (--append) but {out} holds no dataset to append to"
                )
            return None
        if not out.is_dir():
            raise DatasetExistsError(f"{out} exists and is not a directory")
        has_dataset = (out / fmt.MANIFEST_NAME).exists() or (out / fmt.LEGACY_DATA_FILE).exists()
        if self.append:
            if not (out / fmt.MANIFEST_NAME).exists():
                raise DatasetExistsError(
                    f"append=True (--append) but {out} holds no dataset to append to"
                )
            base = fmt.read_manifest(out)
            if base.codec == fmt.CUSTOM_CODEC and self.codec_name != fmt.CUSTOM_CODEC:
                func = base.extra.get("data_process_func")
                raise ValueError(
                    f"{out} was written with a data_process_func ({func}); append with a "
                    "data_process_func too"
                )
            if (base.codec, base.serializer) != (self.codec_name, self.serializer_name):
                raise ValueError(
                    f"{out} was written with codec {base.codec!r} and serializer "
                    f"{base.serializer!r}; append with the same ones"
                )
            self._check_plugin_versions(out, base)
            _refuse_foreign_files(out, _listed_files(out / fmt.MANIFEST_NAME))
            _refuse_unlisted_shards(out, _listed_files(out / fmt.MANIFEST_NAME))
            if (base.extra.get("image_policy") or None) != (self.image_policy or None):
                raise ValueError(
                    f"{out} was written with the image policy "
                    f"{base.extra.get('image_policy') or 'none (images as they are)'} and this "
                    f"append asks for {self.image_policy or 'none'}; append with the same "
                    "max_size, quality and raw_below"
                )
            return base
        if has_dataset and not self.overwrite:
            other = self._other_layout(out)
            raise DatasetExistsError(
                f"{out} already holds a dataset; refusing to write over it. Choose another "
                "output_dir, pass overwrite=True (--overwrite) to replace it, or append=True "
                "(--append) to add to it."
                if other is None
                else f"{out} already holds a dataset, which was written with {other}; "
                "refusing to write over it. Choose another output_dir, or pass overwrite=True "
                "(--overwrite) to replace it."
            )
        manifest = out / fmt.MANIFEST_NAME
        _refuse_foreign_files(out, _listed_files(manifest) if manifest.exists() else set())
        return None

    def _check_plugin_versions(self, out: Path, base: fmt.Manifest) -> None:
        """Appended records must have the layout of the dataset's: the same format version
        of its codec and serializer."""
        other = self._plugin_version_difference(out, base)
        if other is not None:
            raise ValueError(
                f"{out} was written with {other}: its records would have two layouts. Append "
                "with the plugin version that wrote the dataset, or write a new dataset"
            )

    def _plugin_version_difference(self, out: Path, base: fmt.Manifest) -> str | None:
        """How the format versions of the dataset's codec or serializer differ from this
        write's, if they do (same names only)."""
        from .plugins import describe_provider, written_format_version

        kinds = [("serializer", self.serializer_name, base.serializer)]
        if self.data_process_func is None:
            kinds.append(("codec", self.codec_name, base.codec))
        for kind, name, written_name in kinds:
            if name != written_name:
                continue
            obj = get_serializer(name) if kind == "serializer" else get_codec(name)
            have = getattr(obj, "format_version", 1)
            written = written_format_version(base.extra, kind, out)
            if have != written:
                return (
                    f"{kind} {name!r} format version {written}, and the {kind} here "
                    f"({describe_provider(kind, name)}) writes version {have}"
                )
        return None

    def _other_layout(self, out: Path) -> str | None:
        """For the refusal to write over a dataset: a difference of plugin format versions
        that would make an append fail too (None if there is none, or no manifest to say)."""
        try:
            return self._plugin_version_difference(out, fmt.read_manifest(out))
        except (DatasetError, OSError, ValueError):
            return None

    def _plan(self, n: int) -> list[tuple[int, int]]:
        """Input positions ``[start, stop)`` of every shard, for ``shard_range`` writes."""
        if self.records_per_shard:
            size = self.records_per_shard
            return [(i, min(i + size, n)) for i in range(0, n, size)]
        starts = [0, *sorted(self._rollover_positions(n)), n]
        return list(zip(starts[:-1], starts[1:]))

    def _rollover_positions(self, n: int) -> set[int]:
        """Input positions that start a new shard in ``db_num`` mode (0.1's equal split)."""
        size, extra = divmod(n, self.db_num)
        starts, start = set(), 0
        for i in range(self.db_num):
            starts.add(start)
            start += size + (1 if i < extra else 0)
        return starts - {0}

    def _write_shards(
        self,
        entries: list[Entry],
        source: str,
        staging: Path,
        first_index: int,
        resumed: list[_DoneShard],
    ) -> list[fmt.ShardInfo]:
        by_count = self.records_per_shard
        if self.shard_range is not None:  # a part: the plan's boundaries, by input position
            splits, by_count = self.part_splits, None
        else:
            splits = self._rollover_positions(len(entries)) if self.db_num > 1 else set()
        shards = [done.info for done in resumed]
        self.kept_shards = list(shards)
        start = resumed[-1].input_end if resumed else 0
        for done in resumed:
            self.skipped += [
                (Entry(line, path, "", ""), reason) for line, path, reason in done.skipped
            ]
        pending_skips: list[tuple[Entry, str]] = []
        pending: list[Any] = []  # futures of finished shards' ShardInfo (hashing)
        shard: _ShardWriter | None = None
        encoded = self._encoded(entries[start:], source)
        bar = _Progress(len(entries), self.progress)
        bar.update(start, 0)
        from concurrent.futures import ThreadPoolExecutor

        hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torchrecord-hash")

        def full(shard: _ShardWriter, position: int) -> bool:
            """Whether the sample at ``position`` goes into the next shard."""
            return (
                position in splits
                or bool(by_count and shard.count >= by_count)
                or bool(self.bytes_per_shard and shard.payload >= self.bytes_per_shard)
            )

        position = start - 1
        try:
            for position, (entry, ok, value, crc) in enumerate(encoded, start=start):
                if shard is not None and full(shard, position):
                    pending.append(shard.finish(position, pending_skips, hasher))
                    shard, pending_skips = None, []
                bar.update(1, len(value) if ok else 0)
                if not ok:
                    self.skipped.append((entry, value.decode()))
                    pending_skips.append((entry, value.decode()))
                    continue
                if shard is None:
                    shard = _ShardWriter(
                        staging,
                        first_index + len(shards) + len(pending),
                        self.codec_name,
                        self.serializer_name,
                        self.format_version,
                    )
                if len(value) > _LARGE_RECORD:  # (once per process; cached)
                    let_heap_keep_large_blocks()
                shard.add(value, crc)
            if shard is not None:
                pending.append(shard.finish(len(entries), pending_skips, hasher))
                shard = None
            shards += [future.result() for future in pending]
        except DataListError:
            # a bad first sample of the next shard: the shard before it is complete, so it is
            # finished (and kept for the resume) as when a worker writes it
            if shard is not None and full(shard, position + 1):
                pending.append(shard.finish(position + 1, pending_skips, hasher))
                shard = None
            raise
        finally:
            if shard is not None:
                shard.close()
            hasher.shutdown(wait=True)
            bar.close()
            encoded.close()
        return shards

    def _encode_job(self, source: str, num_images: int) -> _EncodeJob:
        return _EncodeJob(
            source,
            self.codec_name,
            self.serializer_name,
            self.data_process_func,
            self.on_error == "skip",
            self.image_policy,
            libjpeg=self._libjpeg_pays_off(num_images),
            readahead=self.readahead,
        )

    def _libjpeg_pays_off(self, num_images: int) -> bool | None:
        """Whether ``raw_rgb`` (also inside ``smart`` and 0.1's ``default_data_process_func``)
        should decode RGB JPEGs with libjpeg-turbo through torchvision (the same pixels as
        Pillow's, about 0.5 ms an image sooner here): when the write is large enough to repay
        loading torchvision (about 5 s here) in every process that loads it.

        That is this process alone when it encodes, or when its workers are forked (they
        inherit what it loaded), and nothing at all when torchvision is loaded already; workers
        started by spawn or forkserver load it each. A choice made with ``use_libjpeg`` holds.
        None for a write that decodes nothing with ``raw_rgb``: the process is left as it is."""
        import multiprocessing

        decodes = (
            self.data_process_func is default_data_process_func
            if self.data_process_func is not None
            else self.codec_name in ("raw_rgb", "smart")
        )
        if not decodes:
            return None
        chosen = libjpeg_chosen()
        if chosen is not None:
            return chosen
        if self.num_workers == 0 or multiprocessing.get_start_method() == "fork":
            return "torchvision" in sys.modules or num_images >= LIBJPEG_MIN_IMAGES
        return num_images >= LIBJPEG_MIN_IMAGES * self.num_workers

    def _parallel_plan(self, n: int) -> list[tuple[int, int]] | None:
        """The input ranges of the shards, when they are known before encoding and there are
        enough workers to write several shards at once; None otherwise.

        Shard boundaries are input positions with ``db_num`` and ``shard_range`` (skipped
        samples only make a shard smaller), and with ``records_per_shard`` when nothing can be
        skipped. ``bytes_per_shard`` depends on what was encoded: one process writes."""
        if self.num_workers < 2:
            return None
        if self.shard_range is not None:
            splits = self.part_splits
        elif self.db_num > 1:
            splits = self._rollover_positions(n)
        elif self.records_per_shard and self.on_error == "raise":
            splits = set(range(self.records_per_shard, n, self.records_per_shard))
        else:
            return None
        starts = [0, *sorted(p for p in splits if 0 < p < n), n]
        plan = list(zip(starts[:-1], starts[1:]))
        return plan if len(plan) > 1 else None

    def _write_planned_shards(
        self,
        entries: list[Entry],
        source: str,
        staging: Path,
        first_index: int,
        plan: list[tuple[int, int]],
    ) -> list[fmt.ShardInfo] | None:
        """Write every shard of ``plan`` in a worker process (encode, write, seal, hash), then
        make it durable here: nothing crosses a process boundary but file names, hashes and
        counters.

        Shards finished by an interrupted run of the same write are kept. Returns None when a
        planned shard came out empty (every one of its samples skipped): the shards after it
        would be numbered one too high, so the caller continues in one process from there,
        which gives the same result as a write that never ran in parallel.
        """
        import multiprocessing
        from concurrent.futures import (
            FIRST_COMPLETED,
            CancelledError,
            Future,
            ProcessPoolExecutor,
            ThreadPoolExecutor,
            wait,
        )

        done = _done_shards(staging, self.output_dir, first_index, self.on_error == "skip")
        # per planned shard: its ShardInfo (or the future of it, while it is being synced
        # here), None if it came out empty; and the samples it skipped
        results: dict[int, tuple[Any, list[tuple[Entry, str]]]] = {}
        for k, (_, stop) in enumerate(plan):
            kept = done.get(first_index + k)
            if kept is not None and kept.input_end == stop:
                skips = [(Entry(line, path, "", ""), why) for line, path, why in kept.skipped]
                results[k] = (kept.info, skips)
        self.kept_shards = [results[k][0] for k in sorted(results)]
        keep = {fmt.shard_name(first_index + k) for k in results}
        for p in staging.iterdir():  # unfinished shards, and finished ones that do not fit
            if p.name.startswith("shard-") and p.name.removesuffix(DONE_SUFFIX) not in keep:
                p.unlink()
        job = self._encode_job(source, len(entries))
        todo = [k for k in range(len(plan)) if k not in results]
        bar = _Progress(len(entries), self.progress)
        bar.update(sum(plan[k][1] - plan[k][0] for k in results), 0)
        ctx = multiprocessing.get_context()
        # shared without locks, so that a worker killed at any moment cannot leave one held:
        # shards after `stop_after` stop at their next sample; per shard, samples and bytes
        # done so far (each slot has one writer)
        stop_after = ctx.RawValue("q", len(plan))
        counts = ctx.RawArray("q", 2 * len(plan))
        errors: dict[int, DataListError] = {}
        # workers seal and hash their shards; this process, idle otherwise, makes them
        # durable, so no worker waits for the disk
        syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torchrecord-sync")
        try:
            with ProcessPoolExecutor(
                max(1, min(self.num_workers, len(todo))),
                mp_context=ctx,
                initializer=_init_worker,
                initargs=(*_inheritance(ctx, self._lock_fd), (stop_after, counts)),
            ) as pool:
                futures = {
                    pool.submit(
                        _write_planned_shard,
                        job,
                        staging,
                        (first_index + k, k),
                        entries[plan[k][0] : plan[k][1]],
                        plan[k][1],
                        (self.codec_name, self.serializer_name, self.format_version),
                    ): k
                    for k in todo
                }
                try:
                    pending, seen = set(futures), (0, 0)
                    while pending:
                        finished, pending = wait(pending, 0.25, return_when=FIRST_COMPLETED)
                        now = (sum(counts[0::2]), sum(counts[1::2]))
                        bar.update(now[0] - seen[0], now[1] - seen[1])
                        seen = now
                        for future in finished:
                            k = futures[future]
                            try:
                                sealed, skips = future.result()
                                if sealed is not None:
                                    sealed = syncer.submit(_mark_done, *sealed)
                                results[k] = (sealed, skips)
                            except (_Cancelled, CancelledError):
                                pass
                            except DataListError as exc:
                                # bad input: the shards before this one go on, so the error
                                # reported is the first bad sample in input order, as when one
                                # process writes; the shards after it stop
                                errors[k] = exc
                                stop_after.value = min(stop_after.value, k)
                                for other, j in futures.items():
                                    if j > k:
                                        other.cancel()
                except BaseException:
                    stop_after.value = -1  # every running shard stops at its next sample
                    for future in futures:
                        future.cancel()
                    raise
            if errors:
                raise errors[min(errors)]
            for k, (info, skips) in results.items():
                if isinstance(info, Future):
                    results[k] = (info.result(), skips)
        finally:
            syncer.shutdown(wait=True)  # shards sealed before a failure are still marked done
            bar.close()
        shards = []
        for k in range(len(plan)):
            info, skips = results[k]
            self.skipped += skips
            if info is None:
                self.skipped = []  # the caller's run in one process counts them again
                return None
            shards.append(info)
        return shards

    def _encoded(
        self, entries: list[Entry], source: str
    ) -> Iterator[tuple[Entry, bool, bytes, int]]:
        """``(entry, ok, bytes or reason)`` in order, encoded here or in worker processes.

        Workers get chunks of entries; at most a few chunks per worker are in flight, so memory
        stays bounded however fast the workers are, and a worker that dies raises
        ``BrokenProcessPool`` instead of hanging the write.
        """
        job = self._encode_job(source, len(entries))
        ahead = SourceReadahead([entry.path for entry in entries], enabled=job.readahead)
        try:
            if self.num_workers == 0:
                ahead.start()
                for entry in entries:
                    ahead.advance()
                    yield (entry, *job(entry))
                return
            yield from self._encoded_by_workers(entries, job, ahead)
        finally:
            ahead.close()

    records_handed_over = 0  # by encode workers through shared memory, in the last write

    def _encoded_by_workers(
        self, entries: list[Entry], job: _EncodeJob, ahead: SourceReadahead
    ) -> Iterator[tuple[Entry, bool, bytes, int]]:
        from collections import deque
        from concurrent.futures import ProcessPoolExecutor

        size = max(1, min(32, len(entries) // (self.num_workers * 8) or 1))
        chunks = (entries[i : i + size] for i in range(0, len(entries), size))
        import multiprocessing

        ctx = multiprocessing.get_context()
        in_flight = 4 * self.num_workers  # chunks given to workers and not drained yet
        # Each chunk in flight has a slot of shared memory (an anonymous mapping the workers
        # inherit when they are forked), into which its worker puts the records that fit; only
        # their places cross the pool's pipe. Sent through the pipe alone, 908 MB of raw pixels
        # took about 2 s of CPU time (pickling, the pipe's copies in and out, the worker's and
        # this process's wake-ups for every 64 KB); with the slots, a 2-worker write of them
        # into one shard took about 1 s of CPU time less in all (benchmarks/writer_ab.py). A
        # record that does not fit, a worker not forked, or a process that cannot map the
        # slots (a limit on its address space), uses the pipe.
        slots = None
        slot_bytes = min(_SLOT_BYTES, _HANDOVER_BYTES // in_flight)
        if _HANDOVER_IN_SHARED_MEMORY and ctx.get_start_method() == "fork":
            import mmap

            try:
                slots = mmap.mmap(-1, in_flight * slot_bytes)
            except OSError:  # no room for it (a limit on address space, strict overcommit)
                slots = None
        free = list(range(in_flight))
        self.records_handed_over = 0
        try:
            with ProcessPoolExecutor(
                self.num_workers,
                mp_context=ctx,
                initializer=_init_worker,
                initargs=(*_inheritance(ctx, self._lock_fd), None, slots),
            ) as pool:
                pending: deque = deque()

                def drain() -> Iterator[tuple[Entry, bool, bytes, int]]:
                    chunk, future, slot = pending.popleft()
                    results, error = future.result()
                    for entry, (ok, value, crc) in zip(chunk, results):
                        if isinstance(value, tuple):  # (start, length) in the chunk's slot
                            start = slot * slot_bytes + value[0]
                            value = slots[start : start + value[1]]  # (a copy: bytes)
                            self.records_handed_over += 1
                        yield (entry, ok, value, crc)
                    free.append(slot)  # every record of it copied out
                    if error is not None:
                        raise error

                try:
                    for chunk in chunks:
                        slot = free.pop()
                        if slots is None:
                            future = pool.submit(job.run_chunk, chunk)
                        else:
                            future = pool.submit(job.run_chunk_into, chunk, slot, slot_bytes)
                        pending.append((chunk, future, slot))
                        # started once the pool has forked its workers (at the first submit),
                        # so that no worker inherits the helper's pipe; it reads ahead of what
                        # the workers were given (up to 4 chunks a worker are in flight)
                        ahead.start()
                        ahead.advance(len(chunk))
                        if len(pending) >= in_flight:
                            yield from drain()
                    while pending:
                        yield from drain()
                finally:
                    for _, future, _ in pending:
                        future.cancel()
        finally:
            if slots is not None:
                slots.close()

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
        if self.image_policy:
            extra["image_policy"] = self.image_policy
        if label_names is not None:
            extra["label_names"] = label_names
        fields = sorted({key for e in entries if e.extras for key in e.extras})
        if fields:
            extra["extra_fields"] = fields
        from .plugins import provider

        # who provides the codec and the serializer: what to install to read the dataset
        extra["plugins"] = {"serializer": provider("serializer", self.serializer_name)}
        if self.data_process_func is not None:
            func = self.data_process_func
            extra["data_process_func"] = f"{func.__module__}.{func.__qualname__}"
        else:
            extra["plugins"]["codec"] = provider("codec", self.codec_name)
        return extra

    def _publish(self, staging: Path, manifest: fmt.Manifest, new_files: set[str]) -> None:
        out = self.output_dir
        old_manifest = out / fmt.MANIFEST_NAME
        old_report = out / SKIPPED_REPORT
        listed = self.append and SKIPPED_REPORT in _listed_files(old_manifest)
        if self.skipped or (listed and _is_old_report(old_report)):
            previous = []
            if listed and old_report.exists():
                try:
                    base = json.loads(old_manifest.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    base = {}
                # (an old report's rows name no data list: the dataset's, unless appended to)
                known = "" if base.get("appended") else str(base.get("source", ""))
                previous = _report_rows(old_report, known)
            source = str(manifest.extra.get("source", ""))
            lines = [_SKIPPED_HEADER, *previous] + [
                "\t".join(_report_field(v) for v in (e.line_no, e.path, reason, source))
                for e, reason in self.skipped
            ]
            (staging / SKIPPED_REPORT).write_text("\n".join(lines) + "\n", encoding="utf-8")
        # Everything that needs new space is written before anything old is removed: on a full
        # disk the publish fails here, with the old dataset intact.
        staged_manifest = staging / fmt.MANIFEST_NAME
        _write_synced(staged_manifest, json.dumps(manifest.to_json(), indent=2) + "\n")
        old_files: set[str] = set()
        if self.overwrite and old_manifest.exists():
            old_files = _listed_files(old_manifest)
            # The old dataset stops being a dataset first (its manifest goes), then its files.
            old_manifest.unlink()
            _fsync(out)
        if not self.append:
            # an old dataset's files, or leftovers of a killed publish; never a file of yours
            legacy = (out / fmt.LEGACY_DATA_FILE).is_file()  # (refused without overwrite)
            for p in out.iterdir():
                if p.name in new_files or not p.is_file():
                    continue
                if (
                    p.name in old_files
                    or (legacy and p.name in (fmt.LEGACY_DATA_FILE, "lock.mdb"))
                    or _written_here(p)
                ):
                    p.unlink()
        for name in sorted(new_files):
            if (staging / name).exists():  # else moved already by a publish that was killed
                os.replace(staging / name, out / name)
        if (staging / SKIPPED_REPORT).exists():  # (new rows, or an old report's new column)
            os.replace(staging / SKIPPED_REPORT, out / SKIPPED_REPORT)
        _fsync(out)
        os.replace(staged_manifest, old_manifest)
        _fsync(out)


_JOB_PARAM_NAMES = (
    "format_version",
    "codec",
    "serializer",
    "db_num",
    "records_per_shard",
    "bytes_per_shard",
    "shuffle",
    "seed",
    "on_error",
    "first_index",
    "data_process_func",
    "image_policy",
    "label_names",
)


def _versioned_name(kind: str, name: str) -> str:
    """A codec's or serializer's name, with its format version when that is not 1: a write
    with another layout of records is another write (and writes of version 1 keep the job ids
    they had before plugins had versions, so that they still resume)."""
    obj = get_codec(name) if kind == "codec" else get_serializer(name)
    version = getattr(obj, "format_version", 1)
    return name if version == 1 else f"{name}@{version}"


def _with_other_on_error(params: list[Any]) -> list[Any]:
    """Job parameters with the other ``on_error`` ("raise" for "skip" and the other way)."""
    other = list(params)
    at = _JOB_PARAM_NAMES.index("on_error")
    other[at] = "raise" if params[at] == "skip" else "skip"
    return other


def _entry_text(e: Entry, strip: int = 0) -> str:
    """An entry as the job digests see it: its path (without the first ``strip`` characters),
    label and extra fields, as the JSON list ``json.dumps`` writes."""
    path = e.path[strip:] if strip else e.path
    if e.extras is None and isinstance(e.label, str):
        # what json.dumps writes for this list, about 4 times sooner (6 s a million)
        return f"[{_quoted(path)}, {_quoted(e.label)}, null]"
    return json.dumps([path, e.label, e.extras], sort_keys=True)


def _digests(param_lists: list[list[Any]], entries: list[Entry], strip: int = 0) -> list[str]:
    """SHA-256 of each parameter list followed by the entries (paths without their first
    ``strip`` characters, labels, extra fields), the entries encoded once for all of them."""
    digests = [hashlib.sha256(json.dumps(params).encode()) for params in param_lists]
    chunk: list[str] = []

    def feed() -> None:
        data = "".join(chunk).encode()
        for digest in digests:
            digest.update(data)

    for e in entries:
        chunk.append(_entry_text(e, strip))
        if len(chunk) >= 4096:
            feed()
            chunk = []
    feed()
    return [digest.hexdigest() for digest in digests]


def _inputs_digest(entries: list[Entry], label_names: list[str] | None) -> str:
    """SHA-256 of the samples as a set: their paths, labels (by name, where labels are
    names) and extra fields in sorted order, whatever the order and the settings they are
    written in (another shuffle, other shards, another codec). The manifest keeps one per write
    and append (``input_digests``), and an append of samples that one of them names is refused
    (``allow_duplicates``): about 0.5 s a million samples here."""
    if label_names is not None:  # (the entries hold each list's own index of the name)
        entries = [
            e if e.error is not None else e.relabeled(label_names[int(e.label)]) for e in entries
        ]
    texts = sorted(_entry_text(e) for e in entries)
    digest = hashlib.sha256()
    for start in range(0, len(texts), 4096):
        digest.update("\n".join(texts[start : start + 4096]).encode() + b"\n")
    return digest.hexdigest()


def _common_folder_length(entries: list[Entry]) -> int:
    """The length of the deepest folder all entries' paths are in (with its separator)."""
    if not entries:
        return 0
    paths = [e.path for e in entries]
    common = os.path.commonprefix([min(paths), max(paths)])  # (every path's common prefix)
    return common.rfind(os.sep) + 1


def _plan_difference(docs: list[tuple[Path, dict[str, Any]]]) -> str:
    """What makes two parts come from different writes, as far as their manifests say."""
    path_a, part_a = docs[0][0], docs[0][1]["part"]
    path_b, part_b = next((p, d["part"]) for p, d in docs if d["part"]["plan"] != part_a["plan"])
    for path, part in ((path_a, part_a), (path_b, part_b)):
        if "inputs" not in part:
            return (
                f"{path} was written by an older TorchRecord, whose parts name their samples "
                "by their full paths: write it again with this version"
            )
    if part_a.get("inputs") != part_b.get("inputs"):
        return (
            f"{path_a} was written from {part_a.get('inputs')} samples and {path_b} from "
            f"{part_b.get('inputs')}: give every machine the same data list"
        )
    settings_a, settings_b = part_a.get("settings", {}), part_b.get("settings", {})
    for key in _JOB_PARAM_NAMES:
        if settings_a.get(key) != settings_b.get(key):
            return (
                f"{path_a} was written with {key}={settings_a.get(key)!r} and {path_b} with "
                f"{key}={settings_b.get(key)!r}: write every part with the same settings"
            )
    return (
        f"{path_a} and {path_b} were written from other samples (the same number of them, but "
        "other file names below their common folder, labels or order): give every machine the "
        "same data list"
    )


def join_parts(
    output_dir: str | os.PathLike,
    parts: list[str | os.PathLike],
    overwrite: bool = False,
    check_hashes: bool = True,
) -> fmt.Manifest:
    """Join the parts written with ``shard_range`` (on one machine or many) into one dataset.

    The parts must come from the same write (the same input and settings, wherever each
    machine keeps the images) and together cover every shard once. Every part's shards are
    checked first (size, and with ``check_hashes`` the SHA-256 its manifest recorded: parts
    copied between machines are where damage happens), and nothing is moved if one is
    damaged. Their shard files are then moved into ``output_dir`` (copied when on another file
    system) and the manifest is written last.
    """
    out = Path(output_dir)
    docs = []
    for part in parts:
        path = Path(part) / fmt.MANIFEST_NAME
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataListError(str(part), None, f"not a written part ({exc})") from None
        if "part" not in doc:
            raise DataListError(str(part), None, "is a whole dataset, not a shard_range part")
        docs.append((Path(part), doc))
    docs.sort(key=lambda item: item[1]["part"]["first_shard"])
    _check_part_plugin_versions(docs)  # (first: such parts also have different plans)
    plans = {doc["part"]["plan"] for _, doc in docs}
    if len(plans) != 1:
        raise ValueError(f"the parts come from different writes: {_plan_difference(docs)}")
    expected, previous = 0, None
    for part, doc in docs:
        first, stop = doc["part"]["first_shard"], doc["part"]["stop_shard"]
        if first < expected:
            raise ValueError(
                f"{part} holds shards {first}..{stop - 1} and {previous} holds shards up to "
                f"{expected - 1}: the parts overlap (or one was given twice); give each shard "
                "range once"
            )
        if first > expected:
            raise ValueError(
                f"shards {expected}..{first - 1} are missing before {part}: write them with "
                f"--shard-range {expected}:{first} (shard_range=({expected}, {first}))"
            )
        expected, previous = stop, part
    total = docs[0][1]["part"]["total_shards"]
    if expected != total:
        raise ValueError(
            f"shards {expected}..{total - 1} are missing: write them with "
            f"--shard-range {expected}:{total} (shard_range=({expected}, {total}))"
        )
    if (out / fmt.MANIFEST_NAME).exists() and not overwrite:
        raise DatasetExistsError(
            f"{out} already holds a dataset; pass --overwrite (overwrite=True) to replace it"
        )
    with _made_dir(out), _OutputLock(out):
        _check_part_shards(out, docs, check_hashes)
        return _join_locked(out, docs)


@contextlib.contextmanager
def _made_dir(path: Path) -> Iterator[None]:
    """Make ``path`` (and its parents); if what runs inside fails, remove it again when it was
    made here and nothing is in it (a directory with shards to resume from stays)."""
    made = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        if made:
            try:
                path.rmdir()
            except OSError:
                pass
        raise


def _check_part_shards(
    out: Path, docs: list[tuple[Path, dict[str, Any]]], check_hashes: bool
) -> None:
    """Refuse to join (before anything moves) when a part's shard is missing, or its size or
    SHA-256 is not what the part's manifest recorded. A shard an interrupted join moved
    already is checked where it is now: in ``out``, while ``out`` holds no dataset (a join
    removes the old manifest before it moves anything; a shard of a dataset still in ``out``
    is that dataset's, not the part's)."""
    moved_ok = not (out / fmt.MANIFEST_NAME).exists()
    for part, doc in docs:
        for item in doc["shards"]:
            path = part / item["file"]
            if moved_ok and not path.exists() and (out / item["file"]).exists():
                path = out / item["file"]
            if not path.is_file():
                raise DatasetError(
                    f"{part / item['file']} is missing; write the part again with the same "
                    "command (its shard_range), or copy the shard from where it was written"
                )
            size = path.stat().st_size
            problem = None
            if size != item["bytes"]:
                problem = f"is {size} bytes but the part's manifest recorded {item['bytes']}"
            elif check_hashes and item.get("sha256") and file_sha256(path) != item["sha256"]:
                problem = "does not match the SHA-256 the part's manifest recorded"
            if problem is not None:
                raise DatasetError(
                    f"{path} {problem}: it was damaged (or cut short) after it was written, "
                    "so nothing was joined; copy it again from where it was written, or write "
                    "the part again with the same command"
                )


def _check_part_plugin_versions(docs: list[tuple[Path, dict[str, Any]]]) -> None:
    """The parts of one dataset must have one record layout: each written with the same
    format version of the codec and of the serializer."""
    from .plugins import written_format_version

    for kind in ("codec", "serializer"):
        versions = {part: written_format_version(doc, kind, part) for part, doc in docs}
        if len(set(versions.values())) > 1:
            listed = ", ".join(f"{part}: {version}" for part, version in versions.items())
            raise ValueError(
                f"the parts were written with different format versions of their {kind} "
                f"({listed}): their records have different layouts. Write the parts of the "
                "older version again with the newer plugin"
            )


def _join_locked(out: Path, docs: list[tuple[Path, dict[str, Any]]]) -> fmt.Manifest:
    old_files: set[str] = set()
    if (out / fmt.MANIFEST_NAME).exists():
        old_files = _listed_files(out / fmt.MANIFEST_NAME)
    # a shard an interrupted join was copying (from another file system) is completed below
    copying = {
        item["file"]
        for part, doc in docs
        for item in doc["shards"]
        if (part / item["file"]).exists()
        and (out / item["file"]).exists()
        and (out / item["file"]).stat().st_size < (part / item["file"]).stat().st_size
    }
    _refuse_foreign_files(out, old_files | copying)
    if old_files:  # the old dataset stops being one before any of its files is replaced
        (out / fmt.MANIFEST_NAME).unlink()
        _fsync(out)
    wanted = {item["file"] for _, doc in docs for item in doc["shards"]}
    for p in out.iterdir():  # files of a dataset that was there before; never a file of yours
        if p.is_file() and p.name not in wanted and (p.name in old_files or _written_here(p)):
            p.unlink()
    shards, skipped_lines = [], []
    for part, doc in docs:
        for item in doc["shards"]:
            source, target = part / item["file"], out / item["file"]
            if source.resolve() == target.resolve():
                pass
            elif (
                not source.exists()
                and target.exists()
                and (item.get("sha256") is None or file_sha256(target) == item["sha256"])
            ):
                pass  # moved by an earlier join that was interrupted
            else:
                try:
                    os.replace(source, target)
                except OSError:  # another file system: copy, then sync
                    shutil.copy2(source, target)
                    _fsync(target)
            shards.append(fmt.ShardInfo.from_entry(item))
        report = part / SKIPPED_REPORT
        if report.exists():
            skipped_lines += _report_rows(report, str(doc.get("source", "")))
    first = docs[0][1]
    known = {
        "format",
        "format_version",
        "codec",
        "serializer",
        "num_records",
        "checksum",
        "shards",
        "part",
        "job",
        "job_skipped",
        "skipped",
        "skipped_report",
    }
    extra = {k: v for k, v in first.items() if k not in known}
    if any(doc.get("input_digests") != first.get("input_digests") for _, doc in docs):
        # (parts written where the images lie under other paths): no digest of the whole
        extra.pop("input_digests", None)
    extra["skipped"] = sum(doc.get("skipped", 0) for _, doc in docs)
    extra["joined_parts"] = len(docs)
    if skipped_lines:
        extra["skipped_report"] = SKIPPED_REPORT
        (out / SKIPPED_REPORT).write_text(
            _SKIPPED_HEADER + "\n" + "\n".join(skipped_lines) + "\n", encoding="utf-8"
        )
    _fsync(out)
    manifest = fmt.Manifest(
        first["codec"],
        first["serializer"],
        shards,
        format_version=first.get("format_version", 1),
        extra=extra,
    )
    _atomic_write_text(out / fmt.MANIFEST_NAME, json.dumps(manifest.to_json(), indent=2) + "\n")
    for part, _ in docs:  # the parts are used up: they must not be joined twice
        if part.resolve() != out.resolve():
            (part / fmt.MANIFEST_NAME).unlink(missing_ok=True)
    return manifest


class _ShardWriter:
    """One shard being written: append-only batches, then checksums and metadata, then sync."""

    def __init__(self, staging: Path, index: int, codec: str, serializer: str, version: int):
        import lmdb

        self.index, self.codec, self.serializer, self.version = index, codec, serializer, version
        self.name = fmt.shard_name(index)
        self.path = staging / self.name
        try:  # creating the file writes its two meta pages: the disk may be full already
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
        except lmdb.Error as exc:
            raise _write_failure(self.path, exc) from exc
        self.page_size = self.env.stat()["psize"]
        self.count = 0
        self.keys = 0
        self.payload = 0
        self.checksums = bytearray()
        self.batch: list[tuple[bytes, bytes]] = []
        self.batch_bytes = 0

    def add(self, value: bytes, crc: int) -> None:
        self.checksums += crc.to_bytes(4, "little")
        if self.version >= 2:
            parts = fmt.split_record(value, self.page_size)
            for part, piece in enumerate(parts):
                self.batch.append((fmt.record_key(self.count, 2, part), piece))
            self.keys += len(parts)
        else:
            self.batch.append((fmt.record_key(self.count, 1), value))
            self.keys += 1
        self.count += 1
        self.payload += len(value)
        self.batch_bytes += len(value)
        if len(self.batch) >= _BATCH_RECORDS or self.batch_bytes >= _BATCH_BYTES:
            self._flush()

    def _flush(self, append: bool = True) -> None:
        _put_batch(self.env, self.batch, self.path, append=append)
        self.batch, self.batch_bytes = [], 0

    def seal(self) -> None:
        """Write the metadata keys, commit, close. The data is in the page cache: see
        :func:`_mark_done` for making it durable."""
        meta = {
            "format": fmt.FORMAT_NAME,
            "format_version": self.version,
            "codec": self.codec,
            "serializer": self.serializer,
            "num_records": self.count,
            "shard_index": self.index,
            "checksum": fmt.CHECKSUM_ALGORITHM,
        }
        if self.version >= 2:
            meta["num_keys"] = self.keys  # record parts, without the two metadata keys
        # which records it holds, for the manifest (fmt.ShardInfo.records_crc32)
        self.records_crc32 = crc32(self.checksums)
        # the two metadata keys sort after every record key: they go into the last batch, and
        # that batch's transaction leaves no copied-on-write pages behind
        self.batch += [
            (fmt.CHECKSUMS_KEY, bytes(self.checksums)),
            (fmt.META_KEY, json.dumps(meta, sort_keys=True).encode()),
        ]
        self._flush()
        self.close()

    def finish(self, input_end: int, skipped: list[tuple[Entry, str]], hasher: Any) -> Any:
        """Complete the shard; a future of its ShardInfo, recorded as done (for resume) with
        the input it covered once it is on disk and its hash is known. The fsync and the hash
        overlap with writing the next shard (both release the GIL)."""
        self.seal()
        return hasher.submit(
            _mark_done,
            self.path,
            self.count,
            self.records_crc32,
            input_end,
            _skip_rows(skipped),
        )

    def close(self) -> None:
        self.env.close()


_applied_pixel_limit: list[int | None] = [None]  # the process that set Pillow's limit from a job


class _EncodeJob:
    """Encodes one entry to serialized bytes; picklable for worker processes.

    Returns ``(True, bytes, crc)``, or ``(False, reason, 0)`` when skipping; raises a
    :class:`DataListError` naming the source and line otherwise.
    """

    def __init__(
        self,
        source: str,
        codec: str,
        serializer: str,
        data_process_func: Callable[[str], Any] | None,
        skip: bool,
        options: dict[str, Any] | None = None,
        libjpeg: bool | None = None,
        readahead: bool = True,
    ):
        self.options = dict(options or {})
        self.readahead = readahead  # (changes how fast, never what: not part of the job id)
        self.source = source
        self.codec = codec
        self.serializer = serializer
        self.data_process_func = data_process_func
        self.skip = skip
        self.libjpeg = libjpeg
        if libjpeg is not None:  # (None: the job decodes nothing with raw_rgb)
            set_libjpeg(libjpeg)  # loaded here, once: forked workers inherit it
        from PIL import Image

        # the writing process's decompression-bomb limit, for spawned workers too
        self.max_image_pixels = Image.MAX_IMAGE_PIXELS

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # a codec or serializer registered at run time goes along (spawned workers)
        state["_carried"] = carried((("codec", self.codec), ("serializer", self.serializer)))
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        adopt(state.pop("_carried", []))
        self.__dict__.update(state)

    def run_chunk(
        self, entries: list[Entry]
    ) -> tuple[list[tuple[bool, bytes, int]], DataListError | None]:
        """The results of a chunk of entries, up to the first bad one, and its error (the
        samples before it still go into their shard: a complete one is kept)."""
        results = []
        for entry in entries:
            try:
                results.append(self(entry))
            except DataListError as exc:
                return results, exc
        return results, None

    def run_chunk_into(
        self, entries: list[Entry], slot: int, slot_bytes: int
    ) -> tuple[list[tuple[bool, bytes | tuple[int, int], int]], DataListError | None]:
        """As :meth:`run_chunk`, with the records put into slot ``slot`` (of ``slot_bytes``) of
        the shared memory this worker inherited (:data:`_SLOTS`) where they fit: such a
        record's result has ``(start, length)`` in the slot in place of its bytes."""
        results: list[tuple[bool, bytes | tuple[int, int], int]] = []
        error = None
        with memoryview(_SLOTS)[slot * slot_bytes : (slot + 1) * slot_bytes] as view:
            position = 0
            for entry in entries:
                try:
                    ok, value, crc = self(entry)
                except DataListError as exc:
                    error = exc
                    break
                end = position + len(value)
                if ok and end <= slot_bytes:
                    view[position:end] = value
                    results.append((True, (position, len(value)), crc))
                    position = end
                else:
                    results.append((ok, value, crc))
        return results, error

    def __call__(self, entry: Entry) -> tuple[bool, bytes, int]:
        """``(True, bytes, CRC-32)``, computed here: in a worker, not in the writing process."""
        if self.libjpeg is not None and libjpeg_on() is not self.libjpeg:  # spawned: at first
            set_libjpeg(self.libjpeg)
        if _applied_pixel_limit[0] != os.getpid():  # in each worker, the first time
            from PIL import Image

            Image.MAX_IMAGE_PIXELS = self.max_image_pixels
            _applied_pixel_limit[0] = os.getpid()
        try:
            value = self.encode(entry)
            return True, value, crc32(value)
        except DataListError as exc:
            if not self.skip:
                raise
            return False, exc.message.encode(), 0

    def encode(self, entry: Entry) -> bytes:
        if entry.error is not None:  # a bad line
            raise DataListError(self.source, entry.line_no, entry.error)
        if self.data_process_func is not None:  # (it need not fail on a missing file)
            self._raise_if_missing(entry)
        try:
            return self._encode(entry)
        except DataListError:
            # a file that is not there says so, whatever the codec made of it (looked up only
            # when encoding failed: a stat per file was 5% of a jpeg write)
            self._raise_if_missing(entry)
            raise

    def _raise_if_missing(self, entry: Entry) -> None:
        missing = missing_file(entry.path)
        if missing is not None:
            raise DataListError(self.source, entry.line_no, missing) from None

    def _encode(self, entry: Entry) -> bytes:
        serializer = get_serializer(self.serializer)  # (a missing plugin is no bad line)
        codec = None if self.data_process_func is not None else get_codec(self.codec)
        try:
            if codec is None:
                record = self.data_process_func(f"{entry.path} {entry.label}")
                return _serialized(serializer, serializer.dumps(record))
            label = _label_value(entry.label)
            encode_parts = fast_method(codec, "encode", "encode_parts")
            parts = encode_parts and encode_parts(entry.path, label, **self.options)
            dumps_parts = parts and fast_method(serializer, "dumps", "dumps_parts")
            if parts is None:
                record = codec.encode(entry.path, label, **self.options)
            elif dumps_parts:  # the image copied once, straight into the record's bytes
                more = None
                if entry.extras:
                    from .serializers.tensorprotos import TensorProtos

                    more = TensorProtos()
                    add_extras(more, entry.extras)
                return _serialized(serializer, dumps_parts(parts, more))
            else:
                record = parts.record()
            if entry.extras:
                add_extras(record, entry.extras)
            return _serialized(serializer, serializer.dumps(record))
        except PluginError:  # a plugin's fault, not the line's: never skipped
            raise
        except TorchRecordError as exc:
            raise DataListError(self.source, entry.line_no, str(exc)) from None
        except PermissionError as exc:
            raise DataListError(
                self.source, entry.line_no, f"cannot read {entry.path}: {exc.strerror}"
            ) from None
        except Exception as exc:
            kind = type(exc).__name__
            hint = " (not an image Pillow can read)" if kind == "UnidentifiedImageError" else ""
            raise DataListError(
                self.source,
                entry.line_no,
                f"cannot encode {entry.path}{hint}: {kind}: {exc}; fix or remove the line",
            ) from None


def _label_value(label: str) -> int | str:
    """A data list's label as codecs get it: the integer it writes (``"07"`` and ``"+3"`` are
    7 and 3), or the text as it is if it is none (the codec says what is wrong with it)."""
    try:
        return int(label)
    except (TypeError, ValueError):
        return label


def _serialized(serializer: Any, value: Any) -> bytes:
    """What a serializer's ``dumps`` gave, if it is bytes; a :class:`PluginError` naming the
    serializer and its package otherwise (a plugin's bug, not a bad line)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    from .plugins import describe_provider

    raise PluginError(
        f"serializer {serializer.name!r} ({describe_provider('serializer', serializer.name)}) "
        f"returned {type(value).__name__}, not bytes, from dumps(); its package needs fixing"
    )


class _DoneShard:
    """A shard finished by an earlier run of the same write."""

    def __init__(self, info: fmt.ShardInfo, input_end: int, skipped: list[list[Any]]):
        self.info, self.input_end, self.skipped = info, input_end, skipped


def _done_shards(
    staging: Path, out: Path, first_index: int, skips_allowed: bool
) -> dict[int, _DoneShard]:
    """The shards an interrupted run of this write finished (by shard index), each checked
    against the size and SHA-256 it recorded when it was done. Without ``skips_allowed`` (a
    write that raises on bad lines, resuming one that skipped them) a shard that skipped a
    sample is not one of them: written again, it raises on that sample."""
    kept: dict[int, _DoneShard] = {}
    for index, done in _done_files(staging).items():
        name = fmt.shard_name(index)
        if index < first_index:
            continue
        if done.get("skipped") and not skips_allowed:
            continue
        path = staging / name if (staging / name).exists() else out / name
        if (
            not path.exists()
            or path.stat().st_size != done["bytes"]
            or file_sha256(path) != done["sha256"]
        ):
            continue
        info = fmt.ShardInfo.from_entry({**done, "file": name})
        kept[index] = _DoneShard(info, done["input_end"], done["skipped"])
    return kept


def _resumable_shards(
    staging: Path, out: Path, first_index: int, skips_allowed: bool
) -> list[_DoneShard]:
    """The consecutive shards an interrupted run finished, checked against their hashes.

    Everything after the first missing or damaged one is removed, so the write continues from
    there and the result equals an uninterrupted run.
    """
    done = _done_shards(staging, out, first_index, skips_allowed)
    kept: list[_DoneShard] = []
    while first_index + len(kept) in done:
        kept.append(done[first_index + len(kept)])
    for p in staging.iterdir():  # an unfinished shard, or anything after the first gap
        if p.name.startswith("shard-"):
            shard_file = p.name[: -len(DONE_SUFFIX)] if p.name.endswith(DONE_SUFFIX) else p.name
            if shard_file not in {d.info.file for d in kept}:
                p.unlink()
    return kept


def _inheritance(ctx: Any, lock_fd: int | None) -> tuple[int | None, int | None]:
    """What :func:`_init_worker` needs for workers started by ``ctx``: the staging lock's
    descriptor when they are forked (they inherit it), and the writer's pid when the writer is
    their parent (fork, spawn; with forkserver the fork server is)."""
    method = ctx.get_start_method()
    return (
        lock_fd if method == "fork" else None,
        os.getpid() if method in ("fork", "spawn") else None,
    )


def _init_worker(
    lock_fd: int | None, parent: int | None, shared: tuple | None, slots: Any = None
) -> None:
    """In each worker process of a write: let go of the staging lock inherited through fork
    (a worker that outlived a killed writer would block the resume), die with the process that
    started it (Linux), and keep the shared stop mark and progress counters, or the shared
    memory records are handed over in (inherited through fork)."""
    global _SHARED, _SLOTS
    _SHARED, _SLOTS = shared, slots
    if lock_fd is not None:
        try:
            os.close(lock_fd)  # the parent's descriptor still holds the lock
        except OSError:
            pass
    libc = _libc()
    if libc is not None:
        try:
            import signal

            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
            _keep_freed_memory(libc)
        except (OSError, AttributeError):
            pass
    if parent is not None and os.getppid() != parent:  # the writer died before the line above
        os._exit(1)
    # With forkserver the signal above is tied to the fork server, which outlives a killed
    # writer while its workers hold its pipe; so also watch the writer itself, whatever started
    # this process, and leave the moment it is gone.
    exit_with_parent()


_SHARED: tuple | None = None  # (stop mark, progress counters) in shard workers
_SLOTS: Any = None  # in encode workers: the shared memory they hand records over in
# the size of a chunk's slot in that memory (32 records of raw pixels of a 500 x 375 photo
# take 14.5 MB)
_SLOT_BYTES = 16 << 20
# and all the slots at most this (reserved when the write starts: with many workers, smaller
# slots rather than gigabytes of address space)
_HANDOVER_BYTES = 512 << 20
_HANDOVER_IN_SHARED_MEMORY = True  # (False: through the pool's pipe, as before; for A/B runs)

# glibc's mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _keep_freed_memory(libc: Any) -> None:
    """glibc (in a worker of a write): keep freed memory for the next record instead of giving
    it back to the system at once.

    A record of raw pixels is hundreds of kilobytes, allocated and freed several times over
    (decoded pixels, serialized bytes, the database's pages). By default glibc serves blocks
    that large with fresh mappings or trims the heap under them, so every record costs page
    faults and zeroed pages: a third of a worker's system time, measured. Blocks under 32 MB
    now come from the heap, and up to 256 MB free at its top stay there. A worker's heap then
    holds about what its largest batch needed (16 MB of records, and the database's pages for
    them) and gives it back when the worker exits, at the end of the write."""
    if hasattr(libc, "mallopt"):  # glibc's; a stub elsewhere (musl)
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 256 << 20)


class _Cancelled(Exception):
    """A shard worker stopped because another shard failed."""


def _skip_rows(skipped: list[tuple[Entry, str]]) -> list[list[Any]]:
    return [[e.line_no, e.path, reason] for e, reason in skipped]


def _mark_done(
    path: Path,
    count: int,
    records_crc32: int,
    input_end: int,
    skipped: list[list[Any]],
    sha256: str | None = None,
) -> fmt.ShardInfo:
    """Make a sealed shard durable (fsync), hash it (unless its ``sha256`` is known), and record
    it as done for a resume.

    The fsync waits for the disk and the hash for a core, and both let go of the GIL: the
    fsync runs in a thread of its own while this one hashes. For the last shard of a write,
    which nothing else overlaps, that cut the wait for a 70 MB shard by about 30 ms here
    (medians of 7 writes, two A/B runs: 132 to 103 ms and 154 to 125 ms)."""
    synced: list[BaseException | None] = []

    def sync() -> None:
        try:
            _fsync(path)
            synced.append(None)
        except BaseException as exc:  # (reported below, in this thread)
            synced.append(exc)

    if sha256 is None:
        syncer = threading.Thread(target=sync, name="torchrecord-fsync", daemon=True)
        syncer.start()
        try:
            sha256 = file_sha256(path, mapped=True)
        finally:
            syncer.join()
    else:
        sync()
    if synced[0] is not None:
        exc = synced[0]
        if isinstance(exc, OSError):
            raise _write_failure(path, exc) from exc
        raise exc
    info = fmt.ShardInfo(
        path.name, count, path.stat().st_size, sha256=sha256, records_crc32=records_crc32
    )
    done = {
        "file": info.file,
        "num_records": info.num_records,
        "bytes": info.bytes,
        "sha256": info.sha256,
        "records_crc32": info.records_crc32,
        "input_end": input_end,
        "skipped": skipped,
    }
    try:
        _atomic_write_text(path.with_name(info.file + DONE_SUFFIX), json.dumps(done))
    except OSError as exc:  # name the shard, and say why when the disk is full
        raise _write_failure(path, exc) from exc
    return info


def _write_planned_shard(
    job: _EncodeJob,
    staging: Path,
    where: tuple[int, int],
    entries: list[Entry],
    input_end: int,
    layout: tuple[str, str, int],
) -> tuple[tuple | None, list[tuple[Entry, str]]]:
    """One planned shard, written and sealed in a worker process: the arguments of
    :func:`_mark_done` for it (None if every sample was skipped), and the samples it skipped.
    ``where``: the shard's index, and its position in the plan (its slot in the counters)."""
    index, slot = where
    stop_after, counts = _SHARED or (None, None)
    shard: _ShardWriter | None = None
    skipped: list[tuple[Entry, str]] = []
    try:
        paths = [entry.path for entry in entries]
        with SourceReadahead(paths, enabled=job.readahead, keep_helper=True).start() as ahead:
            for entry in entries:
                if stop_after is not None and stop_after.value < slot:
                    raise _Cancelled
                ahead.advance()
                ok, value, crc = job(entry)
                if counts is not None:
                    counts[2 * slot] += 1
                    counts[2 * slot + 1] += len(value) if ok else 0
                if not ok:
                    skipped.append((entry, value.decode()))
                    continue
                if shard is None:
                    shard = _ShardWriter(staging, index, *layout)
                shard.add(value, crc)
        if shard is None:
            return None, skipped
        shard.seal()
        count, records_crc32, shard = shard.count, shard.records_crc32, None
        # hashed here, where its pages are fresh in the page cache and while the other workers
        # go on; the writing process makes it durable (_mark_done), so no worker waits for disk,
        # and its writing starts now, while it is hashed
        path = staging / fmt.shard_name(index)
        _start_writeback(path)
        sha256 = file_sha256(path, mapped=True)
        return (path, count, records_crc32, input_end, _skip_rows(skipped), sha256), skipped
    finally:
        if shard is not None:
            shard.close()


class _OutputLock:
    """An exclusive lock on the output directory, held from the check of what the directory
    holds to the publish: two writes into one directory at once are refused, not interleaved.

    ``flock`` on the directory itself, which leaves no file behind; where the file system
    cannot lock a directory (NFS emulates ``flock`` with byte-range locks, which need a file
    open for writing), on a lock file in it, ``.torchrecord-write.lock``."""

    LOCK_FILE = ".torchrecord-write.lock"
    HELD: set[int] = set()  # descriptors of the locks this process holds (closed in a child)

    def __init__(self, out: Path):
        self.out = out
        self.fd: int | None = None

    @classmethod
    def forget_in_child(cls) -> None:
        """A forked child (a pool worker, a process a thread started meanwhile) closes its copy
        of each lock: the lock is the writing process's, and ends with its write."""
        for fd in cls.HELD:
            try:
                os.close(fd)
            except OSError:
                pass
        cls.HELD = set()

    def __enter__(self) -> _OutputLock:
        import fcntl

        self.fd = os.open(self.out, os.O_RDONLY | os.O_DIRECTORY)
        try:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise
            except OSError:  # this file system locks files only
                os.close(self.fd)
                self.fd = None
                self.fd = os.open(self.out / self.LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o644)
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None
            raise DatasetExistsError(
                f"another write into {self.out} is running; wait for it to finish, or write "
                "into another directory"
            ) from None
        except BaseException:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None
            raise
        self.HELD.add(self.fd)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            self.HELD.discard(self.fd)
            os.close(self.fd)
            self.fd = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_OutputLock.forget_in_child)


class _StagingLock:
    """An exclusive lock on a staging directory: two runs of one write must not interleave."""

    def __init__(self, staging: Path):
        self.path = staging / ".lock"
        self.fd: int | None = None

    def __enter__(self) -> _StagingLock:
        import fcntl

        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise DatasetExistsError(
                f"another write to {self.path.parent.parent} is running (it holds "
                f"{self.path}); wait for it to finish"
            ) from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)


def _remove_stale_staging(
    out: Path,
    keep: Path | None,
    finished: Callable[[Path, list[Path]], bool] | None = None,
) -> None:
    """Remove the staging directories of other, abandoned writes (none holds its lock). Only
    directories named as this writer names them that hold its lock file (or nothing: killed
    before it took the lock) are touched.

    ``finished(staging, done_files)`` decides about one that holds shards its write finished
    and did not publish (the done files of those shards): True removes it, False leaves it,
    or it raises. Without it, such directories are removed too."""
    import fcntl

    for staging in out.glob(STAGING_PREFIX + "*"):
        if staging == keep or not staging.is_dir() or not _STAGING_NAME.fullmatch(staging.name):
            continue
        if not (staging / ".lock").is_file() and any(staging.iterdir()):
            continue  # not ours
        try:
            fd = os.open(staging / ".lock", os.O_RDWR)
        except OSError:
            fd = None  # killed before it took its lock
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            done = _unpublished_done_files(staging)
            if done and finished is not None and not finished(staging, done):
                continue
            shutil.rmtree(staging, ignore_errors=True)  # still holding its lock
        except BlockingIOError:
            continue  # another write is running there
        finally:
            if fd is not None:
                os.close(fd)


_STAGING_JOB = "job.json"  # in a staging directory: what write it belongs to


def _done_files(staging: Path) -> dict[int, dict[str, Any]]:
    """The done files in ``staging`` (what each finished shard recorded), by shard index;
    unreadable ones and names that are not a shard's are left out."""
    found: dict[int, dict[str, Any]] = {}
    for done_path in staging.glob("shard-*" + DONE_SUFFIX):
        name = done_path.name.removesuffix(DONE_SUFFIX)
        try:
            done = json.loads(done_path.read_text())
            index = int(name.removeprefix("shard-").removesuffix(".lmdb"))
        except (OSError, ValueError):
            continue
        if isinstance(done, dict) and name == fmt.shard_name(index):
            found[index] = done
    return found


def _skipping_shards(staging: Path) -> int:
    """How many finished shards in ``staging`` skipped samples."""
    return sum(bool(done.get("skipped")) for done in _done_files(staging).values())


def _report_field(value: Any) -> str:
    """One field of the skip report: tabs and line breaks would break its rows and columns."""
    return str(value).replace("\t", " ").replace("\r", " ").replace("\n", " ")


def _done_indices(staging: Path) -> set[int]:
    """The indices of the shards in ``staging`` that have a done file."""
    indices = set()
    for done in staging.glob("shard-*" + DONE_SUFFIX):
        digits = done.name.removeprefix("shard-").removesuffix(".lmdb" + DONE_SUFFIX)
        if digits.isdigit():
            indices.add(int(digits))
    return indices


def _adopt_legacy_staging(out: Path, job: str, staging: Path) -> None:
    """Give an interrupted run of this very write by an earlier TorchRecord, whose staging was
    named by the whole job id (``on_error`` included), the staging name this one uses, so that
    it resumes from its shards. Not while a write holds its lock."""
    import fcntl

    legacy = out / f"{STAGING_PREFIX}{job[:16]}"
    if legacy == staging or not legacy.is_dir() or staging.exists():
        return
    try:
        fd = os.open(legacy / ".lock", os.O_RDWR)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(legacy, staging)
    except OSError:
        pass  # (locked by a running write, or gone: it is left alone)
    finally:
        os.close(fd)


def _leave_finished(staging: Path, done: list[Path]) -> bool:
    return False  # another write's finished shards: left for that write to resume


def _unpublished_done_files(staging: Path) -> list[Path]:
    """The done files of the shards in ``staging`` that were finished and not yet published
    (a published shard has left the staging directory for the dataset)."""
    return sorted(
        done
        for done in staging.glob("shard-*" + DONE_SUFFIX)
        if (staging / done.name.removesuffix(DONE_SUFFIX)).is_file()
    )


def _difference(name: str, theirs: Any, ours: Any) -> str:
    """One setting in which two writes differ, in words (``db_num 6 there, 4 here``)."""

    def shown(value: Any) -> str:
        text = repr(value)
        return text if len(text) <= 40 else text[:37] + "..."

    if isinstance(theirs, dict) and isinstance(ours, dict):  # the image policy, by option
        keys = sorted({*theirs, *ours} - {k for k in theirs if theirs.get(k) == ours.get(k)})
        return "; ".join(
            f"{key} {shown(theirs.get(key))} there, {shown(ours.get(key))} here" for key in keys
        )
    if name == "label_names" and isinstance(theirs, list) and isinstance(ours, list):
        for i, (a, b) in enumerate(zip(theirs, ours)):
            if a != b:
                return f"class {i} is {shown(a)} there, {shown(b)} here"
        return f"{len(theirs)} classes there, {len(ours)} here"
    if name == "first_index":  # (shard_range's first shard, or the shards appended to)
        return f"the first shard written is {theirs} there, {ours} here"
    return f"{name} {shown(theirs)} there, {shown(ours)} here"


def _unfinished_write_message(
    staging: Path, done: list[Path], described: dict[str, Any], can_overwrite: bool
) -> str:
    """Why a write refuses to start where another, interrupted write left finished shards:
    how much work they hold, what makes that write another one, and the ways on."""
    size = sum((staging / d.name.removesuffix(DONE_SUFFIX)).stat().st_size for d in done)
    try:
        theirs = json.loads((staging / _STAGING_JOB).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        theirs = None
    if not isinstance(theirs, dict) or not isinstance(theirs.get("settings"), dict):
        why = "a write whose settings were not recorded (an earlier TorchRecord)"
    else:
        ours = described["settings"]
        differ = [
            name
            for name in _JOB_PARAM_NAMES
            if name != "on_error" and theirs["settings"].get(name) != ours.get(name)
        ]
        if differ:
            why = "; ".join(
                _difference(name, theirs["settings"].get(name), ours.get(name)) for name in differ
            )
        elif theirs.get("samples") != described["samples"]:
            why = (
                f"{theirs.get('samples')} samples from {theirs.get('data_list')} there, "
                f"{described['samples']} from {described['data_list']} here"
            )
        else:
            why = (
                f"the same settings and number of samples, but other paths, labels or extra "
                f"fields ({theirs.get('data_list')} there, {described['data_list']} here)"
            )
    return (
        f"{staging.parent} holds {len(done)} shard(s) ({size / 1e6:,.1f} MB) finished by an "
        f"interrupted write that is not this one ({why}), in {staging.name}. Run that write "
        "again to resume it; to discard them and start this one, delete "
        f"{staging}" + (" or pass overwrite=True (--overwrite)" if can_overwrite else "")
    )


def _base_settings(out: Path) -> dict[str, Any]:
    """The codec, serializer and image policy of the dataset in ``out`` (empty if none can be
    read: the append's own checks then say what is wrong)."""
    try:
        doc = json.loads((out / fmt.MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict):
        return {}
    return {k: doc[k] for k in ("codec", "serializer", "image_policy") if doc.get(k)}


def _listed_files(manifest_path: Path) -> set[str]:
    """The files a dataset's manifest names (its shards and skip report), or none if it cannot
    be read."""
    try:
        doc = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = {str(item["file"]) for item in doc.get("shards", [])}
        if doc.get("skipped_report"):
            files.add(str(doc["skipped_report"]))
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return set()
    return {name for name in files if "/" not in name and name not in ("", ".", "..")}


def _report_header(report: Path) -> str | None:
    """The first line of ``report``, or None when it cannot be read as text."""
    try:
        with open(report, encoding="utf-8") as f:
            return f.readline().rstrip("\n")
    except (OSError, UnicodeDecodeError):
        return None


def _is_old_report(report: Path) -> bool:
    """Whether ``report`` is a skip report without the ``data_list`` column."""
    return _report_header(report) == _OLD_SKIPPED_HEADER


def _report_rows(report: Path, source: str) -> list[str]:
    """The rows of a skip report, each naming its data list (``source`` for the rows of a
    report written before the column existed)."""
    lines = [line for line in report.read_text(encoding="utf-8").split("\n") if line]
    if lines and lines[0] == _OLD_SKIPPED_HEADER:
        return [f"{row}\t{_report_field(source)}" for row in lines[1:]]
    return lines[1:]


def _written_here(path: Path) -> bool:
    """Whether ``path`` is a file this writer writes: a shard (its metadata says so, read
    without a lock) or a skip report (its header). Files of any other kind are the user's."""
    if path.name == SKIPPED_REPORT:
        return _report_header(path) in (_SKIPPED_HEADER, _OLD_SKIPPED_HEADER)
    if not (path.name.startswith("shard-") and path.name.endswith(".lmdb")):
        return False
    import lmdb

    try:
        env = lmdb.open(str(path), subdir=False, readonly=True, lock=False, max_dbs=0)
    except lmdb.Error:
        return False
    try:
        if (env.info()["last_pgno"] + 1) * env.stat()["psize"] > path.stat().st_size:
            return False  # truncated: reading its pages through the map would fault (SIGBUS)
        with env.begin() as txn:
            meta = json.loads(bytes(txn.get(fmt.META_KEY) or b"{}"))
        return isinstance(meta, dict) and meta.get("format") == fmt.FORMAT_NAME
    except (lmdb.Error, ValueError, OSError):
        return False
    finally:
        env.close()


def _refuse_foreign_files(out: Path, old_files: set[str]) -> None:
    """Refuse to write where a file of the user's has a name a dataset uses (``shard-*.lmdb``,
    ``skipped.tsv``): the new dataset could replace it. ``old_files`` are the replaced
    dataset's own, whatever state they are in."""
    for path in sorted([*out.glob("shard-*.lmdb"), out / SKIPPED_REPORT]):
        if path.name in old_files or not path.exists():
            continue
        if not path.is_file() or not _written_here(path):
            raise DatasetExistsError(
                f"{path} exists and was not written by TorchRecord; a dataset written here "
                "could replace it. Move it away, or choose another output directory."
            )


def _refuse_unlisted_shards(out: Path, listed: set[str]) -> None:
    """Refuse to append where a shard the manifest does not list lies (a manifest restored
    from an earlier copy leaves the shards of later appends so): the append's new shards take
    the same names and would replace it. The shards of an append whose publish was killed are
    listed by the manifest it staged, and are no reason to refuse."""
    staged: set[str] = set()
    for staging in out.glob(STAGING_PREFIX + "*"):
        staged |= _listed_files(staging / fmt.MANIFEST_NAME)
    for path in sorted(out.glob("shard-*.lmdb")):
        if path.name not in listed and path.name not in staged and _written_here(path):
            raise DatasetExistsError(
                f"{path} is a TorchRecord shard that {out / fmt.MANIFEST_NAME} does not list "
                "(was the manifest restored from an earlier copy?); this append would replace "
                "it. Restore the manifest that lists it, or move the file away, then append."
            )


def _warn_empty_classes(
    names: list[str], entries: list[Entry], skipped: list[tuple[Entry, str]], source: str
) -> None:
    """Warn about classes left without records because every sample of theirs was skipped:
    they keep their index (the numbering does not depend on which files fail to decode)."""
    gone = {e.line_no for e, _ in skipped}
    present = {e.label for e in entries if e.error is None and e.line_no not in gone}
    empty = [name for i, name in enumerate(names) if str(i) not in present]
    if empty:
        shown = ", ".join(map(repr, empty[:_REASONS_SHOWN]))
        more = f" and {len(empty) - _REASONS_SHOWN} more" if len(empty) > _REASONS_SHOWN else ""
        warnings.warn(
            f"{source}: class(es) {shown}{more} have no records: every sample of theirs was "
            f"skipped (see {SKIPPED_REPORT}). They keep their index in label_names, so the "
            "other classes' indices do not depend on which files failed",
            stacklevel=4,
        )


def _numeric_names(names: list[str]) -> dict[Decimal, int] | None:
    """Class index by value, when every class name is a number (such as ``"2.0"``)."""
    out = {}
    for i, name in enumerate(names):
        kind, value, _ = _name_order(name)  # (kind 0: a finite number)
        if kind:
            return None
        out[value] = i
    return out


def _merge_label_names(
    base: fmt.Manifest, entries: list[Entry], names: list[str] | None, source: str
) -> tuple[list[Entry], list[str] | None]:
    """Appended samples keep the dataset's label indices; new names are added at the end."""
    old = base.extra.get("label_names")
    if old is None and names is None:
        return entries, None
    if names is None and old is not None:
        by_value = _numeric_names(old)  # (written before 2.0 was the integer 2: names "2.0")
        if by_value is not None and all(
            Decimal(e.label) in by_value for e in entries if e.error is None
        ):
            return [
                e if e.error is not None else e.relabeled(str(by_value[Decimal(e.label)]))
                for e in entries
            ], old
    if old is None or names is None:
        raise ValueError(
            f"cannot append {source}: the dataset has "
            f"{'integer labels' if old is None else 'string labels'} and the new samples do not"
        )
    merged = list(old) + [name for name in names if name not in old]

    index = {str(i): str(merged.index(name)) for i, name in enumerate(names)}
    return [e.relabeled(index[e.label]) for e in entries], merged


def _check_options(codec: Any, options: dict[str, Any]) -> None:
    """Refuse image-policy options the codec does not take, before any work is done."""
    missing = [name for name in options if not _takes_option(codec, name)]
    if missing:
        raise ValueError(
            f"codec {codec.name!r} does not support {', '.join(missing)}; the built-in codecs "
            "raw_rgb, jpeg and smart take max_size (and jpeg and smart take quality, smart "
            "raw_below), and a plugin's codec takes the options its encode() has parameters "
            "for (or **options)"
        )


def _takes_option(codec: Any, name: str) -> bool:
    """Whether a codec's ``encode`` takes the keyword ``name`` (by name, or ``**options``)."""
    import inspect

    parameters = inspect.signature(codec.encode).parameters
    return name in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )


def _func_name(func: Callable[..., Any] | None) -> str | None:
    return None if func is None else f"{func.__module__}.{func.__qualname__}"


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


def file_sha256(path: Path, mapped: bool = False) -> str:
    """The SHA-256 of a file. ``mapped`` hashes the page cache in place (no copy through
    ``read``): only for files nobody else truncates meanwhile, such as a shard this write just
    sealed (a mapping of a file that shrinks under it faults)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if mapped and size:
            import mmap

            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapping:
                mapping.madvise(mmap.MADV_SEQUENTIAL)
                with memoryview(mapping) as view:
                    for start in range(0, size, 8 << 20):  # hashlib lets go of the GIL
                        digest.update(view[start : start + (8 << 20)])
        else:
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
        except lmdb.BadValsizeError as exc:
            sizes = sorted({len(key) for key, _ in batch})
            raise TorchRecordError(
                f"{path}: LMDB refused a key or value ({exc}); keys must be 1 to "
                f"{env.max_key_size()} bytes (this batch has keys of {sizes} bytes) and values "
                "under 4 GiB. This is a bug in the writer or a plugin, please report it"
            ) from exc
        except lmdb.Error as exc:
            raise _write_failure(path, exc, sum(len(v) for _, v in batch)) from exc


DEFAULT_QUALITY = 90  # JPEG quality of re-encoded images

# errno values that mean "no room": no space, quota exceeded, file size limit (ulimit -f)
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _raise_if_no_room(exc: OSError, staging: Path) -> None:
    """On a full disk: free the space the unfinished shard took, keep the finished ones (the
    same write resumes from them), and raise DiskFullError."""
    if not isinstance(exc, DiskFullError):
        if exc.errno not in _NO_ROOM:
            return
        error = _write_failure(Path(exc.filename or staging / "-"), exc)
    else:
        error = exc
    for p in staging.iterdir():
        done = p.with_name(p.name + DONE_SUFFIX)
        if p.name.startswith("shard-") and p.name.endswith(".lmdb") and not done.exists():
            p.unlink(missing_ok=True)
    if error is exc:
        raise
    raise error from exc


def _write_failure(path: Path, exc: BaseException, needed: int = 0) -> TorchRecordError:
    """Turn a failed write into an error that says why, when the reason is lack of room.

    LMDB reports a short write as EIO whatever its cause, so the file system is asked: its free
    space, and the process's file size limit.
    """
    import resource

    what = f"{path.name} in {path.parent}"
    code = getattr(exc, "errno", None)
    reason = None
    try:
        st = os.statvfs(path.parent)
        free = st.f_bavail * st.f_frsize
    except OSError:
        free = None
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    try:
        size = path.stat().st_size
    except OSError:
        size = 0
    if code == errno.EFBIG or (
        limit != resource.RLIM_INFINITY and size + needed + (1 << 20) >= limit
    ):
        reason = f"the file size limit (ulimit -f) of {limit:,} bytes was reached"
    elif code == errno.EDQUOT or "quota" in str(exc).lower():
        reason = "the disk quota is exceeded"
    elif code in _NO_ROOM or (free is not None and free < needed + (16 << 20)):
        reason = "the disk is full" + (f" ({free:,} bytes free)" if free is not None else "")
    elif "No space left" in str(exc):
        reason = "the disk is full"
    if reason is None:
        return TorchRecordError(
            f"could not write {what}: {exc}. The disk may be failing; the shards finished so "
            "far are kept, and the same write run again resumes from them."
        )
    return DiskFullError(
        errno.EFBIG if "ulimit" in reason else errno.EDQUOT if "quota" in reason else errno.ENOSPC,
        f"disk full: {reason} while writing {what}. Free space (or raise the limit) and run "
        "the same write again: it resumes from the shards already finished. Nothing was "
        "published; a dataset already in the output directory is untouched.",
    )


class _Progress:
    """A tqdm bar with images/s, MB/s and the ETA; silent when disabled."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        self.bytes = 0
        self.started = self.shown = time.perf_counter()
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", desc="writing", dynamic_ncols=True)

    def update(self, images: int, nbytes: int) -> None:
        if self.bar is None:
            return
        self.bytes += nbytes
        self.bar.update(images)
        now = time.perf_counter()
        if now - self.shown > 0.5 or self.bar.n == self.bar.total:  # (updates may come in jumps)
            self.shown = now
            elapsed = max(now - self.started, 1e-9)
            self.bar.set_postfix_str(f"{self.bytes / elapsed / 1e6:.1f} MB/s", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _start_writeback(path: Path) -> None:
    """Have the kernel start writing a sealed shard to disk now, without waiting for it to be
    written (Linux's ``sync_file_range``; the call returns once the writes are queued, about
    40 ms for 64 MB here), so that the fsync that makes it durable finds most of it written:
    the writing overlaps with hashing the shard in its worker, and the fsync of the last
    shard, which nothing else overlaps, takes less. Best effort: elsewhere, or if the call
    fails, the fsync does it all. (In one process the fsync runs beside the writing anyway.)"""
    libc = _libc()
    if libc is None or not hasattr(libc, "sync_file_range"):
        return
    import ctypes

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # (the fsync will say what is wrong)
    try:
        libc.sync_file_range(fd, ctypes.c_int64(0), ctypes.c_int64(0), _SYNC_FILE_RANGE_WRITE)
    finally:
        os.close(fd)


_SYNC_FILE_RANGE_WRITE = 2


def _fsync(path: Path) -> None:
    """fsync a file or a directory (a directory's entry list, after a rename)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        _write_synced(tmp, text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)
