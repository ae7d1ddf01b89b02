"""Config-space virtualisation of a passed-through PCI function (iovirt.vfio.device),
against the VFIO simulator: what the guest sees, what reaches the device, what does not."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from iovirt.vfio.device import capabilities
from iovirt.vfio.simulator import (
    PassthroughRig,
    SimulatedBar,
    SimulatedMsi,
    SimulatedMsix,
    SimulatedPciDevice,
)

PCIE_CAP = 0x10
PCIE_BODY = bytes(range(0x20, 0x2E))  # 14 bytes the device owns


def nvme_like(**kw: object) -> SimulatedPciDevice:
    """An NVMe-shaped function: 16 KiB 64-bit BAR0 with the MSI-X table and PBA in its upper
    pages, an I/O BAR, MSI, MSI-X and a PCIe capability the guest reaches through VFIO."""
    options: dict[str, object] = {
        "bars": {
            0: SimulatedBar(0x4000, "mem64"),
            2: SimulatedBar(0x100, "io"),
            4: SimulatedBar(0x1000, "mem32", prefetchable=True),
        },
        "msix": SimulatedMsix(table_size=4, bar=0, table_offset=0x2000, pba_offset=0x3000),
        "msi": SimulatedMsi(vectors=4, is_64bit=True, per_vector_mask=True),
        "extra_caps": [(PCIE_CAP, PCIE_BODY)],
    }
    options.update(kw)
    return SimulatedPciDevice(**options)  # type: ignore[arg-type]


Rig = PassthroughRig


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(nvme_like(), tmp_path)
    yield r
    r.close()


def writes_to(sim: SimulatedPciDevice, start: int, end: int) -> list[tuple[int, bytes]]:
    return [(o, d) for o, d in sim.config_writes if o < end and start < o + len(d)]


def test_identity_comes_from_the_device(rig: Rig) -> None:
    d = rig.device
    assert d.config_read(0, 2) == 0x1B36
    assert d.config_read(2, 2) == 0x0010
    assert d.config_read(8, 4) == 0x010802 << 8 | 2
    assert d.config_read(0x2C, 4) == 0x1100 << 16 | 0x1AF4


def test_multifunction_bit_is_hidden(tmp_path: Path) -> None:
    r = Rig(nvme_like(multifunction=True), tmp_path)
    try:
        assert r.sim.config[0x0E] == 0x80
        assert r.device.config_read(0x0E, 1) == 0
    finally:
        r.close()


def test_interrupt_line_and_pin_are_the_boards(rig: Rig) -> None:
    # The host firmware's line (0x0b) must not leak: the guest sees the GSI it is routed to.
    assert rig.device.config_read(0x3D, 1) == 1
    assert rig.device.config_read(0x3C, 1) == 17


def test_bar_sizing_is_answered_here_and_never_reaches_the_device(rig: Rig) -> None:
    d = rig.device
    d.config_write(0x10, 4, 0xFFFF_FFFF)
    d.config_write(0x14, 4, 0xFFFF_FFFF)
    assert d.config_read(0x10, 4) == (~(0x4000 - 1) & 0xFFFF_FFF0) | 0x4  # 64-bit memory
    assert d.config_read(0x14, 4) == 0xFFFF_FFFF
    d.config_write(0x18, 4, 0xFFFF_FFFF)
    assert d.config_read(0x18, 4) == (~(0x100 - 1) & 0xFFFF_FFFC) | 0x1  # I/O
    d.config_write(0x20, 4, 0xFFFF_FFFF)
    assert d.config_read(0x20, 4) == (~(0x1000 - 1) & 0xFFFF_FFF0) | 0x8  # prefetchable
    assert writes_to(rig.sim, 0x10, 0x28) == []


def test_expansion_rom_is_not_offered(rig: Rig) -> None:
    rig.device.config_write(0x30, 4, 0xFFFF_F800)
    assert rig.device.config_read(0x30, 4) == 0
    assert writes_to(rig.sim, 0x30, 0x34) == []


def test_command_is_kept_and_forwarded(rig: Rig) -> None:
    d = rig.device
    d.config_write(0x04, 2, 0x0006)  # memory + bus master
    assert d.config_read(0x04, 2) == 0x0006
    assert rig.sim.config[0x04] & 0x06 == 0x06  # the device decodes and masters too
    d.config_write(0x04, 2, 0x0400)  # INTx disable, everything else off
    assert d.config_read(0x04, 2) == 0x0400
    assert struct.unpack_from("<H", rig.sim.config, 4)[0] & 0x0407 == 0x0400


def test_status_and_other_capabilities_pass_through(rig: Rig) -> None:
    d = rig.device
    assert d.config_read(0x06, 2) & 0x10  # capability list, from the device
    rig.sim.config[0x06] |= 0x08  # the device raises INTx status
    assert d.config_read(0x06, 2) & 0x08
    offset = rig.sim.cap_offsets[PCIE_CAP]
    assert offset % 4 == 0
    assert d.config_read(offset + 2, 2) == int.from_bytes(PCIE_BODY[:2], "little")
    assert d.config_read(offset + 4, 4) == int.from_bytes(PCIE_BODY[2:6], "little")
    d.config_write(offset + 4, 4, 0xA5A5_5A5A)
    assert (offset + 4, bytes.fromhex("5a5aa5a5")) in rig.sim.config_writes
    assert d.config_read(offset + 4, 4) == 0xA5A5_5A5A


def test_a_dword_across_command_and_status_splits(rig: Rig) -> None:
    # COMMAND is emulated, STATUS belongs to the device: one 4-byte write feeds both.
    rig.sim.writable[0x07] = 0xF9  # RW1C error bits, as far as the simulator cares
    rig.device.config_write(0x04, 4, 0xF900_0002)
    assert rig.device.config_read(0x04, 2) == 0x0002
    assert (0x06, b"\x00\xf9") in rig.sim.config_writes


def test_capability_list_is_the_devices(rig: Rig) -> None:
    walked = [(cap_id, off) for cap_id, off in capabilities(bytes(rig.sim.config))]
    seen = []
    pointer = rig.device.config_read(0x34, 1)
    while pointer:
        seen.append((rig.device.config_read(pointer, 1), pointer))
        pointer = rig.device.config_read(pointer + 1, 1)
    assert seen == walked
    assert [cap_id for cap_id, _ in seen] == [0x05, 0x11, PCIE_CAP]


def test_msix_capability_is_emulated(rig: Rig) -> None:
    d = rig.device
    off = rig.sim.cap_offsets[0x11]
    assert d.config_read(off + 2, 2) == 3  # table size 4, disabled
    assert d.config_read(off + 4, 4) == 0x2000  # table at BAR0 + 0x2000
    assert d.config_read(off + 8, 4) == 0x3000
    d.config_write(off + 4, 4, 0x1234_5674)  # read-only
    d.config_write(off + 2, 2, 0xC7FF)  # only Enable and Function Mask stick
    assert d.config_read(off + 2, 2) == 0xC003
    assert d.config_read(off + 4, 4) == 0x2000
    assert writes_to(rig.sim, off, off + 12) == []


def test_msi_capability_is_emulated(rig: Rig) -> None:
    d = rig.device
    off = rig.sim.cap_offsets[0x05]
    control = d.config_read(off + 2, 2)
    assert control & 0x80 and control & 0x100  # 64-bit, per-vector masking
    assert (control >> 1) & 7 == 2  # 4 vectors capable
    d.config_write(off + 4, 4, 0xFEE0_1003)
    assert d.config_read(off + 4, 4) == 0xFEE0_1000  # bits 1:0 reserved
    assert writes_to(rig.sim, off, off + 24) == []


def test_odd_config_accesses_read_all_ones(rig: Rig) -> None:
    assert rig.device.config_read(0xFE, 4) == 0xFFFF_FFFF
    assert rig.device.config_read(0x03, 2) == 0xFFFF  # unaligned
    rig.device.config_write(0xFF, 2, 0)  # ignored, no exception
    assert rig.sim.config_writes == [] or all(o != 0xFF for o, _ in rig.sim.config_writes)


def test_capability_walk_survives_a_loop() -> None:
    config = bytearray(256)
    config[0x06] = 0x10
    config[0x34] = 0x40
    config[0x40], config[0x41] = 0x09, 0x50
    config[0x50], config[0x51] = 0x09, 0x40  # back to the first: a loop
    assert capabilities(bytes(config)) == [(0x09, 0x40), (0x09, 0x50)]


def test_reset_on_open_and_on_close(tmp_path: Path) -> None:
    r = Rig(nvme_like(), tmp_path)
    assert r.sim.resets == 1
    assert r.device.reset_method == "function reset"
    r.device.close()
    assert r.sim.resets == 2
    r.close()


def test_hot_reset_when_no_function_reset(tmp_path: Path) -> None:
    sim = nvme_like(reset=False)
    sim.hot_reset_groups = [sim.group]
    r = Rig(sim, tmp_path)
    try:
        assert r.device.reset_method == "bus reset"
        assert sim.hot_resets == 1
    finally:
        r.close()


def test_no_hot_reset_when_it_would_hit_foreign_groups(tmp_path: Path) -> None:
    sim = nvme_like(reset=False)
    sim.hot_reset_groups = [sim.group, 9]  # group 9 is not ours
    r = Rig(sim, tmp_path)
    try:
        assert r.device.reset_method is None
        assert sim.hot_resets == 0
    finally:
        r.close()


def test_close_releases_the_device_fd(tmp_path: Path) -> None:
    r = Rig(nvme_like(), tmp_path)
    fd = r.device.fd
    r.device.close()
    assert fd not in r.kernel.fds
    assert r.device.fd == -1
    r.device.close()  # idempotent
    r.close()
