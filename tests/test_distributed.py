"""Shares under a real gloo process group (one subprocess per rank), and resuming an epoch
with another world size."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch.distributed as dist
from conftest import fingerprint, read_list

from torchrecord import TorchRecord, TRDataset, TRSampler, Writer

SEED = 7
MODES = ("none", "block", "global")
SIZES = (24, 25)  # 24: a multiple of 2 and 3; 25: of neither
EPOCH = 2  # of the share runs
RESUME_EPOCH = 1
RESUME_N = 25
PHASE1_BATCHES = 2  # of 3 records, per rank of a world of 2: 12 records consumed

RANK_TIMEOUT = 45  # a rank still running then prints where it is and exits
LAUNCH_TIMEOUT = 60  # then the launcher kills every rank (and its DataLoader workers)

# One rank, run as a script file: runs every loader its config lists, all_gathers what each
# rank read, and rank 0 writes it all as JSON. Its DataLoader workers come from a forkserver:
# os.fork() in a rank whose gloo threads are live deadlocked a worker at birth in about one
# run in ten (the child blocks in PyOS_AfterFork_Child on CPython's thread-state lock).
RANK_SCRIPT = r"""
import faulthandler
import json
import multiprocessing
import sys
import warnings
import zlib

import torch.distributed as dist

from torchrecord import TorchRecord


def fingerprint(record):
    return zlib.crc32(record.protos[0].byte_data), int(record.protos[1].byte_data)


def make(run, rank, world):
    workers = run["num_workers"]
    loader = TorchRecord(
        run["records"],
        shuffle=run["mode"],
        batch_size=run["batch_size"],
        num_workers=workers,
        transform=fingerprint,
        seed=run["seed"],
        drop_last=run.get("drop_last", False),
        multiprocessing_context="forkserver" if workers else None,
    )
    sampler = loader.sampler
    assert (sampler.rank, sampler.world_size) == (rank, world), (sampler.rank, sampler.world_size)
    return loader


def read(loader, batches=None):
    ids, n = [], 0
    for crcs, labels in loader:
        ids += [[int(c), int(label)] for c, label in zip(crcs, labels)]
        n += 1
        if n == batches:
            break
    return ids


