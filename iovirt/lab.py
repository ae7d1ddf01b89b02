"""The lab: a QEMU TCG virtual machine with a real /dev/kvm, for booting stock Linux guests.

This machine's own /dev/kvm is PVM and cannot boot a stock kernel. QEMU's TCG with
``-cpu max`` offers AMD SVM, on which Debian's kernel loads ``kvm_amd``, so our VMM can
run inside such a VM and boot real guests. The lab shares the host's root file system
read-only over 9p (with a tmpfs overlay on top, so everything is writable and nothing
reaches the host), which puts the project's venv and every Debian binary at the same
paths inside the lab as outside.

One :meth:`Lab.run` is one boot: the command is written into a scratch directory that the
lab mounts over 9p, the lab runs it with ``/dev/kvm`` ready, writes its exit status and
output back into that directory and powers off. A second writable share, ``/out`` inside
the lab, brings back whatever files the command leaves there.

Command line: ``python -m iovirt.lab [--cwd DIR] [--timeout S] [--keep] -- COMMAND...``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import lzma
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from iovirt.boot.initramfs import (
    BUSYBOX,
    MODULES_ROOT,
    build_busybox_initramfs,
    module_load_order,
)
from iovirt.errors import IovirtError, ResourceError, UserError

QEMU = "qemu-system-x86_64"
BOOT_DIR = Path("/boot")

# What the lab initramfs needs to mount the host root: 9p over virtio-pci, and overlayfs
# to make it writable. module_load_order adds the dependencies and puts them in order.
LAB_MODULES = (
    "netfs",
    "fscache",
    "9pnet",
    "9p",
    "virtio_ring",
    "virtio",
    "9pnet_virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "overlay",
)

# Two vCPUs match the host's two cores (MTTCG runs one host thread per vCPU; more would
# only time-slice). 4 GiB leaves room for the tmpfs overlay and a nested guest, and TCG
# only backs guest RAM that is touched, so it costs the 24 GiB host little.
DEFAULT_SMP = 2
DEFAULT_MEMORY_MIB = 4096
DEFAULT_TIMEOUT = 300.0
CONSOLE_TAIL_LINES = 40

# panic=-1: a failed init reboots at once, and -no-reboot turns that into QEMU's exit.
# The rest trims work TCG makes slow (crypto self-tests, the timer check, lockup
# watchdogs that only misfire under emulation): about 1 s less per boot, measured.
LAB_CMDLINE = (
    "console=ttyS0 panic=-1 quiet cryptomgr.notests no_timer_check nowatchdog audit=0 "
    "8250.nr_uarts=1"
)

# Mount points inside the lab (in the chrooted host root).
GUEST_CTL_DIR = "/run/iovirt-lab"  # control share: scripts in, status and output back
GUEST_OUT_DIR = "/out"  # results share, the caller's to use
CTL_TAG = "labctl"
OUT_TAG = "out"
SHARE_TAG_PREFIX = "rw"  # writable shares mounted at their host path: rw0, rw1, ...
HOSTROOT_TAG = "hostroot"

# Environment a lab command starts from (env -i: nothing leaks in from the lab's init).
BASE_ENV: Mapping[str, str] = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
}

# Bump when the init below or the archive layout changes, to retire cached images.
_LAB_INITRD_FORMAT = "1"

# The lab's init, after the busybox prologue has mounted /proc, /sys, /dev and loaded the
# modules. cache=loose on the read-only host root lets the lab keep dentries and
# attributes instead of asking the host again (measured: `python -c pass` 1.7 s instead of
# 2.4 s); the lab cannot change that share, and host changes during a run are not
# expected. The writable shares stay uncached so what the lab writes is on the host at
# once, before the power-off. The host's /tmp is not hidden behind a tmpfs: checkouts,
# venvs and configs live there too (CI clones into a temporary folder), and the overlay
# already makes it writable inside the lab.
_LAB_INIT = f"""\
ip link set lo up 2>/dev/null || ifconfig lo up 2>/dev/null
P9="trans=virtio,version=9p2000.L,msize=512000"
mkdir -p /hostroot /rw /newroot
mount -t 9p -o "ro,$P9,cache=loose" {HOSTROOT_TAG} /hostroot || iovirt_die mount hostroot
mount -t tmpfs -o mode=0755 tmpfs /rw || iovirt_die mount tmpfs for the overlay
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/hostroot,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \\
    || iovirt_die mount overlay
