"""virtio-blk and virtio-net whose data path is a vhost-user back-end.

The guest sees an ordinary virtio device on our transports; the rings are served by
another process (iovirt's ``vhost-user`` back-end, qemu-storage-daemon, DPDK ...) over a
UNIX socket. When the driver sets DRIVER_OK, :meth:`VhostUserDevice.activate` sends the
back-end what it needs to serve the rings itself: the negotiated features, the guest
memory table (the memfd of :class:`~iovirt.memory.GuestMemory`, passed by SCM_RIGHTS),
each ring's size and addresses, and the transport's kick (ioeventfd) and call (irqfd)
eventfds. The back-end then talks to the guest without us. A reset asks the back-end for
each ring's position (GET_VRING_BASE), which stops it.

- virtio-blk: features and the config space come from the back-end (GET_FEATURES,
  GET_CONFIG); with VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD the inflight region is fetched
  once and handed back at every activation, so a restarted back-end can resubmit.
- virtio-net: the back-end serves one rx/tx pair; the MAC and link status are ours (the
  config space is the front-end's in vhost-user), and no control queue is offered.

A ring the back-end finds broken is reported on its error eventfd (SET_VRING_ERR); we
then set DEVICE_NEEDS_RESET. If the back-end dies the device stops working until the
VM restarts (no reconnection yet). Only split rings are negotiated.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import struct
import threading

from iovirt.backends.vhost_user import (
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
    InflightDesc,
    MemoryRegionDesc,
    ProtocolFeature,
    VhostUserError,
    VhostUserFrontend,
    VringAddr,
)
from iovirt.bus.pci import GuestAccessLog
from iovirt.memory import GuestMemory
from iovirt.platform import Platform
from iovirt.virtio.device import (
    QUEUE_MAX_SIZE,
    VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_BLOCK,
    VIRTIO_ID_NET,
    Activation,
)

log = logging.getLogger(__name__)

# Protocol features this front-end can use.
FRONTEND_PROTOCOL_FEATURES = (
    1 << ProtocolFeature.MQ
    | 1 << ProtocolFeature.REPLY_ACK
    | 1 << ProtocolFeature.CONFIG
    | 1 << ProtocolFeature.INFLIGHT_SHMFD
)
# Virtio bits never passed to the guest: vhost-user's own bits, dirty logging, the IOMMU
# (we have none to offer) and packed rings (ring bases are exchanged as split indices).
_NOT_FOR_GUEST = (
    1 << VHOST_USER_F_PROTOCOL_FEATURES
    | 1 << VHOST_F_LOG_ALL
    | 1 << VIRTIO_F_ACCESS_PLATFORM
    | 1 << VIRTIO_F_RING_PACKED
)

# virtio-blk: VIRTIO_BLK_F_MQ and the num_queues field of struct virtio_blk_config.
VIRTIO_BLK_F_MQ = 12
BLK_CONFIG_SIZE = 60
BLK_CONFIG_NUM_QUEUES = 34

# virtio-net (virtio 1.2, 5.1.3): the bits this front-end controls itself.
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_F_CTRL_VQ = 17
VIRTIO_NET_F_CTRL_RX = 18
VIRTIO_NET_F_CTRL_VLAN = 19
VIRTIO_NET_F_GUEST_ANNOUNCE = 21
VIRTIO_NET_F_MQ = 22
VIRTIO_NET_F_CTRL_MAC_ADDR = 23
VIRTIO_NET_S_LINK_UP = 1
_NET_FRONTEND_BITS = (
    1 << VIRTIO_NET_F_MTU
    | 1 << VIRTIO_NET_F_MAC
    | 1 << VIRTIO_NET_F_STATUS
    | 1 << VIRTIO_NET_F_CTRL_VQ
    | 1 << VIRTIO_NET_F_CTRL_RX
    | 1 << VIRTIO_NET_F_CTRL_VLAN
    | 1 << VIRTIO_NET_F_GUEST_ANNOUNCE
    | 1 << VIRTIO_NET_F_MQ
    | 1 << VIRTIO_NET_F_CTRL_MAC_ADDR
)
# struct virtio_net_config: mac[6], status, max_virtqueue_pairs (up to what we fill).
_NET_CONFIG = struct.Struct("<6sHH")


def _ring_bytes(size: int) -> tuple[int, int, int]:
    """Bytes of a split ring's descriptor table, avail ring and used ring."""
    return 16 * size, 6 + 2 * size, 6 + 8 * size


