"""The VNC server against a real client (vncdotool's ``vncdo``) and against raw sockets.

The server serves a simulated display on loopback (an ephemeral port) on the test's
event loop; ``vncdo`` runs as a subprocess because vncdotool's Twisted reactor cannot be
restarted inside one process. Captures are compared pixel by pixel with what the
simulated guest drew. The raw-socket client below speaks exactly the bytes a test
chooses: it checks protocol details vncdo cannot show (Zlib, incremental updates, pixel
formats, old protocol versions) and plays the hostile client.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import struct
import sys
import threading
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from iovirt.backends import vnc
from iovirt.backends.keysym import (
    KEY_1,
    KEY_A,
    KEY_COMMA,
    KEY_E,
    KEY_ENTER,
    KEY_H,
    KEY_L,
    KEY_LEFTSHIFT,
    KEY_O,
    KEY_SEMICOLON,
    KEY_SPACE,
    KEY_X,
)
from iovirt.backends.vnc import (
    PixelFormat,
    VncAddressError,
    VncError,
    VncServer,
    capture_png,
    convert_pixels,
    display_png,
    parse_vnc_address,
)
from iovirt.backends.vnc_auth import auth_response
from iovirt.display import DisplayMode
from iovirt.input import BUTTON_LEFT, BUTTON_RIGHT
from iovirt.png import decode_png
from iovirt.testing.display import SimulatedDisplay, decode_pixel, encode_pixel

VNCDO = str(Path(sys.executable).parent / "vncdo")
WIDTH, HEIGHT = 160, 120
TIMEOUT = 10.0


class RecordingSink:
    """An InputSink that records events and can act on a key press (to play the guest at
    a precise point of a vncdo command list)."""

    def __init__(self, on_key: Callable[[int], None] | None = None) -> None:
        self.keys: list[tuple[int, bool]] = []
        self.pointer: list[tuple[int, int, int, int, int]] = []
        self.on_key = on_key

    def key_event(self, keycode: int, down: bool) -> None:
        self.keys.append((keycode, down))
        if down and self.on_key is not None:
            self.on_key(keycode)

    def pointer_event(self, x: int, y: int, buttons: int, width: int, height: int) -> None:
        self.pointer.append((x, y, buttons, width, height))


@dataclass
class Served:
    server: VncServer
    display: SimulatedDisplay
    sink: RecordingSink


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    display = SimulatedDisplay(WIDTH, HEIGHT, 32)
    display.draw_pattern()
    sink = RecordingSink()
    server = VncServer(display, [sink], port=0)
    await server.start()
    try:
        yield Served(server, display, sink)
    finally:
        await server.close()


async def vncdo(
    server: VncServer, *commands: str, password: str | None = None, options: tuple[str, ...] = ()
) -> tuple[int, str]:
    """Run vncdo against ``server``; its exit status and stderr."""
    host, port = server.address
    args = [VNCDO, "-s", f"{host}::{port}", "-t", "20", *options]
    if password is not None:
        args += ["-p", password]
    proc = await asyncio.create_subprocess_exec(
        *args,
        *commands,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, err.decode(errors="replace")


def png_rgb(path: Path) -> tuple[tuple[int, int], bytes]:
    with Image.open(path) as im:
        return im.size, im.convert("RGB").tobytes()


def crop_rgb(rgb: bytes, width: int, x: int, y: int, w: int, h: int) -> bytes:
    return b"".join(
        rgb[((y + r) * width + x) * 3 : ((y + r) * width + x + w) * 3] for r in range(h)
    )


# --------------------------------------------------------------------------------------
# A raw RFB client
# --------------------------------------------------------------------------------------


@dataclass
class Rect:
    x: int
    y: int
    width: int
    height: int
    encoding: int
    data: bytes


class RawClient:
    """A bare RFB client: the handshake, then whatever messages a test sends."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.width = 0
        self.height = 0
        self.bytes_per_pixel = 4
        self.inflater = zlib.decompressobj()

    @classmethod
    async def open(cls, server: VncServer) -> RawClient:
        reader, writer = await asyncio.open_connection(*server.address)
        return cls(reader, writer)

    @classmethod
    async def connect(
        cls, server: VncServer, version: bytes = b"RFB 003.008\n", password: str | None = None
    ) -> RawClient:
        """A client past ServerInit."""
        client = await cls.open(server)
        await client.handshake(version, password)
        return client

    async def read(self, n: int) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(n), TIMEOUT)

    async def handshake(self, version: bytes, password: str | None) -> None:
        assert await self.read(12) == b"RFB 003.008\n"
        self.writer.write(version)
        minor = int(version[8:11])
        if minor < 7:
            (security,) = struct.unpack(">I", await self.read(4))
        else:
            count = (await self.read(1))[0]
            types = await self.read(count)
            assert len(types) == 1
            security = types[0]
            self.writer.write(bytes((security,)))
        assert security == (1 if password is None else 2)
        if password is not None:
            self.writer.write(auth_response(password, await self.read(16)))
        if password is not None or minor >= 8:
            assert await self.read(4) == b"\0\0\0\0"
        self.writer.write(b"\x01")
        self.width, self.height, fmt, name_length = struct.unpack(">HH16sI", await self.read(24))
        assert PixelFormat.unpack(fmt) == vnc.SERVER_PIXEL_FORMAT
        self.name = await self.read(name_length)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def set_encodings(self, *encodings: int) -> None:
        self.send(struct.pack(f">BxH{len(encodings)}i", 2, len(encodings), *encodings))

    def set_pixel_format(self, fmt: PixelFormat) -> None:
        self.send(b"\0\0\0\0" + fmt.pack())
        self.bytes_per_pixel = fmt.bits_per_pixel // 8

    def request(
        self, incremental: bool, x: int = 0, y: int = 0, w: int | None = None, h: int | None = None
    ) -> None:
        w = self.width - x if w is None else w
        h = self.height - y if h is None else h
        self.send(struct.pack(">BBHHHH", 3, incremental, x, y, w, h))

    async def read_update(self) -> list[Rect]:
        assert (await self.read(1)) == b"\0", "expected a FramebufferUpdate"
        (count,) = struct.unpack(">xH", await self.read(3))
        rects = []
        for _ in range(count):
            x, y, w, h, encoding = struct.unpack(">HHHHi", await self.read(12))
            if encoding == vnc.ENCODING_RAW:
                data = await self.read(w * h * self.bytes_per_pixel)
            elif encoding == vnc.ENCODING_ZLIB:
                (length,) = struct.unpack(">I", await self.read(4))
                data = self.inflater.decompress(await self.read(length))
                assert len(data) == w * h * self.bytes_per_pixel
            elif encoding == vnc.ENCODING_DESKTOP_SIZE:
                data = b""
                self.width, self.height = w, h
            else:
                raise AssertionError(f"unexpected encoding {encoding}")
            rects.append(Rect(x, y, w, h, encoding, data))
        return rects

    async def screen(self) -> bytes:
        """A full non-incremental update, as 32 bpp native pixels."""
        self.request(False)
        canvas = bytearray(self.width * self.height * 4)
        for r in await self.read_update():
            for row in range(r.height):
                start = ((r.y + row) * self.width + r.x) * 4
                canvas[start : start + r.width * 4] = r.data[
                    row * r.width * 4 : (row + 1) * r.width * 4
                ]
        return bytes(canvas)

    async def expect_closed(self) -> None:
        """The server hangs up on us (anything still in flight is read and dropped)."""
        async with asyncio.timeout(TIMEOUT):
            while await self.reader.read(65536):
                pass

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):  # a reset while closing is fine
            await self.writer.wait_closed()


