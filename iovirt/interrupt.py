"""Interrupt lines as device models see them.

A device model raises and lowers its line through this protocol and never learns whether
the line ends at KVM's in-kernel irqchip (KVM_IRQ_LINE), an irqfd, or a test recorder.
"""

from __future__ import annotations

from typing import Protocol


class Interrupt(Protocol):
    """One interrupt line, level semantics (ISA devices and PCI INTx both are level)."""

    def set_level(self, level: bool) -> None:
        """Drive the line high (asserted) or low. Repeating the current level is harmless."""
        ...


class RecordingInterrupt:
    """An :class:`Interrupt` that remembers its level and every transition.

    Used by unit tests (and the fuzzer) to check a device's interrupt logic at the
    register level without a VM.
    """

    def __init__(self) -> None:
        self.level = False
        self.transitions: list[bool] = []

    def set_level(self, level: bool) -> None:
        if level != self.level:
            self.transitions.append(level)
        self.level = level
