"""A structural check of an LMDB shard file, before anything maps it into memory.

LMDB 0.9 trusts its file: a flipped byte in a page header, a node or a meta page can make it read
past the end of the map (SIGSEGV, SIGBUS), trip an assertion (SIGABRT) or silently read an older
snapshot or the wrong page. A reader killed by a signal inside a DataLoader worker is the worst
failure a loader can have, so every shard goes through :func:`check_shard` first.

It reads, with ``os.pread`` (never ``mmap``: a short file is an error, not a signal), the two meta
pages and every branch and leaf page of the committed tree, and bounds-checks everything LMDB
dereferences on the read path: page numbers, page kinds, node pointers and sizes, key order
within and across pages, the overflow runs of large values (inside the file, disjoint), and the
counters of the meta page. It never reads record payloads (their CRC-32 covers those) or the
free-page tree (readers never touch it). Cost: about 15 ms for a 1 GB shard of 30,000 large
records and 0.2 s for a shard of 1,000,000 tiny ones; the reader runs it once per shard file
per process.

Layout: 64-bit little-endian LMDB 0.9, the main database only (flags 0), as TorchRecord writes.
"""

from __future__ import annotations

import os

import numpy as np

PAGEHDRSZ = 16
P_BRANCH, P_LEAF, P_OVERFLOW, P_META = 0x01, 0x02, 0x04, 0x08
F_BIGDATA = 0x01
MDB_MAGIC, MDB_DATA_VERSION = 0xBEEFC0DE, 1
MDB_INTEGERKEY = 0x08
P_INVALID = (1 << 64) - 1
CURSOR_STACK = 32
MAXKEYSIZE = 511
TR_META_KEYS = (b"__checksums__", b"__torchrecord__")  # sort after every 8-byte record key
CHUNK = 4096  # pages per batch


class Invalid(Exception):
    """The shard's structure is damaged (the message says where)."""


def _u(b, o, n):
    return int.from_bytes(b[o : o + n], "little")


def _meta(raw, i, psize_hint):
    """Field checks of meta page i (what mdb_env_read_header checks, and more)."""
    if len(raw) < 152:
        raise Invalid(f"meta page {i}: file too short")
    m = dict(
        pgno=_u(raw, 0, 8),
        pad=_u(raw, 8, 2),
        flags=_u(raw, 10, 2),
        lower=_u(raw, 12, 2),
        upper=_u(raw, 14, 2),
        magic=_u(raw, 16, 4),
        version=_u(raw, 20, 4),
        address=_u(raw, 24, 8),
        mapsize=_u(raw, 32, 8),
        psize=_u(raw, 40, 4),
        free_flags=_u(raw, 44, 2),
        free_depth=_u(raw, 46, 2),
        free_root=_u(raw, 80, 8),
        pad_main=_u(raw, 88, 4),
        flags_main=_u(raw, 92, 2),
        depth=_u(raw, 94, 2),
        branch=_u(raw, 96, 8),
        leaf=_u(raw, 104, 8),
        overflow=_u(raw, 112, 8),
        entries=_u(raw, 120, 8),
        root=_u(raw, 128, 8),
        last_pg=_u(raw, 136, 8),
        txnid=_u(raw, 144, 8),
    )
    if m["magic"] != MDB_MAGIC:
        raise Invalid(f"meta {i}: bad magic {m['magic']:#x}")
    if m["version"] != MDB_DATA_VERSION:
        raise Invalid(f"meta {i}: data version {m['version']}")
    if (m["pgno"], m["pad"], m["flags"], m["lower"], m["upper"]) != (i, 0, P_META, 0, 0):
        raise Invalid(f"meta {i}: bad page header")
    if m["psize"] != psize_hint:
        raise Invalid(f"meta {i}: page size {m['psize']} != {psize_hint}")
    if m["address"] != 0:
        raise Invalid(f"meta {i}: mm_address {m['address']:#x} (MDB_FIXEDMAP is never used)")
    if m["last_pg"] < 1 or m["mapsize"] < (m["last_pg"] + 1) * m["psize"]:
        raise Invalid(f"meta {i}: last_pg {m['last_pg']} / mapsize {m['mapsize']} inconsistent")
    if (
        not m["free_flags"] & MDB_INTEGERKEY
        or m["free_depth"] > CURSOR_STACK
        or not (m["free_root"] == P_INVALID or 2 <= m["free_root"] <= m["last_pg"])
    ):
        raise Invalid(f"meta {i}: bad free-DB record")
    if m["pad_main"] != 0 or m["flags_main"] != 0:  # any flag changes key order or node layout
        raise Invalid(
            f"meta {i}: main DB md_pad/md_flags {m['pad_main']}/{m['flags_main']:#x}, expected 0/0"
        )
    if m["root"] == P_INVALID:
        if m["depth"] or m["entries"] or m["branch"] or m["leaf"] or m["overflow"]:
            raise Invalid(f"meta {i}: empty main DB with nonzero counters")
    elif not (
        1 <= m["depth"] <= CURSOR_STACK
        and 2 <= m["root"] <= m["last_pg"]
        and m["branch"] + m["leaf"] + m["overflow"] <= m["last_pg"] - 1
        and m["leaf"] >= 1
        and m["branch"] >= m["depth"] - 1
    ):
        raise Invalid(f"meta {i}: main DB record out of range")
    return m