def native_pixels(display: SimulatedDisplay) -> bytes:
    """The display as the server's native 32 bpp format (B, G, R, 0) from its colours."""
    return to_native(display.screen_rgb())


def to_native(rgb: bytes) -> bytes:
    out = bytearray(len(rgb) // 3 * 4)
    out[0::4], out[1::4], out[2::4] = rgb[2::3], rgb[1::3], rgb[0::3]
    return bytes(out)


def without_padding(pixels: bytes) -> bytes:
    """32 bpp native pixels with the unused fourth byte cleared."""
    out = bytearray(pixels)
    out[3::4] = bytes(len(pixels) // 4)
    return bytes(out)


# --------------------------------------------------------------------------------------
# vncdo: screen
# --------------------------------------------------------------------------------------


DEPTHS = [32, 24, 16, 15, 8]


async def test_vncdo_capture_shows_the_display_at_every_depth(tmp_path: Path) -> None:
    """One vncdo session; each key press makes the guest switch to the next depth."""
    display = SimulatedDisplay(WIDTH, HEIGHT, DEPTHS[0])
    display.draw_pattern(seed=DEPTHS[0])
    expected = [display.screen_rgb()]

    def guest_switches_depth(code: int) -> None:
        bpp = DEPTHS[len(expected)]
        display.set_mode(WIDTH, HEIGHT, bpp)
        display.draw_pattern(seed=bpp)
        expected.append(display.screen_rgb())

    server = VncServer(display, [RecordingSink(guest_switches_depth)], port=0)
    await server.start()
    commands = ["capture", str(tmp_path / f"{DEPTHS[0]}.png")]
    for bpp in DEPTHS[1:]:
        commands += ["key", "x", "capture", str(tmp_path / f"{bpp}.png")]
    try:
        rc, err = await vncdo(server, *commands)
        assert rc == 0, err
    finally:
        await server.close()
    assert len(expected) == len(DEPTHS)
    for bpp, rgb in zip(DEPTHS, expected, strict=True):
        assert png_rgb(tmp_path / f"{bpp}.png") == ((WIDTH, HEIGHT), rgb), f"{bpp} bpp"
    assert len(set(expected)) == len(DEPTHS)  # every depth really showed a different picture


async def test_mode_change_reaches_vncdo_as_a_new_size(served: Served, tmp_path: Path) -> None:
    def guest_switches_mode(code: int) -> None:
        if code == KEY_X:
            served.display.set_mode(200, 150, 16)
            served.display.draw_pattern(seed=9)

    served.sink.on_key = guest_switches_mode
    before, after = tmp_path / "before.png", tmp_path / "after.png"
    rc, err = await vncdo(served.server, "capture", str(before), "key", "x", "capture", str(after))
    assert rc == 0, err
    assert png_rgb(before)[0] == (WIDTH, HEIGHT)
    size, rgb = png_rgb(after)
    assert size == (200, 150)
    assert rgb == served.display.screen_rgb()


async def test_client_without_desktop_size_keeps_its_size_and_sees_clipped_screen(
    served: Served, tmp_path: Path
) -> None:
    def guest_switches_mode(code: int) -> None:
        if code == KEY_X:
            served.display.set_mode(100, 80, 32)
            served.display.draw_pattern(seed=5)

    served.sink.on_key = guest_switches_mode
    after = tmp_path / "after.png"
    rc, err = await vncdo(
        served.server,
        "key",
        "x",
        "capture",
        str(after),
        options=("--disable-desktop-resizing",),
    )
    assert rc == 0, err
    size, rgb = png_rgb(after)
    assert size == (WIDTH, HEIGHT)  # what ServerInit said
    new_screen = served.display.screen_rgb()
    assert crop_rgb(rgb, WIDTH, 0, 0, 100, 80) == new_screen
    assert crop_rgb(rgb, WIDTH, 100, 0, WIDTH - 100, HEIGHT) == bytes((WIDTH - 100) * HEIGHT * 3)
    assert crop_rgb(rgb, WIDTH, 0, 80, WIDTH, HEIGHT - 80) == bytes(WIDTH * (HEIGHT - 80) * 3)


async def test_dirty_region_reaches_vncdo_in_an_incremental_update(
    served: Served, tmp_path: Path
) -> None:
    def guest_draws(code: int) -> None:
        if code == KEY_X:
            served.display.fill(20, 30, 50, 10, (255, 0, 128))

    served.sink.on_key = guest_draws
    before, after = tmp_path / "before.png", tmp_path / "after.png"
    original = served.display.screen_rgb()
    rc, err = await vncdo(
        served.server,
        "capture",
        str(before),
        "key",
        "x",
        "capture",
        str(after),
        options=("--incremental-refreshes",),
    )
    assert rc == 0, err
    assert png_rgb(before)[1] == original
    _, rgb = png_rgb(after)
    assert rgb == served.display.screen_rgb() != original
    assert crop_rgb(rgb, WIDTH, 20, 30, 1, 1) == bytes((255, 0, 128))


async def test_blank_display_is_a_black_640x480_screen(tmp_path: Path) -> None:
    display = SimulatedDisplay(WIDTH, HEIGHT, 32)
    display.draw_pattern()
    display.disable()
    server = VncServer(display, [], port=0)
    await server.start()
    try:
        rc, err = await vncdo(server, "capture", str(tmp_path / "blank.png"))
        assert rc == 0, err
    finally:
        await server.close()
    assert png_rgb(tmp_path / "blank.png") == ((640, 480), bytes(640 * 480 * 3))


# --------------------------------------------------------------------------------------
# vncdo: input
# --------------------------------------------------------------------------------------


def press(code: int) -> list[tuple[int, bool]]:
    return [(code, True), (code, False)]


def shifted(code: int) -> list[tuple[int, bool]]:
    return [(KEY_LEFTSHIFT, True), (code, True), (code, False), (KEY_LEFTSHIFT, False)]


async def test_typed_text_arrives_as_linux_keys_with_synthesized_shift(served: Served) -> None:
    rc, err = await vncdo(served.server, "type", "Hello, A!:", "key", "enter")
    assert rc == 0, err
    assert served.sink.keys == [
        *shifted(KEY_H),
        *press(KEY_E),
        *press(KEY_L),
        *press(KEY_L),
        *press(KEY_O),
        *press(KEY_COMMA),
        *press(KEY_SPACE),
        *shifted(KEY_A),
        *shifted(KEY_1),
        *shifted(KEY_SEMICOLON),
        *press(KEY_ENTER),
    ]


async def test_shift_held_by_the_client_is_not_pressed_again(served: Served) -> None:
    rc, err = await vncdo(served.server, "key", "shift-A")
    assert rc == 0, err
    assert served.sink.keys == [
        (KEY_LEFTSHIFT, True),
        (KEY_A, True),
        (KEY_A, False),
        (KEY_LEFTSHIFT, False),
    ]


async def test_keys_held_at_disconnect_are_released(served: Served) -> None:
    rc, err = await vncdo(served.server, "keydown", "a")
    assert rc == 0, err
    async with asyncio.timeout(TIMEOUT):
        while served.server.clients:
            await asyncio.sleep(0.01)
    assert served.sink.keys == [(KEY_A, True), (KEY_A, False)]


async def test_pointer_events_carry_position_buttons_and_screen_size(served: Served) -> None:
    rc, err = await vncdo(
        served.server,
        "move", "100", "50",
        "click", "1",
        "mousedown", "3",
        "move", "10", "20",
        "mouseup", "3",
        "move", "500", "400",
    )  # fmt: skip
    assert rc == 0, err
    size = (WIDTH, HEIGHT)
    assert served.sink.pointer == [
        (100, 50, 0, *size),
        (100, 50, BUTTON_LEFT, *size),
        (100, 50, 0, *size),
        (100, 50, BUTTON_RIGHT, *size),
        (10, 20, BUTTON_RIGHT, *size),
        (10, 20, 0, *size),
        (WIDTH - 1, HEIGHT - 1, 0, *size),  # clamped to the screen
    ]


async def test_events_go_to_every_sink_even_when_one_fails(tmp_path: Path) -> None:
    class BrokenSink(RecordingSink):
        def key_event(self, keycode: int, down: bool) -> None:
            raise RuntimeError("device on fire")

    display = SimulatedDisplay(WIDTH, HEIGHT)
    second = RecordingSink()
    server = VncServer(display, [BrokenSink(), second], port=0)
    await server.start()
    try:
        rc, err = await vncdo(server, "key", "a", "capture", str(tmp_path / "s.png"))
        assert rc == 0, err
    finally:
        await server.close()
    assert second.keys == press(KEY_A)


# --------------------------------------------------------------------------------------
# Authentication
# --------------------------------------------------------------------------------------


@pytest.fixture
async def protected() -> AsyncIterator[Served]:
    display = SimulatedDisplay(WIDTH, HEIGHT)
    display.draw_pattern(seed=1)
    sink = RecordingSink()
    server = VncServer(display, [sink], port=0, password="s3cret")
    await server.start()
    try:
        yield Served(server, display, sink)
    finally:
        await server.close()


async def test_vncdo_with_the_right_password_gets_the_screen(
    protected: Served, tmp_path: Path
) -> None:
    shot = tmp_path / "shot.png"
    rc, err = await vncdo(protected.server, "capture", str(shot), password="s3cret")
    assert rc == 0, err
    assert png_rgb(shot)[1] == protected.display.screen_rgb()


async def test_vncdo_with_a_wrong_password_is_refused(protected: Served, tmp_path: Path) -> None:
    shot = tmp_path / "shot.png"
    rc, err = await vncdo(protected.server, "key", "a", "capture", str(shot), password="guess")
    assert rc == 3, err  # vncdo's AUTHENTICATION_FAILED
    assert "authentication failed" in err
    assert not shot.exists()
    assert protected.sink.keys == []


async def test_capture_png_with_password(protected: Served, tmp_path: Path) -> None:
    host, port = protected.server.address
    shot = tmp_path / "ours.png"
    assert await capture_png(host, port, shot, password="s3cret") == (WIDTH, HEIGHT)
    assert decode_png(shot.read_bytes())[2] == protected.display.screen_rgb()
    with pytest.raises(VncError, match="authentication failed"):
        await capture_png(host, port, tmp_path / "no.png", password="wrong")
    with pytest.raises(VncError, match="wants a password"):
        await capture_png(host, port, tmp_path / "no.png")
    assert not (tmp_path / "no.png").exists()


async def test_only_the_first_8_password_characters_count(tmp_path: Path) -> None:
    server = VncServer(SimulatedDisplay(WIDTH, HEIGHT), [], port=0, password="12345678-long")
    await server.start()
    try:
        host, port = server.address
        assert await capture_png(host, port, tmp_path / "a.png", password="12345678") == (
            WIDTH,
            HEIGHT,
        )
    finally:
        await server.close()


# --------------------------------------------------------------------------------------
# capture_png and display_png
# --------------------------------------------------------------------------------------


async def test_capture_png_writes_the_screen(served: Served, tmp_path: Path) -> None:
    host, port = served.server.address
    shot = tmp_path / "ours.png"
    assert await capture_png(host, port, str(shot)) == (WIDTH, HEIGHT)
    assert png_rgb(shot) == ((WIDTH, HEIGHT), served.display.screen_rgb())  # Pillow reads it


async def test_capture_png_errors_are_one_line(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connection refused
        with pytest.raises(VncError, match="cannot connect") as err:
            await capture_png("127.0.0.1", port, tmp_path / "x.png", timeout=5)
    assert "\n" not in str(err.value)

    async def not_vnc(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-OpenSSH\r\n")
        await writer.drain()
        writer.close()

    other = await asyncio.start_server(not_vnc, "127.0.0.1", 0)
    try:
        port = other.sockets[0].getsockname()[1]
        with pytest.raises(VncError, match="not a VNC server"):
            await capture_png("127.0.0.1", port, tmp_path / "x.png", timeout=5)
    finally:
        other.close()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    quiet = await asyncio.start_server(silent, "127.0.0.1", 0)
    try:
        port = quiet.sockets[0].getsockname()[1]
        with pytest.raises(VncError, match=r"within 0\.3 s"):
            await capture_png("127.0.0.1", port, tmp_path / "x.png", timeout=0.3)
    finally:
        quiet.close()


@pytest.mark.parametrize("bpp", [32, 24, 16, 15, 8])
def test_display_png_without_network(bpp: int) -> None:
    display = SimulatedDisplay(64, 48, bpp)
    display.draw_pattern(seed=2)
    assert decode_png(display_png(display)) == (64, 48, display.screen_rgb())


def test_display_png_honours_stride_and_offset() -> None:
    display = SimulatedDisplay(64, 48, 32)
    display.set_mode(30, 20, 24, stride=100, offset=4096 + 7)
    display.draw_pattern(seed=4)
    assert decode_png(display_png(display)) == (30, 20, display.screen_rgb())


def test_display_png_of_a_disabled_display_is_black() -> None:
    display = SimulatedDisplay(64, 48)
    display.disable()
    assert decode_png(display_png(display)) == (640, 480, bytes(640 * 480 * 3))


# --------------------------------------------------------------------------------------
# Protocol details, with the raw client
# --------------------------------------------------------------------------------------


async def test_server_init_announces_size_and_name(served: Served) -> None:
    client = await RawClient.connect(served.server)
    assert (client.width, client.height) == (WIDTH, HEIGHT)
    assert client.name == b"iovirt"
    await client.close()


@pytest.mark.parametrize("version", [b"RFB 003.003\n", b"RFB 003.007\n", b"RFB 003.005\n"])
async def test_older_protocol_versions(served: Served, version: bytes) -> None:
    client = await RawClient.connect(served.server, version)
    assert await client.screen() == without_padding(native_pixels(served.display))
    await client.close()


@pytest.mark.parametrize("version", [b"RFB 003.003\n", b"RFB 003.007\n", b"RFB 003.008\n"])
async def test_vnc_auth_with_older_protocol_versions(protected: Served, version: bytes) -> None:
    client = await RawClient.connect(protected.server, version, password="s3cret")
    assert (client.width, client.height) == (WIDTH, HEIGHT)
    await client.close()


async def test_wrong_password_gets_a_reason_on_3_8(protected: Served) -> None:
    client = await RawClient.open(protected.server)
    assert await client.read(12) == b"RFB 003.008\n"
    client.send(b"RFB 003.008\n")
    assert await client.read(2) == b"\x01\x02"
    client.send(b"\x02")
    await client.read(16)
    client.send(bytes(16))
    assert await client.read(4) == b"\0\0\0\1"
    (length,) = struct.unpack(">I", await client.read(4))
    assert await client.read(length) == b"authentication failed"
    await client.expect_closed()


async def test_choosing_a_security_type_not_offered_is_refused(protected: Served) -> None:
    client = await RawClient.open(protected.server)
    await client.read(12)
    client.send(b"RFB 003.008\n")
    assert await client.read(2) == b"\x01\x02"
    client.send(b"\x01")  # None, although a password is set
    assert await client.read(4) == b"\0\0\0\1"
    await client.expect_closed()


async def test_zlib_updates_share_one_stream(served: Served) -> None:
    client = await RawClient.connect(served.server)
    client.set_encodings(vnc.ENCODING_ZLIB, vnc.ENCODING_RAW)
    first = await client.screen()
    assert first == without_padding(native_pixels(served.display))
    served.display.fill(0, 40, WIDTH, 3, (1, 2, 3))
    client.request(True)
    rects = await client.read_update()
    assert all(r.encoding == vnc.ENCODING_ZLIB for r in rects)
    # Later rectangles only inflate with the stream's history: it is one stream.
    assert [(r.x, r.y, r.width, r.height) for r in rects] == [(0, 40, WIDTH, 3)]
    assert rects[0].data == bytes((3, 2, 1, 0)) * WIDTH * 3
    await client.close()


async def test_incremental_update_sends_only_dirty_rows(served: Served) -> None:
    client = await RawClient.connect(served.server)
    client.request(True)  # a new client's first incremental update is the whole screen
    rects = await client.read_update()
    assert sum(r.height for r in rects) == HEIGHT
    served.display.fill(5, 10, 20, 4, (255, 255, 255))
    served.display.fill(0, 90, 1, 1, (0, 0, 255))
    client.request(True)
    rects = await client.read_update()
    assert [(r.x, r.y, r.width, r.height) for r in rects] == [
        (0, 10, WIDTH, 4),
        (0, 90, WIDTH, 1),
    ]
    expected = native_pixels(served.display)
    for r in rects:
        assert without_padding(r.data) == expected[r.y * WIDTH * 4 : (r.y + r.height) * WIDTH * 4]
    await client.close()


async def test_incremental_request_waits_for_damage(served: Served) -> None:
    client = await RawClient.connect(served.server)
    await client.screen()
    client.request(True)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(client.reader.readexactly(1), 0.2)
    served.display.fill(0, 7, 1, 1, (9, 9, 9))
    rects = await client.read_update()
    assert [(r.y, r.height) for r in rects] == [(7, 1)]
    await client.close()


async def test_damage_fans_out_to_every_client(served: Served) -> None:
    first = await RawClient.connect(served.server)
    second = await RawClient.connect(served.server)
    await first.screen()
    await second.screen()
    served.display.fill(0, 33, 4, 2, (200, 100, 50))
    first.request(True)
    assert [(r.y, r.height) for r in await first.read_update()] == [(33, 2)]
    # The first client's poll consumed dirty_rows(); the second must still get the rows.
    second.request(True)
    assert [(r.y, r.height) for r in await second.read_update()] == [(33, 2)]
    await first.close()
    await second.close()


async def test_partial_non_incremental_request(served: Served) -> None:
    client = await RawClient.connect(served.server)
    client.request(False, 10, 20, 30, 5)
    (rect,) = await client.read_update()
    assert (rect.x, rect.y, rect.width, rect.height) == (10, 20, 30, 5)
    full = native_pixels(served.display)
    expected = b"".join(
        full[((20 + r) * WIDTH + 10) * 4 : ((20 + r) * WIDTH + 40) * 4] for r in range(5)
    )
    assert without_padding(rect.data) == expected
    await client.close()


async def test_desktop_size_is_the_last_rectangle_then_a_full_update(served: Served) -> None:
    client = await RawClient.connect(served.server)
    client.set_encodings(vnc.ENCODING_RAW, vnc.ENCODING_DESKTOP_SIZE)
    await client.screen()
    served.display.set_mode(96, 64, 32)
    served.display.draw_pattern(seed=7)
    client.request(True)
    rects = await client.read_update()
    assert [(r.encoding, r.width, r.height) for r in rects] == [(vnc.ENCODING_DESKTOP_SIZE, 96, 64)]
    # A request still sized for the old screen gets the whole new one.
    client.request(False, 0, 0, WIDTH, HEIGHT)
    assert await client.screen() == without_padding(native_pixels(served.display))
    await client.close()


def reference_convert(display_bpp: int, source: bytes, fmt: PixelFormat) -> bytes:
    """Per-pixel conversion, written the slow and obvious way."""
    size = (display_bpp + 7) // 8
    out = bytearray()
    for i in range(0, len(source), size):
        r, g, b = decode_pixel(display_bpp, source[i : i + size])
        value = (
            ((r * fmt.red_max + 127) // 255) << fmt.red_shift
            | ((g * fmt.green_max + 127) // 255) << fmt.green_shift
            | ((b * fmt.blue_max + 127) // 255) << fmt.blue_shift
        )
        value &= (1 << fmt.bits_per_pixel) - 1
        out += value.to_bytes(fmt.bits_per_pixel // 8, "big" if fmt.big_endian else "little")
    return bytes(out)


CLIENT_FORMATS = [
    PixelFormat(32, 24, False, True, 255, 255, 255, 0, 8, 16),  # RGBX
    PixelFormat(32, 24, True, True, 255, 255, 255, 16, 8, 0),  # big-endian xRGB
    PixelFormat(32, 24, True, True, 255, 255, 255, 0, 8, 16),
    PixelFormat(16, 16, False, True, 31, 63, 31, 11, 5, 0),  # RGB565
    PixelFormat(16, 16, True, True, 31, 63, 31, 11, 5, 0),
    PixelFormat(16, 15, False, True, 31, 31, 31, 10, 5, 0),  # RGB555
    PixelFormat(8, 8, False, True, 7, 7, 3, 0, 3, 6),  # BGR233
    PixelFormat(8, 6, False, True, 3, 3, 3, 4, 2, 0),
    PixelFormat(32, 30, False, True, 1023, 1023, 1023, 20, 10, 0),  # 10 bits a channel
]


@pytest.mark.parametrize(
    "fmt", CLIENT_FORMATS, ids=lambda f: f"{f.bits_per_pixel}-{f.red_shift}-{f.big_endian}"
)
@pytest.mark.parametrize("display_bpp", [32, 24, 16, 15, 8])
def test_convert_pixels_matches_per_pixel_reference(display_bpp: int, fmt: PixelFormat) -> None:
    source = bytes((i * 37 + (i >> 3) * 11) & 0xFF for i in range(300 * ((display_bpp + 7) // 8)))
    assert convert_pixels(source, display_bpp, fmt) == reference_convert(display_bpp, source, fmt)


@pytest.mark.parametrize(
    "fmt", CLIENT_FORMATS[:7], ids=lambda f: f"{f.bits_per_pixel}-{f.red_shift}"
)
async def test_client_pixel_format_is_honoured(served: Served, fmt: PixelFormat) -> None:
    client = await RawClient.connect(served.server)
    client.set_pixel_format(fmt)
    client.request(False)
    rects = await client.read_update()
    source = served.display.vram_buffer[: WIDTH * HEIGHT * 4]
    assert b"".join(r.data for r in rects) == reference_convert(32, bytes(source), fmt)
    await client.close()


async def test_colour_map_format_keeps_true_colour(served: Served) -> None:
    client = await RawClient.connect(served.server)
    client.send(b"\0\0\0\0" + PixelFormat(8, 8, False, False, 0, 0, 0, 0, 0, 0).pack())
    assert await client.screen() == without_padding(native_pixels(served.display))
    await client.close()


async def test_client_cut_text_is_read_and_ignored(served: Served) -> None:
    client = await RawClient.connect(served.server)
    text = b"x" * 200_000
    client.send(struct.pack(">B3xI", 6, len(text)) + text)
    assert await client.screen() == without_padding(native_pixels(served.display))
    await client.close()


# --------------------------------------------------------------------------------------
# Hostile clients
# --------------------------------------------------------------------------------------


HOSTILE = {
    "garbage greeting": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "huge SetEncodings": struct.pack(">BxH", 2, 0xFFFF) + b"\0" * 64,
    "huge ClientCutText": struct.pack(">B3xI", 6, 0xFFFF_FFFF) + b"x" * 100,
    "unknown message": b"\x99" + b"\0" * 32,
    "24 bpp pixel format": b"\0\0\0\0"
    + PixelFormat(24, 24, False, True, 255, 255, 255, 16, 8, 0).pack(),
    "zero colour maximum": b"\0\0\0\0"
    + PixelFormat(32, 24, False, True, 0, 255, 255, 16, 8, 0).pack(),
}


@pytest.mark.parametrize("attack", HOSTILE, ids=list(HOSTILE))
async def test_hostile_client_is_disconnected_others_keep_being_served(
    served: Served, attack: str
) -> None:
    bystander = await RawClient.connect(served.server)
    await bystander.screen()
    if attack == "garbage greeting":
        hostile = await RawClient.open(served.server)
        await hostile.read(12)
    else:
        hostile = await RawClient.connect(served.server)
    hostile.send(HOSTILE[attack])
    await hostile.expect_closed()
    # The server and the other client go on.
    served.display.fill(1, 2, 3, 4, (10, 20, 30))
    bystander.request(True)
    assert [(r.y, r.height) for r in await bystander.read_update()] == [(2, 4)]
    latecomer = await RawClient.connect(served.server)
    assert await latecomer.screen() == without_padding(native_pixels(served.display))
    await bystander.close()
    await latecomer.close()


@pytest.mark.parametrize(
    "data",
    [
        b"RFB 003.0",  # truncated ProtocolVersion
        b"RFB 003.008\n",  # stops before choosing security
        b"RFB 003.008\n\x01\x01" + struct.pack(">BxH", 2, 10) + b"\0\0\0",  # truncated body
        b"RFB 003.008\n\x01\x01\x03\x01\x00",  # truncated FramebufferUpdateRequest
    ],
)
async def test_truncated_messages_then_hangup(served: Served, data: bytes) -> None:
    hostile = await RawClient.open(served.server)
    await hostile.read(12)
    hostile.send(data)
    await hostile.writer.drain()
    hostile.writer.close()
    async with asyncio.timeout(TIMEOUT):
        while served.server.clients:
            await asyncio.sleep(0.01)
    client = await RawClient.connect(served.server)
    assert await client.screen() == without_padding(native_pixels(served.display))
    await client.close()


async def test_silent_client_is_dropped_after_the_handshake_timeout(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vnc, "HANDSHAKE_TIMEOUT_S", 0.2)
    silent = await RawClient.open(served.server)
    await silent.expect_closed()


async def test_client_that_stops_reading_does_not_stall_the_others() -> None:
    display = SimulatedDisplay(640, 480)
    display.draw_pattern()
    server = VncServer(display, [], port=0)
    await server.start()
    try:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(server.address)
        sock.setblocking(False)
        stuck = RawClient(*await asyncio.open_connection(sock=sock))
        await stuck.handshake(b"RFB 003.008\n", None)
        # Keep asking for screens and never read them: far more than socket buffers hold.
        for _ in range(40):
            stuck.request(False)
            await asyncio.sleep(0.005)
        await stuck.writer.drain()

        def backlog() -> int:  # what the server holds, unsent, for its clients
            return max(c.writer.transport.get_write_buffer_size() for c in server._clients)

        async with asyncio.timeout(TIMEOUT):
            while backlog() == 0:
                await asyncio.sleep(0.01)
        other = await RawClient.connect(server)
        for seed in range(3):
            display.fill(0, seed, 640, 1, (seed, 0, 0))
            assert await other.screen() == without_padding(native_pixels(display))
        assert backlog() > 0  # the stuck client is still stuck
        await other.close()
        stuck.writer.transport.abort()
    finally:
        await server.close()


async def test_display_failure_costs_the_client_not_the_server(served: Served) -> None:
    real_dirty_rows = served.display.dirty_rows
    failures: list[int] = []

    def failing_once() -> list[tuple[int, int]]:
        if not failures:
            failures.append(1)
            raise RuntimeError("display model bug")
        return real_dirty_rows()

    victim = await RawClient.connect(served.server)
    served.display.dirty_rows = failing_once  # type: ignore[method-assign]
    victim.request(True)
    await victim.expect_closed()
    assert served.server.unexpected_errors == 1
    client = await RawClient.connect(served.server)
    assert await client.screen() == without_padding(native_pixels(served.display))
    await client.close()


async def test_clients_beyond_the_limit_are_turned_away(served: Served) -> None:
    clients = [await RawClient.connect(served.server) for _ in range(vnc.MAX_CLIENTS)]
    extra = await RawClient.open(served.server)
    await extra.expect_closed()
    await clients[0].close()
    async with asyncio.timeout(TIMEOUT):
        while served.server.clients == vnc.MAX_CLIENTS:
            await asyncio.sleep(0.01)
    late = await RawClient.connect(served.server)  # a slot is free again
    for c in [*clients[1:], late]:
        await c.close()


async def test_close_disconnects_clients(served: Served) -> None:
    client = await RawClient.connect(served.server)
    await served.server.close()
    await client.expect_closed()
    assert served.server.clients == 0


# --------------------------------------------------------------------------------------
# Starting, addresses, the uvloop loop the VMM runs
# --------------------------------------------------------------------------------------


async def test_address_in_use_is_one_clear_error(served: Served) -> None:
    host, port = served.server.address
    other = VncServer(served.display, [], host=host, port=port)
    with pytest.raises(VncError, match="already in use") as err:
        await other.start()
    assert f"{host}:{port}" in str(err.value)
    assert "\n" not in str(err.value)
    assert err.value.__cause__ is not None
    assert getattr(err.value.__cause__, "errno", None) == errno.EADDRINUSE


async def test_address_not_on_this_host_is_one_clear_error() -> None:
    server = VncServer(SimulatedDisplay(WIDTH, HEIGHT), [], host="192.0.2.1", port=0)
    with pytest.raises(VncError, match="no local interface"):
        await server.start()


async def test_default_address_is_loopback() -> None:
    server = VncServer(SimulatedDisplay(WIDTH, HEIGHT), [], port=0)
    await server.start()
    try:
        assert server.address[0] == "127.0.0.1"
    finally:
        await server.close()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:5901", ("127.0.0.1", 5901)),
        (":1", ("127.0.0.1", 5901)),
        (":0", ("127.0.0.1", 5900)),
        ("0.0.0.0:5900", ("0.0.0.0", 5900)),
        ("localhost::5905", ("localhost", 5905)),
        ("[::1]:5902", ("::1", 5902)),
        (" 10.0.0.2:0 ", ("10.0.0.2", 0)),
    ],
)
def test_parse_vnc_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_vnc_address(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "127.0.0.1", "127.0.0.1:", "host:port", ":x", "::1:5900", "a:70000", ":65000", "[::1]"],
)
def test_parse_vnc_address_rejects(text: str) -> None:
    with pytest.raises(VncAddressError) as err:
        parse_vnc_address(text)
    assert isinstance(err.value, ValueError)
    assert "\n" not in str(err.value)


def test_server_runs_on_uvloop_in_a_thread(tmp_path: Path) -> None:
    """The VMM runs the server on its uvloop host I/O loop in another thread."""
    import subprocess

    import uvloop

    loop = uvloop.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    display = SimulatedDisplay(WIDTH, HEIGHT, 16)
    display.draw_pattern(seed=8)
    sink = RecordingSink()
    server = VncServer(display, [sink], port=0)
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(TIMEOUT)
        host, port = server.address
        shot = tmp_path / "shot.png"
        done = subprocess.run(
            [VNCDO, "-s", f"{host}::{port}", "-t", "20", "key", "a", "capture", str(shot)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        assert png_rgb(shot) == ((WIDTH, HEIGHT), display.screen_rgb())
        assert sink.keys == press(KEY_A)
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(TIMEOUT)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(TIMEOUT)
        loop.close()


def test_mode_outside_video_memory_is_shown_blank() -> None:
    """A display model bug (a mode past the end of video memory) must not make the server
    read out of bounds."""

    class LyingDisplay(SimulatedDisplay):
        def mode(self) -> DisplayMode | None:
            return DisplayMode(4096, 4096, 32, 4096 * 4)

    assert decode_png(display_png(LyingDisplay(64, 48))) == (640, 480, bytes(640 * 480 * 3))


@pytest.mark.parametrize("bpp", DEPTHS)
def test_simulator_screen_rgb_agrees_with_rgb_at(bpp: int) -> None:
    display = SimulatedDisplay(64, 48)
    display.set_mode(20, 10, bpp, stride=70, offset=33)
    display.draw_pattern(seed=bpp)
    assert display.screen_rgb() == b"".join(
        bytes(display.rgb_at(x, y)) for y in range(10) for x in range(20)
    )


def test_encode_pixel_round_trips_full_scale() -> None:
    for bpp in (32, 24, 16, 15):
        assert decode_pixel(bpp, encode_pixel(bpp, 255, 255, 255)) == (255, 255, 255)
        assert decode_pixel(bpp, encode_pixel(bpp, 0, 0, 0)) == (0, 0, 0)
