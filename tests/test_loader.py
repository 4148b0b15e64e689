"""TorchRecord(), TRDataset and TRSampler: every record once per epoch, in any process setup."""

from __future__ import annotations

import os
import pickle
import warnings
import zlib

import numpy as np
import pytest
import torch
from conftest import fingerprint, read_list
from PIL import Image

from torchrecord import TorchRecord, TRDataset, TRSampler, Writer
from torchrecord.errors import PluginError
from torchrecord.sampler import item_pool_size, pool_shuffle


@pytest.fixture
def records(photos, tmp_path):
    out = tmp_path / "records"
    Writer(photos, out, db_num=4, codec="jpeg", shuffle=False).write()
    return out


def expected_fingerprints(photos):
    return sorted((zlib.crc32(p.read_bytes()), label) for p, label in read_list(photos))


@pytest.mark.parametrize("mode", ["none", "shuffle", "full_shuffle"])
@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_every_record_exactly_once_per_epoch(photos, records, mode, num_workers):
    loader = TorchRecord(
        records,
        4,
        shuffle=mode == "shuffle",
        batch_size=5,
        num_workers=num_workers,
        transform=fingerprint,
        full_shuffle=mode == "full_shuffle",
    )
    assert len(loader) == 5  # ceil(24 / 5)
    orders = []
    for _ in range(2):
        seen = [(int(c), int(label)) for crcs, labels in loader for c, label in zip(crcs, labels)]
        assert sorted(seen) == expected_fingerprints(photos)
        orders.append(seen)
    if mode == "none":
        assert orders[0] == orders[1]
    else:
        assert orders[0] != orders[1]  # a new order every epoch


def test_order_depends_on_seed_and_epoch_only(records):
    def order(num_workers, batch_size, epoch, seed=3, pool_size=16):
        loader = TorchRecord(
            records,
            shuffle=True,
            batch_size=batch_size,
            num_workers=num_workers,
            transform=fingerprint,
            seed=seed,
            pool_size=pool_size,
        )
        loader.set_epoch(epoch)
        return [int(c) for crcs, _ in loader for c in crcs]

    base = order(0, 4, epoch=1)
    assert order(2, 4, epoch=1) == base
    assert order(2, 7, epoch=1) == base  # same pool size: batch size does not matter
    # the default pool (64, 0.1's for batches of 16 or more) does not depend on the batch size
    assert order(0, 4, epoch=1, pool_size=None) == order(2, 32, epoch=1, pool_size=None)
    assert order(0, 4, epoch=2) != base
    assert order(0, 4, epoch=1, seed=4) != base


def test_sampler_modes(records):
    sampler = TRSampler(str(records), 4, shuffle=False)
    assert list(sampler) == list(range(24))
    full = TRSampler(str(records), full_shuffle=True, seed=5)
    first, second = list(full), list(full)  # the epoch advances by itself
    assert sorted(first) == sorted(second) == list(range(24)) and first != second
    full.set_epoch(0)
    assert list(full) == first
    # the seed's shuffle: shard order and in-shard order permuted, then the item pool
    local = TRSampler(str(records), shuffle=True, batch_size=1, seed=5)
    order = list(local)
    assert sorted(order) == list(range(24)) and order != list(range(24))
    with pytest.raises(ValueError, match="record_num=3 but .* has 4 shards"):
        TRSampler(str(records), record_num=3)


def test_item_pool_is_a_permutation():
    rng = np.random.default_rng(0)
    data = np.arange(1000, dtype=np.int64)
    out = pool_shuffle(data, item_pool_size(32), rng)
    assert sorted(out.tolist()) == data.tolist() and out.tolist() != data.tolist()
    # a pool of 64 moves items by a bounded distance on the way in: position >= index - 64
    positions = np.empty_like(out)
    positions[out] = np.arange(len(out))
    assert (positions >= data - 64).all()
    assert item_pool_size(8) == 32 and item_pool_size(100) == 64


