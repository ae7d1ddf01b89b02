"""Fuzz targets of virtio-blk and virtio-net behind the virtio-pci and virtio-mmio transports.

The virtio data path normally runs in C worker threads woken by kick eventfds. Here the
engines' ``start_*`` only record the queue, and the harness serves a queue on the calling
thread (``process_queue`` / ``process_pair``) right after the guest access that kicked it,
then runs the simulated host I/O loop: every input replays identically.
"""

from __future__ import annotations

import contextlib
import os
import select
import struct
from collections.abc import Callable
from types import ModuleType
from typing import Any, ClassVar

from iovirt.fuzz import ops as fops
from iovirt.fuzz.harness import RAM_SIZE, FuzzMemory, OracleViolation, Region, Target
from iovirt.fuzz.ops import Op
from iovirt.fuzz.targets.common import (
    GSI,
    MAC,
    SECTOR,
    VIRTIO_MMIO_BASE,
    PciBoard,
    TempDisk,
    check_line,
    drain,
)
from iovirt.memory import GuestMemory


def _patch_sync_engines() -> Callable[[], None]:
    """Make the virtio devices' engines serve queues only when the harness asks (no
    worker threads); returns the function that undoes it."""
    from iovirt.virtio import blk, cengine, net

    class SyncBlkEngine(cengine.BlkEngine):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.started: set[int] = set()

        def start_queue(self, q: int) -> None:
            self._check_queue(q)
            self.started.add(q)

    class SyncNetEngine(cengine.NetEngine):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.started: set[int] = set()

        def start_pair(self, pair: int) -> None:
            self._check_pair(pair)
            self.started.add(pair)

    saved = (cengine.BlkEngine, cengine.NetEngine)
    setattr(blk, "BlkEngine", SyncBlkEngine)  # noqa: B010
    setattr(net, "NetEngine", SyncNetEngine)  # noqa: B010

    def undo() -> None:
        setattr(blk, "BlkEngine", saved[0])  # noqa: B010
        setattr(net, "NetEngine", saved[1])  # noqa: B010

    return undo


def ring_areas(
    size: int, desc: int, driver: int, device: int, packed: bool
) -> list[tuple[int, int]]:
    """The three ring areas of a queue as ``(address, length)``."""
    if packed:
        return [(desc, 16 * size), (driver, 4), (device, 4)]
    return [(desc, 16 * size), (driver, 6 + 2 * size), (device, 6 + 8 * size)]


