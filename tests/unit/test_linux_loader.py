"""Tests of the Linux x86-64 direct boot loader: bzImage checks, the e820 map, and what
``load_linux`` leaves in guest RAM and in the boot vCPU's registers.

Everything is read back at the raw offsets of Documentation/arch/x86/boot.rst (setup header
fields, ``struct boot_params``) and of the x86 paging and descriptor formats, not through the
cffi structs the loader fills, so a field written in the wrong place shows up here. The
kernels are fake bzImages built below (a 1024-byte setup with the header fields set at their
boot.rst offsets, then a payload), plus the real Debian kernel in /boot when it is there.
Guest RAM is a real :class:`GuestMemory` with the VM's own layout; the vCPU is a recording
stand-in (no KVM is needed).
"""

from __future__ import annotations

import glob
import itertools
import struct
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

import pytest

from iovirt._native import ffi
from iovirt.boot import layout
from iovirt.boot.linux import KernelImageError, LinuxImage, e820_map, load_linux, parse_bzimage
from iovirt.errors import UserError
from iovirt.memory import GuestMemory
from iovirt.vm import ram_layout

if TYPE_CHECKING:
    from iovirt.kvm import KvmVcpu

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

# Setup header (boot.rst "The real-mode kernel header").
OFF_SETUP_SECTS = 0x1F1
OFF_BOOT_FLAG = 0x1FE
OFF_HEADER = 0x202
OFF_VERSION = 0x206
OFF_TYPE_OF_LOADER = 0x210
OFF_LOADFLAGS = 0x211
OFF_CODE32_START = 0x214
OFF_RAMDISK_IMAGE = 0x218
OFF_RAMDISK_SIZE = 0x21C
OFF_HEAP_END_PTR = 0x224
OFF_CMD_LINE_PTR = 0x228
OFF_INITRD_ADDR_MAX = 0x22C
OFF_KERNEL_ALIGNMENT = 0x230
OFF_RELOCATABLE_KERNEL = 0x234
OFF_XLOADFLAGS = 0x236
OFF_CMDLINE_SIZE = 0x238
OFF_PREF_ADDRESS = 0x258
OFF_INIT_SIZE = 0x260
# struct boot_params (boot.rst "The zero page" / zero-page.rst).
OFF_E820_ENTRIES = 0x1E8
OFF_E820_TABLE = 0x2D0
E820_ENTRY_SIZE = 20

LOADED_HIGH = 0x01
KEEP_SEGMENTS = 0x40
CAN_USE_HEAP = 0x80
XLF_KERNEL_64 = 0x01
XLF_CAN_BE_LOADED_ABOVE_4G = 0x02

E820_RAM = 1
E820_RESERVED = 2

CR0_PE = 1 << 0
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

SETUP_SIZE = 1024  # setup_sects = 1: the boot sector plus one sector of setup code
PAYLOAD = bytes(range(256)) * 256 + b"END-OF-KERNEL"  # 64 KiB + a tail, not page-sized
REAL_KERNELS = sorted(glob.glob("/boot/vmlinuz-*"))


def fake_bzimage(
    *,
    payload: bytes = PAYLOAD,
    setup_sects: int = 1,
    boot_flag: int = 0xAA55,
    magic: bytes = b"HdrS",
    version: int = 0x020F,
    xloadflags: int = XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G,
    init_size: int = 4 * MiB,
    initrd_addr_max: int = 0x7FFF_FFFF,
    cmdline_size: int = 2047,
    pref_address: int = 0x100_0000,
    kernel_alignment: int = 0x20_0000,
    relocatable: int = 1,
) -> bytes:
    """A bzImage with a ``(setup_sects + 1) * 512``-byte setup and ``payload`` after it."""
    setup = bytearray(((setup_sects or 4) + 1) * 512)  # 0 means 4, as in parse_bzimage
    struct.pack_into("<B", setup, OFF_SETUP_SECTS, setup_sects)
    struct.pack_into("<H", setup, OFF_BOOT_FLAG, boot_flag)
    struct.pack_into("<4s", setup, OFF_HEADER, magic)
    struct.pack_into("<H", setup, OFF_VERSION, version)
    struct.pack_into("<B", setup, OFF_LOADFLAGS, LOADED_HIGH)
    struct.pack_into("<I", setup, OFF_CODE32_START, 0x10_0000)
    struct.pack_into("<I", setup, OFF_INITRD_ADDR_MAX, initrd_addr_max)
    struct.pack_into("<I", setup, OFF_KERNEL_ALIGNMENT, kernel_alignment)
    struct.pack_into("<B", setup, OFF_RELOCATABLE_KERNEL, relocatable)
    struct.pack_into("<H", setup, OFF_XLOADFLAGS, xloadflags)
    struct.pack_into("<I", setup, OFF_CMDLINE_SIZE, cmdline_size)
    struct.pack_into("<Q", setup, OFF_PREF_ADDRESS, pref_address)
    struct.pack_into("<I", setup, OFF_INIT_SIZE, init_size)
    return bytes(setup) + payload


