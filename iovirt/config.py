"""The VM config file (TOML): schema, validation, and one-line errors.

The shape follows DESIGN.md: ``[vm]`` for the machine, then one table per device class.
Every problem is reported as a :class:`~iovirt.errors.ConfigError` naming the dotted key
(``vm.memory``, ``serial.backend.path``) and what is wrong, so ``iovirt check`` and
``iovirt run`` can print it as one line. Relative paths are taken relative to the current
directory, as QEMU and Firecracker do.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from iovirt.backends.vnc import parse_vnc_address
from iovirt.errors import ConfigError

_SIZE_RE = re.compile(r"^\s*(\d+)\s*(?:([KMGT])(?:i?B)?|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(value: object) -> int:
    """``512M``, ``2G``, ``1048576`` -> bytes (binary units, as QEMU reads ``-m``)."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 512M or 2G")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value} is negative; a size is a positive number of bytes")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            return int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").upper()]
    raise ValueError(f"{value!r} is not a size; write it like 512M or 2G")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VmSection(_Strict):
    """``[vm]``: the machine itself."""

    memory: int = 256 << 20
    vcpus: Annotated[int, Field(ge=1, le=254)] = 1
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str = "console=ttyS0"
    firmware: Path | None = None
    debug_exit: bool = False

    @field_validator("memory", mode="before")
    @classmethod
    def _size(cls, v: object) -> int:
        size = parse_size(v)
        if size < 1 << 20:
            raise ValueError(f"{size} bytes is too little; give at least 1M")
        if size % 4096:
            raise ValueError(f"{size} bytes is not a multiple of 4K")
        return size


class StdioChar(_Strict):
    kind: Literal["stdio"]
    input: bool = True


class FileChar(_Strict):
    kind: Literal["file"]
    path: Path
    append: bool = False


class SocketChar(_Strict):
    kind: Literal["socket"]
    path: Path


class PtyChar(_Strict):
    kind: Literal["pty"]


class NullChar(_Strict):
    kind: Literal["null"]


CharBackendConfig = Annotated[
    StdioChar | FileChar | SocketChar | PtyChar | NullChar, Field(discriminator="kind")
]


class SerialSection(_Strict):
    """``[serial]``: COM1 (0x3f8, IRQ 4) and where its bytes go."""

    backend: CharBackendConfig = StdioChar(kind="stdio")
    log: Path | None = None


def _queue_size(v: int) -> int:
    """A virtqueue size the transports offer: a power of two, 4-1024."""
    if not 4 <= v <= 1024 or v & (v - 1):
        raise ValueError(f"{v} is not a power of two between 4 and 1024")
    return v


QueueSize = Annotated[int, AfterValidator(_queue_size)]


class FileBlock(_Strict):
    """``backend = { kind = "file", ... }``: a raw image file (or block device node)."""

    kind: Literal["file"]
    path: Path
    readonly: bool = False
    direct: bool = False  # O_DIRECT: bypass the host page cache


class VhostUserBackend(_Strict):
    """``backend = { kind = "vhost-user", socket = "..." }``: another process (a vhost-user
    back-end such as qemu-storage-daemon, DPDK or ``iovirt vhost-user``) serves the rings."""

    kind: Literal["vhost-user"]
    socket: Path


BlockBackendConfig = Annotated[FileBlock | VhostUserBackend, Field(discriminator="kind")]


