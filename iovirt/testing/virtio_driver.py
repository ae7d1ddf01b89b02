"""A synthetic virtio driver: lays a split or packed virtqueue out in guest RAM and plays
the guest's side of it, for tests of the virtqueue engines and of virtio devices.

Like rust-vmm's ``MockSplitQueue``, it writes descriptors and ring entries straight into a
:class:`~iovirt.memory.GuestMemory`, so the device side under test reads exactly what a real
guest would have written. Both layouts share one API (:class:`SplitDriver`,
:class:`PackedDriver`, :func:`make_driver`):

- :meth:`add_chain` builds a well-formed chain from data (readable) and lengths (writable),
  with or without an indirect table, and makes it available;
- :meth:`add_descriptors` writes raw ``(addr, len, flags, next)`` tuples as they are, for
  malformed-chain tests (loops, addresses outside RAM, bad indices);
- :meth:`used` collects what the device returned and recycles descriptors and buffers;
- event suppression: :meth:`set_used_event`, :meth:`set_no_interrupt` (what the driver asks
  of the device) and :meth:`avail_event`, :meth:`device_wants_kicks` (what the device asked).

Indices are 16-bit and wrap, as in a real driver: tests push more than 65536 chains through
small queues. Data buffers come from an arena after the rings, up to the end of the RAM
region holding ``base``; a chain's buffers go back to the arena when the device returns it
(read them before the next :meth:`add_chain`).
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass, field

from iovirt.memory import PAGE_SIZE, GuestMemory
from iovirt.virtio.queue import (
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_USED,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    QueueFlags,
)

# One descriptor, 16 bytes. Split: addr, len, flags, next. Packed: addr, len, id, flags.
DESC = struct.Struct("<QIHH")
DESC_SIZE = DESC.size

# Split ring layout (virtio 1.2, 2.7): avail = flags, idx, ring[size], used_event;
# used = flags, idx, ring[size] of (id u32, len u32), avail_event.
AVAIL_FLAGS = 0
AVAIL_IDX = 2
AVAIL_RING = 4
USED_FLAGS = 0
USED_IDX = 2
USED_RING = 4
USED_ELEM = struct.Struct("<II")  # id, len
USED_ELEM_SIZE = USED_ELEM.size
# Packed event suppression structure (virtio 1.2, 2.8.10): off_wrap u16, flags u16.
EVENT_OFF_WRAP = 0
EVENT_FLAGS = 2
EVENT_WRAP_SHIFT = 15
EVENT_OFF_MASK = (1 << EVENT_WRAP_SHIFT) - 1
# Packed descriptor field offsets.
PACKED_FLAGS = 14


def vring_need_event(event: int, new: int, old: int) -> bool:
    """Whether moving an index from ``old`` to ``new`` passed ``event`` (16-bit, virtio 2.7.10)."""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


def split_ring_sizes(size: int) -> tuple[int, int, int]:
    """Bytes of the descriptor table, available ring and used ring (event fields included)."""
    return DESC_SIZE * size, 6 + 2 * size, 6 + USED_ELEM_SIZE * size


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


class _Arena:
    """First-fit allocator over guest addresses ``[start, end)``; keeps free ranges sorted."""

    def __init__(self, start: int, end: int) -> None:
        self._free: list[tuple[int, int]] = [(start, end)] if start < end else []

    def alloc(self, length: int, align: int) -> int:
        length = max(length, 1)  # distinct addresses even for empty buffers
        for i, (start, end) in enumerate(self._free):
            gpa = _align_up(start, align)
            if gpa + length <= end:
                rest = [(s, e) for s, e in ((start, gpa), (gpa + length, end)) if s < e]
                self._free[i : i + 1] = rest
                return gpa
        raise MemoryError(f"driver arena has no {length} free bytes")

    def free(self, gpa: int, length: int) -> None:
        start, end = gpa, gpa + max(length, 1)
        i = bisect.bisect(self._free, (start, end))
        if i < len(self._free) and self._free[i][0] == end:  # merge with the next range
            end = self._free.pop(i)[1]
        if i > 0 and self._free[i - 1][1] == start:  # and with the previous one
            start = self._free.pop(i - 1)[0]
            i -= 1
        self._free.insert(i, (start, end))


@dataclass
class _Chain:
    """What the driver remembers of a chain it made available."""

    slots: list[int]  # descriptor slots it occupies (packed: ring slots, in order)
    writable: list[tuple[int, int]]
    owned: list[tuple[int, int]] = field(default_factory=list)  # arena buffers to free


class _Driver:
    """What both layouts share: the data arena and chain building."""

    packed = False

    def __init__(
        self, memory: GuestMemory, size: int, base: int, ring_end: int, event_idx: bool
    ) -> None:
        self.memory = memory
        self.size = size
        self.event_idx = event_idx
        region_end = next(
            (r.end for r in memory.regions if r.gpa <= base < r.end), _align_up(ring_end, 1)
        )
        self._arena = _Arena(_align_up(ring_end, PAGE_SIZE), region_end)
        self._chains: dict[int, _Chain] = {}

    @property
    def flags(self) -> QueueFlags:
        """Queue flags matching this driver (indirect descriptors always allowed)."""
        flags = QueueFlags.INDIRECT
        if self.packed:
            flags |= QueueFlags.PACKED
        if self.event_idx:
            flags |= QueueFlags.EVENT_IDX
        return flags

    def alloc(self, length: int, align: int = 16) -> int:
        """Guest address of a fresh data buffer of ``length`` bytes (never recycled)."""
        return self._arena.alloc(length, align)

    def writable_buffers(self, head: int) -> list[tuple[int, int]]:
        """The ``(gpa, len)`` segments of chain ``head`` that the device may write."""
        return list(self._chains[head].writable)

    def add_chain(
        self, readable: list[bytes], writable: list[int], *, indirect: bool = False
    ) -> int:
        """Make a chain available: ``readable`` copied into fresh buffers, then fresh
        writable buffers of the given lengths. Returns the head (split) or buffer id."""
        owned: list[tuple[int, int]] = []
        segs: list[tuple[int, int, int]] = []
        for data in readable:
            gpa = self._arena.alloc(len(data), 16)
            self.memory.write(gpa, data)
            owned.append((gpa, len(data)))
            segs.append((gpa, len(data), 0))
        for length in writable:
            gpa = self._arena.alloc(length, 16)
            owned.append((gpa, length))
            segs.append((gpa, length, VIRTQ_DESC_F_WRITE))
        outs = [(gpa, n) for gpa, n, f in segs if f & VIRTQ_DESC_F_WRITE]
        if indirect:
            table_len = DESC_SIZE * len(segs)
            table = self._arena.alloc(table_len, 16)
            owned.append((table, table_len))
            self.memory.write(table, self._table_bytes(segs))
            segs = [(table, table_len, VIRTQ_DESC_F_INDIRECT)]
        return self._publish_chain(segs, outs, owned)

    def indirect_table(self, descs: list[tuple[int, int, int, int]]) -> tuple[int, int]:
        """Write a raw indirect table (split: ``(addr, len, flags, next)``; packed:
        ``(addr, len, flags, id)``) into a fresh buffer; returns ``(gpa, len)``."""
        raw = b"".join(self._pack(*d) for d in descs)
        gpa = self.alloc(len(raw))
        self.memory.write(gpa, raw)
        return gpa, len(raw)

    def _free_chain(self, chain: _Chain) -> None:
        for gpa, length in chain.owned:
            self._arena.free(gpa, length)
        chain.owned = []

    # Per-layout parts.
    def _pack(self, addr: int, length: int, flags: int, link: int) -> bytes:
        raise NotImplementedError

    def _table_bytes(self, segs: list[tuple[int, int, int]]) -> bytes:
        raise NotImplementedError

    def _publish_chain(
        self,
        segs: list[tuple[int, int, int]],
        writable: list[tuple[int, int]],
        owned: list[tuple[int, int]],
    ) -> int:
        raise NotImplementedError


class SplitDriver(_Driver):
    """The driver side of a split virtqueue (virtio 1.2, 2.7).

    Descriptor table at ``base``, available ring right after it, used ring after that
    (4-aligned), data buffers from the next page on.
    """

    def __init__(
        self, memory: GuestMemory, size: int, base: int, *, event_idx: bool = False
    ) -> None:
        desc_len, avail_len, used_len = split_ring_sizes(size)
        self.desc_gpa = base
        self.driver_gpa = base + desc_len
        self.device_gpa = _align_up(self.driver_gpa + avail_len, 4)
        super().__init__(memory, size, base, self.device_gpa + used_len, event_idx)
        self._free_slots = [True] * size
        self.avail_idx = 0  # the avail idx the driver last published
        self.last_used = 0  # the used idx up to which the driver collected entries
        self._kicked_idx = 0  # the avail idx at the last device_wants_kicks()
        for gpa, length in (
            (self.desc_gpa, desc_len),
            (self.driver_gpa, avail_len),
            (self.device_gpa, used_len),
        ):
            memory.fill(gpa, length)

    def _pack(self, addr: int, length: int, flags: int, link: int) -> bytes:
        return DESC.pack(addr, length, flags, link)

    def _table_bytes(self, segs: list[tuple[int, int, int]]) -> bytes:
        last = len(segs) - 1
        return b"".join(
            DESC.pack(gpa, n, f | (VIRTQ_DESC_F_NEXT if i < last else 0), i + 1 if i < last else 0)
            for i, (gpa, n, f) in enumerate(segs)
        )

    def _take_slots(self, count: int, consecutive: bool) -> list[int]:
        if consecutive:
            run = 0
            for i, free in enumerate(self._free_slots):
                run = run + 1 if free else 0
                if run == count:
                    slots = list(range(i - count + 1, i + 1))
                    break
            else:
                raise RuntimeError(f"no {count} consecutive free descriptors")
        else:
            slots = [i for i, free in enumerate(self._free_slots) if free][:count]
            if len(slots) < count:
                raise RuntimeError(f"no {count} free descriptors")
        for i in slots:
            self._free_slots[i] = False
        return slots

    def _make_available(self, head: int) -> None:
        ring = self.driver_gpa + AVAIL_RING + 2 * (self.avail_idx % self.size)
        self.memory.write_u16(ring, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write_u16(self.driver_gpa + AVAIL_IDX, self.avail_idx)

    def _publish_chain(
        self,
        segs: list[tuple[int, int, int]],
        writable: list[tuple[int, int]],
        owned: list[tuple[int, int]],
    ) -> int:
        slots = self._take_slots(len(segs), consecutive=False)
        for i, (gpa, n, flags) in enumerate(segs):
            more = i + 1 < len(slots)
            link = slots[i + 1] if more else 0
            flags |= VIRTQ_DESC_F_NEXT if more else 0
            self.memory.write(self.desc_gpa + DESC_SIZE * slots[i], DESC.pack(gpa, n, flags, link))
        head = slots[0]
        self._chains[head] = _Chain(slots, writable, owned)
        self._make_available(head)
        return head

    def add_descriptors(
        self, descs: list[tuple[int, int, int, int]], *, publish: bool = True
    ) -> int:
        """Write raw ``(addr, len, flags, next)`` descriptors into the lowest run of
        consecutive free slots (slots 0, 1, ... on a fresh driver) and, when ``publish``,
        put the first on the available ring as-is. Returns the first slot."""
        slots = self._take_slots(len(descs), consecutive=True)
        for slot, (addr, length, flags, link) in zip(slots, descs, strict=True):
            self.memory.write(
                self.desc_gpa + DESC_SIZE * slot, DESC.pack(addr, length, flags, link)
            )
        writable = [(a, n) for a, n, f, _ in descs if f & VIRTQ_DESC_F_WRITE]
        head = slots[0]
        self._chains[head] = _Chain(slots, writable)
        if publish:
            self._make_available(head)
        return head

    def used(self) -> list[tuple[int, int]]:
        """New used entries ``(id, len)`` since the last call; frees their descriptors."""
        idx = self.memory.read_u16(self.device_gpa + USED_IDX)
        if (idx - self.last_used) & 0xFFFF > self.size:
            raise RuntimeError(f"device moved used idx from {self.last_used} to {idx}")
        out: list[tuple[int, int]] = []
        while self.last_used != idx:
            elem = self.device_gpa + USED_RING + USED_ELEM_SIZE * (self.last_used % self.size)
            head, length = USED_ELEM.unpack(self.memory.read(elem, USED_ELEM.size))
            chain = self._chains.get(head)
            if chain is None or not chain.slots:
                raise RuntimeError(f"device returned chain {head}, which is not outstanding")
            for slot in chain.slots:
                self._free_slots[slot] = True
            chain.slots = []
            self._free_chain(chain)
            out.append((head, length))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    # -- event suppression ----------------------------------------------------------------

    def set_used_event(self, idx: int) -> None:
        """Ask for an interrupt once the used idx passes ``idx`` (event idx)."""
        self.memory.write_u16(self.driver_gpa + AVAIL_RING + 2 * self.size, idx & 0xFFFF)

    def set_no_interrupt(self, on: bool) -> None:
        """Set or clear VIRTQ_AVAIL_F_NO_INTERRUPT."""
        self.memory.write_u16(
            self.driver_gpa + AVAIL_FLAGS, VIRTQ_AVAIL_F_NO_INTERRUPT if on else 0
        )

    def avail_event(self) -> int:
        """The avail_event the device wrote at the end of the used ring."""
        return self.memory.read_u16(self.device_gpa + USED_RING + USED_ELEM_SIZE * self.size)

    def used_flags(self) -> int:
        return self.memory.read_u16(self.device_gpa + USED_FLAGS)

    def device_wants_kicks(self) -> bool:
        """Whether the driver must kick for the buffers added since the last call (like
        Linux's virtqueue_kick_prepare: event idx, else VIRTQ_USED_F_NO_NOTIFY)."""
        old, self._kicked_idx = self._kicked_idx, self.avail_idx
        if self.event_idx:
            return vring_need_event(self.avail_event(), self.avail_idx, old)
        return not self.used_flags() & VIRTQ_USED_F_NO_NOTIFY


class PackedDriver(_Driver):
    """The driver side of a packed virtqueue (virtio 1.2, 2.8).

    Descriptor ring at ``base``, driver event suppression right after it (``driver_gpa``),
    device event suppression after that (``device_gpa``). Buffer ids are the lowest free
    ones; every descriptor of a chain carries the id. Wrap counters start at 1.
    """

    packed = True

    def __init__(
        self, memory: GuestMemory, size: int, base: int, *, event_idx: bool = False
    ) -> None:
        self.desc_gpa = base
        self.driver_gpa = base + DESC_SIZE * size
        self.device_gpa = self.driver_gpa + 4
        super().__init__(memory, size, base, self.device_gpa + 4, event_idx)
        memory.fill(base, DESC_SIZE * size + 8)
        self._free_ids = [True] * size
        self._free_count = size  # ring slots not holding an outstanding chain
        self.next_avail = 0  # ring slot for the next descriptor made available
        self.avail_wrap = 1
        self.next_used = 0  # ring slot where the device writes the next used descriptor
        self.used_wrap = 1
        self.last_used = 0  # ring slots consumed by used(), free-running
        self._added = 0  # slots made available since the last device_wants_kicks()

    def _pack(self, addr: int, length: int, flags: int, link: int) -> bytes:
        return DESC.pack(addr, length, link, flags)

    def _table_bytes(self, segs: list[tuple[int, int, int]]) -> bytes:
        return b"".join(DESC.pack(gpa, n, 0, f) for gpa, n, f in segs)

    def _write_ring(self, descs: list[tuple[int, int, int, int]], publish: bool) -> list[int]:
        """Write ``(addr, len, flags, id)`` into the next ring slots with this lap's
        AVAIL/USED bits; the head's flags go last (that makes the whole chain visible)."""
        if len(descs) > self._free_count:
            raise RuntimeError(f"no {len(descs)} free ring slots")
        slots = []
        head_flags = 0
        for i, (addr, length, flags, buf_id) in enumerate(descs):
            slot = self.next_avail
            lap = VIRTQ_DESC_F_AVAIL if self.avail_wrap else VIRTQ_DESC_F_USED
            flags = (flags & ~(VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED)) | lap
            gpa = self.desc_gpa + DESC_SIZE * slot
            if i == 0:
                head_flags = flags
                flags = flags ^ (VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED)  # not available yet
            self.memory.write(gpa, DESC.pack(addr, length, buf_id, flags))
            slots.append(slot)
            self.next_avail += 1
            if self.next_avail == self.size:
                self.next_avail = 0
                self.avail_wrap ^= 1
        if publish:
            self.memory.write_u16(self.desc_gpa + DESC_SIZE * slots[0] + PACKED_FLAGS, head_flags)
        self._free_count -= len(slots)
        self._added += len(slots)
        return slots

    def _take_id(self) -> int:
        for i, free in enumerate(self._free_ids):
            if free:
                self._free_ids[i] = False
                return i
        raise RuntimeError("no free buffer id")

    def _publish_chain(
        self,
        segs: list[tuple[int, int, int]],
        writable: list[tuple[int, int]],
        owned: list[tuple[int, int]],
    ) -> int:
        buf_id = self._take_id()
        last = len(segs) - 1
        descs = [
            (gpa, n, f | (VIRTQ_DESC_F_NEXT if i < last else 0), buf_id)
            for i, (gpa, n, f) in enumerate(segs)
        ]
        self._chains[buf_id] = _Chain(self._write_ring(descs, True), writable, owned)
        return buf_id

    def add_descriptors(
        self, descs: list[tuple[int, int, int, int]], *, publish: bool = True
    ) -> int:
        """Write raw ``(addr, len, flags, id)`` descriptors into the next ring slots (the
        driver adds only the AVAIL/USED bits) and, when ``publish``, make the head
        available. Returns the last descriptor's id (the buffer id)."""
        buf_id = descs[-1][3]
        if 0 <= buf_id < self.size and self._free_ids[buf_id]:
            self._free_ids[buf_id] = False
        writable = [(a, n) for a, n, f, _ in descs if f & VIRTQ_DESC_F_WRITE]
        self._chains[buf_id] = _Chain(self._write_ring(descs, publish), writable)
        return buf_id

    def used(self) -> list[tuple[int, int]]:
        """New used descriptors ``(id, len)`` since the last call; skips each chain's slots."""
        out: list[tuple[int, int]] = []
        while True:
            gpa = self.desc_gpa + DESC_SIZE * self.next_used
            _, length, buf_id, flags = DESC.unpack(self.memory.read(gpa, DESC_SIZE))
            avail, used = bool(flags & VIRTQ_DESC_F_AVAIL), bool(flags & VIRTQ_DESC_F_USED)
            if not avail == used == bool(self.used_wrap):
                return out
            chain = self._chains.get(buf_id)
            if chain is None or not chain.slots:
                raise RuntimeError(f"device returned buffer {buf_id}, which is not outstanding")
            count = len(chain.slots)
            chain.slots = []
            self._free_chain(chain)
            if 0 <= buf_id < self.size:
                self._free_ids[buf_id] = True
            self._free_count += count
            self.last_used += count
            self.next_used += count
            if self.next_used >= self.size:
                self.next_used -= self.size
                self.used_wrap ^= 1
            out.append((buf_id, length))

    # -- event suppression ----------------------------------------------------------------

    def set_used_event(self, idx: int) -> None:
        """Ask for an interrupt when the ring slot at free-running position ``idx`` (as
        counted by :attr:`last_used`) is used: RING_EVENT_FLAGS_DESC with its offset and
        wrap counter. With one-descriptor chains this matches the split ring's used_event."""
        lap = (idx // self.size) & 1
        off_wrap = (idx % self.size) | (1 ^ lap) << EVENT_WRAP_SHIFT
        self.memory.write_u16(self.driver_gpa + EVENT_OFF_WRAP, off_wrap)
        self.memory.write_u16(self.driver_gpa + EVENT_FLAGS, RING_EVENT_FLAGS_DESC)

    def set_no_interrupt(self, on: bool) -> None:
        """Driver event flags DISABLE (on) or ENABLE."""
        flags = RING_EVENT_FLAGS_DISABLE if on else RING_EVENT_FLAGS_ENABLE
        self.memory.write_u16(self.driver_gpa + EVENT_FLAGS, flags)

    def avail_event(self) -> int:
        """The device event suppression's raw off_wrap (offset | wrap << 15)."""
        return self.memory.read_u16(self.device_gpa + EVENT_OFF_WRAP)

    def device_event_flags(self) -> int:
        return self.memory.read_u16(self.device_gpa + EVENT_FLAGS)

    def device_wants_kicks(self) -> bool:
        """Whether the driver must kick for the slots added since the last call (like
        Linux's virtqueue_kick_prepare_packed)."""
        added, self._added = self._added, 0
        flags = self.device_event_flags()
        if flags == RING_EVENT_FLAGS_DESC:
            off_wrap = self.avail_event()
            event = off_wrap & EVENT_OFF_MASK
            if off_wrap >> EVENT_WRAP_SHIFT != self.avail_wrap:
                event -= self.size
            new = self.next_avail
            return vring_need_event(event & 0xFFFF, new, (new - added) & 0xFFFF)
        return flags != RING_EVENT_FLAGS_DISABLE


def make_driver(
    memory: GuestMemory, size: int, base: int, *, packed: bool, event_idx: bool = False
) -> SplitDriver | PackedDriver:
    """A split or packed driver with its rings at ``base``."""
    if packed:
        return PackedDriver(memory, size, base, event_idx=event_idx)
    return SplitDriver(memory, size, base, event_idx=event_idx)
