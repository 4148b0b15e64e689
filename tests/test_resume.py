"""Resuming an epoch: state_dict/load_state_dict across numbers of workers and batch sizes."""

from __future__ import annotations

import json
import math

import pytest
from conftest import fingerprint, read_list

from torchrecord import TorchRecord, TRDataset, TRSampler, Writer

SEED = 11
MODES = ("none", "block", "global")
N = 26  # not a multiple of either batch size used (4 and 3)


@pytest.fixture(scope="module")
def records(photo_dir, tmp_path_factory):
    """26 records in 4 shards (7, 7, 6, 6): the 24 photos, then two of them with new labels."""
    entries = read_list(photo_dir / "data_list.txt")
    entries += [(entries[0][0], 100), (entries[1][0], 101)]
    out = tmp_path_factory.mktemp("resume")
    data_list = out / "data_list.txt"
    data_list.write_text("".join(f"{path} {label}\n" for path, label in entries))
    Writer(data_list, out / "records", db_num=4, codec="jpeg", shuffle=False).write()
    return out / "records"


@pytest.fixture(scope="module")
def index_of(records):
    """fingerprint -> global record index."""
    dataset = TRDataset(records, transform=fingerprint)
    index = {dataset[i]: i for i in range(len(dataset))}
    assert len(dataset) == N and len(index) == N  # every record has its own fingerprint
    return index


def make(records, mode, batch_size=4, num_workers=0, seed=SEED, **kwargs):
    return TorchRecord(
        records,
        shuffle=mode,
        batch_size=batch_size,
        num_workers=num_workers,
        transform=fingerprint,
        seed=seed,
        **kwargs,
    )


def read(loader, index_of, batches=None):
    """The batches read (as lists of global indices), stopping after ``batches`` of them."""
    out = []
    for crcs, labels in loader:
        out.append([index_of[(int(c), int(label))] for c, label in zip(crcs, labels)])
        if len(out) == batches:
            break
    return out


def flat(batches):
    return [i for batch in batches for i in batch]


def epoch_order(records, index_of, mode, epoch, seed=SEED):
    """An uninterrupted epoch, read by a loader of its own."""
    loader = make(records, mode, batch_size=5, seed=seed)
    loader.set_epoch(epoch)
    return flat(read(loader, index_of))


@pytest.mark.parametrize("k", [2, 5])
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("mode", MODES)
def test_resume_mid_epoch_in_a_new_loader(records, index_of, mode, num_workers, k):
    epoch = 3
    first = make(records, mode, batch_size=4, num_workers=num_workers)
    first.set_epoch(epoch)
    head = flat(read(first, index_of, batches=k))
    assert len(head) == 4 * k
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint would keep it
    assert (state["epoch"], state["consumed"]) == (epoch, 4 * k)

    # other worker count, other batch size
    resumed = make(records, mode, batch_size=3, num_workers=2 - num_workers)
    resumed.load_state_dict(state)
    remaining_batches = len(resumed)
    assert remaining_batches == math.ceil((N - 4 * k) / 3)
    rest_batches = read(resumed, index_of)
    assert len(rest_batches) == remaining_batches
    rest = flat(rest_batches)

    whole = epoch_order(records, index_of, mode, epoch)
    assert sorted(whole) == list(range(N))
    assert (whole == list(range(N))) == (mode == "none")
    assert head + rest == whole  # nothing repeated, nothing skipped, same order
    # the resumed loader then goes on with the next epoch
    after = resumed.state_dict()
    assert (after["epoch"], after["consumed"]) == (epoch + 1, 0)
    assert flat(read(resumed, index_of)) == epoch_order(records, index_of, mode, epoch + 1)


@pytest.mark.parametrize("mode", MODES)
def test_state_before_iteration_and_after_an_epoch(records, index_of, mode):
    loader = make(records, mode, batch_size=4, num_workers=2)
    state = loader.state_dict()
    assert {k: state[k] for k in ("epoch", "consumed", "seed", "mode", "num_records")} == {
        "epoch": 0,
        "consumed": 0,
        "seed": SEED,
        "mode": mode,
        "num_records": N,
    }
    epoch0 = flat(read(loader, index_of))
    assert epoch0 == epoch_order(records, index_of, mode, 0)
    done = loader.state_dict()
    assert (done["epoch"], done["consumed"]) == (1, 0)

    epoch1 = epoch_order(records, index_of, mode, 1)
    assert (epoch1 == epoch0) == (mode == "none")
    other = make(records, mode, batch_size=3)
    other.load_state_dict(done)
    assert len(other) == math.ceil(N / 3)
    assert flat(read(other, index_of)) == epoch1
    assert flat(read(loader, index_of)) == epoch1  # the first loader moved on by itself

    # the state taken before any iteration rewinds a loader to the start of epoch 0
    loader.load_state_dict(state)
    assert flat(read(loader, index_of)) == epoch0


