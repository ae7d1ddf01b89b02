"""Property tests of the virtqueue engines against random, mostly hostile rings.

Hypothesis writes random descriptor tables, indirect tables and ring indices into a small
guest RAM of two regions with a hole between them, then pops with both engines (the C
engine and the Python reference). Properties:

- popping never raises anything but :class:`VirtQueueError`, always ends, and every
  segment handed out lies inside RAM;
- both engines agree: the same chains, or the same errno, on the same input;
- completing chains writes only the areas the device owns (split: the used ring; packed:
  the descriptor ring and the device event area), never descriptors or data buffers;
- over random sequences of driver and device operations both engines leave guest memory
  byte-for-byte identical and answer every notification question alike.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iovirt.memory import GuestMemory
from iovirt.testing.virtio_driver import PackedDriver, SplitDriver, make_driver
from iovirt.virtio.pyqueue import PyVirtQueue
from iovirt.virtio.queue import (
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_USED,
    VIRTQ_DESC_F_WRITE,
    QueueFlags,
    VirtQueueError,
)

RAM0 = (0x0, 0x10000)
HOLE = 0x10000
RAM1 = (0x20000, 0x10000)
RAM1_END = RAM1[0] + RAM1[1]
BASE = 0x1000  # rings
TABLES = (0x4000, RAM1_END - 0x100)  # where the random indirect tables go
BUFFERS = 0x8000  # a few valid data addresses
TOP = 1 << 64
DESC = struct.Struct("<QIHH")
MAX_TABLE = 12

SETTINGS = settings(max_examples=200, deadline=None)

Queue = Any  # PyVirtQueue or CVirtQueue


def c_engine() -> type:
    from iovirt.virtio.cengine import CVirtQueue

    return CVirtQueue


ENGINES: dict[str, Callable[[], type]] = {"Py": lambda: PyVirtQueue, "C": c_engine}


def new_memory() -> GuestMemory:
    return GuestMemory([RAM0, RAM1])


# -- random rings ----------------------------------------------------------------------

# one_of picks its branches evenly: repeating a branch weights it. Most values are valid
# so that walks get deep; the rest sit on the edges of RAM or anywhere in 64 bits.
edges = st.sampled_from(
    [
        *(0, BUFFERS, HOLE - 16, HOLE - 1, HOLE, RAM1[0] - 16, RAM1[0], RAM1_END - 16),
        *(RAM1_END, TOP - 16, TOP - 1, *TABLES),
    ]
)
in_ram = st.integers(BUFFERS, BUFFERS + 0x1000)
addresses = st.one_of(
    in_ram, in_ram, edges, st.integers(0, RAM1_END + 0x100), st.integers(0, TOP - 1)
)
small = st.integers(0, 0x40)
lengths = st.one_of(
    small,
    small,
    st.sampled_from([0, 16, 32, 48, 0x100, HOLE, 0xFFFF_FFFF]),
    st.integers(0, 0xFFFF_FFFF),
)
NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
usual_flags = st.sampled_from([0, NEXT, NEXT, WRITE, NEXT | WRITE, NEXT | WRITE, INDIRECT])
ring_flags = st.one_of(
    usual_flags,
    usual_flags,
    usual_flags,
    st.sampled_from([INDIRECT | NEXT, INDIRECT | WRITE, INDIRECT | NEXT | WRITE]),
    st.integers(0, 0xFFFF),
)
# Packed lap bits: mostly "available on the first lap" (AVAIL set, USED clear).
lap_bits = st.sampled_from([VIRTQ_DESC_F_AVAIL] * 5 + [0, VIRTQ_DESC_F_USED, 0x8080])
Desc = tuple[int, int, int, int]  # (addr, len, flags, next-or-id), flags as in the split layout


@st.composite
def well_formed(draw: st.DrawFn, count: int, packed: bool) -> list[Desc]:
    """``count`` descriptors forming valid chains (readable, then writable; split: NEXT
    links i -> i + 1; packed: consecutive, available on the first lap)."""
    out: list[Desc] = []
    writing = False
    for i in range(count):
        writing = writing or draw(st.integers(0, 3)) == 0
        more = i + 1 < count and draw(st.integers(0, 4)) != 0
        flags = (NEXT if more else 0) | (WRITE if writing else 0)
        flags |= VIRTQ_DESC_F_AVAIL if packed else 0
        link = i + 1 if more and not packed else draw(st.integers(0, 7))
        out.append((draw(in_ram), draw(small), flags, link))
        writing = writing and more
    return out


@st.composite
def mutated(draw: st.DrawFn, descs: list[Desc], packed: bool, tables: bool) -> list[Desc]:
    """``descs`` with a few fields overwritten by hostile values, and (``tables``) some
    descriptors turned into pointers at the random indirect tables."""
    out = list(descs)
    if not out:
        return out
    if tables:
        for _ in range(draw(st.integers(0, 2))):
            i = draw(st.integers(0, len(out) - 1))
            entries = draw(st.integers(0, MAX_TABLE + 1))
            lap = VIRTQ_DESC_F_AVAIL if packed else 0
            out[i] = (draw(st.sampled_from(TABLES)), 16 * entries, INDIRECT | lap, out[i][3])
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, len(out) - 1))
        field = draw(st.integers(0, 3))
        if field == 0:
            value = draw(addresses)
        elif field == 1:
            value = draw(lengths)
        elif field == 2:
            value = draw(ring_flags)
            if packed:
                value = value & ~(VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED) | draw(lap_bits)
        else:
            value = draw(st.one_of(st.integers(0, len(out)), st.integers(0, 0xFFFF)))
        desc = list(out[i])
        desc[field] = value
        out[i] = (desc[0], desc[1], desc[2], desc[3])
    return out


@dataclass
class Scenario:
    packed: bool
    size: int
    flags: int
    ring: list[tuple[int, int, int, int]]
    tables: list[list[tuple[int, int, int, int]]]
    avail: list[int]  # split: avail ring entries
    avail_idx: int
    pops: int

    def write(self, mem: GuestMemory) -> tuple[int, int, int]:
        """Lay the scenario out in ``mem``; returns the three ring areas."""
        desc = BASE
        for i, d in enumerate(self.ring):
            mem.write(desc + 16 * i, self.pack(d))
        for gpa, table in zip(TABLES, self.tables, strict=True):
            mem.write(gpa, b"".join(self.pack(d) for d in table))
        if self.packed:
            return desc, desc + 16 * self.size, desc + 16 * self.size + 4
        avail = desc + 16 * self.size
        mem.write_u16(avail + 2, self.avail_idx)
        for i, head in enumerate(self.avail):
            mem.write_u16(avail + 4 + 2 * i, head)
        used = (avail + 6 + 2 * self.size + 3) // 4 * 4
        return desc, avail, used

    def pack(self, d: tuple[int, int, int, int]) -> bytes:
        addr, length, flags, link = d
        return DESC.pack(addr, length, link, flags) if self.packed else DESC.pack(*d)


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    packed = draw(st.booleans())
    size = draw(st.integers(1, 8) if packed else st.sampled_from([1, 2, 4, 8]))
    flags = draw(st.sampled_from([0, QueueFlags.INDIRECT, QueueFlags.INDIRECT]))
    flags |= QueueFlags.PACKED if packed else 0
    ring = draw(mutated(draw(well_formed(size, packed)), packed, tables=True))
    tables = [
        draw(mutated(draw(well_formed(draw(st.integers(0, MAX_TABLE)), packed)), packed, False))
        for _ in TABLES
    ]
    in_range = st.integers(0, size - 1)
    avail = draw(
        st.lists(st.one_of(*[in_range] * 15, st.integers(0, 0xFFFF)), min_size=size, max_size=size)
    )
    avail_idx = draw(st.one_of(*[st.integers(1, size)] * 8, st.integers(0, 0xFFFF)))
    return Scenario(packed, size, int(flags), ring, tables, avail, avail_idx, size + 2)


def run_pops(engine: type, sc: Scenario) -> list[object]:
    """What popping the scenario gives: chains as tuples, errors as their errno."""
    with new_memory() as mem:
        areas = sc.write(mem)
        q = engine(mem, sc.size, sc.flags, *areas)
        results: list[object] = []
        for _ in range(sc.pops):
            try:
                chain = q.pop_descriptor_chain()
            except VirtQueueError as e:
                results.append(e.errno)
                assert q.broken
                continue
            if chain is None:
                results.append(None)
                continue
            for gpa, n in chain.readable + chain.writable:
                assert n > 0 and mem.contains(gpa, n), (hex(gpa), n)
            results.append((chain.head, chain.ndescs, chain.readable, chain.writable))
        return results


@SETTINGS
@given(sc=scenarios())
def test_pop_is_safe_and_both_engines_agree(sc: Scenario) -> None:
    py = run_pops(PyVirtQueue, sc)
    c = run_pops(c_engine(), sc)
    assert py == c


# -- completions write only the device's areas -----------------------------------------

chain_shapes = st.tuples(
    st.lists(st.integers(0, 64), max_size=4),  # readable lengths
    st.lists(st.integers(0, 64), max_size=4),  # writable lengths
    st.booleans(),  # indirect
).map(lambda s: s if s[0] or s[1] else ([1], [], s[2]))  # at least one descriptor


def device_areas(drv: SplitDriver | PackedDriver) -> list[tuple[int, int]]:
    if isinstance(drv, PackedDriver):
        return [(drv.desc_gpa, 16 * drv.size), (drv.device_gpa, 4)]
    return [(drv.device_gpa, 6 + 8 * drv.size)]


def snapshot(mem: GuestMemory, skip: list[tuple[int, int]]) -> bytes:
    """All of RAM, with the ``skip`` ranges left out."""
    image = bytearray()
    for region in mem.regions:
        data = bytearray(mem.read(region.gpa, region.size))
        for gpa, n in skip:
            lo, hi = max(gpa, region.gpa), min(gpa + n, region.end)
            if lo < hi:
                data[lo - region.gpa : hi - region.gpa] = bytes(hi - lo)
        image += data
    return bytes(image)


@pytest.mark.parametrize("name", list(ENGINES))
@SETTINGS
@given(
    packed=st.booleans(),
    event_idx=st.booleans(),
    shapes=st.lists(chain_shapes, min_size=1, max_size=8),
    data=st.data(),
)
def test_completions_write_only_device_areas(
    name: str, packed: bool, event_idx: bool, shapes: list[Any], data: st.DataObject
) -> None:
    engine = ENGINES[name]()
    with new_memory() as mem:
        drv = make_driver(mem, 8 if not packed else 7, BASE, packed=packed, event_idx=event_idx)
        q = engine(mem, drv.size, drv.flags, drv.desc_gpa, drv.driver_gpa, drv.device_gpa)
        heads = []
        for readable, writable, indirect in shapes:
            try:
                heads.append(
                    drv.add_chain([b"r" * n for n in readable], writable, indirect=indirect)
                )
            except RuntimeError:
                break  # ring full
        chains = []
        while (chain := q.pop_descriptor_chain()) is not None:
            chains.append(chain)
        assert [c.head for c in chains] == heads
        order = data.draw(st.permutations(chains))
        lens = [data.draw(st.integers(0, c.writable_bytes)) for c in order]
        before = snapshot(mem, device_areas(drv))
        for chain, n in zip(order, lens, strict=True):
            q.add_used(chain.head, chain.ndescs, n)
        q.flush_used()
        q.needs_notification()
        q.enable_notification()
        q.disable_notification()
        assert snapshot(mem, device_areas(drv)) == before
        assert drv.used() == [(c.head, n) for c, n in zip(order, lens, strict=True)]


# -- random operation sequences: both engines in lockstep -------------------------------

operations = st.one_of(
    st.tuples(st.just("add"), chain_shapes),
    st.tuples(st.just("pop")),
    st.tuples(st.just("use"), st.integers(0, 7), st.integers(0, 100)),
    st.tuples(st.just("flush")),
    st.tuples(st.just("notify")),
    st.tuples(st.just("enable")),
    st.tuples(st.just("disable")),
    st.tuples(st.just("collect")),
    st.tuples(st.just("used_event"), st.integers(-2, 9)),
    st.tuples(st.just("no_interrupt"), st.booleans()),
    st.tuples(st.just("kick")),
)


class Side:
    """One engine with its own memory and driver, replaying the same operations."""

    def __init__(self, engine: type, packed: bool, size: int, event_idx: bool) -> None:
        self.mem = new_memory()
        self.drv = make_driver(self.mem, size, BASE, packed=packed, event_idx=event_idx)
        d = self.drv
        self.q = engine(self.mem, size, d.flags, d.desc_gpa, d.driver_gpa, d.device_gpa)
        self.popped: list[Any] = []

    def apply(self, op: tuple[Any, ...]) -> object:
        name, *args = op
        d, q = self.drv, self.q
        if name == "add":
            (readable, writable, indirect) = args[0]
            try:
                return d.add_chain([b"x" * n for n in readable], writable, indirect=indirect)
            except RuntimeError:
                return "full"
        if name == "pop":
            chain = q.pop_descriptor_chain()
            if chain is not None:
                self.popped.append(chain)
                return (chain.head, chain.ndescs, chain.readable, chain.writable)
            return None
        if name == "use":
            if not self.popped:
                return None
            chain = self.popped.pop(args[0] % len(self.popped))
            q.add_used(chain.head, chain.ndescs, min(args[1], chain.writable_bytes))
            return chain.head
        if name == "used_event":
            d.set_used_event(max(d.last_used + args[0], 0))
            return None
        if name == "no_interrupt":
            d.set_no_interrupt(args[0])
            return None
        simple: dict[str, Callable[[], object]] = {
            "flush": q.flush_used,
            "notify": q.needs_notification,
            "enable": q.enable_notification,
            "disable": q.disable_notification,
            "collect": d.used,
            "kick": d.device_wants_kicks,
        }
        return simple[name]()

    def image(self) -> bytes:
        return snapshot(self.mem, [])


@SETTINGS
@given(
    packed=st.booleans(),
    size=st.sampled_from([1, 2, 4, 8]),
    odd=st.booleans(),
    event_idx=st.booleans(),
    ops=st.lists(operations, max_size=60),
)
def test_engines_in_lockstep(
    packed: bool, size: int, odd: bool, event_idx: bool, ops: list[tuple[Any, ...]]
) -> None:
    if packed and odd:
        size = size + 1  # packed rings need not be powers of two
    py = Side(PyVirtQueue, packed, size, event_idx)
    c = Side(c_engine(), packed, size, event_idx)
    try:
        for step, op in enumerate(ops):
            assert py.apply(op) == c.apply(op), (step, op)
            assert py.image() == c.image(), (step, op)
    finally:
        py.mem.close()
        c.mem.close()
