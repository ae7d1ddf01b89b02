"""Char backends: where a serial port's bytes go on the host, and where its input comes from.

A char device model (the 16550A UART, a virtio console) writes guest output with
:meth:`CharBackend.write` from vCPU threads and receives host input through the ``on_input``
callback given to :meth:`CharBackend.open`, which runs on the asyncio loop's thread. Input is
watched with ``loop.add_reader``; no backend starts a thread.

``write`` never blocks without bound: the guest must not stall because nobody reads its
console. Where the host side cannot take the bytes right now (a full socket or pty buffer, no
client connected), they are dropped and counted in the backend's ``dropped`` attribute, the way
a real serial line loses characters when nobody listens.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import select
import socket
import stat
import termios
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from iovirt.errors import IovirtError, ResourceError

log = logging.getLogger(__name__)

STDIN_FD = 0
STDOUT_FD = 1

# The QEMU escape key: Ctrl-A, then 'x' quits and Ctrl-A sends one Ctrl-A.
ESCAPE_CHAR = 0x01
ESCAPE_QUIT = ord("x")

# Read size for host input; a console never needs more per wakeup.
_READ_SIZE = 4096

# A writer that polls before each write of at most PIPE_BUF bytes (POSIX's minimum) cannot
# block in the write itself on a pipe, whatever the fd's blocking mode.
_WRITE_CHUNK = 512

# How long StdioBackend waits for a stuck stdout before dropping output. After one timeout it
# stops waiting until stdout takes bytes again, so a stopped reader costs the guest one
# pause, not one per character.
_STDOUT_STALL_TIMEOUT_S = 1.0


class CharBackend(Protocol):
    """The host side of a character device."""

    def open(self, loop: asyncio.AbstractEventLoop, on_input: Callable[[bytes], object]) -> None:
        """Start delivering host input to on_input (called on the loop's thread)."""
        ...

    def write(self, data: bytes) -> None:
        """Guest output; called from vCPU threads. Thread-safe, never blocks without bound."""
        ...

    def close(self) -> None:
        """Stop, restore anything changed (terminal modes), remove what was created."""
        ...


def _raw_attrs(attrs: list[Any], *, output_processing: bool, signals: bool) -> list[Any]:
    """Terminal attributes for a raw byte stream (cfmakeraw), from ``attrs``.

    ``output_processing`` keeps OPOST so the host's own messages (log lines on stderr, which
    shares the terminal) still get their carriage returns. ``signals`` keeps ISIG so Ctrl-C
    still reaches the host process when there is no escape key to quit with.
    """
    iflag, oflag, cflag, lflag, ispeed, ospeed, cc = attrs
    iflag &= ~(
        termios.IGNBRK
        | termios.BRKINT
        | termios.PARMRK
        | termios.ISTRIP
        | termios.INLCR
        | termios.IGNCR
        | termios.ICRNL
        | termios.IXON
    )
    if not output_processing:
        oflag &= ~termios.OPOST
    lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.IEXTEN)
    if not signals:
        lflag &= ~termios.ISIG
    cflag &= ~(termios.CSIZE | termios.PARENB)
    cflag |= termios.CS8
    cc = list(cc)
    cc[termios.VMIN] = 1
    cc[termios.VTIME] = 0
    return [iflag, oflag, cflag, lflag, ispeed, ospeed, cc]


def _fd_readable(fd: int) -> bool:
    """Whether ``fd`` is open for reading."""
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError:
        return False
    return (flags & os.O_ACCMODE) in (os.O_RDONLY, os.O_RDWR)


