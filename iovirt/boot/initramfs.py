"""Initramfs images built in Python: a cpio "newc" writer, kernel-module resolution and
busybox-based init programs.

Two users: the lab (``iovirt.lab``), whose initramfs mounts the host's root over 9p and
chroots into it, and the nested stock Linux guests our VMM boots, whose initramfs runs one
test script and reports the result on the serial console (:func:`guest_test_initramfs`).

The archive is written uncompressed: the kernel unpacks a plain newc archive, and skipping
compression keeps the builder free of external tools and the output reproducible (every
entry has uid/gid 0 and mtime 0 unless told otherwise).
"""

from __future__ import annotations

import gzip
import lzma
import re
import shlex
import shutil
import stat
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from iovirt.errors import ResourceError, UserError

# newc: a 6-byte magic, then 13 fields of 8 hex digits, 110 bytes in all.
NEWC_MAGIC = b"070701"
NEWC_HEADER_SIZE = 110
NEWC_TRAILER = "TRAILER!!!"
# Header + name, and file data, each start on a 4-byte boundary.
NEWC_ALIGN = 4

MODULES_ROOT = Path("/lib/modules")
BUSYBOX = Path("/bin/busybox")

# Lines the guest-test init prints around the script's output; parse_guest_test_output
# looks for them at the start of a console line.
TEST_BEGIN = "IOVIRT-TEST-BEGIN"
TEST_END = "IOVIRT-TEST-END"
_TEST_END_RE = re.compile(rf"^{TEST_END} rc=(\d+)$")

# Module file suffixes modules.dep may name; compressed ones are inflated at build time
# because busybox insmod in the initramfs only reads plain ELF objects.
_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


def _align(n: int) -> int:
    return (n + NEWC_ALIGN - 1) & ~(NEWC_ALIGN - 1)


def _archive_name(path: str | PurePosixPath) -> str:
    """Normalise ``path`` to the relative form stored in the archive ("/bin/sh" -> "bin/sh").

    Relative names keep GNU cpio from writing outside the extraction directory; the kernel
    unpacks them relative to the rootfs either way.
    """
    parts = [p for p in PurePosixPath(path).parts if p not in ("/", ".")]
    if not parts:
        raise UserError(f"initramfs: {str(path)!r}: not a usable archive path")
    if ".." in parts:
        raise UserError(f"initramfs: {path}: '..' is not allowed in archive paths")
    return "/".join(parts)


@dataclass
class _Entry:
    name: str
    mode: int  # file type bits included
    data: bytes


