"""The virtqueue protocol shared by the C engine and the pure-Python reference.

Names follow rust-vmm's virtio-queue: ``pop_descriptor_chain``, ``add_used``,
``enable_notification``, ``needs_notification``. Two implementations:

- :class:`iovirt.virtio.cengine.CVirtQueue` wraps ``csrc/virtqueue.c`` (the data path);
- :class:`iovirt.virtio.pyqueue.PyVirtQueue` is a small reference in Python.

Both pass the same tests (tests/unit/test_virtqueue.py). A malformed ring or chain raises
:class:`VirtQueueError` and leaves the queue *broken*: every later pop raises too, until the
transport resets the device (virtio's DEVICE_NEEDS_RESET).
"""

from __future__ import annotations

import enum
import errno as errno_mod
from dataclasses import dataclass, field
from typing import Protocol

from iovirt.errors import IovirtError
from iovirt.memory import GuestMemory


class QueueFlags(enum.IntFlag):
    """Ring features a queue uses (values match IOV_VQ_F_* in csrc/virtqueue.h)."""

    PACKED = 0x1
    EVENT_IDX = 0x2
    INDIRECT = 0x4
    IN_ORDER = 0x8


# Longest chain walked (direct plus indirect descriptors); matches IOV_CHAIN_MAX_SEGS.
CHAIN_MAX_SEGS = 1024

# Split-ring descriptor flags and ring flags (virtio 1.2, 2.7).
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1
# Packed-ring descriptor flags and event suppression (virtio 1.2, 2.8).
VIRTQ_DESC_F_AVAIL = 1 << 7
VIRTQ_DESC_F_USED = 1 << 15
RING_EVENT_FLAGS_ENABLE = 0
RING_EVENT_FLAGS_DISABLE = 1
RING_EVENT_FLAGS_DESC = 2


class VirtQueueError(IovirtError):
    """The driver broke the queue. ``errno`` is the engine's code (EFAULT: outside RAM;
    ELOOP: chain too long or looping; EINVAL: bad index or layout; EIO: already broken)."""

    def __init__(self, errno: int, detail: str = "") -> None:
        self.errno = errno
        msg = f"virtqueue broken: {errno_mod.errorcode.get(errno, str(errno))}"
        super().__init__(f"{msg} ({detail})" if detail else msg)


@dataclass
class DescriptorChain:
    """A chain as the device sees it: device-readable segments, then device-writable ones,
    each a ``(guest address, length)`` already checked to lie inside guest RAM."""

    head: int  # split: head descriptor index; packed: buffer id
    ndescs: int  # ring slots used (packed rings skip this many on completion)
    readable: list[tuple[int, int]] = field(default_factory=list)
    writable: list[tuple[int, int]] = field(default_factory=list)

    @property
    def readable_bytes(self) -> int:
        return sum(n for _, n in self.readable)

    @property
    def writable_bytes(self) -> int:
        return sum(n for _, n in self.writable)

    def read(self, memory: GuestMemory) -> bytes:
        """All readable bytes, concatenated."""
        return b"".join(memory.read(gpa, n) for gpa, n in self.readable)

    def write(self, memory: GuestMemory, data: bytes) -> int:
        """Scatter ``data`` over the writable segments; returns the bytes written."""
        done = 0
        for gpa, n in self.writable:
            if done >= len(data):
                break
            chunk = data[done : done + n]
            memory.write(gpa, chunk)
            done += len(chunk)
        return done


class VirtQueue(Protocol):
    """One queue's device side. Construct with ``(memory, size, flags, desc, driver,
    device)``; the constructor checks the ring areas and raises VirtQueueError."""

    @property
    def broken(self) -> bool: ...

    def pop_descriptor_chain(self) -> DescriptorChain | None:
        """The next available chain, None if the ring is empty; VirtQueueError if bad."""
        ...

    def add_used(self, head: int, ndescs: int, length: int) -> None:
        """Return chain ``head`` with ``length`` bytes written (split: batched)."""
        ...

    def flush_used(self) -> None:
        """Publish batched used entries."""
        ...

    def needs_notification(self) -> bool:
        """After a flush: whether the driver asked for an interrupt."""
        ...

    def enable_notification(self) -> bool:
        """Ask for kicks again; True if buffers arrived meanwhile (keep popping)."""
        ...

    def disable_notification(self) -> None:
        """Ask the driver not to kick."""
        ...
