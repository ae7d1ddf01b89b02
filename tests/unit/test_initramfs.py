"""Tests of the initramfs builder: the newc writer read back by GNU cpio, module dependency
resolution on a made-up and on the real modules.dep, and the guest-test console protocol."""

from __future__ import annotations

import lzma
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from iovirt.boot.initramfs import (
    NEWC_HEADER_SIZE,
    Initramfs,
    build_busybox_initramfs,
    guest_test_initramfs,
    module_load_order,
    module_name,
    parse_guest_test_output,
)
from iovirt.errors import ResourceError, UserError

CPIO = shutil.which("cpio")
needs_cpio = pytest.mark.skipif(CPIO is None, reason="GNU cpio not installed (Debian: cpio)")
needs_busybox = pytest.mark.skipif(
    not Path("/bin/busybox").is_file(), reason="/bin/busybox missing (Debian: busybox-static)"
)


def cpio_list(archive: bytes) -> list[str]:
    assert CPIO is not None
    done = subprocess.run([CPIO, "-t", "--quiet"], input=archive, capture_output=True, check=True)
    return done.stdout.decode().splitlines()


def cpio_extract(archive: bytes, dest: Path) -> None:
    assert CPIO is not None
    subprocess.run(
        [CPIO, "-i", "-d", "-m", "--quiet", "--no-absolute-filenames"],
        input=archive,
        cwd=dest,
        capture_output=True,
        check=True,
    )


def walk_newc(archive: bytes) -> list[tuple[int, str, int, int]]:
    """An independent newc reader: (offset, name, mode, filesize) per entry, trailer included;
    asserts the alignment rules on the way."""
    entries = []
    pos = 0
    while True:
        assert pos % 4 == 0, f"entry at {pos} not 4-byte aligned"
        header = archive[pos : pos + NEWC_HEADER_SIZE]
        assert header[:6] == b"070701"
        fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, namesize = fields[1], fields[6], fields[11]
        name_start = pos + NEWC_HEADER_SIZE
        name = archive[name_start : name_start + namesize - 1].decode()
        assert archive[name_start + namesize - 1] == 0
        data_start = (name_start + namesize + 3) & ~3
        assert archive[name_start + namesize : data_start] == b"\0" * (
            data_start - name_start - namesize
        )
        entries.append((pos, name, mode, filesize))
        end = data_start + filesize
        pos = (end + 3) & ~3
        assert archive[end:pos] == b"\0" * (pos - end)
        if name == "TRAILER!!!":
            assert pos == len(archive)
            return entries


# -- the cpio writer -------------------------------------------------------------------------


@needs_cpio
def test_gnu_cpio_reads_back_files_modes_and_symlinks(tmp_path: Path) -> None:
    host_file = tmp_path / "host.bin"
    host_file.write_bytes(bytes(range(256)) * 3 + b"x")
    host_file.chmod(0o640)
    image = Initramfs()
    image.add_dir("/etc", 0o750)
    image.add_file("/etc/hostname", b"lab\n", 0o600)
    image.add_file("/usr/libexec/deep/tool", b"#!/bin/sh\nexit 0\n", 0o755)  # parents implied
    image.add_file("/empty", b"")
    image.add_symlink("/bin/sh", "/bin/busybox")
    image.add_symlink("relative-link", "etc/hostname")
    image.add_host_file("/host-copy", host_file)
    image.add_host_file("/host-copy-755", host_file, mode=0o755)
    archive = image.to_bytes()

    names = cpio_list(archive)
    assert names.count("etc") == 1
    assert set(names) == {
        "etc",
        "etc/hostname",
        "usr",
        "usr/libexec",
        "usr/libexec/deep",
        "usr/libexec/deep/tool",
        "empty",
        "bin",
        "bin/sh",
        "relative-link",
        "host-copy",
        "host-copy-755",
    }
    # Parents come before their children, as the kernel's unpacker needs.
    assert names.index("usr/libexec/deep") < names.index("usr/libexec/deep/tool")

    dest = tmp_path / "x"
    dest.mkdir()
    cpio_extract(archive, dest)
    assert (dest / "etc/hostname").read_bytes() == b"lab\n"
    assert stat.S_IMODE((dest / "etc/hostname").stat().st_mode) == 0o600
    assert stat.S_IMODE((dest / "etc").stat().st_mode) == 0o750
    assert stat.S_IMODE((dest / "usr/libexec/deep").stat().st_mode) == 0o755
    assert (dest / "usr/libexec/deep/tool").read_bytes() == b"#!/bin/sh\nexit 0\n"
    assert stat.S_IMODE((dest / "usr/libexec/deep/tool").stat().st_mode) == 0o755
    assert (dest / "empty").read_bytes() == b""
    assert os.readlink(dest / "bin/sh") == "/bin/busybox"
    assert os.readlink(dest / "relative-link") == "etc/hostname"
    assert (dest / "relative-link").read_bytes() == b"lab\n"
    assert (dest / "host-copy").read_bytes() == host_file.read_bytes()
    assert stat.S_IMODE((dest / "host-copy").stat().st_mode) == 0o640
    assert stat.S_IMODE((dest / "host-copy-755").stat().st_mode) == 0o755