class Initramfs:
    """An uncompressed cpio newc archive, built up entry by entry.

    Missing parent directories are added (mode 0755) so that the kernel, which does not
    create them while unpacking, finds every parent before its children.
    """

    def __init__(self, mtime: int = 0) -> None:
        self.mtime = mtime
        self._entries: dict[str, _Entry] = {}
        self._modules: list[str] = []  # absolute in-guest paths, in insmod order

    # -- adding entries ----------------------------------------------------------------

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        name = _archive_name(path)
        existing = self._entries.get(name)
        if existing is not None:
            if not stat.S_ISDIR(existing.mode):
                raise UserError(f"initramfs: /{name}: already in the archive as a non-directory")
            # Re-adding a directory (often one made implicitly as a parent) sets its mode.
            existing.mode = stat.S_IFDIR | (mode & 0o7777)
            return
        self._add_parents(name)
        self._entries[name] = _Entry(name, stat.S_IFDIR | (mode & 0o7777), b"")

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._add_new(path, stat.S_IFREG | (mode & 0o7777), bytes(data))

    def add_symlink(self, path: str, target: str) -> None:
        if not target:
            raise UserError(f"initramfs: {path}: empty symlink target")
        self._add_new(path, stat.S_IFLNK | 0o777, target.encode())

    def add_host_file(self, path: str, host_path: str | Path, mode: int | None = None) -> None:
        """Copy a host file into the archive; ``mode`` defaults to the host file's."""
        host = Path(host_path)
        try:
            data = host.read_bytes()
            host_mode = host.stat().st_mode
        except OSError as exc:
            raise ResourceError(
                str(host), f"cannot read for the initramfs: {exc.strerror}"
            ) from exc
        self.add_file(path, data, host_mode & 0o7777 if mode is None else mode)

    def add_modules(
        self, kver: str, names: Iterable[str], modules_root: Path = MODULES_ROOT
    ) -> list[str]:
        """Add ``names`` and their dependencies; return their in-guest paths in load order.

        Modules are stored uncompressed under /lib/modules/<kver>/ at their modules.dep
        path. The order accumulates over calls (see :attr:`module_paths`); a module already
        added is not added again.
        """
        root = modules_root / kver
        added: list[str] = []
        for host_path in module_load_order(kver, names, modules_root):
            rel = host_path.relative_to(root).as_posix()
            for suffix in _MODULE_SUFFIXES[1:]:
                if rel.endswith(suffix):
                    rel = rel[: -len(suffix)] + ".ko"
            guest_path = f"/lib/modules/{kver}/{rel}"
            if guest_path in self._modules:
                continue
            self.add_file(guest_path, read_module(host_path), 0o644)
            self._modules.append(guest_path)
            added.append(guest_path)
        return added

    @property
    def module_paths(self) -> list[str]:
        """In-guest paths of every module added, in the order to insmod them."""
        return list(self._modules)

    def __contains__(self, path: str) -> bool:
        return _archive_name(path) in self._entries

    def _add_new(self, path: str, mode: int, data: bytes) -> None:
        name = _archive_name(path)
        if name in self._entries:
            raise UserError(f"initramfs: /{name}: already in the archive")
        self._add_parents(name)
        self._entries[name] = _Entry(name, mode, data)

    def _add_parents(self, name: str) -> None:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/".join(parts[:i])
            existing = self._entries.get(parent)
            if existing is None:
                self._entries[parent] = _Entry(parent, stat.S_IFDIR | 0o755, b"")
            elif not stat.S_ISDIR(existing.mode):
                raise UserError(f"initramfs: /{parent}: is not a directory, cannot hold /{name}")

    # -- output ------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        out = bytearray()
        # Entries were inserted parents-first (dicts keep insertion order), which is the
        # order the kernel needs; inode numbers only have to be unique per archive.
        for ino, entry in enumerate(self._entries.values(), start=1):
            nlink = 2 if stat.S_ISDIR(entry.mode) else 1
            self._write_entry(out, ino, entry.mode, nlink, entry.name, entry.data)
        self._write_entry(out, 0, 0, 1, NEWC_TRAILER, b"")
        return bytes(out)

    def write(self, path: str | Path) -> None:
        Path(path).write_bytes(self.to_bytes())

    def _write_entry(
        self, out: bytearray, ino: int, mode: int, nlink: int, name: str, data: bytes
    ) -> None:
        name_bytes = name.encode() + b"\0"
        fields = (
            ino,
            mode,
            0,  # uid
            0,  # gid
            nlink,
            self.mtime if name != NEWC_TRAILER else 0,
            len(data),
            0,  # devmajor
            0,  # devminor
            0,  # rdevmajor
            0,  # rdevminor
            len(name_bytes),
            0,  # check: only used by the "070702" crc variant
        )
        start = len(out)
        out += NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)
        out += name_bytes
        out += b"\0" * (_align(len(out) - start) - (len(out) - start))
        out += data
        out += b"\0" * (_align(len(data)) - len(data))


# -- kernel modules ------------------------------------------------------------------------


def module_name(name_or_path: str) -> str:
    """The canonical module name: file suffix dropped, '-' and '_' made equal ('_')."""
    base = PurePosixPath(name_or_path).name
    for suffix in _MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def _read_modules_dep(root: Path) -> dict[str, tuple[str, list[str]]]:
    """Parse modules.dep: canonical name -> (relative path, dependency paths)."""
    dep_file = root / "modules.dep"
    try:
        text = dep_file.read_text()
    except OSError as exc:
        raise ResourceError(str(dep_file), f"cannot read: {exc.strerror}") from exc
    table: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        path, sep, deps = line.partition(":")
        if not sep:
            continue
        table[module_name(path)] = (path.strip(), deps.split())
    return table


def _read_builtin(root: Path) -> set[str]:
    try:
        text = (root / "modules.builtin").read_text()
    except OSError:
        return set()  # optional file: without it nothing counts as built in
    return {module_name(line.strip()) for line in text.splitlines() if line.strip()}


