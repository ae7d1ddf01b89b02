"""Direct boot of a Linux x86-64 bzImage: the 64-bit boot protocol.

We do what a boot loader does (Documentation/arch/x86/boot.rst): check the setup header,
load the protected-mode kernel at 1 MiB, fill the zero page (``struct boot_params``:
setup header copy, e820 map, command line and initrd pointers), and start the BSP at the
64-bit entry point (load address + 0x200) in long mode with identity-mapped page tables,
a flat GDT with ``__BOOT_CS``/``__BOOT_DS``, and ``%rsi`` pointing at the zero page.
Structure layouts come from <asm/bootparam.h> through cffi, so no offset is hand-counted.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from iovirt._native import ffi, lib
from iovirt.boot import layout
from iovirt.errors import UserError

if TYPE_CHECKING:
    from iovirt.kvm import KvmVcpu
    from iovirt.memory import GuestMemory

SETUP_HEADER_OFFSET = 0x1F1
HDRS_MAGIC = 0x5372_6448  # "HdrS"
BOOT_FLAG = 0xAA55
MIN_PROTOCOL = 0x020C  # 2.12: xloadflags, the 64-bit entry point
ENTRY_64_OFFSET = 0x200
TYPE_OF_LOADER_UNDEFINED = 0xFF

E820_RAM = 1
E820_RESERVED = 2

# Control register and EFER bits for long mode.
CR0_PE = 1 << 0
CR0_ET = 1 << 4
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

# Page-table entry bits.
PTE_PRESENT = 1 << 0
PTE_WRITE = 1 << 1
PTE_PS = 1 << 7  # 2 MiB page in a page directory

BOOT_CS = 0x10
BOOT_DS = 0x18
IDENTITY_MAP_SIZE = 4 << 30


class KernelImageError(UserError):
    """The kernel file is not a bzImage this loader can boot (names the file and why)."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        super().__init__(f"{path}: {problem}")


@dataclass(frozen=True)
class LinuxImage:
    """A parsed bzImage: the setup header fields we need and the protected-mode part."""

    path: str
    setup: bytes  # boot sector + real-mode setup (holds the setup header)
    kernel: bytes  # the protected-mode kernel, loaded at 1 MiB
    version: int
    init_size: int
    initrd_addr_max: int
    cmdline_size: int
    xloadflags: int
    pref_address: int
    kernel_alignment: int

    @property
    def runtime_start(self) -> int:
        """Where the kernel runs after decompressing itself; ``init_size`` counts from
        here, not from the load address (boot.rst, and kernel commit be4ca6c53e66)."""
        align = self.kernel_alignment or 1
        start = max(layout.KERNEL_LOAD_ADDR, self.pref_address)
        return (start + align - 1) // align * align

    @property
    def end(self) -> int:
        """First byte above everything the kernel occupies while it boots."""
        return max(layout.KERNEL_LOAD_ADDR + len(self.kernel), self.runtime_start + self.init_size)


def parse_bzimage(path: str, data: bytes) -> LinuxImage:
    """Check that ``data`` is a 64-bit-capable bzImage and split it."""
    hdr_size = ffi.sizeof("struct setup_header")
    if len(data) < SETUP_HEADER_OFFSET + hdr_size:
        raise KernelImageError(path, "too small to be a Linux kernel (bzImage)")
    buf = ffi.new("char[]", data[SETUP_HEADER_OFFSET : SETUP_HEADER_OFFSET + hdr_size])
    hdr = ffi.cast("struct setup_header *", buf)
    if hdr.header != HDRS_MAGIC or hdr.boot_flag != BOOT_FLAG:
        raise KernelImageError(path, "not a Linux bzImage (no 'HdrS' setup header)")
    if hdr.version < MIN_PROTOCOL:
        raise KernelImageError(
            path,
            f"boot protocol {hdr.version >> 8}.{hdr.version & 0xFF} is too old; "
            "iovirt needs 2.12 or newer",
        )
    if not hdr.xloadflags & lib.XLF_KERNEL_64:
        raise KernelImageError(path, "kernel has no 64-bit entry point (not an x86-64 kernel)")
    setup_sects = hdr.setup_sects or 4  # 0 means 4, for ancient reasons
    setup_size = (setup_sects + 1) * 512
    if len(data) <= setup_size:
        raise KernelImageError(path, "truncated: no protected-mode kernel after the setup code")
    return LinuxImage(
        path=path,
        setup=data[:setup_size],
        kernel=data[setup_size:],
        version=int(hdr.version),
        init_size=int(hdr.init_size),
        initrd_addr_max=int(hdr.initrd_addr_max),
        cmdline_size=int(hdr.cmdline_size),
        xloadflags=int(hdr.xloadflags),
        pref_address=int(hdr.pref_address),
        kernel_alignment=int(hdr.kernel_alignment),
    )