def test_the_item_pool_also_runs_over_the_unshuffled_order(records):
    """0.1's item pool runs on top of every mode, "none" too (it used to be ignored there,
    and still held a resumed state to its pool size): records in dataset order, passed
    through a pool of 8, a permutation that moves no record ahead by more than the pool."""
    plain = TRSampler(str(records), shuffle="none")
    assert plain.order(0).tolist() == list(range(24))
    pooled = TRSampler(str(records), shuffle="none", pool_size=8, seed=3)
    first, second = pooled.order(0), pooled.order(1)
    assert sorted(first.tolist()) == list(range(24)) and first.tolist() != list(range(24))
    assert first.tolist() != second.tolist()  # a new pool draw every epoch
    positions = np.empty_like(first)
    positions[first] = np.arange(24)
    assert (positions >= np.arange(24) - 8).all()


def test_dataset_is_map_style_for_any_sampler(photos, records):
    dataset = TRDataset(records, transform=fingerprint)
    loader = torch.utils.data.DataLoader(dataset, batch_size=6, shuffle=True, num_workers=2)
    seen = [(int(c), int(label)) for crcs, labels in loader for c, label in zip(crcs, labels)]
    assert sorted(seen) == expected_fingerprints(photos)
    assert dataset[-1] == dataset[len(dataset) - 1]
    with pytest.raises(IndexError):
        dataset[24]


@pytest.mark.parametrize("context", ["fork", "spawn", "forkserver"])
def test_workers_after_the_parent_read(photos, records, context):
    dataset = TRDataset(records)
    image, label = dataset[0]  # the parent has the shard open before workers start
    loader = TorchRecord(
        records,
        batch_size=6,
        num_workers=2,
        transform=fingerprint,
        multiprocessing_context=context,
        shuffle=False,
    )
    seen = [(int(c), int(lab)) for crcs, labels in loader for c, lab in zip(crcs, labels)]
    assert sorted(seen) == expected_fingerprints(photos)
    again, label_again = dataset[0]  # and the parent can still read afterwards
    assert torch.equal(image, again) and label == label_again


def test_persistent_workers_and_loader_kwargs(photos, records):
    loader = TorchRecord(
        records,
        batch_size=8,
        num_workers=2,
        transform=fingerprint,
        persistent_workers=True,
        prefetch_factor=3,
        drop_last=True,
        full_shuffle=True,
    )
    assert len(loader) == 3
    for _ in range(3):
        seen = [int(c) for crcs, _ in loader for c in crcs]
        assert len(seen) == 24 and len(set(seen)) == 24


def test_in_order_false_is_refused(records):
    """Out-of-order batches would break the order and the resume (state_dict counts batches)."""
    with pytest.raises(ValueError, match="in_order=False"):
        TorchRecord(records, batch_size=8, num_workers=2, in_order=False, shuffle=False)

    def order(**kwargs):
        loader = TorchRecord(records, shuffle=True, batch_size=8, transform=fingerprint, **kwargs)
        return [int(c) for crcs, _ in loader for c in crcs]

    assert order(num_workers=2, in_order=True) == order()  # the default, said aloud


def test_pickles_before_and_after_a_read(records):
    dataset = TRDataset(records, transform=fingerprint)
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone[3] == dataset[3]  # the original has an open shard now
    clone2 = pickle.loads(pickle.dumps(dataset))
    assert [clone2[i] for i in range(24)] == [dataset[i] for i in range(24)]


@pytest.mark.parametrize("serializer", ["tensorprotos", "msgpack"])
def test_records_themselves_come_through_worker_processes(photos, tmp_path, serializer):
    """transform=None (or a 0.1 transform returning protos): workers pickle the records to
    the training process. The protobuf classes once named a module that does not exist, and
    the loader then waited forever."""
    out = tmp_path / serializer
    Writer(photos, out, db_num=2, codec="jpeg", serializer=serializer, shuffle=False).write()
    loader = TorchRecord(
        out,
        batch_size=5,
        num_workers=2,
        transform=None,
        collate_fn=list,
        timeout=120,
        shuffle=False,
    )
    got = [(r.protos[0].byte_data, int(r.protos[1].byte_data)) for b in loader for r in b]
    assert got == [(p.read_bytes(), label) for p, label in read_list(photos)]
    record = TRDataset(out, transform=None)[0]
    assert pickle.loads(pickle.dumps(record)) == record
    assert pickle.loads(pickle.dumps(record.protos[1])).byte_data == record.protos[1].byte_data


