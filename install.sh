#!/usr/bin/env bash
# Installs everything iovirt needs on a fresh Debian 12 machine (run as root):
# Debian packages, a venv in .venv, the package in editable mode with its C extension.
set -euo pipefail
cd "$(dirname "$0")"

DEBIAN_PACKAGES=(
    # build and run: Python, the C compiler for the cffi extension, GNU as/ld for guest programs
    python3 python3-venv python3-dev gcc libc6-dev linux-libc-dev libffi-dev binutils util-linux
    # the lab and stock guests: QEMU (TCG) for the lab, Debian's kernel and modules for both
    # the lab and nested guests, busybox and cpio for their initramfs
    qemu-system-x86 qemu-utils linux-image-amd64 busybox-static cpio kmod
    # tests: iasl disassembles and recompiles our ACPI tables (tests/unit/test_acpi.py)
    acpica-tools
    # fuzzing: clang builds the libFuzzer target of the C virtqueue engine (ASan+UBSan)
    clang llvm libclang-rt-14-dev
    # vhost-user peers: DPDK's testpmd (net_virtio_user, net_vhost); qemu-storage-daemon
    # comes with qemu-system-x86 (qemu-system-common)
    dpdk
    # iovirt host pci: PCI vendor and device names
    pci.ids
)

missing=()
for p in "${DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "install.sh: Debian packages missing (${missing[*]}); run as root to apt-get install them" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Debian's own Python: its headers match python3-dev, whatever other Pythons are on PATH.
if [ ! -x .venv/bin/python ]; then
    /usr/bin/python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel cffi
.venv/bin/python -m pip install -q -e '.[test]'
# Fail here, not in the first test, if the C extension did not build.
.venv/bin/python -c 'import iovirt._native'
# The bundled examples' guest images: a busybox initramfs for Debian's kernel with the
# virtio-blk driver and a disk image (examples/minimal.toml), and the real-mode firmware
# of examples/hello.toml.
mkdir -p build
.venv/bin/iovirt initramfs -m virtio_blk -m virtio_pci -o build/guest-initrd.img
# The example's virtio-blk disk: a sparse raw image (kept if it exists: it is the guest's).
[ -f build/example-disk.img ] || truncate -s 64M build/example-disk.img
.venv/bin/python -m iovirt.testing.asm examples/hello.S build/hello-firmware.bin
echo "install.sh: ready (.venv/bin/iovirt)"
