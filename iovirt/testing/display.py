"""A simulator of the :class:`iovirt.display.Display` protocol, backed by a bytearray.

This is a simulator, not a display device: there is no guest, no PCI and no dirty log. A
test (or the VNC fuzzer) plays the guest: it sets a mode, draws with :meth:`fill` /
:meth:`put_pixel` / :meth:`write`, and the simulator records which rows changed, as a
display model reports them through :meth:`dirty_rows`. :meth:`rgb_at` decodes a pixel the
way a front-end is expected to show it, so tests can compare what a VNC client received
with what the "guest" drew.
"""

from __future__ import annotations

import threading

from iovirt.display import DisplayMode

DEFAULT_VRAM_SIZE = 16 * 1024 * 1024


def _expand(value: int, bits: int) -> int:
    """An n-bit channel value scaled to 8 bits by bit replication (0 -> 0, max -> 255)."""
    value <<= 8 - bits
    while bits < 8:
        value |= value >> bits
        bits *= 2
    return value & 0xFF


def encode_pixel(bpp: int, r: int, g: int, b: int) -> bytes:
    """The bytes a guest writes for colour (r, g, b) at ``bpp`` (see DisplayMode): 8 bpp is
    treated as a grey index and gets the colour's mean."""
    if bpp == 32:
        return bytes((b, g, r, 0))
    if bpp == 24:
        return bytes((b, g, r))
    if bpp == 16:
        return ((r >> 3) << 11 | (g >> 2) << 5 | (b >> 3)).to_bytes(2, "little")
    if bpp == 15:
        return ((r >> 3) << 10 | (g >> 3) << 5 | (b >> 3)).to_bytes(2, "little")
    if bpp == 8:
        return bytes(((r + g + b) // 3,))
    raise ValueError(f"no such display depth: {bpp} bpp")


def decode_pixel(bpp: int, data: bytes) -> tuple[int, int, int]:
    """The colour a front-end shows for one pixel's bytes at ``bpp``."""
    if bpp in (32, 24):
        return data[2], data[1], data[0]
    value = int.from_bytes(data[:2], "little")
    if bpp == 16:
        return _expand(value >> 11, 5), _expand((value >> 5) & 0x3F, 6), _expand(value & 0x1F, 5)
    if bpp == 15:
        return (
            _expand((value >> 10) & 0x1F, 5),
            _expand((value >> 5) & 0x1F, 5),
            _expand(value & 0x1F, 5),
        )
    if bpp == 8:
        return data[0], data[0], data[0]
    raise ValueError(f"no such display depth: {bpp} bpp")


class SimulatedDisplay:
    """A Display whose video memory is a bytearray a test draws into.

    Thread-safe like a real display model: the VNC server reads it on its loop while a
    test thread draws.
    """

    def __init__(
        self,
        width: int = 640,
        height: int = 480,
        bpp: int = 32,
        vram_size: int = DEFAULT_VRAM_SIZE,
    ) -> None:
        self._lock = threading.Lock()
        self.vram_buffer = bytearray(vram_size)
        self._mode: DisplayMode | None = None
        self._dirty: set[int] = set()
        self.dirty_rows_calls = 0
        self.set_mode(width, height, bpp)

    # --- the Display protocol ---

    def mode(self) -> DisplayMode | None:
        with self._lock:
            return self._mode

    def vram(self) -> memoryview:
        return memoryview(self.vram_buffer)

    def dirty_rows(self) -> list[tuple[int, int]]:
        with self._lock:
            self.dirty_rows_calls += 1
            rows = sorted(self._dirty)
            self._dirty.clear()
        ranges: list[tuple[int, int]] = []
        for row in rows:
            if ranges and ranges[-1][1] == row:
                ranges[-1] = (ranges[-1][0], row + 1)
            else:
                ranges.append((row, row + 1))
        return ranges

    # --- what the "guest" does ---

    def set_mode(
        self, width: int, height: int, bpp: int = 32, stride: int | None = None, offset: int = 0
    ) -> DisplayMode:
        """Program a mode (the screen keeps whatever video memory holds) and mark it all
        dirty, as a display model does after a mode change."""
        bytes_per_pixel = (bpp + 7) // 8
        mode = DisplayMode(width, height, bpp, stride or width * bytes_per_pixel, offset)
        if mode.offset + mode.size > len(self.vram_buffer):
            raise ValueError(f"{width}x{height}x{bpp} does not fit in video memory")
        with self._lock:
            self._mode = mode
            self._dirty = set(range(height))
        return mode

    def disable(self) -> None:
        """Turn scan-out off (the screen goes blank)."""
        with self._lock:
            self._mode = None
            self._dirty.clear()

    def _current(self) -> DisplayMode:
        mode = self._mode
        if mode is None:
            raise ValueError("the display is disabled")
        return mode

    def write(self, offset: int, data: bytes) -> None:
        """Write raw bytes into video memory at ``offset``, marking the rows of the current
        mode they touch dirty (as a dirty log would)."""
        with self._lock:
            self.vram_buffer[offset : offset + len(data)] = data
            mode = self._mode
            if mode is None or not data:
                return
            first = (offset - mode.offset) // mode.stride
            last = (offset + len(data) - 1 - mode.offset) // mode.stride
            self._dirty.update(range(max(first, 0), min(last + 1, mode.height)))

    def fill(self, x: int, y: int, width: int, height: int, rgb: tuple[int, int, int]) -> None:
        """Paint a rectangle of the current mode in one colour."""
        with self._lock:
            mode = self._current()
            pixel = encode_pixel(mode.bpp, *rgb)
            row = pixel * width
            for line in range(y, y + height):
                start = mode.offset + line * mode.stride + x * mode.bytes_per_pixel
                self.vram_buffer[start : start + len(row)] = row
            self._dirty.update(range(y, y + height))

    def put_pixel(self, x: int, y: int, rgb: tuple[int, int, int]) -> None:
        self.fill(x, y, 1, 1, rgb)

    def draw_pattern(self, seed: int = 0) -> None:
        """Fill the screen with a pattern where neighbouring pixels differ in every
        channel, so a wrong offset, stride or channel order shows."""
        with self._lock:
            mode = self._current()
            bpp = mode.bpp
            for y in range(mode.height):
                row = b"".join(
                    encode_pixel(
                        bpp, (x * 7 + seed) & 0xFF, (y * 5 + seed) & 0xFF, (x + y * 3) & 0xFF
                    )
                    for x in range(mode.width)
                )
                start = mode.offset + y * mode.stride
                self.vram_buffer[start : start + len(row)] = row
            self._dirty = set(range(mode.height))

    # --- what tests check against ---

    def rgb_at(self, x: int, y: int) -> tuple[int, int, int]:
        """The colour a front-end should show at (x, y)."""
        with self._lock:
            mode = self._current()
            start = mode.offset + y * mode.stride + x * mode.bytes_per_pixel
            return decode_pixel(mode.bpp, bytes(self.vram_buffer[start : start + 4]))

    def screen_rgb(self) -> bytes:
        """The whole screen as RGB bytes (3 per pixel, row by row): what a screenshot of it
        should contain. Black 640x480 while disabled."""
        with self._lock:
            mode = self._mode
            if mode is None:
                return bytes(640 * 480 * 3)
            size = mode.bytes_per_pixel
            rows = [
                bytes(self.vram_buffer[start : start + mode.width * size])
                for start in range(
                    mode.offset, mode.offset + mode.height * mode.stride, mode.stride
                )
            ]
        out = bytearray()
        for row in rows:
            if mode.bpp in (32, 24):  # B, G, R[, X] -> R, G, B
                rgb = bytearray(mode.width * 3)
                rgb[0::3], rgb[1::3], rgb[2::3] = row[2::size], row[1::size], row[0::size]
                out += rgb
            else:
                for x in range(0, len(row), size):
                    out += bytes(decode_pixel(mode.bpp, row[x : x + size]))
        return bytes(out)
