"""The ``torchrecord`` command: write, info, verify and plugins."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import TorchRecordError

WRITE_DESCRIPTION = """\
Pack the images named by a data list into a TorchRecord dataset.

DATA_LIST is a .txt file of 'path label' lines (the label is the last whitespace-separated
token, so paths may contain spaces), a .csv file with two columns, path and label, or a folder
of class folders (ImageFolder's layout: the sorted folder names are the classes). Relative
paths resolve against the data list's folder, or against --root. OUTPUT_DIR receives the shards
and, last of all, manifest.json: until the write succeeds no dataset is visible there, and an
existing dataset is only replaced with --overwrite.
"""

WRITE_EPILOG = """\
codecs (see `torchrecord plugins` for those your plugins add):
  raw_rgb   decode with Pillow at write time and store RGB pixels: no decode when reading,
            about 10x the bytes of the source JPEGs
  jpeg      store the original JPEG bytes unchanged; decoded when reading
  smart     per image: raw pixels when small (--raw-below), JPEG when large

resuming: if a write is killed (Ctrl-C, SIGKILL, a crash), run the same command again: the
shards it finished are checked against their SHA-256 and kept, and the result equals an
uninterrupted write. Nothing is visible in OUTPUT_DIR until the write completes.

appending: --append adds the samples to the dataset in OUTPUT_DIR as new shards and leaves the
published ones as they are. Appending exactly the samples of an earlier write or append (the
same paths, labels and extra fields, in any order or sharding) is refused, as each would be
stored twice; --allow-duplicates appends them anyway. A list that only partly overlaps is
appended. Running a completed append again does nothing, even with --allow-duplicates (to
append the same samples once more, give another --seed).

examples:
  torchrecord write data_list.txt records/ --db-num 4 --shuffle
  torchrecord write train/ records/ --codec jpeg --bytes-per-shard 1GB --num-workers 8
  torchrecord write more.txt records/ --append
  torchrecord write train.csv records/ --codec jpeg --num-workers 4
"""


def _path(text: str) -> str:
    """A path argument; an empty one (an unset shell variable, say) is refused rather than
    taken for the current directory."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path (is a shell variable unset?)")
    return text


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of ``minimum`` or more."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more, got {value}")
        return value

    return parse


_count, _positive = _at_least(0), _at_least(1)


def _worker_counts(text: str) -> list[int]:
    try:
        counts = [int(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a list of worker counts: {text!r} (try 0,1,2)"
        ) from None
    if any(c < 0 for c in counts):
        raise argparse.ArgumentTypeError(f"worker counts must be 0 or more, got {text!r}")
    return counts


def _size(text: str) -> int:
    """``64MB``, ``1.5GiB``, ``500000`` -> bytes."""
    units = {
        "": 1,
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
        "K": 2**10,  # (as du -h and dd write them: 15M is 15 MiB)
        "M": 2**20,
        "G": 2**30,
        "T": 2**40,
    }
    try:
        digits = text.strip().upper()
        for suffix in sorted(units, key=len, reverse=True):
            if suffix and digits.endswith(suffix):
                return int(float(digits[: -len(suffix)]) * units[suffix])
        return int(float(digits))
    except (ValueError, OverflowError):  # (OverflowError: "inf", "1e400")
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 64MB or 1GiB)") from None


def _cmd_write(args: argparse.Namespace) -> int:
    from .writer import Writer

    started = time.perf_counter()
    writer = Writer(
        args.data_list,
        args.output_dir,
        db_num=args.db_num,
        shuffle=args.shuffle,
        codec=args.codec,
        serializer=args.serializer,
        num_workers=args.num_workers,
        seed=args.seed,
        root=args.root,
        overwrite=args.overwrite,
        append=args.append,
        records_per_shard=args.records_per_shard,
        bytes_per_shard=args.bytes_per_shard,
        on_error=args.on_error,
        shard_range=args.shard_range,
        max_size=args.max_size,
        quality=args.quality,
        raw_below=args.raw_below,
        format_version=args.format_version,
        progress=False if args.quiet else None,
        readahead=not args.no_readahead,
        allow_duplicates=args.allow_duplicates,
    )
    manifest = writer.write()
    seconds = time.perf_counter() - started
    if writer.already_written:
        what = "this append" if args.append else "this write"
        again = (
            "rewrite the whole dataset from all its data lists with --overwrite"
            if args.append
            else "write again with --overwrite"
        )
        print(
            f"nothing to do: {args.output_dir} holds {what} already (the same samples, labels "
            f"and settings; {manifest.num_records} records in {len(manifest.shards)} shards). "
            f"Nothing was read: if images changed under the same file names, {again}"
        )
        return 0
    print(_write_summary(args, writer, manifest, seconds))
    return 0


