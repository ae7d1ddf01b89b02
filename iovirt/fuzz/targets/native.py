"""The libFuzzer targets compiled from C (csrc/fuzz/), and their seed inputs."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from iovirt.memory import GuestMemory


@dataclass(frozen=True)
class CTarget:
    """A libFuzzer target compiled from C (built by its script, run as a binary)."""

    name: str
    summary: str
    source: str  # relative to the repository root
    build_script: str
    binary: str  # relative to the repository root
    seeds: Callable[[], list[bytes]]  # inputs in the binary's own format


# The C targets' guest RAM (csrc/fuzz/fuzz_common.h): two 64 KiB regions with a hole.
_C_REGIONS = [(0, 0x10000), (0x20000, 0x10000)]
_C_SERVE_ROUND = struct.pack("<HHB", 0x3FFF, 0, 1)  # poke a spare dword, then serve


def _c_ring_image(packed: bool, chains: list[tuple[list[bytes], list[int], bool]]) -> Any:
    """Lay out a 32-entry queue at the start of RAM with ``chains`` (readable buffers,
    writable lengths, indirect) made available; returns (driver, RAM image of region 0)."""
    from iovirt.testing.virtio_driver import make_driver

    with GuestMemory(_C_REGIONS, name="iovirt-fuzz-seed") as memory:
        driver = make_driver(memory, 32, 0, packed=packed)
        for readable, writable, indirect in chains:
            driver.add_chain(readable, writable, indirect=indirect)
        image = bytes(memory.regions[0].mapping).rstrip(b"\0")
    return driver, image


def _ring_flags(packed: bool) -> int:
    return 0x4 | (0x1 if packed else 0)  # INDIRECT, and PACKED


def virtqueue_c_seeds() -> list[bytes]:
    """Split and packed queues with a few well-formed chains (csrc/fuzz/virtqueue_fuzz.c)."""
    out = []
    for packed in (False, True):
        chains = [([b"header" * 3], [64], False), ([b"a" * 40, b"b" * 8], [16, 1], True)]
        driver, image = _c_ring_image(packed, chains)
        header = struct.pack(
            "<BHIIIH",
            _ring_flags(packed) | 0x2,  # with EVENT_IDX
            driver.size,
            driver.desc_gpa,
            driver.driver_gpa,
            driver.device_gpa,
            len(image),
        )
        rounds = struct.pack("<HHB", 0x3FFF, 0, 0x80) + struct.pack("<HHB", 0x3FFF, 0, 2)
        out.append(header + image + rounds)
    return out


def blk_c_seeds() -> list[bytes]:
    """virtio-blk requests of every type on split and packed queues (csrc/fuzz/blk_fuzz.c)."""
    request = struct.Struct("<IIQ")  # type, reserved, sector
    segment = struct.Struct("<QII")  # discard / write-zeroes: sector, sectors, flags
    chains = [
        ([request.pack(0, 0, 1)], [512, 1], False),  # read
        ([request.pack(1, 0, 2), b"\x42" * 1024], [1], False),  # write
        ([request.pack(4, 0, 0)], [1], False),  # flush
        ([request.pack(8, 0, 0)], [20, 1], True),  # get id
        ([request.pack(11, 0, 0), segment.pack(8, 4, 0)], [1], False),  # discard
        ([request.pack(13, 0, 0), segment.pack(16, 2, 1)], [1], False),  # write zeroes
        ([request.pack(99, 0, 0)], [1], False),  # unsupported
    ]
    out = []
    # Split and packed rings on a healthy backend; then the host side failing under the
    # same requests: writes to /dev/full, a read-only fd, an image cut short.
    for packed, host in ((False, 0), (True, 0), (False, 0x10), (False, 0x20), (True, 0x40)):
        driver, image = _c_ring_image(packed, chains)
        header = struct.pack(
            "<BBHIIIBHH",
            _ring_flags(packed),
            0b1110 | host,  # FLUSH, DISCARD, WRITE_ZEROES
            driver.size,
            driver.desc_gpa,
            driver.driver_gpa,
            driver.device_gpa,
            0,
            0,
            len(image),
        )
        out.append(header + image + _C_SERVE_ROUND)
    return out
