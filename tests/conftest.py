"""Shared fixtures: small datasets of real photographs (crops of scikit-image's bundled photos)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for benchmarks.make_dataset

from benchmarks.make_dataset import make_dataset  # noqa: E402

LEGACY_FIXTURE = REPO.parent / "shared" / "fixtures" / "legacy-0.1"


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory) -> Path:
    """24 JPEGs in 4 class folders, with data_list.txt (``relative/path.jpg LABEL``)."""
    out = tmp_path_factory.mktemp("photos")
    make_dataset(out, num_images=24, num_classes=4, seed=7, workers=1)
    return out


@pytest.fixture
def photos(photo_dir, tmp_path) -> Path:
    """A private copy of the photo dataset (tests may add or break files); its data list path."""
    dst = tmp_path / "photos"
    shutil.copytree(photo_dir, dst)
    return dst / "data_list.txt"


def read_list(list_path: Path) -> list[tuple[Path, int]]:
    """(absolute path, label) of each line of a data list written by make_dataset."""
    out = []
    for line in list_path.read_text().splitlines():
        path, label = line.rsplit(" ", 1)
        out.append((list_path.parent / path, int(label)))
    return out


def run_python(
    code: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter (for anything that may crash or needs a clean process)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def legacy_fixture() -> Path:
    if not LEGACY_FIXTURE.is_dir():
        pytest.fail(f"the legacy fixture is missing: {LEGACY_FIXTURE} (CI runs with ../shared)")
    return LEGACY_FIXTURE


def fingerprint(record) -> tuple[int, int]:
    """(crc of the stored image bytes, label): identifies a record without decoding it."""
    return zlib.crc32(record.protos[0].byte_data), int(record.protos[1].byte_data)


def flip_record_byte(shard: Path, index: int, mask: int = 0x10) -> bytes:
    """Flip bits in the middle of record ``index``'s value (its first part) inside a version 2
    shard file, as a damaged disk would; returns the whole record as it was."""
    import lmdb

    from torchrecord import format as fmt

    env = lmdb.open(str(shard), subdir=False, **fmt.READ_OPTIONS)
    try:
        with env.begin() as txn:
            parts = [txn.get(fmt.record_key(index, 2, part)) for part in range(4)]
    finally:
        env.close()
    head = bytes(parts[0])
    data = bytearray(shard.read_bytes())
    offset = data.find(head)
    assert offset >= 0 and data.find(head, offset + 1) < 0, "the value must occur once"
    data[offset + len(head) // 2] ^= mask
    shard.write_bytes(bytes(data))
    return b"".join(bytes(part) for part in parts if part is not None)
