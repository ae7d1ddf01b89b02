"""A vhost-user back-end: iovirt's C virtio-blk and virtio-net engines behind a socket.

Any vhost-user front-end (QEMU, DPDK's virtio-user, iovirt's VMM) connects to the socket,
sends its guest memory as file descriptors (SET_MEM_TABLE), says where each ring is
(SET_VRING_NUM/ADDR/BASE) and hands over the kick and call eventfds. From then on the
rings are served by the same C engines the in-VMM devices use (csrc/blk.c, csrc/net.c,
through csrc/vhost_user_{blk,net}.c, which let a ring start mid-stream and keep the
virtio-blk inflight region), straight between the mapped guest memory and our file or tap
backend. Python only answers the control messages.

The front-end is not trusted. Every message is checked before anything is mapped or
started: sizes, indices, fd counts, memory regions (page-aligned, inside the file they
map, not overlapping one another in guest or front-end address space), ring addresses
(inside a region). A message that breaks the rules is answered with a failed REPLY_ACK
when the front-end asked for one, else the connection is closed; the process keeps
serving and accepts the next front-end. Guest addresses inside the rings are checked by
the C engine, as in the VMM.

Known limits: split rings only (VIRTIO_F_RING_PACKED is not offered); no dirty logging
(migration), no postcopy, no IOTLB; memory regions must not shrink under us (a front-end
that truncates its memory file after SET_MEM_TABLE would make the next access fault).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import mmap
import os
import select
import signal
import socket
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from iovirt._native import ffi, lib
from iovirt.backends.block import SECTOR_SIZE, BlockBackend
from iovirt.backends.net import (
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUN_F_TSO_ECN,
    VNET_HDR_LEN,
    NetBackend,
)
from iovirt.backends.vhost_user import (
    FLAG_REPLY,
    FLAG_VERSION,
    MAX_MEM_REGIONS,
    U64,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VRING_IDX_MASK,
    VRING_NOFD_MASK,
    VRING_STATE,
    ConfigAccess,
    InflightDesc,
    MemoryRegionDesc,
    Message,
    ProtocolFeature,
    Request,
    VhostUserDisconnected,
    VhostUserError,
    VhostUserProtocolError,
    VringAddr,
    decode_memory_table,
    read_message,
    request_name,
    send_message,
)
from iovirt.bus.pci import GuestAccessLog
from iovirt.errors import ResourceError, one_line
from iovirt.memory import PAGE_SIZE, GuestMemory, MemoryRegion
from iovirt.virtio.blk import (
    MAX_DISCARD_SECTORS,
    MAX_DISCARD_SEG,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_WRITE_ZEROES,
    BlkOptions,
    VirtioBlk,
)
from iovirt.virtio.cengine import MemoryTable
from iovirt.virtio.device import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_IN_ORDER,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
)
from iovirt.virtio.net import (
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_ECN,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF,
)
from iovirt.virtio.queue import QueueFlags

log = logging.getLogger(__name__)

# Ring sizes a front-end may set (split rings: a power of two up to 32768).
MAX_RING_SIZE = 32768


# Bytes of the split ring areas for a ring of n entries (virtio 1.2, 2.7).
def _desc_bytes(n: int) -> int:
    return 16 * n


def _avail_bytes(n: int) -> int:
    return 6 + 2 * n


def _used_bytes(n: int) -> int:
    return 6 + 8 * n


# One queue's slice of the inflight region: the 16-byte header and 16 bytes per
# descriptor, 64-byte aligned (vhost-user.rst, "Inflight I/O tracking").
INFLIGHT_ALIGN = 64


def inflight_queue_bytes(queue_size: int) -> int:
    raw = int(lib.IOV_VU_INFLIGHT_HEADER) + 16 * queue_size
    return (raw + INFLIGHT_ALIGN - 1) // INFLIGHT_ALIGN * INFLIGHT_ALIGN


# ---- the front-end's memory, mapped here ----------------------------------------------


class MappedMemory(GuestMemory):
    """Guest RAM as the front-end described it: each region mapped from the fd it sent.

    A :class:`~iovirt.memory.GuestMemory` (so the C engines' memory table and every
    bounds-checked accessor work on it), plus the front-end's user address of each region
    for translating ring addresses. Raises VhostUserProtocolError for a bad table; the
    fds are the caller's (closed by it whatever happens).
    """

    def __init__(self, table: list[MemoryRegionDesc], fds: list[int]) -> None:
        if len(fds) != len(table):
            raise VhostUserProtocolError(
                f"SET_MEM_TABLE: {len(table)} regions but {len(fds)} file descriptors"
            )
        _check_table(table)
        self.fd = -1
        self.regions: list[MemoryRegion] = []
        self._pins: list[object] = []
        self.user_addrs: list[int] = []
        try:
            for desc, fd in zip(table, fds, strict=True):
                self._map(desc, fd)
        except BaseException:
            self.close()
            raise
        self.regions.sort(key=lambda r: r.gpa)
        self.size = sum(r.size for r in self.regions)

    def _map(self, desc: MemoryRegionDesc, fd: int) -> None:
        what = f"SET_MEM_TABLE: region at {desc.guest_phys_addr:#x}"
        try:
            st = os.fstat(fd)
        except OSError as e:
            raise VhostUserProtocolError(f"{what}: bad file descriptor ({e.strerror})") from e
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode)):
            raise VhostUserProtocolError(f"{what}: the fd is not a memory file")
        # A mapping past the end of the file would fault on first touch (SIGBUS).
        if stat.S_ISREG(st.st_mode) and desc.mmap_offset + desc.memory_size > st.st_size:
            raise VhostUserProtocolError(
                f"{what}: [{desc.mmap_offset:#x}, +{desc.memory_size:#x}) is past the end "
                f"of its file ({st.st_size:#x} bytes)"
            )
        try:
            mapping = mmap.mmap(
                fd,
                desc.memory_size,
                mmap.MAP_SHARED,
                mmap.PROT_READ | mmap.PROT_WRITE,
                offset=desc.mmap_offset,
            )
        except (OSError, ValueError, OverflowError) as e:
            raise VhostUserProtocolError(f"{what}: cannot map it ({e})") from e
        pin = ffi.from_buffer(mapping)
        self._pins.append(pin)
        host = int(ffi.cast("uintptr_t", pin))
        self.regions.append(
            MemoryRegion(
                desc.guest_phys_addr, desc.memory_size, -1, desc.mmap_offset, mapping, host
            )
        )
        self.user_addrs.append(desc.userspace_addr)
        # Keep the user address next to its region for translation.
        self._by_uaddr = sorted(zip(self.user_addrs, self.regions, strict=True), key=lambda p: p[0])

    def user_to_gpa(self, uaddr: int, length: int) -> int:
        """Guest address of the front-end's ``[uaddr, uaddr + length)``, all in one region."""
        for base, region in self._by_uaddr:
            if base <= uaddr and uaddr + length <= base + region.size:
                return region.gpa + (uaddr - base)
        raise VhostUserProtocolError(
            f"address {uaddr:#x} (+{length:#x}) is in no memory region the front-end sent"
        )