class VhostUserDevice:
    """A virtio device served by a vhost-user back-end (see the module docstring).

    Connects and negotiates the protocol at construction, so a missing or refusing
    back-end is reported when the board is built (ResourceError / VhostUserError).
    """

    def __init__(
        self, device_id: int, socket_path: str, num_queues: int, queue_size: int = 256
    ) -> None:
        if not 4 <= queue_size <= QUEUE_MAX_SIZE or queue_size & (queue_size - 1):
            raise ValueError(f"queue_size must be a power of two between 4 and {QUEUE_MAX_SIZE}")
        self.device_id = device_id
        self.queue_max_size = queue_size
        self.frontend = VhostUserFrontend(socket_path)
        try:
            self.backend_features = self.frontend.get_features()
            if not self.backend_features >> VIRTIO_F_VERSION_1 & 1:
                raise VhostUserError(
                    f"vhost-user {socket_path}: the back-end does not offer VIRTIO_F_VERSION_1"
                )
            if self.backend_features >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
                offered = self.frontend.get_protocol_features()
                self.frontend.set_protocol_features(offered & FRONTEND_PROTOCOL_FEATURES)
            self.frontend.set_owner()
            self.num_queues = num_queues
            if self.frontend.has_protocol(ProtocolFeature.MQ):
                self.num_queues = min(num_queues, self._queue_limit(self.frontend.get_queue_num()))
        except BaseException:
            self.frontend.close()
            raise
        self._lock = threading.Lock()
        self._platform: Platform | None = None
        self._active: list[int] = []  # rings handed to the back-end
        self._err_fds: list[int] = []
        self._activation: Activation | None = None
        self._inflight: tuple[InflightDesc, int] | None = None
        self.queue_errors = GuestAccessLog("vhost-user", log, what="broken rings")

    def _queue_limit(self, backend_queues: int) -> int:
        return max(1, backend_queues)

    def attach(self, platform: Platform) -> None:
        """Remember the platform, for watching the rings' error eventfds."""
        self._platform = platform

    # -- VirtioDevice --------------------------------------------------------------------

    def device_features(self) -> int:
        return self.backend_features & ~_NOT_FOR_GUEST

    def config_read(self, offset: int, size: int) -> int:
        return 0

    def config_write(self, offset: int, size: int, value: int) -> None:
        """Read-only unless a subclass says otherwise."""

    def activate(self, activation: Activation) -> None:
        self.reset()
        with self._lock:
            try:
                self._start(activation)
            except BaseException:
                self._stop()
                raise
            self._activation = activation

    def _backend_ack(self, negotiated: int) -> int:
        """The feature bits the back-end is told: what it offered and the driver took."""
        acked = negotiated & self.backend_features & ~(1 << VHOST_USER_F_PROTOCOL_FEATURES)
        return acked | self.backend_features & 1 << VHOST_USER_F_PROTOCOL_FEATURES

    def _start(self, activation: Activation) -> None:
        f = self.frontend
        memory: GuestMemory = activation.memory
        f.set_features(self._backend_ack(activation.features))
        regions = [
            MemoryRegionDesc(r.gpa, r.size, r.host_addr, r.fd_offset) for r in memory.regions
        ]
        f.set_mem_table(regions, [r.fd for r in memory.regions])
        if f.has_protocol(ProtocolFeature.INFLIGHT_SHMFD):
            if self._inflight is None:
                self._inflight = f.get_inflight_fd(self.num_queues, self.queue_max_size)
            f.set_inflight_fd(*self._inflight)
        for q, queue in enumerate(activation.queues[: self.num_queues]):
            if not queue.enabled:
                continue
            desc_len, avail_len, used_len = _ring_bytes(queue.size)
            addr = VringAddr(
                q,
                0,
                desc=memory.host_address(queue.desc, desc_len),
                used=memory.host_address(queue.device, used_len),
                avail=memory.host_address(queue.driver, avail_len),
            )
            f.set_vring_num(q, queue.size)
            f.set_vring_base(q, 0)
            f.set_vring_addr(addr)
            err = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._err_fds.append(err)
            if self._platform is not None:
                self._platform.watch(err, functools.partial(self._on_ring_error, err, q))
            f.set_vring_err(q, err)
            f.set_vring_call(q, activation.call_fds[q])
            self._active.append(q)
            f.set_vring_kick(q, activation.kick_fds[q])
            if self.backend_features >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
                f.set_vring_enable(q, True)

    def _on_ring_error(self, fd: int, ring: int) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(fd)
        with self._lock:
            activation = self._activation
        if activation is not None:
            self.queue_errors(f"the back-end reports ring {ring} broken; device needs reset")
            activation.needs_reset()

    def _stop(self) -> None:
        """Take every ring back (GET_VRING_BASE stops it); the caller holds the lock."""
        f = self.frontend
        try:
            for q in self._active:
                if self.backend_features >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
                    f.set_vring_enable(q, False)
                f.get_vring_base(q)
        except VhostUserError as e:
            log.warning("vhost-user %s: stopping the rings failed: %s", f.path, e)
        self._active = []
        for fd in self._err_fds:
            if self._platform is not None:
                self._platform.unwatch(fd)
            os.close(fd)
        self._err_fds = []
        self._activation = None

    def reset(self) -> None:
        with self._lock:
            self._stop()

    def close(self) -> None:
        """VM teardown: stop the rings and hang up (the back-end waits for the next VMM)."""
        self.reset()
        if self._inflight is not None:
            os.close(self._inflight[1])
            self._inflight = None
        self.frontend.close()


