"""Data lists: the ``path label`` files the Writer reads, parsed with their line numbers.

Also the other inputs the Writer takes: an ImageFolder-style directory and a Python iterable of
``(path, label)`` pairs or dicts. String labels become indices (:func:`index_labels`).

``.txt``: one sample per line, the label is the last whitespace-separated token and the path is
everything before it (so paths may contain spaces). ``.csv``: two columns, path and label, an
optional ``path,label`` header. Blank lines are ignored. Relative paths resolve against the data
list's folder, or against ``root`` when given.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, NamedTuple

from .errors import DataListError

ITERABLE_NAME = "<iterable>"


class Entry(NamedTuple):
    """One sample of a data list, with where it came from.

    A named tuple: a million of them take about 0.45 s less to build than frozen dataclass
    instances and 50 bytes less each (plus a shared label string instead of one per line), and
    they are one object each for Python's garbage collector to go through, not two."""

    line_no: int  # 1-based line of a data list, or position in a folder or an iterable
    path: str  # resolved
    label: str
    text: str  # the line as written
    extras: dict[str, Any] | None = None  # extra per-sample fields (from dicts)
    error: str | None = None  # why this sample cannot be written (kept for on_error="skip")

    def relabeled(self, label: str) -> Entry:
        """This entry with another label."""
        return self._replace(label=label)


def read_data_list(
    data_list: str | os.PathLike, root: str | os.PathLike | None = None, skip: bool = False
) -> list[Entry]:
    """Parse a data list; raises :class:`DataListError` naming the file and line. With
    ``skip``, a line without a path or a label becomes an entry with its ``error`` set instead
    (the writer skips and reports it)."""
    list_path = Path(data_list)
    name = str(list_path)
    try:
        text = list_path.read_text(encoding="utf-8-sig")  # (a spreadsheet's byte-order mark)
    except FileNotFoundError:
        raise DataListError(name, None, "the data list does not exist") from None
    except UnicodeDecodeError as exc:
        raise _not_utf8(name, list_path.read_bytes(), exc) from None
    base = str(Path(root) if root is not None else list_path.resolve().parent)
    if list_path.suffix.lower() == ".csv":
        rows = _csv_rows(name, text)
    else:
        rows = _txt_rows(name, text)
    entries = []
    labels: dict[str, str] = {}  # one string per distinct label, not one per line
    for line_no, path, label, raw, error in rows:
        label = labels.setdefault(label, label)
        if error is None and not path:
            error = f"no path in {raw!r}; expected 'path label'"
        elif error is None and not label:
            error = f"missing label in {raw!r}; each line must be 'path label'"
        if error is not None:
            if not skip:
                raise DataListError(name, line_no, error)
            resolved = resolve_path(base, path) if path else ""
            entries.append(Entry(line_no, resolved, "", raw, error=error))
            continue
        entries.append(Entry(line_no, resolve_path(base, path), label, raw))
    if not entries:
        raise DataListError(name, None, "the data list is empty: it names no samples")
    return entries


def _not_utf8(name: str, raw: bytes, exc: UnicodeDecodeError) -> DataListError:
    """The error for a data list that is not UTF-8: the line of the first byte that is not,
    that line as Latin-1 would read it, and how to convert the file."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or raw[:200].count(0) > 20:
        return DataListError(
            name,
            None,
            "the data list is UTF-16 text (as Windows tools save 'Unicode' text), not UTF-8: "
            "save it as UTF-8, for example with `iconv -f UTF-16 -t UTF-8`",
        )
    line_no = raw.count(b"\n", 0, exc.start) + 1
    start = raw.rfind(b"\n", 0, exc.start) + 1
    end = raw.find(b"\n", exc.start)
    line = raw[start : end if end >= 0 else len(raw)].rstrip(b"\r")
    return DataListError(
        name,
        line_no,
        f"byte {raw[exc.start]:#04x} is not UTF-8 text (the line reads "
        f"{line.decode('latin-1')!r} in Latin-1): data lists are UTF-8; convert the file, for "
        "example with `iconv -f LATIN1 -t UTF-8` (or the encoding it was saved in)",
    )


def resolve_path(base: str, path: str) -> str:
    """``str(Path(path))`` when ``path`` is absolute, else ``str(Path(base) / path)``; ``base``
    is a path as ``str(Path(...))`` writes it.

    The same string, without building ``Path`` objects for the paths that need no normalising
    (no empty or ``.`` components): a million data-list lines took 17 s through pathlib, most
    of a large write's start-up."""
    if os.sep == "/" and not (
        "//" in path
        or "/./" in path
        or path.startswith("./")
        or path.endswith(("/", "/."))
        or path == "."
    ):
        if path.startswith("/"):
            return path
        return base + path if base.endswith("/") else f"{base}/{path}"
    return str(Path(path) if os.path.isabs(path) else Path(base) / path)


