"""Debug-exit port: a one-byte port whose write ends the VM with the written value as the
guest's exit status.

Firmware, test programs and fuzz harnesses use it to report a verdict without a full
power-management stack (QEMU offers the same idea as ``isa-debug-exit``; this one passes
the value through unchanged rather than QEMU's ``(value << 1) | 1``). The port is at
:data:`DEBUG_EXIT_PORT` and is only present when the config asks for it.
"""

from __future__ import annotations

from collections.abc import Callable

DEBUG_EXIT_PORT = 0x501
DEBUG_EXIT_SIZE = 1


class DebugExit:
    """Calls ``on_exit(value)`` when the guest writes ``value`` to the port; reads give 0."""

    def __init__(self, on_exit: Callable[[int], None]) -> None:
        self._on_exit = on_exit

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self._on_exit(value & 0xFF)