@needs_cpio
@pytest.mark.parametrize("name_len", range(1, 9))
@pytest.mark.parametrize("data_len", [0, 1, 2, 3, 4, 5, 7, 8, 1021])
def test_odd_lengths_keep_alignment(tmp_path: Path, name_len: int, data_len: int) -> None:
    name = "n" * name_len
    data = bytes((i * 7 + data_len) & 0xFF for i in range(data_len))
    image = Initramfs()
    image.add_file(name, data)
    image.add_file(f"d/{name}.after", b"z" * (name_len % 3 + 1))  # an entry after it
    archive = image.to_bytes()

    entries = walk_newc(archive)
    assert [e[1] for e in entries] == [name, "d", f"d/{name}.after", "TRAILER!!!"]
    assert entries[0][3] == data_len
    cpio_extract(archive, tmp_path)
    assert (tmp_path / name).read_bytes() == data
    assert (tmp_path / "d" / f"{name}.after").read_bytes() == b"z" * (name_len % 3 + 1)


def test_entry_types_in_headers() -> None:
    image = Initramfs()
    image.add_dir("a", 0o700)
    image.add_file("a/f", b"1", 0o4755)
    image.add_symlink("a/l", "f")
    modes = {name: mode for _, name, mode, _ in walk_newc(image.to_bytes())}
    assert modes["a"] == stat.S_IFDIR | 0o700
    assert modes["a/f"] == stat.S_IFREG | 0o4755
    assert modes["a/l"] == stat.S_IFLNK | 0o777


def test_archive_is_reproducible() -> None:
    def build() -> bytes:
        image = Initramfs()
        image.add_file("/init", b"#!/bin/sh\n", 0o755)
        image.add_symlink("/bin/sh", "/bin/busybox")
        return image.to_bytes()

    assert build() == build()


def test_bad_paths_and_duplicates_are_user_errors() -> None:
    image = Initramfs()
    image.add_file("/etc/x", b"")
    with pytest.raises(UserError, match="already in the archive"):
        image.add_file("etc/x", b"again")
    with pytest.raises(UserError, match=r"'\.\.'"):
        image.add_file("/etc/../../escape", b"")
    with pytest.raises(UserError, match="not a directory"):
        image.add_file("/etc/x/child", b"")
    with pytest.raises(UserError, match="not a usable archive path"):
        image.add_dir("/")
    image.add_dir("/etc", 0o700)  # re-adding a directory only changes its mode
    with pytest.raises(ResourceError, match="/nonexistent/file"):
        image.add_host_file("/y", "/nonexistent/file")


# -- kernel modules --------------------------------------------------------------------------

FAKE_KVER = "9.9.9-test"


@pytest.fixture
def fake_modules(tmp_path: Path) -> Path:
    """A made-up /lib/modules tree: one module .ko.xz, one with '-' in its file name."""
    root = tmp_path / "modules"
    kdir = root / FAKE_KVER
    files = {
        "kernel/lib/base.ko": b"\x7fELF base",
        "kernel/lib/mid-dash.ko": b"\x7fELF mid",
        "kernel/drivers/top.ko": b"\x7fELF top",
        "kernel/drivers/other_top.ko": b"\x7fELF other",
    }
    for rel, data in files.items():
        (kdir / rel).parent.mkdir(parents=True, exist_ok=True)
        (kdir / rel).write_bytes(data)
    (kdir / "kernel/lib/packed.ko.xz").write_bytes(lzma.compress(b"\x7fELF packed"))
    (kdir / "modules.dep").write_text(
        "kernel/lib/base.ko:\n"
        "kernel/lib/packed.ko.xz: kernel/lib/base.ko\n"
        "kernel/lib/mid-dash.ko: kernel/lib/packed.ko.xz kernel/lib/base.ko\n"
        "kernel/drivers/top.ko: kernel/lib/mid-dash.ko kernel/lib/packed.ko.xz kernel/lib/base.ko\n"
        "kernel/drivers/other_top.ko: kernel/lib/base.ko\n"
    )
    (kdir / "modules.builtin").write_text("kernel/fs/ext4/ext4.ko\n")
    return root