def main(rank, world, config):
    # a loader made before the group exists takes rank 0 of 1: it must refuse to read
    early = TorchRecord(config["early"], batch_size=2) if config.get("early") else None
    dist.init_process_group(
        "gloo", init_method="file://" + config["store"], rank=rank, world_size=world
    )

    def gather(obj):
        out = [None] * world
        dist.all_gather_object(out, obj)
        return out

    results = {"shares": [], "phase1": [], "phase2": [], "early": [], "disagree": []}
    if early is not None:
        try:
            next(iter(early))
            outcome = "read a batch"
        except RuntimeError as exc:
            outcome = str(exc)
        results["early"] = gather(outcome)
    if config.get("disagree"):
        # a loader one rank makes alone (a peek at a few samples) is no reason to refuse:
        # loaders are compared by the line that made them
        if rank == 0:
            peek = TorchRecord(config["disagree"], batch_size=8, shuffle=False,
                               transform=fingerprint)
            next(iter(peek))
        # ranks that disagree: a seed per rank (an augmentation habit), and a world size
        # larger than the group's (a warning: other groups may read the other shares)
        for options in ({"seed": 7 + rank}, {"rank": rank, "world_size": world + 1}):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    loader = TorchRecord(
                        config["disagree"], batch_size=2, transform=fingerprint, **options
                    )
                    read(loader)
                    outcome = "read"
                except (RuntimeError, ValueError) as exc:
                    outcome = str(exc)
            said = [str(w.message) for w in caught if "process group has" in str(w.message)]
            results["disagree"].append(gather([outcome, said]))
    for run in config["shares"]:
        loader = make(run, rank, world)
        loader.set_epoch(run["epoch"])
        ids = read(loader)
        results["shares"].append(gather({"ids": ids, "state": loader.state_dict()}))
    for run in config["phase1"]:
        loader = make(run, rank, world)
        loader.set_epoch(run["epoch"])
        ids = read(loader, run["batches"])
        results["phase1"].append(gather({"ids": ids, "state": loader.state_dict()}))
    for run in config["phase2"]:
        loader = make(run, rank, world)
        loader.load_state_dict(run["state"])
        batches = len(loader)
        ids = read(loader)
        state = loader.state_dict()
        results["phase2"].append(gather({"ids": ids, "len": batches, "state": state}))
    if rank == 0:
        with open(config["out"], "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    faulthandler.enable()  # a rank that aborts (SIGABRT from C++) prints its Python stack
    faulthandler.dump_traceback_later(float(sys.argv[4]), exit=True)
    # workers are forked from a server that has torch and this script's fingerprint loaded
    multiprocessing.set_forkserver_preload(["__main__", "torchrecord.loader"])
    with open(sys.argv[3]) as f:
        main(int(sys.argv[1]), int(sys.argv[2]), json.load(f))
"""


@pytest.fixture(scope="module")
def datasets(photo_dir, tmp_path_factory):
    """{n: (records dir, fingerprint -> global index)} for 24 and 25 records in 4 shards."""
    base = read_list(photo_dir / "data_list.txt")
    out = {}
    for n in SIZES:
        entries = base + [(base[0][0], 100)] * (n - len(base))  # one photo, a new label
        folder = tmp_path_factory.mktemp(f"dist{n}")
        data_list = folder / "data_list.txt"
        data_list.write_text("".join(f"{path} {label}\n" for path, label in entries))
        Writer(data_list, folder / "records", db_num=4, codec="jpeg", shuffle=False).write()
        dataset = TRDataset(folder / "records", transform=fingerprint)
        index = {dataset[i]: i for i in range(len(dataset))}
        assert len(dataset) == n and len(index) == n
        out[n] = (str(folder / "records"), index)
    return out


def launch(world: int, config: dict, folder) -> dict:
    """Run the world; once more if a rank was aborted inside gloo's C++ code ("terminate called
    without an active exception", a PyTorch flake seen once in many runs here, never in
    TorchRecord's code: its Python stack is printed by faulthandler). Any other failure fails."""
    results, output = _launch_once(world, config, folder)
    if results is None and "terminate called without an active exception" in output:
        results, output = _launch_once(world, config, folder / "again")
    if results is None:
        pytest.fail(
            f"a world of {world}: a rank failed, or they did not finish in {LAUNCH_TIMEOUT} s\n"
            + output
        )
    return results


def _launch_once(world: int, config: dict, folder) -> tuple[dict | None, str]:
    """Run one subprocess per rank, each in a session of its own; if one fails or time runs
    out, kill every session (ranks, their DataLoader workers and forkservers)."""
    folder.mkdir()
    script = folder / "rank_main.py"
    script.write_text(RANK_SCRIPT)
    config = {**config, "store": str(folder / "store"), "out": str(folder / "results.json")}
    config_path = folder / "config.json"
    config_path.write_text(json.dumps(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = [folder / f"rank{r}.log" for r in range(world)]
    procs = []
    ok = False
    try:
        for r in range(world):
            args = [script, r, world, config_path, RANK_TIMEOUT]
            with open(logs[r], "w") as log:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, *map(str, args)],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env,
                        start_new_session=True,
                    )
                )
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            if all(c == 0 for c in codes):
                ok = True
                return json.loads((folder / "results.json").read_text()), ""
            if any(c not in (None, 0) for c in codes):
                break
            time.sleep(0.05)
        codes = [p.poll() for p in procs]
    finally:
        if not ok:
            for p in procs:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in procs:
            p.wait()
    return None, "\n".join(
        f"--- rank {r} (exit {codes[r]}):\n{logs[r].read_text()}" for r in range(world)
    )


SHARE_CASES = [(n, mode, drop) for n in SIZES for mode in MODES for drop in (False, True)]


def share_run(datasets, n, mode, drop_last, batch_size=None):
    if batch_size is None:
        # drop_last also drops incomplete batches: batches of 1 (4 divides every share of 24)
        # show the sampler's own shares
        batch_size = (1 if n == 25 else 4) if drop_last else 3
    return {
        "records": datasets[n][0],
        "mode": mode,
        "drop_last": drop_last,
        "batch_size": batch_size,
        "num_workers": 1 if n == 25 else 0,
        "seed": SEED,
        "epoch": EPOCH,
    }