def _wait_writable(fd: int, timeout_s: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    events = poller.poll(max(timeout_s, 0.0) * 1000)
    # POLLERR/POLLHUP also end the wait: the write that follows reports the error.
    return bool(events)


def _remove_reader(loop: asyncio.AbstractEventLoop | None, fd: int) -> None:
    # Closing a backend after its loop has closed is normal at shutdown; there is nothing
    # left to unregister from then.
    if loop is not None and not loop.is_closed() and fd >= 0:
        loop.remove_reader(fd)


class StdioBackend:
    """The VMM's own terminal: output to fd 1, input from fd 0.

    When stdin is a terminal it is put in raw mode on :meth:`open` and restored on
    :meth:`close`. Given ``on_quit``, the QEMU escape works: Ctrl-A x calls ``on_quit``,
    Ctrl-A Ctrl-A sends one Ctrl-A, Ctrl-A followed by anything else is swallowed (as in
    QEMU); Ctrl-C then goes to the guest. Without ``on_quit`` input passes through untouched
    and Ctrl-C still signals the host process, so there is always a way out.

    With ``input=False``, or when stdin is closed, write-only or cannot be watched (a regular
    file), the backend is output-only.
    """

    def __init__(self, input: bool = True, on_quit: Callable[[], None] | None = None) -> None:
        self._want_input = input
        self._on_quit = on_quit
        self._lock = threading.Lock()  # serializes writers so chunks do not interleave
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_input: Callable[[bytes], object] | None = None
        self._saved_tty: list[Any] | None = None
        self._escape_pending = False
        self._stalled = False
        self.reading = False
        self.dropped = 0  # output bytes stdout did not take

    def open(self, loop: asyncio.AbstractEventLoop, on_input: Callable[[bytes], object]) -> None:
        self._loop = loop
        self._on_input = on_input
        if not self._want_input or not _fd_readable(STDIN_FD):
            return
        try:
            if os.isatty(STDIN_FD):
                self._saved_tty = termios.tcgetattr(STDIN_FD)
                raw = _raw_attrs(
                    self._saved_tty, output_processing=True, signals=self._on_quit is None
                )
                termios.tcsetattr(STDIN_FD, termios.TCSANOW, raw)
            loop.add_reader(STDIN_FD, self._on_readable)
        except OSError as err:
            # epoll refuses regular files (stdin redirected from one); stay output-only.
            self._restore_tty()
            log.info("serial: cannot watch stdin (%s); console is output-only", err)
            return
        except BaseException:
            self._restore_tty()
            raise
        self.reading = True

    def write(self, data: bytes) -> None:
        with self._lock:
            view = memoryview(data)
            wait = 0.0 if self._stalled else _STDOUT_STALL_TIMEOUT_S
            deadline = time.monotonic() + wait
            while view:
                remaining = deadline - time.monotonic()
                if not _wait_writable(STDOUT_FD, remaining):
                    self._drop(len(view), "stdout is not taking output")
                    self._stalled = True
                    return
                try:
                    n = os.write(STDOUT_FD, view[:_WRITE_CHUNK])
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        self._drop(len(view), "stdout is not taking output")
                        self._stalled = True
                        return
                    continue
                except OSError as err:
                    self._drop(len(view), f"stdout write failed: {err.strerror}")
                    return
                view = view[n:]
                self._stalled = False

    def close(self) -> None:
        if self.reading:
            _remove_reader(self._loop, STDIN_FD)
            self.reading = False
        self._restore_tty()
        self._on_input = None

    def _drop(self, count: int, why: str) -> None:
        if self.dropped == 0:
            log.warning("serial: %s; dropping console output (counted)", why)
        self.dropped += count

    def _restore_tty(self) -> None:
        if self._saved_tty is not None:
            try:
                termios.tcsetattr(STDIN_FD, termios.TCSADRAIN, self._saved_tty)
            except termios.error as err:
                log.warning("serial: could not restore terminal modes: %s", err)
            self._saved_tty = None

    def _on_readable(self) -> None:
        try:
            data = os.read(STDIN_FD, _READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            log.info("serial: stdin read failed (%s); console is output-only now", err)
            data = b""
        if not data:
            _remove_reader(self._loop, STDIN_FD)
            self.reading = False
            return
        if self._on_quit is not None:
            self._filter_escapes(data)
        elif self._on_input is not None:
            self._on_input(data)

    def _filter_escapes(self, data: bytes) -> None:
        out = bytearray()
        for byte in data:
            if self._escape_pending:
                self._escape_pending = False
                if byte == ESCAPE_CHAR:
                    out.append(byte)
                elif byte == ESCAPE_QUIT:
                    # Hand over what came before the escape, then quit; what follows is moot.
                    if out and self._on_input is not None:
                        self._on_input(bytes(out))
                    if self._on_quit is not None:
                        self._on_quit()
                    return
            elif byte == ESCAPE_CHAR:
                self._escape_pending = True
            else:
                out.append(byte)
        if out and self._on_input is not None:
            self._on_input(bytes(out))


class FileBackend:
    """Output-only: guest output appended to a file, e.g. a console log.

    Each write goes straight to the kernel with ``os.write`` (there is no user-space buffer
    to flush), so the file is complete up to the last byte even if the VMM is killed. It is
    not fsync'ed: a host crash may lose the tail, which is not worth a sync per character.
    """

    def __init__(self, path: str, append: bool = False) -> None:
        self.path = path
        self.append = append
        self._lock = threading.Lock()
        self._fd: int | None = None
        self.dropped = 0  # bytes not written (before open, after close, write errors)

    def open(self, loop: asyncio.AbstractEventLoop, on_input: Callable[[bytes], object]) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
        flags |= os.O_APPEND if self.append else os.O_TRUNC
        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError as err:
            raise ResourceError(
                self.path,
                f"cannot open for writing: {err.strerror or err}; "
                "check the directory exists and is writable",
            ) from err
        with self._lock:
            self._fd = fd

    def write(self, data: bytes) -> None:
        with self._lock:
            if self._fd is None:
                self.dropped += len(data)
                return
            view = memoryview(data)
            while view:
                try:
                    view = view[os.write(self._fd, view) :]
                except OSError as err:
                    if self.dropped == 0:
                        log.warning("serial: %s: write failed: %s", self.path, err.strerror)
                    self.dropped += len(view)
                    return

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


class UnixSocketBackend:
    """A listening unix stream socket at ``path``; one client at a time is the console.

    A newer client replaces the current one (the old connection is closed), so reattaching
    never needs the old one to go away first. With no client, or a client that does not keep
    up, output is dropped and counted: the socket is non-blocking and the vCPU never waits.

    An existing socket file at ``path`` is removed only if nobody listens on it (a leftover
    of a dead VMM); a live one, or a path that is not a socket, is refused. :meth:`close`
    removes the socket file, provided it is still the one this backend created.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()  # guards _client against vCPU writers
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_input: Callable[[bytes], object] | None = None
        self._listener: socket.socket | None = None
        self._client: socket.socket | None = None
        self._created: tuple[int, int] | None = None  # (st_dev, st_ino) of our socket file
        self.dropped = 0  # output bytes no client took
        self.clients_accepted = 0

    def open(self, loop: asyncio.AbstractEventLoop, on_input: Callable[[bytes], object]) -> None:
        self._remove_stale_socket()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.path)
        except OSError as err:
            listener.close()
            raise ResourceError(
                self.path,
                f"cannot create socket: {err.strerror or err}; "
                "check the directory exists and is writable",
            ) from err
        # Set before the listener is watched: the loop may run on another thread already.
        self._loop = loop
        self._on_input = on_input
        self._listener = listener
        try:
            st = os.stat(self.path)
            self._created = (st.st_dev, st.st_ino)
            listener.listen(1)
            listener.setblocking(False)
            loop.add_reader(listener.fileno(), self._accept)
        except BaseException as err:
            # Undo the bind: leave no socket file nobody listens on.
            self._listener = None
            listener.close()
            self._unlink_ours()
            if isinstance(err, OSError):
                raise ResourceError(self.path, f"cannot listen: {err.strerror or err}") from err
            raise
        log.info("serial: listening on unix socket %s", self.path)

    def write(self, data: bytes) -> None:
        with self._lock:
            client = self._client
            if client is None:
                self.dropped += len(data)
                return
            try:
                sent = client.send(data, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
            except OSError:
                # EAGAIN: the client is not keeping up. EPIPE/ECONNRESET: it is going away;
                # the loop sees the hangup and drops it.
                sent = 0
            self.dropped += len(data) - sent

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            _remove_reader(self._loop, client.fileno())
            client.close()
        if self._listener is not None:
            _remove_reader(self._loop, self._listener.fileno())
            self._listener.close()
            self._listener = None
        self._unlink_ours()
        self._on_input = None

    def _remove_stale_socket(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        except OSError as err:
            raise ResourceError(self.path, f"cannot inspect: {err.strerror}") from err
        if not stat.S_ISSOCK(st.st_mode):
            raise ResourceError(
                self.path, "exists and is not a socket; remove it or choose another path"
            )
        if self._someone_listens():
            raise ResourceError(
                self.path,
                "another process is listening on this socket; stop it or choose another path",
            )
        try:
            os.unlink(self.path)
        except OSError as err:
            raise ResourceError(self.path, f"cannot remove stale socket: {err.strerror}") from err

    def _someone_listens(self) -> bool:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.setblocking(False)
        try:
            probe.connect(self.path)
        except BlockingIOError:
            return True  # a listener whose backlog is full: alive
        except OSError:
            return False  # ECONNREFUSED: the socket file outlived its process
        finally:
            probe.close()
        return True

    def _unlink_ours(self) -> None:
        if self._created is None:
            return
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._created:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as err:
            log.warning("serial: cannot remove %s: %s", self.path, err.strerror)
        self._created = None

    def _accept(self) -> None:
        if self._listener is None:
            return
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            log.warning("serial: %s: accept failed: %s", self.path, err.strerror)
            return
        conn.setblocking(False)
        with self._lock:
            old, self._client = self._client, conn
        if old is not None:
            log.info("serial: %s: new client replaces the previous one", self.path)
            _remove_reader(self._loop, old.fileno())
            old.close()
        self.clients_accepted += 1
        if self._loop is not None:  # set by open() before the listener is watched
            self._loop.add_reader(conn.fileno(), self._on_client_readable, conn)

    def _on_client_readable(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(_READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""  # ECONNRESET and friends: same as a hangup
        if not data:
            with self._lock:
                if self._client is conn:
                    self._client = None
            _remove_reader(self._loop, conn.fileno())
            conn.close()
            return
        if self._on_input is not None:
            self._on_input(data)


class PtyBackend:
    """A pseudo-terminal: attach with ``screen``/``minicom``/``picocom`` to ``slave_path``.

    The pty is in raw mode. The backend keeps its own slave fd open for its whole life, so
    clients can attach and detach without the master seeing a hangup; the price is that
    output written while nobody reads stays in the pty buffer (a few KiB, shown to the next
    client) and beyond that is dropped and counted.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards the master fd against vCPU writers
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_input: Callable[[bytes], object] | None = None
        self._master: int | None = None
        self._slave: int | None = None
        self.slave_path: str | None = None
        self.dropped = 0  # output bytes the pty buffer had no room for

    def open(self, loop: asyncio.AbstractEventLoop, on_input: Callable[[bytes], object]) -> None:
        try:
            master, slave = os.openpty()
        except OSError as err:
            raise ResourceError(
                "pty",
                f"cannot allocate a pseudo-terminal: {err.strerror}; "
                "check /dev/ptmx and /dev/pts are available",
            ) from err
        try:
            attrs = termios.tcgetattr(slave)
            raw = _raw_attrs(attrs, output_processing=False, signals=False)
            termios.tcsetattr(slave, termios.TCSANOW, raw)
            os.set_blocking(master, False)
            self.slave_path = os.ttyname(slave)
            # Set before the master is watched: the loop may run on another thread already.
            self._loop = loop
            self._on_input = on_input
            with self._lock:
                self._master = master
            self._slave = slave
            loop.add_reader(master, self._on_readable)
        except BaseException:
            with self._lock:
                self._master = None
            self._slave = None
            self.slave_path = None
            os.close(master)
            os.close(slave)
            raise
        log.info("serial: pty at %s", self.slave_path)

    def write(self, data: bytes) -> None:
        with self._lock:
            if self._master is None:
                self.dropped += len(data)
                return
            try:
                written = os.write(self._master, data)
            except OSError:
                written = 0  # EAGAIN: buffer full, nobody reading
            self.dropped += len(data) - written

    def close(self) -> None:
        with self._lock:
            master, self._master = self._master, None
        if master is not None:
            _remove_reader(self._loop, master)
            os.close(master)
        if self._slave is not None:
            os.close(self._slave)
            self._slave = None
        self._on_input = None

    def _on_readable(self) -> None:
        master = self._master
        if master is None:
            return
        try:
            data = os.read(master, _READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            # EIO means every slave fd is closed; ours is held open, so this is unexpected.
            if err.errno != errno.EIO:
                log.warning("serial: pty read failed: %s", err.strerror)
            data = b""
        if not data:
            _remove_reader(self._loop, master)
            log.warning("serial: pty %s hung up; input stopped", self.slave_path)
            return
        if self._on_input is not None:
            self._on_input(data)


class BufferBackend:
    """An in-memory backend: output is recorded in ``output``, input injected with
    :meth:`feed`.

    It is a real backend for tests and fuzzing, not a simulator of anything: it does
    exactly what its methods say. Read ``output`` through :meth:`getvalue` or :meth:`take`
    when vCPU threads may still be writing.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._on_input: Callable[[bytes], object] | None = None
        self.output = bytearray()
        self.opened = False
        self.closed = False

    def open(self, loop: asyncio.AbstractEventLoop, on_input: Callable[[bytes], object]) -> None:
        self._on_input = on_input
        self.opened = True

    def write(self, data: bytes) -> None:
        with self._lock:
            self.output += data

    def close(self) -> None:
        self._on_input = None
        self.closed = True

    def feed(self, data: bytes) -> None:
        """Deliver ``data`` as host input, synchronously, to the ``on_input`` of :meth:`open`."""
        if self._on_input is None:
            raise IovirtError("BufferBackend.feed() needs an open backend")
        self._on_input(data)

    def getvalue(self) -> bytes:
        """All output recorded so far."""
        with self._lock:
            return bytes(self.output)

    def take(self) -> bytes:
        """All output recorded so far, clearing the record."""
        with self._lock:
            data = bytes(self.output)
            self.output.clear()
            return data