KERNEL_VERSION_PTR = 0x20E  # setup header: kernel_version, an offset from 0x200


def kernel_release(data: bytes) -> str | None:
    """The release string a bzImage carries (``6.1.0-56-amd64``), or None if it has none.

    Used to pick the matching /lib/modules/<release> when building a guest initramfs."""
    if len(data) < KERNEL_VERSION_PTR + 2:
        return None
    ptr = int.from_bytes(data[KERNEL_VERSION_PTR : KERNEL_VERSION_PTR + 2], "little")
    if ptr == 0:
        return None
    start = ptr + 0x200
    text = data[start : start + 256].split(b"\0", 1)[0]
    release = text.split(b" ", 1)[0].decode("ascii", "replace")
    return release or None


def e820_map(memory: GuestMemory) -> list[tuple[int, int, int]]:
    """(addr, size, type) entries: low RAM up to the EBDA, the reserved BIOS area, the rest."""
    entries: list[tuple[int, int, int]] = []
    for region in memory.regions:
        if region.gpa == 0:
            entries.append((0, layout.EBDA_START, E820_RAM))
            entries.append(
                (layout.EBDA_START, layout.BIOS_AREA_END - layout.EBDA_START, E820_RESERVED)
            )
            if region.size > layout.BIOS_AREA_END:
                entries.append((layout.BIOS_AREA_END, region.size - layout.BIOS_AREA_END, E820_RAM))
        else:
            entries.append((region.gpa, region.size, E820_RAM))
    return entries


def load_linux(
    memory: GuestMemory,
    vcpu: KvmVcpu,
    image: LinuxImage,
    cmdline: str,
    initrd: bytes | None,
    initrd_path: str = "initrd",
) -> None:
    """Put the kernel, command line, initrd and zero page into RAM and set up the BSP."""
    initrd_addr = plan_linux(
        image, memory.regions[0].size, cmdline, None if initrd is None else len(initrd), initrd_path
    )
    memory.write(layout.KERNEL_LOAD_ADDR, image.kernel)
    memory.write(layout.CMDLINE_ADDR, cmdline.encode() + b"\0")

    params = ffi.new("struct boot_params *")
    # The zero page starts as the image's own setup header (boot.rst: copy it).
    hdr_bytes = image.setup[
        SETUP_HEADER_OFFSET : SETUP_HEADER_OFFSET + ffi.sizeof("struct setup_header")
    ]
    ffi.memmove(ffi.addressof(params, "hdr"), hdr_bytes, len(hdr_bytes))
    hdr = params.hdr
    hdr.type_of_loader = TYPE_OF_LOADER_UNDEFINED
    hdr.loadflags |= lib.LOADED_HIGH | lib.CAN_USE_HEAP | lib.KEEP_SEGMENTS
    hdr.heap_end_ptr = 0xFE00
    hdr.vid_mode = 0xFFFF  # "normal" text mode; we have no video BIOS
    hdr.cmd_line_ptr = layout.CMDLINE_ADDR
    hdr.code32_start = layout.KERNEL_LOAD_ADDR

    if initrd is not None and initrd_addr is not None:
        memory.write(initrd_addr, initrd)
        hdr.ramdisk_image = initrd_addr
        hdr.ramdisk_size = len(initrd)

    e820 = e820_map(memory)
    params.e820_entries = len(e820)
    for i, (addr, size, kind) in enumerate(e820):
        params.e820_table[i].addr = addr
        params.e820_table[i].size = size
        params.e820_table[i].type = kind
    memory.write(layout.BOOT_PARAMS_ADDR, bytes(ffi.buffer(params)))

    _write_page_tables(memory)
    _write_gdt(memory)
    _enter_long_mode(vcpu, layout.KERNEL_LOAD_ADDR + ENTRY_64_OFFSET)