R=/newroot
mount -t proc proc $R/proc || iovirt_die mount proc
mount -t sysfs sysfs $R/sys || iovirt_die mount sysfs
mount -t devtmpfs devtmpfs $R/dev || iovirt_die mount devtmpfs
mkdir -p $R/dev/pts $R/dev/shm $R/dev/hugepages
mount -t devpts -o newinstance,ptmxmode=0666 devpts $R/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
mount -t hugetlbfs hugetlbfs $R/dev/hugepages
mount -t tmpfs -o mode=0755 tmpfs $R/run || iovirt_die mount /run
mkdir -p $R{GUEST_CTL_DIR} $R{GUEST_OUT_DIR}
mount -t 9p -o "$P9" {CTL_TAG} $R{GUEST_CTL_DIR} || iovirt_die mount the control share
mount -t 9p -o "$P9" {OUT_TAG} $R{GUEST_OUT_DIR} || iovirt_die mount the out share
echo "iovirt-lab: ready"
chroot $R /bin/sh {GUEST_CTL_DIR}/run.sh
echo "iovirt-lab: done"
sync
poweroff -f
exit 1
"""


class LabError(IovirtError):
    """The lab did not run the command to completion (boot failure, setup failure, timeout).

    The message's first line says what went wrong; the tail of the lab's serial console
    follows, since that is where the reason usually is.
    """

    def __init__(self, problem: str, console: str = "") -> None:
        self.problem = problem
        self.console = console
        message = f"lab: {problem}"
        tail = console_tail(console)
        if tail:
            message += f"\n--- last lines of the lab console ---\n{tail}"
        super().__init__(message)


class LabTimeoutError(LabError):
    """The lab ran longer than its timeout and was killed."""

    def __init__(self, timeout: float, console: str = "") -> None:
        self.timeout = timeout
        super().__init__(f"timed out after {timeout:g} s (QEMU killed)", console)


@dataclass
class LabResult:
    """What one lab run gave back."""

    returncode: int
    stdout: str
    stderr: str
    console: str  # the lab's serial console: kernel messages and the init's lines
    duration: float  # seconds from starting QEMU to its exit
    # Regular files the command left under /out (relative path -> contents), when the
    # out share was the run's own temporary directory; empty when the caller passed one.
    files: dict[str, bytes] = field(default_factory=dict)
    scratch: Path | None = None  # kept scratch directory (keep_scratch=True), else None


def console_tail(console: str, lines: int = CONSOLE_TAIL_LINES) -> str:
    text = console.replace("\r\n", "\n").replace("\r", "\n").rstrip("\n")
    return "\n".join(text.split("\n")[-lines:]) if text else ""


def _version_key(kver: str) -> list[tuple[int, int | str]]:
    # Natural order: "6.10.0" sorts after "6.9.0".
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.\-+~]", kver)]


def lab_kernels(boot_dir: Path = BOOT_DIR, modules_root: Path = MODULES_ROOT) -> list[str]:
    """Kernel versions with both /boot/vmlinuz-<kver> and a modules.dep, oldest first.

    The running kernel is no guide: the host runs a PVM kernel without modules here.
    """
    found = []
    for image in boot_dir.glob("vmlinuz-*"):
        kver = image.name.removeprefix("vmlinuz-")
        if (modules_root / kver / "modules.dep").is_file():
            found.append(kver)
    return sorted(found, key=_version_key)


def lab_available(kver: str | None = None) -> str | None:
    """None when the lab can run here; otherwise one line saying what is missing."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} not found: install Debian's qemu-system-x86"
    if not BUSYBOX.is_file():
        return f"{BUSYBOX} not found: install Debian's busybox-static"
    if kver is None:
        kernels = lab_kernels()
        if not kernels:
            return (
                f"no kernel in {BOOT_DIR} with modules in {MODULES_ROOT}: install linux-image-amd64"
            )
        kver = kernels[-1]
    kernel = BOOT_DIR / f"vmlinuz-{kver}"
    if not kernel.is_file():
        return f"{kernel} not found: install linux-image-amd64"
    if not os.access(kernel, os.R_OK):
        return f"{kernel} is not readable (Debian installs it 0600): run as root"
    try:
        module_load_order(kver, (*LAB_MODULES, "kvm_amd"))
    except ResourceError as exc:
        return str(exc)
    return None


