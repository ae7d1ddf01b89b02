"""Tests of the virtqueue engines: the C engine and the pure-Python reference, same tests.

Every test runs against both implementations (``PyVirtQueue``, ``CVirtQueue``) and, where
the layouts differ, against split and packed rings. A synthetic driver
(:mod:`iovirt.testing.virtio_driver`) plays the guest in a RAM of two regions with a hole
between them, so "outside RAM" can mean below, between or above the regions.

Malformed rings are checked for the exact errno of ``csrc/virtqueue.h`` and for the queue
staying broken afterwards; every chain an engine hands out is checked to lie inside RAM.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from typing import Any

import pytest

from iovirt.memory import GuestMemory
from iovirt.testing.virtio_driver import (
    DESC_SIZE,
    PackedDriver,
    SplitDriver,
    make_driver,
    split_ring_sizes,
)
from iovirt.virtio.pyqueue import PyVirtQueue
from iovirt.virtio.queue import (
    CHAIN_MAX_SEGS,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    DescriptorChain,
    QueueFlags,
    VirtQueueError,
)

# RAM: two regions with a hole between them.
RAM0 = (0x0, 0x40000)
HOLE = 0x40000
RAM1 = (0x80000, 0x40000)
RAM1_END = RAM1[0] + RAM1[1]
BASE = 0x1000  # where the driver lays the rings out
TOP = 1 << 64

NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT

Queue = Any  # PyVirtQueue or CVirtQueue: both implement iovirt.virtio.queue.VirtQueue
Driver = SplitDriver | PackedDriver


@pytest.fixture(params=["Py", "C"])
def engine(request: pytest.FixtureRequest) -> type:
    if request.param == "Py":
        return PyVirtQueue
    from iovirt.virtio.cengine import CVirtQueue

    return CVirtQueue


@pytest.fixture(params=[False, True], ids=["split", "packed"])
def packed(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory([RAM0, RAM1]) as mem:
        yield mem


def make_queue(engine: type, drv: Driver, flags: int | None = None) -> Queue:
    return engine(
        drv.memory,
        drv.size,
        drv.flags if flags is None else flags,
        drv.desc_gpa,
        drv.driver_gpa,
        drv.device_gpa,
    )


def setup(
    engine: type, memory: GuestMemory, packed: bool, size: int = 8, event_idx: bool = False
) -> tuple[Driver, Queue]:
    drv = make_driver(memory, size, BASE, packed=packed, event_idx=event_idx)
    return drv, make_queue(engine, drv)


def setup_split(
    engine: type, memory: GuestMemory, size: int = 8, event_idx: bool = False
) -> tuple[SplitDriver, Queue]:
    drv = SplitDriver(memory, size, BASE, event_idx=event_idx)
    return drv, make_queue(engine, drv)


def setup_packed(
    engine: type, memory: GuestMemory, size: int = 8, event_idx: bool = False
) -> tuple[PackedDriver, Queue]:
    drv = PackedDriver(memory, size, BASE, event_idx=event_idx)
    return drv, make_queue(engine, drv)


def pop(q: Queue, memory: GuestMemory) -> DescriptorChain:
    """Pop a chain that must be there, and check it lies inside RAM."""
    chain: DescriptorChain | None = q.pop_descriptor_chain()
    assert chain is not None
    for gpa, n in chain.readable + chain.writable:
        assert n > 0
        assert memory.contains(gpa, n), f"segment [{gpa:#x}, +{n:#x}) outside RAM"
    return chain


def expect_broken(q: Queue, code: int) -> None:
    """The next pop fails with ``code``; the queue is then broken for good."""
    with pytest.raises(VirtQueueError) as info:
        q.pop_descriptor_chain()
    assert info.value.errno == code, errno.errorcode.get(info.value.errno)
    assert q.broken
    for _ in range(2):
        with pytest.raises(VirtQueueError) as info:
            q.pop_descriptor_chain()
        assert info.value.errno == errno.EIO


def complete(q: Queue, chain: DescriptorChain, length: int = 0) -> None:
    q.add_used(chain.head, chain.ndescs, length)
    q.flush_used()


# -- well-formed chains ----------------------------------------------------------------


def test_single_chain_readable_and_writable(
    engine: type, memory: GuestMemory, packed: bool
) -> None:
    drv, q = setup(engine, memory, packed)
    assert q.pop_descriptor_chain() is None
    head = drv.add_chain([b"hello ", b"world"], [64, 32])
    chain = pop(q, memory)
    assert chain.head == head
    assert chain.ndescs == 4
    assert chain.read(memory) == b"hello world"
    assert [n for _, n in chain.readable] == [6, 5]
    assert chain.writable == drv.writable_buffers(head)
    assert chain.writable_bytes == 96
    assert chain.write(memory, b"x" * 70) == 70
    complete(q, chain, 70)
    assert drv.used() == [(head, 70)]
    gpa0, _ = drv.writable_buffers(head)[0]
    gpa1, _ = drv.writable_buffers(head)[1]
    assert memory.read(gpa0, 64) + memory.read(gpa1, 6) == b"x" * 70
    assert q.pop_descriptor_chain() is None
    assert not q.broken


def test_readable_only_and_writable_only_chains(
    engine: type, memory: GuestMemory, packed: bool
) -> None:
    drv, q = setup(engine, memory, packed)
    out_only = drv.add_chain([b"abc"], [])
    in_only = drv.add_chain([], [10])
    first, second = pop(q, memory), pop(q, memory)
    assert (first.head, first.readable_bytes, first.writable) == (out_only, 3, [])
    assert (second.head, second.readable, second.writable_bytes) == (in_only, [], 10)


def test_chain_as_long_as_the_queue(engine: type, memory: GuestMemory, packed: bool) -> None:
    drv, q = setup(engine, memory, packed, size=16)
    data = [bytes([i]) * (i + 1) for i in range(10)]
    head = drv.add_chain(data, [7] * 6)
    chain = pop(q, memory)
    assert (chain.head, chain.ndescs) == (head, 16)
    assert chain.read(memory) == b"".join(data)
    assert chain.writable == drv.writable_buffers(head)


def test_chains_returned_out_of_order(engine: type, memory: GuestMemory, packed: bool) -> None:
    drv, q = setup(engine, memory, packed, size=16)
    heads = [drv.add_chain([bytes([i])], [4]) for i in range(5)]
    chains = [pop(q, memory) for _ in heads]
    assert [c.head for c in chains] == heads
    for c in reversed(chains):
        q.add_used(c.head, c.ndescs, 1)
    q.flush_used()
    assert drv.used() == [(h, 1) for h in reversed(heads)]
    # The freed descriptors are reused by the next chains.
    again = [drv.add_chain([b"z"], [2]) for _ in range(6)]
    assert [pop(q, memory).head for _ in again] == again


def test_indirect_chain(engine: type, memory: GuestMemory, packed: bool) -> None:
    drv, q = setup(engine, memory, packed, size=4)
    head = drv.add_chain([b"ab", b"cd", b"ef"], [16, 8], indirect=True)
    chain = pop(q, memory)
    assert (chain.head, chain.ndescs) == (head, 1)
    assert chain.read(memory) == b"abcdef"
    assert chain.writable == drv.writable_buffers(head)
    complete(q, chain, 24)
    assert drv.used() == [(head, 24)]


def test_indirect_table_larger_than_the_queue(
    engine: type, memory: GuestMemory, packed: bool
) -> None:
    drv, q = setup(engine, memory, packed, size=2)
    # The bound counts the indirect descriptor itself: 1 + 1023 entries is the most.
    head = drv.add_chain([b"r"] * (CHAIN_MAX_SEGS - 1 - 10), [1] * 10, indirect=True)
    chain = pop(q, memory)
    assert chain.head == head
    assert (len(chain.readable), len(chain.writable)) == (CHAIN_MAX_SEGS - 11, 10)


def test_indirect_table_over_the_segment_bound(
    engine: type, memory: GuestMemory, packed: bool
) -> None:
    drv, q = setup(engine, memory, packed, size=2)
    drv.add_chain([b"r"] * CHAIN_MAX_SEGS, [], indirect=True)
    expect_broken(q, errno.ELOOP)


def test_split_direct_descriptors_before_an_indirect_table(
    engine: type, memory: GuestMemory
) -> None:
    drv, q = setup_split(engine, memory)
    buf = drv.alloc(64)
    table, table_len = drv.indirect_table([(buf + 16, 8, NEXT, 1), (buf + 32, 8, WRITE, 0)])
    drv.add_descriptors([(buf, 8, NEXT, 1), (table, table_len, INDIRECT, 0)])
    chain = pop(q, memory)
    assert chain.ndescs == 2
    assert chain.readable == [(buf, 8), (buf + 16, 8)]
    assert chain.writable == [(buf + 32, 8)]


def test_zero_length_descriptors_are_skipped(
    engine: type, memory: GuestMemory, packed: bool
) -> None:
    drv, q = setup(engine, memory, packed)
    buf = drv.alloc(32)
    # Zero-length descriptors carry nothing, wherever they point (even into the hole).
    drv.add_descriptors(
        [
            (buf, 8, NEXT, 1),
            (HOLE, 0, NEXT, 2),
            (buf + 8, 0, WRITE | NEXT, 3),
            (buf + 16, 4, WRITE, 3),
        ]
    )
    chain = pop(q, memory)
    assert chain.ndescs == 4
    assert chain.readable == [(buf, 8)]
    assert chain.writable == [(buf + 16, 4)]


def test_zero_length_descriptors_count_against_the_bound(
    engine: type, memory: GuestMemory, packed: bool
) -> None:
    drv, q = setup(engine, memory, packed, size=2)
    links = [(i + 1) if not packed else 0 for i in range(CHAIN_MAX_SEGS)]
    table, table_len = drv.indirect_table([(BASE, 0, NEXT, n) for n in links])
    drv.add_descriptors([(table, table_len, INDIRECT, 0)])
    expect_broken(q, errno.ELOOP)


def test_packed_buffer_id_comes_from_the_last_descriptor(engine: type, memory: GuestMemory) -> None:
    drv, q = setup_packed(engine, memory)
    buf = drv.alloc(16)
    drv.add_descriptors([(buf, 4, NEXT, 5), (buf + 4, 4, NEXT, 6), (buf + 8, 4, WRITE, 3)])
    chain = pop(q, memory)
    assert (chain.head, chain.ndescs) == (3, 3)
    q.add_used(chain.head, chain.ndescs, 4)
    assert drv.used() == [(3, 4)]


# -- batching and publication ----------------------------------------------------------


def test_split_used_entries_batch_until_flush(engine: type, memory: GuestMemory) -> None:
    drv, q = setup_split(engine, memory)
    heads = [drv.add_chain([b"x"], [8]) for _ in range(3)]
    chains = [pop(q, memory) for _ in heads]
    for c in chains:
        q.add_used(c.head, c.ndescs, 8)
    assert memory.read_u16(drv.device_gpa + 2) == 0  # used->idx not published yet
    assert drv.used() == []
    q.flush_used()
    assert memory.read_u16(drv.device_gpa + 2) == 3
    assert drv.used() == [(h, 8) for h in heads]
    q.flush_used()  # nothing new: nothing changes
    assert drv.used() == []


def test_packed_used_descriptor_published_at_once(engine: type, memory: GuestMemory) -> None:
    drv, q = setup_packed(engine, memory)
    heads = [drv.add_chain([b"x"], [8, 8]) for _ in range(2)]
    chains = [pop(q, memory) for _ in heads]
    q.add_used(chains[1].head, chains[1].ndescs, 5)
    assert drv.used() == [(heads[1], 5)]
    q.add_used(chains[0].head, chains[0].ndescs, 0)
    assert drv.used() == [(heads[0], 0)]
    q.flush_used()
    assert drv.used() == []


# -- 16-bit wrap-around ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("packed", "size"), [(False, 8), (True, 8), (True, 7)], ids=["split8", "packed8", "packed7"]
)
def test_indices_wrap_around(engine: type, memory: GuestMemory, packed: bool, size: int) -> None:
    if not packed and size & (size - 1):
        pytest.skip("split rings have power-of-two sizes")  # one parameter combination
    drv = make_driver(memory, size, BASE, packed=packed, event_idx=True)
    q = make_queue(engine, drv)
    buf = drv.alloc(64)
    rounds, done = 0, 0
    while done <= 0x10000 + 3 * size:
        # A batch of one-descriptor chains, each tagged by its length.
        batch = [drv.add_descriptors([(buf, 1 + i, 0, i)]) for i in range(size)]
        drv.set_used_event(drv.last_used + size - 1)
        chains = [q.pop_descriptor_chain() for _ in batch]
        assert q.pop_descriptor_chain() is None
        for i, c in enumerate(chains):
            assert c is not None
            if i == size - 1:  # all but the last used: the driver's event not reached yet
                q.flush_used()
                early = q.needs_notification()
                assert early == (rounds == 0), f"round {rounds}"  # the first always goes
            q.add_used(c.head, c.ndescs, c.readable[0][1])
        q.flush_used()
        assert q.needs_notification(), f"no interrupt in round {rounds}"
        assert drv.used() == [(h, 1 + i) for i, h in enumerate(batch)]
        done += size
        rounds += 1
    if isinstance(drv, SplitDriver):
        assert drv.avail_idx == done & 0xFFFF
        assert memory.read_u16(drv.device_gpa + 2) == done & 0xFFFF
    else:
        assert (drv.next_avail, drv.avail_wrap) == (0, 1 ^ rounds % 2)


# -- notification suppression ------------------------------------------------------------


def test_first_notification_always_sent(engine: type, memory: GuestMemory, packed: bool) -> None:
    drv, q = setup(engine, memory, packed, event_idx=True)
    drv.set_used_event(5)  # far ahead: would suppress, but the first one always goes
    complete(q, pop_after_add(drv, q, memory))
    assert q.needs_notification()
    complete(q, pop_after_add(drv, q, memory))
    assert not q.needs_notification()


def pop_after_add(drv: Driver, q: Queue, memory: GuestMemory) -> DescriptorChain:
    drv.add_chain([b"p"], [])  # one descriptor: packed slots count like split indices
    return pop(q, memory)


def test_event_idx_suppresses_interrupts(engine: type, memory: GuestMemory, packed: bool) -> None:
    drv, q = setup(engine, memory, packed, event_idx=True)
    complete(q, pop_after_add(drv, q, memory))
    assert q.needs_notification()  # the first one
    assert len(drv.used()) == 1
    drv.set_used_event(drv.last_used + 2)  # interrupt when the third from now is used
    results = []
    for _ in range(4):
        complete(q, pop_after_add(drv, q, memory))
        results.append(q.needs_notification())
        drv.used()
    assert results == [False, False, True, False]
    # An event that several completions pass at once fires once.
    drv.set_used_event(drv.last_used + 1)
    for c in [pop_after_add(drv, q, memory) for _ in range(3)]:
        q.add_used(c.head, c.ndescs, 0)
    q.flush_used()
    assert q.needs_notification()
    assert not q.needs_notification()  # nothing new since


def test_split_event_idx_ignores_no_interrupt(engine: type, memory: GuestMemory) -> None:
    drv, q = setup_split(engine, memory, event_idx=True)
    drv.set_no_interrupt(True)
    complete(q, pop_after_add(drv, q, memory))
    assert q.needs_notification()


def test_split_no_interrupt_flag(engine: type, memory: GuestMemory) -> None:
    drv, q = setup_split(engine, memory)
    drv.set_no_interrupt(True)
    complete(q, pop_after_add(drv, q, memory))
    assert not q.needs_notification()
    drv.set_no_interrupt(False)
    complete(q, pop_after_add(drv, q, memory))
    assert q.needs_notification()


def test_split_no_notify_flag(engine: type, memory: GuestMemory) -> None:
    drv, q = setup_split(engine, memory)
    assert drv.device_wants_kicks()
    q.disable_notification()
    assert drv.used_flags() & VIRTQ_USED_F_NO_NOTIFY
    drv.add_chain([b"a"], [])
    assert not drv.device_wants_kicks()
    assert q.enable_notification()  # a buffer arrived meanwhile: keep popping
    assert not drv.used_flags() & VIRTQ_USED_F_NO_NOTIFY
    pop(q, memory)
    assert not q.enable_notification()
    drv.add_chain([b"b"], [])
    assert drv.device_wants_kicks()


def test_split_avail_event_written_by_enable_notification(
    engine: type, memory: GuestMemory
) -> None:
    drv, q = setup_split(engine, memory, event_idx=True)
    assert not q.enable_notification()
    assert drv.avail_event() == 0
    drv.add_chain([b"a"], [])
    assert drv.device_wants_kicks()  # avail idx 0 -> 1 passes avail_event 0
    drv.add_chain([b"b"], [])
    assert not drv.device_wants_kicks()  # 1 -> 2 does not
    q.disable_notification()  # nothing to write with event idx
    assert drv.used_flags() == 0
    pop(q, memory)
    assert q.enable_notification()  # one more is waiting
    assert drv.avail_event() == 1
    pop(q, memory)
    assert not q.enable_notification()
    assert drv.avail_event() == 2
    drv.add_chain([b"c"], [])
    assert drv.device_wants_kicks()


def test_packed_driver_event_enable_disable(engine: type, memory: GuestMemory) -> None:
    drv, q = setup_packed(engine, memory)
    complete(q, pop_after_add(drv, q, memory))
    assert q.needs_notification()  # RING_EVENT_FLAGS_ENABLE (zeroed area)
    drv.set_no_interrupt(True)
    complete(q, pop_after_add(drv, q, memory))
    assert not q.needs_notification()
    drv.set_no_interrupt(False)
    complete(q, pop_after_add(drv, q, memory))
    assert q.needs_notification()


def test_packed_event_desc_needs_event_idx(engine: type, memory: GuestMemory) -> None:
    drv, q = setup_packed(engine, memory, event_idx=False)
    complete(q, pop_after_add(drv, q, memory))
    assert q.needs_notification()
    drv.set_used_event(drv.last_used + 5)  # RING_EVENT_FLAGS_DESC, not negotiated
    complete(q, pop_after_add(drv, q, memory))
    assert q.needs_notification()


def test_packed_event_desc_across_the_wrap(engine: type, memory: GuestMemory) -> None:
    drv, q = setup_packed(engine, memory, size=5, event_idx=True)
    complete(q, pop_after_add(drv, q, memory))
    assert q.needs_notification()
    drv.used()
    fired: list[bool] = []
    for _ in range(15):
        # Every time: interrupt when the slot two ahead (often on the next lap) is used.
        if len(fired) % 3 == 0:
            drv.set_used_event(drv.last_used + 2)
        complete(q, pop_after_add(drv, q, memory))
        fired.append(q.needs_notification())
        drv.used()
    assert fired == [False, False, True] * 5


def test_packed_device_event_area(engine: type, memory: GuestMemory) -> None:
    drv, q = setup_packed(engine, memory)
    q.disable_notification()
    assert drv.device_event_flags() == RING_EVENT_FLAGS_DISABLE
    drv.add_chain([b"a"], [])
    assert not drv.device_wants_kicks()
    assert q.enable_notification()
    assert drv.device_event_flags() == RING_EVENT_FLAGS_ENABLE
    pop(q, memory)
    assert not q.enable_notification()
    drv.add_chain([b"b"], [])
    assert drv.device_wants_kicks()


def test_packed_device_event_desc(engine: type, memory: GuestMemory) -> None:
    drv, q = setup_packed(engine, memory, size=3, event_idx=True)
    for lap in range(3):
        for i in range(3):
            assert not q.enable_notification()
            assert drv.device_event_flags() == RING_EVENT_FLAGS_DESC
            # off_wrap names the next slot the device will look at, on its lap.
            assert drv.avail_event() == i | (1 ^ lap % 2) << 15
            drv.add_chain([b"a"], [])
            assert drv.device_wants_kicks()
            complete(q, pop(q, memory))
            drv.used()
    drv.add_chain([b"a"], [])
    drv.device_wants_kicks()
    drv.add_chain([b"b"], [])
    assert not drv.device_wants_kicks()  # the device has not asked again


# -- malformed chains ------------------------------------------------------------------


BAD_SEGMENTS = {
    "in_hole": (HOLE, 16),
    "above_ram": (RAM1_END, 16),
    "past_region0_end": (RAM0[1] - 8, 16),
    "past_ram_end": (RAM1_END - 8, 16),
    "wraps_2_64": (TOP - 8, 16),
    "huge_len": (0x2000, 0xFFFF_FFFF),
}


@pytest.mark.parametrize("where", list(BAD_SEGMENTS))
@pytest.mark.parametrize("writable", [False, True], ids=["readable", "writable"])
def test_segment_outside_ram(
    engine: type, memory: GuestMemory, packed: bool, where: str, writable: bool
) -> None:
    drv, q = setup(engine, memory, packed)
    good = drv.alloc(16)
    addr, length = BAD_SEGMENTS[where]
    flag = WRITE if writable else 0
    drv.add_descriptors([(good, 16, NEXT, 1), (addr, length, flag, 1)])
    expect_broken(q, errno.EFAULT)


@pytest.mark.parametrize("where", list(BAD_SEGMENTS))
def test_segment_outside_ram_in_indirect_table(
    engine: type, memory: GuestMemory, packed: bool, where: str
) -> None:
    drv, q = setup(engine, memory, packed)
    good = drv.alloc(16)
    addr, length = BAD_SEGMENTS[where]
    table, table_len = drv.indirect_table([(good, 16, NEXT, 1), (addr, length, WRITE, 0)])
    drv.add_descriptors([(table, table_len, INDIRECT, 0)])
    expect_broken(q, errno.EFAULT)


def test_segment_at_the_edges_of_ram_is_fine(
    engine: type, memory: GuestMemory, packed: bool
) -> None:
    drv, q = setup(engine, memory, packed)
    drv.add_descriptors(
        [
            (RAM0[1] - 16, 16, NEXT, 1),
            (RAM1[0], 16, WRITE | NEXT, 2),
            (RAM1_END - 32, 32, WRITE, 0),
        ]
    )
    chain = pop(q, memory)
    assert chain.readable == [(RAM0[1] - 16, 16)]
    assert chain.writable == [(RAM1[0], 16), (RAM1_END - 32, 32)]


def test_split_loop_in_next_links(engine: type, memory: GuestMemory) -> None:
    drv, q = setup_split(engine, memory)
    buf = drv.alloc(16)
    drv.add_descriptors([(buf, 4, NEXT, 1), (buf, 4, NEXT, 0)])  # 0 -> 1 -> 0
    expect_broken(q, errno.ELOOP)


def test_split_loop_through_every_slot(engine: type, memory: GuestMemory) -> None:
    drv, q = setup_split(engine, memory)
    buf = drv.alloc(16)
    drv.add_descriptors([(buf, 4, NEXT, (i + 1) % 8) for i in range(8)])
    expect_broken(q, errno.ELOOP)


def test_split_self_loop_of_zero_length_descriptor(engine: type, memory: GuestMemory) -> None:
    drv, q = setup_split(engine, memory)
    drv.add_descriptors([(0, 0, NEXT, 0)])
    expect_broken(q, errno.ELOOP)


def test_packed_chain_longer_than_the_queue(engine: type, memory: GuestMemory) -> None:
    drv, q = setup_packed(engine, memory)
    buf = drv.alloc(16)
    drv.add_descriptors([(buf, 4, NEXT, 0)] * 8)  # the walk comes back to the head
    expect_broken(q, errno.ELOOP)


def test_split_next_out_of_range(engine: type, memory: GuestMemory) -> None:
    drv, q = setup_split(engine, memory)
    buf = drv.alloc(16)
    drv.add_descriptors([(buf, 4, NEXT, 8)])
    expect_broken(q, errno.EINVAL)


def test_split_indirect_next_out_of_range(engine: type, memory: GuestMemory) -> None:
    drv, q = setup_split(engine, memory)
    buf = drv.alloc(16)
    table, table_len = drv.indirect_table([(buf, 4, NEXT, 1), (buf, 4, NEXT, 2)])
    drv.add_descriptors([(table, table_len, INDIRECT, 0)])
    expect_broken(q, errno.EINVAL)


def test_split_indirect_loop(engine: type, memory: GuestMemory) -> None:
    drv, q = setup_split(engine, memory)
    buf = drv.alloc(16)
    table, table_len = drv.indirect_table([(buf, 4, NEXT, 1), (buf, 4, NEXT, 0)])
    drv.add_descriptors([(table, table_len, INDIRECT, 0)])
    expect_broken(q, errno.ELOOP)


@pytest.mark.parametrize(
    "where", [(HOLE, 32), (RAM0[1] - 16, 32), (TOP - 16, 32)], ids=["hole", "straddles", "wraps"]
)
def test_indirect_table_outside_ram(
    engine: type, memory: GuestMemory, packed: bool, where: tuple[int, int]
) -> None:
    drv, q = setup(engine, memory, packed)
    drv.add_descriptors([(*where, INDIRECT, 0)])
    expect_broken(q, errno.EFAULT)


def test_nested_indirect(engine: type, memory: GuestMemory, packed: bool) -> None:
    drv, q = setup(engine, memory, packed)
    buf = drv.alloc(16)
    inner, inner_len = drv.indirect_table([(buf, 4, 0, 0)])
    table, table_len = drv.indirect_table([(buf, 4, NEXT, 1), (inner, inner_len, INDIRECT, 0)])
    drv.add_descriptors([(table, table_len, INDIRECT, 0)])
    expect_broken(q, errno.EINVAL)


def test_indirect_with_next(engine: type, memory: GuestMemory, packed: bool) -> None:
    drv, q = setup(engine, memory, packed)
    buf = drv.alloc(16)
    table, table_len = drv.indirect_table([(buf, 4, 0, 0)])
    drv.add_descriptors([(table, table_len, INDIRECT | NEXT, 1), (buf, 4, WRITE, 0)])
    expect_broken(q, errno.EINVAL)


def test_packed_indirect_after_direct_descriptors(engine: type, memory: GuestMemory) -> None:
    drv, q = setup_packed(engine, memory)
    buf = drv.alloc(16)
    table, table_len = drv.indirect_table([(buf, 4, 0, 0)])
    drv.add_descriptors([(buf, 4, NEXT, 0), (table, table_len, INDIRECT, 0)])
    expect_broken(q, errno.EINVAL)


def test_indirect_not_negotiated(engine: type, memory: GuestMemory, packed: bool) -> None:
    drv = make_driver(memory, 8, BASE, packed=packed)
    q = make_queue(engine, drv, drv.flags & ~QueueFlags.INDIRECT)
    drv.add_chain([b"a"], [4], indirect=True)
    expect_broken(q, errno.EINVAL)


@pytest.mark.parametrize("table_len", [0, 8, 24, 17])
def test_indirect_table_bad_length(
    engine: type, memory: GuestMemory, packed: bool, table_len: int
) -> None:
    drv, q = setup(engine, memory, packed)
    buf = drv.alloc(16)
    table, _ = drv.indirect_table([(buf, 4, 0, 0), (buf, 4, 0, 0)])
    drv.add_descriptors([(table, table_len, INDIRECT, 0)])
    expect_broken(q, errno.EINVAL)


def test_readable_after_writable(engine: type, memory: GuestMemory, packed: bool) -> None:
    drv, q = setup(engine, memory, packed)
    buf = drv.alloc(16)
    drv.add_descriptors([(buf, 4, WRITE | NEXT, 1), (buf + 4, 4, 0, 1)])
    expect_broken(q, errno.EINVAL)


def test_readable_after_writable_in_indirect_table(
    engine: type, memory: GuestMemory, packed: bool
) -> None:
    drv, q = setup(engine, memory, packed)
    buf = drv.alloc(16)
    table, table_len = drv.indirect_table([(buf, 4, WRITE | NEXT, 1), (buf, 4, 0, 0)])
    drv.add_descriptors([(table, table_len, INDIRECT, 0)])
    expect_broken(q, errno.EINVAL)


def test_split_head_out_of_range(engine: type, memory: GuestMemory) -> None:
    drv, q = setup_split(engine, memory)
    drv.add_chain([b"a"], [])
    memory.write_u16(drv.driver_gpa + 4, 8)  # avail->ring[0] = size
    expect_broken(q, errno.EINVAL)


def test_split_avail_idx_jump(engine: type, memory: GuestMemory) -> None:
    drv, q = setup_split(engine, memory)
    for _ in range(8):
        drv.add_chain([b"a"], [])
    memory.write_u16(drv.driver_gpa + 2, 8)  # exactly size ahead: fine
    for _ in range(8):
        pop(q, memory)
    memory.write_u16(drv.driver_gpa + 2, 8 + 9)  # size + 1 ahead
    expect_broken(q, errno.EINVAL)


def test_split_avail_idx_behind(engine: type, memory: GuestMemory) -> None:
    drv, q = setup_split(engine, memory)
    drv.add_chain([b"a"], [])
    pop(q, memory)
    memory.write_u16(drv.driver_gpa + 2, 0)  # moved back: 0xffff chains "ahead"
    expect_broken(q, errno.EINVAL)


def test_broken_stays_broken(engine: type, memory: GuestMemory, packed: bool) -> None:
    drv, q = setup(engine, memory, packed)
    drv.add_descriptors([(HOLE, 16, 0, 0)])
    expect_broken(q, errno.EFAULT)
    # Repairing the descriptor does not revive the queue: only a reset does.
    memory.write_u64(drv.desc_gpa, drv.alloc(16))
    drv.add_chain([b"fine"], [])
    for _ in range(3):
        with pytest.raises(VirtQueueError) as info:
            q.pop_descriptor_chain()
        assert info.value.errno == errno.EIO
    assert q.broken
    assert not q.enable_notification()
    # A fresh queue on the same (repaired) memory works.
    fresh = make_queue(engine, drv)
    assert not fresh.broken


def test_empty_ring_is_not_an_error(engine: type, memory: GuestMemory, packed: bool) -> None:
    _, q = setup(engine, memory, packed)
    for _ in range(3):
        assert q.pop_descriptor_chain() is None
    assert not q.broken


# -- ring layout at construction -------------------------------------------------------


def layout(packed: bool, size: int, base: int = BASE) -> tuple[int, int, int]:
    if packed:
        return base, base + DESC_SIZE * size, base + DESC_SIZE * size + 4
    desc_len, avail_len, _ = split_ring_sizes(size)
    used = (base + desc_len + avail_len + 3) // 4 * 4
    return base, base + desc_len, used


@pytest.mark.parametrize(
    ("packed", "size"),
    [(False, 1), (False, 256), (False, 32768), (True, 1), (True, 3), (True, 1000), (True, 32768)],
)
def test_good_sizes(engine: type, packed: bool, size: int) -> None:
    with GuestMemory([(0, 0x200000)]) as big:
        q = engine(big, size, QueueFlags.PACKED if packed else 0, *layout(packed, size))
        assert q.pop_descriptor_chain() is None


@pytest.mark.parametrize(
    ("packed", "size"),
    [
        *[(False, size) for size in (0, 3, 12, 32769, 65535)],
        *[(True, size) for size in (0, 32769, 65535)],
    ],
)
def test_bad_sizes(engine: type, memory: GuestMemory, packed: bool, size: int) -> None:
    with pytest.raises(VirtQueueError) as info:
        engine(memory, size, QueueFlags.PACKED if packed else 0, *layout(packed, 8))
    assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize("area", [0, 1, 2], ids=["desc", "driver", "device"])
def test_misaligned_ring_areas(engine: type, memory: GuestMemory, packed: bool, area: int) -> None:
    areas = list(layout(packed, 8, BASE))
    aligns = (16, 4, 4) if packed else (16, 2, 4)
    areas[area] += aligns[area] // 2 if aligns[area] > 2 else 1
    with pytest.raises(VirtQueueError) as info:
        engine(memory, 8, QueueFlags.PACKED if packed else 0, *areas)
    assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize("area", [0, 1, 2], ids=["desc", "driver", "device"])
@pytest.mark.parametrize("where", ["hole", "straddles_end", "above"])
def test_ring_areas_outside_ram(
    engine: type, memory: GuestMemory, packed: bool, area: int, where: str
) -> None:
    areas = list(layout(packed, 8, BASE))
    size, align = (
        ((128, 16), (4, 4), (4, 4))[area] if packed else ((128, 16), (22, 2), (70, 4))[area]
    )
    end = RAM0[1]
    # Aligned, and ending past the end of RAM 0 (or entirely in the hole / above RAM).
    straddle = (end - size + 1 + align - 1) // align * align
    areas[area] = {"hole": HOLE, "straddles_end": straddle, "above": RAM1_END}[where]
    with pytest.raises(VirtQueueError) as info:
        engine(memory, 8, QueueFlags.PACKED if packed else 0, *areas)
    assert info.value.errno == errno.EFAULT


def test_split_event_fields_are_part_of_the_areas(engine: type, memory: GuestMemory) -> None:
    # used_event ends the available ring, avail_event the used ring: an area that would fit
    # without its event field but not with it is outside RAM.
    desc, avail, used = layout(False, 8)
    end = RAM0[1]
    engine(memory, 8, 0, desc, end - 22, used)  # 4 + 2 * 8 + 2 bytes: ends at the end
    engine(memory, 8, 0, desc, avail, end - 72)  # 4 + 8 * 8 + 2 bytes, 2 to spare
    for areas in ((desc, end - 20, used), (desc, avail, end - 68)):
        with pytest.raises(VirtQueueError) as info:
            engine(memory, 8, 0, *areas)
        assert info.value.errno == errno.EFAULT


def test_unknown_queue_flags(engine: type, memory: GuestMemory) -> None:
    with pytest.raises(VirtQueueError) as info:
        engine(memory, 8, 0x10, *layout(False, 8))
    assert info.value.errno == errno.EINVAL
