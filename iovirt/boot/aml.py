"""A small encoder for ACPI Machine Language (ACPI 6.x, chapter 20) and resource
descriptors (6.4): just what a DSDT describing this board needs.

Everything is a function returning encoded bytes. An AML term (a name, an integer, a
package, a device ...) is a :data:`Term`; a resource descriptor is plain ``bytes`` that
only :func:`resource_template` turns into a term (a buffer ending in an end tag). Python
ints and strs are accepted wherever a data object is, and encoded as the smallest AML
integer or as an AML string, as iasl would::

    device("_SB.COM1",
           name("_HID", eisa_id("PNP0501")),
           name("_CRS", resource_template(io_port(0x3F8, 0x3F8, 1, 8), irq_no_flags(4))))

Every argument is checked: a value that does not fit its field raises ValueError (these
values come from the board description, never from the guest).
"""

from __future__ import annotations

import re
import struct
from typing import NewType

Term = NewType("Term", bytes)  # an encoded AML term
Value = int | str | Term  # what may appear where a data object is expected

# Opcodes and prefixes (ACPI 6.x, 20.2).
ZERO_OP = 0x00
ONE_OP = 0x01
NAME_OP = 0x08
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82  # after EXT_OP_PREFIX
# Name strings (20.2.2).
ROOT_CHAR = ord("\\")
PARENT_PREFIX_CHAR = ord("^")
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F
NULL_NAME = 0x00

# PkgLength (20.2.4): one byte holds up to 63; longer lengths take 1-3 more bytes, the lead
# byte keeping only its low nibble for the value and the count in bits 6-7.
_PKG_LENGTH_LIMITS = (0x3F, 0xFFF, 0xF_FFFF, 0xFFF_FFFF)
MAX_PACKAGE_ELEMENTS = 0xFF  # NumElements is one byte

_NAME_SEG = re.compile(r"[A-Z_][A-Z0-9_]{0,3}")
_EISA_ID = re.compile(r"[A-Z]{3}[0-9A-F]{4}")


def name_seg(seg: str) -> bytes:
    """A NameSeg: 1-4 characters, a leading letter or underscore, padded with '_'."""
    if not _NAME_SEG.fullmatch(seg):
        raise ValueError(f"AML name segment {seg!r} is not [A-Z_][A-Z0-9_]{{0,3}}")
    return seg.ljust(4, "_").encode("ascii")


