"""The fuzz input format: bytes in, a sequence of guest operations out (and back).

In the style of QEMU's generic-fuzz, every byte string is a valid program. It is read as
operations, each an opcode byte (taken modulo the number of kinds) followed by fixed
little-endian fields and, for some kinds, a payload. Decoding stops at the first operation
whose fixed fields do not fit in what is left; a payload is cut to what is left. Numbers
are reduced into range here (a region index modulo the device's region count, an offset
modulo the region's size), so mutating any byte gives another meaningful program.

=============  ==========================================  ==================================
kind           fields after the opcode                     meaning
=============  ==========================================  ==================================
READ           region u8, offset u32, size u8              guest read of a device region
WRITE          region u8, offset u32, size u8, value u64   guest write of a device region
CONFIG_READ    offset u8, size u8                          PCI configuration space read
CONFIG_WRITE   offset u8, size u8, value u32               PCI configuration space write
MEM_WRITE      mode u8, address u32, length u16, data      the guest fills its own RAM
DMA_PATTERN    length u8, data                             bytes for RAM the device reads
                                                           before anyone wrote it
HOST           event u8, length u16, data                  a host-side event (a packet from
                                                           the network, serial input, a
                                                           queue kick): see each target
=============  ==========================================  ==================================

The size byte selects 1, 2, 4 or 8 bytes with its low two bits; bit 2 set keeps an
unaligned offset, clear aligns it down to the size. :func:`encode` writes operations back
in this format, so that seeds can be written as operations and a minimiser can work on
operations rather than bytes.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass

# At most this many operations run per input: the operation budget.
MAX_OPS = 384
# The largest payload of one MEM_WRITE or HOST operation.
MAX_PAYLOAD = 4096

ACCESS_SIZES = (1, 2, 4, 8)
SIZE_SELECT_MASK = 0x3
SIZE_UNALIGNED = 0x4

_U8 = struct.Struct("<B")
_READ = struct.Struct("<BIB")  # region, offset, size
_WRITE = struct.Struct("<BIBQ")  # region, offset, size, value
_CONFIG_READ = struct.Struct("<BB")  # offset, size
_CONFIG_WRITE = struct.Struct("<BBI")  # offset, size, value
_MEM_WRITE = struct.Struct("<BIH")  # mode, address, length
_DMA_PATTERN = struct.Struct("<B")  # length
_HOST = struct.Struct("<BH")  # event, length


class OpKind(enum.IntEnum):
    """What an operation does (the opcode byte modulo the number of kinds)."""

    READ = 0
    WRITE = 1
    CONFIG_READ = 2
    CONFIG_WRITE = 3
    MEM_WRITE = 4
    DMA_PATTERN = 5
    HOST = 6


_KINDS = tuple(OpKind)


@dataclass(slots=True)
class Op:
    """One decoded operation. Fields a kind does not use stay 0 / empty.

    ``region``, ``offset``, ``size`` and ``value`` are already in range (for READ/WRITE the
    offset is inside the region; for CONFIG_* inside 256 bytes). For MEM_WRITE ``mode`` and
    ``offset`` stay raw: the harness resolves them to a guest address when the operation
    runs (they may name an address the guest wrote into a device register earlier). For
    HOST ``mode`` is the raw event number, which the target reduces to its own events.
    """

    kind: OpKind
    region: int = 0
    offset: int = 0
    size: int = 0
    value: int = 0
    mode: int = 0
    data: bytes = b""


def _size(select: int, offset: int) -> tuple[int, int]:
    size = ACCESS_SIZES[select & SIZE_SELECT_MASK]
    if not select & SIZE_UNALIGNED:
        offset &= ~(size - 1)
    return size, offset


def decode(data: bytes, region_sizes: Sequence[int], max_ops: int = MAX_OPS) -> list[Op]:
    """The operations ``data`` stands for, against a device with regions of
    ``region_sizes`` bytes (at least one). At most ``max_ops`` of them."""
    if not region_sizes:
        raise ValueError("a fuzz target needs at least one region")
    nregions = len(region_sizes)
    ops: list[Op] = []
    pos = 0
    end = len(data)
    while pos < end and len(ops) < max_ops:
        kind = _KINDS[data[pos] % len(_KINDS)]
        pos += 1
        if kind is OpKind.READ:
            if pos + _READ.size > end:
                break
            region, offset, select = _READ.unpack_from(data, pos)
            pos += _READ.size
            region %= nregions
            size, offset = _size(select, offset % region_sizes[region])
            ops.append(Op(kind, region=region, offset=offset, size=size))
        elif kind is OpKind.WRITE:
            if pos + _WRITE.size > end:
                break
            region, offset, select, value = _WRITE.unpack_from(data, pos)
            pos += _WRITE.size
            region %= nregions
            size, offset = _size(select, offset % region_sizes[region])
            value &= (1 << (8 * size)) - 1
            ops.append(Op(kind, region=region, offset=offset, size=size, value=value))
        elif kind is OpKind.CONFIG_READ:
            if pos + _CONFIG_READ.size > end:
                break
            offset, select = _CONFIG_READ.unpack_from(data, pos)
            pos += _CONFIG_READ.size
            size, offset = _size(select, offset)
            ops.append(Op(kind, offset=offset, size=size))
        elif kind is OpKind.CONFIG_WRITE:
            if pos + _CONFIG_WRITE.size > end:
                break
            offset, select, value = _CONFIG_WRITE.unpack_from(data, pos)
            pos += _CONFIG_WRITE.size
            size, offset = _size(select, offset)
            value &= (1 << (8 * min(size, 4))) - 1
            ops.append(Op(kind, offset=offset, size=size, value=value))
        elif kind is OpKind.MEM_WRITE:
            if pos + _MEM_WRITE.size > end:
                break
            mode, address, length = _MEM_WRITE.unpack_from(data, pos)
            pos += _MEM_WRITE.size
            length %= MAX_PAYLOAD + 1
            payload = bytes(data[pos : pos + length])
            pos += len(payload)
            ops.append(Op(kind, offset=address, mode=mode, data=payload))
        elif kind is OpKind.DMA_PATTERN:
            if pos + _DMA_PATTERN.size > end:
                break
            (length,) = _DMA_PATTERN.unpack_from(data, pos)
            pos += _DMA_PATTERN.size
            payload = bytes(data[pos : pos + length])
            pos += len(payload)
            ops.append(Op(kind, data=payload))
        else:
            if pos + _HOST.size > end:
                break
            event, length = _HOST.unpack_from(data, pos)
            pos += _HOST.size
            length %= MAX_PAYLOAD + 1
            payload = bytes(data[pos : pos + length])
            pos += len(payload)
            ops.append(Op(kind, mode=event, data=payload))
    return ops


def _select(size: int, offset: int) -> int:
    if size not in ACCESS_SIZES:
        raise ValueError(f"access size {size} is not 1, 2, 4 or 8")
    return ACCESS_SIZES.index(size) | (SIZE_UNALIGNED if offset % size else 0)


def encode_op(op: Op) -> bytes:
    """The bytes of one operation (decoding them gives ``op`` back)."""
    head = _U8.pack(int(op.kind))
    if op.kind is OpKind.READ:
        return head + _READ.pack(op.region, op.offset, _select(op.size, op.offset))
    if op.kind is OpKind.WRITE:
        return head + _WRITE.pack(op.region, op.offset, _select(op.size, op.offset), op.value)
    if op.kind is OpKind.CONFIG_READ:
        return head + _CONFIG_READ.pack(op.offset, _select(op.size, op.offset))
    if op.kind is OpKind.CONFIG_WRITE:
        return head + _CONFIG_WRITE.pack(op.offset, _select(op.size, op.offset), op.value)
    if op.kind is OpKind.MEM_WRITE:
        data = op.data[:MAX_PAYLOAD]
        return head + _MEM_WRITE.pack(op.mode, op.offset, len(data)) + data
    if op.kind is OpKind.DMA_PATTERN:
        data = op.data[:0xFF]
        return head + _DMA_PATTERN.pack(len(data)) + data
    data = op.data[:MAX_PAYLOAD]
    return head + _HOST.pack(op.mode, len(data)) + data


def encode(ops: Sequence[Op]) -> bytes:
    """The input that decodes to ``ops``."""
    return b"".join(encode_op(op) for op in ops)


# -- convenience constructors for seeds and tests -------------------------------------------


def read(region: int, offset: int, size: int) -> Op:
    return Op(OpKind.READ, region=region, offset=offset, size=size)


def write(region: int, offset: int, size: int, value: int) -> Op:
    return Op(OpKind.WRITE, region=region, offset=offset, size=size, value=value)


def config_read(offset: int, size: int) -> Op:
    return Op(OpKind.CONFIG_READ, offset=offset, size=size)


def config_write(offset: int, size: int, value: int) -> Op:
    return Op(OpKind.CONFIG_WRITE, offset=offset, size=size, value=value)


def mem_write(address: int, data: bytes) -> Op:
    """Guest RAM at ``address`` (an offset from the start of RAM) gets ``data``."""
    return Op(OpKind.MEM_WRITE, offset=address, mode=0, data=data)


def dma_pattern(data: bytes) -> Op:
    return Op(OpKind.DMA_PATTERN, data=data)


def host(event: int, data: bytes = b"") -> Op:
    return Op(OpKind.HOST, mode=event, data=data)


def describe(op: Op, region_names: Sequence[str] = (), host_events: Sequence[str] = ()) -> str:
    """One human-readable line for ``op`` (used in reproducer notes)."""
    if op.kind in (OpKind.READ, OpKind.WRITE):
        name = region_names[op.region] if op.region < len(region_names) else f"#{op.region}"
        what = f"{op.kind.name.lower():5} {name}+{op.offset:#x}/{op.size}"
        return what + (f" = {op.value:#x}" if op.kind is OpKind.WRITE else "")
    if op.kind is OpKind.CONFIG_READ:
        return f"config read {op.offset:#04x}/{op.size}"
    if op.kind is OpKind.CONFIG_WRITE:
        return f"config write {op.offset:#04x}/{op.size} = {op.value:#x}"
    if op.kind is OpKind.MEM_WRITE:
        return f"ram write mode {op.mode:#04x} address {op.offset:#x}: {op.data[:32].hex()}" + (
            f"... ({len(op.data)} bytes)" if len(op.data) > 32 else ""
        )
    if op.kind is OpKind.DMA_PATTERN:
        return f"dma pattern {op.data[:32].hex()} ({len(op.data)} bytes)"
    name = host_events[op.mode % len(host_events)] if host_events else f"#{op.mode}"
    return f"host {name}: {op.data[:32].hex()} ({len(op.data)} bytes)"
