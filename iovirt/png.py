"""A tiny PNG writer (8-bit RGB) and a reader good enough for tests and screenshots.

Screenshots are the only images iovirt makes, so the writer knows one format: truecolour,
8 bits per channel, no interlace, filter type 0 on every row (the zlib pass does the work;
a screen is mostly flat colour). The reader takes what common encoders write (Pillow,
ours): bit depth 8, greyscale/RGB with or without alpha, any of the five row filters, no
interlace; it returns RGB.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from iovirt.errors import IovirtError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# IHDR fields (PNG spec 11.2.2)
BIT_DEPTH_8 = 8
COLOR_TYPE_GREY = 0
COLOR_TYPE_RGB = 2
COLOR_TYPE_GREY_ALPHA = 4
COLOR_TYPE_RGBA = 6
_CHANNELS = {COLOR_TYPE_GREY: 1, COLOR_TYPE_RGB: 3, COLOR_TYPE_GREY_ALPHA: 2, COLOR_TYPE_RGBA: 4}
COMPRESSION_DEFLATE = 0
FILTER_METHOD_ADAPTIVE = 0
INTERLACE_NONE = 0

# Row filter types (PNG spec 9.2)
FILTER_NONE = 0
FILTER_SUB = 1
FILTER_UP = 2
FILTER_AVERAGE = 3
FILTER_PAETH = 4

_IHDR = struct.Struct(">IIBBBBB")
# PNG allows 2**31-1; a screenshot never comes near, and the reader must not be talked into
# allocating gigabytes by a crafted header.
MAX_DIMENSION = 1 << 15
MAX_PIXELS = 1 << 26


class PngError(IovirtError):
    """A PNG could not be written or read (what is wrong is in the message)."""


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(data, zlib.crc32(kind))
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def encode_png(
    width: int, height: int, rgb: bytes | bytearray | memoryview, level: int = 6
) -> bytes:
    """A PNG of a ``width`` x ``height`` image whose pixels are ``rgb`` (3 bytes each,
    row by row, top first)."""
    if not (0 < width <= MAX_DIMENSION and 0 < height <= MAX_DIMENSION):
        raise PngError(f"PNG size {width}x{height} is out of range")
    row_bytes = width * 3
    if len(rgb) != row_bytes * height:
        raise PngError(f"{len(rgb)} bytes of pixels for a {width}x{height} RGB image")
    data = memoryview(rgb).cast("B")
    # Every row is prefixed with its filter type; all rows use FILTER_NONE.
    raw = bytearray((row_bytes + 1) * height)
    for y in range(height):
        start = y * (row_bytes + 1) + 1
        raw[start : start + row_bytes] = data[y * row_bytes : (y + 1) * row_bytes]
    header = _IHDR.pack(
        width,
        height,
        BIT_DEPTH_8,
        COLOR_TYPE_RGB,
        COMPRESSION_DEFLATE,
        FILTER_METHOD_ADAPTIVE,
        INTERLACE_NONE,
    )
    return b"".join(
        (
            PNG_SIGNATURE,
            _chunk(b"IHDR", header),
            _chunk(b"IDAT", zlib.compress(bytes(raw), level)),
            _chunk(b"IEND", b""),
        )
    )


def write_png(path: str | Path, width: int, height: int, rgb: bytes | bytearray) -> None:
    """Write an RGB image to ``path`` as PNG."""
    data = encode_png(width, height, rgb)
    try:
        Path(path).write_bytes(data)
    except OSError as e:
        raise PngError(f"{path}: cannot write the PNG: {e.strerror or e}") from e


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def _unfilter(raw: bytes, width: int, height: int, bpp: int) -> bytearray:
    """Undo the per-row filters; ``bpp`` is bytes per pixel."""
    stride = width * bpp
    if len(raw) < (stride + 1) * height:
        raise PngError("image data is shorter than the image")
    out = bytearray(stride * height)
    prev = bytearray(stride)
    for y in range(height):
        pos = y * (stride + 1)
        kind = raw[pos]
        line = bytearray(raw[pos + 1 : pos + 1 + stride])
        if kind == FILTER_NONE:
            pass
        elif kind == FILTER_UP:
            line = bytearray((a + b) & 0xFF for a, b in zip(line, prev, strict=True))
        elif kind == FILTER_SUB:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 0xFF
        elif kind == FILTER_AVERAGE:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif kind == FILTER_PAETH:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                up_left = prev[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + _paeth(left, prev[i], up_left)) & 0xFF
        else:
            raise PngError(f"row {y} has unknown filter type {kind}")
        out[y * stride : (y + 1) * stride] = line
        prev = line
    return out


def decode_png(data: bytes) -> tuple[int, int, bytes]:
    """``(width, height, rgb)`` of a PNG (8-bit, not interlaced, not palette based).
    Alpha is dropped, grey is expanded to RGB."""
    if not data.startswith(PNG_SIGNATURE):
        raise PngError("not a PNG (bad signature)")
    pos = len(PNG_SIGNATURE)
    header: tuple[int, ...] | None = None
    idat = bytearray()
    while True:
        if pos + 8 > len(data):
            raise PngError("truncated PNG (no IEND chunk)")
        length, kind = struct.unpack_from(">I4s", data, pos)
        body = data[pos + 8 : pos + 8 + length]
        if len(body) != length or pos + 12 + length > len(data):
            raise PngError(f"truncated {kind!r} chunk")
        (crc,) = struct.unpack_from(">I", data, pos + 8 + length)
        if zlib.crc32(body, zlib.crc32(kind)) != crc:
            raise PngError(f"bad CRC in the {kind!r} chunk")
        pos += 12 + length
        if kind == b"IHDR":
            if length != _IHDR.size:
                raise PngError("bad IHDR chunk")
            header = _IHDR.unpack(body)
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
    if header is None:
        raise PngError("no IHDR chunk")
    width, height, depth, color_type, _, _, interlace = header
    if depth != BIT_DEPTH_8 or color_type not in _CHANNELS or interlace != INTERLACE_NONE:
        raise PngError(
            f"unsupported PNG (bit depth {depth}, colour type {color_type}, "
            f"interlace {interlace}): only 8-bit non-interlaced grey/RGB[A]"
        )
    if not (0 < width <= MAX_DIMENSION and 0 < height <= MAX_DIMENSION):
        raise PngError(f"PNG size {width}x{height} is out of range")
    if width * height > MAX_PIXELS:
        raise PngError(f"PNG size {width}x{height} is too large")
    channels = _CHANNELS[color_type]
    limit = (width * channels + 1) * height
    try:
        decompressor = zlib.decompressobj()
        raw = decompressor.decompress(bytes(idat), limit)
    except zlib.error as e:
        raise PngError(f"bad image data: {e}") from e
    pixels = _unfilter(raw, width, height, channels)
    n = width * height
    if color_type == COLOR_TYPE_RGB:
        return width, height, bytes(pixels)
    rgb = bytearray(n * 3)
    if color_type == COLOR_TYPE_RGBA:
        for c in range(3):
            rgb[c::3] = pixels[c::4]
    else:  # grey, with or without alpha: the grey channel is the first
        grey = pixels[0::channels]
        for c in range(3):
            rgb[c::3] = grey
    return width, height, bytes(rgb)


def read_png(path: str | Path) -> tuple[int, int, bytes]:
    """:func:`decode_png` of a file."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise PngError(f"{path}: cannot read the PNG: {e.strerror or e}") from e
    return decode_png(data)
