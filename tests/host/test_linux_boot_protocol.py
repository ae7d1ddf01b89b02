"""The 64-bit Linux boot protocol, checked by a fake bzImage that runs on this host's KVM.

A stock kernel cannot boot on PVM (that is the lab tier's job), but a small 64-bit
program packaged as a bzImage can: it starts where a kernel starts, reads the zero page
at the offsets Documentation/arch/x86/boot.rst gives (written here by hand, independently
of the cffi layout iovirt uses), prints what it found and pulses the i8042 reset line.
"""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest

from iovirt.config import load_config
from iovirt.machine import build_vm
from iovirt.testing.asm import assemble
from iovirt.vm import VmExitReason

pytestmark = pytest.mark.hostkvm

REPO = Path(__file__).resolve().parents[2]

KERNEL_64 = """
    .code64
    .text
    .org 0x200                       /* the 64-bit entry point: load address + 0x200 */
entry:
    mov %rsi, %rbx                   /* the zero page */
    mov 0x228(%rbx), %esi            /* hdr.cmd_line_ptr */
    call puts
    mov $'|', %al
    call putc
    mov 0x218(%rbx), %esi            /* hdr.ramdisk_image */
    mov 0x21c(%rbx), %ecx            /* hdr.ramdisk_size */
1:  lodsb
    call putc
    loop 1b
    mov $'|', %al
    call putc
    movzbl 0x1e8(%rbx), %eax         /* e820_entries */
    add $'0', %al
    call putc
    mov $'|', %al
    call putc
    mov 0x2d0 + 20 * 2 + 8(%rbx), %rax  /* e820_table[2].size, in MiB, as one letter */
    shr $20, %rax
    add $'A', %al
    call putc
    mov $'|', %al
    call putc
    movzbl 0x210(%rbx), %eax         /* hdr.type_of_loader */
    cmp $0xff, %al
    jne 2f
    mov $'L', %al
    call putc
2:  mov %cs, %ax                     /* __BOOT_CS */
    add $'0', %al
    call putc
    mov $0xfe, %al                   /* i8042: pulse the reset line */
    out %al, $0x64
    hlt
puts:
    lodsb
    test %al, %al
    jz 3f
    call putc
    jmp puts
3:  ret
putc:
    push %rdx
    mov $0x3f8, %dx
    out %al, %dx
    pop %rdx
    ret
"""


def fake_bzimage(init_size: int = 1 << 20) -> bytes:
    """One setup sector after the boot sector, then the protected-mode part."""
    setup = bytearray(1024)
    setup[0x1F1] = 1  # setup_sects
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)  # boot_flag
    struct.pack_into("<4s", setup, 0x202, b"HdrS")
    struct.pack_into("<H", setup, 0x206, 0x020F)  # protocol 2.15
    setup[0x211] = 0x01  # loadflags: LOADED_HIGH
    struct.pack_into("<I", setup, 0x22C, 0x7FFF_FFFF)  # initrd_addr_max
    struct.pack_into("<H", setup, 0x236, 0x0001)  # xloadflags: XLF_KERNEL_64
    struct.pack_into("<I", setup, 0x238, 2047)  # cmdline_size
    struct.pack_into("<I", setup, 0x260, init_size)
    return bytes(setup) + assemble(KERNEL_64, base=0x10_0000)


def write_vm(
    tmp_path: Path,
    kernel: bytes,
    memory: str = "64M",
    initrd: bytes | None = None,
    cmdline: str = "console=ttyS0 iovirt-test",
) -> Path:
    (tmp_path / "bzImage").write_bytes(kernel)
    lines = [
        "[vm]",
        f'memory = "{memory}"',
        f'kernel = "{tmp_path / "bzImage"}"',
        f'cmdline = "{cmdline}"',
    ]
    if initrd is not None:
        (tmp_path / "initrd").write_bytes(initrd)
        lines.append(f'initrd = "{tmp_path / "initrd"}"')
    lines += ["", "[serial]", 'backend = { kind = "file", path = "' + str(tmp_path / "out") + '" }']
    cfg = tmp_path / "vm.toml"
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


def test_zero_page_long_mode_and_reset(tmp_path: Path) -> None:
    cfg = write_vm(tmp_path, fake_bzimage(), initrd=b"INITRD-DATA")
    with build_vm(load_config(cfg)) as vm:
        result = vm.run(timeout=60)
    assert result.reason is VmExitReason.RESET, result
    assert result.exit_status == 0
    # cmdline | initrd contents | 3 e820 entries | 63 MiB of RAM above 1 MiB (as 'A' + 63)
    # | type_of_loader 0xff ('L') and CS = __BOOT_CS 0x10 ('0' + 0x10 = '@')
    expected = b"console=ttyS0 iovirt-test|INITRD-DATA|3|" + bytes([ord("A") + 63]) + b"|L@"
    assert (tmp_path / "out").read_bytes() == expected


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "iovirt.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_not_a_bzimage_is_one_line(tmp_path: Path) -> None:
    cfg = write_vm(tmp_path, Path(sys.executable).resolve().read_bytes()[:65536])
    assert "not a Linux bzImage" in one_line(run_cli("run", str(cfg)))


def test_kernel_too_big_for_memory_is_one_line(tmp_path: Path) -> None:
    cfg = write_vm(tmp_path, fake_bzimage(init_size=64 << 20), memory="16M")
    line = one_line(run_cli("run", str(cfg)))
    assert "vm.memory" in line and "too little memory" in line


def test_missing_kernel_and_initrd_are_one_line(tmp_path: Path) -> None:
    cfg = write_vm(tmp_path, fake_bzimage())
    text = cfg.read_text()
    cfg.write_text(text.replace(str(tmp_path / "bzImage"), "/no/such/vmlinuz"))
    assert "vm.kernel: /no/such/vmlinuz: no such file" in one_line(run_cli("check", str(cfg)))
    cfg.write_text(text.replace("cmdline =", 'initrd = "/no/such/initrd"\ncmdline ='))
    assert "vm.initrd: /no/such/initrd: no such file" in one_line(run_cli("check", str(cfg)))


def test_lab_refuses_outputs_it_would_lose(tmp_path: Path) -> None:
    # The fallback to the lab happens before any VM exists, so this costs no lab boot.
    cfg = write_vm(tmp_path, fake_bzimage())
    line = one_line(run_cli("run", "--lab", str(cfg)))
    assert "serial.backend" in line and "not brought back from the lab" in line
