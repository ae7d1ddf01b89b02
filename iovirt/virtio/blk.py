"""virtio-blk (virtio 1.2, 5.2): the device's front half.

Python owns what the driver negotiates: the feature bits, the config space
(``struct virtio_blk_config``) and the lifetime of the data path. The requests themselves
(read, write, flush, get-id, discard, write-zeroes) are parsed and served by the C engine
(csrc/blk.c) in one worker thread per queue, straight between guest RAM and the backend
fd; see :class:`iovirt.virtio.cengine.BlkEngine`.

Durability: VIRTIO_BLK_F_FLUSH is offered, so the guest sees a volatile write cache and
sends flushes; a flush completes only after fdatasync(2) returned. A driver that does not
negotiate FLUSH gets write-through: every write is fdatasync'ed before it completes.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from dataclasses import dataclass

from iovirt.backends.block import SECTOR_SIZE, BlockBackend
from iovirt.bus.pci import GuestAccessLog
from iovirt.errors import IovirtError
from iovirt.memory import GuestMemory
from iovirt.platform import Platform
from iovirt.virtio.cengine import BlkEngine, BlkEngineConfig
from iovirt.virtio.device import (
    QUEUE_MAX_SIZE,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_IN_ORDER,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_BLOCK,
    Activation,
)
from iovirt.virtio.queue import QueueFlags

log = logging.getLogger(__name__)

# Feature bits (virtio 1.2, 5.2.3).
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

VIRTIO_BLK_ID_BYTES = 20

# struct virtio_blk_config, up to write_zeroes_may_unmap (the fields this device fills):
# capacity, size_max, seg_max, geometry (cylinders, heads, sectors), blk_size,
# topology (physical_block_exp, alignment_offset, min_io_size, opt_io_size), writeback,
# unused0, num_queues, max_discard_sectors, max_discard_seg, discard_sector_alignment,
# max_write_zeroes_sectors, max_write_zeroes_seg, write_zeroes_may_unmap, unused1[3].
_CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")
CONFIG_SIZE = _CONFIG.size  # 60

# Limits offered for discard and write-zeroes: one request may cover up to 2 GiB minus a
# sector, in up to 32 ranges (what Linux's block layer will merge into one request).
MAX_DISCARD_SECTORS = 0x3F_FFFF
MAX_DISCARD_SEG = 32


@dataclass(frozen=True)
class BlkOptions:
    """The knobs of a virtio-blk device (from the config file's [[disk]] table)."""

    serial: bytes = b""
    num_queues: int = 1
    queue_size: int = 256
    blk_size: int = SECTOR_SIZE
    size_max: int = 0  # 0: not offered (no limit on one segment's size)
    seg_max: int = 0  # 0: queue_size - 2, as QEMU offers
    discard: bool = True  # offer DISCARD and WRITE_ZEROES
    packed: bool = True  # offer VIRTIO_F_RING_PACKED


class VirtioBlk:
    """A virtio-blk device over a :class:`~iovirt.backends.block.BlockBackend`."""

    device_id = VIRTIO_ID_BLOCK

    def __init__(self, backend: BlockBackend, options: BlkOptions = BlkOptions()) -> None:
        if not 1 <= options.num_queues <= 64:
            raise ValueError("num_queues must be 1-64")
        if options.queue_size < 4 or options.queue_size & (options.queue_size - 1):
            raise ValueError("queue_size must be a power of two >= 4")
        if options.queue_size > QUEUE_MAX_SIZE:
            raise ValueError(f"queue_size must be at most {QUEUE_MAX_SIZE}")
        if options.blk_size < SECTOR_SIZE or options.blk_size & (options.blk_size - 1):
            raise ValueError("blk_size must be a power of two >= 512")
        if len(options.serial) > VIRTIO_BLK_ID_BYTES:
            raise ValueError(f"serial is longer than {VIRTIO_BLK_ID_BYTES} bytes")
        self.backend = backend
        self.options = options
        self.num_queues = options.num_queues
        self.queue_max_size = options.queue_size
        self.seg_max = options.seg_max or options.queue_size - 2
        self.engine: BlkEngine | None = None
        self._platform: Platform | None = None
        self._activation: Activation | None = None
        # The host I/O loop's error callback and a vCPU's reset both use the engine: a
        # reset must not free it (and close its error fd) under the callback.
        self._engine_lock = threading.Lock()
        # A guest can break a queue again after every reset: count, log only the first few.
        self.queue_errors = GuestAccessLog("virtio-blk", log, what="broken queues")
        self.config = _CONFIG.pack(
            backend.size // SECTOR_SIZE,  # capacity, always in 512-byte sectors
            options.size_max,
            self.seg_max,
            0,  # geometry: not offered
            0,
            0,
            options.blk_size,
            0,  # topology: not offered
            0,
            0,
            0,
            0,  # writeback: no CONFIG_WCE, the cache mode is fixed (flush offered)
            0,
            options.num_queues,
            MAX_DISCARD_SECTORS,
            MAX_DISCARD_SEG,
            options.blk_size // SECTOR_SIZE,
            MAX_DISCARD_SECTORS,
            MAX_DISCARD_SEG,
            1,  # write_zeroes_may_unmap: a zeroed range may become a hole
        )

    def attach(self, platform: Platform) -> None:
        """Remember the platform, for watching the engine's error eventfd."""
        self._platform = platform

    # -- VirtioDevice --------------------------------------------------------------------

    def device_features(self) -> int:
        features = (
            1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_F_INDIRECT_DESC
            | 1 << VIRTIO_F_EVENT_IDX
            | 1 << VIRTIO_F_IN_ORDER
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
        )
        if self.options.packed:
            features |= 1 << VIRTIO_F_RING_PACKED
        if self.options.size_max:
            features |= 1 << VIRTIO_BLK_F_SIZE_MAX
        if self.options.num_queues > 1:
            features |= 1 << VIRTIO_BLK_F_MQ
        if self.backend.readonly:
            features |= 1 << VIRTIO_BLK_F_RO
        elif self.options.discard:
            features |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES
        return features

    def config_read(self, offset: int, size: int) -> int:
        if offset < 0 or size <= 0 or offset + size > CONFIG_SIZE:
            return 0
        return int.from_bytes(self.config[offset : offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        """Every field is read-only here (writeback needs CONFIG_WCE, not offered)."""

    def activate(self, activation: Activation) -> None:
        self.reset()
        memory: GuestMemory = activation.memory
        config = BlkEngineConfig(
            fd=self.backend.fd,
            capacity=self.backend.size // SECTOR_SIZE,
            blk_size=self.options.blk_size,
            seg_max=self.seg_max,
            size_max=self.options.size_max,
            readonly=self.backend.readonly,
            flush=activation.has(VIRTIO_BLK_F_FLUSH),
            discard=activation.has(VIRTIO_BLK_F_DISCARD),
            write_zeroes=activation.has(VIRTIO_BLK_F_WRITE_ZEROES),
            max_discard_sectors=MAX_DISCARD_SECTORS,
            max_discard_seg=MAX_DISCARD_SEG,
            max_write_zeroes_sectors=MAX_DISCARD_SECTORS,
            max_write_zeroes_seg=MAX_DISCARD_SEG,
            serial=self.options.serial,
        )
        flags = queue_flags(activation.features)
        engine = BlkEngine(memory, config, self.num_queues)
        try:
            for q, queue in enumerate(activation.queues[: self.num_queues]):
                if not queue.enabled:
                    continue
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
            for q, queue in enumerate(activation.queues[: self.num_queues]):
                if queue.enabled:
                    engine.start_queue(q)
        except BaseException:
            engine.close()
            raise
        with self._engine_lock:
            self.engine = engine
            self._activation = activation
        if self._platform is not None:
            self._platform.watch(engine.error_fd, self._on_queue_error)

    def _on_queue_error(self) -> None:
        """A worker found a malformed ring or chain: the device needs a reset."""
        with self._engine_lock:
            engine, activation = self.engine, self._activation
            if engine is None or activation is None:
                return
            try:
                os.eventfd_read(engine.error_fd)
            except BlockingIOError:
                return
            errors = [engine.queue_error(q) for q in range(self.num_queues)]
        reasons = [os.strerror(-e) if e else "ok" for e in errors]
        self.queue_errors(f"the driver broke a queue (errors {reasons}); device needs reset")
        activation.needs_reset()

    def reset(self) -> None:
        with self._engine_lock:
            engine, self.engine = self.engine, None
            self._activation = None
            if engine is None:
                return
            if self._platform is not None:
                self._platform.unwatch(engine.error_fd)
            try:
                engine.close()  # stops and joins the workers first
            except IovirtError:
                log.exception("virtio-blk: stopping the data path failed")

    def close(self) -> None:
        """VM teardown: stop the data path (durability: completed flushes are already on
        disk) and close the backend."""
        self.reset()
        self.backend.close()


def queue_flags(features: int) -> QueueFlags:
    """The ring features a queue uses, from the negotiated feature bits."""
    flags = QueueFlags(0)
    if features >> VIRTIO_F_RING_PACKED & 1:
        flags |= QueueFlags.PACKED
    if features >> VIRTIO_F_EVENT_IDX & 1:
        flags |= QueueFlags.EVENT_IDX
    if features >> VIRTIO_F_INDIRECT_DESC & 1:
        flags |= QueueFlags.INDIRECT
    if features >> VIRTIO_F_IN_ORDER & 1:
        flags |= QueueFlags.IN_ORDER
    return flags