def _check_table(table: list[MemoryRegionDesc]) -> None:
    limit = 1 << 64
    for r in table:
        what = f"SET_MEM_TABLE: region at {r.guest_phys_addr:#x}"
        if r.memory_size == 0:
            raise VhostUserProtocolError(f"{what}: size 0")
        if (
            r.guest_phys_addr + r.memory_size > limit
            or r.userspace_addr + r.memory_size > limit
            or r.mmap_offset + r.memory_size > limit >> 1
        ):
            raise VhostUserProtocolError(f"{what}: size {r.memory_size:#x} wraps around")
        if r.mmap_offset % PAGE_SIZE or r.memory_size % PAGE_SIZE:
            raise VhostUserProtocolError(f"{what}: offset or size not page-aligned")
    for name in ("guest", "user"):
        starts = [r.guest_phys_addr if name == "guest" else r.userspace_addr for r in table]
        spans = sorted((s, s + r.memory_size) for s, r in zip(starts, table, strict=True))
        for (_, end), (start, _) in itertools.pairwise(spans):
            if start < end:
                raise VhostUserProtocolError(f"SET_MEM_TABLE: regions overlap in {name} addresses")


# ---- the engines ----------------------------------------------------------------------


class RingEngine(Protocol):
    """A C data path serving rings in units (a virtio-blk queue; a virtio-net pair)."""

    def unit_of(self, q: int) -> int: ...
    def queues_of(self, unit: int) -> list[int]: ...
    def setup_queue(
        self,
        q: int,
        size: int,
        gpas: tuple[int, int, int],
        flags: int,
        kick: int,
        call: int,
        base: int,
        inflight: tuple[int, int] | None,
    ) -> None: ...
    def start(self, unit: int) -> None: ...
    def stop_all(self) -> None: ...
    def running(self, unit: int) -> bool: ...
    def vring_base(self, q: int) -> int: ...
    def set_call(self, q: int, fd: int) -> None: ...
    @property
    def error_fd(self) -> int: ...
    def queue_error(self, q: int) -> int: ...
    def stats(self) -> dict[str, int]: ...
    def close(self) -> None: ...


def _setup_error(q: int, ret: int) -> VhostUserError:
    return VhostUserError(f"ring {q}: the engine refused its layout ({os.strerror(-ret)})")


class _RingEngine:
    """What both C engines share: ``lib.iov_vu_{blk,net}_*`` are the same calls on
    different handles, so these methods look them up by :attr:`_C` (the prefix) and
    :attr:`_STATS` (the counters reported from the engine's stats struct)."""

    _C: str
    _STATS: tuple[str, ...]

    def __init__(self, memory: GuestMemory) -> None:
        self._mem = MemoryTable(memory)
        self._h: Any = None

    def _call(self, name: str, *args: Any) -> Any:
        return getattr(lib, f"iov_vu_{self._C}_{name}")(self._h, *args)

    def _adopt(self, handle: Any) -> None:
        if handle == ffi.NULL:
            raise VhostUserError(f"virtio-{self._C} engine: {os.strerror(ffi.errno or 12)}")
        self._h = handle

    def stop_all(self) -> None:
        self._call("stop")

    def running(self, unit: int) -> bool:
        return bool(self._call("running", unit))

    def vring_base(self, q: int) -> int:
        return int(self._call("vring_base", q))

    def set_call(self, q: int, fd: int) -> None:
        self._call("set_call", q, fd)

    @property
    def error_fd(self) -> int:
        return int(self._call("error_fd"))

    def queue_error(self, q: int) -> int:
        return int(self._call("queue_error", q))

    def stats(self) -> dict[str, int]:
        out: Any = ffi.new(f"struct iov_{self._C}_stats *")
        self._call("get_stats", out)
        return {name: int(getattr(out, name)) for name in self._STATS}

    def close(self) -> None:
        h, self._h = self._h, None
        if h is not None:
            getattr(lib, f"iov_vu_{self._C}_free")(h)


