"""Python handles on the C data path: the virtqueue engine, the virtio-blk and virtio-net workers.

- :class:`MemoryTable` turns a :class:`~iovirt.memory.GuestMemory` into the C
  ``struct iov_mem`` every engine call checks guest addresses against;
- :class:`CVirtQueue` implements :class:`~iovirt.virtio.queue.VirtQueue` over
  ``csrc/virtqueue.c`` (the same tests run it and the Python reference);
- :class:`BlkEngine` owns a ``struct iov_blk``: per-queue C worker threads that serve
  virtio-blk requests straight between guest memory and the backend fd;
- :class:`NetEngine` owns a ``struct iov_net``: a C worker thread per virtio-net queue pair
  that moves packets between guest buffers and a packet fd (a tap), with the receive
  filter :class:`NetFilter`.

The C side reports failures as negative errno values; here they become
:class:`~iovirt.virtio.queue.VirtQueueError` (a broken ring), :class:`BlkEngineError` or
:class:`NetEngineError`.
"""

from __future__ import annotations

import errno as errno_mod
import os
from dataclasses import dataclass, field
from typing import Any

from iovirt._native import ffi, lib
from iovirt.errors import IovirtError
from iovirt.memory import GuestMemory
from iovirt.virtio.queue import DescriptorChain, VirtQueueError

# Largest ring either layout allows (virtio 1.2, 2.7 and 2.8: Queue Size <= 32768).
MAX_QUEUE_SIZE = 32768
BLK_ID_BYTES = 20  # VIRTIO_BLK_ID_BYTES; matches IOV_BLK_ID_BYTES


class BlkEngineError(IovirtError):
    """The virtio-blk data path refused an operation. ``errno`` is the C side's code."""

    def __init__(self, op: str, errno: int, detail: str = "") -> None:
        self.op = op
        self.errno = errno
        msg = f"virtio-blk engine: {op} failed: {os.strerror(errno)}"
        super().__init__(f"{msg} ({detail})" if detail else msg)


class MemoryTable:
    """The guest RAM table in C form (``.ptr`` is a ``struct iov_mem *``).

    Guest RAM never moves while a VM runs, so the table is built once; it keeps
    ``memory`` referenced so the mappings outlive every engine that uses the table.
    """

    def __init__(self, memory: GuestMemory) -> None:
        if not memory.regions:
            raise IovirtError("guest memory is closed: no regions to hand to the C engine")
        if len(memory.regions) > lib.IOV_MAX_MEM_REGIONS:
            raise IovirtError(
                f"guest memory has {len(memory.regions)} regions; "
                f"the C engine takes at most {lib.IOV_MAX_MEM_REGIONS}"
            )
        self.memory = memory
        self.ptr: Any = ffi.new("struct iov_mem *")
        self.ptr.nregions = len(memory.regions)
        for i, region in enumerate(memory.regions):
            entry = self.ptr.regions[i]
            entry.gpa = region.gpa
            entry.size = region.size
            entry.host = ffi.cast("uint8_t *", region.host_addr)


def _vq_error(code: int, detail: str) -> VirtQueueError:
    return VirtQueueError(-code if code < 0 else code, detail)