def module_load_order(
    kver: str, names: Iterable[str], modules_root: Path = MODULES_ROOT
) -> list[Path]:
    """Host paths of ``names`` and all their dependencies, dependencies first, each once.

    Names match with '-' and '_' treated alike ("kvm-amd" == "kvm_amd"). A module built
    into the kernel (modules.builtin) has nothing to load and is left out.
    """
    root = modules_root / kver
    table = _read_modules_dep(root)
    builtin: set[str] | None = None
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str, wanted_by: str | None) -> None:
        nonlocal builtin
        if name in order:
            return
        if name not in table:
            if builtin is None:
                builtin = _read_builtin(root)
            if name in builtin:
                return
            why = f" (needed by {wanted_by})" if wanted_by else ""
            raise ResourceError(
                f"kernel module {name}",
                f"not found in {root / 'modules.dep'} nor built in{why}",
            )
        if name in visiting:
            raise ResourceError(f"kernel module {name}", "circular dependency in modules.dep")
        visiting.add(name)
        # modules.dep lists the whole closure with the deepest dependency last, so walking
        # it backwards already loads in order; recursing keeps us right even if it did not.
        for dep in reversed(table[name][1]):
            visit(module_name(dep), name)
        visiting.discard(name)
        order.append(name)

    for raw in names:
        visit(module_name(raw), None)
    return [root / table[name][0] for name in order]


def read_module(path: Path) -> bytes:
    """A module's ELF bytes; .ko.xz and .ko.gz are inflated in Python, .ko.zst with the
    ``zstd`` tool (Python 3.11 has no zstd codec)."""
    try:
        if path.name.endswith(".ko.zst"):
            zstd = shutil.which("zstd")
            if zstd is None:
                raise ResourceError("zstd", f"not installed; needed to unpack {path}")
            done = subprocess.run([zstd, "-dcq", str(path)], capture_output=True, check=False)
            if done.returncode != 0:
                problem = done.stderr.decode(errors="replace").strip()
                raise ResourceError(str(path), f"zstd failed: {problem}")
            return done.stdout
        data = path.read_bytes()
    except OSError as exc:
        raise ResourceError(str(path), f"cannot read kernel module: {exc.strerror}") from exc
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    return data


# -- busybox initramfs ---------------------------------------------------------------------


def busybox_applets(busybox: Path = BUSYBOX) -> list[str]:
    """Install paths ("usr/bin/env", "sbin/insmod", ...) of every applet in ``busybox``."""
    try:
        done = subprocess.run(
            [str(busybox), "--list-full"], capture_output=True, text=True, check=False
        )
    except OSError as exc:
        raise ResourceError(str(busybox), f"cannot run: {exc.strerror}") from exc
    if done.returncode != 0:
        raise ResourceError(str(busybox), f"--list-full failed: {done.stderr.strip()}")
    return [line.strip() for line in done.stdout.splitlines() if line.strip()]


# Runs first in every init: the kernel hands PID 1 an environment without PATH, and
# devtmpfs (not device nodes in the archive) supplies /dev/console and friends.
_INIT_PROLOGUE = """\
#!/bin/busybox sh
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
iovirt_die() {
    echo "iovirt-init: FATAL: $*"
    sync
    reboot -f
    # reboot -f only returns if the reboot syscall failed; exiting PID 1 then panics,
    # and panic=-1 turns that into a reboot the VMM sees as the end of the run.
    exit 1
}
"""


def _insmod_lines(module_paths: Iterable[str]) -> str:
    lines = []
    for path in module_paths:
        quoted = shlex.quote(path)
        lines.append(f"insmod {quoted} || iovirt_die insmod {quoted} failed\n")
    return "".join(lines)


