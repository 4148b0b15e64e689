"""The writing process's memory: records of raw pixels are not faulted in page by page anew, and a
data list's entries are compact.

Counted, not timed: page faults (each 4 KiB page that glibc maps afresh for a block costs one
minor fault, and a page it keeps in its heap costs none the next time), and the bytes that
``tracemalloc`` sees allocated."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import pytest
from conftest import read_list

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")

# what the page-fault tests count is glibc's own behaviour, on pages of 4 KiB that are not
# merged into huge ones behind its back
glibc_pages = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc"
    or _PAGE != 4096
    or (_THP.exists() and "[always]" in _THP.read_text()),
    reason="counts glibc's page faults on 4 KiB pages (Linux with glibc, huge pages not always)",
)


def _plain_allocator_env() -> dict[str, str]:
    """The environment without settings that change the allocator (``MALLOC_*`` and glibc's
    tunables set its limits, which turns its own adjustment off; a preloaded allocator is
    another one)."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD")
    }


def _run_plain(code: str):
    """``run_python`` with :func:`_plain_allocator_env` (the child gets only that)."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-c", code],
        env=_plain_allocator_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


# allocates batches of 16 blocks of 1 MB, frees each batch, 10 times over; prints the minor page
# faults this took (each block is written, so every page mapped afresh faults once)
_CHURN = """
import json, resource, sys
from torchrecord import clib
PRELUDE
src = bytes(range(256)) * 4096
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    batch = [src[i:] for i in range(16)]  # 16 fresh blocks of about 1 MB, each copied into
    del batch
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))
"""


def _churn(prelude: str = "") -> int:
    """The page faults of the batches of blocks, after running ``prelude``."""
    result = _run_plain(_CHURN.replace("PRELUDE", prelude))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


@glibc_pages
def test_heap_keeps_batches_of_large_blocks():
    pages = 10 * 16 * 256  # 4 KiB pages written in all
    without, called = _churn(), _churn("clib.let_heap_keep_large_blocks()")
    # the control: glibc by itself maps most of them afresh (it raises its limits only to the
    # size of one block, and a freed batch is more than it keeps)
    assert without > pages // 2, f"{without} faults for {pages} pages: glibc changed?"
    # after the call only the first batch's pages fault
    assert called < pages // 5, f"{called} faults for {pages} pages"


@glibc_pages
def test_only_a_write_of_large_records_keeps_large_blocks(photos, tmp_path):
    """A write of JPEGs (tens of KB a record) leaves the process's heap as it was; a write of
    raw pixels (hundreds of KB) has it keep large blocks from then on."""
    pages = 10 * 16 * 256

    def after(codec: str) -> int:
        out = tmp_path / codec
        return _churn(
            "from torchrecord import Writer\n"
            f"m = Writer({str(photos)!r}, {str(out)!r}, db_num=2, codec={codec!r}, "
            "progress=False).write()\n"
            "print(sum(s.num_records for s in m.shards))"
        )

    assert after("jpeg") > pages // 2
    assert after("raw_rgb") < pages // 5
    assert len(list((tmp_path / "raw_rgb").glob("shard-*.lmdb"))) == 2


def _write_faults(list_path, out) -> tuple[int, int, int]:
    """A one-process ``raw_rgb`` write in a fresh interpreter: (minor page faults during the
    write, records, bytes written)."""
    code = f"""
import json, resource
from torchrecord import Writer
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
manifest = Writer({str(list_path)!r}, {str(out)!r}, db_num=2, shuffle=False, codec="raw_rgb",
                  progress=False).write()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps([faults, sum(s.num_records for s in manifest.shards),
                  sum(s.bytes for s in manifest.shards)]))
"""
    result = _run_plain(code)
    assert result.returncode == 0, result.stderr
    return tuple(json.loads(result.stdout))


@glibc_pages
def test_one_process_raw_write_does_not_fault_per_record(photo_dir, tmp_path):
    """One-process ``raw_rgb`` writes of 48 and of 144 photos of 1024x768 (108 and 324 MB of
    pixels): the page faults of the 216 MB more stay far below one per page (256 per MB; 528
    per MB before the heap kept its blocks, 0.9 after). The first batches' pages fault in
    both."""
    from PIL import Image

    big = tmp_path / "big"
    big.mkdir()
    lines = []
    for i, (path, label) in enumerate(read_list(photo_dir / "data_list.txt") * 2):
        with Image.open(path) as im:
            im.convert("RGB").resize((1024, 768)).save(big / f"{i:03d}.jpg", quality=90)
        lines.append(f"{big / f'{i:03d}.jpg'} {label}\n")
    (tmp_path / "small.txt").write_text("".join(lines))
    (tmp_path / "large.txt").write_text("".join(lines * 3))
    small = _write_faults(tmp_path / "small.txt", tmp_path / "small")
    large = _write_faults(tmp_path / "large.txt", tmp_path / "large")
    assert (small[1], large[1]) == (48, 144)
    assert large[2] - small[2] > 96 * 1024 * 768 * 3
    per_mb = (large[0] - small[0]) / ((large[2] - small[2]) / 2**20)
    assert per_mb < 32, f"{small}, {large}: {per_mb:.0f} page faults per MB written"


def test_data_list_entries_are_compact(tmp_path):
    """A data list's entries cost little beyond their path and line (a million-line list is
    held whole while it is written): 134 bytes each here, 206 when each was a dataclass
    instance with its own label string."""
    import gc
    import sys
    import tracemalloc

    from torchrecord.datalist import read_data_list

    lines = [f"class_{i % 50:03d}/image_{i:06d}.jpg {i % 50}\n" for i in range(20000)]
    (tmp_path / "list.txt").write_text("".join(lines))
    gc.collect()
    tracemalloc.start()
    try:
        entries = read_data_list(tmp_path / "list.txt")
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(entries) == 20000
    assert entries[123].label == "23" and entries[123].path.endswith("class_023/image_000123.jpg")
    assert entries[123].text == lines[123].rstrip("\n") and entries[123].line_no == 124
    strings = sum(sys.getsizeof(e.path) + sys.getsizeof(e.text) for e in entries)
    per_entry = (held - strings) / len(entries)
    assert per_entry < 150, f"{per_entry:.0f} bytes per entry beyond its path and line"