class BlkRingEngine(_RingEngine):
    """virtio-blk queues over ``lib.iov_vu_blk_*`` (one worker per queue)."""

    _C = "blk"
    _STATS = ("requests", "read_bytes", "write_bytes", "flushes", "ioerr", "unsupp")

    def __init__(
        self,
        memory: GuestMemory,
        backend: BlockBackend,
        options: BlkOptions,
        features: int,
        nqueues: int,
    ) -> None:
        super().__init__(memory)
        cfg: Any = ffi.new("struct iov_blk_config *")
        cfg.fd = backend.fd
        cfg.capacity = backend.size // SECTOR_SIZE
        cfg.blk_size = options.blk_size
        cfg.seg_max = options.seg_max or options.queue_size - 2
        cfg.size_max = options.size_max
        cfg.readonly = int(backend.readonly)
        cfg.flush = features >> VIRTIO_BLK_F_FLUSH & 1
        cfg.discard = features >> VIRTIO_BLK_F_DISCARD & 1
        cfg.write_zeroes = features >> VIRTIO_BLK_F_WRITE_ZEROES & 1
        cfg.max_discard_sectors = cfg.max_write_zeroes_sectors = MAX_DISCARD_SECTORS
        cfg.max_discard_seg = cfg.max_write_zeroes_seg = MAX_DISCARD_SEG
        ffi.memmove(cfg.serial, options.serial, len(options.serial))
        self._adopt(lib.iov_vu_blk_new(self._mem.ptr, cfg, nqueues))
        self.nqueues = nqueues

    def unit_of(self, q: int) -> int:
        return q

    def queues_of(self, unit: int) -> list[int]:
        return [unit]

    def setup_queue(
        self,
        q: int,
        size: int,
        gpas: tuple[int, int, int],
        flags: int,
        kick: int,
        call: int,
        base: int,
        inflight: tuple[int, int] | None,
    ) -> None:
        ptr, length = inflight if inflight is not None else (0, 0)
        ret = lib.iov_vu_blk_setup_queue(
            self._h, q, size, *gpas, flags, kick, call, base, ffi.cast("void *", ptr), length
        )
        if ret < 0:
            raise _setup_error(q, ret)
        if ret:
            log.info("virtio-blk ring %d: resubmitting %d requests left in flight", q, ret)

    def start(self, unit: int) -> None:
        ret = lib.iov_vu_blk_start_queue(self._h, unit)
        if ret < 0:
            raise VhostUserError(f"ring {unit}: cannot start its worker ({os.strerror(-ret)})")


class NetRingEngine(_RingEngine):
    """virtio-net queue pairs over ``lib.iov_vu_net_*`` (one worker per pair)."""

    _C = "net"
    _STATS = (
        "rx_packets",
        "rx_bytes",
        "tx_packets",
        "tx_bytes",
        "tx_errors",
        "rx_dropped_nobuf_or_short",
    )

    def __init__(
        self, memory: GuestMemory, backend: NetBackend, features: int, npairs: int
    ) -> None:
        super().__init__(memory)
        cfg: Any = ffi.new("struct iov_net_config *")
        cfg.hdr_len = VNET_HDR_LEN
        cfg.mrg_rxbuf = features >> VIRTIO_NET_F_MRG_RXBUF & 1
        self._adopt(lib.iov_vu_net_new(self._mem.ptr, cfg, npairs))
        self.backend = backend
        self.npairs = npairs

    def unit_of(self, q: int) -> int:
        return q // 2

    def queues_of(self, unit: int) -> list[int]:
        return [2 * unit, 2 * unit + 1]

    def setup_queue(
        self,
        q: int,
        size: int,
        gpas: tuple[int, int, int],
        flags: int,
        kick: int,
        call: int,
        base: int,
        inflight: tuple[int, int] | None,
    ) -> None:
        ret = lib.iov_vu_net_setup_queue(self._h, q, size, *gpas, flags, kick, call, base)
        if ret < 0:
            raise _setup_error(q, ret)

    def start(self, unit: int) -> None:
        ret = lib.iov_vu_net_set_backend(self._h, unit, self.backend.fds[unit])
        if ret == 0:
            ret = lib.iov_vu_net_start_pair(self._h, unit)
        if ret < 0:
            raise VhostUserError(f"queue pair {unit}: cannot start ({os.strerror(-ret)})")


# ---- the devices ----------------------------------------------------------------------


class BackendDevice(Protocol):
    """What a vhost-user back-end serves: its features, config space and engine."""

    name: str
    num_queues: int  # virtqueues
    queue_num: int  # GET_QUEUE_NUM's answer

    def features(self) -> int: ...
    def protocol_features(self) -> int: ...
    def config(self) -> bytes: ...
    def set_features(self, features: int) -> None: ...
    def new_engine(self, memory: GuestMemory, features: int) -> RingEngine: ...
    def set_active_units(self, units: int) -> None: ...


# Ring features both back-ends offer (packed rings are not served here).
_RING_FEATURES = (
    1 << VIRTIO_F_VERSION_1
    | 1 << VIRTIO_F_INDIRECT_DESC
    | 1 << VIRTIO_F_EVENT_IDX
    | 1 << VIRTIO_F_IN_ORDER
)
_PROTOCOL_BASE = 1 << ProtocolFeature.MQ | 1 << ProtocolFeature.REPLY_ACK