class RecordingVcpu:
    """A recording stand-in for ``KvmVcpu`` (no KVM): ``get_regs``/``get_sregs`` hand out
    zeroed ``struct kvm_regs``/``struct kvm_sregs``, ``set_regs``/``set_sregs`` record
    what the loader sets, so the test reads the registers a real vCPU would have got."""

    def __init__(self) -> None:
        self.regs: Any = None
        self.sregs: Any = None
        self.calls: list[str] = []

    def get_regs(self) -> Any:
        self.calls.append("get_regs")
        return ffi.new("struct kvm_regs *")

    def get_sregs(self) -> Any:
        self.calls.append("get_sregs")
        return ffi.new("struct kvm_sregs *")

    def set_regs(self, regs: Any) -> None:
        self.calls.append("set_regs")
        self.regs = regs

    def set_sregs(self, sregs: Any) -> None:
        self.calls.append("set_sregs")
        self.sregs = sregs


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory(ram_layout(64 * MiB)) as mem:
        yield mem


def image(**fields: Any) -> LinuxImage:
    return parse_bzimage("bzImage", fake_bzimage(**fields))


def boot(
    memory: GuestMemory,
    img: LinuxImage | None = None,
    cmdline: str = "console=ttyS0 root=/dev/vda",
    initrd: bytes | None = None,
) -> RecordingVcpu:
    vcpu = RecordingVcpu()
    load_linux(
        memory, cast("KvmVcpu", vcpu), img or image(), cmdline, initrd, initrd_path="initrd.img"
    )
    return vcpu


def zp_u8(memory: GuestMemory, off: int) -> int:
    return memory.read_u8(layout.BOOT_PARAMS_ADDR + off)


def zp_u16(memory: GuestMemory, off: int) -> int:
    return memory.read_u16(layout.BOOT_PARAMS_ADDR + off)


def zp_u32(memory: GuestMemory, off: int) -> int:
    return memory.read_u32(layout.BOOT_PARAMS_ADDR + off)


def zp_e820(memory: GuestMemory) -> list[tuple[int, int, int]]:
    count = zp_u8(memory, OFF_E820_ENTRIES)
    raw = memory.read(layout.BOOT_PARAMS_ADDR + OFF_E820_TABLE, count * E820_ENTRY_SIZE)
    return [
        cast("tuple[int, int, int]", struct.unpack_from("<QQI", raw, i * E820_ENTRY_SIZE))
        for i in range(count)
    ]


def one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text
    return text


# -- parse_bzimage ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 16, 0x1F1, 0x1F1 + 100])
def test_too_short_data_is_rejected_naming_the_path(size: int) -> None:
    with pytest.raises(KernelImageError) as exc:
        parse_bzimage("/tmp/vmlinuz-short", fake_bzimage()[:size])
    assert exc.value.path == "/tmp/vmlinuz-short"
    assert one_line(exc.value).startswith("/tmp/vmlinuz-short: ")
    assert "too small" in str(exc.value)


def test_missing_hdrs_magic_is_rejected_naming_the_path() -> None:
    with pytest.raises(KernelImageError) as exc:
        parse_bzimage("/k/no-magic", fake_bzimage(magic=b"HdrZ"))
    assert exc.value.path == "/k/no-magic"
    assert "/k/no-magic" in one_line(exc.value) and "HdrS" in str(exc.value)