# bzImage setup header fields (Documentation/arch/x86/boot.rst).
_BZ_SETUP_SECTS = 0x1F1
_BZ_HDR_MAGIC = 0x202  # "HdrS"
_BZ_PAYLOAD_OFFSET = 0x248  # u32, from the start of the protected-mode code
_BZ_PAYLOAD_LENGTH = 0x24C
_ELF64_LE = b"\x7fELF\x02\x01"
_PT_NOTE = 4
_XEN_ELFNOTE_PHYS32_ENTRY = 18  # the PVH entry point QEMU boots an ELF vmlinux through


def extract_vmlinux(bzimage: bytes) -> bytes | None:
    """The uncompressed ELF kernel inside a bzImage, if it can be booted directly.

    QEMU boots an ELF vmlinux that carries a PVH entry note straight at its entry point.
    Under TCG that skips the bzImage decompressor, which spends about 4 s of each lab
    boot inflating the kernel instruction by instruction. Returns None (boot the bzImage
    instead) for an unknown compression or a kernel built without PVH.
    """
    if len(bzimage) < 0x250 or bzimage[_BZ_HDR_MAGIC : _BZ_HDR_MAGIC + 4] != b"HdrS":
        return None
    setup_sects = bzimage[_BZ_SETUP_SECTS] or 4
    pm_start = (setup_sects + 1) * 512
    (offset,) = struct.unpack_from("<I", bzimage, _BZ_PAYLOAD_OFFSET)
    (length,) = struct.unpack_from("<I", bzimage, _BZ_PAYLOAD_LENGTH)
    payload = bzimage[pm_start + offset : pm_start + offset + length]
    try:
        if payload.startswith(b"\xfd7zXZ\x00"):
            vmlinux = lzma.LZMADecompressor().decompress(payload)
        elif payload.startswith(b"\x1f\x8b"):
            vmlinux = zlib.decompressobj(wbits=31).decompress(payload)
        else:
            return None  # zstd, lz4, bzip2...: not worth a tool dependency
    except (lzma.LZMAError, zlib.error):
        return None
    return vmlinux if _has_pvh_note(vmlinux) else None


