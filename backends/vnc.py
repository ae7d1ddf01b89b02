"""A VNC server (RFB 3.8, RFC 6143) for a :class:`~iovirt.display.Display`, on asyncio.

What it speaks: protocol versions 3.3, 3.7 and 3.8; security None (no password) or VNC
Authentication (:mod:`iovirt.backends.vnc_auth`); any true-colour pixel format of 8, 16 or
32 bits in either byte order; the Raw and Zlib encodings (one zlib stream per client, as
RFC 6143 7.7 / the RFB community spec require) and the DesktopSize pseudo-encoding; key
events (X11 keysyms, turned into Linux key codes by :mod:`iovirt.backends.keysym`) and
pointer events, handed to every configured :class:`~iovirt.input.InputSink`.

How updates flow: the display reports written rows with ``dirty_rows()``, which consumes
them, so the server collects them in one place (:meth:`VncServer.poll_display`) and adds
them to every client's own pending set. Each client has an update task that, while the
client has a FramebufferUpdateRequest outstanding, polls the display every
:data:`POLL_INTERVAL_S` and answers with the pending rows (incremental requests) or the
whole requested area (non-incremental ones). A mode change becomes a DesktopSize
rectangle for clients that asked for it; others keep the size they were told at ServerInit
and see the new picture clipped (or padded with black).

Clients are hostile: message sizes are bounded, a malformed message disconnects that
client, and nothing a client sends can stop the server or the other clients. The default
address is loopback because VNC Authentication is weak (single DES, 8-character passwords).

Left out on purpose: colour-map pixel formats (a client asking for one keeps its previous
true-colour format), exclusive sessions (ClientInit's shared flag is ignored: every client
shares), the clipboard (ClientCutText is read and dropped), CopyRect and the other
encodings. Keys are mapped for a US layout in the guest.

Also here: :func:`capture_png`, a minimal RFB client behind ``iovirt screenshot``, and
:func:`display_png`, a screenshot of a Display without the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import functools
import logging
import re
import socket
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from iovirt.backends import vnc_auth
from iovirt.backends.keysym import KEY_LEFTSHIFT, KEY_RIGHTSHIFT, SHIFT_KEYSYMS, keysym_to_key
from iovirt.bus.pci import GuestAccessLog
from iovirt.display import Display, DisplayMode
from iovirt.errors import ResourceError, UserError, one_line
from iovirt.input import InputSink
from iovirt.png import encode_png, write_png

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
# VNC display :N listens on port 5900 + N.
DISPLAY_BASE_PORT = 5900
DEFAULT_PORT = DISPLAY_BASE_PORT
DEFAULT_NAME = "iovirt"

# What a client sees while the display is disabled (or programmed with a mode the server
# cannot show): a black screen of this size.
BLANK_WIDTH = 640
BLANK_HEIGHT = 480

# --- ProtocolVersion (RFC 6143 7.1.1) ---
PROTOCOL_VERSION_3_8 = b"RFB 003.008\n"
_VERSION_RE = re.compile(rb"RFB (\d{3})\.(\d{3})\n")
RFB_3_3 = 3
RFB_3_7 = 7
RFB_3_8 = 8

# --- Security types (7.1.2) and SecurityResult (7.1.3) ---
SECURITY_INVALID = 0
SECURITY_NONE = 1
SECURITY_VNC_AUTH = 2
SECURITY_RESULT_OK = 0
SECURITY_RESULT_FAILED = 1

# --- Client-to-server message types (7.5) ---
MSG_SET_PIXEL_FORMAT = 0
MSG_SET_ENCODINGS = 2
MSG_FRAMEBUFFER_UPDATE_REQUEST = 3
MSG_KEY_EVENT = 4
MSG_POINTER_EVENT = 5
MSG_CLIENT_CUT_TEXT = 6

# --- Server-to-client message types (7.6) ---
MSG_FRAMEBUFFER_UPDATE = 0
MSG_SET_COLOUR_MAP_ENTRIES = 1
MSG_BELL = 2
MSG_SERVER_CUT_TEXT = 3

# --- Encodings (7.7) and pseudo-encodings (7.8) ---
ENCODING_RAW = 0
ENCODING_ZLIB = 6
ENCODING_DESKTOP_SIZE = -223
# CompressLevel pseudo-encodings: -256 + level, level 0..9 (RFB community spec).
ENCODING_COMPRESS_LEVEL_0 = -256
ENCODING_COMPRESS_LEVEL_9 = -247
DEFAULT_ZLIB_LEVEL = 6

# --- Message layouts (after the message-type byte) ---
_SET_PIXEL_FORMAT = struct.Struct(">3x16s")
_SET_ENCODINGS = struct.Struct(">xH")
_UPDATE_REQUEST = struct.Struct(">BHHHH")  # incremental, x, y, width, height
_KEY_EVENT = struct.Struct(">B2xI")  # down-flag, keysym
_POINTER_EVENT = struct.Struct(">BHH")  # button-mask, x, y
_CUT_TEXT = struct.Struct(">3xI")  # length
_PIXEL_FORMAT = struct.Struct(">BBBBHHHBBB3x")
_SERVER_INIT = struct.Struct(">HH16sI")
_UPDATE_HEADER = struct.Struct(">BxH")
_RECT_HEADER = struct.Struct(">HHHHi")
_U32 = struct.Struct(">I")

# --- Limits on what a client (or, for capture_png, a server) may make us do ---
MAX_CLIENTS = 16
# Real clients announce a few dozen encodings; SetEncodings's count field allows 65535.
MAX_ENCODINGS = 1024
# ClientCutText is read and thrown away up to this size; a bigger one disconnects.
MAX_CUT_TEXT = 1 << 20
_DISCARD_CHUNK = 64 * 1024
MAX_NAME_LENGTH = 1024
# A mode larger than this is shown as the blank screen (RFB sizes are 16 bits anyway).
MAX_SCREEN_DIMENSION = 16384
# capture_png refuses a screen larger than this many pixels (4 bytes each in memory).
MAX_CAPTURE_PIXELS = 1 << 26

HANDSHAKE_TIMEOUT_S = 30.0
# A wrong password is answered after this pause, which slows password guessing.
AUTH_FAILURE_DELAY_S = 0.3
# How often a client with an outstanding request looks for new damage.
POLL_INTERVAL_S = 0.03
# Updates are cut into rectangles of about this many bytes of client pixels, so that a
# full-screen update neither builds one huge buffer nor holds the loop for long.
RECT_CHUNK_BYTES = 256 * 1024

MAX_TRACEBACKS_LOGGED = 8

_DISPLAY_DEPTHS = (8, 15, 16, 24, 32)
_CLIENT_DEPTHS = (8, 16, 32)


class VncError(ResourceError):
    """A VNC endpoint cannot be used: the address cannot be bound, the server does not
    answer or refuses us. ``resource`` names the endpoint."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(where, problem)