def test_bad_boot_flag_is_rejected_naming_the_path() -> None:
    with pytest.raises(KernelImageError) as exc:
        parse_bzimage("/k/bad-flag", fake_bzimage(boot_flag=0x55AA))
    assert exc.value.path == "/k/bad-flag"
    assert "/k/bad-flag" in one_line(exc.value)


@pytest.mark.parametrize("version", [0x0200, 0x020A, 0x020B])
def test_protocol_older_than_2_12_is_rejected(version: int) -> None:
    with pytest.raises(KernelImageError) as exc:
        parse_bzimage("/k/old", fake_bzimage(version=version))
    assert exc.value.path == "/k/old"
    text = one_line(exc.value)
    assert f"{version >> 8}.{version & 0xFF}" in text and "2.12" in text


@pytest.mark.parametrize("version", [0x020C, 0x020F, 0x0210])
def test_protocol_2_12_and_newer_is_accepted(version: int) -> None:
    assert parse_bzimage("k", fake_bzimage(version=version)).version == version


def test_kernel_without_xlf_kernel_64_is_rejected() -> None:
    with pytest.raises(KernelImageError) as exc:
        parse_bzimage("/k/32bit", fake_bzimage(xloadflags=XLF_CAN_BE_LOADED_ABOVE_4G))
    assert exc.value.path == "/k/32bit"
    assert "64-bit" in one_line(exc.value)


@pytest.mark.parametrize(
    ("setup_sects", "length"),
    [(1, SETUP_SIZE), (1, SETUP_SIZE - 1), (8, 9 * 512), (8, 2048), (0, 5 * 512)],
)
def test_truncated_image_is_rejected(setup_sects: int, length: int) -> None:
    data = fake_bzimage(setup_sects=setup_sects, payload=b"x" * 8192)[:length]
    with pytest.raises(KernelImageError) as exc:
        parse_bzimage("/k/truncated", data)
    assert exc.value.path == "/k/truncated"
    assert "truncated" in one_line(exc.value)


def test_kernel_image_error_is_a_user_error() -> None:
    with pytest.raises(UserError):
        parse_bzimage("k", b"")


def test_fake_bzimage_splits_into_setup_and_kernel() -> None:
    data = fake_bzimage(init_size=5 * MiB, initrd_addr_max=0x3FFF_FFFF, cmdline_size=511)
    img = parse_bzimage("bzImage", data)
    assert img.path == "bzImage"
    assert img.setup == data[:SETUP_SIZE]
    assert img.kernel == PAYLOAD
    assert img.init_size == 5 * MiB
    assert img.initrd_addr_max == 0x3FFF_FFFF
    assert img.cmdline_size == 511
    assert img.xloadflags & XLF_KERNEL_64


def test_setup_sects_zero_means_four() -> None:
    img = parse_bzimage("bzImage", fake_bzimage(setup_sects=0))
    assert len(img.setup) == 5 * 512
    assert img.kernel == PAYLOAD


@pytest.mark.skipif(not REAL_KERNELS, reason="no /boot/vmlinuz-* on this machine")
@pytest.mark.parametrize("path", REAL_KERNELS)
def test_real_debian_kernel_is_accepted(path: str) -> None:
    with open(path, "rb") as f:
        data = f.read()
    img = parse_bzimage(path, data)
    setup_sects = data[OFF_SETUP_SECTS] or 4
    assert len(img.kernel) == len(data) - (setup_sects + 1) * 512
    assert img.kernel == data[(setup_sects + 1) * 512 :]
    assert img.version >= 0x020C
    assert img.xloadflags & XLF_KERNEL_64
    assert img.init_size > len(img.kernel)  # it decompresses into more than it occupies
    assert img.cmdline_size >= 255


# -- e820 -------------------------------------------------------------------------------------


def test_e820_for_one_region(memory: GuestMemory) -> None:
    assert e820_map(memory) == [
        (0, 0x9_FC00, E820_RAM),
        (0x9_FC00, 0x10_0000 - 0x9_FC00, E820_RESERVED),
        (0x10_0000, 64 * MiB - 0x10_0000, E820_RAM),
    ]


