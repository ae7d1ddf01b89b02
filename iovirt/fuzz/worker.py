"""The per-target fuzzing process, and the other jobs that need a process of their own.

``python -m iovirt.fuzz.worker JOB TARGET ...``, started by ``iovirt fuzz``:

* ``fuzz``: atheris (libFuzzer) over one Python target. atheris takes the process over,
  so every target gets its own. The device model modules are instrumented for coverage
  feedback; every exception or oracle violation is caught here, and each new crash
  signature is saved (input and traceback) in the crash folder and fuzzing goes on. Only
  what Python cannot catch (a hang past ``-timeout``, a fault in C code) ends the process,
  as a libFuzzer artifact. Progress lines (``#iovirt ...``) go to stderr every second.
* ``minimize``: shrink a crashing input while it keeps its crash signature (operations
  removed by delta debugging, then payloads cut), within a time budget.
* ``coverage``: replay inputs under coverage.py, started before any device model is
  imported, and write the line coverage of the target's model files as JSON.
* ``seeds``: write the target's hand-written seed inputs into a folder.

Only the standard library and :mod:`iovirt.fuzz` are imported at the top: device model
modules are imported after coverage or instrumentation is set up.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from iovirt.fuzz.harness import Target

PROGRESS_PREFIX = "#iovirt"
PROGRESS_INTERVAL_S = 1.0
# Crashes are saved as <signature slug>-<sha1 prefix>.bin with a .txt next to it.
CRASH_SUFFIX = ".bin"
NOTE_SUFFIX = ".txt"


def slug(signature: str) -> str:
    """A file-name-safe form of a crash signature."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", signature).strip("-")[:80]


def crash_name(signature: str, data: bytes) -> str:
    return f"{slug(signature)}-{hashlib.sha1(data).hexdigest()[:10]}"


def module_files(modules: Sequence[str]) -> dict[str, str]:
    """Source file of each module, found without importing the module itself."""
    out = {}
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ImportError(f"no module {name}")
        out[name] = spec.origin
    return out


