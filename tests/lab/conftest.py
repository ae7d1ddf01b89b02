"""Lab tier: tests that boot the lab VM (QEMU TCG with a real /dev/kvm, see docs/lab.md).

There is no skip here: a machine without QEMU, the Debian kernel or busybox fails these
tests with lab_available()'s one-line reason, so CI cannot pass with the tier missing.
Each boot costs seconds, so tests share boots: batch checks into one command per fixture.
"""

from __future__ import annotations

import pytest

from iovirt.lab import Lab, lab_available


@pytest.fixture(scope="session")
def lab() -> Lab:
    reason = lab_available()
    if reason is not None:
        pytest.fail(f"the lab cannot run here: {reason}", pytrace=False)
    return Lab()
