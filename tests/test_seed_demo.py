"""TorchRecord 0.1's README demo, run verbatim in a fresh interpreter.

The only addition is the dataset the demo expects to find: ``./testdata`` with JPEGs (made here
from real photographs) and ``./testdb``, the record directory the seed's loader line reads (the
seed README writes ``./test_torchrecord`` but reads ``./testdb``; we provide both so the demo
runs unchanged, and check what it wrote).
"""

from __future__ import annotations

import shutil
import subprocess
import sys

from torchrecord import TRDataset, Writer

SEED_DEMO = """
import os
import random
from torchrecord import default_data_process_func
from torchrecord import Writer, TorchRecord
# =====================================================
# Make data list (txt or csv), one data item per line.
# The template of data_list:
#
# path/to/image/img1.jpg 1
# path/to/image/img2.jpg 2
# ...
# =====================================================

with open('./data_list.txt', 'w') as writer:
    for p, d, fl in os.walk('./testdata'):
        for f in fl:
            if f.endswith('jpg'):
                writer.write("{} {}\\n".format(os.path.join(p, f), random.randint(0, 10)))


# =====================================================
# Use torchrecord.Writer to write the torchrecord.
# data_list: the data list
# output_dir: the path of the torchrecord
# db_num: split the origin dataset to n subset
# shuffle: if it is True, the writer will shuffle all the data before writing them to the torchrecord
# data_process_func: the function for processing the data item
# =====================================================

writer = Writer(data_list='./data_list.txt', output_dir='./test_torchrecord', 
                db_num=4, shuffle=True, data_process_func=default_data_process_func)
writer.write()


# =====================================================
# Create a TorchRecord which is very similar to the dataloader of PyTorch
# =====================================================

loader = TorchRecord(record_path='./testdb', record_num=4, shuffle=True, batch_size=32, num_workers=4)

for i, batch in enumerate(loader):
    pass

"""

CHECK = """
for i, batch in enumerate(loader):
    images, labels = batch
    print("BATCH", ",".join(map(str, images.shape)), images.dtype, float(images.min()),
          float(images.max()), ",".join(str(int(x)) for x in labels))
"""


def test_seed_demo_runs_unchanged(photo_dir, tmp_path):
    work = tmp_path / "demo"
    shutil.copytree(photo_dir, work / "testdata")
    (work / "testdata" / "data_list.txt").unlink()
    # ./testdb: the dataset the seed's loader line reads, written from the same photographs
    lines = [f"{p} {i % 11}" for i, p in enumerate(sorted((work / "testdata").rglob("*.jpg")))]
    (work / "testdb_list.txt").write_text("\n".join(lines) + "\n")
    Writer(work / "testdb_list.txt", work / "testdb", db_num=4, shuffle=False).write()

    result = subprocess.run(
        [sys.executable, "-c", SEED_DEMO + CHECK],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr

    # The loop over ./testdb saw every image once, as seed-shaped batches.
    batches = [line.split()[1:] for line in result.stdout.splitlines() if line.startswith("BATCH")]
    assert [b[0] for b in batches] == ["24,3,224,224"]  # 24 images, batch_size 32
    assert batches[0][1] == "torch.float32"
    assert 0.0 <= float(batches[0][2]) < float(batches[0][3]) <= 1.0
    seen = sorted(int(x) for b in batches for x in b[4].split(","))
    assert seen == sorted(i % 11 for i in range(24))

    # What the demo wrote: 4 shards holding every line of its data list, pixel-exact.
    written = TRDataset(work / "test_torchrecord", transform=None)
    assert written.record_num == 4 and len(written) == 24
    demo_lines = (work / "data_list.txt").read_text().splitlines()
    expected = {}
    for line in demo_lines:
        path, label = line.rsplit(" ", 1)
        from PIL import Image

        with Image.open(work / path) as img:
            expected[img.convert("RGB").tobytes()] = int(label)
    got = {}
    for i in range(len(written)):
        record = written[i]
        got[record.protos[0].byte_data] = int(record.protos[1].byte_data)
    assert got == expected


def test_the_defaults_are_0_1s_both_writer_and_loader_shuffle(photo_dir, tmp_path):
    """TorchRecord 0.1.1's Writer and TorchRecord() shuffled unless told not to: a 0.1 script
    that leaves shuffle out still trains on shuffled data (TRDataset and TRSampler kept
    shuffle=False in 0.1, and here)."""
    from torchrecord import TorchRecord, TRSampler

    data_list = photo_dir / "data_list.txt"
    lines = data_list.read_text().splitlines()
    manifest = Writer(data_list, tmp_path / "records", 2).write()
    assert manifest.extra["shuffle"] is True and manifest.extra["seed"] == 0
    stored = [int(r.protos[1].byte_data) for r in TRDataset(tmp_path / "records", transform=None)]
    listed = [int(line.rsplit(" ", 1)[1]) for line in lines]
    assert sorted(stored) == sorted(listed) and stored != listed  # the seed's shuffle, seeded
    loader = TorchRecord(tmp_path / "records", 2)
    assert loader.sampler.mode == "block" and loader.sampler.pool_size > 0
    order = list(loader.sampler)
    assert sorted(order) == list(range(len(lines))) and order != sorted(order)
    assert TRSampler(tmp_path / "records").mode == "none"


def test_the_names_0_1_exported_are_there():
    """TorchRecord 0.1.1's package exported these (its DataLoader was a copy of PyTorch's, which
    stands in for it now); writer module names, as 0.1 code imported them."""
    import torch.utils.data

    import torchrecord
    from torchrecord.writer import default_data_process_func

    for name in (
        "Writer",
        "TorchRecord",
        "TRSampler",
        "TRDataset",
        "TensorProtos",
        "default_transform",
        "default_data_process_func",
    ):
        assert name in torchrecord.__all__, name
    assert torchrecord.DataLoader is torch.utils.data.DataLoader
    assert default_data_process_func is torchrecord.default_data_process_func