def test_state_after_an_interrupted_epoch_and_set_epoch(records, index_of):
    loader = make(records, "global", batch_size=4)
    read(loader, index_of, batches=3)  # epoch 0 left after 12 records
    loader.set_epoch(5)
    state = loader.state_dict()
    resumed = make(records, "global", batch_size=3)
    resumed.load_state_dict(state)
    # a checkpoint taken now resumes where the loader itself goes on: epoch 5, from its start
    epoch5 = epoch_order(records, index_of, "global", 5)
    assert flat(read(loader, index_of)) == epoch5
    assert flat(read(resumed, index_of)) == epoch5


@pytest.mark.parametrize("mode", MODES)
def test_set_epoch_reproduces_an_order(records, index_of, mode):
    def order(epoch, num_workers, batch_size, seed=SEED):
        loader = make(records, mode, batch_size, num_workers, seed=seed)
        loader.set_epoch(epoch)
        return flat(read(loader, index_of))

    base = order(4, 0, 4)
    assert sorted(base) == list(range(N))
    assert order(4, 2, 3) == base
    assert order(4, 1, N) == base
    assert base == TRSampler(records, shuffle=mode, seed=SEED).order(4).tolist()
    if mode == "none":
        assert base == list(range(N)) == order(5, 0, 4) == order(4, 0, 4, seed=SEED + 1)
    else:
        assert order(5, 0, 4) != base
        assert order(4, 0, 4, seed=SEED + 1) != base


def test_load_state_dict_refuses_other_settings(records, index_of):
    source = make(records, "block")
    read(source, index_of, batches=2)
    state = source.state_dict()
    assert state["consumed"] == 8

    other_seed = make(records, "block", seed=SEED + 1)
    with pytest.raises(ValueError, match=f"seed={SEED}\\b"):
        other_seed.load_state_dict(state)
    other_mode = make(records, "global")
    with pytest.raises(ValueError, match="mode='block'"):
        other_mode.load_state_dict(state)
    other_pool = make(records, "block", pool_size=8)
    with pytest.raises(ValueError, match="pool_size=64"):
        other_pool.load_state_dict(state)

    # a refused state changes nothing: each loader still reads its whole epoch 0
    assert flat(read(other_seed, index_of)) == epoch_order(records, index_of, "block", 0, SEED + 1)
    assert flat(read(other_mode, index_of)) == epoch_order(records, index_of, "global", 0)


@pytest.mark.parametrize("mode", MODES)
def test_resume_with_persistent_workers(records, index_of, mode):
    loader = make(records, mode, batch_size=4, num_workers=2, persistent_workers=True)
    assert flat(read(loader, index_of)) == epoch_order(records, index_of, mode, 0)
    head = flat(read(loader, index_of, batches=3))  # epoch 1; the workers prefetch more
    state = loader.state_dict()
    assert (state["epoch"], state["consumed"]) == (1, 12)
    epoch1 = epoch_order(records, index_of, mode, 1)
    epoch2 = epoch_order(records, index_of, mode, 2)

    fresh = make(records, mode, batch_size=3, num_workers=2, persistent_workers=True)
    fresh.load_state_dict(state)
    assert len(fresh) == math.ceil((N - 12) / 3)
    assert head + flat(read(fresh, index_of)) == epoch1
    assert flat(read(fresh, index_of)) == epoch2

    # the same loader, whose live workers still hold batches of the interrupted epoch
    loader.load_state_dict(state)
    assert head + flat(read(loader, index_of)) == epoch1
    assert flat(read(loader, index_of)) == epoch2


def test_set_epoch_after_load_keeps_the_resumed_position_only_for_its_epoch(records):
    loader = make(records, "global", batch_size=4)
    loader.set_epoch(3)
    first = []
    for i, (crcs, labels) in enumerate(loader):
        first += list(zip(crcs.tolist(), labels.tolist()))
        if i == 1:
            break
    state = loader.state_dict()
    assert (state["epoch"], state["consumed"]) == (3, 8)
    resumed = make(records, "global", batch_size=4)
    resumed.load_state_dict(state)
    resumed.set_epoch(3)  # a training loop calling set_epoch(epoch) after loading: still resumes
    rest = [pair for crcs, labels in resumed for pair in zip(crcs.tolist(), labels.tolist())]
    assert len(first) + len(rest) == 26 and len(set(first + rest)) == 26
    other = make(records, "global", batch_size=4)
    other.load_state_dict(state)
    other.set_epoch(4)  # another epoch: from its start
    assert sum(len(labels) for _, labels in other) == 26