def build_busybox_initramfs(
    kver: str,
    modules: Iterable[str],
    init_script: str,
    extra_files: Mapping[str, bytes] | None = None,
    *,
    busybox: Path = BUSYBOX,
    modules_root: Path = MODULES_ROOT,
) -> bytes:
    """A busybox initramfs whose /init loads ``modules`` (with dependencies) and then runs
    ``init_script`` (shell text, run by busybox sh as part of /init, i.e. as PID 1).

    /init mounts /proc, /sys and devtmpfs on /dev first. A module that fails to load stops
    the boot with an ``iovirt-init: FATAL`` console line and a power-off. ``extra_files``
    maps absolute in-guest paths to contents (written mode 0755 if they start with "#!"
    or are ELF executables, else 0644). What happens when ``init_script`` ends is up to
    it; falling off the end makes PID 1 exit, which panics the kernel (pass ``panic=-1``
    so that reboots).
    """
    image = Initramfs()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "run", "etc"):
        image.add_dir(d)
    image.add_dir("tmp", 0o1777)
    image.add_host_file("bin/busybox", busybox, 0o755)
    for applet in busybox_applets(busybox):
        if applet != "bin/busybox" and applet not in image:
            image.add_symlink(applet, "/bin/busybox")
    image.add_modules(kver, modules, modules_root)
    for path, data in (extra_files or {}).items():
        executable = data.startswith((b"#!", b"\x7fELF"))
        image.add_file(path, data, 0o755 if executable else 0o644)
    init = _INIT_PROLOGUE + _insmod_lines(image.module_paths) + init_script
    if not init.endswith("\n"):
        init += "\n"
    image.add_file("init", init.encode(), 0o755)
    return image.to_bytes()


def guest_test_initramfs(
    kver: str,
    modules: Iterable[str],
    script: str,
    *,
    timeout: int | None = None,
    end: str = "reboot",
    extra_files: Mapping[str, bytes] | None = None,
    busybox: Path = BUSYBOX,
    modules_root: Path = MODULES_ROOT,
) -> bytes:
    """An initramfs that runs ``script`` once and reports it on the serial console.

    The script runs under ``busybox sh -e`` (the first failing command ends it), with
    stdout and stderr on the console, between a line ``IOVIRT-TEST-BEGIN`` and a line
    ``IOVIRT-TEST-END rc=<N>``; then the guest syncs and, as ``end`` says, reboots
    (``reboot -f``, the default: it ends the run in every VMM we drive, QEMU with
    -no-reboot and iovirt) or powers off (``poweroff -f``: through ACPI S5 in both; with
    ``acpi=off`` Linux halts every CPU instead, and iovirt ends the VM then).
    ``extra_files`` go in as with :func:`build_busybox_initramfs` (a benchmark tool, say).
    With ``timeout`` the script is killed after that many seconds (rc 137). Read the
    console back with :func:`parse_guest_test_output`.

    Boot it with ``console=ttyS0 panic=-1`` (and ``quiet`` so that kernel messages do not
    land among the script's lines): if power-off fails or the kernel panics, panic=-1
    reboots at once, and a VMM that treats a reboot as the end of the run (QEMU's
    -no-reboot) cannot hang. Keep a host-side timeout as well for a script that hangs.
    """
    if end not in ("reboot", "poweroff"):
        raise UserError(f"guest test: end must be 'reboot' or 'poweroff', not {end!r}")
    runner = "sh -e /iovirt-test.sh"
    if timeout is not None:
        if timeout <= 0:
            raise UserError(f"guest test: timeout must be positive, got {timeout}")
        runner = f"timeout -s KILL {int(timeout)} {runner}"
    # The newline first: firmware (SeaBIOS's "Booting from ROM..") may leave the console
    # mid-line, and the BEGIN marker must stand on a line of its own.
    init = f"""\
echo
echo {TEST_BEGIN}
{runner} </dev/null 2>&1
rc=$?
echo "{TEST_END} rc=$rc"
sync
{end} -f
exit "$rc"
"""
    return build_busybox_initramfs(
        kver,
        modules,
        init,
        {**(extra_files or {}), "/iovirt-test.sh": script.encode()},
        busybox=busybox,
        modules_root=modules_root,
    )


def parse_guest_test_output(console: str) -> tuple[int | None, str]:
    """The exit status and output of a guest test from its console text.

    Returns ``(rc, output)`` where ``output`` is the text between the BEGIN and END lines
    (line endings normalised to "\\n"). ``rc`` is None when the END line is missing: the
    guest died or hung mid-test (``output`` then holds what came after BEGIN), or never
    got to the test (``output`` is "").
    """
    lines = console.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    try:
        begin = next(i for i, line in enumerate(lines) if line.strip() == TEST_BEGIN)
    except StopIteration:
        return None, ""
    body: list[str] = []
    for line in lines[begin + 1 :]:
        match = _TEST_END_RE.match(line.strip())
        if match:
            return int(match.group(1)), "".join(f"{b}\n" for b in body)
        body.append(line)
    return None, "\n".join(body)
