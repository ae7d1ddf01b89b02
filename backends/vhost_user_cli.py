"""``iovirt vhost-user blk|net``: run a vhost-user back-end on a UNIX socket.

::

    iovirt vhost-user blk --socket /run/vu-blk.sock --file disk.img [--readonly] [--queues N]
    iovirt vhost-user net --socket /run/vu-net.sock --tap tap0 [--netns NS] [--queues N]

The back-end serves one front-end at a time (QEMU with ``-chardev socket,path=...`` and
``vhost-user-blk-pci`` / ``-netdev vhost-user``, DPDK's ``net_virtio_user``, or iovirt's
VMM with ``backend = { kind = "vhost-user", socket = "..." }``) and waits for the next one
when it goes; SIGINT or SIGTERM end it. Wire it into a parser with :func:`register`; run
it alone with ``python -m iovirt.backends.vhost_user_cli``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from iovirt.backends.block import FileBlockBackend
from iovirt.backends.net import NetBackend
from iovirt.backends.tap import TapBackend
from iovirt.backends.vhost_user_server import (
    BackendDevice,
    VhostUserBlkDevice,
    VhostUserNetDevice,
    VhostUserServer,
)
from iovirt.errors import IovirtError, UserError
from iovirt.virtio.blk import BlkOptions

log = logging.getLogger("iovirt.vhost-user")


def _queue_size(text: str) -> int:
    n = int(text)
    if not 4 <= n <= 1024 or n & (n - 1):
        raise argparse.ArgumentTypeError(f"{n} is not a power of two between 4 and 1024")
    return n


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``vhost-user blk`` and ``vhost-user net`` to an ``iovirt`` parser."""
    top = subparsers.add_parser(
        "vhost-user",
        help="run a vhost-user back-end (virtio-blk on a file, virtio-net on a tap)",
        description="Serve a virtio device's rings for a vhost-user front-end (QEMU, DPDK, "
        "iovirt) with iovirt's C data path.",
    )
    kinds = top.add_subparsers(dest="device", required=True)

    blk = kinds.add_parser("blk", help="virtio-blk on a raw image file")
    blk.add_argument("--socket", required=True, help="UNIX socket to listen on")
    blk.add_argument("--file", required=True, help="raw disk image (or block device)")
    blk.add_argument("--readonly", action="store_true", help="offer a read-only disk")
    blk.add_argument("--direct", action="store_true", help="open the image with O_DIRECT")
    blk.add_argument("--queues", type=int, default=1, help="virtqueues (default 1)")
    blk.add_argument("--queue-size", type=_queue_size, default=256, help="ring size offered")
    blk.add_argument("--serial", default="", help="serial number (20 ASCII characters at most)")
    blk.set_defaults(func=main)

    net = kinds.add_parser("net", help="virtio-net on a tap device")
    net.add_argument("--socket", required=True, help="UNIX socket to listen on")
    net.add_argument("--tap", default=None, help="tap interface name (created if missing)")
    net.add_argument("--netns", default=None, help="network namespace of the tap")
    net.add_argument("--bridge", default=None, help="bridge to attach the tap to")
    net.add_argument("--queues", type=int, default=1, help="queue pairs (default 1)")
    net.set_defaults(func=main)


def _device(args: argparse.Namespace) -> tuple[BackendDevice, Callable[[], None]]:
    if args.device == "blk":
        if not 1 <= args.queues <= 64:
            raise UserError(f"--queues {args.queues}: give 1-64")
        if len(args.serial) > 20 or not args.serial.isascii():
            raise UserError("--serial: at most 20 ASCII characters")
        disk = FileBlockBackend(args.file, readonly=args.readonly, direct=args.direct)
        options = BlkOptions(
            serial=args.serial.encode(), num_queues=args.queues, queue_size=args.queue_size
        )
        try:
            return VhostUserBlkDevice(disk, options), disk.close
        except BaseException:
            disk.close()
            raise
    if not 1 <= args.queues <= 16:
        raise UserError(f"--queues {args.queues}: give 1-16")
    tap: NetBackend = TapBackend(args.tap, netns=args.netns, bridge=args.bridge, queues=args.queues)
    try:
        return VhostUserNetDevice(tap, args.queues), tap.close
    except BaseException:
        tap.close()
        raise


def main(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; 0 then. User mistakes raise UserError (one line)."""
    device, close_backend = _device(args)
    try:
        with VhostUserServer(args.socket, device) as server:
            server.install_signal_handlers()
            log.info("serving %s on %s", device.name, args.socket)
            print(f"iovirt vhost-user {args.device}: listening on {args.socket}", flush=True)
            server.serve_forever()
    finally:
        close_backend()
    return 0


def _standalone(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="iovirt")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["vhost-user", *(sys.argv[1:] if argv is None else argv)])
    level = logging.DEBUG if os.environ.get("IOVIRT_VHOST_USER_DEBUG") else logging.INFO
    logging.basicConfig(level=level, format="iovirt: %(name)s: %(message)s")
    try:
        return main(args)
    except IovirtError as e:
        print(f"iovirt: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(_standalone())