def test_two_datasets_over_one_path_in_one_process(records):
    a = TRDataset(records, transform=fingerprint)
    b = TRDataset(records, transform=fingerprint)
    assert [a[i] for i in range(24)] == [b[i] for i in range(24)]
    a.close()
    assert b[5] == fingerprint(TRDataset(records, transform=None)[5])


def test_samples_stay_valid_after_close(records):
    dataset = TRDataset(records, transform=None)
    record = dataset[2]
    data = record.protos[0].byte_data
    dataset.close()
    assert record.protos[0].byte_data == data and data[:2] == b"\xff\xd8"


def test_record_num_is_checked(records):
    with pytest.raises(ValueError, match="record_num=2 but"):
        TorchRecord(records, record_num=2, shuffle=False)
    assert TorchRecord(records, shuffle=False).dataset.record_num == 4


def test_legacy_fixture_reads_pixel_and_label_exact(legacy_fixture):
    dataset = TRDataset(legacy_fixture / "record", transform=None)
    assert (dataset.codec, dataset.serializer, dataset.record_num, len(dataset)) == (
        "raw_rgb",
        "tensorprotos",
        2,
        40,
    )
    lines = (legacy_fixture / "data_list.txt").read_text().splitlines()
    assert len(lines) == 40
    for i, line in enumerate(lines):  # db0 = first 20 lines, db1 = last 20, in list order
        path, label = line.rsplit(" ", 1)
        record = dataset[i]
        with Image.open(legacy_fixture / path) as img:
            rgb = img.convert("RGB")
        assert tuple(record.protos[0].dims) == rgb.size
        assert record.protos[0].byte_data == rgb.tobytes()
        assert int(record.protos[1].byte_data) == int(label)
    # and through the loader with the seed's defaults, in worker processes
    loader = TorchRecord(legacy_fixture / "record", 2, True, 8, 2)
    labels = sorted(int(x) for _, batch_labels in loader for x in batch_labels)
    assert labels == sorted(int(line.rsplit(" ", 1)[1]) for line in lines)


def test_one_dataset_under_two_spellings_of_its_path(records, monkeypatch):
    monkeypatch.chdir(records.parent)
    relative = TRDataset(records.name, transform=fingerprint)
    absolute = TRDataset(str(records.resolve()), transform=fingerprint)
    assert [relative[i] for i in range(24)] == [absolute[i] for i in range(24)]


def test_block_mode_bounds_the_open_shards(photos, records):
    loader = TorchRecord(
        records, shuffle="block", block_shards=1, pool_size=0, batch_size=4, transform=fingerprint
    )
    reader = loader.dataset.reader
    assert reader.max_open_shards == 2  # one window of one shard, two when crossing
    reader.keep_open_bytes = 0  # (these shards fit the default budget: see below)
    seen = []
    for crcs, labels in loader:  # in this process: num_workers=0
        seen += [(int(c), int(label)) for c, label in zip(crcs, labels)]
        assert len(reader.open_shards) <= 2
    assert sorted(seen) == expected_fingerprints(photos)


def test_block_mode_keeps_open_the_shards_of_records_in_the_pool(photos, tmp_path, monkeypatch):
    from torchrecord.environments import SHARED

    out = tmp_path / "small-shards"
    Writer(
        photos, out, records_per_shard=3, codec="jpeg", shuffle=False
    ).write()  # 8 shards of 3 records
    opens = []
    acquire = SHARED.acquire
    monkeypatch.setattr(SHARED, "acquire", lambda *a, **k: opens.append(a[0]) or acquire(*a, **k))
    loader = TorchRecord(
        out, shuffle="block", block_shards=1, pool_size=4, batch_size=4, transform=fingerprint
    )
    assert loader.dataset.reader.max_open_shards == 2 + 4  # + 3 * pool_size / 3 records
    loader.dataset.reader.keep_open_bytes = 0
    seen = [(int(c), int(label)) for crcs, labels in loader for c, label in zip(crcs, labels)]
    assert sorted(seen) == expected_fingerprints(photos)
    # each shard opened once; bounded to the window alone (2), records that waited in the pool
    # would reopen their shards (13 opens of these 8 shards)
    assert sorted(opens) == sorted(set(opens)) and len(opens) == 8, opens


def _small_shards(photos, tmp_path) -> tuple[object, list[int]]:
    out = tmp_path / "small-shards"
    Writer(photos, out, records_per_shard=3, codec="jpeg", shuffle=False).write()  # 8 shards
    sizes = [s.stat().st_size for s in sorted(out.glob("shard-*.lmdb"))]
    assert len(sizes) == 8
    return out, sizes


