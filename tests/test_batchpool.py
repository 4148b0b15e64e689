"""Batch buffers that DataLoader workers reuse (torchrecord/batchpool.py).

Real worker processes and real shared memory: a segment is identified in the training process
by the inode of the file behind its mapping. Every test compares pixels against a loader that
does not recycle, so a buffer overwritten while still in use would show as different values.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import time

import pytest
import torch

from torchrecord import TorchRecord, Writer

BATCH = 5  # 24 records: 5 batches per epoch (the last of 4 rows), from 2 workers


@pytest.fixture(scope="module")
def records(photo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("batchpool") / "records"
    Writer(photo_dir / "data_list.txt", out, db_num=4, codec="jpeg", shuffle=False).write()
    return out


def segment(images: torch.Tensor) -> int:
    """The inode of the shared-memory segment behind a batch received from a worker: the file
    this process has mapped where the batch's pixels are."""
    address = images.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, _, _, _, inode, *_ = line.split()
            start, end = (int(x, 16) for x in span.split("-"))
            if start <= address < end:
                assert int(inode) != 0, f"not a shared file: {line}"
                return int(inode)
    raise AssertionError(f"no mapping holds {address:#x}")


def loader(records, recycle: bool, **kwargs) -> TorchRecord:
    options = dict(shuffle=True, seed=3, batch_size=BATCH, num_workers=2, prefetch_factor=1)
    return TorchRecord(records, recycle_batches=recycle, **{**options, **kwargs})


def reference(records, epochs: int, **kwargs) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    plain = loader(records, recycle=False, **kwargs)
    return [[(images.clone(), labels.clone()) for images, labels in plain] for _ in range(epochs)]


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dropped_batches_are_reused_with_the_same_values(records, context):
    expected = reference(records, 2)
    recycling = loader(records, recycle=True, multiprocessing_context=context)
    pool = recycling.dataset.batch_pool
    assert pool is not None and pool.slots == 3  # prefetch_factor + 2
    segments = []
    for epoch in range(2):
        for step, (images, labels) in enumerate(recycling):
            segments.append(segment(images))
            want_images, want_labels = expected[epoch][step]
            assert torch.equal(images, want_images) and torch.equal(labels, want_labels)
            del images, labels  # the next batch may come in this one's buffer
    assert len(segments) == 10
    # each worker cycles through its few buffers (without recycling: 10 different segments)
    assert len(set(segments)) <= 2 * pool.slots


@pytest.mark.parametrize("persistent", [True, False])
def test_batches_still_held_are_never_overwritten(records, persistent):
    """Of one epoch's batches, a view, a numpy array or a tensor over the same memory (not a
    view of the batch) kept with the batch tensors themselves dropped; all of the next epoch
    kept, so every buffer stays in use: nothing changes under them, also when the workers of a
    new epoch are new processes."""
    expected = reference(records, 3, persistent_workers=persistent)
    recycling = loader(records, recycle=True, persistent_workers=persistent)
    held = []  # each batch of the first epoch through one kind of reference only
    for step, (images, _) in enumerate(recycling):
        if step % 3 == 0:
            held.append(images[1:])
        elif step % 3 == 1:
            held.append(images.numpy())
        else:
            alias = torch.empty(0, dtype=images.dtype)
            held.append(alias.set_(images.untyped_storage(), 0, images.shape, images.stride()))
        del images
    kept = [(images, labels) for images, labels in recycling]
    third = [(images.clone(), labels.clone()) for images, labels in recycling]
    for step, part in enumerate(held):
        want = expected[0][step][0]
        if step % 3 == 0:
            assert torch.equal(part, want[1:]), f"a view of batch {step} changed"
        elif step % 3 == 1:
            assert torch.equal(torch.from_numpy(part), want), f"array {step} changed"
        else:
            assert torch.equal(part, want), f"a tensor over batch {step} changed"
    for step, (images, labels) in enumerate(kept):
        assert torch.equal(images, expected[1][step][0]), f"epoch 1, batch {step} overwritten"
        assert torch.equal(labels, expected[1][step][1])
    for (images, labels), (want_images, want_labels) in zip(third, expected[2]):
        assert torch.equal(images, want_images) and torch.equal(labels, want_labels)


