"""Where the boot code puts things in guest-physical memory (x86 PC conventions).

Everything the boot loader writes lives below 1 MiB, in the first 640 KiB that the e820
map reports as RAM (except the MP table, which sits in the EBDA the map reserves).
"""

from __future__ import annotations

GDT_ADDR = 0x500  # boot GDT (null, null, __BOOT_CS=0x10, __BOOT_DS=0x18)
BOOT_PARAMS_ADDR = 0x7000  # the "zero page" (struct boot_params)
PML4_ADDR = 0x9000  # identity-mapping page tables: PML4, PDPT, 4 page directories
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000  # four pages: 0xB000-0xEFFF, 2 MiB pages covering 4 GiB
STACK_TOP = 0x8FF0
CMDLINE_ADDR = 0x2_0000
CMDLINE_MAX = 0x1_0000  # 64 KiB; the kernel's own cmdline_size caps it further
EBDA_START = 0x9_FC00  # extended BIOS data area: the MP table lives here
BIOS_AREA_END = 0x10_0000  # 640 KiB - 1 MiB: VGA hole, option ROMs, BIOS: reserved
KERNEL_LOAD_ADDR = 0x10_0000  # the protected-mode kernel is loaded at 1 MiB