def _opens_spy(monkeypatch) -> list:
    from torchrecord.environments import SHARED

    opens = []
    acquire = SHARED.acquire
    monkeypatch.setattr(SHARED, "acquire", lambda *a, **k: opens.append(a[0]) or acquire(*a, **k))
    return opens


def test_block_mode_keeps_open_the_shards_that_fit_its_budget(photos, tmp_path, monkeypatch):
    out, sizes = _small_shards(photos, tmp_path)
    opens = _opens_spy(monkeypatch)
    loader = TorchRecord(
        out, shuffle="block", block_shards=1, pool_size=0, batch_size=4, transform=fingerprint
    )
    reader = loader.dataset.reader
    assert reader.max_open_shards == 2
    assert reader.keep_open_bytes >= sum(sizes)  # 8 small shards: far under the default
    for epoch in range(3):
        loader.set_epoch(epoch)
        seen = [(int(c), int(label)) for crcs, labels in loader for c, label in zip(crcs, labels)]
        assert sorted(seen) == expected_fingerprints(photos)
    # each shard opened once in three epochs (closed past the bound, they would reopen)
    assert sorted(opens) == sorted(set(opens)) and len(opens) == 8, opens
    assert len(reader.open_shards) == 8


def _held_open(record) -> tuple[int, int]:
    """(label, how many shards this worker holds open as it reads the record)."""
    reader = torch.utils.data.get_worker_info().dataset.reader
    return int(record.protos[1].byte_data), len(reader.open_shards)


@pytest.mark.parametrize("context", ["fork", "spawn"])
@pytest.mark.parametrize("budget", ["default", 0])
def test_block_mode_workers_keep_their_shards_open(photos, tmp_path, budget, context):
    out, _ = _small_shards(photos, tmp_path)
    loader = TorchRecord(
        out,
        shuffle="block",
        block_shards=1,
        pool_size=0,
        batch_size=3,
        num_workers=2,
        persistent_workers=True,
        transform=_held_open,
        multiprocessing_context=context,
    )
    if budget != "default":
        loader.dataset.reader.keep_open_bytes = budget  # (the workers get the reader as it is)
    expected = sorted(label for _, label in read_list(photos))
    for epoch in range(3):
        loader.set_epoch(epoch)
        labels, held = [], []
        for batch_labels, batch_held in loader:
            labels += batch_labels.tolist()
            held += batch_held.tolist()
        assert sorted(labels) == expected
        if budget == 0:
            assert max(held) <= 2
    if budget == "default":  # in the third epoch a worker holds what it opened before
        assert max(held) > 2


def test_block_mode_past_its_budget_keeps_the_most_recent_shards(photos, tmp_path, monkeypatch):
    out, sizes = _small_shards(photos, tmp_path)
    shard_of = {}  # fingerprint -> the shard that holds it
    dataset = TRDataset(out, transform=fingerprint)
    for index in range(len(dataset)):
        shard_of[dataset[index]] = dataset.reader.locate(index)[0]
    opens = _opens_spy(monkeypatch)
    loader = TorchRecord(
        out, shuffle="block", block_shards=1, pool_size=0, batch_size=4, transform=fingerprint
    )
    reader = loader.dataset.reader
    reader.keep_open_bytes = budget = sum(sorted(sizes)[-4:])  # room for any 4 shards, not 8
    used = []  # shards in the order of their last use
    for epoch in range(2):
        loader.set_epoch(epoch)
        seen = []
        for crcs, labels in loader:
            batch = [(int(c), int(label)) for c, label in zip(crcs, labels)]
            seen += batch
            for shard in (shard_of[f] for f in batch):
                used = [s for s in used if s != shard] + [shard]
            held = reader.open_shards
            if len(held) > 2:  # past the window's bound only within the budget
                assert sum(sizes[s] for s in held) <= budget, held
            assert held == used[-len(held) :]  # the most recently used ones
        assert sorted(seen) == expected_fingerprints(photos)
        assert 4 <= len(reader.open_shards) < 8
    assert 8 < len(opens) < 16  # some of epoch 0's shards were still open in epoch 1


