"""Generate a deterministic, CUB-200-like JPEG image dataset for benchmarks and tests.

TorchRecord packs folders of images into LMDB shards.  To benchmark (and test) that on
something that looks like a real fine-grained classification dataset -- a few hundred
classes, ~12k JPEGs of 300-500 px per side, ~30-60 KB each -- without downloading anything,
this module synthesises one from the colour photographs bundled with scikit-image
(``skimage.data``).  Every image is a random crop of one source photo, rescaled to a random
size, randomly flipped, mildly colour-jittered and saved at a random JPEG quality, so the
files have realistic content, sizes and compression statistics.

Layout written to ``out_dir``::

    000.class_000/class_000_00000.jpg
    000.class_000/class_000_00001.jpg
    ...
    199.class_199/class_199_00058.jpg
    data_list.txt          # "relative/path.jpg LABEL" per line, sorted by path
    .make_dataset.json     # stamp: parameters of the finished run (written last)

The output is byte-identical for a given ``seed`` regardless of the number of worker
processes, because each image's randomness is derived only from ``(seed, index)``.  If the
stamp records the same parameters, a repeated call returns immediately.

Command line::

    python -m benchmarks.make_dataset OUT_DIR [--num-images N] [--num-classes K]
                                              [--seed S] [--workers W]
"""

from __future__ import annotations

import argparse
import functools
import importlib.resources
import io
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

# Bumped whenever the generation procedure changes, so stale stamps are not trusted.
GENERATOR_VERSION = 1
STAMP_NAME = ".make_dataset.json"

# Real colour photographs shipped inside scikit-image.  Synthetic images (color.png,
# chessboard_RGB.png, phantom.png, logo.png) and greyscale ones are deliberately excluded.
SOURCE_PHOTOS: tuple[str, ...] = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "retina.jpg",
    "rocket.jpg",
)
MIN_SOURCE_SIDE = 300

CROP_FRACTION = (0.35, 1.0)  # fraction of each source side kept by the random crop
OUT_WIDTH = (300, 500)  # inclusive range of output widths
OUT_HEIGHT = (250, 500)  # inclusive range of output heights
JITTER = 0.15  # brightness / contrast / saturation factors in [1 - JITTER, 1 + JITTER]
JPEG_QUALITY = (75, 95)  # inclusive

_CLASS_DIR_RE = re.compile(r"^\d+\.class_\d+$")


def _is_colour(img: Image.Image) -> bool:
    """True if ``img`` (RGB) has real colour content, not just grey stored as RGB."""
    arr = np.asarray(img, dtype=np.int16)
    spread = np.abs(arr[..., 0] - arr[..., 1]).mean() + np.abs(arr[..., 1] - arr[..., 2]).mean()
    return bool(spread > 1.0)


@functools.cache
def load_sources() -> tuple[tuple[str, Image.Image], ...]:
    """Decode the usable source photographs once per process: ``((name, RGB image), ...)``."""
    data_dir = importlib.resources.files("skimage.data")
    sources: list[tuple[str, Image.Image]] = []
    for name in SOURCE_PHOTOS:
        resource = data_dir / name
        if not resource.is_file():
            continue
        with resource.open("rb") as fh, Image.open(fh) as im:
            if im.mode != "RGB":
                continue
            if min(im.size) < MIN_SOURCE_SIDE:
                continue
            img = im.copy()
        img.load()
        if _is_colour(img):
            sources.append((name, img))
    if not sources:
        raise RuntimeError("no usable colour photographs found in skimage.data")
    return tuple(sources)


def _class_dir(label: int, num_classes: int) -> str:
    width = max(3, len(str(num_classes - 1)))
    return f"{label:0{width}d}.class_{label:0{width}d}"