def test_e820_for_two_regions_puts_the_rest_above_4g() -> None:
    with GuestMemory(ram_layout(4 * GiB)) as mem:  # sparse memfd: no real 4 GiB needed
        assert [(r.gpa, r.size) for r in mem.regions] == [(0, 3 * GiB), (4 * GiB, 1 * GiB)]
        entries = e820_map(mem)
    assert entries == [
        (0, 0x9_FC00, E820_RAM),
        (0x9_FC00, 0x6_0400, E820_RESERVED),
        (0x10_0000, 3 * GiB - 0x10_0000, E820_RAM),
        (4 * GiB, 1 * GiB, E820_RAM),
    ]
    # Nothing in the 32-bit hole [3 GiB, 4 GiB) is RAM.
    assert not any(a < 4 * GiB and a + s > 3 * GiB for a, s, _ in entries)


def test_e820_reserves_exactly_the_ebda_and_bios_window(memory: GuestMemory) -> None:
    reserved = [(a, a + s) for a, s, t in e820_map(memory) if t == E820_RESERVED]
    assert reserved == [(0x9_FC00, 0x10_0000)]
    assert layout.EBDA_START == 0x9_FC00 and layout.BIOS_AREA_END == 0x10_0000


def test_e820_entries_are_sorted_and_do_not_overlap(memory: GuestMemory) -> None:
    entries = e820_map(memory)
    for (a, s, _), (b, _, _) in itertools.pairwise(entries):
        assert a + s <= b


# -- load_linux: RAM ------------------------------------------------------------------------


def test_kernel_bytes_are_at_1_mib(memory: GuestMemory) -> None:
    boot(memory)
    assert memory.read(0x10_0000, len(PAYLOAD)) == PAYLOAD


def test_cmdline_is_nul_terminated_at_the_cmdline_address(memory: GuestMemory) -> None:
    cmdline = "console=ttyS0 root=/dev/vda rw quiet"
    boot(memory, cmdline=cmdline)
    ptr = zp_u32(memory, OFF_CMD_LINE_PTR)
    assert ptr == layout.CMDLINE_ADDR
    assert memory.read(ptr, len(cmdline) + 1) == cmdline.encode() + b"\0"


def test_zero_page_keeps_the_setup_header_and_marks_the_loader(memory: GuestMemory) -> None:
    boot(memory)
    assert zp_u16(memory, OFF_BOOT_FLAG) == 0xAA55
    assert memory.read(layout.BOOT_PARAMS_ADDR + OFF_HEADER, 4) == b"HdrS"
    assert zp_u16(memory, OFF_VERSION) == 0x020F
    assert zp_u8(memory, OFF_SETUP_SECTS) == 1
    assert zp_u8(memory, OFF_TYPE_OF_LOADER) == 0xFF  # undefined boot loader
    flags = zp_u8(memory, OFF_LOADFLAGS)
    assert flags & LOADED_HIGH and flags & CAN_USE_HEAP
    assert zp_u16(memory, OFF_HEAP_END_PTR) == 0xFE00
    assert zp_u32(memory, OFF_CODE32_START) == 0x10_0000
    assert zp_u32(memory, OFF_INIT_SIZE) == 4 * MiB


def test_zero_page_without_initrd_has_no_ramdisk(memory: GuestMemory) -> None:
    boot(memory)
    assert zp_u32(memory, OFF_RAMDISK_IMAGE) == 0
    assert zp_u32(memory, OFF_RAMDISK_SIZE) == 0


def test_zero_page_e820_table_matches_e820_map(memory: GuestMemory) -> None:
    boot(memory)
    assert zp_u8(memory, OFF_E820_ENTRIES) == 3
    assert zp_e820(memory) == e820_map(memory)


def test_zero_page_e820_table_with_ram_above_4g() -> None:
    with GuestMemory(ram_layout(4 * GiB)) as mem:
        boot(mem)
        assert zp_e820(mem) == e820_map(mem)
        assert zp_e820(mem)[-1] == (4 * GiB, 1 * GiB, E820_RAM)


def check_initrd(memory: GuestMemory, img: LinuxImage, initrd: bytes) -> int:
    addr = zp_u32(memory, OFF_RAMDISK_IMAGE)
    assert zp_u32(memory, OFF_RAMDISK_SIZE) == len(initrd)
    assert addr % 4096 == 0
    assert addr + len(initrd) <= img.initrd_addr_max + 1
    assert addr + len(initrd) <= memory.regions[0].size
    assert addr >= 0x10_0000 + max(len(img.kernel), img.init_size)
    assert memory.read(addr, len(initrd)) == initrd
    return addr


