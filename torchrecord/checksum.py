"""The CRC-32 of records (``format.CHECKSUM_ALGORITHM``): zlib's CRC-32, the value
``zlib.crc32`` gives, computed by zlib-ng when the optional ``zlib-ng`` package is installed
(``pip install torchrecord[fast]``).

zlib-ng computes the same CRC-32 with the CPU's carry-less multiply instructions: measured here
(2026-12-07, AMD EPYC) 54 GB/s against 6 GB/s for Python's ``zlib`` (the system's zlib 1.2.13),
which made the check a sixth of a DataLoader worker's time with ``raw_rgb`` records of 454 KB.
The values are the same, so datasets written with one are read with the other; the choice is
checked against ``zlib.crc32`` once, on import, and ``TORCHRECORD_CRC32=zlib`` in the environment
keeps Python's own (to compare the two, or to rule one out).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable

ENV = "TORCHRECORD_CRC32"


def _choose() -> tuple[str, Callable[..., int]]:
    wanted = os.environ.get(ENV, "").strip().lower()
    if wanted not in ("", "zlib", "zlib-ng"):
        raise ValueError(f"{ENV}={wanted!r}: use 'zlib' or 'zlib-ng', or leave it unset")
    if wanted == "zlib":
        return "zlib", zlib.crc32
    try:
        from zlib_ng.zlib_ng import crc32 as fast
    except ImportError:
        if wanted == "zlib-ng":
            raise ImportError(
                f"{ENV}=zlib-ng, but the zlib-ng package is not installed: "
                "pip install 'torchrecord[fast]' (or zlib-ng)"
            ) from None
        return "zlib", zlib.crc32
    # a build that disagrees with zlib on anything would report sound records as damaged
    # (or the reverse): checked on lengths around its vector widths, and with a start value
    sample = bytes(range(256)) * 33 + b"torchrecord"
    for cut in (0, 1, 15, 16, 17, 63, 64, 65, 255, 4096, len(sample)):
        part = sample[:cut]
        if fast(part) != zlib.crc32(part) or fast(part, 0x1234ABCD) != zlib.crc32(part, 0x1234ABCD):
            if wanted == "zlib-ng":
                raise ImportError(
                    f"{ENV}=zlib-ng, but this zlib-ng's CRC-32 differs from zlib's (on "
                    f"{cut} bytes): reinstall zlib-ng, or unset {ENV} to use Python's zlib"
                )
            import warnings

            warnings.warn(
                f"zlib-ng's CRC-32 differs from zlib's here (on {cut} bytes): TorchRecord "
                "uses Python's zlib instead; reinstall zlib-ng to check records faster",
                RuntimeWarning,
                stacklevel=2,
            )
            return "zlib", zlib.crc32
    return "zlib-ng", fast


# ``crc32(data, value=0)``: ``zlib.crc32``'s value, by zlib-ng where it is installed
IMPLEMENTATION, crc32 = _choose()