def _write_summary(args: argparse.Namespace, writer: Any, manifest: Any, seconds: float) -> str:
    """What this run did: its own records (an append's, not the dataset's), those kept from
    an interrupted run apart, so that the rate is this run's."""
    shards, kept = writer.new_shards, writer.kept_shards
    records = sum(s.num_records for s in shards)
    new = records - sum(s.num_records for s in kept)
    total = sum(s.bytes for s in shards)
    verb = "appended" if args.append else "wrote"
    text = (
        f"{verb} {records} records into {len(shards)} {'new ' if args.append else ''}shards of "
        f"{args.output_dir} "
        f"({total / 1e6:.1f} MB, codec {manifest.codec}, serializer {manifest.serializer}) "
        f"in {seconds:.1f} s ({new / seconds:.0f} images/s)"
    )
    if kept:
        text += (
            f"; resumed: {sum(s.num_records for s in kept)} of them in {len(kept)} shards "
            "finished by the interrupted run were kept (the rate counts the others)"
        )
    if args.append:
        text += f"; the dataset now has {manifest.num_records} records in {len(manifest.shards)}"
        text += " shards"
    if writer.skipped:
        text += f"; skipped {len(writer.skipped)}, see {args.output_dir}/skipped.tsv"
    return text


def _range(text: str) -> tuple[int, int]:
    try:
        first, stop = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a shard range: {text!r} (try 0:8)") from None
    return first, stop


def _cmd_join(args: argparse.Namespace) -> int:
    from .writer import join_parts

    manifest = join_parts(
        args.output_dir, args.parts, overwrite=args.overwrite, check_hashes=not args.quick
    )
    print(
        f"joined {len(args.parts)} parts into {args.output_dir}: {manifest.num_records} records "
        f"in {len(manifest.shards)} shards"
    )
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .reader import RecordReader, describe

    info = describe(args.path)
    missing = _missing_plugins(RecordReader(args.path))
    if args.json:
        print(json.dumps({**info, "missing_plugins": missing}, indent=2))
        _warn(missing, info["problems"], info["notes"])
        return 0
    written = info.get("plugins", {}) if isinstance(info.get("plugins"), dict) else {}

    def by(kind: str) -> str:
        who = written.get(kind)  # (a plugin's package; the built-ins go without saying)
        if not isinstance(who, dict):
            return ""
        layout = who.get("format_version", 1)
        layout = f"format version {layout}" if layout != 1 else ""
        if str(who.get("distribution")).startswith("torchrecord ("):
            return f"  ({layout})" if layout else ""
        layout = f", {layout}" if layout else ""
        return f"  (from {who['distribution']} {who['version']}{layout})"

    print(f"dataset     {info['path']}" + ("  (TorchRecord 0.1 layout)" if info["legacy"] else ""))
    print(f"format      version {info['format_version']}")
    print(f"codec       {info['codec']}{by('codec')}")
    print(f"serializer  {info['serializer']}{by('serializer')}")
    print(f"records     {info['records']}")
    print(f"shards      {len(info['shards'])}")
    print(f"bytes       {info['bytes']} ({info['bytes'] / 1e6:.1f} MB)")
    for key in ("created_by", "created_at", "source"):
        if key in info:
            print(f"{key:<11} {info[key]}")
    if isinstance(info.get("label_names"), list):
        names = info["label_names"]
        shown = ", ".join(map(str, names[:5])) + (", ..." if len(names) > 5 else "")
        print(f"classes     {len(names)} ({shown})")
    if info.get("extra_fields"):
        print(f"extras      {', '.join(map(str, info['extra_fields']))}")
    if info.get("image_policy"):
        policy = info["image_policy"]
        print("policy      " + ", ".join(f"{k}={v}" for k, v in sorted(policy.items())))
    if info.get("skipped"):
        report = info.get("skipped_report", "skipped.tsv")
        print(f"skipped     {info['skipped']} input lines (see {Path(args.path) / report})")
    if args.shards:
        for shard in info["shards"]:
            print(
                f"  {shard['file']:<24} {shard['records']:>10} records {shard['bytes']:>14} bytes"
            )
    _warn(missing, info["problems"], info["notes"])
    return 0