class _VirtioTarget(Target):
    """A virtio device behind the PCI or MMIO transport, served synchronously."""

    transport_kind: ClassVar[str]  # "pci" or "mmio"
    support_modules = ("iovirt.bus.pci", "iovirt.bus.msix", "iovirt.virtio.pyqueue")

    def __init__(self, memory: FuzzMemory) -> None:
        super().__init__(memory)
        from iovirt.testing.platform import SimulatedPlatform
        from iovirt.virtio import mmio, pci

        self.pci_mod = pci
        self.mmio_mod = mmio
        self._platform_cls = SimulatedPlatform
        self._undo_patch = _patch_sync_engines()
        self.device: Any = None
        self.transport: Any = None
        if self.transport_kind == "pci":
            with GuestMemory([(0, 0x1000)], name="iovirt-fuzz-probe") as scratch:
                probe = self._new_pci(SimulatedPlatform(scratch))
                self.layout = [(f"bar{pci.VIRTIO_BAR}-mmio", probe.bar_size)]
                probe.close()
        else:
            self.layout = [("mmio", mmio.VIRTIO_MMIO_SIZE)]

    # -- device specifics ------------------------------------------------------------------

    def make_device(self) -> Any:
        raise NotImplementedError

    def serve(self, q: int) -> None:
        """Run the data path of queue ``q`` as its worker would after a kick."""
        raise NotImplementedError

    def data_queues(self) -> int:
        """Queues served by the C engine (the rest, e.g. a control queue, are watched on
        the host I/O loop by the device itself)."""
        raise NotImplementedError

    # -- plumbing --------------------------------------------------------------------------

    def _new_pci(self, platform: Any) -> Any:
        device = self.make_device()
        device.attach(platform)
        return self.pci_mod.VirtioPciTransport(device, platform, GSI)

    def begin(self) -> list[Region]:
        self.platform = self._platform_cls(self.memory)
        self.device = self.make_device()
        self.device.attach(self.platform)
        if self.transport_kind == "pci":
            self.transport = self.pci_mod.VirtioPciTransport(self.device, self.platform, GSI)
            self.board: PciBoard | None = PciBoard(self.transport)
            return self.board.regions()
        self.board = None
        self.transport = self.mmio_mod.VirtioMmioTransport(
            self.device, self.platform, VIRTIO_MMIO_BASE, GSI
        )
        t = self.transport
        return [Region("mmio", self.mmio_mod.VIRTIO_MMIO_SIZE, t.read, t.write)]

    def _kick_fds(self) -> list[int]:
        if self.transport_kind == "pci":
            return list(self.transport.kick_fds)
        active = self.transport._active
        return [] if active is None else list(active.kick_fds)

    def prefill_rings(self, q: int) -> None:
        """What the C engine will read first: the queue's ring areas (DMA fill)."""
        activation = getattr(self.device, "_activation", None)
        if activation is None or q >= len(activation.queues):
            return
        queue = activation.queues[q]
        packed = activation.has(34)  # VIRTIO_F_RING_PACKED
        for gpa, length in ring_areas(queue.size, queue.desc, queue.driver, queue.device, packed):
            self.memory.prefill(gpa, length)

    def after_op(self) -> None:
        kicks = self._kick_fds()[: self.data_queues()]
        platform = self.platform
        # One select over everything the host side could react to; most guest accesses
        # signal nothing, and then there is nothing to run.
        fds = [*kicks, *platform.watches, *(v.eventfd for v in platform.vectors if not v.closed)]
        if not fds or not select.select(fds, [], [], 0)[0]:
            return
        for q, fd in enumerate(kicks):
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                continue
            self.serve(q)
        platform.poll()

    def config_read(self, offset: int, size: int) -> int:
        if self.board is None:
            return (1 << (8 * size)) - 1
        return int(self.transport.config_read(offset, size))

    def config_write(self, offset: int, size: int, value: int) -> None:
        if self.board is not None:
            self.transport.config_write(offset, size, value)

    def host(self, event: int, data: bytes) -> None:
        if event == 0:  # a spurious wake-up of one queue's worker
            self.serve(data[0] % max(self.data_queues(), 1) if data else 0)
        elif event == 1:
            self.platform.poll()
        else:
            self.transport.config_changed()

    def check(self) -> None:
        if self.board is not None:
            t = self.transport
            expected = bool(t.isr) and not t.msix.enabled and self.board.intx_allowed()
            check_line("virtio-pci", self.platform.irq(GSI), expected)
        else:
            expected = self.transport.interrupt_status != 0
            check_line("virtio-mmio", self.platform.irq(GSI), expected)

    def end(self) -> None:
        self.transport.close()

    def close(self) -> None:
        self._undo_patch()

    # -- seeds -----------------------------------------------------------------------------

    def transport_seed(self) -> list[Op]:
        """The transport's corners a plain driver does not touch: for virtio-pci the
        capability list, MSI-X (table, mask, enable) and the PCI_CFG window; for virtio-mmio
        the identification registers, interrupt acknowledge and a config change."""
        if self.transport_kind == "mmio":
            m = self.mmio_mod
            reads = (m.MAGIC_VALUE, m.VERSION, m.DEVICE_ID, m.VENDOR_ID, m.SHM_LEN_LOW)
            driver = self._driver()
            driver.status(1)
            driver.ops += [fops.read(0, r, 4) for r in reads]
            driver.ops += [
                fops.host(2),
                fops.read(0, m.INTERRUPT_STATUS, 4),
                fops.write(0, m.INTERRUPT_ACK, 4, 3),
                fops.read(0, m.CONFIG_GENERATION, 4),
                fops.read(0, m.CONFIG, 4),
                fops.write(0, m.CONFIG, 1, 0xFF),
            ]
            return driver.ops
        p = self.pci_mod
        self.begin()
        try:
            msix = self.transport.msix._cap_offset
            cfg = self.transport.pci_cfg_cap
            table = p.MSIX_TABLE_OFFSET
        finally:
            self.end()
        out = [fops.config_read(0x34, 1)]
        out += [fops.config_read(cap, 4) for cap in (msix, cfg)]
        for vector in range(3):  # address, data, unmask
            entry = table + 16 * vector
            out += [
                fops.write(0, entry, 4, 0xFEE0_0000),
                fops.write(0, entry + 8, 4, 0x40 + vector),
                fops.write(0, entry + 12, 4, 0),
            ]
        out += [
            fops.config_write(msix + 2, 2, 0xC000),  # enable, function masked
            fops.config_write(msix + 2, 2, 0x8000),  # unmasked
            fops.write(0, p.VIRTIO_PCI_COMMON_MSIX, 2, 0),
            fops.read(0, self.transport.pba_offset, 8),
            # Through the PCI_CFG window: status ACKNOWLEDGE, then read it back.
            fops.config_write(cfg + 4, 1, p.VIRTIO_BAR),
            fops.config_write(cfg + 8, 4, p.COMMON_OFFSET + p.VIRTIO_PCI_COMMON_STATUS),
            fops.config_write(cfg + 12, 4, 1),
            fops.config_write(cfg + p.VIRTIO_PCI_CFG_DATA, 1, 1),
            fops.config_read(cfg + p.VIRTIO_PCI_CFG_DATA, 4),
            fops.host(2),
            fops.read(0, p.ISR_OFFSET, 1),
            fops.config_write(0x04, 2, 0x0406),  # INTx off, I/O off
            fops.config_write(0x20, 4, 0xFFFF_FFFF),  # BAR sizing: unmapped
            fops.config_write(0x24, 4, 0xFFFF_FFFF),
            fops.config_read(0x20, 4),
        ]
        return out

    def _driver(self) -> _SeedDriver:
        if self.transport_kind == "pci":
            return _PciSeedDriver(self.pci_mod)
        return _MmioSeedDriver(self.mmio_mod)