def input_files(paths: Sequence[str]) -> list[Path]:
    """Every input file under ``paths`` (files as given, folders searched recursively;
    notes, READMEs and hidden files left out), sorted for a reproducible order."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(
                sorted(
                    f
                    for f in p.rglob("*")
                    if f.is_file()
                    and not f.name.startswith(".")
                    and f.suffix not in (NOTE_SUFFIX, ".md")
                )
            )
        elif p.is_file():
            out.append(p)
    return out


def crash_note(target_name: str, data: bytes, text: str) -> str:
    """The .txt stored next to a reproducer: what it is, the decoded program, the crash."""
    from iovirt.fuzz import ops
    from iovirt.fuzz.targets import make_target

    lines = [f"target: {target_name}", "replay: iovirt fuzz --replay <this .bin file>", ""]
    try:
        target = make_target(target_name)
        try:
            names = [name for name, _ in target.layout]
            sizes = [size for _, size in target.layout]
            program = ops.decode(data, sizes)
            lines.append(f"program ({len(program)} operations):")
            lines += [f"  {ops.describe(op, names, target.host_events)}" for op in program]
        finally:
            target.close()
    except Exception as e:  # the note is a courtesy; a failure here must not lose the crash
        lines.append(f"(could not decode the program: {e!r})")
    return "\n".join([*lines, "", text.rstrip(), ""])


# -- fuzz -----------------------------------------------------------------------------------


def _instrument(modules: Sequence[str]) -> int:
    """Add atheris coverage (and comparison) instrumentation to every function defined in
    ``modules`` (imported here). Returns how many functions were instrumented."""
    import gc
    import types

    import atheris  # type: ignore[import-untyped]

    for name in modules:
        importlib.import_module(name)
    wanted = set(modules)
    count = 0
    for obj in gc.get_objects():
        if isinstance(obj, types.FunctionType) and obj.__module__ in wanted:
            atheris.instrument_func(obj)
            count += 1
    return count


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def fuzz(
    target_name: str, crash_dir: Path, seed_dir: Path | None, libfuzzer_args: list[str]
) -> int:
    import atheris

    from iovirt.fuzz.harness import Runner, crash_signature, format_crash
    from iovirt.fuzz.targets import PYTHON_TARGETS, make_target

    logging.disable(logging.CRITICAL)  # the guest is noisy on purpose
    cls = PYTHON_TARGETS[target_name]
    functions = _instrument((*cls.modules, *cls.support_modules))
    target = make_target(target_name)
    if seed_dir is not None:
        write_seeds(target, seed_dir)
    runner = Runner(target)
    crash_dir.mkdir(parents=True, exist_ok=True)
    known = {p.name.rsplit("-", 1)[0] for p in crash_dir.glob(f"*{CRASH_SUFFIX}")}
    execs = 0
    crashes = 0
    started = time.monotonic()
    next_report = started + PROGRESS_INTERVAL_S
    print(
        f"{PROGRESS_PREFIX} start target={target_name} instrumented={functions}",
        file=sys.stderr,
        flush=True,
    )

    def test_one(data: bytes) -> None:
        nonlocal execs, crashes, next_report
        execs += 1
        try:
            runner.run(data)
        except Exception as e:  # every crash is recorded; fuzzing goes on
            signature = crash_signature(e)
            key = slug(signature)
            if key not in known:
                known.add(key)
                crashes += 1
                name = crash_name(signature, data)
                (crash_dir / f"{name}{CRASH_SUFFIX}").write_bytes(data)
                (crash_dir / f"{name}{NOTE_SUFFIX}").write_text(
                    f"signature: {signature}\n\n{format_crash(e)}"
                )
                print(
                    f"{PROGRESS_PREFIX} crash signature={signature} "
                    f"file={crash_dir / (name + CRASH_SUFFIX)}",
                    file=sys.stderr,
                    flush=True,
                )
        now = time.monotonic()
        if now >= next_report:
            next_report = now + PROGRESS_INTERVAL_S
            print(
                f"{PROGRESS_PREFIX} execs={execs} crashes={crashes} "
                f"elapsed={now - started:.1f} rss_mb={_rss_mb():.0f}",
                file=sys.stderr,
                flush=True,
            )

    atheris.Setup([sys.argv[0], *libfuzzer_args], test_one)
    atheris.Fuzz()
    return 0  # not reached: libFuzzer exits the process


# -- minimize -------------------------------------------------------------------------------


def minimize_input(target_name: str, data: bytes, signature: str, budget_s: float) -> bytes:
    """The smallest input found within ``budget_s`` that still crashes with ``signature``
    (``data`` itself if it does not crash that way)."""
    from iovirt.fuzz import ops
    from iovirt.fuzz.harness import REPLAY_DEADLINE_S, Runner, crash_signature
    from iovirt.fuzz.ops import Op
    from iovirt.fuzz.targets import make_target

    logging.disable(logging.CRITICAL)
    target = make_target(target_name)
    runner = Runner(target, deadline_s=REPLAY_DEADLINE_S)
    deadline = time.monotonic() + budget_s

    def fails(program: Sequence[Op]) -> bool:
        try:
            runner.run_ops(program)
        except Exception as e:
            return crash_signature(e) == signature
        return False

    try:
        program = runner.decode(data)
        if not fails(program):
            return data
        # Delta debugging over operations: drop chunks while the crash stays.
        chunks = 2
        while len(program) > 1 and time.monotonic() < deadline:
            size = -(-len(program) // chunks)
            for start in range(0, len(program), size):
                candidate = program[:start] + program[start + size :]
                if fails(candidate):
                    program = candidate
                    chunks = max(chunks - 1, 2)
                    break
                if time.monotonic() >= deadline:
                    break
            else:
                if chunks >= len(program):
                    break
                chunks = min(2 * chunks, len(program))
        # Then payloads: halve each one while the crash stays.
        for i in range(len(program)):
            while program[i].data and time.monotonic() < deadline:
                op = program[i]
                shorter = Op(
                    op.kind,
                    op.region,
                    op.offset,
                    op.size,
                    op.value,
                    op.mode,
                    op.data[: len(op.data) // 2],
                )
                candidate = [*program[:i], shorter, *program[i + 1 :]]
                if not fails(candidate):
                    break
                program = candidate
        result = ops.encode(program)
        return result if fails(runner.decode(result)) else data
    finally:
        target.close()


# -- coverage -------------------------------------------------------------------------------


def measure_coverage(target_name: str, paths: Sequence[str]) -> dict[str, dict[str, object]]:
    """Line coverage of the target's model files after replaying every input under
    ``paths`` (coverage starts before the models are imported)."""
    import coverage

    from iovirt.fuzz.targets import PYTHON_TARGETS

    logging.disable(logging.CRITICAL)
    files = module_files(PYTHON_TARGETS[target_name].modules)
    cov = coverage.Coverage(data_file=None, include=list(files.values()), config_file=False)
    cov.start()
    inputs = 0
    try:
        from iovirt.fuzz.harness import REPLAY_DEADLINE_S, Runner
        from iovirt.fuzz.targets import make_target

        target = make_target(target_name)
        runner = Runner(target, deadline_s=REPLAY_DEADLINE_S)
        for path in input_files(paths):
            inputs += 1
            # Crashes are the fuzzing run's to report; here only the lines count.
            with contextlib.suppress(Exception):
                runner.run(path.read_bytes())
        target.close()
    finally:
        cov.stop()
    report: dict[str, dict[str, object]] = {}
    for module, source in files.items():
        _, statements, _, missing, _ = cov.analysis2(source)
        covered = len(statements) - len(missing)
        report[module] = {
            "file": os.path.relpath(source),
            "statements": len(statements),
            "covered": covered,
            "percent": round(100.0 * covered / max(len(statements), 1), 1),
            "missing": missing,
            "inputs": inputs,
        }
    return report


# -- seeds ----------------------------------------------------------------------------------


def write_seeds(target: Target, folder: Path) -> int:
    """Replace the seed files in ``folder`` with ``target``'s seeds; how many."""
    from iovirt.fuzz import ops

    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("seed-*"):
        old.unlink()
    seeds = [ops.encode(program) for program in target.seeds()]
    for i, data in enumerate(seeds):
        (folder / f"seed-{i:02d}").write_bytes(data)
    return len(seeds)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m iovirt.fuzz.worker")
    sub = parser.add_subparsers(dest="job", required=True)
    f = sub.add_parser("fuzz")
    f.add_argument("target")
    f.add_argument("--crash-dir", required=True)
    f.add_argument("--seed-dir", help="write the target's seeds here first")
    m = sub.add_parser("minimize")
    m.add_argument("target")
    m.add_argument("input")
    m.add_argument("--signature", required=True)
    m.add_argument("--output", required=True)
    m.add_argument("--time", type=float, default=30.0)
    c = sub.add_parser("coverage")
    c.add_argument("target")
    c.add_argument("paths", nargs="*")
    c.add_argument("--json", required=True)
    s = sub.add_parser("seeds")
    s.add_argument("target")
    s.add_argument("folder")
    from iovirt.fuzz.targets import load_extra_targets

    load_extra_targets()
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after "--" goes to libFuzzer untouched.
    libfuzzer = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if args.job == "fuzz":
        seed_dir = None if args.seed_dir is None else Path(args.seed_dir)
        return fuzz(args.target, Path(args.crash_dir), seed_dir, libfuzzer)
    if args.job == "minimize":
        data = Path(args.input).read_bytes()
        smaller = minimize_input(args.target, data, args.signature, args.time)
        Path(args.output).write_bytes(smaller)
        return 0
    if args.job == "coverage":
        report = measure_coverage(args.target, args.paths)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        return 0
    from iovirt.fuzz.targets import make_target

    target = make_target(args.target)
    try:
        print(write_seeds(target, Path(args.folder)))
    finally:
        target.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