def test_initrd_is_page_aligned_at_the_top_of_low_ram(memory: GuestMemory) -> None:
    img = image()
    initrd = b"INITRD" + bytes(300 * KiB) + b"TAIL"  # not a multiple of a page
    boot(memory, img, initrd=initrd)
    addr = check_initrd(memory, img, initrd)
    assert 64 * MiB - (addr + len(initrd)) < 4096  # as high as it goes


def test_initrd_stays_below_initrd_addr_max(memory: GuestMemory) -> None:
    img = image(initrd_addr_max=48 * MiB - 1)
    initrd = b"R" * (MiB + 17)
    boot(memory, img, initrd=initrd)
    addr = check_initrd(memory, img, initrd)
    assert 48 * MiB - (addr + len(initrd)) < 4096


def test_initrd_stays_below_2g_with_3g_of_low_ram() -> None:
    img = image()  # initrd_addr_max 0x7fffffff, as real kernels say
    with GuestMemory(ram_layout(4 * GiB)) as mem:
        initrd = b"I" * (2 * MiB + 5)
        boot(mem, img, initrd=initrd)
        addr = check_initrd(mem, img, initrd)
        assert addr + len(initrd) <= 2 * GiB


# -- load_linux: page tables, GDT, registers --------------------------------------------------


def translate(memory: GuestMemory, cr3: int, va: int) -> int | None:
    """Walk 4-level paging from ``cr3`` for ``va``; the physical address or None."""
    table = cr3 & ~0xFFF
    for level, shift in enumerate((39, 30, 21, 12)):
        entry = memory.read_u64(table + 8 * ((va >> shift) & 0x1FF))
        if not entry & 1:
            return None
        if level in (1, 2) and entry & 0x80:  # 1 GiB or 2 MiB page
            page = entry & 0x000F_FFFF_FFFF_F000 & ~((1 << shift) - 1)
            return page | (va & ((1 << shift) - 1))
        table = entry & 0x000F_FFFF_FFFF_F000
    return table | (va & 0xFFF)


def test_page_tables_identity_map_4g_with_2m_pages(memory: GuestMemory) -> None:
    vcpu = boot(memory)
    cr3 = vcpu.sregs.cr3
    assert cr3 == layout.PML4_ADDR
    pml4e = memory.read_u64(cr3)
    assert pml4e & 0b11 == 0b11  # present, writable
    pdpt = pml4e & ~0xFFF
    for gib in range(4):
        pdpte = memory.read_u64(pdpt + 8 * gib)
        assert pdpte & 0b11 == 0b11 and not pdpte & 0x80  # points at a page directory
        pd = pdpte & ~0xFFF
        for j in range(512):
            pde = memory.read_u64(pd + 8 * j)
            assert pde & 0x83 == 0x83  # present, writable, PS: a 2 MiB page
            assert pde & 0x000F_FFFF_FFE0_0000 == (gib << 30) + (j << 21)
    for va in (0, 0x7000, 0x10_0200, 0x1F_FFFF, 0x20_0000, GiB + 12345, 0xFFFF_FFFF):
        assert translate(memory, cr3, va) == va
    assert translate(memory, cr3, 4 * GiB) is None  # only 4 GiB are mapped


def gdt_entry(memory: GuestMemory, base: int, selector: int) -> int:
    return memory.read_u64(base + (selector & ~7))


def test_gdt_has_64bit_code_at_0x10_and_data_at_0x18(memory: GuestMemory) -> None:
    vcpu = boot(memory)
    base = vcpu.sregs.gdt.base
    assert base == layout.GDT_ADDR
    assert vcpu.sregs.gdt.limit >= 0x18 + 7
    code = gdt_entry(memory, base, 0x10)
    data = gdt_entry(memory, base, 0x18)
    for desc in (code, data):
        assert desc >> 47 & 1  # present
        assert desc >> 44 & 1  # code/data, not system
        assert desc >> 45 & 3 == 0  # DPL 0
        assert desc >> 55 & 1  # 4 KiB granularity
        assert (desc >> 16 & 0xFF_FFFF) | (desc >> 56) << 24 == 0  # base 0
    assert code >> 43 & 1  # executable
    assert code >> 53 & 1  # L: 64-bit code
    assert not code >> 54 & 1  # D must be 0 when L is 1
    assert not data >> 43 & 1  # data
    assert data >> 41 & 1  # writable


