"""Tests of the VM config: sizes, schema validation, and the one-line ConfigError messages.

Every rejected config must raise :class:`ConfigError` whose ``key`` is the dotted key the
user wrote (``vm.memory``, ``serial.backend.path``) and whose message is ``config: KEY:
PROBLEM`` on a single line, because the CLI prints it as is. ``parse_config`` is fed decoded
TOML documents; ``load_config`` real files under ``tmp_path``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from iovirt.config import VmConfig, load_config, parse_config, parse_size
from iovirt.errors import ConfigError, UserError

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30


def one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text and "\r" not in text, repr(text)
    return text


# -- parse_size -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("512M", 512 * MiB),
        ("2G", 2 * GiB),
        ("1k", KiB),
        ("1K", KiB),
        ("4096", 4096),
        (4096, 4096),
        ("1T", 1 << 40),
        ("512MiB", 512 * MiB),
        ("512MB", 512 * MiB),  # binary units, as QEMU reads -m
        (" 8 M ", 8 * MiB),
        ("0", 0),
    ],
)
def test_parse_size_accepts(value: object, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize(
    "value",
    ["12Q", "", " ", "M", "1.5G", "-1M", "0x1000", "512 M B", True, False, None, 1.5, [512]],
)
def test_parse_size_rejects(value: object) -> None:
    with pytest.raises(ValueError) as exc:
        parse_size(value)
    one_line(exc.value)


def test_parse_size_rejects_a_negative_integer() -> None:
    # "-1M" is refused by the pattern; the integer -1 must be too: no size is negative.
    with pytest.raises(ValueError):
        parse_size(-1)


# -- parse_config: a valid document -----------------------------------------------------------


def test_empty_document_gives_the_defaults() -> None:
    config = parse_config({})
    assert config == VmConfig()
    assert config.vm.memory == 256 * MiB
    assert config.vm.vcpus == 1
    assert config.serial.backend.kind == "stdio"


def test_full_document_is_parsed() -> None:
    config = parse_config(
        {
            "vm": {
                "memory": "512M",
                "vcpus": 4,
                "kernel": "/boot/vmlinuz",
                "initrd": "initrd.img",
                "cmdline": "console=ttyS0 quiet",
                "debug_exit": True,
            },
            "serial": {"backend": {"kind": "file", "path": "out.log", "append": True}},
        }
    )
    assert config.vm.memory == 512 * MiB
    assert config.vm.vcpus == 4
    assert config.vm.kernel == Path("/boot/vmlinuz")
    assert config.vm.initrd == Path("initrd.img")
    assert config.serial.backend.kind == "file"


@pytest.mark.parametrize("vcpus", [1, 254])
def test_vcpus_at_the_limits_are_accepted(vcpus: int) -> None:
    assert parse_config({"vm": {"vcpus": vcpus}}).vm.vcpus == vcpus


@pytest.mark.parametrize("memory", ["1M", 1 * MiB, "1028K", 4096 * 300])
def test_smallest_aligned_memory_is_accepted(memory: object) -> None:
    assert parse_config({"vm": {"memory": memory}}).vm.memory >= MiB


# -- parse_config: every error names the dotted key -------------------------------------------

REJECTED: list[tuple[str, dict[str, Any], str, str]] = [
    # (id, document, key, a fragment of the problem)
    ("unknown top-level", {"vmm": {}}, "vmm", "unknown key"),
    ("unknown in vm", {"vm": {"memroy": "1G"}}, "vm.memroy", "unknown key"),
    ("unknown in serial", {"serial": {"bakend": {}}}, "serial.bakend", "unknown key"),
    (
        "unknown in backend",
        {"serial": {"backend": {"kind": "file", "path": "x", "mode": "a"}}},
        "serial.backend.mode",
        "unknown key",
    ),
    ("vm not a table", {"vm": 5}, "vm", "dictionary"),
    ("serial not a table", {"serial": "stdio"}, "serial", "dictionary"),
    ("vcpus a word", {"vm": {"vcpus": "two"}}, "vm.vcpus", "integer"),
    ("vcpus fractional", {"vm": {"vcpus": 2.5}}, "vm.vcpus", "integer"),
    ("cmdline not a string", {"vm": {"cmdline": 5}}, "vm.cmdline", "string"),
    ("kernel not a path", {"vm": {"kernel": 5}}, "vm.kernel", "path"),
    ("debug_exit not a bool", {"vm": {"debug_exit": "maybe"}}, "vm.debug_exit", "boolean"),
    (
        "backend input not a bool",
        {"serial": {"backend": {"kind": "stdio", "input": "maybe"}}},
        "serial.backend.input",
        "boolean",
    ),
    ("backend not a table", {"serial": {"backend": "stdio"}}, "serial.backend", "dictionary"),
    ("vcpus 0", {"vm": {"vcpus": 0}}, "vm.vcpus", "greater than or equal to 1"),
    ("vcpus negative", {"vm": {"vcpus": -3}}, "vm.vcpus", "greater than or equal to 1"),
    ("vcpus 255", {"vm": {"vcpus": 255}}, "vm.vcpus", "less than or equal to 254"),
    ("memory too small", {"vm": {"memory": "512K"}}, "vm.memory", "too little"),
    ("memory zero", {"vm": {"memory": 0}}, "vm.memory", "too little"),
    ("memory unaligned", {"vm": {"memory": MiB + 1}}, "vm.memory", "multiple of 4K"),
    ("memory unaligned str", {"vm": {"memory": "1025K"}}, "vm.memory", "multiple of 4K"),
    ("memory bad unit", {"vm": {"memory": "12Q"}}, "vm.memory", "not a size"),
    ("memory bool", {"vm": {"memory": True}}, "vm.memory", "size"),
    ("memory float", {"vm": {"memory": 1.5}}, "vm.memory", "not a size"),
    ("missing kind", {"serial": {"backend": {"path": "x"}}}, "serial.backend", "'kind'"),
    ("unknown kind", {"serial": {"backend": {"kind": "tcp"}}}, "serial.backend", "'tcp'"),
    ("kind not a string", {"serial": {"backend": {"kind": 5}}}, "serial.backend", "kind"),
    (
        "file without path",
        {"serial": {"backend": {"kind": "file"}}},
        "serial.backend.path",
        "missing",
    ),
    (
        "socket without path",
        {"serial": {"backend": {"kind": "socket"}}},
        "serial.backend.path",
        "missing",
    ),
]


@pytest.mark.parametrize(
    ("document", "key", "fragment"), [r[1:] for r in REJECTED], ids=[r[0] for r in REJECTED]
)
def test_config_error_names_the_dotted_key(
    document: dict[str, Any], key: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(document)
    err = exc.value
    assert err.key == key
    text = one_line(err)
    assert text.startswith(f"config: {key}: ")
    assert fragment in err.problem
    assert "Value error" not in text  # pydantic's prefix is stripped
    assert err.__cause__ is not None  # chained to the validation error


def test_unknown_kind_lists_the_known_kinds() -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config({"serial": {"backend": {"kind": "tcp"}}})
    for kind in ("stdio", "file", "socket", "pty", "null"):
        assert kind in exc.value.problem


def test_config_error_is_a_user_error() -> None:
    with pytest.raises(UserError):
        parse_config({"vmm": {}})


# -- load_config ------------------------------------------------------------------------------


def write(tmp_path: Path, text: str, name: str = "vm.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    path = tmp_path / "vmlinuz"
    path.write_bytes(b"kernel")
    return path


@pytest.fixture
def initrd(tmp_path: Path) -> Path:
    path = tmp_path / "initrd.img"
    path.write_bytes(b"initrd")
    return path


def load_error(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    one_line(exc.value)
    return exc.value


def test_load_valid_config(tmp_path: Path, kernel: Path, initrd: Path) -> None:
    cfg = write(
        tmp_path,
        f'[vm]\nmemory = "64M"\nvcpus = 2\nkernel = "{kernel}"\ninitrd = "{initrd}"\n'
        '[serial]\nbackend = { kind = "null" }\n',
    )
    config = load_config(cfg)
    assert config.vm.memory == 64 * MiB
    assert config.vm.kernel == kernel
    assert config.serial.backend.kind == "null"


def test_load_relative_paths_are_taken_from_the_current_directory(
    tmp_path: Path, kernel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, '[vm]\nkernel = "vmlinuz"\n')
    monkeypatch.chdir(tmp_path)
    assert load_config("vm.toml").vm.kernel == Path("vmlinuz")


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    err = load_error(path)
    assert err.key == str(path)
    assert "no such config file" in str(err)


def test_unreadable_config_file_is_a_config_error(tmp_path: Path) -> None:
    err = load_error(tmp_path)  # a directory
    assert err.key == str(tmp_path)
    assert "cannot read" in str(err)


@pytest.mark.parametrize(
    "text",
    ['[vm\nmemory = "1G"\n', "[vm]\nmemory = 512M\n", '[vm]\nkernel = "a\nb"\n', "= 1\n"],
)
def test_invalid_toml(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    err = load_error(path)
    assert err.key == str(path)
    assert "not valid TOML" in str(err)


def test_config_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    # TOML is UTF-8; a Latin-1 file (or a binary picked by mistake) is a user mistake like any
    # other invalid TOML, not a UnicodeDecodeError traceback.
    path = tmp_path / "vm.toml"
    path.write_bytes('[vm]\ncmdline = "café"\n'.encode("latin-1"))
    err = load_error(path)
    assert err.key == str(path)


def test_both_kernel_and_firmware(tmp_path: Path, kernel: Path) -> None:
    cfg = write(tmp_path, f'[vm]\nkernel = "{kernel}"\nfirmware = "{kernel}"\n')
    err = load_error(cfg)
    assert err.key == "vm.kernel"
    assert "exactly one" in err.problem


def test_neither_kernel_nor_firmware(tmp_path: Path) -> None:
    err = load_error(write(tmp_path, '[vm]\nmemory = "64M"\n'))
    assert err.key == "vm.kernel"
    assert "exactly one" in err.problem


def test_initrd_without_kernel(tmp_path: Path, kernel: Path, initrd: Path) -> None:
    cfg = write(tmp_path, f'[vm]\nfirmware = "{kernel}"\ninitrd = "{initrd}"\n')
    err = load_error(cfg)
    assert err.key == "vm.initrd"
    assert "vm.kernel" in err.problem


@pytest.mark.parametrize("key", ["kernel", "initrd", "firmware"])
def test_nonexistent_file(tmp_path: Path, kernel: Path, key: str) -> None:
    missing = tmp_path / f"no-{key}"
    lines = {"kernel": f'kernel = "{kernel}"', key: f'{key} = "{missing}"'}
    if key == "firmware":
        del lines["kernel"]
    err = load_error(write(tmp_path, "[vm]\n" + "\n".join(lines.values()) + "\n"))
    assert err.key == f"vm.{key}"
    assert str(err) == f"config: vm.{key}: {missing}: no such file"


def test_directory_where_a_kernel_file_is_expected(tmp_path: Path) -> None:
    err = load_error(write(tmp_path, f'[vm]\nkernel = "{tmp_path}"\n'))
    assert err.key == "vm.kernel"


def test_schema_errors_from_a_file_name_the_dotted_key(tmp_path: Path) -> None:
    err = load_error(write(tmp_path, '[serial]\nbackend = { kind = "socket" }\n'))
    assert err.key == "serial.backend.path"


@pytest.mark.parametrize(
    "text",
    [
        '[vm]\nkernel = "/no/such\\nvmlinuz"\n',  # a TOML escape: the path holds a newline
        '"bad\\nkey" = 1\n',  # a quoted key with a newline in it
    ],
)
def test_messages_stay_on_one_line_when_the_config_holds_a_newline(
    tmp_path: Path, text: str
) -> None:
    load_error(write(tmp_path, text))


# -- [[disk]] ---------------------------------------------------------------------------------


def disk_doc(**fields: Any) -> dict[str, Any]:
    """A document with one [[disk]] table: a valid one, with ``fields`` changed."""
    table: dict[str, Any] = {
        "model": "virtio-blk",
        "backend": {"kind": "file", "path": "disk.img"},
    }
    table.update(fields)
    return {"disk": [table]}


def test_disk_table_with_every_key() -> None:
    config = parse_config(
        disk_doc(
            transport="mmio",
            backend={"kind": "file", "path": "/srv/a.img", "readonly": True, "direct": True},
            serial="iovirt-0000000000001",  # exactly 20 bytes
            queues=4,
            queue_size=1024,
            packed=False,
            discard=False,
            block_size=4096,
        )
    )
    (disk,) = config.disk
    assert disk.model == "virtio-blk"
    assert disk.transport == "mmio"
    assert disk.backend.kind == "file"
    assert disk.backend.path == Path("/srv/a.img")
    assert disk.backend.readonly and disk.backend.direct
    assert disk.serial == "iovirt-0000000000001"
    assert (disk.queues, disk.queue_size, disk.block_size) == (4, 1024, 4096)
    assert not disk.packed and not disk.discard


def test_disk_defaults() -> None:
    (disk,) = parse_config(disk_doc()).disk
    assert disk.transport == "pci"
    assert not disk.backend.readonly and not disk.backend.direct
    assert disk.serial == ""
    assert (disk.queues, disk.queue_size, disk.block_size) == (1, 256, 512)
    assert disk.packed and disk.discard
    assert parse_config({}).disk == []  # no [[disk]]: no disks


def test_several_disks_keep_their_order() -> None:
    doc = {
        "disk": [
            {"model": "virtio-blk", "backend": {"kind": "file", "path": f"d{i}.img"}}
            for i in range(3)
        ]
    }
    assert [d.backend.path for d in parse_config(doc).disk] == [
        Path("d0.img"),
        Path("d1.img"),
        Path("d2.img"),
    ]


@pytest.mark.parametrize("queue_size", [4, 16, 256, 1024])
def test_disk_queue_sizes_accepted(queue_size: int) -> None:
    assert parse_config(disk_doc(queue_size=queue_size)).disk[0].queue_size == queue_size


DISK_REJECTED: list[tuple[str, dict[str, Any], str, str]] = [
    ("unknown model", disk_doc(model="virtio-scsi"), "disk.0.model", "'virtio-blk'"),
    (
        "model missing",
        {"disk": [{"backend": {"kind": "file", "path": "x"}}]},
        "disk.0.model",
        "missing",
    ),
    (
        "unknown backend kind",
        disk_doc(backend={"kind": "qcow2", "path": "x.qcow2"}),
        "disk.0.backend",
        "'file', 'vhost-user'",
    ),
    ("backend missing", {"disk": [{"model": "virtio-blk"}]}, "disk.0.backend", "missing"),
    ("backend without path", disk_doc(backend={"kind": "file"}), "disk.0.backend.path", "missing"),
    (
        "unknown key in backend",
        disk_doc(backend={"kind": "file", "path": "x", "cache": "none"}),
        "disk.0.backend.cache",
        "unknown key",
    ),
    ("unknown key in disk", disk_doc(bus="ide"), "disk.0.bus", "unknown key"),
    ("unknown transport", disk_doc(transport="ccw"), "disk.0.transport", "'pci'"),
    (
        "queue_size not a power of two",
        disk_doc(queue_size=100),
        "disk.0.queue_size",
        "power of two",
    ),
    ("queue_size too small", disk_doc(queue_size=2), "disk.0.queue_size", "between 4 and 1024"),
    ("queue_size too big", disk_doc(queue_size=2048), "disk.0.queue_size", "between 4 and 1024"),
    ("queue_size zero", disk_doc(queue_size=0), "disk.0.queue_size", "power of two"),
    ("queues zero", disk_doc(queues=0), "disk.0.queues", "greater than or equal to 1"),
    ("queues too many", disk_doc(queues=65), "disk.0.queues", "less than or equal to 64"),
    ("serial too long", disk_doc(serial="x" * 21), "disk.0.serial", "at most 20"),
    ("serial not ascii", disk_doc(serial="dísk"), "disk.0.serial", "ASCII"),
    ("block_size odd", disk_doc(block_size=1000), "disk.0.block_size", "power of two"),
    ("block_size small", disk_doc(block_size=256), "disk.0.block_size", "between 512"),
    (
        "readonly not a bool",
        disk_doc(backend={"kind": "file", "path": "x", "readonly": "maybe"}),
        "disk.0.backend.readonly",
        "boolean",
    ),
    ("disk not a list", {"disk": {"model": "virtio-blk"}}, "disk", "list"),
]


@pytest.mark.parametrize(
    ("document", "key", "fragment"),
    [r[1:] for r in DISK_REJECTED],
    ids=[r[0] for r in DISK_REJECTED],
)
def test_disk_errors_name_the_dotted_key(document: dict[str, Any], key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(document)
    err = exc.value
    assert err.key == key
    assert one_line(err).startswith(f"config: {key}: ")
    assert fragment in err.problem


def test_second_disk_error_names_its_index() -> None:
    good = {"model": "virtio-blk", "backend": {"kind": "file", "path": "a.img"}}
    bad = {"model": "virtio-blk", "backend": {"kind": "file", "path": "b.img"}, "queue_size": 3}
    with pytest.raises(ConfigError) as exc:
        parse_config({"disk": [good, bad]})
    assert exc.value.key == "disk.1.queue_size"


def test_load_config_with_a_disk(tmp_path: Path, kernel: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4096))
    cfg = write(
        tmp_path,
        f'[vm]\nkernel = "{kernel}"\n\n[[disk]]\nmodel = "virtio-blk"\n'
        f'backend = {{ kind = "file", path = "{image}", readonly = true }}\n',
    )
    (disk,) = load_config(cfg).disk
    assert disk.backend.path == image
    assert disk.backend.readonly


@pytest.mark.parametrize("index", [0, 1])
def test_load_config_missing_image_names_the_disk(tmp_path: Path, kernel: Path, index: int) -> None:
    present = tmp_path / "present.img"
    present.write_bytes(bytes(4096))
    missing = tmp_path / "missing.img"
    images = [missing, present] if index == 0 else [present, missing]
    disks = "".join(
        f'[[disk]]\nmodel = "virtio-blk"\nbackend = {{ kind = "file", path = "{image}" }}\n'
        for image in images
    )
    err = load_error(write(tmp_path, f'[vm]\nkernel = "{kernel}"\n' + disks))
    assert err.key == f"disk.{index}.backend.path"
    assert str(missing) in err.problem
    assert "no such file" in err.problem
    assert str(err).startswith(f"config: disk.{index}.backend.path: ")


def test_load_config_missing_image_with_a_newline_is_one_line(tmp_path: Path, kernel: Path) -> None:
    text = (
        f'[vm]\nkernel = "{kernel}"\n[[disk]]\nmodel = "virtio-blk"\n'
        'backend = { kind = "file", path = "/no/such\\ndisk.img" }\n'
    )
    err = load_error(write(tmp_path, text))  # load_error checks the message is one line
    assert err.key == "disk.0.backend.path"


# -- [[nic]] ----------------------------------------------------------------------------------


def nic_doc(**fields: Any) -> dict[str, Any]:
    """A document with one [[nic]] table: a valid one, with ``fields`` changed."""
    table: dict[str, Any] = {"model": "virtio-net", "backend": {"kind": "tap"}}
    table.update(fields)
    return {"nic": [table]}


def test_nic_table_with_every_key() -> None:
    config = parse_config(
        nic_doc(
            transport="mmio",
            mac="02:AB:cd:00:00:01",
            backend={"kind": "tap", "ifname": "tap-iovirt0", "netns": "lab", "bridge": "br0"},
            queues=16,
            queue_size=1024,
            packed=False,
            mtu=9000,
        )
    )
    (nic,) = config.nic
    assert nic.model == "virtio-net"
    assert nic.transport == "mmio"
    assert nic.mac == "02:AB:cd:00:00:01"
    assert nic.backend.kind == "tap"
    assert (nic.backend.ifname, nic.backend.netns, nic.backend.bridge) == (
        "tap-iovirt0",
        "lab",
        "br0",
    )
    assert (nic.queues, nic.queue_size, nic.mtu) == (16, 1024, 9000)
    assert not nic.packed


def test_nic_defaults() -> None:
    (nic,) = parse_config(nic_doc()).nic
    assert nic.transport == "pci"
    assert nic.mac is None  # the board numbers default MACs per NIC
    assert nic.backend.ifname is None and nic.backend.netns is None and nic.backend.bridge is None
    assert (nic.queues, nic.queue_size, nic.mtu) == (1, 256, None)
    assert nic.packed
    assert parse_config({}).nic == []  # no [[nic]]: no NICs


@pytest.mark.parametrize(("queues", "mtu"), [(1, 68), (16, 65535)])
def test_nic_limits_are_accepted(queues: int, mtu: int) -> None:
    (nic,) = parse_config(nic_doc(queues=queues, mtu=mtu)).nic
    assert (nic.queues, nic.mtu) == (queues, mtu)


NIC_REJECTED: list[tuple[str, dict[str, Any], str, str]] = [
    ("unknown model", nic_doc(model="rtl8139"), "nic.0.model", "'virtio-net'"),
    ("model missing", {"nic": [{"backend": {"kind": "tap"}}]}, "nic.0.model", "missing"),
    ("backend missing", {"nic": [{"model": "virtio-net"}]}, "nic.0.backend", "missing"),
    ("unknown backend kind", nic_doc(backend={"kind": "vde"}), "nic.0.backend", "'tap'"),
    ("backend without kind", nic_doc(backend={"ifname": "tap0"}), "nic.0.backend", "'kind'"),
    (
        "unknown key in backend",
        nic_doc(backend={"kind": "tap", "queues": 2}),
        "nic.0.backend.queues",
        "unknown key",
    ),
    ("unknown key in nic", nic_doc(vlan=5), "nic.0.vlan", "unknown key"),
    ("unknown transport", nic_doc(transport="ccw"), "nic.0.transport", "'pci'"),
    ("mac too short", nic_doc(mac="52:54:00:12:34"), "nic.0.mac", "not a MAC address"),
    ("mac with dashes", nic_doc(mac="52-54-00-12-34-56"), "nic.0.mac", "not a MAC address"),
    ("mac not hex", nic_doc(mac="52:54:00:12:34:zz"), "nic.0.mac", "not a MAC address"),
    ("mac without colons", nic_doc(mac="525400123456"), "nic.0.mac", "not a MAC address"),
    ("mac a number", nic_doc(mac=5), "nic.0.mac", "string"),
    ("multicast mac", nic_doc(mac="01:00:5e:00:00:01"), "nic.0.mac", "multicast"),
    ("broadcast mac", nic_doc(mac="ff:ff:ff:ff:ff:ff"), "nic.0.mac", "multicast"),
    (
        "ifname too long",
        nic_doc(backend={"kind": "tap", "ifname": "t" * 16}),
        "nic.0.backend.ifname",
        "not an interface name",
    ),
    (
        "ifname empty",
        nic_doc(backend={"kind": "tap", "ifname": ""}),
        "nic.0.backend.ifname",
        "not an interface name",
    ),
    (
        "ifname with a slash",
        nic_doc(backend={"kind": "tap", "ifname": "tap/0"}),
        "nic.0.backend.ifname",
        "not an interface name",
    ),
    (
        "ifname with spaces",
        nic_doc(backend={"kind": "tap", "ifname": " tap0"}),
        "nic.0.backend.ifname",
        "not an interface name",
    ),
    ("queues zero", nic_doc(queues=0), "nic.0.queues", "greater than or equal to 1"),
    ("queues too many", nic_doc(queues=17), "nic.0.queues", "less than or equal to 16"),
    ("queue_size odd", nic_doc(queue_size=100), "nic.0.queue_size", "power of two"),
    ("queue_size too big", nic_doc(queue_size=2048), "nic.0.queue_size", "between 4 and 1024"),
    ("mtu too small", nic_doc(mtu=67), "nic.0.mtu", "greater than or equal to 68"),
    ("mtu too big", nic_doc(mtu=65536), "nic.0.mtu", "less than or equal to 65535"),
    ("packed not a bool", nic_doc(packed="maybe"), "nic.0.packed", "boolean"),
    ("nic not a list", {"nic": {"model": "virtio-net"}}, "nic", "list"),
]


@pytest.mark.parametrize(
    ("document", "key", "fragment"),
    [r[1:] for r in NIC_REJECTED],
    ids=[r[0] for r in NIC_REJECTED],
)
def test_nic_errors_name_the_dotted_key(document: dict[str, Any], key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(document)
    err = exc.value
    assert err.key == key
    assert one_line(err).startswith(f"config: {key}: ")
    assert fragment in err.problem
    assert "Value error" not in str(err)


def test_second_nic_error_names_its_index() -> None:
    good = {"model": "virtio-net", "backend": {"kind": "tap"}}
    bad = {"model": "virtio-net", "backend": {"kind": "tap"}, "mac": "03:00:00:00:00:01"}
    with pytest.raises(ConfigError) as exc:
        parse_config({"nic": [good, bad]})
    assert exc.value.key == "nic.1.mac"


def test_load_config_with_a_nic(tmp_path: Path, kernel: Path) -> None:
    cfg = write(
        tmp_path,
        f'[vm]\nkernel = "{kernel}"\n\n[[nic]]\nmodel = "virtio-net"\n'
        'mac = "52:54:00:12:34:57"\nqueues = 2\n'
        'backend = { kind = "tap", ifname = "tap0", netns = "iovirt-test" }\n',
    )
    (nic,) = load_config(cfg).nic
    assert nic.mac == "52:54:00:12:34:57"
    assert nic.queues == 2
    assert (nic.backend.ifname, nic.backend.netns) == ("tap0", "iovirt-test")


# -- [display] and [[input]] --------------------------------------------------------------


def test_display_defaults_and_inputs() -> None:
    config = parse_config(
        {
            "display": {"vnc": ":1", "vram": "32M"},
            "input": [{"model": "ps2"}, {"model": "usb-tablet"}],
        }
    )
    assert config.display is not None
    assert config.display.model == "bochs-display" and config.display.vram == 32 << 20
    assert config.display.vnc == ":1" and config.display.password is None
    assert [i.model for i in config.input] == ["ps2", "usb-tablet"]
    assert parse_config({}).display is None


@pytest.mark.parametrize(
    ("data", "key", "words"),
    [
        ({"display": {"vnc": "no port"}}, "display.vnc", "host:port"),
        ({"display": {"vnc": "127.0.0.1:70000"}}, "display.vnc", "not a port number"),
        ({"display": {"vram": "3M"}}, "display.vram", "power of two"),
        ({"display": {"vram": "1G"}}, "display.vram", "between 1M and 256M"),
        ({"display": {"password": "much-too-long"}}, "display.password", "1 to 8 ASCII"),
        ({"display": {"password": ""}}, "display.password", "1 to 8 ASCII"),
        ({"input": [{"model": "ps3"}]}, "input.0.model", "'ps2'"),
        ({"input": [{"model": "ps2"}, {"model": "ps2"}]}, "input", "listed 2 times"),
    ],
)
def test_display_and_input_mistakes_name_the_key(
    data: dict[str, Any], key: str, words: str
) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert err.value.key == key
    assert words in str(err.value)