def _has_pvh_note(elf: bytes) -> bool:
    if not elf.startswith(_ELF64_LE):
        return False
    try:
        phoff = struct.unpack_from("<Q", elf, 0x20)[0]
        phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
        for i in range(phnum):
            p_type, _flags, p_offset = struct.unpack_from("<IIQ", elf, phoff + i * phentsize)
            p_filesz = struct.unpack_from("<Q", elf, phoff + i * phentsize + 0x20)[0]
            if p_type != _PT_NOTE:
                continue
            pos, end = p_offset, p_offset + p_filesz
            while pos + 12 <= end:
                namesz, descsz, n_type = struct.unpack_from("<III", elf, pos)
                name = elf[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
                if name == b"Xen" and n_type == _XEN_ELFNOTE_PHYS32_ENTRY:
                    return True
                pos += 12 + ((namesz + 3) & ~3) + ((descsz + 3) & ~3)
    except struct.error:
        return False
    return False


def _qemu_path_arg(path: Path) -> str:
    # QEMU option values separate with ','; a literal comma is written twice.
    return str(path).replace(",", ",,")


def _env_assignments(env: Mapping[str, str]) -> list[str]:
    out = []
    for key, value in env.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise UserError(f"lab: environment variable name {key!r} is not valid")
        if "\0" in value:
            raise UserError(f"lab: environment variable {key} contains a NUL byte")
        out.append(shlex.quote(f"{key}={value}"))
    return out


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _collect_files(root: Path) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            files[path.relative_to(root).as_posix()] = path.read_bytes()
    return files


def _default_build_dir() -> Path:
    # In a source checkout, next to the other build outputs; installed, in the user cache.
    repo = Path(__file__).resolve().parent.parent
    if (repo / "pyproject.toml").is_file():
        return repo / "build" / "lab"
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "iovirt" / "lab"


class Lab:
    """Boots the lab VM, one boot per :meth:`run`.

    ``kver`` picks the kernel (default: the newest in /boot with modules); ``kvm`` loads
    kvm_amd before the command and fails the run if /dev/kvm does not appear. ``pvh``
    boots the same kernel uncompressed through its PVH entry (see :func:`extract_vmlinux`;
    about 4 s faster per run), falling back to the bzImage when that is not possible.
    ``machine``, ``qemu_args`` and ``cmdline`` add to QEMU's command line and the lab
    kernel's (e.g. ``machine="q35,kernel-irqchip=split"``, ``qemu_args=["-device",
    "intel-iommu,intremap=on,caching-mode=on"]``, ``cmdline="intel_iommu=on"``).
    """

    def __init__(
        self,
        kver: str | None = None,
        *,
        memory_mib: int = DEFAULT_MEMORY_MIB,
        smp: int = DEFAULT_SMP,
        kvm: bool = True,
        machine: str | None = None,
        qemu_args: Sequence[str] = (),
        cmdline: str = "",
        build_dir: Path | None = None,
        pvh: bool = True,
    ) -> None:
        reason = lab_available(kver)
        if reason is not None:
            raise ResourceError("lab", reason)
        self.kver = kver if kver is not None else lab_kernels()[-1]
        self.kernel = BOOT_DIR / f"vmlinuz-{self.kver}"
        self.memory_mib = memory_mib
        self.smp = smp
        self.kvm = kvm
        self.machine = machine
        self.qemu_args = list(qemu_args)
        self.cmdline = cmdline
        self.build_dir = build_dir if build_dir is not None else _default_build_dir()
        self.pvh = pvh

    # -- cached boot files -------------------------------------------------------------

    def _write_cached(self, target: Path, data: bytes) -> None:
        try:
            self.build_dir.mkdir(parents=True, exist_ok=True)
            # Write then rename, so a concurrent run never boots a half-written file.
            fd, tmp = tempfile.mkstemp(dir=self.build_dir, prefix=f".{target.name}-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; the cache is not secret
            os.replace(tmp, target)
        except OSError as exc:
            raise ResourceError(str(self.build_dir), f"cannot write: {exc.strerror}") from exc

    def boot_kernel(self) -> Path:
        """The file QEMU's -kernel gets: the cached PVH vmlinux, or the bzImage itself."""
        if not self.pvh:
            return self.kernel
        try:
            bzimage = self.kernel.read_bytes()
        except OSError as exc:
            raise ResourceError(str(self.kernel), f"cannot read: {exc.strerror}") from exc
        key = hashlib.sha256(bzimage).hexdigest()[:16]
        target = self.build_dir / f"vmlinux-{self.kver}-{key}.elf"
        no_pvh = self.build_dir / f"vmlinux-{self.kver}-{key}.no-pvh"
        if target.is_file():
            return target
        if no_pvh.is_file():
            return self.kernel
        vmlinux = extract_vmlinux(bzimage)
        if vmlinux is None:
            # Remember the answer: extracting costs about a second per try.
            self._write_cached(no_pvh, b"")
            return self.kernel
        self._write_cached(target, vmlinux)
        return target

    # -- the lab initramfs ---------------------------------------------------------------

    def initrd(self) -> Path:
        """The lab initramfs, built on first use and cached under the build directory.

        The cache key hashes every input (init text, busybox, each module file), so a
        changed kernel package or busybox yields a new image instead of a stale one.
        """
        modules = module_load_order(self.kver, LAB_MODULES)
        h = hashlib.sha256()
        for part in (_LAB_INITRD_FORMAT, self.kver, _LAB_INIT):
            h.update(part.encode() + b"\0")
        try:
            for path in (BUSYBOX, *modules):
                h.update(str(path).encode() + b"\0")
                h.update(hashlib.sha256(path.read_bytes()).digest())
        except OSError as exc:
            raise ResourceError(str(exc.filename), f"cannot read: {exc.strerror}") from exc
        target = self.build_dir / f"initrd-{self.kver}-{h.hexdigest()[:16]}.cpio"
        if target.is_file():
            return target
        self._write_cached(target, build_busybox_initramfs(self.kver, LAB_MODULES, _LAB_INIT))
        return target

    # -- running -------------------------------------------------------------------------

    def qemu_command(
        self,
        kernel: Path,
        initrd: Path,
        ctl_dir: Path,
        out_dir: Path,
        console: Path,
        shares: Sequence[Path] = (),
    ) -> list[str]:
        append = f"{LAB_CMDLINE} {self.cmdline}".strip()
        cmd = [
            QEMU,
            "-nodefaults",
            "-no-user-config",
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            "max",
            "-smp",
            str(self.smp),
            "-m",
            str(self.memory_mib),
            "-display",
            "none",
            "-no-reboot",
            "-chardev",
            f"file,id=con,path={_qemu_path_arg(console)}",
            "-serial",
            "chardev:con",
            "-kernel",
            str(kernel),
            "-initrd",
            str(initrd),
            "-append",
            append,
            "-virtfs",
            f"local,path=/,mount_tag={HOSTROOT_TAG},security_model=none,readonly=on,"
            "multidevs=remap",
            "-virtfs",
            f"local,path={_qemu_path_arg(ctl_dir)},mount_tag={CTL_TAG},security_model=none",
            "-virtfs",
            f"local,path={_qemu_path_arg(out_dir)},mount_tag={OUT_TAG},security_model=none",
        ]
        for i, share in enumerate(shares):
            cmd += [
                "-virtfs",
                f"local,path={_qemu_path_arg(share)},mount_tag={SHARE_TAG_PREFIX}{i},"
                "security_model=none",
            ]
        if self.machine:
            cmd += ["-machine", self.machine]
        return cmd + self.qemu_args

    def _run_script(self, cwd: str, env: Mapping[str, str], shares: Sequence[Path] = ()) -> str:
        ctl = GUEST_CTL_DIR
        lines = ["#!/bin/sh", "# Written by iovirt.lab; runs inside the lab's chroot."]
        for i, share in enumerate(shares):
            # Over the overlay, at the same path: what the lab writes there is on the host.
            where = shlex.quote(str(share))
            lines.append(
                f"mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 "
                f"{SHARE_TAG_PREFIX}{i} {where}"
                f" || {{ echo 'cannot mount the writable share '{where} >{ctl}/setup-error;"
                " exit 0; }"
            )
        if self.kvm:
            lines.append(
                f"modprobe kvm_amd >{ctl}/kvm.log 2>&1 && test -c /dev/kvm"
                f' || {{ echo "modprobe kvm_amd did not give /dev/kvm" >{ctl}/setup-error;'
                " exit 0; }"
            )
        quoted_cwd = shlex.quote(cwd)
        lines.append(
            f"cd {quoted_cwd} || {{ echo 'cannot enter '{quoted_cwd} >{ctl}/setup-error; exit 0; }}"
        )
        assignments = " ".join(_env_assignments(env))
        lines.append(
            f"env -i {assignments} /bin/sh {ctl}/cmd.sh </dev/null >{ctl}/stdout 2>{ctl}/stderr"
        )
        # Written last and renamed into place: its presence means the command finished.
        lines.append(f"echo $? >{ctl}/rc.tmp && mv {ctl}/rc.tmp {ctl}/rc")
        return "\n".join(lines) + "\n"

    def run(
        self,
        command: str | Sequence[str],
        *,
        cwd: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        out_dir: Path | None = None,
        shares: Sequence[Path] = (),
        keep_scratch: bool = False,
    ) -> LabResult:
        """Boot the lab, run ``command`` in it, power off and return what it did.

        ``command`` is shell text (run by /bin/sh) or an argv list. It runs in ``cwd``
        (default: the current directory; the same path exists in the lab) with
        :data:`BASE_ENV` updated by ``env``, stdin from /dev/null. ``out_dir`` is the host
        directory to mount at /out (default: a fresh one whose files come back in
        :attr:`LabResult.files`). Each directory in ``shares`` is mounted writable at its
        own path inside the lab, so that what the lab writes there (disk images) lands on
        the host. The scratch directory is removed unless ``keep_scratch``.
        """
        # Relative to the host's current directory: the same path exists inside the lab.
        workdir = Path(cwd).absolute() if cwd is not None else Path.cwd()
        if not workdir.is_dir():
            raise UserError(f"lab: working directory {workdir} does not exist")
        if out_dir is not None:
            out_dir = out_dir.absolute()  # QEMU resolves a relative path differently
            if not out_dir.is_dir():
                raise ResourceError(str(out_dir), "is not a directory (lab out share)")
        shares = [Path(share).absolute() for share in shares]
        for share in shares:
            if not share.is_dir():
                raise ResourceError(str(share), "is not a directory (lab writable share)")
        script = command if isinstance(command, str) else "exec " + shlex.join(command)
        full_env = {**BASE_ENV, **(env or {})}
        kernel = self.boot_kernel()
        initrd = self.initrd()

        scratch = Path(tempfile.mkdtemp(prefix="iovirt-lab-"))
        try:
            ctl_dir = scratch / "ctl"
            ctl_dir.mkdir()
            own_out = out_dir is None
            share = scratch / "out" if out_dir is None else out_dir
            share.mkdir(exist_ok=True)
            (ctl_dir / "cmd.sh").write_text(script if script.endswith("\n") else script + "\n")
            (ctl_dir / "run.sh").write_text(self._run_script(str(workdir), full_env, shares))
            console_path = scratch / "console.log"
            qemu_log = scratch / "qemu.log"
            cmd = self.qemu_command(kernel, initrd, ctl_dir, share, console_path, shares)
            (scratch / "qemu-command").write_text(shlex.join(cmd) + "\n")

            start = time.monotonic()
            returncode = _run_qemu(cmd, qemu_log, console_path, timeout)
            duration = time.monotonic() - start

            console = _read_text(console_path)
            rc_text = _read_text(ctl_dir / "rc").strip()
            if not rc_text.isdigit():
                setup_error = _read_text(ctl_dir / "setup-error").strip()
                if setup_error:
                    detail = _read_text(ctl_dir / "kvm.log").strip().replace("\n", "; ")
                    problem = f"{setup_error} ({detail})" if detail else setup_error
                    raise LabError(problem, console)
                qemu_out = _read_text(qemu_log).strip().replace("\n", "; ")
                problem = f"QEMU exited with status {returncode} before the command finished"
                raise LabError(f"{problem}: {qemu_out}" if qemu_out else problem, console)
            return LabResult(
                returncode=int(rc_text),
                stdout=_read_text(ctl_dir / "stdout"),
                stderr=_read_text(ctl_dir / "stderr"),
                console=console,
                duration=duration,
                files=_collect_files(share) if own_out else {},
                scratch=scratch if keep_scratch else None,
            )
        finally:
            if not keep_scratch:
                shutil.rmtree(scratch, ignore_errors=True)


def _run_qemu(cmd: list[str], log: Path, console: Path, timeout: float) -> int:
    """Run QEMU to its exit and return its status; kill it on timeout or any exception."""
    with log.open("wb") as log_file:
        try:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT
            )
        except OSError as exc:
            raise ResourceError(cmd[0], f"cannot start: {exc.strerror}") from exc
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise LabTimeoutError(timeout, _read_text(console)) from None
        finally:
            # Reached on timeout, Ctrl-C or any other exception: never leave QEMU behind.
            if proc.poll() is None:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m iovirt.lab",
        description="Run a command inside the lab VM (real /dev/kvm) and exit with its status.",
    )
    parser.add_argument("--cwd", default=None, help="working directory (default: current)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds")
    parser.add_argument("--kernel", default=None, help="kernel version (default: newest)")
    parser.add_argument("--no-kvm", action="store_true", help="do not load kvm_amd")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--console", action="store_true", help="print the lab console too")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (python -m iovirt.lab -- COMMAND...)")
    try:
        lab = Lab(args.kernel, kvm=not args.no_kvm)
        result = lab.run(
            command[0] if len(command) == 1 else command,
            cwd=args.cwd,
            timeout=args.timeout,
            keep_scratch=args.keep,
        )
    except IovirtError as exc:
        print(exc, file=sys.stderr)
        return 125
    if args.console:
        sys.stderr.write(result.console)
    sys.stdout.write(result.stdout)
    sys.stdout.flush()
    sys.stderr.write(result.stderr)
    if result.scratch is not None:
        print(f"iovirt.lab: scratch kept in {result.scratch}", file=sys.stderr)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