def validate(path, overflow_headers=False, torchrecord=True, expected_size=None, layout=2):
    """A list of problems (empty: the shard is structurally sound and safe to map).

    ``overflow_headers`` also reads the first page header of every large value (one random
    read per record from a cold cache; crash safety does not need it). ``torchrecord`` checks
    the keys against the format version ``layout``: record keys followed by the two metadata
    keys, where the record keys are 0..N-1 (version 1) or each record's 1 to 4 parts, ``4*i``,
    ``4*i+1``... without gaps, for i = 0..N-1 (version 2).

    Reading the file can fail (``OSError``, ``MemoryError``): that is not a verdict on the shard
    and propagates.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        _validate(fd, overflow_headers, torchrecord and layout, expected_size)
        return []
    except Invalid as e:
        return [str(e)]
    except (OSError, MemoryError):
        raise
    except Exception as e:  # a bug here must not let a damaged shard through
        return [f"validator internal error: {type(e).__name__}: {e}"]
    finally:
        os.close(fd)


def _validate(fd, overflow_headers, torchrecord, expected_size):
    size = os.fstat(fd).st_size
    if expected_size is not None and size != expected_size:
        raise Invalid(f"size {size} != {expected_size}")
    head = os.pread(fd, 152, 0)
    if len(head) < 152:
        raise Invalid("file too short for a meta page")
    psize = _u(head, 40, 4)
    if psize < 512 or psize > 0x8000 or psize & (psize - 1):
        raise Invalid(f"meta 0: implausible page size {psize}")
    if size % psize or size < 3 * psize:
        raise Invalid(f"file size {size} is not a whole number (>2) of {psize}-byte pages")
    m0 = _meta(head, 0, psize)
    m1 = _meta(os.pread(fd, 152, psize), 1, psize)
    t0, t1 = m0["txnid"], m1["txnid"]
    # txn N writes meta N&1; the other one holds N-1. Anything else: a damaged txnid would make
    # LMDB pick the wrong (stale) snapshot.
    if t0 & 1 or not t1 & 1 or abs(t0 - t1) != 1:
        raise Invalid(f"meta txnids {t0}/{t1} are not consecutive with meta0 even, meta1 odd")
    cur, old = (m1, m0) if t1 > t0 else (m0, m1)
    if old["last_pg"] > cur["last_pg"]:
        raise Invalid("older meta has a larger last_pg")
    npages = cur["last_pg"] + 1
    if npages * psize > size:
        raise Invalid(f"LMDB uses {npages * psize} bytes but the file has {size}")
    if cur["root"] == P_INVALID:
        if torchrecord:
            raise Invalid("empty main DB")
        return
    depth = cur["depth"]
    half = psize // 2
    tree_pages = []
    ovf_start, ovf_len = [], []
    n_branch = n_leaf = n_entries = 0
    level = np.array([cur["root"]], dtype=np.int64)
    # lower bound of every page on this level: kind 0 = none, 1 = an 8-byte key (in lo_val),
    # 2 = another key (in lo_other)
    lo_kind, lo_val, lo_other = np.zeros(1, np.int8), np.zeros(1, np.uint64), {}
    rec_keys = []  # uint64 arrays of the 8-byte leaf keys, in order
    other_keys = []  # (number of 8-byte keys before it, key) for leaf keys of other sizes
    n8_total = 0
    for d in range(1, depth + 1):
        is_leaf = d == depth
        if np.any(level < 2) or np.any(level >= npages):
            raise Invalid(f"depth {d}: child page number out of range")
        if len(np.unique(level)) != len(level):  # across levels: the overlap check below
            raise Invalid(f"depth {d}: a page is referenced twice")
        tree_pages.append(level)
        if is_leaf:
            n_leaf += len(level)
        else:
            n_branch += len(level)
        L = len(level)
        nk_kind, nk_val, nk_other = [], [], {}  # lower bounds of the next level
        next_level = []
        prev_last = None
        for c0 in range(0, L, CHUNK):
            pg = level[c0 : c0 + CHUNK]
            k = len(pg)
            buf = np.empty((k, psize), dtype=np.uint8)
            brk = np.flatnonzero(np.diff(pg) != 1) + 1  # read runs of consecutive pages in one call
            for a, b in zip(np.r_[0, brk].tolist(), np.r_[brk, k].tolist()):
                if os.preadv(fd, [buf[a:b]], int(pg[a]) * psize) != (b - a) * psize:
                    raise Invalid(f"page {pg[a]}: short read")
            flat = buf.reshape(-1)
            w = buf.view("<u2")
            if np.any(np.ascontiguousarray(buf[:, :8]).view("<u8").ravel() != pg.astype(np.uint64)):
                raise Invalid(f"depth {d}: a page's mp_pgno is not its position")
            want = P_LEAF if is_leaf else P_BRANCH
            if np.any(w[:, 5] != want):  # (mp_pad means nothing on these pages)
                raise Invalid(f"depth {d}: page flags not {want:#x} (md_depth {depth})")
            lower, upper = w[:, 6].astype(np.int64), w[:, 7].astype(np.int64)
            n = (lower - PAGEHDRSZ) >> 1
            if (
                np.any(lower & 1)
                or np.any(n < (1 if is_leaf else 2))
                or np.any(upper < lower)
                or np.any(upper > psize)
            ):
                raise Invalid(f"depth {d}: bad mp_lower/mp_upper")
            m = int(n.sum())
            pidx = np.repeat(np.arange(k), n)
            starts = np.cumsum(n) - n
            slot = np.arange(m) - np.repeat(starts, n)
            w = w.reshape(-1)
            base = pidx * half
            ptr = w[base + 8 + slot].astype(np.int64)
            if np.any(ptr & 1) or np.any(ptr < upper[pidx]) or np.any(ptr > psize - 8):
                raise Invalid(f"depth {d}: node pointer outside [mp_upper, psize-8] or odd")
            h = base + (ptr >> 1)
            lo_, hi_, fl, ks = w[h], w[h + 1], w[h + 2], w[h + 3].astype(np.int64)
            if is_leaf:
                big = fl == F_BIGDATA
                if np.any((fl != 0) & ~big):
                    raise Invalid("leaf node with flags other than F_BIGDATA")
                dsz = lo_.astype(np.int64) | (hi_.astype(np.int64) << 16)
                nsz = 8 + ks + np.where(big, 8, dsz)
                if np.any(ks < 1):
                    raise Invalid("leaf node with an empty key")
            else:
                nsz = 8 + ks
            if np.any(ks > MAXKEYSIZE):
                raise Invalid(f"depth {d}: key size > {MAXKEYSIZE}")
            end = ptr + nsz + (nsz & 1)
            if np.any(end > psize):
                raise Invalid(f"depth {d}: node runs past the end of its page")
            # nodes must tile [mp_upper, psize) exactly (no overlap, no gap: LMDB packs pages)
            same = pidx[1:] == pidx[:-1]
            if np.all(ptr[1:][same] < ptr[:-1][same]):  # usual layout: node i+1 sits below node i
                sp, se, ss = ptr[::-1], end[::-1], same[::-1]
                spi = pidx[::-1]
            else:
                o = np.lexsort((ptr, pidx))
                sp, se, spi = ptr[o], end[o], pidx[o]
                ss = spi[1:] == spi[:-1]
            if np.any(se[:-1][ss] != sp[1:][ss]):
                raise Invalid(f"depth {d}: nodes overlap or leave a gap")
            first = np.r_[True, ~ss]
            last = np.r_[~ss, True]
            if np.any(sp[first] != upper[spi[first]]) or np.any(se[last] != psize):
                raise Invalid(f"depth {d}: nodes do not fill [mp_upper, psize)")
            # keys (branch node 0's key is not a separator and is ignored)
            keyed = np.ones(m, dtype=bool) if is_leaf else slot > 0
            if not is_leaf and np.any(ks[keyed] < 1):
                raise Invalid("branch separator with an empty key")
            A = np.flatnonzero(keyed)
            is8 = ks[A] == 8
            i8 = A[is8]
            kvn = np.zeros(len(A), dtype=np.uint64)
            if len(i8):
                kb = flat[(pidx[i8] * psize + ptr[i8] + 8)[:, None] + np.arange(8)]
                kvn[is8] = kb.view(">u8").ravel()

            def key(a, is8=is8, kvn=kvn, A=A, flat=flat, pidx=pidx, ptr=ptr, ks=ks):
                # bytes of the a-th keyed node
                if is8[a]:
                    return int(kvn[a]).to_bytes(8, "big")
                i = A[a]
                return bytes(
                    flat[pidx[i] * psize + ptr[i] + 8 : pidx[i] * psize + ptr[i] + 8 + ks[i]]
                )

            both = is8[1:] & is8[:-1]
            if np.any(kvn[1:][both] <= kvn[:-1][both]):
                raise Invalid(f"depth {d}: keys not strictly increasing")
            for a in np.flatnonzero(~both).tolist():  # pairs involving a key that is not 8 bytes
                if key(a + 1) <= key(a):
                    raise Invalid(f"depth {d}: keys not strictly increasing")
            if prev_last is not None and key(0) <= prev_last:
                raise Invalid(f"depth {d}: keys not strictly increasing")
            prev_last = key(len(A) - 1)
            # every page: lower bound <= its first key, its last key < the next page's bound
            kpage = pidx[A]
            fa = np.searchsorted(kpage, np.arange(k))
            la = np.searchsorted(kpage, np.arange(k), side="right") - 1
            g = np.arange(c0, c0 + k)
            kl, vl = lo_kind[g], lo_val[g]
            gn = np.minimum(g + 1, L - 1)
            kn = np.where(g + 1 < L, lo_kind[gn], 0)
            vn = lo_val[gn]
            fast = is8[fa] & is8[la] & (kl < 2) & (kn < 2)
            ok = ((kl == 0) | (kvn[fa] >= vl)) & ((kn == 0) | (kvn[la] < vn))
            if np.any(fast & ~ok):
                raise Invalid(f"depth {d}: a page holds keys outside its separator range")
            for j in np.flatnonzero(~fast).tolist():

                def lob(gg, L=L, lo_kind=lo_kind, lo_val=lo_val, lo_other=lo_other):
                    if gg >= L or lo_kind[gg] == 0:
                        return None
                    return int(lo_val[gg]).to_bytes(8, "big") if lo_kind[gg] == 1 else lo_other[gg]

                lo, nxt = lob(c0 + j), lob(c0 + j + 1)
                if (lo is not None and key(fa[j]) < lo) or (nxt is not None and key(la[j]) >= nxt):
                    raise Invalid(f"depth {d}: page {pg[j]} holds keys outside its separator range")
            if is_leaf:
                n_entries += m
                rec_keys.append(kvn[is8])
                others = np.flatnonzero(~is8)
                if torchrecord and len(other_keys) + len(others) > len(TR_META_KEYS):
                    raise Invalid("keys other than record keys and the two metadata keys")
                before = np.cumsum(is8) - is8  # 8-byte keys before each key of this chunk
                for a in others.tolist():
                    other_keys.append((n8_total + int(before[a]), key(a)))
                n8_total += int(is8.sum())
                bi = np.flatnonzero(big)
                if len(bi):
                    ob = pidx[bi] * psize + ptr[bi] + 8 + ks[bi]
                    op = np.zeros(len(bi), dtype=np.uint64)
                    for i in range(8):
                        op |= flat[ob + i].astype(np.uint64) << np.uint64(8 * i)
                    need = (PAGEHDRSZ - 1 + dsz[bi]) // psize + 1
                    if (
                        np.any(op < 2)
                        or np.any(op >= npages)
                        or np.any(op.astype(np.int64) + need > npages)
                    ):
                        raise Invalid("overflow extent outside [2, last_pg]")
                    ovf_start.append(op.astype(np.int64))
                    ovf_len.append(need)
            else:
                next_level.append(
                    lo_.astype(np.int64)
                    | (hi_.astype(np.int64) << 16)
                    | (fl.astype(np.int64) << 32)
                )
                # lower bound of each child: its separator, or (node 0) the page's own lower bound
                ck = np.where(ks == 8, 1, 2).astype(np.int8)
                cv = np.zeros(m, dtype=np.uint64)
                cv[A] = kvn
                s0 = slot == 0
                ck[s0] = lo_kind[c0 + pidx[s0]]
                cv[s0] = lo_val[c0 + pidx[s0]]
                base_n = sum(len(x) for x in nk_kind)
                for i in np.flatnonzero(ck == 2).tolist():
                    if s0[i]:
                        nk_other[base_n + i] = lo_other[c0 + pidx[i]]
                    else:
                        nk_other[base_n + i] = key(int(np.searchsorted(A, i)))
                nk_kind.append(ck)
                nk_val.append(cv)
                if base_n + m > npages:
                    raise Invalid(f"depth {d}: more child pointers than pages in the file")
        if not is_leaf:
            level = np.concatenate(next_level)
            lo_kind, lo_val, lo_other = np.concatenate(nk_kind), np.concatenate(nk_val), nk_other
    # counters in the meta must match the walk
    os_ = np.concatenate(ovf_start) if ovf_start else np.zeros(0, dtype=np.int64)
    ol = np.concatenate(ovf_len) if ovf_len else np.zeros(0, dtype=np.int64)
    # (LMDB may count more overflow pages than the values need: a large value overwritten by a
    # smaller one keeps its pages)
    if (n_branch, n_leaf, n_entries) != (cur["branch"], cur["leaf"], cur["entries"]) or int(
        ol.sum()
    ) > cur["overflow"]:
        raise Invalid(
            f"walk found {n_branch}/{n_leaf}/{int(ol.sum())} branch/leaf/overflow pages and "
            f"{n_entries} entries; meta says {cur['branch']}/{cur['leaf']}/"
            f"{cur['overflow']}/{cur['entries']}"
        )
    # overflow extents: disjoint from each other and from the tree pages
    tp = np.concatenate(tree_pages)
    starts = np.concatenate([os_, tp])
    lengths = np.concatenate([ol, np.ones(len(tp), dtype=np.int64)])
    order = np.argsort(starts, kind="stable")
    starts, lengths = starts[order], lengths[order]
    if np.any(starts[1:] < starts[:-1] + lengths[:-1]):
        raise Invalid("pages are used twice (overflow runs or tree pages overlap)")
    if overflow_headers and len(os_):
        o = np.argsort(os_)
        for s, ln in zip(os_[o].tolist(), ol[o].tolist()):
            h = os.pread(fd, 16, s * psize)
            if (
                _u(h, 0, 8) != s
                or _u(h, 8, 2) != 0
                or _u(h, 10, 2) != P_OVERFLOW
                or _u(h, 12, 4) < ln
            ):
                raise Invalid(
                    f"overflow page {s}: header does not match the node that points to it"
                )
    if torchrecord:
        rk = np.concatenate(rec_keys) if rec_keys else np.zeros(0, dtype=np.uint64)
        if [k for _, k in other_keys] != list(TR_META_KEYS) or other_keys[0][0] != len(rk):
            raise Invalid("the keys are not record keys followed by the two metadata keys")
        if torchrecord == 1:
            if not np.array_equal(rk, np.arange(len(rk), dtype=np.uint64)):
                raise Invalid("the record keys are not 0..N-1")
        else:
            # keys strictly increase (checked above), so: the first parts are 0, 4, 8, ... and
            # every other part directly follows the part before it
            part = rk & np.uint64(3)
            heads = rk[part == 0]
            if not np.array_equal(heads, np.arange(len(heads), dtype=np.uint64) * np.uint64(4)):
                raise Invalid("the records' first-part keys are not 4*i for i = 0..N-1")
            later = np.flatnonzero(part != 0)
            if len(later) and (later[0] == 0 or np.any(rk[later - 1] != rk[later] - np.uint64(1))):
                raise Invalid("a record part does not follow the part before it")