def test_module_order_on_a_made_up_tree(fake_modules: Path) -> None:
    kdir = fake_modules / FAKE_KVER
    order = module_load_order(FAKE_KVER, ["top", "other-top", "mid_dash"], fake_modules)
    assert order == [
        kdir / "kernel/lib/base.ko",
        kdir / "kernel/lib/packed.ko.xz",
        kdir / "kernel/lib/mid-dash.ko",
        kdir / "kernel/drivers/top.ko",
        kdir / "kernel/drivers/other_top.ko",
    ]
    # Built-in modules need no loading; a name given as a file name works too.
    assert module_load_order(FAKE_KVER, ["ext4", "base.ko"], fake_modules) == [
        kdir / "kernel/lib/base.ko"
    ]


def test_unknown_module_names_it(fake_modules: Path) -> None:
    with pytest.raises(ResourceError, match="kernel module no_such_mod") as err:
        module_load_order(FAKE_KVER, ["base", "no-such-mod"], fake_modules)
    assert "\n" not in str(err.value)


def test_missing_dependency_names_who_needs_it(fake_modules: Path) -> None:
    dep = fake_modules / FAKE_KVER / "modules.dep"
    dep.write_text(dep.read_text() + "kernel/x/needy.ko: kernel/x/gone.ko\n")
    with pytest.raises(ResourceError, match=r"kernel module gone: .*needed by needy"):
        module_load_order(FAKE_KVER, ["needy"], fake_modules)


def test_missing_modules_dep_is_a_resource_error(tmp_path: Path) -> None:
    with pytest.raises(ResourceError, match=r"modules\.dep"):
        module_load_order("0.0.0-none", ["x"], tmp_path)


def test_module_name_canonical_form() -> None:
    assert module_name("kvm-amd") == "kvm_amd"
    assert module_name("kernel/arch/x86/kvm/kvm-amd.ko") == "kvm_amd"
    assert module_name("virtio_pci.ko.zst") == "virtio_pci"


def real_kver() -> str | None:
    kernels = [
        p.name
        for p in Path("/lib/modules").glob("*")
        if (p / "modules.dep").is_file() and (p / "kernel/arch/x86/kvm").is_dir()
    ]
    return sorted(kernels)[-1] if kernels else None


REAL_KVER = real_kver()
needs_real_modules = pytest.mark.skipif(
    REAL_KVER is None, reason="no /lib/modules tree with kvm (Debian: linux-image-amd64)"
)


@needs_real_modules
def test_kvm_amd_order_on_the_real_modules_dep() -> None:
    assert REAL_KVER is not None
    kdir = Path("/lib/modules") / REAL_KVER
    order = [module_name(p.name) for p in module_load_order(REAL_KVER, ["kvm-amd"])]
    assert order[-1] == "kvm_amd"
    assert len(order) == len(set(order))
    assert order.index("irqbypass") < order.index("kvm") < order.index("kvm_amd")
    line = next(
        line for line in (kdir / "modules.dep").read_text().splitlines() if "/kvm-amd.ko" in line
    )
    if "ccp.ko" in line.partition(":")[2]:
        assert order.index("ccp") < order.index("kvm_amd")
    # Asking twice, under both spellings, still loads each module once.
    again = module_load_order(REAL_KVER, ["kvm_amd", "kvm-amd", "kvm"])
    assert [module_name(p.name) for p in again] == order


@needs_real_modules
def test_lab_module_list_resolves_in_dependency_order() -> None:
    assert REAL_KVER is not None
    wanted = ["overlay", "virtio_pci", "9pnet_virtio", "9p"]
    order = [module_name(p.name) for p in module_load_order(REAL_KVER, wanted)]
    for before, after in [
        ("netfs", "fscache"),
        ("fscache", "9p"),
        ("9pnet", "9p"),
        ("virtio_ring", "virtio"),
        ("virtio", "9pnet_virtio"),
        ("virtio_pci_modern_dev", "virtio_pci"),
        ("virtio_pci_legacy_dev", "virtio_pci"),
    ]:
        assert order.index(before) < order.index(after), (before, after)


# -- busybox images and the guest-test protocol ----------------------------------------------