class CVirtQueue:
    """A virtqueue served by the C engine (see :class:`~iovirt.virtio.queue.VirtQueue`).

    ``flags`` are :class:`~iovirt.virtio.queue.QueueFlags`; ``desc``/``driver``/``device``
    are the three ring areas' guest addresses. Raises VirtQueueError if the layout is bad.
    """

    def __init__(
        self, memory: GuestMemory, size: int, flags: int, desc: int, driver: int, device: int
    ) -> None:
        self._mem = MemoryTable(memory)
        self._vq: Any = ffi.new("struct iov_vq *")
        self._chain: Any = ffi.new("struct iov_chain *")
        if not 1 <= size <= MAX_QUEUE_SIZE:
            raise VirtQueueError(errno_mod.EINVAL, f"queue size {size} out of range")
        if not all(0 <= a < 1 << 64 for a in (desc, driver, device)) or not 0 <= flags < 1 << 32:
            raise VirtQueueError(errno_mod.EINVAL, "ring address or flags out of range")
        ret = lib.iov_vq_setup(self._vq, self._mem.ptr, size, flags, desc, driver, device)
        if ret < 0:
            raise _vq_error(
                ret, f"ring layout size={size} desc={desc:#x} driver={driver:#x} device={device:#x}"
            )

    @property
    def broken(self) -> bool:
        return bool(self._vq.broken)

    @property
    def error(self) -> int:
        """The errno (positive) that broke the queue, or 0."""
        return -int(self._vq.error)

    @property
    def size(self) -> int:
        return int(self._vq.size)

    @property
    def last_avail_idx(self) -> int:
        return int(self._vq.last_avail_idx)

    @property
    def used_idx(self) -> int:
        return int(self._vq.used_idx)

    @property
    def stats(self) -> dict[str, int]:
        s = self._vq.stats
        return {
            "popped": int(s.popped),
            "used": int(s.used),
            "notifications": int(s.notifications),
            "suppressed": int(s.suppressed),
        }

    def pop_descriptor_chain(self) -> DescriptorChain | None:
        ret = lib.iov_vq_pop(self._vq, self._mem.ptr, self._chain)
        if ret < 0:
            raise _vq_error(ret, "while popping a descriptor chain")
        if ret == 0:
            return None
        c = self._chain
        nout, nin = int(c.nout), int(c.nin)
        readable = [(int(c.gpa[i]), int(c.iov[i].iov_len)) for i in range(nout)]
        writable = [(int(c.gpa[i]), int(c.iov[i].iov_len)) for i in range(nout, nout + nin)]
        return DescriptorChain(int(c.head), int(c.ndescs), readable, writable)

    def add_used(self, head: int, ndescs: int, length: int) -> None:
        lib.iov_vq_add_used(self._vq, head & 0xFFFF, ndescs & 0xFFFF, length & 0xFFFF_FFFF)

    def flush_used(self) -> None:
        lib.iov_vq_flush_used(self._vq)

    def needs_notification(self) -> bool:
        return bool(lib.iov_vq_needs_notification(self._vq))

    def enable_notification(self) -> bool:
        return bool(lib.iov_vq_enable_notification(self._vq))

    def disable_notification(self) -> None:
        lib.iov_vq_disable_notification(self._vq)


@dataclass
class BlkEngineConfig:
    """Mirror of ``struct iov_blk_config`` (csrc/blk.h)."""

    fd: int
    capacity: int  # 512-byte sectors
    blk_size: int = 512
    seg_max: int = 0  # 0: no limit
    size_max: int = 0  # 0: no limit
    readonly: bool = False
    flush: bool = True  # VIRTIO_BLK_F_FLUSH negotiated (else every write is fdatasync'ed)
    discard: bool = False
    write_zeroes: bool = False
    max_discard_sectors: int = 0
    max_discard_seg: int = 0
    max_write_zeroes_sectors: int = 0
    max_write_zeroes_seg: int = 0
    serial: bytes = b""


