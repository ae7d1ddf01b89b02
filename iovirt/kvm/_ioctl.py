"""ioctl plumbing shared by the KVM wrappers: call through the C helpers (which release
the GIL) and turn a negative return into a :class:`~iovirt.errors.KvmError` naming the ioctl."""

from __future__ import annotations

from typing import Any

from iovirt._native import ffi, lib

__all__ = ["ffi", "ioctl_int", "ioctl_ptr", "lib"]
from iovirt.errors import KvmError


def ioctl_ptr(fd: int, request: int, arg: Any, op: str) -> int:
    """ioctl with a pointer argument (a cffi cdata); returns the ioctl's non-negative result."""
    ret: int = lib.iovirt_ioctl_ptr(fd, request, arg)
    if ret < 0:
        raise KvmError(op, -ret)
    return ret


def ioctl_int(fd: int, request: int, arg: int, op: str) -> int:
    """ioctl with an integer argument; returns the ioctl's non-negative result."""
    ret: int = lib.iovirt_ioctl_int(fd, request, arg)
    if ret < 0:
        raise KvmError(op, -ret)
    return ret