class VhostUserBlkDevice:
    """virtio-blk over a block backend (a raw file), as vhost-user serves it."""

    name = "virtio-blk"

    def __init__(self, backend: BlockBackend, options: BlkOptions | None = None) -> None:
        self.options = dataclasses.replace(options or BlkOptions(), packed=False)
        self.backend = backend
        self._model = VirtioBlk(backend, self.options)  # features and config space
        self.num_queues = self.queue_num = self.options.num_queues

    def features(self) -> int:
        offered = self._model.device_features() & ~(1 << VIRTIO_F_RING_PACKED)
        return offered | 1 << VHOST_USER_F_PROTOCOL_FEATURES

    def protocol_features(self) -> int:
        return _PROTOCOL_BASE | 1 << ProtocolFeature.CONFIG | 1 << ProtocolFeature.INFLIGHT_SHMFD

    def config(self) -> bytes:
        return self._model.config

    def set_features(self, features: int) -> None:
        """Nothing to tell the file; FLUSH and friends go to the engine config."""

    def new_engine(self, memory: GuestMemory, features: int) -> RingEngine:
        return BlkRingEngine(memory, self.backend, self.options, features, self.num_queues)

    def set_active_units(self, units: int) -> None:
        """Every queue reads the same file: nothing to switch."""


class VhostUserNetDevice:
    """virtio-net over a net backend (a tap), as vhost-user serves it. The front-end
    keeps the config space (MAC, status) and the control queue; we serve rx/tx pairs."""

    name = "virtio-net"

    def __init__(self, backend: NetBackend, pairs: int = 1) -> None:
        if not 1 <= pairs <= min(len(backend.fds), lib.IOV_NET_MAX_PAIRS):
            raise ValueError(f"pairs must be 1-{len(backend.fds)} (the backend's queues)")
        self.backend = backend
        self.pairs = pairs
        self.num_queues = 2 * pairs
        self.queue_num = pairs  # DPDK's reading of GET_QUEUE_NUM for net: queue pairs

    def features(self) -> int:
        supported = self.backend.supported_offloads()
        features = (
            _RING_FEATURES
            | 1 << VIRTIO_NET_F_MRG_RXBUF
            | 1 << VIRTIO_NET_F_CSUM
            | 1 << VIRTIO_NET_F_HOST_TSO4
            | 1 << VIRTIO_NET_F_HOST_TSO6
            | 1 << VIRTIO_NET_F_HOST_ECN
            | 1 << VHOST_USER_F_PROTOCOL_FEATURES
        )
        if supported & TUN_F_CSUM:
            features |= 1 << VIRTIO_NET_F_GUEST_CSUM
            if supported & TUN_F_TSO4:
                features |= 1 << VIRTIO_NET_F_GUEST_TSO4
            if supported & TUN_F_TSO6:
                features |= 1 << VIRTIO_NET_F_GUEST_TSO6
            if supported & TUN_F_TSO_ECN and supported & (TUN_F_TSO4 | TUN_F_TSO6):
                features |= 1 << VIRTIO_NET_F_GUEST_ECN
        if self.pairs > 1:
            features |= 1 << VIRTIO_NET_F_MQ
        return features

    def protocol_features(self) -> int:
        return _PROTOCOL_BASE

    def config(self) -> bytes:
        raise VhostUserError("virtio-net: the config space is the front-end's")

    def set_features(self, features: int) -> None:
        if not features >> VIRTIO_F_VERSION_1 & 1 and not features >> VIRTIO_NET_F_MRG_RXBUF & 1:
            # The engine and the tap speak the 12-byte header; legacy drivers use 10.
            raise VhostUserError("virtio-net: VIRTIO_F_VERSION_1 (or MRG_RXBUF) is required")
        offloads = 0
        if features >> VIRTIO_NET_F_GUEST_CSUM & 1:
            offloads |= TUN_F_CSUM
            for bit, flag in (
                (VIRTIO_NET_F_GUEST_TSO4, TUN_F_TSO4),
                (VIRTIO_NET_F_GUEST_TSO6, TUN_F_TSO6),
                (VIRTIO_NET_F_GUEST_ECN, TUN_F_TSO_ECN),
            ):
                if features >> bit & 1:
                    offloads |= flag
        self.backend.set_offloads(offloads)

    def new_engine(self, memory: GuestMemory, features: int) -> RingEngine:
        return NetRingEngine(memory, self.backend, features, self.pairs)

    def set_active_units(self, units: int) -> None:
        self.backend.set_active_pairs(max(1, units))


# ---- one front-end connection ---------------------------------------------------------


@dataclass
class _Vring:
    num: int = 0
    addr: VringAddr | None = None
    base: int = 0
    kick: int = -1
    call: int = -1
    err: int = -1
    enabled: bool = False
    started: bool = False  # handed to the engine
    retired_calls: list[int] = field(default_factory=list)  # a worker may still hold one

    def close(self) -> None:
        for fd in (self.kick, self.call, self.err, *self.retired_calls):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.kick = self.call = self.err = -1
        self.retired_calls = []


# Requests answered with a message of their own (no REPLY_ACK for them).
_HAS_REPLY = {
    Request.GET_FEATURES,
    Request.GET_PROTOCOL_FEATURES,
    Request.GET_QUEUE_NUM,
    Request.GET_VRING_BASE,
    Request.GET_CONFIG,
    Request.GET_INFLIGHT_FD,
}


