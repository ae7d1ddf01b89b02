"""Assemble small guest programs with the system assembler (GNU as/ld from binutils).

:func:`firmware` wraps 16-bit code into a 64 KiB firmware image in the layout real PC
firmware has: the code starts at offset 0 (F000:0000 once shadowed below 1 MiB) and the
reset vector at offset 0xFFF0 far-jumps there. :meth:`iovirt.vm.Vm.load_firmware` maps such
an image, so a test program starts exactly as SeaBIOS would, from a CPU reset.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from iovirt.errors import ResourceError

FIRMWARE_SIZE = 0x1_0000

_FIRMWARE_TEMPLATE = """\
    .code16
    .text
    .globl _start
_start:
{body}
    .org 0xfff0
reset_vector:
    ljmp $0xf000, $_start
    .org 0x10000
"""


def assemble(source: str, base: int = 0) -> bytes:
    """Assemble GNU-as ``source`` (32-bit object; use ``.code16`` for real mode) into a flat
    binary whose first byte is at ``base``."""
    with tempfile.TemporaryDirectory(prefix="iovirt-asm-") as tmp:
        src = Path(tmp, "prog.S")
        obj = Path(tmp, "prog.o")
        out = Path(tmp, "prog.bin")
        src.write_text(source)
        _tool(["as", "--32", "-o", str(obj), str(src)])
        _tool(
            [
                "ld",
                "-m",
                "elf_i386",
                f"-Ttext={base:#x}",
                "-e",
                "0",
                "--oformat",
                "binary",
                "-o",
                str(out),
                str(obj),
            ]
        )
        return out.read_bytes()


def firmware(body: str) -> bytes:
    """A 64 KiB firmware image running ``body`` (16-bit GNU as) from the reset vector."""
    image = assemble(_FIRMWARE_TEMPLATE.format(body=body))
    if len(image) != FIRMWARE_SIZE:
        raise ValueError(f"firmware body too large: image is {len(image):#x} bytes")
    return image


def _tool(argv: list[str]) -> None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise ResourceError(argv[0], "not found: install Debian's binutils") from e
    if proc.returncode != 0:
        raise ValueError(f"{argv[0]} failed:\n{proc.stderr}")


def main(argv: list[str] | None = None) -> int:
    """``python -m iovirt.testing.asm BODY.S OUT.bin``: build a firmware image from a file."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m iovirt.testing.asm BODY.S OUT.bin", file=sys.stderr)
        return 2
    Path(args[1]).write_bytes(firmware(Path(args[0]).read_text()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