class VncAddressError(UserError, ValueError):
    """A VNC address string is malformed (also a ValueError, for config validators)."""


class _ClientError(Exception):
    """A client broke the protocol; it is disconnected with this reason."""


# --------------------------------------------------------------------------------------
# Addresses
# --------------------------------------------------------------------------------------


def _parse_port(text: str, address: str) -> int:
    if not text.isdigit() or int(text) > 0xFFFF:
        raise VncAddressError(one_line(f"vnc address {address!r}: {text!r} is not a port number"))
    return int(text)


def parse_vnc_address(text: str) -> tuple[str, int]:
    """``(host, port)`` of a VNC address.

    Accepted: ``host:port`` (``127.0.0.1:5901``), ``host::port`` (vncviewer's spelling),
    ``[ipv6]:port``, and ``:N``, QEMU's display number, meaning port 5900 + N on
    127.0.0.1.
    """
    s = text.strip()
    if s.startswith(":") and not s.startswith("::"):
        number = s[1:]
        if not number.isdigit() or int(number) > 0xFFFF - DISPLAY_BASE_PORT:
            raise VncAddressError(
                one_line(f"vnc address {text!r}: {number!r} is not a display number")
            )
        return DEFAULT_HOST, DISPLAY_BASE_PORT + int(number)
    if s.startswith("["):
        end = s.find("]")
        if end < 0 or not s[end + 1 :].startswith(":"):
            raise VncAddressError(one_line(f"vnc address {text!r}: expected [ipv6-address]:port"))
        return s[1:end], _parse_port(s[end + 2 :], text)
    host, sep, port = s.partition("::") if "::" in s else s.rpartition(":")
    if not sep or not host or ":" in host:
        raise VncAddressError(
            one_line(
                f"vnc address {text!r}: expected host:port (e.g. 127.0.0.1:5901), "
                "[ipv6]:port or :N (display number)"
            )
        )
    return host, _parse_port(port, text)


# --------------------------------------------------------------------------------------
# Pixel formats and conversion
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PixelFormat:
    """An RFB PIXEL_FORMAT (RFC 6143 7.4)."""

    bits_per_pixel: int
    depth: int
    big_endian: bool
    true_colour: bool
    red_max: int
    green_max: int
    blue_max: int
    red_shift: int
    green_shift: int
    blue_shift: int

    @property
    def bytes_per_pixel(self) -> int:
        return self.bits_per_pixel // 8

    def pack(self) -> bytes:
        return _PIXEL_FORMAT.pack(
            self.bits_per_pixel,
            self.depth,
            int(self.big_endian),
            int(self.true_colour),
            self.red_max,
            self.green_max,
            self.blue_max,
            self.red_shift,
            self.green_shift,
            self.blue_shift,
        )

    @classmethod
    def unpack(cls, data: bytes) -> PixelFormat:
        bpp, depth, big, true_colour, rmax, gmax, bmax, rs, gs, bs = _PIXEL_FORMAT.unpack(data)
        return cls(bpp, depth, big != 0, true_colour != 0, rmax, gmax, bmax, rs, gs, bs)

    def problem(self) -> str | None:
        """Why a server cannot send true-colour pixels in this format, or None."""
        if self.bits_per_pixel not in _CLIENT_DEPTHS:
            return f"{self.bits_per_pixel} bits per pixel (RFB allows 8, 16, 32)"
        if 0 in (self.red_max, self.green_max, self.blue_max):
            return "a colour channel with a maximum of 0"
        return None


# What the server announces in ServerInit: the display's own 32 bpp layout (bytes B, G, R,
# X), so a client that keeps it gets video memory as it is.
SERVER_PIXEL_FORMAT = PixelFormat(32, 24, False, True, 255, 255, 255, 16, 8, 0)


def _expand_table(bits: int, mask: int, shift_right: int = 0, shift_left: int = 0) -> bytes:
    """A 256-entry table: the ``bits``-wide field ``(b >> shift_right) & mask`` of a byte,
    scaled to 8 bits by bit replication (so full scale stays full scale)."""
    table = bytearray(256)
    for b in range(256):
        v = ((b >> shift_right) & mask) << shift_left
        v8 = v << (8 - bits)
        width = bits
        while width < 8:
            v8 |= v8 >> width
            width *= 2
        table[b] = v8 & 0xFF
    return bytes(table)