class VhostUserConnection:
    """The back-end state of one front-end connection (memory, rings, the engine).

    :meth:`handle` takes one message and returns the reply (or None); it raises
    VhostUserError (refused, or VhostUserProtocolError: malformed). The caller owns the
    message's fds; handlers take the ones they keep out of ``msg.fds``.
    """

    def __init__(self, device: BackendDevice) -> None:
        self.device = device
        self.features = 0
        self.protocol_features = 0
        self.owner = False
        self.memory: MappedMemory | None = None
        self.engine: RingEngine | None = None
        self.rings = [_Vring() for _ in range(device.num_queues)]
        self.inflight: mmap.mmap | None = None
        self._inflight_pin: Any = None
        self._inflight_queue_size = 0
        self.refused = GuestAccessLog(f"vhost-user {device.name}", log, what="refused messages")

    def has_protocol(self, feature: ProtocolFeature) -> bool:
        return bool(self.protocol_features >> feature & 1)

    # -- dispatch --------------------------------------------------------------------

    def handle(self, msg: Message) -> Message | None:
        try:
            request = Request(msg.request)
        except ValueError:
            raise VhostUserProtocolError(f"unknown request {msg.request}") from None
        handler: Callable[[Message], bytes | None] | None = getattr(
            self, f"_on_{request.name.lower()}", None
        )
        if handler is None:
            raise VhostUserProtocolError(f"{request.name} is not supported by this back-end")
        if msg.fds and request not in _TAKES_FDS:
            raise VhostUserProtocolError(f"{request.name} carries no file descriptors")
        payload = handler(msg)
        if request in _HAS_REPLY:
            assert payload is not None
            reply = Message(request, FLAG_VERSION | FLAG_REPLY, payload)
            if request == Request.GET_INFLIGHT_FD and self._inflight_fd_out >= 0:
                reply.fds = [self._inflight_fd_out]
                self._inflight_fd_out = -1
            return reply
        return None

    def _ring(self, index: int) -> _Vring:
        if not 0 <= index < len(self.rings):
            raise VhostUserProtocolError(f"ring {index} does not exist ({len(self.rings)} rings)")
        return self.rings[index]

    def _stopped_ring(self, index: int, what: str) -> _Vring:
        ring = self._ring(index)
        if ring.started:
            raise VhostUserError(f"{what}: ring {index} is running; stop it first")
        return ring

    # -- features --------------------------------------------------------------------

    def _on_get_features(self, msg: Message) -> bytes:
        _no_payload(msg)
        return U64.pack(self.device.features())

    def _on_set_features(self, msg: Message) -> None:
        features = msg.u64()
        unknown = features & ~self.device.features()
        if unknown:
            raise VhostUserError(f"SET_FEATURES: bits {unknown:#x} were not offered")
        if any(r.started for r in self.rings) and features != self.features:
            raise VhostUserError("SET_FEATURES: rings are running")
        self.device.set_features(features)
        self.features = features
        self._drop_engine()
        if not features >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
            # Without the extension rings start enabled (spec: "Ring states").
            for ring in self.rings:
                ring.enabled = True

    def _on_get_protocol_features(self, msg: Message) -> bytes:
        _no_payload(msg)
        return U64.pack(self.device.protocol_features())

    def _on_set_protocol_features(self, msg: Message) -> None:
        features = msg.u64()
        unknown = features & ~self.device.protocol_features()
        if unknown:
            raise VhostUserError(f"SET_PROTOCOL_FEATURES: bits {unknown:#x} were not offered")
        self.protocol_features = features

    def _on_get_queue_num(self, msg: Message) -> bytes:
        _no_payload(msg)
        return U64.pack(self.device.queue_num)

    def _on_set_owner(self, msg: Message) -> None:
        _no_payload(msg)
        self.owner = True

    def _on_reset_owner(self, msg: Message) -> None:
        _no_payload(msg)
        self.reset()

    def _on_reset_device(self, msg: Message) -> None:
        _no_payload(msg)
        self.reset()

    # -- memory ----------------------------------------------------------------------

    def _on_set_mem_table(self, msg: Message) -> None:
        table = decode_memory_table(msg.payload)
        if len(table) > MAX_MEM_REGIONS:
            raise VhostUserProtocolError("SET_MEM_TABLE: too many regions")
        fds, msg.fds = msg.fds, []
        try:
            memory = MappedMemory(table, fds)
        finally:
            for fd in fds:  # the mappings keep the memory; the fds are not needed
                with contextlib.suppress(OSError):
                    os.close(fd)
        # Running rings move to the new table: stop, remember where they are, restart.
        running = [q for q, r in enumerate(self.rings) if r.started]
        self._stop_rings(running)
        self._drop_engine()
        if self.memory is not None:
            self.memory.close()
        self.memory = memory
        for q in running:
            self._try_start(q)

    # -- rings -----------------------------------------------------------------------

    def _on_set_vring_num(self, msg: Message) -> None:
        index, num = msg.vring_state()
        ring = self._stopped_ring(index, "SET_VRING_NUM")
        if not 1 <= num <= MAX_RING_SIZE or num & (num - 1):
            raise VhostUserError(f"SET_VRING_NUM: {num} is not a power of two up to 32768")
        ring.num = num

    def _on_set_vring_addr(self, msg: Message) -> None:
        addr = VringAddr.decode(msg)
        ring = self._stopped_ring(addr.index, "SET_VRING_ADDR")
        if addr.flags:
            raise VhostUserError("SET_VRING_ADDR: dirty logging (VHOST_VRING_F_LOG) not offered")
        ring.addr = addr

    def _on_set_vring_base(self, msg: Message) -> None:
        index, base = msg.vring_state()
        ring = self._stopped_ring(index, "SET_VRING_BASE")
        if base > 0xFFFF:
            raise VhostUserError(f"SET_VRING_BASE: {base:#x} is not a split ring index")
        ring.base = base

    def _on_get_vring_base(self, msg: Message) -> bytes:
        index, _ = msg.vring_state()
        ring = self._ring(index)
        if ring.started:
            self._stop_rings([index])
        # The ring is stopped now; its kick fd is of no further use (spec: "Ring states").
        if ring.kick >= 0:
            os.close(ring.kick)
            ring.kick = -1
        return VRING_STATE.pack(index, ring.base)

    def _vring_fd(self, msg: Message, request: str) -> tuple[_Vring, int, int]:
        value = msg.u64()
        index = value & VRING_IDX_MASK
        if value & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
            raise VhostUserProtocolError(f"{request}: unknown bits in {value:#x}")
        ring = self._ring(index)
        if value & VRING_NOFD_MASK:
            if msg.fds:
                raise VhostUserProtocolError(f"{request}: 'no fd' set but an fd came")
            return ring, index, -1
        if len(msg.fds) != 1:
            raise VhostUserProtocolError(
                f"{request}: expected 1 file descriptor, got {len(msg.fds)}"
            )
        fd = msg.fds.pop()
        return ring, index, fd

    def _on_set_vring_kick(self, msg: Message) -> None:
        ring, index, fd = self._vring_fd(msg, "SET_VRING_KICK")
        if fd < 0:
            raise VhostUserError("SET_VRING_KICK: polling mode (no kick fd) is not supported")
        if ring.started:
            self._stop_rings([index])
        if ring.kick >= 0:
            os.close(ring.kick)
        ring.kick = fd
        if not self.features >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
            ring.enabled = True
        self._try_start(index)

    def _on_set_vring_call(self, msg: Message) -> None:
        ring, index, fd = self._vring_fd(msg, "SET_VRING_CALL")
        if ring.started and self.engine is not None:
            self.engine.set_call(index, fd)
            if ring.call >= 0:
                ring.retired_calls.append(ring.call)
        elif ring.call >= 0:
            os.close(ring.call)
        ring.call = fd

    def _on_set_vring_err(self, msg: Message) -> None:
        ring, _, fd = self._vring_fd(msg, "SET_VRING_ERR")
        if ring.err >= 0:
            os.close(ring.err)
        ring.err = fd

    def _on_set_vring_enable(self, msg: Message) -> None:
        index, enable = msg.vring_state()
        ring = self._ring(index)
        if enable > 1:
            raise VhostUserProtocolError(f"SET_VRING_ENABLE: {enable} is not 0 or 1")
        ring.enabled = bool(enable)
        if enable:
            self._try_start(index)
        elif ring.started:
            self._stop_rings([index])

    # -- config and inflight ---------------------------------------------------------

    def _on_get_config(self, msg: Message) -> bytes:
        access = ConfigAccess.decode(msg)
        if not self.has_protocol(ProtocolFeature.CONFIG):
            raise VhostUserProtocolError("GET_CONFIG without VHOST_USER_PROTOCOL_F_CONFIG")
        config = self.device.config()
        data = config[access.offset : access.offset + access.size]
        data += bytes(access.size - len(data))
        return ConfigAccess(access.offset, access.size, access.flags, data).encode()

    def _on_set_config(self, msg: Message) -> None:
        ConfigAccess.decode(msg)
        raise VhostUserError("SET_CONFIG: the config space is read-only (no CONFIG_WCE)")

    _inflight_fd_out = -1

    def _on_get_inflight_fd(self, msg: Message) -> bytes:
        desc = InflightDesc.decode(msg)
        self._check_inflight_request(desc)
        size = desc.num_queues * inflight_queue_bytes(desc.queue_size)
        fd = lib.iovirt_memfd_create(b"iovirt-vhost-user-inflight", 0)
        if fd < 0:
            raise VhostUserError(f"GET_INFLIGHT_FD: memfd_create: {os.strerror(-fd)}")
        try:
            os.ftruncate(fd, size)  # zero-filled: version 0, every queue uninitialised
            self._map_inflight(fd, size, 0, desc.queue_size)
        except BaseException:
            os.close(fd)
            raise
        self._inflight_fd_out = fd
        return InflightDesc(size, 0, desc.num_queues, desc.queue_size).encode()

    def _on_set_inflight_fd(self, msg: Message) -> None:
        desc = InflightDesc.decode(msg)
        if len(msg.fds) != 1:
            raise VhostUserProtocolError(f"SET_INFLIGHT_FD: expected 1 fd, got {len(msg.fds)}")
        self._check_inflight_request(desc)
        need = desc.num_queues * inflight_queue_bytes(desc.queue_size)
        if desc.mmap_size < need:
            raise VhostUserError(
                f"SET_INFLIGHT_FD: {desc.mmap_size} bytes for {desc.num_queues} queues of "
                f"{desc.queue_size} (need {need})"
            )
        fd = msg.fds.pop()
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or desc.mmap_offset + need > st.st_size:
                raise VhostUserProtocolError("SET_INFLIGHT_FD: the region is past its file's end")
            if desc.mmap_offset % PAGE_SIZE:
                raise VhostUserProtocolError("SET_INFLIGHT_FD: offset not page-aligned")
            self._map_inflight(fd, need, desc.mmap_offset, desc.queue_size)
        finally:
            os.close(fd)

    def _check_inflight_request(self, desc: InflightDesc) -> None:
        if not self.has_protocol(ProtocolFeature.INFLIGHT_SHMFD):
            raise VhostUserProtocolError("inflight fd without VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD")
        if not 1 <= desc.num_queues <= self.device.num_queues:
            raise VhostUserError(f"inflight: {desc.num_queues} queues (1-{self.device.num_queues})")
        if not 1 <= desc.queue_size <= MAX_RING_SIZE:
            raise VhostUserError(f"inflight: queue size {desc.queue_size}")
        if any(r.started for r in self.rings):
            raise VhostUserError("inflight: rings are running")

    def _map_inflight(self, fd: int, size: int, offset: int, queue_size: int) -> None:
        try:
            mapping = mmap.mmap(
                fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset
            )
        except (OSError, ValueError) as e:
            raise VhostUserError(f"inflight region: cannot map it ({e})") from e
        self._unmap_inflight()
        self.inflight = mapping
        self._inflight_pin = ffi.from_buffer(mapping)
        self._inflight_queue_size = queue_size

    def _unmap_inflight(self) -> None:
        if self._inflight_pin is not None:
            ffi.release(self._inflight_pin)
            self._inflight_pin = None
        if self.inflight is not None:
            self.inflight.close()
            self.inflight = None

    def _inflight_for(self, q: int) -> tuple[int, int] | None:
        if self.inflight is None:
            return None
        per_queue = inflight_queue_bytes(self._inflight_queue_size)
        if (q + 1) * per_queue > len(self.inflight):
            return None  # a queue the front-end did not ask to track
        base = int(ffi.cast("uintptr_t", self._inflight_pin))
        return base + q * per_queue, per_queue

    # -- starting and stopping rings -------------------------------------------------

    def _ready(self, ring: _Vring) -> bool:
        return ring.num > 0 and ring.addr is not None and ring.kick >= 0 and ring.enabled

    def _try_start(self, index: int) -> None:
        if self.memory is None:
            return
        engine = self.engine or self.device.new_engine(self.memory, self.features)
        self.engine = engine
        unit = engine.unit_of(index)
        queues = engine.queues_of(unit)
        rings = [self.rings[q] for q in queues]
        if any(r.started for r in rings) or not all(self._ready(r) for r in rings):
            return
        flags = QueueFlags(0)
        if self.features >> VIRTIO_F_EVENT_IDX & 1:
            flags |= QueueFlags.EVENT_IDX
        if self.features >> VIRTIO_F_INDIRECT_DESC & 1:
            flags |= QueueFlags.INDIRECT
        if self.features >> VIRTIO_F_IN_ORDER & 1:
            flags |= QueueFlags.IN_ORDER
        for q, ring in zip(queues, rings, strict=True):
            assert ring.addr is not None
            n = ring.num
            gpas = (
                self.memory.user_to_gpa(ring.addr.desc, _desc_bytes(n)),
                self.memory.user_to_gpa(ring.addr.avail, _avail_bytes(n)),
                self.memory.user_to_gpa(ring.addr.used, _used_bytes(n)),
            )
            engine.setup_queue(
                q, n, gpas, int(flags), ring.kick, ring.call, ring.base, self._inflight_for(q)
            )
        engine.start(unit)
        for ring in rings:
            ring.started = True
        self.device.set_active_units(self._running_units())

    def _running_units(self) -> int:
        if self.engine is None:
            return 0
        return len({self.engine.unit_of(q) for q, r in enumerate(self.rings) if r.started})

    def _stop_rings(self, indices: list[int]) -> None:
        """Stop the units holding these rings; every other running unit goes on."""
        engine = self.engine
        if engine is None or not indices:
            return
        units = {engine.unit_of(q) for q in indices}
        engine.stop_all()  # the engines stop all workers at once; restart the rest below
        for unit in units:
            for q in engine.queues_of(unit):
                ring = self.rings[q]
                if ring.started:
                    base = engine.vring_base(q)
                    ring.base = base if base >= 0 else ring.base
                    ring.started = False
                    for fd in ring.retired_calls:
                        os.close(fd)
                    ring.retired_calls = []
        for unit in sorted({engine.unit_of(q) for q, r in enumerate(self.rings) if r.started}):
            engine.start(unit)
        self.device.set_active_units(self._running_units())

    def _drop_engine(self) -> None:
        if self.engine is not None:
            self._stop_rings([q for q, r in enumerate(self.rings) if r.started])
            self.engine.close()
            self.engine = None

    # -- errors from the data path ---------------------------------------------------

    def on_engine_error(self) -> None:
        """The engine's error eventfd fired: tell the front-end through each broken ring's
        error eventfd (SET_VRING_ERR), as a vhost device does."""
        if self.engine is None:
            return
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.engine.error_fd)
        for q, ring in enumerate(self.rings):
            err = self.engine.queue_error(q) if ring.started else 0
            if err:
                self.refused(f"ring {q} broken by the driver: {os.strerror(-err)}")
                if ring.err >= 0:
                    with contextlib.suppress(OSError):
                        os.eventfd_write(ring.err, 1)

    def reset(self) -> None:
        self._drop_engine()
        for ring in self.rings:
            ring.close()
        self.rings = [_Vring() for _ in range(self.device.num_queues)]
        self.features = 0

    def close(self) -> None:
        """The front-end went away: stop everything and release what it gave us."""
        self.reset()
        self._unmap_inflight()
        if self._inflight_fd_out >= 0:
            os.close(self._inflight_fd_out)
            self._inflight_fd_out = -1
        if self.memory is not None:
            self.memory.close()
            self.memory = None