class _SeedDriver:
    """Writes a virtio driver's register sequence as fuzz operations."""

    def __init__(self) -> None:
        self.ops: list[Op] = []

    def status(self, value: int) -> None:
        raise NotImplementedError

    def features(self, value: int) -> None:
        raise NotImplementedError

    def queue(self, q: int, size: int, desc: int, driver: int, device: int) -> None:
        raise NotImplementedError

    def notify(self, q: int) -> None:
        raise NotImplementedError

    def start(self, features: int, queues: list[tuple[int, int, int, int, int]]) -> None:
        """Reset, negotiate ``features``, set up ``queues`` (q, size, desc, driver, device)
        and set DRIVER_OK."""
        self.status(0)
        self.status(1)
        self.status(3)
        self.features(features)
        self.status(3 | 8)
        for q, size, desc, driver, device in queues:
            self.queue(q, size, desc, driver, device)
        self.status(3 | 8 | 4)


class _PciSeedDriver(_SeedDriver):
    def __init__(self, pci: ModuleType) -> None:
        super().__init__()
        self.p = pci

    def _w(self, offset: int, size: int, value: int) -> None:
        self.ops.append(fops.write(0, offset, size, value))

    def status(self, value: int) -> None:
        self._w(self.p.VIRTIO_PCI_COMMON_STATUS, 1, value)

    def features(self, value: int) -> None:
        p = self.p
        for word in (0, 1):
            self._w(p.VIRTIO_PCI_COMMON_DFSELECT, 4, word)
            self.ops.append(fops.read(0, p.VIRTIO_PCI_COMMON_DF, 4))
            self._w(p.VIRTIO_PCI_COMMON_GFSELECT, 4, word)
            self._w(p.VIRTIO_PCI_COMMON_GF, 4, value >> (32 * word) & 0xFFFF_FFFF)

    def queue(self, q: int, size: int, desc: int, driver: int, device: int) -> None:
        p = self.p
        self._w(p.VIRTIO_PCI_COMMON_Q_SELECT, 2, q)
        self.ops.append(fops.read(0, p.VIRTIO_PCI_COMMON_Q_SIZE, 2))
        self._w(p.VIRTIO_PCI_COMMON_Q_SIZE, 2, size)
        self._w(p.VIRTIO_PCI_COMMON_Q_MSIX, 2, q)
        self._w(p.VIRTIO_PCI_COMMON_Q_DESC, 4, desc)
        self._w(p.VIRTIO_PCI_COMMON_Q_AVAIL, 4, driver)
        self._w(p.VIRTIO_PCI_COMMON_Q_USED, 4, device)
        self._w(p.VIRTIO_PCI_COMMON_Q_ENABLE, 2, 1)

    def notify(self, q: int) -> None:
        p = self.p
        self._w(p.NOTIFY_OFFSET + q * p.NOTIFY_OFF_MULTIPLIER, 2, q)


