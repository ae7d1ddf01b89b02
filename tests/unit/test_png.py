"""The PNG writer and reader, cross-checked with Pillow in both directions."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from iovirt.png import PngError, decode_png, encode_png, read_png, write_png


def random_rgb(width: int, height: int) -> bytes:
    return os.urandom(width * height * 3)


def gradient_rgb(width: int, height: int) -> bytes:
    return bytes(
        v for y in range(height) for x in range(width) for v in (x * 3 & 0xFF, y * 5 & 0xFF, x ^ y)
    )


@pytest.mark.parametrize(("width", "height"), [(1, 1), (7, 3), (64, 48), (300, 2)])
def test_pillow_reads_what_we_write(width: int, height: int) -> None:
    rgb = random_rgb(width, height)
    with Image.open(io.BytesIO(encode_png(width, height, rgb))) as im:
        assert im.format == "PNG"
        assert im.mode == "RGB"
        assert im.size == (width, height)
        assert im.tobytes() == rgb


def test_round_trip_through_a_file(tmp_path: Path) -> None:
    rgb = gradient_rgb(33, 17)
    write_png(tmp_path / "x.png", 33, 17, rgb)
    assert read_png(tmp_path / "x.png") == (33, 17, rgb)


def _filter_types(png: bytes, width: int, height: int, channels: int) -> set[int]:
    """The row filter types a PNG uses (for a single-IDAT file)."""
    pos = png.index(b"IDAT") - 4
    (length,) = struct.unpack_from(">I", png, pos)
    raw = zlib.decompress(png[pos + 8 : pos + 8 + length])
    stride = width * channels + 1
    return {raw[y * stride] for y in range(height)}


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA"])
def test_we_read_what_pillow_writes(mode: str) -> None:
    width, height = 61, 40
    im = Image.frombytes("RGB", (width, height), gradient_rgb(width, height)).convert(mode)
    out = io.BytesIO()
    im.save(out, format="PNG")
    png = out.getvalue()
    expected = im.convert("RGB").tobytes()
    assert decode_png(png) == (width, height, expected)
    if mode == "RGB":
        # Pillow filters adaptively: the reader really undid more than one filter type.
        assert len(_filter_types(png, width, height, 3)) > 1


@pytest.mark.parametrize("optimize", [False, True])
def test_we_read_pillow_random_images(optimize: bool) -> None:
    rgb = random_rgb(40, 30)
    out = io.BytesIO()
    Image.frombytes("RGB", (40, 30), rgb).save(out, format="PNG", optimize=optimize)
    assert decode_png(out.getvalue()) == (40, 30, rgb)


def test_writer_rejects_bad_input() -> None:
    with pytest.raises(PngError):
        encode_png(0, 10, b"")
    with pytest.raises(PngError):
        encode_png(2, 2, bytes(11))


def test_write_png_to_an_unwritable_path_is_a_png_error(tmp_path: Path) -> None:
    with pytest.raises(PngError, match="cannot write"):
        write_png(tmp_path / "missing-dir" / "x.png", 1, 1, b"\0\0\0")


def test_reader_rejects_damaged_files() -> None:
    good = encode_png(4, 4, random_rgb(4, 4))
    with pytest.raises(PngError, match="signature"):
        decode_png(b"GIF89a" + good)
    with pytest.raises(PngError):
        decode_png(good[:40])
    corrupt = bytearray(good)
    corrupt[20] ^= 0xFF  # inside IHDR: its CRC no longer matches
    with pytest.raises(PngError, match="CRC"):
        decode_png(bytes(corrupt))


def _png(width: int, height: int, depth: int, color_type: int, idat: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def test_reader_refuses_huge_dimensions_without_allocating() -> None:
    with pytest.raises(PngError, match=r"out of range|too large"):
        decode_png(_png(1 << 30, 1 << 30, 8, 2, zlib.compress(b"")))
    with pytest.raises(PngError, match="too large"):
        decode_png(_png(30000, 30000, 8, 2, zlib.compress(b"")))


def test_reader_refuses_unsupported_formats() -> None:
    with pytest.raises(PngError, match="unsupported"):
        decode_png(_png(1, 1, 16, 2, zlib.compress(bytes(7))))
    with pytest.raises(PngError, match="unsupported"):
        decode_png(_png(1, 1, 8, 3, zlib.compress(bytes(2))))  # palette


def test_reader_rejects_short_image_data_and_bad_filters() -> None:
    with pytest.raises(PngError, match="shorter"):
        decode_png(_png(2, 2, 8, 2, zlib.compress(bytes(7))))
    with pytest.raises(PngError, match="filter"):
        decode_png(_png(1, 1, 8, 2, zlib.compress(b"\x09abc")))
    with pytest.raises(PngError, match="bad image data"):
        decode_png(_png(1, 1, 8, 2, b"not zlib"))