def _txt_rows(name: str, text: str):
    """``(line, path, label, the line as written, error)`` for each sample line."""
    for line_no, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        parts = line.rsplit(None, 1)
        if len(parts) == 1:
            yield line_no, parts[0], "", raw, None
        else:
            yield line_no, parts[0], parts[1], raw, None


def _csv_rows(name: str, text: str):
    """As :func:`_txt_rows`; a row is numbered by the line it starts on (a quoted cell may run
    over several lines)."""
    reader = csv.reader(io.StringIO(text))
    end = 0
    for row in reader:
        line_no, end = end + 1, reader.line_num
        cells = [c.strip() for c in row]
        if not any(cells):
            continue
        if line_no == 1 and [c.lower() for c in cells[:2]] == ["path", "label"]:
            continue
        raw = ",".join(row)
        if len(cells) > 2:
            error = f"expected two columns (path, label), got {len(cells)}: {row!r}"
            yield line_no, cells[0], "", raw, error
            continue
        yield line_no, cells[0], cells[1] if len(cells) > 1 else "", raw, None


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def read_image_folder(
    folder: str | os.PathLike, exclude: str | os.PathLike | None = None
) -> tuple[list[Entry], list[str]]:
    """An ImageFolder-style directory: one sub-folder per class, labels by sorted folder name.

    Returns the entries (in sorted class, then sorted path order; ``line_no`` is the position)
    and the class names. ``exclude`` (the output directory, when it lies inside ``folder``) is
    not read. A class folder without images is refused, as torchvision's ImageFolder refuses
    it: it would shift the indices of the classes after it.
    """
    root = Path(folder)
    skip: tuple[str, ...] = ()  # the excluded directory's parts, relative to root
    if exclude is not None and Path(exclude).resolve().is_relative_to(root.resolve()):
        skip = Path(exclude).resolve().relative_to(root.resolve()).parts
    classes = sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and (p.name,) != skip
    )
    if not classes:
        raise DataListError(str(root), None, "no class folders: expected root/<class>/<image>")
    entries: list[Entry] = []
    empty = []
    for label, name in enumerate(classes):
        files = sorted(
            p
            for p in _walk(root / name)
            if p.suffix.lower() in IMAGE_EXTENSIONS
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
            and not (skip and p.relative_to(root).parts[: len(skip)] == skip)
        )
        if not files:
            empty.append(name)
        for path in files:
            rel = str(path.relative_to(root))
            entries.append(Entry(len(entries) + 1, str(path), str(label), rel))
    if not entries:
        raise DataListError(str(root), None, f"no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    if empty:
        raise DataListError(
            str(root),
            None,
            f"class folder(s) {', '.join(map(repr, empty))} hold no images "
            f"({', '.join(IMAGE_EXTENSIONS)}); every folder is a class and an empty one would "
            "shift the labels of the classes after it: add its images or move it out",
        )
    return entries, classes


def _walk(folder: Path) -> Iterator[Path]:
    """Every file below ``folder``, following symlinked folders as torchvision's ImageFolder
    does (``os.walk(followlinks=True)``), but each real folder once: a link that leads back up
    would otherwise be walked forever."""
    seen: set[str] = set()
    for top, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        for name in files:
            path = Path(top, name)
            if path.is_file():  # (not a dangling link)
                yield path


def read_iterable(
    items: Iterable[Any], root: str | os.PathLike | None = None, skip: bool = False
) -> list[Entry]:
    """``(path, label)`` pairs or dicts with ``path``, ``label`` and extra fields. With
    ``skip``, an item without a path or a label becomes an entry with its ``error`` set."""
    base = str(Path(root) if root is not None else Path.cwd())
    entries = []
    for position, item in enumerate(items, start=1):
        extras, error, path, label = None, None, "", ""
        if isinstance(item, dict):
            if "path" not in item or "label" not in item:
                error = f"a dict needs 'path' and 'label' keys, got {sorted(item)}"
            else:
                path, label = item["path"], item["label"]
                extras = {k: v for k, v in item.items() if k not in ("path", "label")} or None
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            path, label = item
        else:
            error = f"expected a (path, label) pair or a dict, got {item!r}"
        label = _scalar(label)
        if error is None and extras:
            extras, error = _json_extras(extras)
        if error is None and (label is None or (isinstance(label, str) and not label.strip())):
            error = f"missing label for {path!r}"
        if error is not None:
            if not skip:
                raise DataListError(ITERABLE_NAME, position, error)
            entries.append(Entry(position, "", "", repr(item), error=error))
            continue
        path = os.fspath(path)
        resolved = path if os.path.isabs(path) else resolve_path(base, path)
        entries.append(Entry(position, resolved, str(label).strip(), path, extras))
    if not entries:
        raise DataListError(ITERABLE_NAME, None, "the iterable is empty: it names no samples")
    return entries


def _scalar(value: Any) -> Any:
    """A numpy scalar or one-element array or tensor as the Python number it holds (its
    ``str`` would be ``tensor(3)``, a name); anything else as it is."""
    if isinstance(value, (str, bytes, int, float)) or not hasattr(value, "item"):
        return value
    try:
        return value.item()
    except (ValueError, RuntimeError, TypeError):  # (more than one element: not a label)
        return value


def _plain(value: Any) -> Any:
    """numpy arrays and scalars and tensors, also inside lists and dicts, as the lists and
    numbers JSON stores (the loader gives them back as lists and numbers)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if not isinstance(value, (str, bytes, int, float, bool)) and hasattr(value, "tolist"):
        return value.tolist()
    return value


def _json_extras(extras: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The extra fields as JSON data, or the reason one of them is not JSON data."""
    extras = {key: _plain(value) for key, value in extras.items()}
    for key, value in extras.items():
        try:
            json.dumps(value, allow_nan=False, sort_keys=True)
        except (TypeError, ValueError) as exc:
            return extras, (
                f"extra field {key!r} is not JSON data ({exc}): pass numbers, strings, lists "
                "and dicts of them (numpy arrays and tensors are turned into lists), without "
                "NaN or infinity"
            )
    return extras, None


def missing_file(path: str) -> str | None:
    """Why ``path`` cannot be read as a sample's file, or None when it is a file."""
    if os.path.isfile(path):
        return None
    what = "is a directory" if os.path.isdir(path) else "does not exist"
    return f"file {path} {what}; fix the path or remove the line"


def mark_bad(
    entries: list[Entry], source: str, skip: bool, why: Callable[[Entry], str | None]
) -> list[Entry]:
    """Check each writable entry with ``why`` (its problem, or None): the first problem is
    raised naming its line, or with ``skip`` every problem is kept in its entry's ``error``
    (the writer then skips and reports it)."""
    marked = []
    for e in entries:
        error = why(e) if e.error is None else None
        if error is not None:
            if not skip:
                raise DataListError(source, e.line_no, error)
            e = e._replace(error=error)
        marked.append(e)
    return marked


def same_extra_fields(entries: list[Entry], source: str, skip: bool) -> list[Entry]:
    """Every sample must carry the same extra fields (the loader batches them field by field):
    the most common set of names is the dataset's, a sample with another set is a bad line."""

    def names(e: Entry) -> tuple[str, ...]:
        return tuple(sorted(e.extras or ()))

    if not any(e.extras for e in entries):  # (the common case, at a glance)
        return entries
    counts = Counter(names(e) for e in entries if e.error is None)
    if len(counts) <= 1:
        return entries
    expected = counts.most_common(1)[0][0]
    return mark_bad(
        entries,
        source,
        skip,
        lambda e: (
            None
            if names(e) == expected
            else (
                f"its extra fields {list(names(e))} differ from the other samples' "
                f"{list(expected)}: every sample needs the same fields (the loader batches them); "
                "add the missing ones or remove the line"
            )
        ),
    )


STRAY_SHARE = 100  # at most 1 label in 100 that is not an integer is a stray, not a name


def _integer(text: str) -> str | None:
    """``text`` as the text of the integer label it means (``"2"`` for ``"2"``, ``"2.0"`` and
    ``"+2"``: a float column written by pandas is still class indices), or None."""
    try:
        return str(int(text))
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        return None
    if math.isfinite(value) and value.is_integer() and abs(value) <= 2**53:
        return str(int(value))
    return None


def _digits(text: str) -> bool:
    """An integer label as written in most lists (kept as written: ``007`` stays ``007``)."""
    return text.isascii() and text.isdigit()


def _name_order(name: str) -> tuple[int, Decimal, str]:
    """Names that are numbers come first, in numeric order (``"2"`` before ``"10"``, where
    text order would put ``"10"`` first), then the others in text order."""
    try:
        number = Decimal(name)
    except InvalidOperation:
        return (1, Decimal(0), name)
    return (0, number, name) if number.is_finite() else (1, Decimal(0), name)


def index_labels(
    entries: list[Entry], source: str, skip: bool = False
) -> tuple[list[Entry], list[str] | None]:
    """Integer labels stay as they are (``2.0`` is ``2``); otherwise every distinct label gets
    an index in sorted order (numbers by value, then text), and the names are returned (they
    go into the manifest). A mix of numbers and other names is warned about.

    Labels that are integers but for a few (one line, or at most one in :data:`STRAY_SHARE`)
    are integers: the few are mistakes (a header line, a typo), refused with their line, or
    with ``skip`` marked to be skipped. More of them make every label a name. Only the samples that
    can be written name classes: with ``skip``, a sample whose file is missing (a header line
    such as ``filename,class``, say) is marked to be skipped before the names are counted."""
    valid = [e for e in entries if e.error is None]
    # each distinct label looked at once (a million lines hold a few thousand labels)
    integer = {label: _integer(label) for label in {e.label for e in valid}}
    ints = [e for e in valid if integer[e.label] is not None]

    def as_integers(entries: list[Entry]) -> list[Entry]:
        """``2.0`` as ``2``, for the codecs' ``parse_label``."""
        return [
            e
            if e.error is not None or integer[e.label] is None or _digits(e.label)
            else e.relabeled(integer[e.label])
            for e in entries
        ]

    if len(ints) == len(valid):
        return as_integers(entries), None
    if ints and len(valid) - len(ints) <= max(1, len(valid) // STRAY_SHARE):
        example = ints[0]
        stray = (
            f"is not an integer, unlike the other labels (line {example.line_no}: "
            f"{example.label!r}); fix the label or remove the line"
        )
        marked = mark_bad(
            entries,
            source,
            skip,
            lambda e: None if integer[e.label] is not None else f"label {e.label!r} {stray}",
        )
        return as_integers(marked), None
    if skip:
        entries = mark_bad(entries, source, skip, lambda e: missing_file(e.path))
    order = {label: _name_order(label) for label in {e.label for e in entries if e.error is None}}
    names = sorted(order, key=order.__getitem__)
    if not names:
        return entries, None
    kept = [e for e in entries if e.error is None]
    numbers = [e for e in kept if order[e.label][0] == 0]
    if numbers and len(numbers) < len(kept):
        text = next(e for e in kept if order[e.label][0] == 1)
        warnings.warn(
            f"{source}: {len(numbers)} labels are numbers (line {numbers[0].line_no}: "
            f"{numbers[0].label!r}) and {len(kept) - len(numbers)} are not (line "
            f"{text.line_no}: {text.label!r}), so every label is taken as a class name: the "
            f"numbers first, in numeric order, then the other names. If the numbers are class "
            "indices, fix or remove the other lines",
            stacklevel=4,
        )
    index = {name: str(i) for i, name in enumerate(names)}
    return [e.relabeled(index[e.label]) if e.error is None else e for e in entries], names