_TAKES_FDS = {
    Request.SET_MEM_TABLE,
    Request.SET_VRING_KICK,
    Request.SET_VRING_CALL,
    Request.SET_VRING_ERR,
    Request.SET_INFLIGHT_FD,
}


def _no_payload(msg: Message) -> None:
    # QEMU sends GET_* with an empty payload; a u64 of padding is tolerated.
    if len(msg.payload) not in (0, U64.size):
        raise VhostUserProtocolError(
            f"{request_name(msg.request)}: unexpected {len(msg.payload)}-byte payload"
        )


# ---- serving --------------------------------------------------------------------------


def serve_connection(
    sock: socket.socket, device: BackendDevice, stop_fd: int | None = None
) -> VhostUserConnection:
    """Serve one front-end until it disconnects, breaks the protocol, or ``stop_fd``
    becomes readable. Everything it set up is torn down before returning."""
    conn = VhostUserConnection(device)
    sock.setblocking(True)
    try:
        while True:
            watched = [sock.fileno()]
            if stop_fd is not None:
                watched.append(stop_fd)
            if conn.engine is not None:
                watched.append(conn.engine.error_fd)
            readable, _, _ = select.select(watched, [], [])
            if stop_fd is not None and stop_fd in readable:
                break
            if conn.engine is not None and conn.engine.error_fd in readable:
                conn.on_engine_error()
            if sock.fileno() not in readable:
                continue
            if not _serve_one(sock, conn):
                break
    finally:
        conn.close()
    return conn