class DiskSection(_Strict):
    """``[[disk]]``: one disk; ``model`` is what the guest sees, ``backend`` what the host gives."""

    model: Literal["virtio-blk", "ahci"]
    transport: Literal["pci", "mmio"] = "pci"  # for virtio models: virtio-pci or virtio-mmio
    backend: BlockBackendConfig
    serial: str = ""
    queues: Annotated[int, Field(ge=1, le=64)] = 1
    queue_size: QueueSize = 256
    packed: bool = True  # offer VIRTIO_F_RING_PACKED (the driver may still choose split)
    discard: bool = True  # offer discard and write-zeroes (read-write disks only)
    block_size: int = 512

    @field_validator("serial")
    @classmethod
    def _serial(cls, v: str) -> str:
        if not v.isascii() or len(v) > 20:
            raise ValueError("at most 20 ASCII characters (VIRTIO_BLK_ID_BYTES)")
        return v

    @field_validator("block_size")
    @classmethod
    def _block_size(cls, v: int) -> int:
        if not 512 <= v <= 65536 or v & (v - 1):
            raise ValueError(f"{v} is not a power of two between 512 and 65536")
        return v


class TapNet(_Strict):
    """``backend = { kind = "tap", ... }``: a tap device, opened or created."""

    kind: Literal["tap"]
    ifname: str | None = None  # None: the kernel names it (tapN)
    netns: str | None = None  # the network namespace the tap lives in (must exist)
    bridge: str | None = None  # attach the tap to this bridge (in the same netns)

    @field_validator("ifname")
    @classmethod
    def _ifname(cls, v: str | None) -> str | None:
        if v is not None and (not 1 <= len(v) <= 15 or "/" in v or v.strip() != v):
            raise ValueError(f"{v!r} is not an interface name (1-15 characters, no '/')")
        return v


NetBackendConfig = Annotated[TapNet | VhostUserBackend, Field(discriminator="kind")]

_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


class NicSection(_Strict):
    """``[[nic]]``: one network card."""

    model: Literal["virtio-net", "e1000"]
    transport: Literal["pci", "mmio"] = "pci"  # for virtio models
    mac: str | None = None  # default: 52:54:00:12:34:56 plus the NIC's index
    backend: NetBackendConfig
    queues: Annotated[int, Field(ge=1, le=16)] = 1  # queue pairs (VIRTIO_NET_F_MQ if > 1)
    queue_size: QueueSize = 256
    packed: bool = True
    mtu: Annotated[int, Field(ge=68, le=65535)] | None = None

    @field_validator("mac")
    @classmethod
    def _mac(cls, v: str | None) -> str | None:
        if v is not None:
            if not _MAC_RE.match(v):
                raise ValueError(f"{v!r} is not a MAC address like 52:54:00:12:34:56")
            if int(v[:2], 16) & 1:
                raise ValueError(f"{v} is a multicast address; a NIC needs a unicast MAC")
        return v


class DisplaySection(_Strict):
    """``[display]``: the guest's screen, and the VNC server that shows it."""

    model: Literal["bochs-display"] = "bochs-display"
    vram: int = 16 << 20  # video memory (BAR0); a power of two, 1M-256M
    vnc: str | None = "127.0.0.1:5900"  # host:port, host::port or :N (port 5900+N); None: off
    password: str | None = None  # VNC authentication (RFB's DES challenge: 8 characters used)

    @field_validator("vram", mode="before")
    @classmethod
    def _vram(cls, v: object) -> int:
        size = parse_size(v)
        if not 1 << 20 <= size <= 256 << 20 or size & (size - 1):
            raise ValueError(f"{size} bytes is not a power of two between 1M and 256M")
        return size

    @field_validator("vnc")
    @classmethod
    def _vnc(cls, v: str | None) -> str | None:
        if v is not None:
            parse_vnc_address(v)  # raises a ValueError that names the problem
        return v

    @field_validator("password")
    @classmethod
    def _password(cls, v: str | None) -> str | None:
        if v is not None and (not v or not v.isascii() or len(v) > 8):
            raise ValueError("VNC passwords are 1 to 8 ASCII characters (RFB's DES key)")
        return v


class InputSection(_Strict):
    """``[[input]]``: an input device that VNC's keyboard and pointer events reach."""

    model: Literal["ps2", "usb-keyboard", "usb-tablet"]