def test_recycling_can_be_turned_off_and_copies_of_the_dataset_do_not_recycle(records):
    plain = loader(records, recycle=False)
    assert plain.dataset.batch_pool is None
    assert len({segment(images) for images, _ in plain}) == 5  # a new segment per batch
    recycling = loader(records, recycle=True)
    assert (
        TorchRecord(records, batch_size=BATCH, shuffle=False).dataset.batch_pool is None
    )  # no workers
    # a pickled copy (not for a worker being started) has no shared cells: it cannot recycle
    copy = pickle.loads(pickle.dumps(recycling.dataset))
    assert copy.batch_pool.released is None
    images, ticket = copy.batch_pool.take(2, torch.float32)
    assert ticket is None and images.shape == (2, 3, 224, 224) and images.is_shared()


def test_a_fork_while_batches_are_held_withdraws_their_tickets(records):
    """A child forked while the training process holds a batch shares its pages: the parent
    dropping the batch afterwards must not let a worker write into them."""
    expected = reference(records, 1)
    recycling = loader(records, recycle=True)
    batches = iter(recycling)
    images, _ = next(batches)
    assert torch.equal(images, expected[0][0][0])
    want = hashlib.sha256(images.numpy().tobytes()).hexdigest()
    pages = images.numpy()
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # the child: no torch, only the bytes, once the parent has moved on
        try:
            os.close(read_end)
            time.sleep(2)
            os.write(write_end, hashlib.sha256(pages.tobytes()).hexdigest().encode())
        finally:
            os._exit(0)
    os.close(write_end)
    del images, pages  # the parent lets go: without the withdrawal, the buffer is free
    rest = [(images.clone(), labels.clone()) for images, labels in batches]
    rest += [(images.clone(), labels.clone()) for images, labels in recycling]  # and reuse
    with os.fdopen(read_end, "rb") as pipe:
        seen = pipe.read().decode()
    os.waitpid(child, 0)
    assert seen == want, "a worker wrote into a batch a forked child still maps"
    assert all(torch.equal(a, b[0]) for (a, _), b in zip(rest[:4], expected[0][1:]))


def test_samples_sent_by_another_collate_fn_are_never_overwritten(records):
    """A DataLoader of the user's over the loader's dataset, with ``collate_fn=list``: its
    samples are views into the worker's buffer, sent as they are; that buffer is let go of,
    never written again."""
    recycling = loader(records, recycle=True)
    dataset = recycling.dataset
    plain = torch.utils.data.DataLoader(dataset, batch_size=BATCH, num_workers=2, collate_fn=list)
    kept = [sample for _ in range(2) for batch in plain for sample in batch]
    assert len(kept) == 48
    expected = [dataset[i] for i in range(24)] * 2
    for n, ((image, label), (want, want_label)) in enumerate(zip(kept, expected)):
        assert label == want_label and torch.equal(image, want), f"sample {n} changed"


_RECEIVED: list = []  # the shared segments this process received (see the test below)
_rebuild_storage_fd = torch.multiprocessing.reductions.rebuild_storage_fd


def _counting_rebuild_storage_fd(*args, **kwargs):
    _RECEIVED.append(args)
    return _rebuild_storage_fd(*args, **kwargs)


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_mapped_buffer_crosses_once_then_batches_only_name_it(
    records, monkeypatch, channels_last
):
    """The training process maps each worker buffer the first time it arrives; after that a
    batch comes as a row count and labels, with no shared segment to pass (PyTorch passes one
    through a socket connection per tensor). The values stay the reference loader's, and so
    does the memory format (channel order, or ``channels_last``)."""
    from torch.multiprocessing import reductions

    expected = reference(records, 3)
    # counted where a worker's pickle names it (a function of a module, so the worker can)
    monkeypatch.setattr(reductions, "rebuild_storage_fd", _counting_rebuild_storage_fd)
    _RECEIVED.clear()
    # persistent workers: the same buffers
    recycling = loader(records, recycle=True, channels_last=channels_last)
    pool = recycling.dataset.batch_pool
    layout = torch.channels_last if channels_last else torch.contiguous_format
    passed = []
    for epoch in range(3):
        before = len(_RECEIVED)
        for step, (images, labels) in enumerate(recycling):
            want_images, want_labels = expected[epoch][step]
            assert torch.equal(images, want_images) and torch.equal(labels, want_labels)
            assert labels.dtype == torch.int64 and images.dtype == torch.float32
            assert images.is_contiguous(memory_format=layout), images.stride()
            assert images.is_contiguous() != channels_last
            del images, labels
        passed.append(len(_RECEIVED) - before)
    # each buffer once, never the labels (a slot may first be needed in a later epoch): 30
    # segments passed without the mapping
    assert passed[0] > 0 and sum(passed) <= 2 * pool.slots
    # what the training process maps is what the workers were told it maps
    mapped = {pool.mapped[cell] for cell in range(2 * pool.slots)} - {0}
    assert {ident for ident, _ in pool._maps.values()} == mapped


