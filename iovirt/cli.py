"""``iovirt`` command line: ``run`` a VM from a config file, ``check`` a config.

User mistakes (a bad config, a missing /dev/kvm, a permission) end with one line on stderr
that names the key or resource and what to do, and exit status 1; never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from iovirt import __version__
from iovirt.config import load_config
from iovirt.errors import IovirtError, UserError
from iovirt.machine import build_vm

log = logging.getLogger("iovirt")


def _cmd_check(args: argparse.Namespace) -> int:
    load_config(args.config)
    print(f"{args.config}: ok")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    with build_vm(config) as vm:
        result = vm.run(timeout=args.timeout)
    if result.error is not None:
        print(f"iovirt: {result.error}", file=sys.stderr)
    elif result.reason.value == "timeout":
        print(f"iovirt: guest still running after {args.timeout} s; stopped it", file=sys.stderr)
    else:
        log.info("guest ended: %s (status %d)", result.reason.value, result.exit_status)
    return result.exit_status


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iovirt", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"iovirt {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log more (-v: info, -vv: debug)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="boot a VM from a config file")
    run.add_argument("config", help="TOML config file")
    run.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="stop the guest after this many seconds (exit status 1)",
    )
    run.set_defaults(func=_cmd_run)

    check = sub.add_parser("check", help="validate a config file without running it")
    check.add_argument("config", help="TOML config file")
    check.set_defaults(func=_cmd_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="iovirt: %(name)s: %(message)s")
    try:
        status: int = args.func(args)
    except UserError as e:
        print(f"iovirt: {e}", file=sys.stderr)
        return 1
    except IovirtError as e:
        # Not the user's fault, but still one line; -vv shows the traceback.
        log.debug("details", exc_info=True)
        print(f"iovirt: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