def _serve_one(sock: socket.socket, conn: VhostUserConnection) -> bool:
    """Read and answer one message; False when the connection must end."""
    try:
        msg = read_message(sock)
    except VhostUserDisconnected:
        return False
    except VhostUserProtocolError as e:
        conn.refused(f"malformed message, disconnecting: {e}")
        return False
    except OSError as e:
        conn.refused(f"socket error, disconnecting: {e}")
        return False
    ack = msg.need_reply and conn.has_protocol(ProtocolFeature.REPLY_ACK)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s %s fds=%d", request_name(msg.request), msg.payload.hex(), len(msg.fds))
    try:
        reply = conn.handle(msg)
    except VhostUserError as e:
        if ack and msg.request not in _HAS_REPLY:
            conn.refused(f"{request_name(msg.request)} refused: {e}")
            return _send(sock, Message(msg.request, FLAG_VERSION | FLAG_REPLY, U64.pack(1)))
        conn.refused(f"{request_name(msg.request)} refused, disconnecting: {e}")
        return False
    finally:
        msg.close_fds()  # whatever a handler did not keep
    if reply is not None:
        ok = _send(sock, reply)
        reply.close_fds()
        return ok
    if ack:
        return _send(sock, Message(msg.request, FLAG_VERSION | FLAG_REPLY, U64.pack(0)))
    return True