def test_block_mode_keeps_at_most_a_quarter_of_its_open_files_in_shards(
    photos, tmp_path, monkeypatch
):
    import resource

    from torchrecord.loader import block_mode_keep_open

    out, _ = _small_shards(photos, tmp_path)
    opens = _opens_spy(monkeypatch)
    loader = TorchRecord(
        out, shuffle="block", block_shards=1, pool_size=0, batch_size=4, transform=fingerprint
    )
    reader = loader.dataset.reader
    files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert reader.keep_open_shards == block_mode_keep_open()[1] == files // 4
    reader.keep_open_shards = 3  # (as under `ulimit -n 12`; the bytes would allow all 8)
    held = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        seen = []
        for crcs, labels in loader:
            seen += [(int(c), int(label)) for c, label in zip(crcs, labels)]
            held.append(len(reader.open_shards))
        assert sorted(seen) == expected_fingerprints(photos)
    assert max(held) == 3 and len(opens) > 8


def _cgroups(root, proc_lines: list[str], files: dict[str, str]) -> tuple[str, str]:
    """A cgroup tree of limit files under ``root``, and a /proc/self/cgroup for it."""
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    proc = root / "proc-self-cgroup"
    proc.write_text("".join(line + "\n" for line in proc_lines))
    return str(root), str(proc)


def test_block_mode_budget_is_an_eighth_of_the_cgroups_memory_at_most_4_gib(tmp_path):
    from torchrecord.loader import KEEP_OPEN_CAP, block_mode_keep_open, usable_memory

    machine = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    gib = 1 << 30
    assert KEEP_OPEN_CAP == 4 * gib
    assert block_mode_keep_open(str(tmp_path / "none"))[0] == min(machine // 8, KEEP_OPEN_CAP)
    # cgroup v2, nested: the lowest limit on the way up counts ("max": none)
    v2 = _cgroups(
        tmp_path / "v2",
        ["0::/job/step"],
        {"job/step/memory.max": "max", "job/memory.max": f"{gib}", "memory.max": f"{8 * gib}"},
    )
    assert usable_memory(*v2) == min(machine, gib)
    # cgroup v1, nested, v1's unlimited value
    huge = "9223372036854771712"
    v1 = _cgroups(
        tmp_path / "v1",
        ["4:memory:/job/step", "1:cpu:/", "0::/"],
        {
            "memory/job/step/memory.limit_in_bytes": f"{2 * gib}",
            "memory/job/memory.limit_in_bytes": huge,
            "memory/memory.limit_in_bytes": huge,
        },
    )
    assert usable_memory(*v1) == min(machine, 2 * gib)
    # v2's limits, when it has any, are the ones that count: v1's are not read
    both = _cgroups(
        tmp_path / "both",
        ["4:memory:/", "0::/"],
        {"memory.max": f"{gib}", "memory/memory.limit_in_bytes": f"{gib // 2}"},
    )
    assert usable_memory(*both) == min(machine, gib)
    # files that are not limits: no limit, and no error
    odd = _cgroups(
        tmp_path / "odd",
        ["0::/a"],
        {"a/memory.max": "\u00b2", "memory.max": b"\xff\xfe"},
    )
    assert usable_memory(*odd) == machine
    assert usable_memory(str(tmp_path / "none"), str(tmp_path / "no-proc")) == machine


def _missing(record):
    raise FileNotFoundError("a transform that needs a file that is not there")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_os_error_of_a_transform_keeps_its_type(records, num_workers):
    loader = TorchRecord(
        records, batch_size=4, num_workers=num_workers, transform=_missing, shuffle=False
    )
    with pytest.raises(FileNotFoundError, match="a file that is not there"):
        next(iter(loader))


@pytest.mark.parametrize("codec", ["jpeg", "raw_rgb"])
@pytest.mark.parametrize("transform", ["auto", "uint8"])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_batches_built_in_place_equal_per_sample_collation(
    photos, tmp_path, codec, transform, num_workers
):
    """TorchRecord's own collate_fn lets the dataset write images straight into the batch
    (in shared memory in a worker); a user's collate_fn gets the samples one by one, as from
    any DataLoader. The values are the same, bit for bit."""
    out = tmp_path / codec
    Writer(photos, out, db_num=2, codec=codec, shuffle=False).write()

    def user_collate(samples):  # runs in the workers: says how many samples it saw
        assert all(image.shape == (3, 224, 224) for image, _ in samples)
        return [*torch.utils.data.default_collate(samples), len(samples)]

    def epoch(**kwargs):
        loader = TorchRecord(
            out,
            shuffle=True,
            batch_size=5,
            num_workers=num_workers,
            transform=transform,
            seed=4,
            **kwargs,
        )
        return [(batch[0].clone(), batch[1].clone(), *batch[2:]) for batch in loader]

    built, collated = epoch(), epoch(collate_fn=user_collate)
    assert [seen for *_, seen in collated] == [5, 5, 5, 5, 4]  # every sample, one by one
    assert len(built) == len(collated) == 5
    dtype = torch.float32 if transform == "auto" else torch.uint8
    for (images, labels), (images2, labels2, _) in zip(built, collated):
        assert images.dtype == dtype and images.is_contiguous()
        assert torch.equal(images, images2) and torch.equal(labels, labels2)
        assert labels.dtype == torch.int64
    # against the single-sample path of the dataset itself
    dataset = TRDataset(out, transform=transform)
    fresh = TorchRecord(out, shuffle=True, batch_size=5, num_workers=num_workers, seed=4)
    first = dataset[int(fresh.sampler.rank_indices(0)[0])]
    assert torch.equal(built[0][0][0], first[0]) and int(built[0][1][0]) == first[1]


def test_batches_built_in_place_substitute_corrupt_records(photos, records):
    from conftest import flip_record_byte

    flip_record_byte(records / "shard-00000.lmdb", 2)
    loader = TorchRecord(records, batch_size=4, num_workers=2, on_corrupt="skip", shuffle=False)
    labels = [int(label) for _, batch in loader for label in batch]
    expected = [label for _, label in read_list(photos)]
    assert len(labels) == 24
    assert labels == expected[:2] + [expected[3]] + expected[3:]  # record 3 stands in for 2
    assert [r["index"] for r in loader.corrupt_records] == [2]


def test_a_plain_data_loader_gets_samples_from_the_dataset(records):
    dataset = TRDataset(records)
    assert dataset.__getitems__([0, 1])[1][0].shape == (3, 224, 224)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3)
    images, labels = next(iter(loader))
    assert images.shape == (3, 3, 224, 224) and labels.tolist() == [dataset[i][1] for i in range(3)]