class BlkEngine:
    """The C virtio-blk data path for one device activation.

    Lifecycle: ``setup_queue`` each enabled queue, then ``start_queue`` (a worker thread
    per queue) or, in tests, ``process_queue`` on the caller's thread. ``close`` stops the
    workers and frees the C state; the backend fd and the kick/call fds stay the caller's.
    """

    def __init__(self, memory: GuestMemory, config: BlkEngineConfig, nqueues: int) -> None:
        if len(config.serial) > BLK_ID_BYTES:
            raise ValueError(f"serial is longer than {BLK_ID_BYTES} bytes")
        if not 1 <= nqueues <= lib.IOV_BLK_MAX_QUEUES:
            raise ValueError(f"nqueues {nqueues} not in 1..{lib.IOV_BLK_MAX_QUEUES}")
        self._mem = MemoryTable(memory)
        self.nqueues = nqueues
        cfg = self._c_config(config)
        blk = lib.iov_blk_new(self._mem.ptr, cfg, nqueues)
        if blk == ffi.NULL:
            raise BlkEngineError("iov_blk_new", ffi.errno or errno_mod.ENOMEM, repr(config))
        self._blk: Any = blk

    @staticmethod
    def _c_config(config: BlkEngineConfig) -> Any:
        cfg: Any = ffi.new("struct iov_blk_config *")
        try:
            BlkEngine._fill_config(cfg, config)
        except (OverflowError, TypeError) as e:
            raise BlkEngineError("configuration", errno_mod.EINVAL, str(e)) from e
        return cfg

    @staticmethod
    def _fill_config(cfg: Any, config: BlkEngineConfig) -> None:
        cfg.fd = config.fd
        cfg.capacity = config.capacity
        cfg.blk_size = config.blk_size
        cfg.seg_max = config.seg_max
        cfg.size_max = config.size_max
        cfg.readonly = int(config.readonly)
        cfg.flush = int(config.flush)
        cfg.discard = int(config.discard)
        cfg.write_zeroes = int(config.write_zeroes)
        cfg.max_discard_sectors = config.max_discard_sectors
        cfg.max_discard_seg = config.max_discard_seg
        cfg.max_write_zeroes_sectors = config.max_write_zeroes_sectors
        cfg.max_write_zeroes_seg = config.max_write_zeroes_seg
        ffi.memmove(cfg.serial, config.serial, len(config.serial))

    def _handle(self) -> Any:
        if self._blk is None:
            raise BlkEngineError("use after close", errno_mod.EBADF)
        return self._blk

    def _check_queue(self, q: int) -> None:
        if not 0 <= q < self.nqueues:
            raise ValueError(f"queue {q} not in 0..{self.nqueues - 1}")

    def setup_queue(
        self,
        q: int,
        size: int,
        flags: int,
        desc: int,
        driver: int,
        device: int,
        kick_fd: int,
        call_fd: int,
    ) -> None:
        """Check and install queue ``q``'s rings; VirtQueueError if the layout is bad."""
        blk = self._handle()
        self._check_queue(q)
        if not 1 <= size <= MAX_QUEUE_SIZE:
            raise VirtQueueError(errno_mod.EINVAL, f"queue {q}: size {size} out of range")
        if not all(0 <= a < 1 << 64 for a in (desc, driver, device)):
            raise VirtQueueError(errno_mod.EINVAL, f"queue {q}: ring address out of range")
        ret = lib.iov_blk_setup_queue(
            blk, q, size, int(flags), desc, driver, device, kick_fd, call_fd
        )
        if ret == -errno_mod.EBUSY:
            raise BlkEngineError(f"setup of running queue {q}", errno_mod.EBUSY)
        if ret < 0:
            raise _vq_error(
                ret,
                f"queue {q}: ring layout size={size} desc={desc:#x} "
                f"driver={driver:#x} device={device:#x}",
            )

    def start_queue(self, q: int) -> None:
        """Start queue ``q``'s worker thread (after :meth:`setup_queue`)."""
        blk = self._handle()
        self._check_queue(q)
        ret = lib.iov_blk_start_queue(blk, q)
        if ret < 0:
            raise BlkEngineError(f"start of queue {q}", -ret)

    def process_queue(self, q: int) -> int:
        """Serve queue ``q`` once on this thread; the number of completed requests.
        Raises VirtQueueError if the driver broke the queue."""
        blk = self._handle()
        self._check_queue(q)
        ret = int(lib.iov_blk_process_queue(blk, q))
        if ret == -errno_mod.EBUSY:
            raise BlkEngineError(f"processing queue {q} (a worker runs it)", errno_mod.EBUSY)
        if ret < 0 and lib.iov_blk_queue_error(blk, q) == 0:
            raise BlkEngineError(f"processing queue {q}", -ret)  # e.g. never set up
        if ret < 0:
            raise _vq_error(ret, f"virtio-blk queue {q}")
        return ret

    def stop(self) -> None:
        """Stop and join every worker (idempotent)."""
        if self._blk is not None:
            lib.iov_blk_stop(self._blk)

    def close(self) -> None:
        """Stop the workers and free the C state (idempotent)."""
        blk, self._blk = self._blk, None
        if blk is not None:
            lib.iov_blk_free(blk)

    @property
    def error_fd(self) -> int:
        """An eventfd that becomes readable when any queue breaks."""
        return int(lib.iov_blk_error_fd(self._handle()))

    def queue_error(self, q: int) -> int:
        """0 if queue ``q`` is healthy, else the negative errno that broke it."""
        self._check_queue(q)
        return int(lib.iov_blk_queue_error(self._handle(), q))

    def stats(self) -> dict[str, int]:
        """Counters summed over every queue."""
        out: Any = ffi.new("struct iov_blk_stats *")
        lib.iov_blk_get_stats(self._handle(), out)
        return {
            name: int(getattr(out, name))
            for name in (
                "requests",
                "read_bytes",
                "write_bytes",
                "flushes",
                "discards",
                "write_zeroes",
                "ioerr",
                "unsupp",
                "notifications",
            )
        }

    def __enter__(self) -> BlkEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # A forgotten close must not leave threads reading freed memory.
        blk = getattr(self, "_blk", None)
        if blk is not None:
            self.close()


# ---- virtio-net -------------------------------------------------------------------------