# Tables that split 16 and 15 bpp pixels (little-endian r5g6b5 / x1r5g5b5) into 8-bit
# channels using only bytes.translate on the low and high byte planes.
_R565_FROM_HI = _expand_table(5, 0x1F, shift_right=3)
_G6_PART_HI = bytes((b & 0x07) << 3 for b in range(256))
_G6_PART_LO = bytes(b >> 5 for b in range(256))
_EXPAND_6 = _expand_table(6, 0x3F)
_B5_FROM_LO = _expand_table(5, 0x1F)
_R555_FROM_HI = _expand_table(5, 0x1F, shift_right=2)
_G5_PART_HI = bytes((b & 0x03) << 3 for b in range(256))
_EXPAND_5 = _expand_table(5, 0x1F)
_IDENTITY = bytes(range(256))


def _or_bytes(parts: Sequence[bytes]) -> bytes:
    """Bytewise OR of equal-length byte strings (as one big-integer OR: no carries cross
    byte boundaries, so it is exact, and it runs in C)."""
    if len(parts) == 1:
        return parts[0]
    acc = 0
    for part in parts:
        acc |= int.from_bytes(part, "little")
    return acc.to_bytes(len(parts[0]), "little")


def rgb_planes(pixels: bytes, bpp: int) -> tuple[bytes, bytes, bytes]:
    """The red, green and blue channels (one byte per pixel, 0-255) of pixels laid out as
    a display mode of ``bpp`` describes them (8 bpp is shown as grey)."""
    if bpp == 32:
        return pixels[2::4], pixels[1::4], pixels[0::4]
    if bpp == 24:
        return pixels[2::3], pixels[1::3], pixels[0::3]
    if bpp in (16, 15):
        lo, hi = pixels[0::2], pixels[1::2]
        if bpp == 16:
            red = hi.translate(_R565_FROM_HI)
            green = _or_bytes((hi.translate(_G6_PART_HI), lo.translate(_G6_PART_LO)))
            return red, green.translate(_EXPAND_6), lo.translate(_B5_FROM_LO)
        red = hi.translate(_R555_FROM_HI)
        green = _or_bytes((hi.translate(_G5_PART_HI), lo.translate(_G6_PART_LO)))
        return red, green.translate(_EXPAND_5), lo.translate(_B5_FROM_LO)
    if bpp == 8:
        return pixels, pixels, pixels
    raise ValueError(f"no such display depth: {bpp} bpp")


def to_rgb(pixels: bytes, bpp: int) -> bytes:
    """Pixels of a display mode of ``bpp`` as packed RGB (3 bytes per pixel)."""
    red, green, blue = rgb_planes(pixels, bpp)
    out = bytearray(len(red) * 3)
    out[0::3], out[1::3], out[2::3] = red, green, blue
    return bytes(out)


