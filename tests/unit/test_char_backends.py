"""Char backends against real files, sockets, ptys and file descriptors."""

from __future__ import annotations

import asyncio
import os
import select
import socket
import subprocess
import sys
import termios
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from iovirt.backends.char import (
    BufferBackend,
    FileBackend,
    PtyBackend,
    UnixSocketBackend,
)
from iovirt.errors import IovirtError, ResourceError


class Inbox:
    """An on_input callback that collects input and lets a test wait for it."""

    def __init__(self) -> None:
        self.data = bytearray()
        self._arrived = asyncio.Event()

    def __call__(self, data: bytes) -> None:
        self.data += data
        self._arrived.set()

    async def wait_for(self, expected: bytes, timeout: float = 5.0) -> bytes:
        async with asyncio.timeout(timeout):
            while len(self.data) < len(expected):
                self._arrived.clear()
                await self._arrived.wait()
        return bytes(self.data)


async def eventually(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.005)


def read_available(fd: int, count: int, timeout: float = 5.0) -> bytes:
    out = b""
    while len(out) < count:
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, f"timed out with {out!r}"
        out += os.read(fd, count - len(out))
    return out


# ---------------------------------------------------------------- FileBackend


async def test_file_backend_writes_reach_the_file_before_close(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    path.write_bytes(b"old contents\n")
    backend = FileBackend(str(path))
    backend.open(asyncio.get_running_loop(), Inbox())
    backend.write(b"boot")
    backend.write(b"ing\r\n")
    # No close yet: the log must be complete even if we were killed now.
    assert path.read_bytes() == b"booting\r\n"
    backend.close()
    backend.write(b"after close")
    assert path.read_bytes() == b"booting\r\n"
    assert backend.dropped == len(b"after close")


async def test_file_backend_append_keeps_existing_contents(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    path.write_bytes(b"first run\n")
    backend = FileBackend(str(path), append=True)
    backend.open(asyncio.get_running_loop(), Inbox())
    backend.write(b"second run\n")
    backend.close()
    assert path.read_bytes() == b"first run\nsecond run\n"


async def test_file_backend_unwritable_path_is_one_line_resource_error(tmp_path: Path) -> None:
    path = tmp_path / "no-such-dir" / "console.log"
    backend = FileBackend(str(path))
    with pytest.raises(ResourceError) as info:
        backend.open(asyncio.get_running_loop(), Inbox())
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: cannot open for writing: No such file or directory")
    assert "check the directory exists and is writable" in message
    assert info.value.resource == str(path)


# ---------------------------------------------------------------- UnixSocketBackend


async def test_unix_socket_client_gets_output_and_sends_input(tmp_path: Path) -> None:
    path = str(tmp_path / "serial.sock")
    inbox = Inbox()
    backend = UnixSocketBackend(path)
    backend.open(asyncio.get_running_loop(), inbox)
    try:
        reader, writer = await asyncio.open_unix_connection(path)
        await eventually(lambda: backend.clients_accepted == 1)
        backend.write(b"login: ")
        assert await asyncio.wait_for(reader.readexactly(7), 5) == b"login: "
        writer.write(b"root\r")
        await writer.drain()
        assert await inbox.wait_for(b"root\r") == b"root\r"
        writer.close()
        await writer.wait_closed()
    finally:
        backend.close()
    assert not os.path.exists(path)


async def test_unix_socket_output_without_client_is_dropped_and_counted(tmp_path: Path) -> None:
    backend = UnixSocketBackend(str(tmp_path / "serial.sock"))
    backend.open(asyncio.get_running_loop(), Inbox())
    try:
        backend.write(b"nobody listens")
        assert backend.dropped == len(b"nobody listens")
    finally:
        backend.close()


async def test_unix_socket_newer_client_replaces_older(tmp_path: Path) -> None:
    path = str(tmp_path / "serial.sock")
    inbox = Inbox()
    backend = UnixSocketBackend(path)
    backend.open(asyncio.get_running_loop(), inbox)
    try:
        old_reader, old_writer = await asyncio.open_unix_connection(path)
        await eventually(lambda: backend.clients_accepted == 1)
        new_reader, new_writer = await asyncio.open_unix_connection(path)
        await eventually(lambda: backend.clients_accepted == 2)
        assert await asyncio.wait_for(old_reader.read(), 5) == b""  # old one was closed
        backend.write(b"to the new one")
        assert await asyncio.wait_for(new_reader.readexactly(14), 5) == b"to the new one"
        new_writer.write(b"hi")
        assert await inbox.wait_for(b"hi") == b"hi"
        old_writer.close()
        new_writer.close()
    finally:
        backend.close()


async def test_unix_socket_client_that_does_not_read_never_blocks_writer(tmp_path: Path) -> None:
    path = str(tmp_path / "serial.sock")
    backend = UnixSocketBackend(path)
    backend.open(asyncio.get_running_loop(), Inbox())
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(path)
        await eventually(lambda: backend.clients_accepted == 1)
        chunk = b"x" * 65536
        for _ in range(64):  # far more than any socket buffer holds
            backend.write(chunk)
        assert backend.dropped > 0
    finally:
        client.close()
        backend.close()


async def test_unix_socket_refuses_existing_non_socket(tmp_path: Path) -> None:
    path = tmp_path / "precious.txt"
    path.write_text("keep me")
    backend = UnixSocketBackend(str(path))
    with pytest.raises(ResourceError, match="exists and is not a socket"):
        backend.open(asyncio.get_running_loop(), Inbox())
    assert path.read_text() == "keep me"


async def test_unix_socket_replaces_stale_socket_file(tmp_path: Path) -> None:
    path = str(tmp_path / "serial.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()  # the file stays behind, nobody listens
    backend = UnixSocketBackend(path)
    backend.open(asyncio.get_running_loop(), Inbox())
    try:
        _, writer = await asyncio.open_unix_connection(path)
        await eventually(lambda: backend.clients_accepted == 1)
        writer.close()
    finally:
        backend.close()
    assert not os.path.exists(path)


async def test_unix_socket_refuses_a_live_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "serial.sock")
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(path)
    live.listen(1)
    try:
        with pytest.raises(ResourceError, match="another process is listening"):
            UnixSocketBackend(path).open(asyncio.get_running_loop(), Inbox())
        assert os.path.exists(path)
    finally:
        live.close()


# ---------------------------------------------------------------- PtyBackend


async def test_pty_round_trip_through_the_slave(caplog: pytest.LogCaptureFixture) -> None:
    inbox = Inbox()
    backend = PtyBackend()
    caplog.set_level("INFO", logger="iovirt.backends.char")
    backend.open(asyncio.get_running_loop(), inbox)
    try:
        assert backend.slave_path is not None
        assert backend.slave_path.startswith("/dev/pts/")
        assert f"serial: pty at {backend.slave_path}" in caplog.text
        slave = os.open(backend.slave_path, os.O_RDWR | os.O_NOCTTY)
        try:
            # Raw mode: no CR/LF translation, no echo, in either direction.
            backend.write(b"guest\nout")
            assert read_available(slave, 9) == b"guest\nout"
            os.write(slave, b"typed\n\x03")
            assert await inbox.wait_for(b"typed\n\x03") == b"typed\n\x03"
            assert select.select([slave], [], [], 0.05)[0] == []  # nothing echoed back
        finally:
            os.close(slave)
    finally:
        backend.close()


async def test_pty_output_nobody_reads_is_dropped_not_blocking() -> None:
    backend = PtyBackend()
    backend.open(asyncio.get_running_loop(), Inbox())
    try:
        for _ in range(64):
            backend.write(b"y" * 4096)
        assert backend.dropped > 0
    finally:
        backend.close()
    backend.write(b"closed")
    assert backend.dropped > len(b"closed")


# ---------------------------------------------------------------- StdioBackend


def run_child(
    script: str, *, stdin: int | None = None, input: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        stdin=stdin,
        input=input,
        capture_output=True,
        timeout=30,
        check=False,
    )


def test_stdio_output_only_writes_reach_fd1() -> None:
    child = run_child(
        """
        import asyncio
        from iovirt.backends.char import StdioBackend
        loop = asyncio.new_event_loop()
        backend = StdioBackend(input=False)
        backend.open(loop, lambda data: None)
        assert not backend.reading
        backend.write(b"console line\\r\\n")
        backend.write(bytes(range(256)) * 40)
        backend.close()
        """,
        stdin=subprocess.DEVNULL,
    )
    assert child.returncode == 0, child.stderr.decode()
    assert child.stdout == b"console line\r\n" + bytes(range(256)) * 40


def test_stdio_stuck_stdout_drops_instead_of_blocking() -> None:
    script = """
        import asyncio, sys, time
        from iovirt.backends.char import StdioBackend
        backend = StdioBackend(input=False)
        backend.open(asyncio.new_event_loop(), lambda data: None)
        start = time.monotonic()
        for _ in range(256):
            backend.write(b"z" * 4096)  # 1 MiB into a pipe nobody reads
        sys.stderr.write(f"{backend.dropped} {time.monotonic() - start:.3f}\\n")
        """
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.wait(timeout=30) == 0
        assert proc.stderr is not None and proc.stdout is not None
        dropped, elapsed = proc.stderr.read().splitlines()[-1].split()
        written = len(proc.stdout.read())
    finally:
        proc.kill()
        proc.wait()
    assert int(dropped) > 0
    assert int(dropped) + written == 256 * 4096
    assert float(elapsed) < 10  # one stall timeout, not one per write


ECHO_CHILD = """
    import asyncio, sys
    from iovirt.backends.char import StdioBackend
    loop = asyncio.new_event_loop()
    backend = StdioBackend(on_quit=loop.stop)
    backend.open(loop, backend.write)  # echo input back as output
    sys.stderr.write("reading\\n" if backend.reading else "not reading\\n")
    sys.stderr.flush()
    loop.run_forever()
    backend.close()
    """


def test_stdio_input_escape_sequences_from_a_pipe() -> None:
    child = run_child(ECHO_CHILD, input=b"ab\x01\x01c\x01zd\x01xafter quit")
    assert child.returncode == 0, child.stderr.decode()
    assert child.stderr == b"reading\n"
    # Ctrl-A Ctrl-A sends one Ctrl-A, Ctrl-A z is swallowed, Ctrl-A x quits.
    assert child.stdout == b"ab\x01cd"


def test_stdio_tty_raw_mode_and_restore() -> None:
    master, slave = os.openpty()
    before = termios.tcgetattr(slave)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(ECHO_CHILD)],
            stdin=slave,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stderr is not None and proc.stdout is not None
        assert proc.stderr.readline() == b"reading\n"
        during = termios.tcgetattr(slave)
        os.write(master, b"raw\r\x03\x01x")
        out, _ = proc.communicate(timeout=30)
        after = termios.tcgetattr(slave)
    finally:
        os.close(master)
        os.close(slave)
    assert proc.returncode == 0
    assert out == b"raw\r\x03"  # no ICRNL, Ctrl-C passed to the guest, not a signal
    assert not during[3] & (termios.ICANON | termios.ECHO | termios.ISIG)
    assert after == before


# ---------------------------------------------------------------- BufferBackend


def test_buffer_backend_records_output_and_feeds_input() -> None:
    backend = BufferBackend()
    with pytest.raises(IovirtError):
        backend.feed(b"too early")
    received: list[bytes] = []
    loop = asyncio.new_event_loop()
    try:
        backend.open(loop, received.append)
        backend.write(b"one ")
        backend.write(b"two")
        assert backend.output == bytearray(b"one two")
        assert backend.getvalue() == b"one two"
        backend.feed(b"input")
        assert received == [b"input"]
        assert backend.take() == b"one two"
        assert backend.getvalue() == b""
        backend.close()
        assert backend.closed
    finally:
        loop.close()