def _missing_plugins(reader: Any) -> list[str]:
    """Why the dataset's codec or serializer cannot be used here (not installed, or of a
    format version that cannot read it), if so. (Looking them up opens no shard.)"""
    from .errors import PluginVersionError, UnknownPluginError
    from .format import CUSTOM_CODEC

    missing = []
    for kind in ("codec", "serializer"):
        if kind == "codec" and reader.codec_name == CUSTOM_CODEC:
            continue
        try:
            getattr(reader, kind)
        except (UnknownPluginError, PluginVersionError) as exc:
            missing.append(str(exc))
    return missing


def _warn(missing: list[str], problems: list[str] = (), notes: list[str] = ()) -> None:
    """Warnings for plugins missing here, for shards missing or cut, and for files beside the
    dataset (shards the manifest does not list, staging of interrupted writes)."""
    for message in missing:
        print(f"warning: this dataset cannot be read here: {message}", file=sys.stderr)
    for problem in problems:
        print(f"warning: {problem}; run `torchrecord verify`", file=sys.stderr)
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)


def _problem_line(problem: Exception) -> str:
    """A problem ``verify`` found, without the advice to run ``verify`` that ends it when the
    loader raises it."""
    from .errors import RecordCorruptedError, ShardCorruptedError

    if isinstance(problem, RecordCorruptedError) and problem.shard:
        hint = f". {problem.hint}" if problem.hint else ""
        where = getattr(problem, "dataset_index", None)
        where = f", record {where} of the dataset" if where is not None else ""
        return (
            f"shard {problem.shard}, record key {problem.key.hex()} (record {problem.index} of "
            f"the shard{where}): {problem.message}{hint}"
        )
    if isinstance(problem, ShardCorruptedError) and problem.shard:
        return f"shard {problem.shard}: {problem.message}"
    return str(problem)


def _cmd_verify(args: argparse.Namespace) -> int:
    from .errors import DatasetError, DatasetNotFoundError, FormatVersionError
    from .format import CUSTOM_CODEC
    from .reader import RecordReader, verify

    if args.quick and args.decode:
        raise ValueError("--decode decodes every record, which --quick does not read: drop one")
    try:
        reader = RecordReader(args.path)
    except (DatasetNotFoundError, FormatVersionError):
        raise  # (no dataset there, or one this version cannot check: could not run)
    except DatasetError as exc:  # the manifest itself is damaged: a problem found
        print(f"BAD  {exc}")
        print(f"1 problem(s): the manifest of {args.path} cannot be used")
        return 1
    problems, tally = 0, {"records": 0}
    for problem in verify(reader, quick=args.quick, decode=args.decode, tally=tally):
        problems += 1
        print(f"BAD  {_problem_line(problem)}")
    status = "OK" if problems == 0 else f"{problems} problem(s)"
    checked = tally["records"]
    records = f"{len(reader)}" if checked == len(reader) else f"{checked} of the {len(reader)}"
    what = "sizes, pages, keys and metadata of" if args.quick else f"{records} records in"
    if not args.quick and not tally.get("parsed", 1):
        what = (
            f"{records} records (by CRC-32 only: serializer {reader.serializer_name!r} is not "
            "installed here, so they were not parsed) in"
        )
    if args.decode and not args.quick:
        if reader.codec_name == CUSTOM_CODEC:
            what = f"{records} records (not decoded: written by a custom data_process_func) in"
        else:
            what = f"{records} records (decoded) in"
    print(f"{status}: checked {what} {reader.num_shards} shards of {args.path}")
    if problems:
        print(
            "Restore the shards named from a copy, or write the dataset again from its source "
            "(with --overwrite); then verify again"
        )
    from .reader import stray_files

    # sound bytes, but nothing here decodes them; files beside the dataset
    _warn(_missing_plugins(reader), notes=stray_files(reader.path, reader.manifest))
    return 0 if problems == 0 else 1


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    run_bench(
        args.path,
        args.workers,
        transform=args.transform,
        batch_size=args.batch_size,
        limit=args.limit,
        epochs=args.epochs,
        channels_last=args.channels_last,
    )
    return 0