def test_segment_registers_match_the_boot_selectors(memory: GuestMemory) -> None:
    sregs = boot(memory).sregs
    assert sregs.cs.selector == 0x10
    assert sregs.cs.l == 1 and sregs.cs.db == 0 and sregs.cs.present == 1
    for name in ("ds", "es", "fs", "gs", "ss"):
        seg = getattr(sregs, name)
        assert seg.selector == 0x18, name
        assert seg.l == 0 and seg.present == 1, name


def test_registers_enter_the_64bit_entry_in_long_mode(memory: GuestMemory) -> None:
    vcpu = boot(memory)
    assert vcpu.calls.count("set_sregs") == 1 and vcpu.calls.count("set_regs") == 1
    regs, sregs = vcpu.regs, vcpu.sregs
    assert regs.rip == 0x10_0200  # startup_64: load address + 0x200
    assert regs.rsi == layout.BOOT_PARAMS_ADDR
    assert regs.rflags & 0x2  # the always-one bit
    assert sregs.cr0 & (CR0_PE | CR0_PG) == CR0_PE | CR0_PG
    assert sregs.cr4 & CR4_PAE
    assert sregs.efer & (EFER_LME | EFER_LMA) == EFER_LME | EFER_LMA
    assert sregs.cs.l == 1


# -- load_linux: user errors ------------------------------------------------------------------


def test_longest_cmdline_the_kernel_takes_is_accepted(memory: GuestMemory) -> None:
    cmdline = "x" * 2047
    boot(memory, image(cmdline_size=2047), cmdline=cmdline)
    assert memory.read(layout.CMDLINE_ADDR, 2048) == cmdline.encode() + b"\0"


def test_over_long_cmdline_raises_user_error_naming_vm_cmdline(memory: GuestMemory) -> None:
    with pytest.raises(UserError) as exc:
        boot(memory, image(cmdline_size=2047), cmdline="x" * 2048)
    text = one_line(exc.value)
    assert text.startswith("vm.cmdline: ")
    assert "2047" in text


def test_too_little_memory_for_the_kernel_raises_user_error_naming_vm_memory() -> None:
    with GuestMemory(ram_layout(8 * MiB)) as mem:
        with pytest.raises(UserError) as exc:
            boot(mem, image(init_size=16 * MiB))
        text = one_line(exc.value)
        assert text.startswith("vm.memory: ")
        assert "bzImage" in text


def test_initrd_too_big_for_memory_raises_user_error_naming_vm_memory(
    memory: GuestMemory,
) -> None:
    with pytest.raises(UserError) as exc:
        boot(memory, initrd=bytes(62 * MiB))
    text = one_line(exc.value)
    assert text.startswith("vm.memory: ")
    assert "initrd.img" in text


# The kernel's runtime start is not where the loader puts the bzImage: boot.rst's init_size
# entry ("kernel runtime start address") says a relocatable kernel loaded below pref_address
# moves to align_up(pref_address, kernel_alignment) before it decompresses, and needs init_size
# bytes from there (real kernels: pref_address = 16 MiB, init_size ~64 MiB for Debian's 6.1).


def test_too_little_memory_counts_init_size_from_pref_address() -> None:
    # The kernel needs [16 MiB, 24 MiB); 20 MiB of RAM is not enough.
    img = image(pref_address=16 * MiB, init_size=8 * MiB)
    with GuestMemory(ram_layout(20 * MiB)) as mem:
        with pytest.raises(UserError) as exc:
            boot(mem, img)
        assert one_line(exc.value).startswith("vm.memory: ")


def test_initrd_that_would_overlap_the_kernels_runtime_area_is_refused() -> None:
    # Runtime area [16 MiB, 48 MiB); a 20 MiB initrd fits in 64 MiB only by overlapping it.
    img = image(pref_address=16 * MiB, init_size=32 * MiB)
    with GuestMemory(ram_layout(64 * MiB)) as mem:
        with pytest.raises(UserError) as exc:
            boot(mem, img, initrd=bytes(20 * MiB))
        assert one_line(exc.value).startswith("vm.memory: ")