def plan_linux(
    image: LinuxImage,
    low_ram: int,
    cmdline: str,
    initrd_size: int | None,
    initrd_path: str = "initrd",
) -> int | None:
    """Check that kernel, command line and initrd fit a guest with ``low_ram`` bytes below
    the PCI hole, without touching any memory; returns where the initrd goes (or None).

    The initrd goes as high as allowed in low RAM, page-aligned, above everything the
    kernel occupies while it boots (like QEMU places it)."""
    kernel_end = image.end
    if kernel_end > low_ram:
        need = (kernel_end + (1 << 20) - 1) >> 20
        raise UserError(
            f"vm.memory: too little memory for {image.path}: the kernel alone needs "
            f"{need} MiB below 3 GiB; give more memory"
        )
    limit = min(image.cmdline_size + 1, layout.CMDLINE_MAX)
    if len(cmdline.encode()) + 1 > limit:
        raise UserError(
            f"vm.cmdline: {len(cmdline.encode())} bytes; this kernel takes at most {limit - 1}"
        )
    if initrd_size is None:
        return None
    top = min(low_ram, image.initrd_addr_max + 1)
    addr = (top - initrd_size) & ~0xFFF
    if addr < kernel_end:
        raise UserError(
            f"vm.memory: too little memory for initrd {initrd_path} ({initrd_size >> 20} MiB) "
            "above the kernel; give more memory"
        )
    return addr


def _write_page_tables(memory: GuestMemory) -> None:
    """Identity-map the first 4 GiB with 2 MiB pages (the kernel builds its own soon)."""
    memory.write_u64(layout.PML4_ADDR, layout.PDPT_ADDR | PTE_PRESENT | PTE_WRITE)
    pds = IDENTITY_MAP_SIZE >> 30
    for i in range(pds):
        pd = layout.PD_ADDR + i * 0x1000
        memory.write_u64(layout.PDPT_ADDR + 8 * i, pd | PTE_PRESENT | PTE_WRITE)
        entries = b"".join(
            struct.pack("<Q", ((i << 30) + (j << 21)) | PTE_PRESENT | PTE_WRITE | PTE_PS)
            for j in range(512)
        )
        memory.write(pd, entries)


# Flat descriptors: code64 (L=1) and data, both base 0, limit 4 GiB, DPL 0, present.
GDT_CODE64 = 0x00AF_9B00_0000_FFFF
GDT_DATA = 0x00CF_9300_0000_FFFF


def _write_gdt(memory: GuestMemory) -> None:
    memory.write(layout.GDT_ADDR, struct.pack("<4Q", 0, 0, GDT_CODE64, GDT_DATA))


def _segment(seg: Any, selector: int, code: bool) -> None:
    seg.base = 0
    seg.limit = 0xFFFF_FFFF
    seg.selector = selector
    seg.present = 1
    seg.dpl = 0
    seg.s = 1
    seg.g = 1
    seg.avl = 0
    seg.unusable = 0
    if code:
        seg.type = 0xB  # execute/read, accessed
        seg.l = 1
        seg.db = 0
    else:
        seg.type = 0x3  # read/write, accessed
        seg.l = 0
        seg.db = 1


def _enter_long_mode(vcpu: KvmVcpu, entry: int) -> None:
    sregs = vcpu.get_sregs()
    _segment(sregs.cs, BOOT_CS, code=True)
    for name in ("ds", "es", "fs", "gs", "ss"):
        _segment(getattr(sregs, name), BOOT_DS, code=False)
    sregs.gdt.base = layout.GDT_ADDR
    sregs.gdt.limit = 4 * 8 - 1
    sregs.idt.base = 0
    sregs.idt.limit = 0
    sregs.cr3 = layout.PML4_ADDR
    sregs.cr4 |= CR4_PAE
    sregs.cr0 |= CR0_PE | CR0_PG | CR0_ET
    sregs.efer |= EFER_LME | EFER_LMA
    vcpu.set_sregs(sregs)

    regs = vcpu.get_regs()
    regs.rflags = 0x2
    regs.rip = entry
    regs.rsi = layout.BOOT_PARAMS_ADDR  # the zero page, as boot.rst's 64-bit protocol says
    regs.rsp = layout.STACK_TOP
    regs.rbp = 0
    vcpu.set_regs(regs)