def name_string(path: str) -> bytes:
    """A NameString: an optional root ``\\`` or parent ``^`` prefixes, then dot-separated
    segments, e.g. ``\\_SB.PCI0`` or ``_HID``."""
    prefix = b""
    rest = path
    if rest.startswith("\\"):
        prefix, rest = bytes([ROOT_CHAR]), rest[1:]
    else:
        while rest.startswith("^"):
            prefix, rest = prefix + bytes([PARENT_PREFIX_CHAR]), rest[1:]
    segs = [name_seg(s) for s in rest.split(".")] if rest else []
    if not segs:
        return prefix + bytes([NULL_NAME])
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + b"".join(segs)
    if len(segs) > 0xFF:
        raise ValueError(f"AML name {path!r} has more than 255 segments")
    return prefix + bytes([MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)


def pkg_length(body_length: int) -> bytes:
    """The PkgLength in front of ``body_length`` bytes; it counts its own bytes too."""
    if body_length < 0:
        raise ValueError("negative AML package length")
    for extra, limit in enumerate(_PKG_LENGTH_LIMITS):
        total = body_length + extra + 1
        if total > limit:
            continue
        if extra == 0:
            return bytes([total])
        lead = extra << 6 | total & 0x0F
        return bytes([lead]) + (total >> 4).to_bytes(extra, "little")
    raise ValueError(f"AML package of {body_length} bytes is too long for a PkgLength")


def integer(value: int) -> Term:
    """The shortest encoding of an integer: Zero, One, or a Byte/Word/DWord/QWord const."""
    if value < 0 or value >> 64:
        raise ValueError(f"AML integer {value} is not in 0..2**64-1")
    if value in (ZERO_OP, ONE_OP):
        return Term(bytes([value]))
    for prefix, fmt in ((BYTE_PREFIX, "<B"), (WORD_PREFIX, "<H"), (DWORD_PREFIX, "<I")):
        if value < 1 << (8 * struct.calcsize(fmt)):
            return Term(bytes([prefix]) + struct.pack(fmt, value))
    return Term(bytes([QWORD_PREFIX]) + struct.pack("<Q", value))


def string(text: str) -> Term:
    """A String: ASCII characters 0x01-0x7F and a terminating NUL."""
    data = text.encode("ascii")
    if 0 in data:
        raise ValueError("AML strings cannot contain NUL")
    return Term(bytes([STRING_PREFIX]) + data + b"\0")


def eisa_id(text: str) -> Term:
    """An EISA ID such as ``PNP0A03``, as iasl's EISAID(): three letters packed 5 bits
    each (A = 1) into a big-endian 16-bit vendor, then the 16-bit product, stored as a
    DWord whose bytes are in that order."""
    if not _EISA_ID.fullmatch(text):
        raise ValueError(f"EISA ID {text!r} is not three letters and four hex digits")
    vendor = 0
    for letter in text[:3]:
        vendor = vendor << 5 | (ord(letter) - ord("A") + 1)
    product = int(text[3:], 16)
    packed = vendor.to_bytes(2, "big") + product.to_bytes(2, "big")
    return Term(bytes([DWORD_PREFIX]) + packed)


def encode(value: Value) -> Term:
    """A data object: an int or str is encoded, a Term passes through."""
    if isinstance(value, bool):
        raise TypeError("use 0/1 for AML integers, not bool")
    if isinstance(value, int):
        return integer(value)
    if isinstance(value, str):
        return string(value)
    return value


def name(path: str, value: Value) -> Term:
    """``Name(path, value)``: a named data object."""
    return Term(bytes([NAME_OP]) + name_string(path) + encode(value))


def package(*elements: Value) -> Term:
    """``Package() {elements}`` (at most 255 of them)."""
    if len(elements) > MAX_PACKAGE_ELEMENTS:
        raise ValueError(f"AML package of {len(elements)} elements (at most 255)")
    body = bytes([len(elements)]) + b"".join(encode(e) for e in elements)
    return Term(bytes([PACKAGE_OP]) + pkg_length(len(body)) + body)


def buffer(data: bytes) -> Term:
    """``Buffer() {data}``: its size as an integer term, then the bytes."""
    body = integer(len(data)) + data
    return Term(bytes([BUFFER_OP]) + pkg_length(len(body)) + body)


def scope(path: str, *terms: Term) -> Term:
    """``Scope(path) {terms}``."""
    body = name_string(path) + b"".join(terms)
    return Term(bytes([SCOPE_OP]) + pkg_length(len(body)) + body)


def device(path: str, *terms: Term) -> Term:
    """``Device(path) {terms}``."""
    body = name_string(path) + b"".join(terms)
    return Term(bytes([EXT_OP_PREFIX, DEVICE_OP]) + pkg_length(len(body)) + body)


# -- resource descriptors (ACPI 6.x, 6.4) ------------------------------------------------

# Small descriptors: one tag byte, type in bits 3-6 and length in bits 0-2.
SMALL_IRQ = 0x04
SMALL_IO = 0x08
SMALL_END_TAG = 0x0F
# Large descriptors: 0x80 | type, then a 16-bit length of the data that follows.
LARGE_MEMORY32_FIXED = 0x86
LARGE_DWORD_ADDRESS = 0x87
LARGE_WORD_ADDRESS = 0x88
LARGE_EXTENDED_IRQ = 0x89

IO_DECODE16 = 0x01  # IO descriptor: decodes all 16 address bits
MEMORY_READ_WRITE = 0x01  # Memory32Fixed information / memory type-specific flags: _RW
# Extended interrupt flags (6.4.3.6).
INT_CONSUMER = 1 << 0
INT_EDGE = 1 << 1
INT_ACTIVE_LOW = 1 << 2
INT_SHARED = 1 << 3
# Address space descriptors (6.4.3.5): resource types and general flags.
ADDRESS_MEMORY = 0
ADDRESS_IO = 1
ADDRESS_BUS_NUMBER = 2
ADDRESS_MIN_FIXED = 1 << 2
ADDRESS_MAX_FIXED = 1 << 3
# (bit 0 clear: a producer, what a bridge's windows are; bit 1 clear: positive decode)
IO_RANGE_ENTIRE = 0x03  # I/O type-specific flags: ISA and non-ISA ports
MEMORY_CACHEABLE = 1 << 1  # memory type-specific flags: _MEM = cacheable


def _small(kind: int, data: bytes) -> bytes:
    return bytes([kind << 3 | len(data)]) + data


def _large(tag: int, data: bytes) -> bytes:
    return bytes([tag]) + struct.pack("<H", len(data)) + data


def _check(value: int, bits: int, what: str) -> int:
    if value < 0 or value >> bits:
        raise ValueError(f"{what} {value:#x} does not fit in {bits} bits")
    return value


def irq_no_flags(*irqs: int) -> bytes:
    """``IRQNoFlags() {irqs}``: ISA IRQs 0-15, edge, active high, exclusive."""
    mask = 0
    for irq in irqs:
        mask |= 1 << _check(irq, 4, "ISA IRQ")
    return _small(SMALL_IRQ, struct.pack("<H", mask))


def io_port(minimum: int, maximum: int, alignment: int, length: int) -> bytes:
    """``IO(Decode16, minimum, maximum, alignment, length)``."""
    return _small(
        SMALL_IO,
        struct.pack(
            "<BHHBB",
            IO_DECODE16,
            _check(minimum, 16, "I/O port"),
            _check(maximum, 16, "I/O port"),
            _check(alignment, 8, "I/O alignment"),
            _check(length, 8, "I/O length"),
        ),
    )


def memory32_fixed(base: int, length: int, writeable: bool = True) -> bytes:
    """``Memory32Fixed(ReadWrite or ReadOnly, base, length)``."""
    info = MEMORY_READ_WRITE if writeable else 0
    data = struct.pack(
        "<BII", info, _check(base, 32, "memory base"), _check(length, 32, "memory length")
    )
    return _large(LARGE_MEMORY32_FIXED, data)


def extended_interrupt(
    *gsis: int,
    consumer: bool = True,
    edge: bool = False,
    active_low: bool = False,
    shared: bool = False,
) -> bytes:
    """``Interrupt(ResourceConsumer, Level|Edge, ActiveHigh|ActiveLow, Exclusive|Shared)
    {gsis}``; unlike IRQ() it names GSIs beyond 15 and its trigger mode is what the OS
    uses (Linux applies MADT overrides to IRQ() descriptors only)."""
    if not 1 <= len(gsis) <= 0xFF:
        raise ValueError("an Interrupt descriptor lists 1 to 255 interrupts")
    flags = (
        (INT_CONSUMER if consumer else 0)
        | (INT_EDGE if edge else 0)
        | (INT_ACTIVE_LOW if active_low else 0)
        | (INT_SHARED if shared else 0)
    )
    data = bytes([flags, len(gsis)]) + b"".join(
        struct.pack("<I", _check(g, 32, "interrupt")) for g in gsis
    )
    return _large(LARGE_EXTENDED_IRQ, data)


def _word_address(resource_type: int, type_flags: int, minimum: int, maximum: int) -> bytes:
    """A Word Address Space descriptor for a bridge window ``[minimum, maximum]``."""
    if maximum < minimum:
        raise ValueError(f"window [{minimum:#x}, {maximum:#x}] is empty")
    data = struct.pack(
        "<BBBHHHHH",
        resource_type,
        ADDRESS_MIN_FIXED | ADDRESS_MAX_FIXED,
        type_flags,
        0,  # granularity: a decode mask, 0 for fixed windows
        _check(minimum, 16, "window start"),
        _check(maximum, 16, "window end"),
        0,  # translation offset
        _check(maximum - minimum + 1, 16, "window length"),
    )
    return _large(LARGE_WORD_ADDRESS, data)


def word_bus_number(minimum: int, maximum: int) -> bytes:
    """``WordBusNumber(ResourceProducer, MinFixed, MaxFixed, PosDecode, ...)``: the bus
    numbers behind a root bridge."""
    return _word_address(ADDRESS_BUS_NUMBER, 0, minimum, maximum)


def word_io(minimum: int, maximum: int) -> bytes:
    """``WordIO(ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, ...)``: an
    I/O port window of a bridge."""
    return _word_address(ADDRESS_IO, IO_RANGE_ENTIRE, minimum, maximum)


def dword_memory(minimum: int, maximum: int, cacheable: bool = False) -> bytes:
    """``DWordMemory(ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable or
    Cacheable, ReadWrite, ...)``: a 32-bit memory window of a bridge."""
    if maximum < minimum:
        raise ValueError(f"window [{minimum:#x}, {maximum:#x}] is empty")
    type_flags = MEMORY_READ_WRITE | (MEMORY_CACHEABLE if cacheable else 0)
    data = struct.pack(
        "<BBBIIIII",
        ADDRESS_MEMORY,
        ADDRESS_MIN_FIXED | ADDRESS_MAX_FIXED,
        type_flags,
        0,  # granularity
        _check(minimum, 32, "window start"),
        _check(maximum, 32, "window end"),
        0,  # translation offset
        _check(maximum - minimum + 1, 32, "window length"),
    )
    return _large(LARGE_DWORD_ADDRESS, data)


def resource_template(*descriptors: bytes) -> Term:
    """``ResourceTemplate() {descriptors}``: a buffer closed by an end tag whose checksum
    byte is 0 ("treat the template as correctly summed", 6.4.2.9)."""
    return buffer(b"".join(descriptors) + _small(SMALL_END_TAG, b"\0"))