@functools.lru_cache(maxsize=512)
def _channel_byte_table(max_value: int, shift: int, byte_index: int) -> bytes | None:
    """For an 8-bit channel value v: byte ``byte_index`` (0 = least significant) of the
    client pixel value that carries v scaled to ``max_value`` at ``shift``. None when that
    byte never holds any of the channel's bits."""
    table = bytes(
        ((((v * max_value + 127) // 255) << shift) >> (8 * byte_index)) & 0xFF for v in range(256)
    )
    return None if not any(table) else table


def convert_pixels(pixels: bytes, bpp: int, fmt: PixelFormat) -> bytes:
    """Pixels of a display mode of ``bpp`` in the client's true-colour format ``fmt``.

    Every byte of a client pixel is the OR of lookup tables applied to the 8-bit
    channel planes, and the byte planes are interleaved with slice assignment: no Python
    loop runs per pixel.
    """
    if (
        bpp == 32
        and dataclasses.replace(fmt, depth=SERVER_PIXEL_FORMAT.depth) == SERVER_PIXEL_FORMAT
    ):
        return pixels  # the display's own layout (depth is informational only)
    planes = rgb_planes(pixels, bpp)
    count = len(planes[0])
    size = fmt.bytes_per_pixel
    channels = (
        (planes[0], fmt.red_max, fmt.red_shift),
        (planes[1], fmt.green_max, fmt.green_shift),
        (planes[2], fmt.blue_max, fmt.blue_shift),
    )
    out = bytearray(count * size)
    for byte_index in range(size):
        parts = []
        for plane, max_value, shift in channels:
            table = _channel_byte_table(max_value, shift, byte_index)
            if table is not None:
                parts.append(plane if table == _IDENTITY else plane.translate(table))
        if not parts:
            continue
        position = size - 1 - byte_index if fmt.big_endian else byte_index
        out[position::size] = _or_bytes(parts)
    return bytes(out)


# --------------------------------------------------------------------------------------
# Reading the display
# --------------------------------------------------------------------------------------


def _usable(mode: DisplayMode | None, vram_size: int) -> DisplayMode | None:
    """``mode`` if the server can show it, None if the screen is to be blank. The display
    promises a mode lies inside video memory; checking again costs nothing and keeps a
    buggy model from making the server read out of bounds."""
    if mode is None:
        return None
    ok = (
        mode.bpp in _DISPLAY_DEPTHS
        and 0 < mode.width <= MAX_SCREEN_DIMENSION
        and 0 < mode.height <= MAX_SCREEN_DIMENSION
        and mode.stride >= mode.width * mode.bytes_per_pixel
        and mode.offset >= 0
        and mode.offset + mode.size <= vram_size
    )
    return mode if ok else None


def _byte_view(vram: memoryview) -> memoryview:
    """``vram`` indexed by byte, whatever item format the display's view has."""
    return vram if vram.format == "B" and vram.ndim == 1 else vram.cast("B")


def _screen_size(mode: DisplayMode | None) -> tuple[int, int]:
    return (mode.width, mode.height) if mode is not None else (BLANK_WIDTH, BLANK_HEIGHT)


def _read_rect(
    mode: DisplayMode | None, vram: memoryview, x: int, y: int, width: int, height: int
) -> tuple[bytes, int]:
    """The pixels of a rectangle as ``(bytes, bpp)`` in the display's format; whatever
    lies outside the mode (or everything, for a blank screen) is black."""
    if mode is None:
        return bytes(width * height * 4), 32
    size = mode.bytes_per_pixel
    row_bytes = width * size
    visible_w = max(0, min(width, mode.width - x))
    visible_h = max(0, min(height, mode.height - y))
    if x == 0 and visible_w == width and visible_h == height and mode.stride == row_bytes:
        # Whole rows of a mode without padding between them: one slice.
        start = mode.offset + y * mode.stride
        return bytes(vram[start : start + height * row_bytes]), mode.bpp
    pad = bytes((width - visible_w) * size)
    rows: list[bytes | memoryview] = []
    for line in range(y, y + visible_h):
        start = mode.offset + line * mode.stride + x * size
        rows.append(vram[start : start + visible_w * size])
        if pad:
            rows.append(pad)
    if visible_h < height:
        rows.append(bytes((height - visible_h) * row_bytes))
    return b"".join(rows), mode.bpp


def display_png(display: Display) -> bytes:
    """A PNG of what ``display`` shows now (640x480 black while it is disabled)."""
    vram = _byte_view(display.vram())
    mode = _usable(display.mode(), vram.nbytes)
    width, height = _screen_size(mode)
    pixels, bpp = _read_rect(mode, vram, 0, 0, width, height)
    return encode_png(width, height, to_rgb(pixels, bpp))


# --------------------------------------------------------------------------------------
# Row-range sets
# --------------------------------------------------------------------------------------


def _merge(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint, non-adjacent ``[first, last)`` ranges covering ``ranges``."""
    merged: list[tuple[int, int]] = []
    for first, last in sorted(r for r in ranges if r[0] < r[1]):
        if merged and first <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return merged


def _intersect(ranges: Sequence[tuple[int, int]], first: int, last: int) -> list[tuple[int, int]]:
    return [(max(a, first), min(b, last)) for a, b in ranges if max(a, first) < min(b, last)]


def _subtract(ranges: Sequence[tuple[int, int]], first: int, last: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in ranges:
        if a < first:
            out.append((a, min(b, first)))
        if b > last:
            out.append((max(a, last), b))
    return out


# --------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------


@dataclass
class _Request:
    """The FramebufferUpdateRequest a client is waiting on."""

    incremental: bool
    x: int
    y: int
    width: int
    height: int

    def merged(self, other: _Request) -> _Request:
        """Both requests as one: the bounding box, incremental only if both are."""
        x, y = min(self.x, other.x), min(self.y, other.y)
        right = max(self.x + self.width, other.x + other.width)
        bottom = max(self.y + self.height, other.y + other.height)
        return _Request(self.incremental and other.incremental, x, y, right - x, bottom - y)


@dataclass
class _Plan:
    """One FramebufferUpdate to send: pixel rectangles, then maybe a DesktopSize."""

    mode: DisplayMode | None
    rects: list[tuple[int, int, int, int]]
    resize: tuple[int, int] | None = None


class VncServer:
    """Serves one display to any number of VNC clients (up to :data:`MAX_CLIENTS`).

    Create it, ``await start()`` on the loop that is to run it, ``await close()`` when
    done. Input from clients goes to every sink in ``inputs``, in order.
    """

    def __init__(
        self,
        display: Display,
        inputs: Sequence[InputSink],
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        password: str | None = None,
        name: str = DEFAULT_NAME,
    ) -> None:
        self.display = display
        self.inputs = list(inputs)
        self.host = host
        self.port = port
        self.password = password
        self.name = name
        if password is not None and len(password.encode("latin-1", "replace")) > 8:
            log.warning("vnc: only the first 8 characters of the password count (RFB limit)")
        self._server: asyncio.Server | None = None
        self._clients: set[_VncClient] = set()
        # The last mode the server saw (a change damages every client's whole screen).
        self._mode: DisplayMode | None = None
        self._mode_known = False
        self._screen: DisplayMode | None = None
        self.client_errors = GuestAccessLog("vnc", log, what="VNC client errors")
        self.unexpected_errors = 0

    @property
    def address(self) -> tuple[str, int]:
        """The address the server listens on (the real port when started with port 0)."""
        if self._server is None or not self._server.sockets:
            return self.host, self.port
        sockname = self._server.sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])

    @property
    def clients(self) -> int:
        """How many clients are connected."""
        return len(self._clients)

    async def start(self) -> None:
        """Listen on the configured address; a problem with it is a :class:`VncError`."""
        where = f"vnc {self.host}:{self.port}"
        try:
            self._server = await asyncio.start_server(self._on_connect, self.host, self.port)
        except socket.gaierror as e:
            raise VncError(where, f"cannot resolve {self.host!r}: {e.strerror}") from e
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                problem = "address already in use (another VNC server or VM?); choose another port"
            elif e.errno == errno.EACCES:
                problem = "permission denied (ports below 1024 need root); choose another port"
            elif e.errno == errno.EADDRNOTAVAIL:
                problem = "no local interface has this address; use 127.0.0.1 or 0.0.0.0"
            else:
                problem = f"cannot listen: {e.strerror or e}"
            raise VncError(where, problem) from e
        log.info("vnc: listening on %s:%d", *self.address)

    async def close(self) -> None:
        """Stop listening and disconnect every client."""
        if self._server is not None:
            self._server.close()
        clients = list(self._clients)
        for client in clients:
            client.abort()
        await asyncio.gather(*(c.finished() for c in clients), return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._clients) >= MAX_CLIENTS:
            log.warning("vnc: refusing a client: already %d connected", MAX_CLIENTS)
            writer.close()
            return
        client = _VncClient(self, reader, writer)
        self._clients.add(client)
        try:
            await client.run()
        finally:
            self._clients.discard(client)

    def unexpected_error(self, where: str) -> None:
        """Log an exception that cost a client its connection: with its traceback the
        first few times, counted after that (a broken display must not flood the log)."""
        self.unexpected_errors += 1
        if self.unexpected_errors <= MAX_TRACEBACKS_LOGGED:
            log.exception("vnc: %s: unexpected error; client disconnected", where)

    # --- the display, as clients see it ---

    def screen(self) -> tuple[DisplayMode | None, int, int]:
        """The mode being shown (None: blank) and the screen size, as of the last poll."""
        if not self._mode_known:
            self.poll_display()
        width, height = _screen_size(self._screen)
        return self._screen, width, height

    def poll_display(self) -> None:
        """Collect the display's damage and hand it to every client (``dirty_rows()``
        consumes it, so this is the only place that calls it)."""
        mode = self.display.mode()
        rows = self.display.dirty_rows()
        if not self._mode_known or mode != self._mode:
            self._mode, self._mode_known = mode, True
            self._screen = _usable(mode, self.display.vram().nbytes)
            rows = [(0, _screen_size(self._screen)[1])]
        if rows:
            for client in self._clients:
                client.add_damage(rows)

    # --- input ---

    def key_event(self, keycode: int, down: bool) -> None:
        for sink in self.inputs:
            try:
                sink.key_event(keycode, down)
            except Exception as e:  # one broken device must not stop input to the others
                self.client_errors(f"input device {sink!r} failed on a key event: {e!r}")

    def pointer_event(self, x: int, y: int, buttons: int) -> None:
        # The size of the screen now, even if no client has polled since a mode change.
        width, height = _screen_size(_usable(self.display.mode(), self.display.vram().nbytes))
        x, y = min(x, width - 1), min(y, height - 1)
        for sink in self.inputs:
            try:
                sink.pointer_event(x, y, buttons, width, height)
            except Exception as e:
                self.client_errors(f"input device {sink!r} failed on a pointer event: {e!r}")


class _VncClient:
    """One connection: handshake, then a message loop (this task) and an update task."""

    def __init__(
        self, server: VncServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.version = RFB_3_8
        self.format = SERVER_PIXEL_FORMAT
        self.encoding = ENCODING_RAW
        self.desktop_size = False
        self.zlib_level = DEFAULT_ZLIB_LEVEL
        self._zlib: zlib._Compress | None = None
        # The framebuffer size this client believes in (ServerInit, then DesktopSize).
        self.fb_width = 0
        self.fb_height = 0
        self._pending: list[tuple[int, int]] = []
        self._request: _Request | None = None
        # After a DesktopSize the client's next request may still describe the old size.
        self._full_next_request = False
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._update_task: asyncio.Task[None] | None = None
        self._done = asyncio.Event()
        # Keyboard state: keys down (code -> whether we pressed Shift for it), the client's
        # own Shift keysyms held, and our synthesized Shift presses still held.
        self._keys_down: dict[int, bool] = {}
        self._shift_held: set[int] = set()
        self._synthetic_shifts = 0
        self._buttons = 0
        self._pointer = (0, 0)

    # --- lifetime ---

    async def run(self) -> None:
        self._task = asyncio.current_task()
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                ready = await self._handshake()
            if ready:
                log.info("vnc: client %s connected (RFB 3.%d)", self.peer, self.version)
                self._update_task = asyncio.create_task(self._update_loop())
                try:
                    await self._message_loop()
                finally:
                    log.info("vnc: client %s disconnected", self.peer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away
        except TimeoutError:
            self.server.client_errors(f"client {self.peer}: handshake timed out")
        except _ClientError as e:
            self.server.client_errors(f"client {self.peer}: {e}; disconnected")
        except asyncio.CancelledError:
            pass  # the server is closing
        except Exception:  # a bug must cost this client, never the server
            self.server.unexpected_error(f"client {self.peer}")
        finally:
            await self._cleanup()

    async def _cleanup(self) -> None:
        try:
            if self._update_task is not None:
                self._update_task.cancel()
            self._release_input()
            self.writer.close()
            if self._update_task is not None:
                with contextlib.suppress(BaseException):
                    await self._update_task
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
        finally:
            # Set even when close() cancels us in the middle of cleaning up.
            self._done.set()

    def abort(self) -> None:
        """Disconnect now (the server is closing)."""
        if self._task is not None:
            self._task.cancel()
        else:
            self.writer.close()
            self._done.set()

    async def finished(self) -> None:
        await self._done.wait()

    # --- handshake (RFC 6143 7.1, 7.3) ---

    async def _handshake(self) -> bool:
        """Version, security, ClientInit/ServerInit; False when the client is refused."""
        self.writer.write(PROTOCOL_VERSION_3_8)
        match = _VERSION_RE.fullmatch(await self.reader.readexactly(12))
        if match is None:
            raise _ClientError("not an RFB client (bad ProtocolVersion)")
        major, minor = int(match[1]), int(match[2])
        if major < 3:
            raise _ClientError(f"unsupported protocol version {major}.{minor}")
        # RFC 6143 7.1.1: other 3.x versions are to be treated as 3.3.
        if major > 3 or minor >= 8:
            self.version = RFB_3_8
        elif minor == 7:
            self.version = RFB_3_7
        else:
            self.version = RFB_3_3

        security = SECURITY_NONE if self.server.password is None else SECURITY_VNC_AUTH
        if self.version == RFB_3_3:
            self.writer.write(_U32.pack(security))  # 3.3: the server decides
        else:
            self.writer.write(bytes((1, security)))
            (chosen,) = await self.reader.readexactly(1)
            if chosen != security:
                await self._security_failed(f"security type {chosen} was not offered")
                return False

        if security == SECURITY_VNC_AUTH:
            assert self.server.password is not None
            challenge = vnc_auth.new_challenge()
            self.writer.write(challenge)
            response = await self.reader.readexactly(vnc_auth.CHALLENGE_SIZE)
            if not vnc_auth.check_response(self.server.password, challenge, response):
                self.server.client_errors(f"client {self.peer}: wrong password")
                await asyncio.sleep(AUTH_FAILURE_DELAY_S)
                await self._security_failed("authentication failed")
                return False
            self.writer.write(_U32.pack(SECURITY_RESULT_OK))
        elif self.version == RFB_3_8:
            self.writer.write(_U32.pack(SECURITY_RESULT_OK))  # 3.8 confirms None too

        await self.reader.readexactly(1)  # ClientInit's shared-flag: every client shares
        _, self.fb_width, self.fb_height = self.server.screen()
        self._pending = [(0, self.fb_height)]
        name = self.server.name.encode("utf-8", "replace")[:MAX_NAME_LENGTH]
        self.writer.write(
            _SERVER_INIT.pack(self.fb_width, self.fb_height, SERVER_PIXEL_FORMAT.pack(), len(name))
            + name
        )
        await self.writer.drain()
        return True

    async def _security_failed(self, reason: str) -> None:
        self.writer.write(_U32.pack(SECURITY_RESULT_FAILED))
        if self.version == RFB_3_8:  # only 3.8 sends a reason
            text = reason.encode()
            self.writer.write(_U32.pack(len(text)) + text)
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

    # --- client messages (RFC 6143 7.5) ---

    async def _message_loop(self) -> None:
        read = self.reader.readexactly
        while True:
            (kind,) = await read(1)
            if kind == MSG_SET_PIXEL_FORMAT:
                (raw,) = _SET_PIXEL_FORMAT.unpack(await read(_SET_PIXEL_FORMAT.size))
                self._set_pixel_format(PixelFormat.unpack(raw))
            elif kind == MSG_SET_ENCODINGS:
                (count,) = _SET_ENCODINGS.unpack(await read(_SET_ENCODINGS.size))
                if count > MAX_ENCODINGS:
                    raise _ClientError(f"SetEncodings with {count} encodings")
                self._set_encodings(struct.unpack(f">{count}i", await read(4 * count)))
            elif kind == MSG_FRAMEBUFFER_UPDATE_REQUEST:
                incremental, x, y, w, h = _UPDATE_REQUEST.unpack(await read(_UPDATE_REQUEST.size))
                request = _Request(incremental != 0, x, y, w, h)
                self._request = request if self._request is None else self._request.merged(request)
                self._wakeup.set()
            elif kind == MSG_KEY_EVENT:
                down, keysym = _KEY_EVENT.unpack(await read(_KEY_EVENT.size))
                self._key_event(keysym, down != 0)
            elif kind == MSG_POINTER_EVENT:
                buttons, x, y = _POINTER_EVENT.unpack(await read(_POINTER_EVENT.size))
                self._buttons, self._pointer = buttons, (x, y)
                self.server.pointer_event(x, y, buttons)
            elif kind == MSG_CLIENT_CUT_TEXT:
                (length,) = _CUT_TEXT.unpack(await read(_CUT_TEXT.size))
                if length > MAX_CUT_TEXT:
                    raise _ClientError(f"ClientCutText of {length} bytes")
                while length:  # the clipboard is not forwarded: read and drop it
                    length -= len(await read(min(length, _DISCARD_CHUNK)))
            else:
                raise _ClientError(f"unknown message type {kind}")

    def _set_pixel_format(self, fmt: PixelFormat) -> None:
        if not fmt.true_colour:
            # Colour-map mode is not offered; the client keeps getting true colour.
            self.server.client_errors(
                f"client {self.peer}: asked for a colour map; keeping true colour"
            )
            return
        problem = fmt.problem()
        if problem is not None:
            raise _ClientError(f"SetPixelFormat with {problem}")
        self.format = fmt

    def _set_encodings(self, encodings: Sequence[int]) -> None:
        self.encoding = ENCODING_RAW
        self.desktop_size = False
        chosen = False
        for encoding in encodings:
            if encoding in (ENCODING_RAW, ENCODING_ZLIB) and not chosen:
                self.encoding, chosen = encoding, True  # the client lists its favourite first
            elif encoding == ENCODING_DESKTOP_SIZE:
                self.desktop_size = True
            elif ENCODING_COMPRESS_LEVEL_0 <= encoding <= ENCODING_COMPRESS_LEVEL_9:
                # The zlib stream keeps the level it was created with (it must stay one
                # stream), so this only counts before the first Zlib rectangle.
                self.zlib_level = encoding - ENCODING_COMPRESS_LEVEL_0
            # Anything else (CopyRect, Hextile, Tight, other pseudo-encodings) is unused.

    def _key_event(self, keysym: int, down: bool) -> None:
        if keysym in SHIFT_KEYSYMS:
            if down:
                self._shift_held.add(keysym)
            else:
                self._shift_held.discard(keysym)
        mapped = keysym_to_key(keysym)
        if mapped is None:
            return
        code, needs_shift = mapped
        if down:
            if code in self._keys_down:  # auto-repeat: the key is already down
                self.server.key_event(code, True)
                return
            synthetic = (
                needs_shift and not self._shift_held and code not in (KEY_LEFTSHIFT, KEY_RIGHTSHIFT)
            )
            if synthetic:
                if self._synthetic_shifts == 0:
                    self.server.key_event(KEY_LEFTSHIFT, True)
                self._synthetic_shifts += 1
            self._keys_down[code] = synthetic
            self.server.key_event(code, True)
        else:
            if code not in self._keys_down:
                return  # a release of a key this client never pressed
            synthetic = self._keys_down.pop(code)
            self.server.key_event(code, False)
            if synthetic:
                self._synthetic_shifts -= 1
                if self._synthetic_shifts == 0:
                    self.server.key_event(KEY_LEFTSHIFT, False)

    def _release_input(self) -> None:
        """A client that disconnects with keys or buttons held releases them, so the guest
        does not see them stuck."""
        for code, synthetic in list(self._keys_down.items()):
            self.server.key_event(code, False)
            if synthetic:
                self._synthetic_shifts -= 1
        if self._synthetic_shifts > 0:
            self.server.key_event(KEY_LEFTSHIFT, False)
        self._keys_down.clear()
        self._synthetic_shifts = 0
        if self._buttons:
            self._buttons = 0
            self.server.pointer_event(*self._pointer, 0)

    # --- framebuffer updates (RFC 6143 7.6.1) ---

    def add_damage(self, rows: Sequence[tuple[int, int]]) -> None:
        self._pending = _merge([*self._pending, *rows])
        if self._request is not None:
            self._wakeup.set()

    async def _update_loop(self) -> None:
        try:
            while True:
                if self._request is None:
                    await self._wakeup.wait()
                    self._wakeup.clear()
                    continue
                self.server.poll_display()
                plan = self._plan_update()
                if plan is not None:
                    await self._send_update(plan)
                    continue
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(POLL_INTERVAL_S):
                        await self._wakeup.wait()
                self._wakeup.clear()
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception:
            self.server.unexpected_error(f"client {self.peer}: update")
        finally:
            # Whatever ended the updates ends the connection; the message loop sees EOF.
            self.writer.close()

    def _plan_update(self) -> _Plan | None:
        """What to send for the outstanding request, or None while there is nothing yet.
        Consumes the request (and the pending rows it covers) when it returns a plan."""
        request = self._request
        assert request is not None
        mode, width, height = self.server.screen()
        if (width, height) != (self.fb_width, self.fb_height) and self.desktop_size:
            self._request = None
            self.fb_width, self.fb_height = width, height
            self._pending = [(0, height)]
            self._full_next_request = True
            return _Plan(mode, [], resize=(width, height))
        if self._full_next_request:
            self._full_next_request = False
            request = _Request(request.incremental, 0, 0, self.fb_width, self.fb_height)
        x = min(request.x, self.fb_width)
        y = min(request.y, self.fb_height)
        w = min(request.width, self.fb_width - x)
        h = min(request.height, self.fb_height - y)
        if request.incremental:
            rows = _intersect(self._pending, y, y + h) if w else []
            if not rows:
                return None
        else:
            rows = [(y, y + h)] if w and h else []
        self._request = None
        if x == 0 and w == self.fb_width:
            self._pending = _subtract(self._pending, y, y + h)
        rows_per_rect = max(1, RECT_CHUNK_BYTES // max(1, w * self.format.bytes_per_pixel))
        rects = [
            (x, top, w, min(rows_per_rect, last - top))
            for first, last in rows
            for top in range(first, last, rows_per_rect)
        ]
        return _Plan(mode, rects)

    async def _send_update(self, plan: _Plan) -> None:
        fmt, encoding = self.format, self.encoding
        count = len(plan.rects) + (plan.resize is not None)
        self.writer.write(_UPDATE_HEADER.pack(MSG_FRAMEBUFFER_UPDATE, count))
        vram = _byte_view(self.server.display.vram())
        for x, y, w, h in plan.rects:
            source, bpp = _read_rect(plan.mode, vram, x, y, w, h)
            pixels = convert_pixels(source, bpp, fmt)
            if encoding == ENCODING_ZLIB:
                if self._zlib is None:
                    self._zlib = zlib.compressobj(self.zlib_level)
                data = self._zlib.compress(pixels) + self._zlib.flush(zlib.Z_SYNC_FLUSH)
                self.writer.write(_RECT_HEADER.pack(x, y, w, h, ENCODING_ZLIB))
                self.writer.write(_U32.pack(len(data)))
                self.writer.write(data)
            else:
                self.writer.write(_RECT_HEADER.pack(x, y, w, h, ENCODING_RAW))
                self.writer.write(pixels)
            await self.writer.drain()
        if plan.resize is not None:
            # RFC 6143 7.8.2: the last rectangle of an update; the client re-requests.
            self.writer.write(_RECT_HEADER.pack(0, 0, *plan.resize, ENCODING_DESKTOP_SIZE))
        await self.writer.drain()


# --------------------------------------------------------------------------------------
# A minimal client: screenshots
# --------------------------------------------------------------------------------------

# What capture_png asks the server for: 32 bpp, bytes B, G, R, X (the display's layout).
_CAPTURE_FORMAT = SERVER_PIXEL_FORMAT


def _message(kind: int, layout: struct.Struct, *fields: object) -> bytes:
    """A client message: its type byte and ``fields`` packed as ``layout``."""
    return bytes((kind,)) + layout.pack(*fields)


def _update_request(width: int, height: int) -> bytes:
    """A non-incremental FramebufferUpdateRequest for the whole screen."""
    return _message(MSG_FRAMEBUFFER_UPDATE_REQUEST, _UPDATE_REQUEST, 0, 0, 0, width, height)


async def _read_reason(reader: asyncio.StreamReader) -> str:
    (length,) = _U32.unpack(await reader.readexactly(4))
    text = await reader.readexactly(min(length, MAX_NAME_LENGTH))
    return one_line(text.decode("utf-8", "replace"))


async def _discard(reader: asyncio.StreamReader, length: int, where: str) -> None:
    if length > MAX_CUT_TEXT:
        raise VncError(where, f"the server sent a {length}-byte message; giving up")
    while length:
        length -= len(await reader.readexactly(min(length, _DISCARD_CHUNK)))


async def _client_handshake(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, password: str | None, where: str
) -> tuple[int, int]:
    """Version and security as a client; returns the ServerInit size."""
    match = _VERSION_RE.fullmatch(await reader.readexactly(12))
    if match is None:
        raise VncError(where, "this is not a VNC server (no RFB greeting)")
    major, minor = int(match[1]), int(match[2])
    if (major, minor) >= (3, 8):
        version = RFB_3_8
    elif (major, minor) == (3, 7):
        version = RFB_3_7
    else:
        version = RFB_3_3
    writer.write(b"RFB 003.%03d\n" % version)
    if version == RFB_3_3:
        (security,) = _U32.unpack(await reader.readexactly(4))
        if security == SECURITY_INVALID:
            raise VncError(where, f"the server refused us: {await _read_reason(reader)}")
    else:
        (count,) = await reader.readexactly(1)
        if count == 0:
            raise VncError(where, f"the server refused us: {await _read_reason(reader)}")
        offered = await reader.readexactly(count)
        if SECURITY_NONE in offered:
            security = SECURITY_NONE
        elif SECURITY_VNC_AUTH in offered:
            security = SECURITY_VNC_AUTH
        else:
            raise VncError(where, f"no security type we know is offered ({list(offered)})")
        writer.write(bytes((security,)))
    if security == SECURITY_VNC_AUTH:
        if password is None:
            raise VncError(where, "the server wants a password; give one")
        challenge = await reader.readexactly(vnc_auth.CHALLENGE_SIZE)
        writer.write(vnc_auth.auth_response(password, challenge))
    elif security != SECURITY_NONE:
        raise VncError(where, f"unknown security type {security}")
    if security == SECURITY_VNC_AUTH or version == RFB_3_8:
        (result,) = _U32.unpack(await reader.readexactly(4))
        if result != SECURITY_RESULT_OK:
            reason = await _read_reason(reader) if version == RFB_3_8 else "wrong password?"
            raise VncError(where, f"authentication failed: {reason}")
    writer.write(b"\x01")  # ClientInit: shared, leave other viewers connected
    width, height, _, name_length = _SERVER_INIT.unpack(await reader.readexactly(_SERVER_INIT.size))
    await _discard(reader, name_length, where)
    return width, height


def _check_capture_size(width: int, height: int, where: str) -> None:
    if width == 0 or height == 0 or width * height > MAX_CAPTURE_PIXELS:
        raise VncError(where, f"the server's screen is {width}x{height}; cannot capture it")


async def _capture(
    host: str, port: int, password: str | None, where: str
) -> tuple[int, int, bytes]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        width, height = await _client_handshake(reader, writer, password, where)
        _check_capture_size(width, height, where)
        writer.write(_message(MSG_SET_PIXEL_FORMAT, _SET_PIXEL_FORMAT, _CAPTURE_FORMAT.pack()))
        encodings = (ENCODING_RAW, ENCODING_DESKTOP_SIZE)
        writer.write(
            _message(MSG_SET_ENCODINGS, _SET_ENCODINGS, len(encodings))
            + struct.pack(f">{len(encodings)}i", *encodings)
        )
        writer.write(_update_request(width, height))
        canvas = bytearray(width * height * 4)
        while True:
            (kind,) = await reader.readexactly(1)
            if kind == MSG_FRAMEBUFFER_UPDATE:
                (count,) = struct.unpack(">xH", await reader.readexactly(3))
                painted = resized = False
                for _ in range(count):
                    x, y, w, h, encoding = _RECT_HEADER.unpack(
                        await reader.readexactly(_RECT_HEADER.size)
                    )
                    if encoding == ENCODING_RAW:
                        if x + w > width or y + h > height:
                            raise VncError(where, "the server sent a rectangle off the screen")
                        data = await reader.readexactly(w * h * 4)
                        for row in range(h):
                            start = ((y + row) * width + x) * 4
                            canvas[start : start + w * 4] = data[row * w * 4 : (row + 1) * w * 4]
                        painted = True
                    elif encoding == ENCODING_DESKTOP_SIZE:
                        width, height = w, h
                        _check_capture_size(width, height, where)
                        canvas = bytearray(width * height * 4)
                        resized = True
                    else:
                        raise VncError(
                            where, f"the server sent encoding {encoding} we did not ask for"
                        )
                if resized:
                    writer.write(_update_request(width, height))
                elif painted:
                    return width, height, to_rgb(bytes(canvas), 32)
            elif kind == MSG_SET_COLOUR_MAP_ENTRIES:
                _, _, colours = struct.unpack(">xHH", await reader.readexactly(5))
                await reader.readexactly(6 * colours)
            elif kind == MSG_BELL:
                pass
            elif kind == MSG_SERVER_CUT_TEXT:
                (length,) = _CUT_TEXT.unpack(await reader.readexactly(_CUT_TEXT.size))
                await _discard(reader, length, where)
            else:
                raise VncError(where, f"the server sent unknown message type {kind}")
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def capture_png(
    host: str,
    port: int,
    path: str | Path,
    password: str | None = None,
    timeout: float = 10,
) -> tuple[int, int]:
    """Connect to the VNC server at ``host:port``, take one full screen (Raw, 32 bpp),
    write it to ``path`` as PNG and return its ``(width, height)``.

    Every failure (cannot connect, wrong password, not a VNC server, too slow) is a
    :class:`VncError` with a one-line message.
    """
    where = f"vnc {host}:{port}"
    try:
        async with asyncio.timeout(timeout):
            width, height, rgb = await _capture(host, port, password, where)
    except TimeoutError as e:
        raise VncError(where, f"no complete screen within {timeout:g} s") from e
    except asyncio.IncompleteReadError as e:
        raise VncError(where, "the server closed the connection") from e
    except OSError as e:
        raise VncError(where, f"cannot connect: {e.strerror or e}") from e
    write_png(path, width, height, rgb)
    return width, height
