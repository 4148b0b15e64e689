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
import os
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .errors import DataListError

ITERABLE_NAME = "<iterable>"


@dataclass(frozen=True)
class Entry:
    """One sample of a data list, with where it came from."""

    line_no: int  # 1-based line of a data list, or position in a folder or an iterable
    path: str  # resolved
    label: str
    text: str  # the line as written
    extras: dict[str, Any] | None = None  # extra per-sample fields (from dicts)


def read_data_list(
    data_list: str | os.PathLike, root: str | os.PathLike | None = None
) -> list[Entry]:
    """Parse a data list; raises :class:`DataListError` naming the file and line."""
    list_path = Path(data_list)
    name = str(list_path)
    try:
        text = list_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataListError(name, None, "the data list does not exist") from None
    except UnicodeDecodeError as exc:
        raise DataListError(name, None, f"the data list is not UTF-8 text ({exc})") from None
    base = str(Path(root) if root is not None else list_path.resolve().parent)
    if list_path.suffix.lower() == ".csv":
        rows = _csv_rows(name, text)
    else:
        rows = _txt_rows(name, text)
    entries = []
    for line_no, path, label, raw in rows:
        if not path:
            raise DataListError(name, line_no, f"no path in {raw!r}; expected 'path label'")
        if not label:
            raise DataListError(
                name, line_no, f"missing label in {raw!r}; each line must be 'path label'"
            )
        entries.append(Entry(line_no, resolve_path(base, path), label, raw))
    if not entries:
        raise DataListError(name, None, "the data list is empty: it names no samples")
    return entries


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
    for line_no, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        parts = line.rsplit(None, 1)
        if len(parts) == 1:
            yield line_no, parts[0], "", raw
        else:
            yield line_no, parts[0], parts[1], raw


def _csv_rows(name: str, text: str):
    reader = csv.reader(io.StringIO(text))
    for row in reader:
        line_no = reader.line_num
        cells = [c.strip() for c in row]
        if not any(cells):
            continue
        if line_no == 1 and [c.lower() for c in cells[:2]] == ["path", "label"]:
            continue
        if len(cells) > 2:
            raise DataListError(
                name, line_no, f"expected two columns (path, label), got {len(cells)}: {row!r}"
            )
        yield line_no, cells[0], cells[1] if len(cells) > 1 else "", ",".join(row)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def read_image_folder(folder: str | os.PathLike) -> tuple[list[Entry], list[str]]:
    """An ImageFolder-style directory: one sub-folder per class, labels by sorted folder name.

    Returns the entries (in sorted class, then sorted path order; ``line_no`` is the position)
    and the class names.
    """
    root = Path(folder)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataListError(str(root), None, "no class folders: expected root/<class>/<image>")
    entries: list[Entry] = []
    for label, name in enumerate(classes):
        files = sorted(
            p
            for p in (root / name).rglob("*")
            if p.is_file()
            and p.suffix.lower() in IMAGE_EXTENSIONS
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
        for path in files:
            rel = str(path.relative_to(root))
            entries.append(Entry(len(entries) + 1, str(path), str(label), rel))
    if not entries:
        raise DataListError(str(root), None, f"no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    return entries, classes


def read_iterable(items: Iterable[Any], root: str | os.PathLike | None = None) -> list[Entry]:
    """``(path, label)`` pairs or dicts with ``path``, ``label`` and extra fields."""
    base = str(Path(root) if root is not None else Path.cwd())
    entries = []
    for position, item in enumerate(items, start=1):
        extras = None
        if isinstance(item, dict):
            if "path" not in item or "label" not in item:
                raise DataListError(
                    ITERABLE_NAME,
                    position,
                    f"a dict needs 'path' and 'label' keys, got {sorted(item)}",
                )
            path, label = item["path"], item["label"]
            extras = {k: v for k, v in item.items() if k not in ("path", "label")} or None
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            path, label = item
        else:
            raise DataListError(
                ITERABLE_NAME, position, f"expected a (path, label) pair or a dict, got {item!r}"
            )
        if label is None or (isinstance(label, str) and not label.strip()):
            raise DataListError(ITERABLE_NAME, position, f"missing label for {path!r}")
        path = os.fspath(path)
        resolved = path if os.path.isabs(path) else resolve_path(base, path)
        entries.append(Entry(position, resolved, str(label).strip(), path, extras))
    if not entries:
        raise DataListError(ITERABLE_NAME, None, "the iterable is empty: it names no samples")
    return entries


def index_labels(entries: list[Entry]) -> tuple[list[Entry], list[str] | None]:
    """Integer labels stay as they are; otherwise every distinct label gets an index in sorted
    order, and the names are returned (they go into the manifest)."""

    def is_int(text: str) -> bool:
        try:
            int(text)
        except ValueError:
            return False
        return True

    if all(is_int(e.label) for e in entries):
        return entries, None
    names = sorted({e.label for e in entries})
    index = {name: str(i) for i, name in enumerate(names)}
    return [replace(e, label=index[e.label]) for e in entries], names