def test_load_state_dict_refuses_a_state_from_another_dataset(records, index_of, tmp_path):
    """The same 26 images in 5 shards instead of 4 (block mode orders by shard), or other
    images: a position in either would repeat some records and skip others."""
    entries = [line for line in (records.parent / "data_list.txt").read_text().splitlines()]
    data_list = tmp_path / "list.txt"
    data_list.write_text("\n".join(entries) + "\n")
    Writer(data_list, tmp_path / "five", db_num=5, codec="jpeg", shuffle=False).write()
    swapped = tmp_path / "swapped.txt"  # the same count, two labels swapped
    first, last = entries[0].rsplit(" ", 1), entries[-1].rsplit(" ", 1)
    assert first[1] != last[1]
    entries[0], entries[-1] = f"{first[0]} {last[1]}", f"{last[0]} {first[1]}"
    swapped.write_text("\n".join(entries) + "\n")
    Writer(swapped, tmp_path / "other", db_num=4, codec="jpeg", shuffle=False).write()

    for mode in ("block", "global"):
        source = make(records, mode)
        read(source, index_of, batches=2)
        state = source.state_dict()
        for other in (tmp_path / "five", tmp_path / "other"):
            loader = make(other, mode)
            with pytest.raises(ValueError, match="comes from another dataset"):
                loader.load_state_dict(state)
            assert sum(len(labels) for _, labels in loader) == N  # unchanged: a whole epoch

    # a copy of the dataset is the same dataset
    import shutil

    shutil.copytree(records, tmp_path / "copy")
    source = make(records, "block")
    head = flat(read(source, index_of, batches=2))
    copy = make(tmp_path / "copy", "block")
    copy.load_state_dict(source.state_dict())
    assert head + flat(read(copy, index_of)) == epoch_order(records, index_of, "block", 0)


def test_load_state_dict_refuses_what_is_not_a_state(records):
    loader = make(records, "global")
    state = loader.state_dict()
    for bad, message in [
        ({k: v for k, v in state.items() if k != "seed"}, "lacks seed"),
        ([1, 2], "not a TorchRecord loader state"),
        (dict(state, version=99), "version 99"),
        (dict(state, epoch=-1), "epoch must be a non-negative integer"),
        (dict(state, epoch=1.5), "epoch must be an integer"),
    ]:
        with pytest.raises((ValueError, TypeError), match=message):
            loader.load_state_dict(bad)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_len_in_a_resumed_epoch_counts_its_remaining_batches(records, index_of, num_workers):
    first = make(records, "global", batch_size=5)
    read(first, index_of, batches=2)
    resumed = make(records, "global", batch_size=5, num_workers=num_workers)
    resumed.load_state_dict(first.state_dict())
    expected = math.ceil((N - 10) / 5)
    assert len(resumed) == expected
    lengths, batches = set(), 0
    for _ in resumed:
        lengths.add(len(resumed))  # (a scheduler or a progress bar asks inside the loop)
        batches += 1
    assert batches == expected and lengths == {expected}
    assert len(resumed) == math.ceil(N / 5)  # after it: the next epoch, whole


def test_seeds_of_64_bits_do_not_meet_other_seeds_epochs(records):
    def order(seed, epoch):
        sampler = TRSampler(records, shuffle="global", seed=seed)
        return sampler.order(epoch).tolist()

    import numpy as np

    assert order(2**32, 0) != order(0, 1)
    assert order(3 + 9 * 2**32, 0) != order(3, 9)
    large = [order(2**32, 0), order(2**33, 0), order(2**64 + 5, 0)]
    assert all(a != b for i, a in enumerate(large) for b in large[i + 1 :])
    assert order(2**40 + 7, 2) == order(2**40 + 7, 2)  # still a function of (seed, epoch)
    # seeds and epochs under 2**32 keep the orders they always had
    for seed, epoch in [(0, 0), (11, 3), (2**32 - 1, 2**32 - 1)]:
        expected = np.random.default_rng([seed, epoch]).permutation(N).tolist()
        assert order(seed, epoch) == expected
    with pytest.raises(ValueError, match="epoch must be below 2\\*\\*32"):
        TRSampler(records, shuffle="global").set_epoch(2**32)