class _MmioSeedDriver(_SeedDriver):
    def __init__(self, mmio: ModuleType) -> None:
        super().__init__()
        self.m = mmio

    def _w(self, offset: int, value: int) -> None:
        self.ops.append(fops.write(0, offset, 4, value))

    def status(self, value: int) -> None:
        self._w(self.m.STATUS, value)

    def features(self, value: int) -> None:
        m = self.m
        for word in (0, 1):
            self._w(m.DEVICE_FEATURES_SEL, word)
            self.ops.append(fops.read(0, m.DEVICE_FEATURES, 4))
            self._w(m.DRIVER_FEATURES_SEL, word)
            self._w(m.DRIVER_FEATURES, value >> (32 * word) & 0xFFFF_FFFF)

    def queue(self, q: int, size: int, desc: int, driver: int, device: int) -> None:
        m = self.m
        self._w(m.QUEUE_SEL, q)
        self.ops.append(fops.read(0, m.QUEUE_NUM_MAX, 4))
        self._w(m.QUEUE_NUM, size)
        self._w(m.QUEUE_DESC_LOW, desc)
        self._w(m.QUEUE_DESC_HIGH, 0)
        self._w(m.QUEUE_DRIVER_LOW, driver)
        self._w(m.QUEUE_DEVICE_LOW, device)
        self._w(m.QUEUE_READY, 1)

    def notify(self, q: int) -> None:
        self._w(self.m.QUEUE_NOTIFY, q)


def ram_image_ops(memory: GuestMemory) -> list[Op]:
    """MEM_WRITE operations recreating the non-zero parts of ``memory``'s first region."""
    region = memory.regions[0]
    out = []
    for page in range(0, region.size, 0x1000):
        chunk = bytes(region.mapping[page : page + 0x1000])
        stripped = chunk.strip(b"\0")
        if not stripped:
            continue
        first = len(chunk) - len(chunk.lstrip(b"\0"))
        out.append(fops.mem_write(page + first, stripped))
    return out


# Where seed programs put their queues in RAM.
_SEED_QUEUE_BASES = (0x10000, 0x40000, 0x70000, 0xA0000, 0xD0000)
_SEED_QUEUE_SIZE = 16


class _SeedRings:
    """Lays out rings with the synthetic driver in a scratch RAM, then turns the RAM into
    MEM_WRITE operations."""

    def __init__(self, packed: bool, event_idx: bool = False) -> None:
        from iovirt.testing.virtio_driver import make_driver

        self.memory = GuestMemory([(0, RAM_SIZE)], name="iovirt-fuzz-seed")
        self.packed = packed
        self.drivers: dict[int, Any] = {}
        self._make = make_driver
        self.event_idx = event_idx

    def driver(self, q: int) -> Any:
        if q not in self.drivers:
            base = _SEED_QUEUE_BASES[len(self.drivers)]
            self.drivers[q] = self._make(
                self.memory, _SEED_QUEUE_SIZE, base, packed=self.packed, event_idx=self.event_idx
            )
        return self.drivers[q]

    def queues(self) -> list[tuple[int, int, int, int, int]]:
        return [
            (q, d.size, d.desc_gpa, d.driver_gpa, d.device_gpa) for q, d in self.drivers.items()
        ]

    def ops(self) -> list[Op]:
        try:
            return ram_image_ops(self.memory)
        finally:
            self.memory.close()


_VIRTIO_F_VERSION_1 = 1 << 32
_VIRTIO_F_RING_PACKED = 1 << 34
_VIRTIO_F_INDIRECT_DESC = 1 << 28
_VIRTIO_F_EVENT_IDX = 1 << 29


