"""virtio-net (virtio 1.2, 5.1): the device's front half.

Python owns what is negotiated and controlled: feature bits (the offloads the backend can
carry), the config space (MAC, link status, queue pairs, MTU), the control queue
(receive modes, MAC filter tables, the number of active queue pairs) and the data path's
lifetime. Packets never pass through Python: the C engine (csrc/net.c) moves them between
the backend's fds and guest buffers, one worker thread per queue pair
(:class:`iovirt.virtio.cengine.NetEngine`).

The control queue is rare and small, so it is served here, on the host I/O loop, with the
pure-Python virtqueue (:class:`~iovirt.virtio.pyqueue.PyVirtQueue`): every guest address
it reads is checked like the C engine's, and a malformed control request is answered
VIRTIO_NET_ERR, never an exception in the VMM.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import threading
from dataclasses import dataclass

from iovirt.backends.net import (
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUN_F_TSO_ECN,
    VNET_HDR_LEN,
    NetBackend,
)
from iovirt.bus.pci import GuestAccessLog
from iovirt.errors import IovirtError
from iovirt.platform import Platform
from iovirt.virtio.blk import queue_flags
from iovirt.virtio.cengine import NetEngine, NetEngineConfig, NetFilter
from iovirt.virtio.device import (
    QUEUE_MAX_SIZE,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_NET,
    Activation,
)
from iovirt.virtio.pyqueue import PyVirtQueue
from iovirt.virtio.queue import DescriptorChain, VirtQueueError

log = logging.getLogger(__name__)

# Feature bits (virtio 1.2, 5.1.3).
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_GUEST_UFO = 10
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_ECN = 13
VIRTIO_NET_F_HOST_UFO = 14
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_F_CTRL_VQ = 17
VIRTIO_NET_F_CTRL_RX = 18
VIRTIO_NET_F_CTRL_VLAN = 19
VIRTIO_NET_F_CTRL_RX_EXTRA = 20
VIRTIO_NET_F_GUEST_ANNOUNCE = 21
VIRTIO_NET_F_MQ = 22
VIRTIO_NET_F_CTRL_MAC_ADDR = 23

VIRTIO_NET_S_LINK_UP = 1

# Control queue (5.1.6.5): classes, commands, acks.
VIRTIO_NET_OK = 0
VIRTIO_NET_ERR = 1
VIRTIO_NET_CTRL_RX = 0
VIRTIO_NET_CTRL_RX_PROMISC = 0
VIRTIO_NET_CTRL_RX_ALLMULTI = 1
VIRTIO_NET_CTRL_RX_ALLUNI = 2
VIRTIO_NET_CTRL_RX_NOMULTI = 3
VIRTIO_NET_CTRL_RX_NOUNI = 4
VIRTIO_NET_CTRL_RX_NOBCAST = 5
VIRTIO_NET_CTRL_MAC = 1
VIRTIO_NET_CTRL_MAC_TABLE_SET = 0
VIRTIO_NET_CTRL_MAC_ADDR_SET = 1
VIRTIO_NET_CTRL_MQ = 4
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET = 0
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN = 1
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX = 0x8000

# The engine's filter holds this many addresses per list; a larger table from the guest
# turns on all-unicast / all-multicast instead (what QEMU does when its table overflows).
MAX_FILTER_MACS = 64
# The largest control request we read: class, command and a full MAC table command.
MAX_CTRL_REQUEST = 2 + 2 * (4 + 6 * 256)
# Control requests served per wake-up, so a driver that floods the queue cannot keep the
# host I/O loop busy.
MAX_CTRL_BATCH = 64

# struct virtio_net_config up to mtu: mac[6], status, max_virtqueue_pairs, mtu.
_CONFIG = struct.Struct("<6sHHH")
CONFIG_SIZE = _CONFIG.size


def parse_mac(text: str) -> bytes:
    """``52:54:00:12:34:56`` -> 6 bytes; ValueError for anything else."""
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"{text!r} is not a MAC address like 52:54:00:12:34:56")
    mac = bytes(int(p, 16) for p in parts)
    if mac[0] & 1:
        raise ValueError(f"{text} is a multicast address; a NIC needs a unicast MAC")
    return mac


@dataclass(frozen=True)
class NetOptions:
    """The knobs of a virtio-net device (from the config file's [[nic]] table)."""

    mac: bytes = bytes.fromhex("525400123456")
    queue_pairs: int = 1
    queue_size: int = 256
    mtu: int | None = None
    packed: bool = True


class VirtioNet:
    """A virtio-net device over a :class:`~iovirt.backends.net.NetBackend`."""

    device_id = VIRTIO_ID_NET

    def __init__(self, backend: NetBackend, options: NetOptions = NetOptions()) -> None:
        if len(options.mac) != 6 or options.mac[0] & 1:
            raise ValueError("mac must be 6 bytes, unicast")
        if not 1 <= options.queue_pairs <= len(backend.fds):
            raise ValueError(
                f"queue_pairs must be 1-{len(backend.fds)} (the backend's queue count)"
            )
        if not 4 <= options.queue_size <= QUEUE_MAX_SIZE or options.queue_size & (
            options.queue_size - 1
        ):
            raise ValueError("queue_size must be a power of two between 4 and 1024")
        if options.mtu is not None and not 68 <= options.mtu <= 65535:
            raise ValueError("mtu must be 68-65535")
        self.backend = backend
        self.options = options
        self.max_pairs = options.queue_pairs
        self.num_queues = 2 * options.queue_pairs + 1  # rx/tx pairs, then the control queue
        # Where the control queue sits with VIRTIO_NET_F_MQ; without it the driver uses one
        # pair and the control queue is queue 2 (5.1.2), see ``_ctrl_index``.
        self.ctrl_queue = 2 * options.queue_pairs
        self.queue_max_size = options.queue_size
        self.mac = options.mac
        # The host I/O loop's callbacks (queue errors, control requests) and a vCPU's reset
        # all use the engine and the control queue: a reset must wait until a callback is
        # done with them, or the callback would use a freed engine, closed kick fds, or
        # write a used entry into rings the driver has already taken back.
        self._lock = threading.Lock()
        self._platform: Platform | None = None
        self.engine: NetEngine | None = None
        self._activation: Activation | None = None
        self._ctrl: PyVirtQueue | None = None
        self._ctrl_index = self.ctrl_queue
        self._filter = NetFilter(promisc=True)
        # The receive modes as the driver set them; the filter may widen them when a MAC
        # table overflows, which must not outlive the overflowing table.
        self._modes = _initial_modes()
        self._unicast_table: list[bytes] = []  # VIRTIO_NET_CTRL_MAC_TABLE_SET's unicast list
        self._multicast_table: list[bytes] = []
        self.active_pairs = 1
        self.ctrl_requests = 0
        self.ctrl_errors = 0
        # A guest can break a queue again after every reset: count, log only the first few.
        self.queue_errors = GuestAccessLog("virtio-net", log, what="broken queues")
        # Control requests the host refused (a tap queue that cannot attach); the guest can
        # repeat them at will, so they are counted and logged the same way.
        self.host_errors = GuestAccessLog("virtio-net", log, what="refused control requests")

    def attach(self, platform: Platform) -> None:
        """Remember the platform: the control queue and error fds are watched on its loop."""
        self._platform = platform

    # -- VirtioDevice --------------------------------------------------------------------

    def _guest_offload_features(self) -> int:
        """Offloads the guest may receive: only those the backend can deliver."""
        supported = self.backend.supported_offloads()
        features = 0
        if supported & TUN_F_CSUM:
            features |= 1 << VIRTIO_NET_F_GUEST_CSUM
            if supported & TUN_F_TSO4:
                features |= 1 << VIRTIO_NET_F_GUEST_TSO4
            if supported & TUN_F_TSO6:
                features |= 1 << VIRTIO_NET_F_GUEST_TSO6
            if supported & TUN_F_TSO_ECN and supported & (TUN_F_TSO4 | TUN_F_TSO6):
                features |= 1 << VIRTIO_NET_F_GUEST_ECN
        return features

    def device_features(self) -> int:
        features = (
            1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_F_INDIRECT_DESC
            | 1 << VIRTIO_F_EVENT_IDX
            | 1 << VIRTIO_NET_F_MAC
            | 1 << VIRTIO_NET_F_STATUS
            | 1 << VIRTIO_NET_F_MRG_RXBUF
            | 1 << VIRTIO_NET_F_CTRL_VQ
            | 1 << VIRTIO_NET_F_CTRL_RX
            # The engine's filter has the ALLUNI/NOMULTI/NOUNI/NOBCAST modes too; a driver
            # may only use them once this is negotiated.
            | 1 << VIRTIO_NET_F_CTRL_RX_EXTRA
            | 1 << VIRTIO_NET_F_CTRL_MAC_ADDR
            # What the guest sends: a tap with a vnet header takes partial checksums and
            # TSO frames and lets the host stack finish them.
            | 1 << VIRTIO_NET_F_CSUM
            | 1 << VIRTIO_NET_F_HOST_TSO4
            | 1 << VIRTIO_NET_F_HOST_TSO6
            | 1 << VIRTIO_NET_F_HOST_ECN
            | self._guest_offload_features()
        )
        if self.options.packed:
            features |= 1 << VIRTIO_F_RING_PACKED
        if self.max_pairs > 1:
            features |= 1 << VIRTIO_NET_F_MQ
        if self.options.mtu is not None:
            features |= 1 << VIRTIO_NET_F_MTU
        return features

    def config_read(self, offset: int, size: int) -> int:
        config = _CONFIG.pack(self.mac, VIRTIO_NET_S_LINK_UP, self.max_pairs, self.options.mtu or 0)
        if offset < 0 or size <= 0 or offset + size > CONFIG_SIZE:
            return 0
        return int.from_bytes(config[offset : offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        """The MAC is writable only through the control queue (VERSION_1 devices)."""

    def activate(self, activation: Activation) -> None:
        self.reset()
        features = activation.features
        config = NetEngineConfig(
            hdr_len=VNET_HDR_LEN, mrg_rxbuf=activation.has(VIRTIO_NET_F_MRG_RXBUF)
        )
        flags = queue_flags(features)
        pairs = self.max_pairs if activation.has(VIRTIO_NET_F_MQ) else 1
        ctrl_index = 2 * pairs  # 5.1.2: the control queue follows the pairs in use
        engine = NetEngine(activation.memory, config, pairs)
        try:
            started = []
            for pair in range(pairs):
                rx, tx = activation.queues[2 * pair], activation.queues[2 * pair + 1]
                if not (rx.enabled and tx.enabled):
                    continue
                for q, queue in ((2 * pair, rx), (2 * pair + 1, tx)):
                    engine.setup_queue(
                        q,
                        queue.size,
                        flags,
                        queue.desc,
                        queue.driver,
                        queue.device,
                        activation.kick_fds[q],
                        activation.call_fds[q],
                    )
                engine.set_backend(pair, self.backend.fds[pair])
                started.append(pair)
            # A reset device receives everything until the driver sets its receive modes
            # (QEMU starts promiscuous too); the MAC is the configured one again.
            self.mac = self.options.mac
            self._modes = _initial_modes()
            self._unicast_table = []
            self._multicast_table = []
            self._filter = NetFilter(promisc=True)
            engine.set_filter(self._filter)
            self.backend.set_offloads(_tun_offloads(features))
            self.active_pairs = 1  # the spec's initial state until MQ_VQ_PAIRS_SET
            self.backend.set_active_pairs(1)
            for pair in started:
                engine.start_pair(pair)
            ctrl = None
            if activation.has(VIRTIO_NET_F_CTRL_VQ) and activation.queues[ctrl_index].enabled:
                queue = activation.queues[ctrl_index]
                ctrl = PyVirtQueue(
                    activation.memory, queue.size, flags, queue.desc, queue.driver, queue.device
                )
        except BaseException:
            engine.close()
            raise
        with self._lock:
            self.engine = engine
            self._activation = activation
            self._ctrl = ctrl
            self._ctrl_index = ctrl_index
        if self._platform is not None:
            self._platform.watch(engine.error_fd, self._on_queue_error)
            if ctrl is not None:
                self._platform.watch(activation.kick_fds[ctrl_index], self._on_ctrl_kick)

    def reset(self) -> None:
        with self._lock:
            # The config space shows the configured MAC again (a driver probing after the
            # reset reads it before any MAC_ADDR_SET), as after power-on.
            self.mac = self.options.mac
            engine, self.engine = self.engine, None
            activation, self._activation = self._activation, None
            self._ctrl = None
            if engine is None:
                return
            if self._platform is not None:
                self._platform.unwatch(engine.error_fd)
                if activation is not None:
                    self._platform.unwatch(activation.kick_fds[self._ctrl_index])
            try:
                engine.close()  # stops and joins the workers first
            except IovirtError:
                log.exception("virtio-net: stopping the data path failed")

    def close(self) -> None:
        """VM teardown: stop the data path and close the backend (a tap we created goes)."""
        self.reset()
        self.backend.close()

    # -- errors and the control queue ----------------------------------------------------

    def _on_queue_error(self) -> None:
        with self._lock:
            engine, activation = self.engine, self._activation
            if engine is None or activation is None:
                return
            try:
                os.eventfd_read(engine.error_fd)
            except BlockingIOError:
                return
            errors = [engine.queue_error(q) for q in range(2 * engine.npairs)]
        reasons = [os.strerror(-e) if e else "ok" for e in errors]
        self.queue_errors(f"the driver broke a queue (errors {reasons}); device needs reset")
        activation.needs_reset()

    def _on_ctrl_kick(self) -> None:
        with self._lock:
            ctrl, activation = self._ctrl, self._activation
            if activation is None:
                return
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(activation.kick_fds[self._ctrl_index])
            if ctrl is None or ctrl.broken:
                return  # a broken queue was reported once; it stays so until the reset
            self.process_ctrl(ctrl, activation)

    def process_ctrl(self, ctrl: PyVirtQueue, activation: Activation) -> int:
        """Serve up to MAX_CTRL_BATCH control requests; returns how many. The host I/O
        loop calls it with the device's lock held."""
        served = 0
        try:
            while served < MAX_CTRL_BATCH:
                chain = ctrl.pop_descriptor_chain()
                if chain is None:
                    break
                ack = self._ctrl_command(chain, activation)
                written = 0
                if chain.writable:
                    activation.memory.write(chain.writable[0][0], bytes([ack]))
                    written = 1
                ctrl.add_used(chain.head, chain.ndescs, written)
                served += 1
            ctrl.flush_used()
            if served and ctrl.needs_notification():
                os.eventfd_write(activation.call_fds[self._ctrl_index], 1)
        except VirtQueueError as err:
            self.queue_errors(f"control queue broken ({err}); device needs reset")
            activation.needs_reset()
            return served
        if served == MAX_CTRL_BATCH:
            # More may be waiting: come back on the next loop iteration, not in this one.
            os.eventfd_write(activation.kick_fds[self._ctrl_index], 1)
        return served

    def _ctrl_command(self, chain: DescriptorChain, activation: Activation) -> int:
        """Execute one control request; returns its ack byte."""
        self.ctrl_requests += 1
        if chain.readable_bytes > MAX_CTRL_REQUEST or chain.readable_bytes < 2:
            self.ctrl_errors += 1
            return VIRTIO_NET_ERR
        request = chain.read(activation.memory)
        cls, cmd, data = request[0], request[1], request[2:]
        ok = False
        if cls == VIRTIO_NET_CTRL_RX and activation.has(VIRTIO_NET_F_CTRL_RX):
            ok = self._ctrl_rx(cmd, data, activation.has(VIRTIO_NET_F_CTRL_RX_EXTRA))
        elif cls == VIRTIO_NET_CTRL_MAC:
            ok = self._ctrl_mac(cmd, data, activation)
        elif cls == VIRTIO_NET_CTRL_MQ and activation.has(VIRTIO_NET_F_MQ):
            ok = self._ctrl_mq(cmd, data)
        if not ok:
            self.ctrl_errors += 1
        return VIRTIO_NET_OK if ok else VIRTIO_NET_ERR

    def _ctrl_rx(self, cmd: int, data: bytes, extra: bool) -> bool:
        names = {
            VIRTIO_NET_CTRL_RX_PROMISC: "promisc",
            VIRTIO_NET_CTRL_RX_ALLMULTI: "allmulti",
        }
        if extra:  # commands 2-5 come with VIRTIO_NET_F_CTRL_RX_EXTRA
            names |= {
                VIRTIO_NET_CTRL_RX_ALLUNI: "alluni",
                VIRTIO_NET_CTRL_RX_NOMULTI: "nomulti",
                VIRTIO_NET_CTRL_RX_NOUNI: "nouni",
                VIRTIO_NET_CTRL_RX_NOBCAST: "nobcast",
            }
        name = names.get(cmd)
        if name is None or len(data) != 1:
            return False
        self._modes[name] = bool(data[0])
        self._set_filter()
        return True

    def _ctrl_mac(self, cmd: int, data: bytes, activation: Activation) -> bool:
        if cmd == VIRTIO_NET_CTRL_MAC_ADDR_SET and activation.has(VIRTIO_NET_F_CTRL_MAC_ADDR):
            if len(data) != 6:
                return False
            self.mac = bytes(data)
            self._set_filter()
            return True
        if cmd != VIRTIO_NET_CTRL_MAC_TABLE_SET:
            return False
        tables: list[list[bytes]] = []
        at = 0
        for _ in range(2):  # unicast table, then multicast table
            if at + 4 > len(data):
                return False
            (entries,) = struct.unpack_from("<I", data, at)
            at += 4
            if entries > (len(data) - at) // 6:
                return False
            tables.append([data[at + 6 * i : at + 6 * i + 6] for i in range(entries)])
            at += 6 * entries
        if at != len(data):
            return False
        self._unicast_table, self._multicast_table = tables
        self._set_filter()
        return True

    def _ctrl_mq(self, cmd: int, data: bytes) -> bool:
        if cmd != VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET or len(data) != 2:
            return False
        (pairs,) = struct.unpack("<H", data)
        if not VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN <= pairs <= self.max_pairs:
            return False
        try:
            self.backend.set_active_pairs(pairs)
        except (IovirtError, ValueError) as e:
            # The host refused (a tap queue that cannot attach): the driver gets ERR and
            # keeps the pairs it had; the VMM goes on.
            self.host_errors(f"setting {pairs} active queue pairs failed: {e}")
            return False
        self.active_pairs = pairs
        return True

    def _set_filter(self) -> None:
        """Rebuild the engine's receive filter from the driver's modes, our MAC and the
        tables (the caller holds the lock: the control queue is served under it)."""
        modes = self._modes
        unicast = [self.mac, *self._unicast_table]
        multicast = self._multicast_table
        alluni, allmulti = modes["alluni"], modes["allmulti"]
        if len(unicast) > MAX_FILTER_MACS:
            unicast, alluni = unicast[:1], True
        if len(multicast) > MAX_FILTER_MACS:
            multicast, allmulti = [], True
        self._filter = NetFilter(
            promisc=modes["promisc"],
            allmulti=allmulti,
            alluni=alluni,
            nomulti=modes["nomulti"],
            nouni=modes["nouni"],
            nobcast=modes["nobcast"],
            unicast=unicast,
            multicast=list(multicast),
        )
        if self.engine is not None:
            self.engine.set_filter(self._filter)


def _initial_modes() -> dict[str, bool]:
    """The receive modes after a reset: promiscuous until the driver says otherwise."""
    return {
        "promisc": True,
        "allmulti": False,
        "alluni": False,
        "nomulti": False,
        "nouni": False,
        "nobcast": False,
    }


def _tun_offloads(features: int) -> int:
    """TUN_F_* bits for what the guest negotiated it can receive."""
    bits = 0
    if features >> VIRTIO_NET_F_GUEST_CSUM & 1:
        bits |= TUN_F_CSUM
        if features >> VIRTIO_NET_F_GUEST_TSO4 & 1:
            bits |= TUN_F_TSO4
        if features >> VIRTIO_NET_F_GUEST_TSO6 & 1:
            bits |= TUN_F_TSO6
        if features >> VIRTIO_NET_F_GUEST_ECN & 1:
            bits |= TUN_F_TSO_ECN
    return bits
