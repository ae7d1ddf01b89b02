"""The pure-Python virtqueue: a small, readable reference for the C engine.

:class:`PyVirtQueue` implements the :class:`~iovirt.virtio.queue.VirtQueue` protocol with
exactly the semantics of ``csrc/virtqueue.h`` / ``csrc/virtqueue.c`` (the tests run both
against the same rings and compare them). Split rings follow virtio 1.2 section 2.7,
packed rings 2.8, event suppression 2.7.7, 2.7.10 and 2.8.10.

The driver is hostile. Every guest access goes through :class:`GuestMemory`'s checked
accessors; a segment outside RAM is ``EFAULT``; a chain walk is bounded by the queue size
(direct descriptors) and by :data:`CHAIN_MAX_SEGS` (all of them), so loops end in
``ELOOP``. The first error breaks the queue for good: later pops raise ``EIO``.
"""

from __future__ import annotations

import errno
import struct

from iovirt.errors import GuestMemoryError
from iovirt.memory import GuestMemory
from iovirt.virtio.queue import (
    CHAIN_MAX_SEGS,
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
    DescriptorChain,
    QueueFlags,
    VirtQueueError,
)

KNOWN_FLAGS = QueueFlags.PACKED | QueueFlags.EVENT_IDX | QueueFlags.INDIRECT | QueueFlags.IN_ORDER
MAX_QUEUE_SIZE = 32768  # both layouts (2.7: split sizes are powers of two; 2.8: 2**15)
# A descriptor: split {addr u64, len u32, flags u16, next u16}; packed {addr, len, id, flags}.
DESC = struct.Struct("<QIHH")
DESC_SIZE = DESC.size
DESC_ALIGN = 16
# Split ring (2.7): avail {flags, idx, ring[size], used_event};
# used {flags, idx, ring[size] of {id u32, len u32}, avail_event}.
AVAIL_ALIGN = 2
USED_ALIGN = 4
RING_FLAGS = 0
RING_IDX = 2
RING_ENTRIES = 4
USED_ELEM_SIZE = 8
# Packed ring (2.8): event suppression {off_wrap u16, flags u16}; descriptor id and flags.
EVENT_AREA_SIZE = 4
EVENT_ALIGN = 4
EVENT_OFF_WRAP = 0
EVENT_FLAGS = 2
EVENT_WRAP_SHIFT = 15
EVENT_OFF_MASK = (1 << EVENT_WRAP_SHIFT) - 1
PACKED_LEN = 8
PACKED_ID = 12
PACKED_FLAGS = 14


def vring_need_event(event: int, new: int, old: int) -> bool:
    """Whether a 16-bit index moving from ``old`` to ``new`` passed ``event`` (2.7.10)."""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