def test_other_loaders_over_a_torchrecord_dataset_still_get_samples(photos, records):
    """TorchRecord turns on in-place batches for its dataset; a plain DataLoader, a Subset or a
    user's collate_fn over that same dataset still see samples."""
    loader = TorchRecord(records, batch_size=4, shuffle=False)
    dataset = loader.dataset
    expected = [dataset[i] for i in range(6)]
    images, labels = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert labels.tolist() == [label for _, label in expected[:4]]
    assert torch.equal(images, torch.stack([image for image, _ in expected[:4]]))
    subset = torch.utils.data.Subset(dataset, [5, 1])
    images, labels = next(iter(torch.utils.data.DataLoader(subset, batch_size=2)))
    assert labels.tolist() == [expected[5][1], expected[1][1]]
    seen = next(iter(torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=list)))
    assert len(seen) == 3 and [label for _, label in seen] == [e[1] for e in expected[:3]]
    assert all(type(label) is int and image.shape == (3, 224, 224) for image, label in seen)


def test_in_place_batches_survive_pickling(records):
    """spawn and forkserver workers get a pickled dataset: it still builds batches in place."""
    from torchrecord.dataset import Prebatched

    dataset = TorchRecord(records, batch_size=4, shuffle=False).dataset
    copy = pickle.loads(pickle.dumps(dataset))
    batch = copy.__getitems__([0, 1, 2])
    assert isinstance(batch, Prebatched) and batch.images.shape == (3, 3, 224, 224)
    assert torch.equal(batch.images[1], dataset[1][0]) and batch[2][1] == dataset[2][1]
    copy.transform = lambda record: record  # a transform of the user's own: samples again
    assert isinstance(copy.__getitems__([0, 1]), list)