def _layout(num_images: int, num_classes: int) -> list[tuple[str, int]]:
    """Relative path and label of every image, in index order (== sorted path order).

    Images are assigned to classes in contiguous, evenly sized blocks (sizes differ by at
    most one), so index order, label order and sorted path order all agree.
    """
    width = max(3, len(str(num_classes - 1)))
    per_class = -(-num_images // num_classes)
    idx_width = max(5, len(str(per_class)))
    items: list[tuple[str, int]] = []
    start = 0
    for label in range(num_classes):
        stop = (label + 1) * num_images // num_classes
        folder = _class_dir(label, num_classes)
        for j in range(stop - start):
            name = f"class_{label:0{width}d}_{j:0{idx_width}d}.jpg"
            items.append((f"{folder}/{name}", label))
        start = stop
    return items


def render_image(seed: int, index: int) -> bytes:
    """Return the JPEG bytes of image ``index``; depends only on ``(seed, index)``."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    sources = load_sources()
    _, src = sources[int(rng.integers(len(sources)))]
    sw, sh = src.size

    cw = max(1, round(sw * rng.uniform(*CROP_FRACTION)))
    ch = max(1, round(sh * rng.uniform(*CROP_FRACTION)))
    left = int(rng.integers(sw - cw + 1))
    top = int(rng.integers(sh - ch + 1))
    out_w = int(rng.integers(OUT_WIDTH[0], OUT_WIDTH[1] + 1))
    out_h = int(rng.integers(OUT_HEIGHT[0], OUT_HEIGHT[1] + 1))
    flip = bool(rng.random() < 0.5)
    brightness, contrast, saturation = rng.uniform(1.0 - JITTER, 1.0 + JITTER, size=3)
    quality = int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))

    img = src.resize(
        (out_w, out_h),
        Image.Resampling.LANCZOS,
        box=(left, top, left + cw, top + ch),
    )
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img = ImageEnhance.Brightness(img).enhance(float(brightness))
    img = ImageEnhance.Contrast(img).enhance(float(contrast))
    img = ImageEnhance.Color(img).enhance(float(saturation))

    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _write_one(job: tuple[Path, int, int, str]) -> int:
    out_dir, seed, index, rel_path = job
    data = render_image(seed, index)
    (out_dir / rel_path).write_bytes(data)
    return len(data)


def _worker_init() -> None:
    load_sources()  # no-op after fork (inherited cache); decodes once under spawn


def _params(num_images: int, num_classes: int, seed: int, list_name: str) -> dict[str, object]:
    return {
        "generator_version": GENERATOR_VERSION,
        "num_images": num_images,
        "num_classes": num_classes,
        "seed": seed,
        "list_name": list_name,
        "sources": [name for name, _ in load_sources()],
    }


def _read_stamp(path: Path) -> dict[str, object] | None:
    try:
        stamp = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def make_dataset(
    out_dir: str | os.PathLike[str],
    num_images: int = 11788,
    num_classes: int = 200,
    seed: int = 0,
    list_name: str = "data_list.txt",
    workers: int | None = os.cpu_count(),
    verbose: bool = False,
) -> Path:
    """Write the dataset into ``out_dir`` and return the path of its data list.

    Skips all work if ``out_dir`` already holds a finished dataset with the same
    parameters.  ``workers`` only affects speed, never the output bytes.
    """
    if num_classes < 1 or num_images < num_classes:
        raise ValueError("need num_classes >= 1 and num_images >= num_classes")
    out = Path(out_dir)
    list_path = out / list_name
    stamp_path = out / STAMP_NAME
    params = _params(num_images, num_classes, seed, list_name)

    old_stamp = _read_stamp(stamp_path)
    if list_path.is_file() and old_stamp == params:
        if verbose:
            print(f"make_dataset: {out} is up to date, skipping")
        return list_path

    out.mkdir(parents=True, exist_ok=True)
    if old_stamp is not None:
        # The directory holds an earlier (different) run of ours: drop its class folders so
        # no stale images are left behind.
        stamp_path.unlink()
        for child in out.iterdir():
            if child.is_dir() and _CLASS_DIR_RE.match(child.name):
                shutil.rmtree(child)

    items = _layout(num_images, num_classes)
    for label in range(num_classes):
        (out / _class_dir(label, num_classes)).mkdir(exist_ok=True)

    start = time.perf_counter()
    jobs = [(out, seed, i, rel) for i, (rel, _) in enumerate(items)]
    workers = max(1, min(workers or 1, len(jobs)))
    if workers > 1:
        with multiprocessing.Pool(workers, initializer=_worker_init) as pool:
            sizes = pool.map(_write_one, jobs, chunksize=max(1, len(jobs) // (workers * 8)))
    else:
        sizes = [_write_one(job) for job in jobs]
    elapsed = time.perf_counter() - start

    tmp_list = list_path.with_name(list_path.name + ".tmp")
    tmp_list.write_text("".join(f"{rel} {label}\n" for rel, label in items))
    os.replace(tmp_list, list_path)
    stamp_path.write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")  # last

    if verbose:
        total = sum(sizes)
        print(
            f"make_dataset: wrote {len(sizes)} images in {elapsed:.1f}s, "
            f"mean {total / len(sizes) / 1024:.1f} KB"
        )
    return list_path


def make_tiny_dataset(
    out_dir: str | os.PathLike[str],
    num_images: int = 24,
    num_classes: int = 4,
    seed: int = 0,
) -> Path:
    """Small dataset for unit tests (same image sizes, single process)."""
    return make_dataset(out_dir, num_images, num_classes, seed, workers=1)


def _summary(list_path: Path, seconds: float) -> str:
    root = list_path.parent
    rels, labels = [], set()
    for line in list_path.read_text().splitlines():
        rel, label = line.rsplit(" ", 1)
        rels.append(rel)
        labels.add(int(label))
    total = sum((root / rel).stat().st_size for rel in rels)
    mean_kb = total / max(1, len(rels)) / 1024
    return (
        f"{root}: {len(rels)} images, {len(labels)} classes, {total / 1e6:.1f} MB total, "
        f"mean {mean_kb:.1f} KB, {seconds:.1f} s"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.make_dataset",
        description="Generate a deterministic CUB-200-like JPEG dataset from skimage photos.",
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--num-images", type=int, default=11788)
    parser.add_argument("--num-classes", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)

    start = time.perf_counter()
    list_path = make_dataset(
        args.out_dir,
        num_images=args.num_images,
        num_classes=args.num_classes,
        seed=args.seed,
        workers=args.workers,
    )
    print(_summary(list_path, time.perf_counter() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