def test_two_iterators_of_one_loader_without_persistent_workers_share_its_pool(records):
    """Each iterator has its own worker 0 and 1, which use the same cells of the pool's shared
    arrays: the training process keeps their buffers apart (by worker process), so every batch
    of both keeps the values of a loader that does not recycle, iterated the same way."""
    options = dict(persistent_workers=False, prefetch_factor=2)
    plain = loader(records, recycle=False, **options)
    expected = [
        [(a.clone(), la.clone(), b.clone(), lb.clone()) for (a, la), (b, lb) in zip(plain, plain)]
        for _ in range(3)
    ]
    recycling = loader(records, recycle=True, **options)
    for epoch in range(3):
        steps = 0
        for ((a, la), (b, lb)), want in zip(zip(recycling, recycling), expected[epoch]):
            assert torch.equal(a, want[0]) and torch.equal(la, want[1])
            assert torch.equal(b, want[2]) and torch.equal(lb, want[3])
            steps += 1
            del a, b
        assert steps == 5
    # the mappings of the workers of finished iterators were dropped as new ones came
    pool = recycling.dataset.batch_pool
    assert len({pid for pid, _ in pool._maps}) <= 4


def test_a_forked_child_lets_go_of_the_mapped_buffers(records):
    """A process forked from the training process (another loader's worker, a process of the
    user's) never receives batches in its buffers: it keeps none of them mapped."""
    recycling = loader(records, recycle=True)
    assert len([labels for _, labels in recycling]) == 5
    pool = recycling.dataset.batch_pool
    assert pool._maps
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(read_end)
            os.write(write_end, str(len(pool._maps)).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        seen = pipe.read().decode()
    os.waitpid(child, 0)
    assert seen == "0" and pool._maps


def _hash_when_told(inbox, outbox) -> None:
    images = inbox.get()
    inbox.get()  # the parent has read on, its workers writing into every buffer again
    outbox.put(hashlib.sha256(images.numpy().tobytes()).hexdigest())


def test_a_batch_sent_on_through_pytorch_keeps_its_values(records):
    """A batch put on a torch.multiprocessing queue leaves as a copy in new shared memory (its
    storage is the training process's own, not the worker's buffer): the buffer written again
    afterwards does not change what the other process received."""
    expected = reference(records, 1)
    context = torch.multiprocessing.get_context("fork")
    inbox, outbox = context.Queue(), context.Queue()
    child = context.Process(target=_hash_when_told, args=(inbox, outbox))
    child.start()  # (before the loader: nothing held is shared with it by the fork)
    try:
        recycling = loader(records, recycle=True)
        batches = iter(recycling)
        images, _ = next(batches)
        assert torch.equal(images, expected[0][0][0])
        inbox.put(images)
        del images
        rest = [images.clone() for images, _ in batches]
        for _ in range(2):
            rest += [images.clone() for images, _ in recycling]
        assert len(rest) == 14
        inbox.put("now")
        seen = outbox.get(timeout=120)
    finally:
        child.join(timeout=120)
    assert seen == hashlib.sha256(expected[0][0][0].numpy().tobytes()).hexdigest()


def test_a_batch_naming_a_buffer_this_process_has_not_mapped_is_refused():
    from torchrecord.batchpool import _arrived

    with pytest.raises(RuntimeError, match="recycle_batches=False"):
        _arrived(5, ([1, 2, 3, 4, 5], torch.int64), "no such loader", 0, 1, 3, 7, os.getpid())


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_buffer_outside_the_pool_keeps_the_pools_memory_format(channels_last):
    """Where no slot can serve (not in a worker, a batch larger than the pool's), the fresh
    shared segment has the pool's memory format all the same."""
    from torchrecord.batchpool import BatchPool

    pool = BatchPool(1, 2, (4, 3, 224, 224), torch.uint8, channels_last=channels_last)
    for rows in (3, 5):
        images, ticket = pool.take(rows, torch.uint8)
        assert ticket is None and images.shape == (rows, 3, 224, 224) and images.is_shared()
        assert images.is_contiguous() != channels_last
        assert images.is_contiguous(memory_format=torch.channels_last) == channels_last