def share_runs(datasets):
    """The loaders each world runs for the share tests: SHARE_CASES, then drop_last with
    batches of 3, which do not divide a share of 8."""
    runs = [share_run(datasets, *case) for case in SHARE_CASES]
    return runs + [share_run(datasets, 25, "global", True, batch_size=3)]


@pytest.fixture(scope="module")
def gloo(datasets, tmp_path_factory):
    """{world: results}: a world of 2 (shares, then phase 1 of the resumption), then a world
    of 3 (shares, then phase 2 from the state phase 1 saved)."""
    folder = tmp_path_factory.mktemp("gloo")
    records = datasets[RESUME_N][0]
    common = {"records": records, "seed": SEED, "batch_size": 3}
    phase1 = [
        {**common, "mode": m, "num_workers": 1, "epoch": RESUME_EPOCH, "batches": PHASE1_BATCHES}
        for m in MODES
    ]
    two = launch(
        2,
        {
            "shares": share_runs(datasets),
            "phase1": phase1,
            "phase2": [],
            "early": records,
            "disagree": records,
        },
        folder / "2",
    )
    phase2 = [
        {**common, "mode": m, "num_workers": 0, "batch_size": 2, "state": gathered[0]["state"]}
        for m, gathered in zip(MODES, two["phase1"])
    ]
    three = launch(
        3, {"shares": share_runs(datasets), "phase1": [], "phase2": phase2}, folder / "3"
    )
    return {2: two, 3: three}


def ids_of(gathered, index):
    return [[index[tuple(fp)] for fp in rank["ids"]] for rank in gathered]


def order(records, mode, epoch):
    return TRSampler(records, shuffle=mode, seed=SEED).order(epoch).tolist()


def share_cases():
    for world in (2, 3):
        for run, (n, mode, drop_last) in enumerate(SHARE_CASES):
            case_id = f"world{world}-n{n}-{mode}" + ("-drop_last" if drop_last else "")
            yield pytest.param(world, run, n, mode, drop_last, id=case_id)


