"""The iovirt exception tree.

Every error iovirt raises on purpose derives from :class:`IovirtError`. Classes carry the
fields a caller needs (the key, the resource, the address) and wrap the lower layer's
exception with ``raise ... from``. :class:`UserError` and its children are mistakes a user
can fix; the CLI prints their message as one line, without a traceback.
"""

from __future__ import annotations


class IovirtError(Exception):
    """Root of every error iovirt raises on purpose."""


class UserError(IovirtError):
    """A mistake the user can fix (config, permissions, missing resource).

    ``str(err)`` is a single line that names the key or resource and what to do.
    """


def one_line(text: str) -> str:
    """``text`` with newlines and other control characters escaped, so that a message
    that quotes user input (a path, a key) still prints as one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class ConfigError(UserError):
    """The VM config is invalid: ``key`` names the offending setting."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(one_line(f"config: {key}: {problem}"))


class ResourceError(UserError):
    """A host resource is missing or not usable (``resource`` names it)."""

    def __init__(self, resource: str, problem: str) -> None:
        self.resource = resource
        self.problem = problem
        super().__init__(one_line(f"{resource}: {problem}"))


class GuestMemoryError(IovirtError):
    """A guest-physical range is not entirely inside guest RAM.

    Raised before any host memory is touched; devices turn it into a device error.
    """

    def __init__(self, gpa: int, length: int, reason: str = "outside guest RAM") -> None:
        self.gpa = gpa
        self.length = length
        super().__init__(f"guest range [{gpa:#x}, +{length:#x}) {reason}")


class BusError(IovirtError):
    """A bus registration conflict (overlap, empty range)."""


class KvmError(IovirtError):
    """A KVM ioctl failed. ``op`` names the ioctl, ``errno`` is the kernel's error."""

    def __init__(self, op: str, errno: int, detail: str = "") -> None:
        import os

        self.op = op
        self.errno = errno
        msg = f"{op} failed: {os.strerror(errno)}"
        super().__init__(f"{msg} ({detail})" if detail else msg)


class GuestError(IovirtError):
    """The guest stopped in a way that cannot go on: triple fault, emulation failure,
    failed entry. The message names the vCPU, the reason and the registers that matter."""

    def __init__(self, vcpu: int, reason: str) -> None:
        self.vcpu = vcpu
        self.reason = reason
        super().__init__(f"vCPU {vcpu}: {reason}")