class _VirtioBlkTarget(_VirtioTarget):
    host_events = ("kick", "poll", "config-change")

    def __init__(self, memory: FuzzMemory) -> None:
        from iovirt.virtio import blk

        self.blk_mod = blk
        self.disk = TempDisk()
        self.stats: dict[int, tuple[Any, dict[str, int]]] = {}
        super().__init__(memory)

    def make_device(self) -> Any:
        b = self.blk_mod
        options = b.BlkOptions(serial=b"iovirt-fuzz", num_queues=2, queue_size=64)
        return b.VirtioBlk(self.disk.backend, options)

    def data_queues(self) -> int:
        return 2

    def begin(self) -> list[Region]:
        self.disk.restore()
        self.stats = {}
        return super().begin()

    def serve(self, q: int) -> None:
        from iovirt.virtio.queue import VirtQueueError

        engine = self.device.engine
        if engine is None or q not in engine.started:
            return
        self.prefill_rings(q)
        with contextlib.suppress(VirtQueueError):  # the driver broke the ring: reported
            engine.process_queue(q)
        self.stats[id(engine)] = (engine, engine.stats())

    def end(self) -> None:
        super().end()
        size, changed = self.disk.changed_sectors()
        if size != len(self.disk.image):
            raise OracleViolation("backend-size", f"disk file is {size} bytes now")
        written = sum(s["write_bytes"] for _, s in self.stats.values())
        other = sum(s["discards"] + s["write_zeroes"] for _, s in self.stats.values())
        if changed and not other and len(changed) * SECTOR > written + SECTOR * 2:
            raise OracleViolation(
                "backend-integrity",
                f"{len(changed)} sectors changed; the engine wrote {written} bytes",
            )

    def close(self) -> None:
        super().close()
        self.disk.close()

    def seeds(self) -> list[list[Op]]:
        from iovirt.virtio.blk import VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ

        out = []
        for packed in (False, True):
            rings = _SeedRings(packed, event_idx=packed)
            header = struct.Struct("<IIQ")
            q0, q1 = rings.driver(0), rings.driver(1)
            q0.add_chain([header.pack(0, 0, 1)], [512, 1])  # read sector 1
            q0.add_chain([header.pack(1, 0, 2), b"\x42" * 1024], [1])  # write sectors 2-3
            q0.add_chain([header.pack(4, 0, 0)], [1])  # flush
            q1.add_chain([header.pack(8, 0, 0)], [20, 1], indirect=True)  # get id
            q1.add_chain([header.pack(11, 0, 0), struct.pack("<QII", 8, 4, 0)], [1])  # discard
            driver = self._driver()
            features = _VIRTIO_F_VERSION_1 | _VIRTIO_F_INDIRECT_DESC | 1 << VIRTIO_BLK_F_FLUSH
            features |= 1 << VIRTIO_BLK_F_MQ | 1 << 13 | 1 << 14  # discard, write zeroes
            if packed:
                features |= _VIRTIO_F_RING_PACKED | _VIRTIO_F_EVENT_IDX
            driver.start(features, rings.queues())
            driver.notify(0)
            driver.notify(1)
            driver.ops.append(fops.host(1))
            out.append(rings.ops() + driver.ops)
        return [*out, self.transport_seed()]