def _send(sock: socket.socket, msg: Message) -> bool:
    try:
        send_message(sock, msg)
    except OSError:
        return False
    return True


class VhostUserServer:
    """Listens on a UNIX socket and serves front-ends one at a time, for ever (or until
    :meth:`stop`). A front-end that goes away (or is thrown out) leaves the device ready
    for the next one: restarting either side is how vhost-user recovers."""

    def __init__(self, path: str, device: BackendDevice) -> None:
        self.path = path
        self.device = device
        what = one_line(f"vhost-user socket {path}")
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)  # a stale socket from an earlier run
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.bind(path)
            self.sock.listen(1)
        except OSError as e:
            self.sock.close()
            raise ResourceError(what, f"cannot listen: {e.strerror or e}") from e
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.connections = 0

    def serve_forever(self, max_connections: int | None = None) -> None:
        while max_connections is None or self.connections < max_connections:
            readable, _, _ = select.select([self.sock.fileno(), self._stop_r], [], [])
            if self._stop_r in readable:
                return
            try:
                conn, _ = self.sock.accept()
            except OSError as e:
                log.warning("vhost-user %s: accept failed: %s", self.path, e)
                continue
            self.connections += 1
            log.info("vhost-user %s: front-end connected", self.path)
            with conn:
                serve_connection(conn, self.device, self._stop_r)
            log.info("vhost-user %s: front-end gone", self.path)

    def stop(self) -> None:
        """Make :meth:`serve_forever` return (thread- and signal-safe)."""
        with contextlib.suppress(OSError):
            os.write(self._stop_w, b"x")

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        for fd in (self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def install_signal_handlers(self) -> None:
        """SIGINT/SIGTERM stop serving (main thread only)."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stop())

    def __enter__(self) -> VhostUserServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve_in_thread(server: VhostUserServer) -> threading.Thread:
    """Run ``server.serve_forever`` on a daemon thread (tests, benchmarks)."""
    thread = threading.Thread(target=server.serve_forever, name="vhost-user", daemon=True)
    thread.start()
    return thread