@needs_cpio
@needs_busybox
def test_busybox_initramfs_layout(tmp_path: Path, fake_modules: Path) -> None:
    archive = build_busybox_initramfs(
        FAKE_KVER,
        ["mid-dash"],
        "echo hello from init\n",
        {"/etc/motd": b"hi\n", "/usr/bin/helper": b"#!/bin/sh\n"},
        modules_root=fake_modules,
    )
    cpio_extract(archive, tmp_path)
    assert (tmp_path / "bin/busybox").read_bytes() == Path("/bin/busybox").read_bytes()
    assert os.readlink(tmp_path / "bin/sh") == "/bin/busybox"
    assert os.readlink(tmp_path / "sbin/insmod") == "/bin/busybox"
    mods = tmp_path / "lib/modules" / FAKE_KVER / "kernel/lib"
    # The .ko.xz is stored inflated, under a plain .ko name, for busybox insmod.
    assert (mods / "packed.ko").read_bytes() == b"\x7fELF packed"
    assert not (mods / "packed.ko.xz").exists()
    assert stat.S_IMODE((tmp_path / "usr/bin/helper").stat().st_mode) == 0o755
    assert (tmp_path / "etc/motd").read_bytes() == b"hi\n"
    init = (tmp_path / "init").read_text()
    assert init.startswith("#!/bin/busybox sh\n")
    assert stat.S_IMODE((tmp_path / "init").stat().st_mode) == 0o755
    assert "mount -t devtmpfs devtmpfs /dev" in init
    insmods = [line.split()[1] for line in init.splitlines() if line.startswith("insmod ")]
    assert insmods == [
        f"/lib/modules/{FAKE_KVER}/kernel/lib/base.ko",
        f"/lib/modules/{FAKE_KVER}/kernel/lib/packed.ko",
        f"/lib/modules/{FAKE_KVER}/kernel/lib/mid-dash.ko",
    ]
    assert init.index("insmod ") < init.index("echo hello from init")


@needs_cpio
@needs_busybox
def test_guest_test_initramfs_runs_script_with_sh_e(tmp_path: Path, fake_modules: Path) -> None:
    archive = guest_test_initramfs(
        FAKE_KVER, ["base"], "echo one\nfalse\necho never\n", timeout=30, modules_root=fake_modules
    )
    cpio_extract(archive, tmp_path)
    assert (tmp_path / "iovirt-test.sh").read_text() == "echo one\nfalse\necho never\n"
    init = (tmp_path / "init").read_text()
    assert "timeout -s KILL 30 sh -e /iovirt-test.sh" in init
    assert init.index("IOVIRT-TEST-BEGIN") < init.index("IOVIRT-TEST-END rc=$rc")
    assert "reboot -f" in init.split("IOVIRT-TEST-END")[1]
    # The script itself, run the way init runs it, stops at the first failure.
    busybox_sh = subprocess.run(
        ["/bin/busybox", "sh", "-e", str(tmp_path / "iovirt-test.sh")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (busybox_sh.returncode, busybox_sh.stdout) == (1, "one\n")


def test_guest_test_timeout_must_be_positive(fake_modules: Path) -> None:
    with pytest.raises(UserError, match="timeout"):
        guest_test_initramfs(FAKE_KVER, [], "true", timeout=0, modules_root=fake_modules)


def test_parse_guest_test_output() -> None:
    console = (
        "SeaBIOS (version 1.16)\r\n"
        "[    0.000000] Linux version 6.1.0\r\n"
        "IOVIRT-TEST-BEGIN\r\n"
        "line one\r\n"
        "  indented IOVIRT-TEST-END rc=9 not a marker\r\n"
        "\r\n"
        "last\r\n"
        "IOVIRT-TEST-END rc=3\r\n"
        "[    2.100000] reboot: Power down\r\n"
    )
    rc, output = parse_guest_test_output(console)
    assert rc == 3
    assert output == "line one\n  indented IOVIRT-TEST-END rc=9 not a marker\n\nlast\n"


def test_parse_guest_test_output_incomplete_runs() -> None:
    assert parse_guest_test_output("IOVIRT-TEST-BEGIN\nIOVIRT-TEST-END rc=0\n") == (0, "")
    assert parse_guest_test_output("Kernel panic - not syncing\n") == (None, "")
    rc, output = parse_guest_test_output("IOVIRT-TEST-BEGIN\npartial\n[ 5.0] Oops")
    assert rc is None
    assert "partial" in output and "Oops" in output