class _Walk:
    """The segments of one chain, with the checks every non-indirect descriptor gets."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.total = 0  # descriptors seen, direct and indirect, loops included
        self.seen_write = False
        self.readable: list[tuple[int, int]] = []
        self.writable: list[tuple[int, int]] = []

    def count(self) -> None:
        self.total += 1
        if self.total > CHAIN_MAX_SEGS:
            raise VirtQueueError(errno.ELOOP, f"chain longer than {CHAIN_MAX_SEGS} descriptors")

    def add(self, addr: int, length: int, writable: bool) -> None:
        self.count()
        if writable:
            self.seen_write = True
        elif self.seen_write:
            raise VirtQueueError(errno.EINVAL, "readable descriptor after a writable one")
        if length == 0:
            return  # legal and carries nothing; it still counted against the bound
        if not self.memory.contains(addr, length):
            raise VirtQueueError(errno.EFAULT, f"segment [{addr:#x}, +{length:#x}) outside RAM")
        (self.writable if writable else self.readable).append((addr, length))


class PyVirtQueue:
    """One queue's device side, split or packed as ``flags`` says (see the module doc)."""

    def __init__(
        self, memory: GuestMemory, size: int, flags: int, desc: int, driver: int, device: int
    ) -> None:
        if flags & ~int(KNOWN_FLAGS):
            raise VirtQueueError(errno.EINVAL, f"unknown queue flags {flags:#x}")
        self._flags = QueueFlags(flags)
        self._packed = bool(flags & QueueFlags.PACKED)
        if self._packed:
            valid_size = 0 < size <= MAX_QUEUE_SIZE
            lengths = (DESC_SIZE * size, EVENT_AREA_SIZE, EVENT_AREA_SIZE)
            aligns = (DESC_ALIGN, EVENT_ALIGN, EVENT_ALIGN)
        else:
            valid_size = 0 < size <= MAX_QUEUE_SIZE and size & (size - 1) == 0
            # The event fields (used_event, avail_event) are always part of the areas.
            lengths = (DESC_SIZE * size, RING_ENTRIES + 2 * size + 2, RING_ENTRIES + 8 * size + 2)
            aligns = (DESC_ALIGN, AVAIL_ALIGN, USED_ALIGN)
        areas = (desc, driver, device)
        if not valid_size:
            raise VirtQueueError(errno.EINVAL, f"bad queue size {size}")
        if any(gpa % align for gpa, align in zip(areas, aligns, strict=True)):
            raise VirtQueueError(errno.EINVAL, "misaligned ring area")
        if not all(memory.contains(g, n) for g, n in zip(areas, lengths, strict=True)):
            raise VirtQueueError(errno.EFAULT, "ring area outside RAM")
        self._memory = memory
        self._size = size
        self._desc, self._driver, self._device = areas
        self._broken = False
        self.error = 0  # errno of the error that broke the queue
        # Split: free-running 16-bit indices. Packed: ring positions and wrap counters
        # (which start at 1, 2.8.1); used_idx counts used descriptors modulo 2**16.
        self._last_avail_idx = 0
        self._used_idx = 0
        self._published_used = 0
        self._signalled_used = 0
        self._signalled_used_valid = False
        self._next_avail = 0
        self._avail_wrap = 1
        self._next_used = 0
        self._used_wrap = 1

    @property
    def broken(self) -> bool:
        return self._broken

    @property
    def _event_idx(self) -> bool:
        return bool(self._flags & QueueFlags.EVENT_IDX)

    # -- taking chains --------------------------------------------------------------------

    def pop_descriptor_chain(self) -> DescriptorChain | None:
        if self._broken:
            raise VirtQueueError(errno.EIO, "queue is broken")
        try:
            return self._pop_packed() if self._packed else self._pop_split()
        except GuestMemoryError as e:
            err = VirtQueueError(errno.EFAULT, str(e))
            self._break(err)
            raise err from e
        except VirtQueueError as e:
            self._break(e)
            raise

    def _break(self, err: VirtQueueError) -> None:
        self._broken = True
        self.error = err.errno

    def _read_desc(self, gpa: int) -> tuple[int, int, int, int]:
        # One copy per descriptor: every check below looks at this snapshot only.
        addr, length, a, b = DESC.unpack(self._memory.read(gpa, DESC_SIZE))
        return addr, length, a, b

    def _indirect_table(self, addr: int, length: int) -> tuple[int, int]:
        """Check an indirect table; returns its address and number of entries."""
        if not self._flags & QueueFlags.INDIRECT:
            raise VirtQueueError(errno.EINVAL, "indirect descriptor not negotiated")
        if length == 0 or length % DESC_SIZE:
            raise VirtQueueError(errno.EINVAL, f"indirect table of {length} bytes")
        if not self._memory.contains(addr, length):
            raise VirtQueueError(errno.EFAULT, f"indirect table at {addr:#x} outside RAM")
        return addr, length // DESC_SIZE

    def _pop_split(self) -> DescriptorChain | None:
        avail_idx = self._memory.read_u16(self._driver + RING_IDX)
        pending = (avail_idx - self._last_avail_idx) & 0xFFFF
        if pending == 0:
            return None
        if pending > self._size:
            raise VirtQueueError(errno.EINVAL, f"avail idx {avail_idx} ahead by {pending}")
        slot = self._last_avail_idx % self._size
        head = self._memory.read_u16(self._driver + RING_ENTRIES + 2 * slot)
        if head >= self._size:
            raise VirtQueueError(errno.EINVAL, f"head {head} >= queue size")
        chain = self._walk_split(head)
        self._last_avail_idx = (self._last_avail_idx + 1) & 0xFFFF
        return chain

    def _walk_split(self, head: int) -> DescriptorChain:
        walk = _Walk(self._memory)
        table, table_size = self._desc, self._size
        in_indirect = False
        direct = 0
        idx = head
        while True:
            addr, length, flags, nxt = self._read_desc(table + DESC_SIZE * idx)
            if not in_indirect:
                direct += 1
                if direct > self._size:  # longer than the ring: the chain loops
                    raise VirtQueueError(errno.ELOOP, "chain longer than the queue")
            if flags & VIRTQ_DESC_F_INDIRECT:
                # 2.7.5.3.1: no table inside a table, no INDIRECT together with NEXT.
                if in_indirect or flags & VIRTQ_DESC_F_NEXT:
                    raise VirtQueueError(errno.EINVAL, "nested indirect or INDIRECT|NEXT")
                walk.count()
                table, table_size = self._indirect_table(addr, length)
                in_indirect = True
                idx = 0
                continue
            walk.add(addr, length, bool(flags & VIRTQ_DESC_F_WRITE))
            if not flags & VIRTQ_DESC_F_NEXT:
                return DescriptorChain(head, direct, walk.readable, walk.writable)
            if nxt >= table_size:
                raise VirtQueueError(errno.EINVAL, f"next {nxt} >= table size {table_size}")
            idx = nxt

    def _packed_available(self, flags: int) -> bool:
        avail = bool(flags & VIRTQ_DESC_F_AVAIL)
        used = bool(flags & VIRTQ_DESC_F_USED)
        return avail == bool(self._avail_wrap) and used != bool(self._avail_wrap)

    def _pop_packed(self) -> DescriptorChain | None:
        pos, wrap = self._next_avail, self._avail_wrap
        # The driver makes a chain's head available last (2.8.6): only it is polled.
        if not self._packed_available(
            self._memory.read_u16(self._desc + DESC_SIZE * pos + PACKED_FLAGS)
        ):
            return None
        walk = _Walk(self._memory)
        count = 0
        while True:
            addr, length, buf_id, flags = self._read_desc(self._desc + DESC_SIZE * pos)
            count += 1
            if count > self._size:
                raise VirtQueueError(errno.ELOOP, "chain longer than the queue")
            pos += 1
            if pos == self._size:
                pos, wrap = 0, wrap ^ 1
            if flags & VIRTQ_DESC_F_INDIRECT:
                # Only a lone descriptor may point at a table (2.8.7).
                if count != 1 or flags & VIRTQ_DESC_F_NEXT:
                    raise VirtQueueError(errno.EINVAL, "indirect descriptor inside a chain")
                walk.count()
                self._walk_packed_indirect(walk, addr, length)
                break
            walk.add(addr, length, bool(flags & VIRTQ_DESC_F_WRITE))
            if not flags & VIRTQ_DESC_F_NEXT:
                break  # the buffer id lives in the last descriptor (2.8.6)
        self._next_avail, self._avail_wrap = pos, wrap
        self._last_avail_idx = (self._last_avail_idx + 1) & 0xFFFF
        return DescriptorChain(buf_id, count, walk.readable, walk.writable)

    def _walk_packed_indirect(self, walk: _Walk, addr: int, length: int) -> None:
        table, entries = self._indirect_table(addr, length)
        # Entries are consecutive; NEXT inside a packed table means nothing.
        for i in range(entries):
            e_addr, e_len, _, e_flags = self._read_desc(table + DESC_SIZE * i)
            if e_flags & VIRTQ_DESC_F_INDIRECT:
                raise VirtQueueError(errno.EINVAL, "nested indirect table")
            walk.add(e_addr, e_len, bool(e_flags & VIRTQ_DESC_F_WRITE))

    # -- returning chains -----------------------------------------------------------------

    def add_used(self, head: int, ndescs: int, length: int) -> None:
        if self._packed:
            self._add_used_packed(head, ndescs, length)
            return
        # Written now, published by flush_used (one used->idx store per batch).
        elem = self._device + RING_ENTRIES + USED_ELEM_SIZE * (self._used_idx % self._size)
        self._memory.write_u32(elem, head)
        self._memory.write_u32(elem + 4, length)
        self._used_idx = (self._used_idx + 1) & 0xFFFF

    def _add_used_packed(self, buf_id: int, ndescs: int, length: int) -> None:
        ndescs = min(max(ndescs, 1), self._size)
        gpa = self._desc + DESC_SIZE * self._next_used
        flags = VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED if self._used_wrap else 0
        if length > 0:
            flags |= VIRTQ_DESC_F_WRITE
        self._memory.write_u16(gpa + PACKED_ID, buf_id)
        self._memory.write_u32(gpa + PACKED_LEN, length)
        self._memory.write_u16(gpa + PACKED_FLAGS, flags)  # last: this publishes it
        self._next_used += ndescs
        if self._next_used >= self._size:
            self._next_used -= self._size
            self._used_wrap ^= 1
        self._used_idx = (self._used_idx + ndescs) & 0xFFFF
        self._published_used = self._used_idx

    def flush_used(self) -> None:
        if not self._packed and self._published_used != self._used_idx:
            self._memory.write_u16(self._device + RING_IDX, self._used_idx)
            self._published_used = self._used_idx

    # -- notifications --------------------------------------------------------------------

    def needs_notification(self) -> bool:
        old, new = self._signalled_used, self._published_used
        valid = self._signalled_used_valid
        self._signalled_used, self._signalled_used_valid = new, True
        if self._packed:
            return self._packed_needs_notification(new, old, valid)
        if self._event_idx:
            used_event = self._memory.read_u16(self._driver + RING_ENTRIES + 2 * self._size)
            return not valid or vring_need_event(used_event, new, old)
        return not self._memory.read_u16(self._driver + RING_FLAGS) & VIRTQ_AVAIL_F_NO_INTERRUPT

    def _packed_needs_notification(self, new: int, old: int, valid: bool) -> bool:
        flags = self._memory.read_u16(self._driver + EVENT_FLAGS)
        if flags == RING_EVENT_FLAGS_DISABLE:
            return False
        if flags != RING_EVENT_FLAGS_DESC or not self._event_idx or not valid:
            return True  # ENABLE, a value we cannot honour, or the first one: always safe
        off_wrap = self._memory.read_u16(self._driver + EVENT_OFF_WRAP)
        # Put the driver's (offset, wrap) on our free-running used count; an event on the
        # other lap is taken as one lap behind.
        off = off_wrap & EVENT_OFF_MASK
        if off_wrap >> EVENT_WRAP_SHIFT != self._used_wrap:
            off -= self._size
        event = (new - self._next_used + off) & 0xFFFF
        return vring_need_event(event, new, old)

    def enable_notification(self) -> bool:
        if self._broken:
            return False
        if self._packed:
            area = self._device
            if self._event_idx:
                off_wrap = self._next_avail | self._avail_wrap << EVENT_WRAP_SHIFT
                self._memory.write_u16(area + EVENT_OFF_WRAP, off_wrap)
                self._memory.write_u16(area + EVENT_FLAGS, RING_EVENT_FLAGS_DESC)
            else:
                self._memory.write_u16(area + EVENT_FLAGS, RING_EVENT_FLAGS_ENABLE)
            head_flags = self._memory.read_u16(
                self._desc + DESC_SIZE * self._next_avail + PACKED_FLAGS
            )
            return self._packed_available(head_flags)
        if self._event_idx:
            avail_event = self._device + RING_ENTRIES + USED_ELEM_SIZE * self._size
            self._memory.write_u16(avail_event, self._last_avail_idx)
        else:
            flags = self._memory.read_u16(self._device + RING_FLAGS)
            self._memory.write_u16(self._device + RING_FLAGS, flags & ~VIRTQ_USED_F_NO_NOTIFY)
        return self._memory.read_u16(self._driver + RING_IDX) != self._last_avail_idx

    def disable_notification(self) -> None:
        if self._broken:
            return
        if self._packed:
            self._memory.write_u16(self._device + EVENT_FLAGS, RING_EVENT_FLAGS_DISABLE)
        elif not self._event_idx:  # with event idx, avail_event simply stays behind
            flags = self._memory.read_u16(self._device + RING_FLAGS)
            self._memory.write_u16(self._device + RING_FLAGS, flags | VIRTQ_USED_F_NO_NOTIFY)