class VhostUserBlk(VhostUserDevice):
    """virtio-blk over a vhost-user back-end: features and config space are the
    back-end's (GET_CONFIG), read once at construction."""

    def __init__(self, socket_path: str, num_queues: int = 1, queue_size: int = 256) -> None:
        super().__init__(VIRTIO_ID_BLOCK, socket_path, num_queues, queue_size)
        try:
            if not self.frontend.has_protocol(ProtocolFeature.CONFIG):
                raise VhostUserError(
                    f"vhost-user {socket_path}: the back-end has no config space "
                    "(VHOST_USER_PROTOCOL_F_CONFIG); a virtio-blk back-end needs it"
                )
            config = bytearray(self.frontend.get_config(0, BLK_CONFIG_SIZE))
        except BaseException:
            self.frontend.close()
            raise
        if self.backend_features >> VIRTIO_BLK_F_MQ & 1:
            # The guest uses the queues we wire up, whatever the back-end could take.
            struct.pack_into("<H", config, BLK_CONFIG_NUM_QUEUES, self.num_queues)
            if self.num_queues == 1:
                self.backend_features &= ~(1 << VIRTIO_BLK_F_MQ)
        self.config = bytes(config)

    @property
    def capacity(self) -> int:
        """The disk size in 512-byte sectors, as the back-end reports it."""
        return int(struct.unpack_from("<Q", self.config)[0])

    def config_read(self, offset: int, size: int) -> int:
        if offset < 0 or size <= 0 or offset + size > len(self.config):
            return 0
        return int.from_bytes(self.config[offset : offset + size], "little")


class VhostUserNet(VhostUserDevice):
    """virtio-net over a vhost-user back-end: one rx/tx pair; the MAC and link status
    are served here, the packet offloads are whatever the back-end offers."""

    def __init__(self, socket_path: str, mac: bytes, queue_size: int = 256) -> None:
        if len(mac) != 6 or mac[0] & 1:
            raise ValueError("mac must be 6 bytes, unicast")
        super().__init__(VIRTIO_ID_NET, socket_path, 2, queue_size)
        self.mac = mac

    def _queue_limit(self, backend_queues: int) -> int:
        return 2  # one pair: GET_QUEUE_NUM's unit differs between net back-ends

    def device_features(self) -> int:
        features = super().device_features() & ~_NET_FRONTEND_BITS
        return features | 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS

    def config_read(self, offset: int, size: int) -> int:
        config = _NET_CONFIG.pack(self.mac, VIRTIO_NET_S_LINK_UP, 1)
        if offset < 0 or size <= 0 or offset + size > len(config):
            return 0
        return int.from_bytes(config[offset : offset + size], "little")