class PassthroughSection(_Strict):
    """``[[passthrough]]``: a host PCI device handed to the guest through VFIO."""

    host: str  # the device's PCI address, e.g. "0000:00:04.0"; it must be bound to vfio-pci
    # The host's VFIO interface: "auto" takes iommufd + the VFIO cdev where the kernel has
    # both (Linux 6.6+), else the type1 container; all [[passthrough]] entries share one.
    iommu: Literal["auto", "iommufd", "type1"] = "auto"

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        from iovirt.vfio.host import normalize_bdf

        return normalize_bdf(v)  # its ValueError names the problem


class VmConfig(_Strict):
    """A whole config file."""

    vm: VmSection = VmSection()
    serial: SerialSection = SerialSection()
    disk: list[DiskSection] = []
    nic: list[NicSection] = []
    display: DisplaySection | None = None
    input: list[InputSection] = []
    passthrough: list[PassthroughSection] = []

    @field_validator("input")
    @classmethod
    def _inputs(cls, v: list[InputSection]) -> list[InputSection]:
        models = [i.model for i in v]
        for model in set(models):
            if models.count(model) > 1:
                raise ValueError(f"{model!r} is listed {models.count(model)} times; once is enough")
        return v


_BACKEND_KINDS = ("stdio", "file", "socket", "pty", "null", "tap", "vhost-user")


def _key_of(loc: tuple[int | str, ...]) -> str:
    # pydantic puts the discriminator value into the location of a tagged union
    # ("serial.backend.file.path"); users wrote "serial.backend.path".
    parts = [str(p) for p in loc]
    out: list[str] = []
    for i, p in enumerate(parts):
        if i > 0 and parts[i - 1] == "backend" and p in _BACKEND_KINDS:
            continue
        out.append(p)
    return ".".join(out) or "(top level)"


def _problem_of(err: Any) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return "unknown key (check the spelling; see docs/config.md)"
    if kind == "missing":
        return "required key is missing"
    if kind == "union_tag_invalid":
        return f"unknown kind {err['input'].get('kind')!r}; expected {err['ctx']['expected_tags']}"
    if kind == "union_tag_not_found":
        return "needs a 'kind' key"
    msg = str(err["msg"])
    return msg.removeprefix("Value error, ")


def parse_config(data: dict[str, Any]) -> VmConfig:
    """Validate a decoded TOML document; raise ConfigError on the first problem."""
    try:
        return VmConfig.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        raise ConfigError(_key_of(first["loc"]), _problem_of(first)) from e


def load_config(path: str | Path) -> VmConfig:
    """Read, parse and validate a config file, checking that the files it names exist."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError as e:
        raise ConfigError(str(p), "no such config file") from e
    except UnicodeDecodeError as e:
        raise ConfigError(str(p), "not valid TOML: the file is not UTF-8 text") from e
    except OSError as e:
        raise ConfigError(str(p), f"cannot read: {e.strerror}") from e
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(p), f"not valid TOML: {e}") from e
    config = parse_config(data)
    vm = config.vm
    if (vm.kernel is None) == (vm.firmware is None):
        raise ConfigError("vm.kernel", "give exactly one of vm.kernel (Linux) or vm.firmware")
    if vm.initrd is not None and vm.kernel is None:
        raise ConfigError("vm.initrd", "an initrd needs vm.kernel")
    files: dict[str, Path | None] = {
        "kernel": vm.kernel,
        "initrd": vm.initrd,
        "firmware": vm.firmware,
    }
    for key, file in files.items():
        if file is not None and not file.is_file():
            raise ConfigError(f"vm.{key}", f"{file}: no such file")
    for i, disk in enumerate(config.disk):
        if isinstance(disk.backend, FileBlock) and not disk.backend.path.exists():
            raise ConfigError(
                f"disk.{i}.backend.path",
                f"{disk.backend.path}: no such file; create it (e.g. truncate -s 1G FILE)",
            )
    return config
