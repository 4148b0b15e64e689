"""Data lists: the ``path label`` files the Writer reads, parsed with their line numbers.

``.txt``: one sample per line, the label is the last whitespace-separated token and the path is
everything before it (so paths may contain spaces). ``.csv``: two columns, path and label, an
optional ``path,label`` header. Blank lines are ignored. Relative paths resolve against the data
list's folder, or against ``root`` when given.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import DataListError


@dataclass(frozen=True)
class Entry:
    """One sample of a data list, with where it came from."""

    line_no: int
    path: str  # resolved
    label: str
    text: str  # the line as written


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
    base = Path(root) if root is not None else list_path.resolve().parent
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
        resolved = Path(path) if os.path.isabs(path) else base / path
        entries.append(Entry(line_no, str(resolved), label, raw))
    if not entries:
        raise DataListError(name, None, "the data list is empty: it names no samples")
    return entries


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