@pytest.mark.parametrize(("world", "run", "n", "mode", "drop_last"), list(share_cases()))
def test_shares_under_gloo(gloo, datasets, world, run, n, mode, drop_last):
    records, index = datasets[n]
    gathered = gloo[world]["shares"][run]
    shares = ids_of(gathered, index)
    epoch_order = order(records, mode, EPOCH)
    assert (epoch_order == list(range(n))) == (mode == "none")
    together = Counter(i for share in shares for i in share)
    assert max(together.values()) <= 2
    if drop_last:
        assert [len(s) for s in shares] == [n // world] * world
        assert max(together.values()) == 1  # disjoint
        assert len(together) == n - n % world
        assert set(together) == set(epoch_order[: n - n % world])  # the tail is dropped
    else:
        assert [len(s) for s in shares] == [math.ceil(n / world)] * world
        assert set(together) == set(range(n))
        twice = sorted(i for i, count in together.items() if count == 2)
        assert twice == sorted(epoch_order[: (-n) % world])  # the padding: the first records
    # a finished epoch: every rank's state says the next one, from its start
    states = [rank["state"] for rank in gathered]
    assert all(s == states[0] for s in states)
    assert (states[0]["epoch"], states[0]["consumed"]) == (EPOCH + 1, 0)


@pytest.mark.parametrize("world", [2, 3])
def test_drop_last_reads_only_full_batches(gloo, datasets, world):
    records, index = datasets[25]
    shares = ids_of(gloo[world]["shares"][-1], index)  # global, drop_last, batches of 3
    full = 25 // world // 3 * 3  # 12 of 12 in a world of 2, 6 of 8 in a world of 3
    epoch_order = order(records, "global", EPOCH)
    for rank, share in enumerate(shares):
        assert share == epoch_order[rank::world][:full]


@pytest.mark.parametrize("mode", MODES)
def test_resume_with_another_world_size(gloo, datasets, mode):
    records, index = datasets[RESUME_N]
    m = MODES.index(mode)
    epoch_order = order(records, mode, RESUME_EPOCH)

    phase1 = gloo[2]["phase1"][m]
    states = [rank["state"] for rank in phase1]
    assert all(s == states[0] for s in states)  # every rank saves the same state
    consumed = 2 * PHASE1_BATCHES * 3
    assert (states[0]["epoch"], states[0]["consumed"]) == (RESUME_EPOCH, consumed)
    first = ids_of(phase1, index)
    assert [len(s) for s in first] == [PHASE1_BATCHES * 3] * 2
    assert sorted(i for s in first for i in s) == sorted(epoch_order[:consumed])

    phase2 = gloo[3]["phase2"][m]
    remaining = RESUME_N - consumed
    share = math.ceil(remaining / 3)
    assert [rank["len"] for rank in phase2] == [math.ceil(share / 2)] * 3  # batches of 2
    second = ids_of(phase2, index)
    assert [len(s) for s in second] == [share] * 3
    together = Counter(i for s in first + second for i in s)
    assert set(together) == set(range(RESUME_N))
    twice = sorted(i for i, count in together.items() if count == 2)
    assert max(together.values()) <= 2
    assert twice == sorted(epoch_order[consumed : consumed + (-remaining) % 3])
    after = [rank["state"] for rank in phase2]
    assert all((s["epoch"], s["consumed"]) == (RESUME_EPOCH + 1, 0) for s in after)


def explicit_shares(run, world):
    """What each rank reads given rank= and world_size=, with no process group at all."""
    shares = []
    for rank in range(world):
        loader = TorchRecord(
            run["records"],
            shuffle=run["mode"],
            batch_size=run["batch_size"],
            transform=fingerprint,
            seed=run["seed"],
            drop_last=run.get("drop_last", False),
            rank=rank,
            world_size=world,
        )
        if "state" in run:
            loader.load_state_dict(run["state"])
        else:
            loader.set_epoch(run["epoch"])
        shares.append(
            [[int(c), int(label)] for crcs, labels in loader for c, label in zip(crcs, labels)]
        )
    return shares


@pytest.mark.parametrize("world", [2, 3])
def test_explicit_rank_and_world_size_match_gloo(gloo, datasets, world):
    assert not dist.is_initialized()
    for run, gathered in zip(share_runs(datasets), gloo[world]["shares"]):
        assert explicit_shares(run, world) == [rank["ids"] for rank in gathered], run
    if world == 3:
        for m, gathered in enumerate(gloo[3]["phase2"]):
            run = {
                "records": datasets[RESUME_N][0],
                "mode": MODES[m],
                "batch_size": 2,
                "seed": SEED,
                "state": gloo[2]["phase1"][m][0]["state"],
            }
            assert explicit_shares(run, 3) == [rank["ids"] for rank in gathered], run


def test_a_loader_made_before_the_process_group_refuses_to_read(gloo):
    """It took rank 0 of a world of 1: every rank would read every record."""
    outcomes = gloo[2]["early"]
    assert len(outcomes) == 2
    for rank, outcome in enumerate(outcomes):
        assert "created before torch.distributed.init_process_group()" in outcome
        assert f"this process is rank {rank} of 2" in outcome


def test_ranks_that_disagree_refuse_to_read(gloo):
    """A seed that differs by rank makes the ranks' shares overlap and miss records, silently:
    the rank that compares second refuses, naming the setting, while a loader that rank 0
    made alone before (a peek) changes nothing. A world size larger than the process group
    warns on every rank (another group may read the other shares)."""
    seeds, worlds = gloo[2]["disagree"]
    refused = [outcome for outcome, _ in seeds if outcome != "read"]
    assert len(refused) == 1, seeds  # the rank that compares second
    assert "TorchRecord loader disagrees with rank" in refused[0]
    assert "seed: " in refused[0] and "Vary augmentation by rank" in refused[0]
    assert len(worlds) == 2
    for outcome, said in worlds:
        assert outcome == "read"
        assert said and "world_size=3 but the torch.distributed process group has 2" in said[0]
