"""The limit: images/s on one core for each read-time pipeline, with the data already in memory.

Each pipeline turns stored bytes into a 3x224x224 image tensor. Timed one step at a time
(decode, resize, to-tensor) over the same images, single-threaded, in this process, so the sum
is what one DataLoader worker can do at best; twice that is the 2-core ideal a loader with two
workers could approach if reading, transport and collation were free.
"""

from __future__ import annotations

import io
import itertools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PIPELINES = {
    "PIL (jpeg)": "PIL decode + convert RGB, Resize((224, 224)), ToTensor()",
    "PIL (raw)": "Image.frombytes, Resize((224, 224)), ToTensor()",
    "tensor (jpeg)": "torchvision.io.decode_jpeg, antialiased tensor resize, float / 255",
    "tensor (raw)": "torch.frombuffer view, antialiased tensor resize, float / 255",
    "tensor uint8 (jpeg)": "torchvision.io.decode_jpeg, antialiased tensor resize",
    "tensor uint8 (raw)": "torch.frombuffer view, antialiased tensor resize",
    # The resize gives its uint8 image in height-width-channel order (strides (1, 672, 3));
    # `float()` keeps that order, so "float / 255" above yields no 3 x 224 x 224 tensor in
    # channel order, which ToTensor (the PIL rows) and the loaders yield. These two do, into
    # the rows of batches allocated once (4 batches of 32 used in turn), as a loader does.
    "tensor (jpeg), CHW": "as tensor (jpeg), the float / 255 into a 3x224x224 row of a batch",
    "tensor (raw), CHW": "as tensor (raw), the float / 255 into a 3x224x224 row of a batch",
}


def _time_steps(
    items: list[Any], steps: list[tuple[str, Callable[[Any], Any]]], repeats: int = 3
) -> dict[str, float]:
    """Seconds per image for each step (median of ``repeats`` passes), chained in order."""
    import statistics

    per_step: dict[str, list[float]] = {name: [] for name, _ in steps}
    for _ in range(repeats):
        values = items
        for name, fn in steps:
            started = time.perf_counter()
            values = [fn(v) for v in values]
            per_step[name].append((time.perf_counter() - started) / len(items))
    return {name: statistics.median(times) for name, times in per_step.items()}


def limit_meter(
    jpeg_files: list[Path], count: int = 300
) -> Callable[..., dict[str, dict[str, float]]]:
    """A function that measures the limits each time it is called, ``{pipeline: {step: seconds
    per image, ..., "total": ..., "images_per_s": ...}}``, over the same ``count`` images read
    and decoded once here: so a benchmark can measure them next to each of its rounds, under
    the same conditions as the loaders."""
    import torch
    import torchvision.transforms as tvt
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg

    from torchrecord.transforms import resize_224, tensor_view

    datas = [p.read_bytes() for p in jpeg_files[:count]]
    raws = []
    for data in datas:
        with Image.open(io.BytesIO(data)) as img:
            rgb = img.convert("RGB")
        raws.append((rgb.tobytes(), rgb.size))
    resize, to_tensor = tvt.Resize((224, 224)), tvt.ToTensor()

    def pil_decode(data: bytes) -> Any:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")

    def raw_view(item: tuple[bytes, tuple[int, int]]) -> Any:
        data, (width, height) = item
        return tensor_view(data).view(height, width, 3).permute(2, 0, 1)

    def jpeg_tensor(data: bytes) -> Any:
        return decode_jpeg(tensor_view(data), mode=ImageReadMode.RGB)

    def to_float(t: Any) -> Any:
        return t.float().div_(255)

    # rows of batches of 32, in 4 buffers used in turn, as a loader worker writes its batches
    batch_rows = torch.zeros((4 * 32, 3, 224, 224))  # (zeros: every page touched once before)
    written = itertools.count()

    def to_float_chw(t: Any) -> Any:  # (one pass, as the loaders write a batch's row)
        return torch.div(t, 255, out=batch_rows[next(written) % len(batch_rows)])

    plans = {
        "PIL (jpeg)": (
            datas,
            [("decode", pil_decode), ("resize", resize), ("to-tensor", to_tensor)],
        ),
        "PIL (raw)": (
            raws,
            [
                ("decode", lambda r: Image.frombytes("RGB", r[1], r[0])),
                ("resize", resize),
                ("to-tensor", to_tensor),
            ],
        ),
        "tensor (jpeg)": (
            datas,
            [("decode", jpeg_tensor), ("resize", resize_224), ("to-tensor", to_float)],
        ),
        "tensor (raw)": (
            raws,
            [("decode", raw_view), ("resize", resize_224), ("to-tensor", to_float)],
        ),
        "tensor uint8 (jpeg)": (datas, [("decode", jpeg_tensor), ("resize", resize_224)]),
        "tensor uint8 (raw)": (raws, [("decode", raw_view), ("resize", resize_224)]),
        "tensor (jpeg), CHW": (
            datas,
            [("decode", jpeg_tensor), ("resize", resize_224), ("to-tensor", to_float_chw)],
        ),
        "tensor (raw), CHW": (
            raws,
            [("decode", raw_view), ("resize", resize_224), ("to-tensor", to_float_chw)],
        ),
    }

    def measure(repeats: int = 3) -> dict[str, dict[str, float]]:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one core: what one DataLoader worker gets
        try:
            results = {}
            for name, (items, steps) in plans.items():
                _time_steps(items[:20], steps, repeats=1)  # warm-up
                timing = _time_steps(items, steps, repeats)
                timing["total"] = sum(timing.values())
                timing["images_per_s"] = 1.0 / timing["total"]
                results[name] = timing
            return results
        finally:
            torch.set_num_threads(threads)  # (the calling process's own work goes on)

    return measure