class _VirtioNetTarget(_VirtioTarget):
    host_events = ("kick", "poll", "config-change", "rx-packet")
    pairs = 2

    def __init__(self, memory: FuzzMemory) -> None:
        from iovirt.backends.net import SocketPairNetBackend
        from iovirt.virtio import net

        self.net_mod = net
        self.backend = SocketPairNetBackend(self.pairs)
        for fd in (*self.backend.fds, *self.backend.peer_fds):
            os.set_blocking(fd, False)
        super().__init__(memory)

    def make_device(self) -> Any:
        n = self.net_mod
        options = n.NetOptions(mac=MAC, queue_pairs=self.pairs, queue_size=64, mtu=1500)
        return n.VirtioNet(self.backend, options)

    def data_queues(self) -> int:
        return 2 * self.pairs

    def begin(self) -> list[Region]:
        for fd in (*self.backend.fds, *self.backend.peer_fds):
            drain(fd)
        return super().begin()

    def serve(self, q: int) -> None:
        from iovirt.virtio.queue import VirtQueueError

        engine = self.device.engine
        pair = q // 2
        if engine is None or pair not in engine.started:
            return
        self.prefill_rings(2 * pair)
        self.prefill_rings(2 * pair + 1)
        with contextlib.suppress(VirtQueueError):
            engine.process_pair(pair)

    def host(self, event: int, data: bytes) -> None:
        if event < 3:
            super().host(event, data)
            return
        pair = data[0] % self.pairs if data else 0
        with contextlib.suppress(BlockingIOError):
            os.write(self.backend.peer_fds[pair], data[1:])
        self.serve(2 * pair)

    def after_op(self) -> None:
        super().after_op()
        for fd in select.select(self.backend.peer_fds, [], [], 0)[0]:
            drain(fd)  # what the guest sent reaches the "wire"

    def close(self) -> None:
        super().close()
        self.backend.close()

    def seeds(self) -> list[list[Op]]:
        n = self.net_mod
        out = []
        for packed, mq in ((False, False), (True, True)):
            rings = _SeedRings(packed)
            ctrl_q = 2 * self.pairs if mq else 2
            rx, tx, ctrl = rings.driver(0), rings.driver(1), rings.driver(ctrl_q)
            for _ in range(4):
                rx.add_chain([], [1526])
            frame = b"\xff" * 6 + MAC + b"\x08\x06" + bytes(46)
            tx.add_chain([bytes(12) + frame], [])
            tx.add_chain([bytes(12), frame], [], indirect=True)
            ctrl.add_chain([bytes([n.VIRTIO_NET_CTRL_RX, n.VIRTIO_NET_CTRL_RX_PROMISC, 0])], [1])
            table = struct.pack("<I", 1) + MAC + struct.pack("<I", 1) + b"\x01\x00\x5e\x00\x00\x01"
            mac_cmd = bytes([n.VIRTIO_NET_CTRL_MAC, n.VIRTIO_NET_CTRL_MAC_TABLE_SET])
            ctrl.add_chain([mac_cmd + table], [1])
            mac_cmd = bytes([n.VIRTIO_NET_CTRL_MAC, n.VIRTIO_NET_CTRL_MAC_ADDR_SET])
            ctrl.add_chain([mac_cmd + MAC], [1])
            if mq:
                ctrl.add_chain([bytes([n.VIRTIO_NET_CTRL_MQ, 0]) + struct.pack("<H", 2)], [1])
            features = _VIRTIO_F_VERSION_1 | _VIRTIO_F_INDIRECT_DESC
            for bit in (
                n.VIRTIO_NET_F_MAC,
                n.VIRTIO_NET_F_STATUS,
                n.VIRTIO_NET_F_MRG_RXBUF,
                n.VIRTIO_NET_F_CTRL_VQ,
                n.VIRTIO_NET_F_CTRL_RX,
                n.VIRTIO_NET_F_CTRL_RX_EXTRA,
                n.VIRTIO_NET_F_CTRL_MAC_ADDR,
                n.VIRTIO_NET_F_CSUM,
                n.VIRTIO_NET_F_GUEST_CSUM,
            ):
                features |= 1 << bit
            if mq:
                features |= 1 << n.VIRTIO_NET_F_MQ
            if packed:
                features |= _VIRTIO_F_RING_PACKED
            driver = self._driver()
            driver.start(features, rings.queues())
            driver.notify(ctrl_q)
            driver.notify(1)
            driver.ops.append(fops.host(3, b"\x00" + bytes(12) + frame))
            driver.ops.append(fops.host(1))
            out.append(rings.ops() + driver.ops)
        return [*out, self.transport_seed()]


class VirtioBlkPciTarget(_VirtioBlkTarget):
    name = "virtio-blk-pci"
    summary = "virtio-blk (2 queues, split/packed) behind the virtio-pci transport"
    modules = ("iovirt.virtio.blk", "iovirt.virtio.pci")
    transport_kind = "pci"


class VirtioBlkMmioTarget(_VirtioBlkTarget):
    name = "virtio-blk-mmio"
    summary = "virtio-blk behind the virtio-mmio transport"
    modules = ("iovirt.virtio.blk", "iovirt.virtio.mmio")
    transport_kind = "mmio"


class VirtioNetPciTarget(_VirtioNetTarget):
    name = "virtio-net-pci"
    summary = "virtio-net (2 pairs, control queue) behind virtio-pci, socket-pair backend"
    modules = ("iovirt.virtio.net", "iovirt.virtio.pci")
    transport_kind = "pci"


class VirtioNetMmioTarget(_VirtioNetTarget):
    name = "virtio-net-mmio"
    summary = "virtio-net behind the virtio-mmio transport"
    modules = ("iovirt.virtio.net", "iovirt.virtio.mmio")
    transport_kind = "mmio"
