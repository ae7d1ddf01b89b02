"""Network backends: what a NIC model sends packets to and receives them from.

A NIC model (virtio-net, later e1000) gets a :class:`NetBackend`: one packet file
descriptor per queue pair. Every read or write on such an fd is one whole Ethernet frame
preceded by a virtio-net header of :data:`VNET_HDR_LEN` bytes (``struct virtio_net_hdr_v1``:
flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers), which is what a
tap with IFF_VNET_HDR and TUNSETVNETHDRSZ gives. The data path (C, for virtio-net) does
its readv/writev on the fds itself, so the protocol is small, like kvmtool's
``net_dev_operations``.

Offloads are what the *guest* can receive: checksum-less and segmentation-offloaded
(GSO) frames reach the guest only if the backend is told the guest accepts them
(TUNSETOFFLOAD with TUN_F_* bits).

:class:`SocketPairNetBackend` is the in-process backend for tests and the fuzzer: a
SOCK_SEQPACKET socket pair keeps packet boundaries the way a tap does, and the test holds
the other end (``peer_fds``).
"""

from __future__ import annotations

import socket
from typing import Protocol

VNET_HDR_LEN = 12  # struct virtio_net_hdr_v1 (VIRTIO_F_VERSION_1 always uses it)

# TUNSETOFFLOAD bits (<linux/if_tun.h>).
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10


class NetBackend(Protocol):
    """Packet fds for a NIC, one per queue pair."""

    @property
    def fds(self) -> list[int]:
        """One packet fd per queue pair (at least one)."""
        ...

    def supported_offloads(self) -> int:
        """The TUN_F_* bits this backend can deliver to the guest."""
        ...

    def set_offloads(self, offloads: int) -> None:
        """Deliver frames with these TUN_F_* offloads (what the guest negotiated)."""
        ...

    def set_active_pairs(self, pairs: int) -> None:
        """Only the first ``pairs`` fds carry traffic (virtio-net's MQ_VQ_PAIRS_SET)."""
        ...

    def close(self) -> None:
        """Release the fds (and what the backend created: a tap, say). Idempotent."""
        ...


class SocketPairNetBackend:
    """A packet socket pair per queue pair; the test or fuzzer holds :attr:`peer_fds`.

    Every datagram must carry the VNET_HDR_LEN-byte header, as with a tap. All offloads
    are "supported" (nothing checks them), which lets tests negotiate any feature set.
    """

    def __init__(self, pairs: int = 1) -> None:
        if pairs < 1:
            raise ValueError("a NIC needs at least one queue pair")
        self._ours: list[socket.socket] = []
        self._peers: list[socket.socket] = []
        for _ in range(pairs):
            ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            self._ours.append(ours)
            self._peers.append(peer)
        self.offloads = 0
        self.active_pairs = pairs

    @property
    def fds(self) -> list[int]:
        return [s.fileno() for s in self._ours]

    @property
    def peer_fds(self) -> list[int]:
        return [s.fileno() for s in self._peers]

    def supported_offloads(self) -> int:
        return TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO

    def set_offloads(self, offloads: int) -> None:
        self.offloads = offloads

    def set_active_pairs(self, pairs: int) -> None:
        self.active_pairs = pairs

    def close(self) -> None:
        for s in (*self._ours, *self._peers):
            s.close()