def _cmd_plugins(args: argparse.Namespace) -> int:
    from .plugins import list_clashes, list_codecs, list_failures, list_serializers

    rows = [
        (i.kind, i.name, i.distribution, i.version, getattr(i.obj, "description", ""))
        for i in [*list_codecs(), *list_serializers()]
    ]
    clashes, failures = list_clashes(), list_failures()
    if args.json:
        print(
            json.dumps(
                [
                    dict(zip(("kind", "name", "distribution", "version", "description"), row))
                    for row in rows
                ]
                + [{"clash": message} for message in clashes]
                + [{"failed": message} for message in failures],
                indent=2,
            )
        )
        return 0
    print(f"{'kind':<11}{'name':<14}{'provided by':<34}description")
    for kind, name, dist, version, description in rows:
        print(f"{kind:<11}{name:<14}{dist + ' ' + version:<34}{description}")
    for message in clashes:
        print(f"unusable: {message}")
    for message in failures:
        print(f"failed:   {message}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="torchrecord",
        description="Pack image datasets into LMDB shards and inspect them.",
        epilog="exit status: 0 done (verify: the dataset is sound); 1 verify found problems "
        "(a damaged manifest, shard or record); 2 the command could not run (bad arguments, "
        "no dataset there, a bad input line, a full disk); 130 interrupted with Ctrl-C, 143 "
        "terminated (SIGTERM): a write run again resumes.",
    )
    parser.add_argument("--version", action="version", version=f"torchrecord {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    write = sub.add_parser(
        "write",
        help="pack a data list into a dataset",
        description=WRITE_DESCRIPTION,
        epilog=WRITE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    write.add_argument(
        "data_list",
        metavar="DATA_LIST",
        type=_path,
        help="the .txt or .csv data list, or an ImageFolder-style directory",
    )
    write.add_argument(
        "output_dir", metavar="OUTPUT_DIR", type=_path, help="directory to write the dataset to"
    )
    write.add_argument(
        "--db-num",
        type=int,
        default=1,
        metavar="N",
        help="number of shards; samples are split into N equal parts (default 1)",
    )
    write.add_argument(
        "--shuffle",
        action="store_true",
        help="shuffle the samples (with --seed) before splitting them into shards",
    )
    write.add_argument(
        "--codec",
        default=None,
        metavar="NAME",
        help="how images are stored: raw_rgb (default; with --append, the dataset's), jpeg, "
        "or a plugin's codec",
    )
    write.add_argument(
        "--serializer",
        default=None,
        metavar="NAME",
        help="how records become bytes: tensorprotos (default; with --append, the dataset's) "
        "or msgpack",
    )
    write.add_argument(
        "--num-workers",
        type=int,
        default=0,
        metavar="N",
        help="processes that encode images in parallel (default 0: this process); "
        "the output does not depend on N. One process writes each shard: with --db-num of at "
        "least N the workers write the shards too, which is fastest for raw pixels",
    )
    write.add_argument("--seed", type=int, default=0, help="seed of --shuffle (default 0)")
    write.add_argument(
        "--root",
        default=None,
        type=_path,
        metavar="DIR",
        help="resolve relative paths against DIR instead of the data list's folder",
    )
    write.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a dataset that already exists in OUTPUT_DIR",
    )
    write.add_argument(
        "--append",
        action="store_true",
        help="add the samples to the dataset in OUTPUT_DIR as new shards",
    )
    write.add_argument(
        "--allow-duplicates",
        action="store_true",
        help="with --append: add the samples even when the dataset holds them already (the "
        "same paths, labels and extra fields as an earlier write or append), which is refused "
        "otherwise",
    )
    write.add_argument(
        "--records-per-shard",
        type=int,
        default=None,
        metavar="N",
        help="start a new shard every N records (instead of --db-num)",
    )
    write.add_argument(
        "--bytes-per-shard",
        type=_size,
        default=None,
        metavar="SIZE",
        help="start a new shard once one holds SIZE bytes, e.g. 1GB",
    )
    write.add_argument(
        "--on-error",
        choices=["raise", "skip"],
        default="raise",
        help="raise: stop at the first bad sample, naming its line (default); "
        "skip: go on, and list every skipped line with its reason in "
        "OUTPUT_DIR/skipped.tsv",
    )
    write.add_argument(
        "--shard-range",
        type=_range,
        default=None,
        metavar="FIRST:STOP",
        help="write only shards FIRST..STOP-1 of the plan (with --db-num or "
        "--records-per-shard), e.g. one range per machine; then "
        "`torchrecord join`",
    )
    write.add_argument(
        "--max-size",
        type=int,
        default=None,
        metavar="PIXELS",
        help="scale images down so the longer side is at most PIXELS (jpeg "
        "re-encodes only the images it resizes, at --quality)",
    )
    write.add_argument(
        "--quality",
        type=int,
        default=None,
        help="JPEG quality of images re-encoded by --max-size, or stored as JPEG by the smart "
        "codec (default 90)",
    )
    write.add_argument(
        "--raw-below",
        type=_count,
        default=None,
        metavar="PIXELS",
        help="with --codec smart: store images of at most PIXELS pixels "
        "(width x height) raw, larger ones as JPEG (default 65536)",
    )
    write.add_argument(
        "--format-version",
        type=int,
        choices=(1, 2),
        default=2,
        help="on-disk format (default 2; 1 is readable by TorchRecord 0.2.0 but stores "
        "each large record in whole 4 KiB pages, about 2 KB more per record)",
    )
    write.add_argument(
        "--no-readahead",
        action="store_true",
        help="do not read source files ahead of the encoder when they are on disk (by default "
        "a helper process asks the kernel for the next 256; Linux)",
    )
    write.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    write.set_defaults(func=_cmd_write)

    join = sub.add_parser(
        "join",
        help="join the parts written with --shard-range into one dataset",
        description="Join the parts of one write, made with --shard-range (possibly on several "
        "machines, wherever each keeps the images), into OUTPUT_DIR. The parts must cover "
        "every shard exactly once. Every part's shards are checked first (size and SHA-256), and "
        "nothing moves if one is damaged; then their shard files are moved (or copied across "
        "file systems) and the manifest is written last.",
    )
    join.add_argument(
        "output_dir", metavar="OUTPUT_DIR", type=_path, help="where the joined dataset goes"
    )
    join.add_argument(
        "parts",
        metavar="PART",
        nargs="+",
        type=_path,
        help="the output directories of the --shard-range writes, in any order",
    )
    join.add_argument(
        "--overwrite", action="store_true", help="replace a dataset already in OUTPUT_DIR"
    )
    join.add_argument(
        "--quick",
        action="store_true",
        help="check the parts' shard sizes only, not their SHA-256 (which reads every shard)",
    )
    join.set_defaults(func=_cmd_join)

    info = sub.add_parser(
        "info",
        help="describe a dataset: shards, records, codec, bytes",
        description="Describe a dataset from its manifest (no shard is read): codec, "
        "serializer, records, shards, bytes, classes, extra fields, image policy and skipped "
        "lines. Warns about shard files that are missing or cut, shard files the manifest does "
        "not list, staging of interrupted writes, and plugins this machine lacks; exits 0 "
        "even then (`torchrecord verify` checks).",
    )
    info.add_argument("path", metavar="PATH", type=_path, help="the dataset's directory")
    info.add_argument("--shards", action="store_true", help="list every shard")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_cmd_info)

    verify = sub.add_parser(
        "verify",
        help="check every shard and record; exit 1 if anything is bad",
        description="Check a dataset: each shard's size, LMDB page count, key count, metadata "
        "and SHA-256 against the manifest, then every record's CRC-32 and deserialization. "
        "Every problem is reported with its shard file, record key and the record's index "
        "in the dataset (TRDataset's). Safe on datasets from strangers: nothing in a dataset "
        "is executed or unpickled. Exit status 0: sound; 1: problems found (a damaged "
        "manifest too); 2: no dataset there, or bad arguments. A damaged shard can be "
        "rewritten alone: the same write with --shard-range I:I+1 into another directory "
        "gives the same shard file, to copy over the damaged one.",
    )
    verify.add_argument("path", metavar="PATH", type=_path, help="the dataset's directory")
    verify.add_argument(
        "--quick",
        action="store_true",
        help="check sizes, page counts, key counts and metadata only",
    )
    verify.add_argument(
        "--decode",
        action="store_true",
        help="also decode every record's image as the loader does (finds images that were bad "
        "when written, such as a JPEG with damaged tables; needs the dataset's codec)",
    )
    verify.set_defaults(func=_cmd_verify)

    bench = sub.add_parser(
        "bench",
        help="measure how fast this machine reads a dataset",
        description="Measure records/s without decoding, then images/s through TorchRecord for "
        "each number of DataLoader workers.",
    )
    bench.add_argument("path", metavar="PATH", type=_path)
    bench.add_argument(
        "--workers",
        default=[0, 1, 2],
        type=_worker_counts,
        metavar="N,N,...",
        help="DataLoader worker counts to measure (default 0,1,2)",
    )
    bench.add_argument(
        "--transform",
        default="auto",
        choices=["auto", "pil", "fast", "uint8"],
        help="auto: what TorchRecord(path) does (default: the fast path the codec has); pil: "
        "0.1's PIL pipeline; fast: tensor decode and resize; uint8: 3x224x224 uint8 images",
    )
    bench.add_argument("--batch-size", type=_positive, default=32)
    bench.add_argument(
        "--limit", type=_positive, default=2000, metavar="N", help="records per pass (default 2000)"
    )
    bench.add_argument("--epochs", type=_positive, default=3, help="timed passes (default 3)")
    bench.add_argument(
        "--channels-last",
        action="store_true",
        help="batches in torch.channels_last memory format (TorchRecord(channels_last=True))",
    )
    bench.set_defaults(func=_cmd_bench)

    plugins = sub.add_parser(
        "plugins",
        help="list codecs and serializers and who provides them",
        description="List the codecs and serializers this machine has: built in, or from "
        "which installed package; and installed plugins that failed to load or whose names "
        "clash.",
    )
    plugins.add_argument("--json", action="store_true", help="print JSON")
    plugins.set_defaults(func=_cmd_plugins)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line, without the library's file and line (a plugin that failed to
    load, say: the message names it)."""
    print(f"torchrecord: warning: {message}", file=sys.stderr if file is None else file)


_PYTHON_NAMES = re.compile(  # (not inside a path: db_num/out stays as it is)
    r"(?<![/\w.-])(max_size|raw_below|db_num|records_per_shard|bytes_per_shard|num_workers|"
    r"format_version|on_error|shard_range|quality|codec|serializer)(?![/\w.-])(=| )?"
)


def _in_flags(exc: BaseException) -> str:
    """An error of the Python API in the command line's words: ``max_size`` is ``--max-size``,
    ``shard_range (0, 9)`` is ``--shard-range 0:9``. Not for errors about input lines (their
    text quotes the user's paths and labels)."""
    from .errors import DataListError

    text = str(exc)
    if isinstance(exc, (DataListError, FileNotFoundError)):
        # (only names no path holds: the rest of the text quotes the user's paths and labels)
        text = re.sub(r"\bon_error='(\w+)'", r"--on-error \1", text)
        text = re.sub(r"\boverwrite=True \(--overwrite\)", "--overwrite", text)
        return re.sub(r"\b(codec|serializer)='([\w.-]+)'", r"--\1 \2", text)
    text = re.sub(r" \(shard_range=\(\d+, \d+\)\)", "", text)  # (given as the flag already)
    text = re.sub(r"\bshard_range[ =]\((\d+), (\d+)\)", r"--shard-range \1:\2", text)
    text = re.sub(r"\b(overwrite|append)=True \(--(overwrite|append)\)", r"--\1", text)
    text = re.sub(r"--(overwrite|append) \((overwrite|append)=True\)", r"--\1", text)
    text = text.replace("allow_duplicates=True (--allow-duplicates)", "--allow-duplicates")
    text = re.sub(r"\b(overwrite|append)=True\b", r"--\1", text)
    text = re.sub(r"^quality must be", "--quality must be", text)
    text = re.sub(r"\bon_error='(\w+)'", r"--on-error \1", text)
    text = re.sub(r"\b(codec|serializer)='([\w.-]+)'", r"--\1 \2", text)

    def flag(match: re.Match[str]) -> str:
        name, joint = match.group(1), match.group(2)
        if name in ("quality", "codec", "serializer") and joint != "=":
            return match.group(0)  # (the words, not the parameters)
        return f"--{name.replace('_', '-')}" + (" " if joint else "")

    return _PYTHON_NAMES.sub(flag, text)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.showwarning = _show_warning
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _run(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    except BrokenPipeError:  # `torchrecord info --json | head -1`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # (no second error when Python flushes stdout)
        return 1 if args.command == "verify" else 0  # (a verify cut short proved nothing)
    except (TorchRecordError, ValueError, FileNotFoundError) as exc:
        print(f"torchrecord {args.command}: error: {_in_flags(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # a read-only directory, a full disk, a lost mount...
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"torchrecord {args.command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        hint = (
            "; run the same command again to resume (finished shards are kept)"
            if args.command == "write"
            else ""
        )
        what = "terminated" if isinstance(exc, _Terminated) else "interrupted"
        print(f"\ntorchrecord {args.command}: {what}{hint}", file=sys.stderr)
        return 143 if isinstance(exc, _Terminated) else 130


class _Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, a cluster scheduler's preemption), handled as Ctrl-C is: a write
    stops its workers, keeps its finished shards and says how to resume."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated


if __name__ == "__main__":
    sys.exit(main())