ETH_ALEN = 6
NET_MAX_FILTER_MACS = 64  # matches IOV_NET_MAX_FILTER_MACS
NET_STATS = (
    "rx_packets",
    "rx_bytes",
    "rx_dropped_filter",
    "rx_dropped_nobuf_or_short",
    "tx_packets",
    "tx_bytes",
    "tx_errors",
    "notifications",
)


class NetEngineError(IovirtError):
    """The virtio-net data path refused an operation. ``errno`` is the C side's code."""

    def __init__(self, op: str, errno: int, detail: str = "") -> None:
        self.op = op
        self.errno = errno
        msg = f"virtio-net engine: {op} failed: {os.strerror(errno)}"
        super().__init__(f"{msg} ({detail})" if detail else msg)


@dataclass
class NetEngineConfig:
    """Mirror of ``struct iov_net_config`` (csrc/net.h)."""

    hdr_len: int = 12  # struct virtio_net_hdr_v1, on the guest side and on the fd
    mrg_rxbuf: bool = True  # VIRTIO_NET_F_MRG_RXBUF negotiated


@dataclass
class NetFilter:
    """The receive filter (virtio 1.2, 5.1.6.5.1-2: VIRTIO_NET_CTRL_RX and _MAC).

    A frame is delivered if ``promisc``; a broadcast one unless ``nobcast``; another
    multicast one unless ``nomulti``, if ``allmulti`` or its address is in ``multicast``;
    a unicast one unless ``nouni``, if ``alluni`` or its address is in ``unicast`` (put the
    device's own MAC there). The default is what the device starts with: promiscuous.
    """

    promisc: bool = True
    allmulti: bool = False
    alluni: bool = False
    nomulti: bool = False
    nouni: bool = False
    nobcast: bool = False
    unicast: list[bytes] = field(default_factory=list)  # 6-byte MACs, at most 64
    multicast: list[bytes] = field(default_factory=list)  # 6-byte MACs, at most 64


