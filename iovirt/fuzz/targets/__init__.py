"""The fuzz targets: one per device model, each a small factory plus its oracles.

Every target builds its device the way the board does, on a throwaway host side: a
:class:`~iovirt.backends.net.SocketPairNetBackend` whose peer end this process holds instead
of a tap, a :class:`~iovirt.backends.block.FileBlockBackend` on a temporary file (in
/dev/shm, so FUA and flushes cost nothing), recording interrupt lines, a fake clock. PCI
functions sit on a :class:`~iovirt.bus.pci.PciRoot` with their BARs placed and decoding
enabled, as firmware leaves them; the fuzzer may reprogram all of it through config space.

One module per family: :mod:`.legacy` (UART, RTC, ACPI sleep, debug-exit, i8042),
:mod:`.display` (bochs-display), :mod:`.usb` (xHCI with USB HID), :mod:`.nic` (e1000),
:mod:`.storage` (AHCI), :mod:`.virtio` (virtio-blk/-net over PCI and MMIO) and
:mod:`.native` (the libFuzzer binaries over the C data path).

Device model modules are imported inside the targets, never at the top of these modules:
coverage measurement starts before the first import of a model.
"""

from __future__ import annotations

import importlib
import os

from iovirt.fuzz.harness import FuzzMemory, Target
from iovirt.fuzz.targets.display import BochsDisplayTarget
from iovirt.fuzz.targets.legacy import (
    AcpiPmTarget,
    DebugExitTarget,
    I8042Target,
    RtcTarget,
    SerialTarget,
)
from iovirt.fuzz.targets.native import CTarget, blk_c_seeds, virtqueue_c_seeds
from iovirt.fuzz.targets.nic import E1000Target, check_vnet_frame
from iovirt.fuzz.targets.storage import AhciTarget, ata_write_range
from iovirt.fuzz.targets.usb import XhciTarget
from iovirt.fuzz.targets.virtio import (
    VirtioBlkMmioTarget,
    VirtioBlkPciTarget,
    VirtioNetMmioTarget,
    VirtioNetPciTarget,
)

__all__ = [
    "C_TARGETS",
    "EXTRA_TARGETS_ENV",
    "PYTHON_TARGETS",
    "CTarget",
    "ata_write_range",
    "check_vnet_frame",
    "load_extra_targets",
    "make_target",
    "target_names",
]

PYTHON_TARGETS: dict[str, type[Target]] = {
    t.name: t
    for t in (
        SerialTarget,
        RtcTarget,
        AcpiPmTarget,
        DebugExitTarget,
        I8042Target,
        BochsDisplayTarget,
        XhciTarget,
        E1000Target,
        AhciTarget,
        VirtioBlkPciTarget,
        VirtioBlkMmioTarget,
        VirtioNetPciTarget,
        VirtioNetMmioTarget,
    )
}

C_TARGETS: dict[str, CTarget] = {
    t.name: t
    for t in (
        CTarget(
            "virtqueue-c",
            "the C virtqueue engine (csrc/virtqueue.c): split and packed rings, ASan+UBSan",
            "csrc/virtqueue.c",
            "csrc/fuzz/build.sh",
            "build/fuzz/virtqueue_fuzz",
            virtqueue_c_seeds,
        ),
        CTarget(
            "blk-c",
            "the C virtio-blk data path (csrc/blk.c): requests against a memfd, ASan+UBSan",
            "csrc/blk.c",
            "csrc/fuzz/build.sh",
            "build/fuzz/blk_fuzz",
            blk_c_seeds,
        ),
    )
}


# Extra targets to register, "module:Class,...": out-of-tree device models, and the test
# suite's deliberately broken devices (the fuzzing workers inherit the variable).
EXTRA_TARGETS_ENV = "IOVIRT_FUZZ_TARGETS"


def load_extra_targets() -> None:
    """Register the targets named in $IOVIRT_FUZZ_TARGETS (see :data:`EXTRA_TARGETS_ENV`)."""
    for item in os.environ.get(EXTRA_TARGETS_ENV, "").split(","):
        module, _, class_name = item.strip().partition(":")
        if module and class_name:
            cls = getattr(importlib.import_module(module), class_name)
            PYTHON_TARGETS[cls.name] = cls


def target_names() -> list[str]:
    """Every target, Python ones first, in registry order."""
    return [*PYTHON_TARGETS, *C_TARGETS]


def make_target(name: str, memory: FuzzMemory | None = None) -> Target:
    """A ready Python target (its per-process resources made)."""
    cls = PYTHON_TARGETS.get(name)
    if cls is None:
        raise KeyError(name)
    return cls(memory if memory is not None else FuzzMemory())