def test_a_state_of_the_earlier_order_scheme_is_refused_for_large_seeds(records, index_of):
    for seed, accepted in [(5, True), (2**32 + 5, False)]:
        source = make(records, "global", seed=seed)
        head = flat(read(source, index_of, batches=1))
        state = source.state_dict()
        del state["order"]  # as saved before seeds of 2**32 or more got their own orders
        resumed = make(records, "global", seed=seed)
        if accepted:
            resumed.load_state_dict(state)
            assert sorted(head + flat(read(resumed, index_of))) == list(range(N))
        else:
            with pytest.raises(ValueError, match="saved by an earlier TorchRecord"):
                resumed.load_state_dict(state)


def test_a_refused_state_changes_nothing(records, index_of):
    loader = make(records, "global")
    state = dict(loader.state_dict(), epoch=3, consumed=10**6)
    with pytest.raises(ValueError, match="outside an epoch"):
        loader.load_state_dict(state)
    assert flat(read(loader, index_of)) == epoch_order(records, index_of, "global", 0)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"seed": -1}, ValueError, "seed must be a non-negative integer"),
        ({"seed": 1.5}, TypeError, "seed must be an integer"),
        ({"seed": True}, TypeError, "seed must be an integer"),
        ({"world_size": 2}, ValueError, "world_size=2 without rank"),
        ({"rank": 1}, ValueError, "rank=1 without world_size"),
        ({"rank": 0, "world_size": 0}, ValueError, "not in a world of size 0"),
        ({"batch_size": None}, ValueError, "batch_size=None"),
        ({"batch_size": 0}, ValueError, "batch_size=0"),
    ],
)
def test_bad_order_arguments_are_refused_when_the_loader_is_made(records, kwargs, error, message):
    with pytest.raises(error, match=message):
        make(records, "global", **kwargs)


def test_bad_epochs_are_refused(records):
    loader = make(records, "global")
    for bad, error in [(-1, ValueError), (1.5, TypeError), ("3", TypeError)]:
        with pytest.raises(error, match="epoch must be"):
            loader.set_epoch(bad)


def test_a_rank_that_iterates_again_without_set_epoch_is_warned_once(records, recwarn):
    """Under a world size above 1, an epoch reached by iterating again (not by set_epoch) is
    only right if every rank iterates as often: said once; set_epoch at every epoch is quiet."""
    quiet = make(records, "global", rank=0, world_size=2)
    for epoch in range(3):
        quiet.set_epoch(epoch)
        assert sum(len(labels) for _, labels in quiet) == N // 2
    assert not [w for w in recwarn if "without set_epoch" in str(w.message)]

    drifting = make(records, "global", rank=1, world_size=2)
    for _ in drifting:  # epoch 0: chosen, quiet
        pass
    with pytest.warns(RuntimeWarning, match=r"rank 1 of 2 reads epoch 1, reached by iterating"):
        for _ in drifting:
            pass
    recwarn.clear()
    for _ in drifting:  # once is enough
        pass
    assert not [w for w in recwarn if "without set_epoch" in str(w.message)]
    alone = make(records, "global")  # one process: iterating on is how epochs go by
    for _ in range(2):
        for _ in alone:
            pass
    assert not [w for w in recwarn if "without set_epoch" in str(w.message)]


def test_a_state_whose_epoch_this_numpy_orders_otherwise_is_refused(records, index_of):
    """numpy does not promise its permutations across versions: a state carries a digest of
    its epoch's order, and a loader that would draw that epoch otherwise refuses it. (A numpy
    with other permutations is stood in for by the digest of another epoch's order.)"""
    source = make(records, "global")
    head = flat(read(source, index_of, batches=2))
    state = source.state_dict()
    assert state["order_digest"] == TRSampler(records, shuffle="global", seed=SEED).order_digest(0)
    other_numpy = dict(
        state,
        numpy="1.0.0",
        order_digest=TRSampler(records, shuffle="global", seed=SEED).order_digest(1),
    )
    loader = make(records, "global")
    with pytest.raises(ValueError, match="saved under numpy 1.0.0, this is numpy .* resume under"):
        loader.load_state_dict(other_numpy)
    assert flat(read(loader, index_of)) == epoch_order(records, index_of, "global", 0)  # unchanged

    for accepted in (state, {k: v for k, v in state.items() if k != "order_digest"}):
        resumed = make(records, "global", num_workers=2, batch_size=3)
        resumed.load_state_dict(accepted)  # (a state saved before the digest is not checked)
        assert head + flat(read(resumed, index_of)) == epoch_order(records, index_of, "global", 0)
