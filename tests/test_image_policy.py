"""Image policy at write time: a maximum resolution, and the per-image ``smart`` codec."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
from conftest import read_list
from PIL import Image

from torchrecord import DataListError, RecordCorruptedError, TorchRecordError, TRDataset, Writer
from torchrecord.codecs.base import fit


def test_max_size_for_raw_rgb_scales_with_lanczos(photos, tmp_path):
    out = tmp_path / "raw"
    manifest = Writer(photos, out, codec="raw_rgb", max_size=200, shuffle=False).write()
    assert manifest.extra["image_policy"] == {"max_size": 200}
    dataset = TRDataset(out, transform=None)
    for i, (path, _) in enumerate(read_list(photos)):
        record = dataset[i]
        with Image.open(path) as img:
            expected = fit(img.convert("RGB"), 200)
        assert max(record.protos[0].dims) == 200
        assert record.protos[0].byte_data == expected.tobytes()


def test_max_size_for_jpeg_reencodes_only_what_it_resizes(photos, tmp_path):
    samples = read_list(photos)
    sizes = [Image.open(p).size for p, _ in samples]
    limit = sorted(max(s) for s in sizes)[len(sizes) // 2]  # about half the images are larger
    out = tmp_path / "jpeg"
    manifest = Writer(photos, out, codec="jpeg", max_size=limit, quality=80, shuffle=False).write()
    assert manifest.extra["image_policy"] == {"max_size": limit, "quality": 80}
    dataset = TRDataset(out, transform=None)
    kept = resized = 0
    for i, ((path, label), size) in enumerate(zip(samples, sizes)):
        record = dataset[i]
        data = record.protos[0].byte_data
        if max(size) <= limit:
            assert data == path.read_bytes()
            kept += 1
        else:
            with Image.open(io.BytesIO(data)) as img:
                assert img.format == "JPEG" and max(img.size) == limit
                assert tuple(record.protos[0].dims) == img.size
            resized += 1
        assert int(record.protos[1].byte_data) == label
    assert kept and resized
    image, _ = TRDataset(out)[0]
    assert image.shape == (3, 224, 224)


def test_smart_stores_small_images_raw_and_large_ones_as_jpeg(photos, tmp_path):
    samples = read_list(photos)
    pixels = sorted(w * h for w, h in (Image.open(p).size for p, _ in samples))
    threshold = pixels[len(pixels) // 2]
    out = tmp_path / "smart"
    manifest = Writer(photos, out, codec="smart", raw_below=threshold, shuffle=False).write()
    assert manifest.extra["image_policy"]["raw_below"] == threshold
    dataset = TRDataset(out, transform=None)
    kinds = set()
    for i, (path, _) in enumerate(samples):
        record = dataset[i]
        with Image.open(path) as img:
            rgb = img.convert("RGB")
        if rgb.width * rgb.height <= threshold:
            assert record.protos[0].name == "" and record.protos[0].byte_data == rgb.tobytes()
        else:
            assert record.protos[0].name == "jpeg"
            assert record.protos[0].byte_data == path.read_bytes()
        kinds.add(record.protos[0].name)
        # both kinds read back through the codec, whatever each record holds
        assert dataset.reader.codec.decode_image(record).tobytes() == rgb.tobytes()
    assert kinds == {"", "jpeg"}
    images = [TRDataset(out)[i][0] for i in range(3)]
    assert all(image.shape == (3, 224, 224) for image in images)


def test_policy_options_are_checked(photos, tmp_path):
    with pytest.raises(ValueError, match="max_size must be at least 1"):
        Writer(photos, tmp_path / "o", max_size=0, shuffle=False)
    with pytest.raises(ValueError, match="need a codec"):
        Writer(
            photos, tmp_path / "o", max_size=100, data_process_func=lambda line: None, shuffle=False
        )


@pytest.mark.parametrize(
    ("codec", "options"),
    [("jpeg", {}), ("raw_rgb", {}), ("raw_rgb", {"max_size": 64})],
)
def test_a_quality_that_would_not_be_used_is_refused(photos, tmp_path, codec, options):
    """JPEG quality applies to images re-encoded because of max_size (jpeg) or stored as JPEG
    by smart; anywhere else it used to be dropped without a word."""
    with pytest.raises(ValueError, match="quality=80 would not be used"):
        Writer(photos, tmp_path / "out", codec=codec, quality=80, **options)
    assert not (tmp_path / "out").exists()
    Writer(
        photos, tmp_path / "smart", codec="smart", quality=80, shuffle=False
    )  # used there: accepted


@pytest.mark.parametrize("codec", ["jpeg", "raw_rgb", "smart"])
def test_images_beyond_pillows_pixel_limit_are_refused_unless_max_size_shrinks_them(
    photos, tmp_path, monkeypatch, codec
):
    """Pillow refuses to open an image of more than twice PIL.Image.MAX_IMAGE_PIXELS (its
    decompression-bomb check). Here the limit is lowered to make the photos such images: every
    codec refuses them with that explanation (the jpeg codec used to store them, so that the
    pil transform failed at read time), and max_size, which shrinks them, writes them."""
    samples = read_list(photos)
    width, height = Image.open(samples[0][0]).size
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", width * height // 3)
    with pytest.raises(DataListError, match=r"data_list\.txt:1: .* beyond Pillow's decompression"):
        Writer(photos, tmp_path / "refused", codec=codec, shuffle=False).write()
    assert not (tmp_path / "refused").exists()

    Writer(photos, tmp_path / "small", codec=codec, max_size=64, shuffle=False).write()
    dataset = TRDataset(tmp_path / "small", transform="pil")
    for i, (_, label) in enumerate(samples):
        image, got = dataset[i]
        assert got == label and image.shape == (3, 224, 224)
        assert max(TRDataset(tmp_path / "small", transform=None)[i].protos[0].dims) == 64


def _warning_size_between(samples) -> tuple[int, set[str]]:
    """A PIL.Image.MAX_IMAGE_PIXELS under which some photos are beyond Pillow's warning size
    and none beyond its limit (twice that), and the paths of those beyond it."""
    pixels = {str(path): Image.open(path).size for path, _ in samples}
    pixels = {path: w * h for path, (w, h) in pixels.items()}
    warning_size = max(pixels.values()) // 2 + 1
    over = {path for path, n in pixels.items() if n > warning_size}
    assert 0 < len(over) < len(pixels), sorted(pixels.values())  # (the test means something)
    return warning_size, over


@pytest.mark.parametrize("max_size", [None, 64])
@pytest.mark.parametrize("codec", ["jpeg", "raw_rgb", "raw_rgb with libjpeg", "smart"])
def test_images_beyond_pillows_warning_size_are_written_and_named_in_a_warning(
    photos, tmp_path, monkeypatch, codec, max_size
):
    from torchrecord.codecs import raw_rgb

    samples = read_list(photos)
    warning_size, over = _warning_size_between(samples)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", warning_size)
    monkeypatch.setattr(raw_rgb, "_libjpeg_on", raw_rgb._libjpeg_on)  # (restored after)
    monkeypatch.setattr(raw_rgb, "_libjpeg_chosen", raw_rgb._libjpeg_chosen)
    raw_rgb.use_libjpeg(codec.endswith("libjpeg") or False)  # (its walk gives up: Pillow)
    codec = codec.split()[0]
    with pytest.warns(Image.DecompressionBombWarning) as caught:
        Writer(photos, tmp_path / "out", codec=codec, max_size=max_size, shuffle=False).write()
    ours = [str(w.message) for w in caught if "names no file" in str(w.message)]
    named = {text.split(" is ", 1)[0] for text in ours}
    assert named == over and len(ours) == len(over), ours  # each once, by its path
    then = "stored scaled down" if max_size else "raise PIL.Image.MAX_IMAGE_PIXELS"
    assert all(f"warning size of {warning_size:,}" in t and then in t for t in ours), ours
    dataset = TRDataset(tmp_path / "out", transform=None)
    assert [int(dataset[i].protos[1].byte_data) for i in range(len(samples))] == [
        label for _, label in samples
    ]


def test_worker_processes_name_the_images_beyond_pillows_warning_size(photos, tmp_path):
    """Encode workers warn on their stderr, which is the terminal's: the warning names the file
    there too (checked in a process of its own: pytest records a forked worker's warnings)."""
    warning_size, over = _warning_size_between(read_list(photos))
    code = f"""
import os, warnings
from PIL import Image
from torchrecord import Writer

def show(message, category, filename, lineno, file=None, line=None):  # (inherited by fork)
    os.write(2, f"PID {{os.getpid()}} {{category.__name__}} {{message}}\\n".encode())  # one write

warnings.showwarning = show
Image.MAX_IMAGE_PIXELS = {warning_size}
w = Writer({str(photos)!r}, {str(tmp_path / "out")!r}, db_num=2, num_workers=2, codec="raw_rgb")
w.write()
print("MAIN", os.getpid())
"""
    script = tmp_path / "workers.py"
    script.write_text(code)
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    main = int(result.stdout.split("MAIN ", 1)[1].split()[0])
    ours = [line.split() for line in result.stderr.splitlines() if "names no file" in line]
    assert {int(words[1]) for words in ours} - {main}, result.stderr  # from the workers
    assert {words[3] for words in ours} == over and len(ours) == len(over), result.stderr


def test_a_record_beyond_the_pixel_limit_of_the_reader_says_which_setting(
    photos, tmp_path, monkeypatch
):
    """Written with the limit off, read under a lower one: not called corrupt."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    Writer(photos, tmp_path / "out", codec="jpeg", shuffle=False).write()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(TorchRecordError, match="Raise PIL.Image.MAX_IMAGE_PIXELS") as info:
        TRDataset(tmp_path / "out", transform="pil")[0]
    assert not isinstance(info.value, RecordCorruptedError)
    image, label = TRDataset(tmp_path / "out")[0]  # the tensor decoder has no such limit
    assert image.shape == (3, 224, 224) and label == read_list(photos)[0][1]


def test_the_writing_processs_pixel_limit_holds_in_spawned_workers(photos, tmp_path):
    """Spawned workers start with Pillow's default limit: they take the writer's."""
    code = f"""
import multiprocessing
from PIL import Image
from torchrecord import Writer, DataListError
if __name__ == "__main__":
    multiprocessing.set_start_method("spawn")
    Image.MAX_IMAGE_PIXELS = 10_000
    try:
        Writer({str(photos)!r}, {str(tmp_path / "out")!r}, db_num=2, num_workers=2).write()
    except DataListError as exc:
        print("REFUSED", exc)
"""
    script = tmp_path / "spawned.py"
    script.write_text(code)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "REFUSED" in result.stdout and "decompression-bomb limit of 20,000" in result.stdout


def test_lifting_the_pixel_limit_in_one_thread_keeps_it_for_the_others(photos):
    import threading

    from torchrecord.codecs.base import open_image

    path = read_list(photos)[0][0]
    width, height = Image.open(path).size
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = width * height // 3  # the photos are beyond it
    errors, opened = [], []

    def work(max_size):
        for _ in range(50):
            try:
                with open_image(path, max_size) as img:
                    opened.append(img.size)
            except Exception as exc:  # (the thread without max_size: refused)
                errors.append(exc)

    try:
        threads = [threading.Thread(target=work, args=(m,)) for m in (64, 64, None)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert Image.MAX_IMAGE_PIXELS == width * height // 3  # restored
        assert len(opened) == 100  # the two max_size threads, every time
        assert len(errors) == 50 and all("decompression-bomb" in str(e) for e in errors)
    finally:
        Image.MAX_IMAGE_PIXELS = saved