class NetEngine:
    """The C virtio-net data path for one device activation.

    Queue ``2i`` is pair ``i``'s receiveq, ``2i + 1`` its transmitq. Lifecycle:
    ``setup_queue`` both queues of a pair and ``set_backend`` its packet fd, then
    ``start_pair`` (a worker thread per pair) or, in tests, ``process_pair`` on the
    caller's thread. ``close`` stops the workers and frees the C state; the packet fds
    and the kick/call fds stay the caller's (the engine sets O_NONBLOCK on packet fds).
    Counters count frame bytes, without the virtio-net header.
    """

    def __init__(self, memory: GuestMemory, config: NetEngineConfig, npairs: int) -> None:
        if not 1 <= npairs <= lib.IOV_NET_MAX_PAIRS:
            raise ValueError(f"npairs {npairs} not in 1..{lib.IOV_NET_MAX_PAIRS}")
        self._mem = MemoryTable(memory)
        self.npairs = npairs
        cfg: Any = ffi.new("struct iov_net_config *")
        try:
            cfg.hdr_len = config.hdr_len
        except (OverflowError, TypeError) as e:
            raise NetEngineError("configuration", errno_mod.EINVAL, str(e)) from e
        cfg.mrg_rxbuf = int(config.mrg_rxbuf)
        net = lib.iov_net_new(self._mem.ptr, cfg, npairs)
        if net == ffi.NULL:
            raise NetEngineError("iov_net_new", ffi.errno or errno_mod.ENOMEM, repr(config))
        self._net: Any = net

    def _handle(self) -> Any:
        if self._net is None:
            raise NetEngineError("use after close", errno_mod.EBADF)
        return self._net

    def _check_pair(self, pair: int) -> None:
        if not 0 <= pair < self.npairs:
            raise ValueError(f"pair {pair} not in 0..{self.npairs - 1}")

    def _check_queue(self, q: int) -> None:
        if not 0 <= q < 2 * self.npairs:
            raise ValueError(f"queue {q} not in 0..{2 * self.npairs - 1}")

    def setup_queue(
        self,
        q: int,
        size: int,
        flags: int,
        desc: int,
        driver: int,
        device: int,
        kick_fd: int,
        call_fd: int,
    ) -> None:
        """Check and install queue ``q``'s rings; VirtQueueError if the layout is bad."""
        net = self._handle()
        self._check_queue(q)
        if not 1 <= size <= MAX_QUEUE_SIZE:
            raise VirtQueueError(errno_mod.EINVAL, f"queue {q}: size {size} out of range")
        if not all(0 <= a < 1 << 64 for a in (desc, driver, device)) or not 0 <= flags < 1 << 32:
            raise VirtQueueError(errno_mod.EINVAL, f"queue {q}: ring address or flags out of range")
        ret = lib.iov_net_setup_queue(
            net, q, size, int(flags), desc, driver, device, kick_fd, call_fd
        )
        if ret == -errno_mod.EBUSY:
            raise NetEngineError(f"setup of queue {q} of a running pair", errno_mod.EBUSY)
        if ret < 0:
            raise _vq_error(
                ret,
                f"queue {q}: ring layout size={size} desc={desc:#x} "
                f"driver={driver:#x} device={device:#x}",
            )

    def set_backend(self, pair: int, fd: int) -> None:
        """Pair ``pair`` reads and writes packets on ``fd`` (made non-blocking)."""
        net = self._handle()
        self._check_pair(pair)
        ret = lib.iov_net_set_backend(net, pair, fd)
        if ret < 0:
            raise NetEngineError(f"backend of pair {pair}", -ret, f"fd {fd}")

    def start_pair(self, pair: int) -> None:
        """Start pair ``pair``'s worker thread (both queues set up, backend set)."""
        net = self._handle()
        self._check_pair(pair)
        ret = lib.iov_net_start_pair(net, pair)
        if ret < 0:
            raise NetEngineError(f"start of pair {pair}", -ret)

    def process_pair(self, pair: int) -> int:
        """Serve pair ``pair`` once on this thread: transmit what the guest queued, then
        receive what the fd holds while the guest has buffers. The number of packets moved.
        Raises VirtQueueError if the driver broke one of the pair's queues."""
        net = self._handle()
        self._check_pair(pair)
        ret = int(lib.iov_net_process_pair(net, pair))
        if ret == -errno_mod.EBUSY:
            raise NetEngineError(f"processing pair {pair} (a worker runs it)", errno_mod.EBUSY)
        broken = any(lib.iov_net_queue_error(net, q) for q in (2 * pair, 2 * pair + 1))
        if ret < 0 and not broken:
            raise NetEngineError(f"processing pair {pair}", -ret)  # e.g. never set up
        if ret < 0:
            raise _vq_error(ret, f"virtio-net pair {pair}")
        return ret

    def set_filter(self, flt: NetFilter) -> None:
        """Replace the receive filter (takes effect for the next packet each worker reads)."""
        for name, macs in (("unicast", flt.unicast), ("multicast", flt.multicast)):
            if len(macs) > NET_MAX_FILTER_MACS:
                raise ValueError(f"{len(macs)} {name} MACs; the filter takes at most 64")
            for mac in macs:
                if len(mac) != ETH_ALEN:
                    raise ValueError(f"{name} MAC {mac.hex(':')} is not {ETH_ALEN} bytes")
        c: Any = ffi.new("struct iov_net_filter *")
        c.promisc = int(flt.promisc)
        c.allmulti = int(flt.allmulti)
        c.alluni = int(flt.alluni)
        c.nomulti = int(flt.nomulti)
        c.nouni = int(flt.nouni)
        c.nobcast = int(flt.nobcast)
        c.n_unicast = len(flt.unicast)
        c.n_multicast = len(flt.multicast)
        for i, mac in enumerate(flt.unicast):
            ffi.memmove(c.unicast[i], mac, ETH_ALEN)
        for i, mac in enumerate(flt.multicast):
            ffi.memmove(c.multicast[i], mac, ETH_ALEN)
        lib.iov_net_set_filter(self._handle(), c)

    def stop(self) -> None:
        """Stop and join every worker (idempotent)."""
        if self._net is not None:
            lib.iov_net_stop(self._net)

    def close(self) -> None:
        """Stop the workers and free the C state (idempotent)."""
        net, self._net = self._net, None
        if net is not None:
            lib.iov_net_free(net)

    @property
    def error_fd(self) -> int:
        """An eventfd that becomes readable when any queue breaks."""
        return int(lib.iov_net_error_fd(self._handle()))

    def queue_error(self, q: int) -> int:
        """0 if queue ``q`` is healthy, else the negative errno that broke it."""
        self._check_queue(q)
        return int(lib.iov_net_queue_error(self._handle(), q))

    def stats(self) -> dict[str, int]:
        """Counters summed over every pair."""
        out: Any = ffi.new("struct iov_net_stats *")
        lib.iov_net_get_stats(self._handle(), out)
        return {name: int(getattr(out, name)) for name in NET_STATS}

    def __enter__(self) -> NetEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # A forgotten close must not leave threads reading freed memory.
        net = getattr(self, "_net", None)
        if net is not None:
            self.close()