def test_a_codec_whose_tensors_are_not_rgb_is_named(photos, tmp_path):
    from torchrecord.codecs.jpeg import JPEGCodec
    from torchrecord.hookspecs import hookimpl
    from torchrecord.plugins import register_plugin, unregister_plugin

    class GreyCodec(JPEGCodec):
        name = "test_grey"

        def decode_tensor(self, record):
            return super().decode_tensor(record)[:1]  # one channel

    class GreyPlugin:
        @hookimpl
        def torchrecord_register_codecs(self, register):
            register(GreyCodec())

    register_plugin(GreyPlugin(), name="test-grey")
    try:
        out = tmp_path / "grey"
        Writer(photos, out, db_num=2, codec="test_grey", shuffle=False).write()
        # batches of one channel under the tensor transforms and of three under "pil" (which
        # converts to RGB), or a shape error in collation: refused, naming the codec
        for transform in ("fast", "uint8"):
            loader = TorchRecord(out, batch_size=5, shuffle=False, transform=transform)
            with pytest.raises(PluginError, match=r"'test_grey' .*shape \(1, .*3 x H x W"):
                next(iter(loader))
        image, _ = TRDataset(out, transform="pil")[0]
        assert image.shape == (3, 224, 224)
    finally:
        unregister_plugin(name="test-grey")


def test_a_second_iteration_while_one_is_in_use_is_refused_with_persistent_workers(photos, records):
    """PyTorch gives both iterations of one loader with persistent workers the same worker
    iterator, so each would see part of the other's batches: refused, named. Breaking out of
    an epoch and starting the next stays fine."""
    loader = TorchRecord(records, batch_size=4, num_workers=2, transform=fingerprint, shuffle=False)
    outer = iter(loader)
    next(outer)
    inner = iter(loader)
    assert len(list(inner)) == 6  # the newer iteration is whole
    with pytest.raises(RuntimeError, match="iterated again .* while this iteration was still"):
        next(outer)
    with pytest.raises(RuntimeError, match="persistent_workers=False"):
        list(zip(loader, loader))
    for _ in range(2):  # break out of an epoch, then start another
        loader.set_epoch(0)
        for _ in loader:
            break
    loader.set_epoch(0)
    assert sorted((int(c), int(y)) for cs, ys in loader for c, y in zip(cs, ys)) == (
        expected_fingerprints(photos)
    )
    outer = []  # another iteration inside the last batch: this one had all its batches
    for _, labels in loader:
        outer.append(len(labels))
        if len(outer) == 6:
            assert len(list(loader)) == 6
    assert outer == [4] * 6
    plain = TorchRecord(
        records, batch_size=4, num_workers=2, persistent_workers=False, shuffle=False
    )
    assert len(list(zip(plain, plain))) == 6  # separate worker iterators: allowed


def test_trsampler_as_a_batch_sampler_says_how_to_use_it(records):
    """0.1's TRSampler yielded batches, for DataLoader(batch_sampler=...); today's yields
    record indices. The 0.1 way gets an error that says what to write instead."""
    from torch.utils.data import DataLoader

    dataset = TRDataset(records, transform=fingerprint)
    for workers in (0, 2):
        old_way = DataLoader(
            dataset, batch_sampler=TRSampler(records, 4, batch_size=8), num_workers=workers
        )
        with pytest.raises(TypeError, match=r"DataLoader\(dataset, sampler=TRSampler"):
            next(iter(old_way))
    new_way = DataLoader(dataset, sampler=TRSampler(records, 4), batch_size=8)
    assert [len(labels) for _, labels in new_way] == [8, 8, 8]
    with pytest.raises(ValueError, match="pool_size must be a non-negative integer"):
        TRSampler(records, pool_size=-5)


def test_a_rank_left_without_batches_says_so(records):
    """More ranks than records (or a share smaller than a batch) with drop_last=True: every
    epoch of that rank is empty, which a training loop would run through without a step."""
    with pytest.warns(RuntimeWarning, match=r"rank 3 of 30 reads no batch in an epoch: its share"):
        empty = TorchRecord(records, rank=3, world_size=30, drop_last=True, batch_size=2)
    assert len(empty) == 0 and list(empty) == []
    with pytest.warns(RuntimeWarning, match=r"is 6, and drop_last=True drops all of it"):
        TorchRecord(records, rank=0, world_size=4, drop_last=True, batch_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(TorchRecord(records, rank=0, world_size=4, drop_last=True, batch_size=6)) == 1
