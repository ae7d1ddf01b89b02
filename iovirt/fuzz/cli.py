"""``iovirt fuzz``: coverage-guided fuzzing of the device models, crash triage, replay.

::

    iovirt fuzz --list
    iovirt fuzz DEVICE [--time S] [--runs N] [--corpus DIR] [--jobs N] [--coverage-report]
    iovirt fuzz --all --time S [--coverage-report]
    iovirt fuzz --replay PATH...

A Python target runs in its own worker process (:mod:`iovirt.fuzz.worker`: atheris takes
over the process it runs in); the C target is the libFuzzer binary csrc/fuzz/build.sh
makes (built here when missing or stale). While a target runs, a progress line every few
seconds gives executions per second, libFuzzer's coverage counters and the crashes so far.
Every crash is minimised, stored under tests/fuzz/regressions/<target>/ (a .bin the test
suite replays, and a .txt with the decoded program and the traceback) and printed.
With ``--coverage-report`` the corpus the run produced is replayed under coverage.py
(llvm-cov for the C target) and the line coverage of each model file is printed.

Exit status: 0 when nothing crashed, 1 when a target crashed (or, with ``--replay``, when
an input still crashes), 2 for a usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iovirt.fuzz.targets import (
    C_TARGETS,
    PYTHON_TARGETS,
    CTarget,
    load_extra_targets,
    target_names,
)
from iovirt.fuzz.worker import (
    CRASH_SUFFIX,
    NOTE_SUFFIX,
    PROGRESS_PREFIX,
    crash_name,
    crash_note,
    input_files,
    slug,
)

REPO = Path(__file__).resolve().parents[2]
PROGRESS_EVERY_S = 5.0
# libFuzzer settings for every run: a hang is an input running longer than TIMEOUT_S.
TIMEOUT_S = 10
RSS_LIMIT_MB = 2048
MAX_LEN = 16384
# Worker restarts after a crash Python could not catch (hang, fault in C), per target.
MAX_RESTARTS = 5
# A worker whose resident memory grows by more than this after its first seconds leaks:
# every input builds and tears down its device, so a steady run stays flat.
RSS_GROWTH_LIMIT_MB = 256
RSS_SETTLE_S = 5.0
# libFuzzer's own artifacts: what ended a process.
_ARTIFACT = re.compile(r"^(crash|timeout|oom|leak|slow-unit)-[0-9a-f]+$")
_STATS = re.compile(r"^#(\d+)\s+(\w+)\s+cov: (\d+) ft: (\d+) corp: (\d+)/")
_EXECS = re.compile(r"^#(\d+)\s")


def _default_root() -> Path:
    """Where build/ and tests/fuzz/ are: the source tree this package runs from, or the
    current folder for an installed copy."""
    return REPO if (REPO / "tests" / "fuzz").is_dir() else Path.cwd()


@dataclass
class Crash:
    target: str
    signature: str
    path: Path  # the stored reproducer
    note: str  # traceback or sanitizer report
    new: bool  # False: a reproducer with this signature was already stored


@dataclass
class RunResult:
    target: str
    seconds: float = 0.0
    execs: int = 0
    cov: int = 0
    features: int = 0
    corpus: int = 0
    crashes: list[Crash] = field(default_factory=list)
    coverage: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None

    @property
    def rate(self) -> float:
        return self.execs / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        text = (
            f"{self.target}: {self.seconds:.0f} s, {self.execs:,} execs ({self.rate:,.0f}/s), "
            f"cov {self.cov}, features {self.features}, corpus {self.corpus}, "
            f"crashes {len(self.crashes)}"
        )
        return text + (f", ERROR: {self.error}" if self.error else "")


def register(subparsers: Any) -> None:
    """Add the ``fuzz`` command to ``iovirt``'s subparsers."""
    p = subparsers.add_parser(
        "fuzz",
        help="fuzz device models without a VM (coverage-guided, atheris/libFuzzer)",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("device", nargs="?", help="the target to fuzz (see --list)")
    p.add_argument("--list", action="store_true", help="list the targets and exit")
    p.add_argument("--all", action="store_true", help="fuzz every target in turn (what CI runs)")
    p.add_argument(
        "--replay", nargs="+", metavar="PATH", help="replay inputs (files or folders) and exit"
    )
    p.add_argument("--time", type=float, default=60.0, help="seconds per target (default 60)")
    p.add_argument("--runs", type=int, default=None, help="stop a target after N inputs")
    p.add_argument(
        "--corpus",
        help="corpus folder (default build/fuzz/corpus/DEVICE; with --all, one folder per "
        "target inside it)",
    )
    p.add_argument("--jobs", type=int, default=1, help="parallel fuzzing processes per target")
    p.add_argument(
        "--coverage-report",
        action="store_true",
        help="after each target, the line coverage of its model files (coverage.py / llvm-cov)",
    )
    p.add_argument(
        "--regressions",
        help="where minimised reproducers go (default tests/fuzz/regressions)",
    )
    p.add_argument(
        "--minimize-time", type=float, default=30.0, help="seconds to minimise each crash"
    )
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    load_extra_targets()
    root = _default_root()
    regressions = Path(args.regressions) if args.regressions else root / "tests/fuzz/regressions"
    if args.list:
        for name, summary in _summaries().items():
            print(f"{name:18} {summary}")
        return 0
    if args.replay:
        return replay(args.replay, args.device, root)
    if args.all == (args.device is not None):
        print("iovirt fuzz: give one DEVICE or --all (see --list)", file=sys.stderr)
        return 2
    names = target_names() if args.all else [args.device]
    unknown = [n for n in names if n not in PYTHON_TARGETS and n not in C_TARGETS]
    if unknown:
        print(f"iovirt fuzz: no target {unknown[0]!r}; see iovirt fuzz --list", file=sys.stderr)
        return 2
    if args.jobs < 1 or args.time <= 0:
        print("iovirt fuzz: --jobs must be >= 1 and --time > 0", file=sys.stderr)
        return 2
    results = []
    started = time.monotonic()
    for name in names:
        if args.corpus is None:
            corpus = root / "build/fuzz/corpus" / name
        else:
            corpus = Path(args.corpus) / name if args.all else Path(args.corpus)
        options = _Options(
            time_s=args.time,
            runs=args.runs,
            corpus=corpus,
            jobs=args.jobs,
            coverage=args.coverage_report,
            regressions=regressions,
            minimize_s=args.minimize_time,
            work=root / "build/fuzz",
            root=root,
        )
        print(f"== fuzz {name}: {args.time:.0f} s, corpus {corpus}", flush=True)
        if name in C_TARGETS:
            result = fuzz_c(C_TARGETS[name], options)
        else:
            result = fuzz_python(name, options)
        print(result.line(), flush=True)
        _print_coverage(result)
        results.append(result)
    if len(results) > 1:
        print(f"== summary ({time.monotonic() - started:.0f} s in all)")
        for result in results:
            print(f"  {result.line()}")
            for cov in result.coverage.values():
                print(f"      {cov['file']}: {cov['percent']}% of {cov['statements']} lines")
    failed = [r for r in results if r.crashes or r.error]
    return 1 if failed else 0


def _summaries() -> dict[str, str]:
    out = {name: cls.summary for name, cls in PYTHON_TARGETS.items()}
    out.update({name: t.summary for name, t in C_TARGETS.items()})
    return out


@dataclass
class _Options:
    time_s: float
    runs: int | None
    corpus: Path
    jobs: int
    coverage: bool
    regressions: Path
    minimize_s: float
    work: Path
    root: Path


# -- running a process and following its output ------------------------------------------------


class _Progress:
    """Follows the output of fuzzing processes and prints a progress line now and then."""

    def __init__(self, name: str, result: RunResult) -> None:
        self.name = name
        self.result = result
        self.started = time.monotonic()
        self.next_print = self.started + PROGRESS_EVERY_S
        self.execs: dict[int, int] = {}  # per process: its own count
        self.base_execs = 0  # executions of processes that ended (restarts)
        self.crashes = 0  # seen so far (the worker's reports and libFuzzer artifacts)
        self.tail: list[str] = []
        self.rss_settled: dict[int, float] = {}  # per worker: resident MiB once settled
        self.rss_growth = 0.0  # the most any worker grew since it settled

    def line(self, pid: int, text: str) -> None:
        self.tail = [*self.tail[-200:], text]
        m = _STATS.match(text)
        if m:
            self.execs[pid] = max(self.execs.get(pid, 0), int(m.group(1)))
            self.result.cov = max(self.result.cov, int(m.group(3)))
            self.result.features = max(self.result.features, int(m.group(4)))
            self.result.corpus = max(self.result.corpus, int(m.group(5)))
        elif text.startswith(PROGRESS_PREFIX):
            fields = dict(f.split("=", 1) for f in text.split()[1:] if "=" in f)
            if "execs" in fields:
                self.execs[pid] = max(self.execs.get(pid, 0), int(fields["execs"]))
            if "rss_mb" in fields and float(fields.get("elapsed", 0)) >= RSS_SETTLE_S:
                rss = float(fields["rss_mb"])
                settled = self.rss_settled.setdefault(pid, rss)
                self.rss_growth = max(self.rss_growth, rss - settled)
            if "crash" in text.split()[1:2]:
                self.crashes += 1
                print(f"  {self.name}: new crash {fields.get('signature', '?')}", flush=True)
        else:
            m2 = _EXECS.match(text)
            if m2:
                self.execs[pid] = max(self.execs.get(pid, 0), int(m2.group(1)))
        self.tick()

    def ended(self, pid: int) -> None:
        self.base_execs += self.execs.pop(pid, 0)

    @property
    def total_execs(self) -> int:
        return self.base_execs + sum(self.execs.values())

    def tick(self) -> None:
        now = time.monotonic()
        if now < self.next_print:
            return
        self.next_print = now + PROGRESS_EVERY_S
        elapsed = now - self.started
        execs = self.total_execs
        r = self.result
        print(
            f"  {self.name}: {elapsed:4.0f} s  {execs:>10,} execs ({execs / elapsed:,.0f}/s)  "
            f"cov {r.cov}  features {r.features}  corpus {r.corpus}  "
            f"crashes {self.crashes}",
            flush=True,
        )


def _follow(procs: list[subprocess.Popen[str]], progress: _Progress, deadline: float) -> None:
    """Read the processes' output until they all end (killed past ``deadline``)."""
    selector = selectors.DefaultSelector()
    for proc in procs:
        assert proc.stdout is not None
        selector.register(proc.stdout, selectors.EVENT_READ, proc)
    open_streams = len(procs)
    while open_streams:
        for key, _ in selector.select(timeout=1.0):
            proc = key.data
            text = key.fileobj.readline()  # type: ignore[union-attr]
            if text == "":
                selector.unregister(key.fileobj)
                open_streams -= 1
                continue
            progress.line(proc.pid, text.rstrip("\n"))
        progress.tick()
        if time.monotonic() > deadline:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
    for proc in procs:
        proc.wait()
        progress.ended(proc.pid)


def _popen(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
        env=env,
    )


def _libfuzzer_flags(seconds: float, runs: int | None, crash_dir: Path, seed: int) -> list[str]:
    flags = [
        f"-max_total_time={max(int(seconds), 1)}",
        f"-timeout={TIMEOUT_S}",
        f"-rss_limit_mb={RSS_LIMIT_MB}",
        f"-max_len={MAX_LEN}",
        f"-artifact_prefix={crash_dir}/",
        f"-seed={seed}",
        "-print_final_stats=1",
    ]
    if runs is not None:
        flags.append(f"-runs={runs}")
    return flags


# -- Python targets ---------------------------------------------------------------------------


def fuzz_python(name: str, opt: _Options) -> RunResult:
    result = RunResult(name)
    work = opt.work
    seeds = work / "seeds" / name
    crash_dir = work / "crashes" / name
    shutil.rmtree(crash_dir, ignore_errors=True)
    crash_dir.mkdir(parents=True)
    opt.corpus.mkdir(parents=True, exist_ok=True)
    progress = _Progress(name, result)
    started = time.monotonic()
    deadline = started + opt.time_s
    restarts = 0
    seen_artifacts: set[str] = set()
    while True:
        left = deadline - time.monotonic()
        procs = []
        for job in range(opt.jobs):
            # Every worker writes the seeds into a folder of its own: no worker can see
            # another one's half-written files.
            job_seeds = seeds if job == 0 else seeds.with_name(f"{name}.job{job}")
            cmd = [
                sys.executable,
                "-m",
                "iovirt.fuzz.worker",
                "fuzz",
                name,
                "--crash-dir",
                str(crash_dir),
                "--seed-dir",
                str(job_seeds),
                "--",
                *_libfuzzer_flags(left, opt.runs, crash_dir, 1 + job + 100 * restarts),
                str(opt.corpus),
                str(job_seeds),
            ]
            procs.append(_popen(cmd))
        _follow(procs, progress, deadline + 60)
        artifacts = [
            p
            for p in sorted(crash_dir.iterdir())
            if _ARTIFACT.match(p.name) and p.name not in seen_artifacts
        ]
        for artifact in artifacts:
            seen_artifacts.add(artifact.name)
            progress.crashes += 1
            kind = artifact.name.split("-", 1)[0]
            result.crashes.append(
                _store(name, f"libfuzzer-{kind}", artifact.read_bytes(), progress.tail, opt)
            )
        failed = [p for p in procs if p.returncode != 0]
        if failed and not artifacts:
            result.error = f"worker exited with status {failed[0].returncode}"
            print("\n".join(progress.tail[-30:]), file=sys.stderr)
            break
        if not artifacts or opt.runs is not None:
            break
        restarts += 1
        if restarts > MAX_RESTARTS or deadline - time.monotonic() < 2:
            break
    result.seconds = time.monotonic() - started
    result.execs = progress.total_execs
    if progress.rss_growth > RSS_GROWTH_LIMIT_MB and result.error is None:
        result.error = (
            f"resident memory grew by {progress.rss_growth:.0f} MiB during the run "
            f"(limit {RSS_GROWTH_LIMIT_MB}): something outlives its input"
        )
    # Crashes Python caught: the worker saved each new signature with its traceback.
    for found in sorted(crash_dir.glob(f"*{CRASH_SUFFIX}")):
        note = found.with_suffix(NOTE_SUFFIX).read_text()
        signature = note.splitlines()[0].removeprefix("signature: ").strip()
        smaller = _minimize(name, found, signature, opt)
        result.crashes.append(_store(name, signature, smaller, None, opt))
    if opt.coverage:
        result.coverage = _python_coverage(name, [opt.corpus, seeds])
    return result


def _minimize(name: str, path: Path, signature: str, opt: _Options) -> bytes:
    out = path.with_suffix(".min")
    cmd = [
        sys.executable,
        "-m",
        "iovirt.fuzz.worker",
        "minimize",
        name,
        str(path),
        "--signature",
        signature,
        "--output",
        str(out),
        "--time",
        str(opt.minimize_s),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=opt.minimize_s + 120)
    if proc.returncode != 0 or not out.exists():
        print(f"  {name}: minimising {path.name} failed; storing it as found", file=sys.stderr)
        return path.read_bytes()
    return out.read_bytes()


def _store(name: str, signature: str, data: bytes, tail: list[str] | None, opt: _Options) -> Crash:
    """Put a (minimised) reproducer under the regressions folder and print it."""
    folder = opt.regressions / name
    folder.mkdir(parents=True, exist_ok=True)
    key = slug(signature)
    existing = sorted(folder.glob(f"{key}-*{CRASH_SUFFIX}"))
    if tail is None:  # a crash Python caught: replaying it here is safe
        text = _replay_python(name, data) or f"signature: {signature} (did not reproduce)"
    else:  # a hang or a fault: what the process printed before it ended
        text = "\n".join(line for line in (tail or [])[-80:] if not line.startswith(("#", "INFO:")))
    if existing:
        print(f"  {name}: crash {signature}: known, reproducer already at {existing[0]}")
        return Crash(name, signature, existing[0], text, new=False)
    path = folder / f"{crash_name(signature, data)}{CRASH_SUFFIX}"
    path.write_bytes(data)
    note = crash_note(name, data, text) if name in PYTHON_TARGETS else f"{text}\n"
    path.with_suffix(NOTE_SUFFIX).write_text(note)
    print(f"CRASH {name}: {signature}\n{text.rstrip()}\nreproducer: {path}", flush=True)
    return Crash(name, signature, path, text, new=True)


def _replay_python(name: str, data: bytes) -> str | None:
    """Run one input here; the crash's signature and traceback, or None."""
    import logging

    from iovirt.fuzz.harness import REPLAY_DEADLINE_S, Runner, crash_signature, format_crash
    from iovirt.fuzz.targets import make_target

    logging.disable(logging.CRITICAL)
    target = make_target(name)
    try:
        runner = Runner(target, deadline_s=REPLAY_DEADLINE_S)
        runner.run(data)
    except Exception as e:
        return f"signature: {crash_signature(e)}\n\n{format_crash(e)}"
    finally:
        target.close()
        logging.disable(logging.NOTSET)
    return None


def _python_coverage(name: str, paths: list[Path]) -> dict[str, dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="iovirt-fuzz-cov-") as tmp:
        out = Path(tmp) / "coverage.json"
        cmd = [
            sys.executable,
            "-m",
            "iovirt.fuzz.worker",
            "coverage",
            name,
            *map(str, paths),
            "--json",
            str(out),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            print(f"  {name}: coverage failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            return {}
        report: dict[str, dict[str, Any]] = json.loads(out.read_text())
        return report


def _print_coverage(result: RunResult) -> None:
    for cov in result.coverage.values():
        missing = cov.get("missing", [])
        print(
            f"  coverage {cov['file']}: {cov['covered']}/{cov['statements']} lines "
            f"({cov['percent']}%), {cov.get('inputs', '?')} inputs replayed"
            + (f"; not run: {_ranges(missing)}" if missing else ""),
            flush=True,
        )


def _ranges(lines: list[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``1-3, 7`` (the first 12 ranges)."""
    out: list[str] = []
    start = prev = None
    for n in [*lines, None]:
        if n is not None and prev is not None and n == prev + 1:
            prev = n
            continue
        if start is not None:
            out.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = n
    return ", ".join(out[:12]) + (" ..." if len(out) > 12 else "")


# -- the C target -----------------------------------------------------------------------------


def build_c(target: CTarget, root: Path) -> Path:
    """The target's binary, rebuilt when missing or older than its sources."""
    binary = root / target.binary
    sources = [root / target.source, root / target.build_script, *root.glob("csrc/fuzz/*.[ch]")]
    sources += [root / "csrc/virtqueue.c", root / "csrc/virtqueue.h", root / "csrc/blk.h"]
    stale = not binary.exists() or any(
        s.exists() and s.stat().st_mtime > binary.stat().st_mtime for s in sources
    )
    if stale:
        print(f"  building {target.binary} with {target.build_script}", flush=True)
        subprocess.run([str(root / target.build_script)], check=True, cwd=root)
    return binary


def fuzz_c(target: CTarget, opt: _Options) -> RunResult:
    name = target.name
    result = RunResult(name)
    try:
        binary = build_c(target, opt.root)
    except (subprocess.CalledProcessError, OSError) as e:
        result.error = f"building the libFuzzer binary failed: {e}"
        return result
    crash_dir = opt.work / "crashes" / name
    shutil.rmtree(crash_dir, ignore_errors=True)
    crash_dir.mkdir(parents=True)
    opt.corpus.mkdir(parents=True, exist_ok=True)
    seeds = opt.work / "seeds" / name
    shutil.rmtree(seeds, ignore_errors=True)
    seeds.mkdir(parents=True)
    for i, data in enumerate(target.seeds()):
        (seeds / f"seed-{i:02d}").write_bytes(data)
    progress = _Progress(name, result)
    started = time.monotonic()
    deadline = started + opt.time_s
    restarts = 0
    while True:
        left = deadline - time.monotonic()
        procs = [
            _popen(
                [
                    str(binary),
                    *_libfuzzer_flags(left, opt.runs, crash_dir, 1 + job + 100 * restarts),
                    str(opt.corpus),
                    str(seeds),
                ]
            )
            for job in range(opt.jobs)
        ]
        _follow(procs, progress, deadline + 60)
        artifacts = [p for p in sorted(crash_dir.iterdir()) if _ARTIFACT.match(p.name)]
        for artifact in artifacts:
            progress.crashes += 1
            kind = artifact.name.split("-", 1)[0]
            smaller = _minimize_c(binary, artifact, opt)
            result.crashes.append(_store(name, f"libfuzzer-{kind}", smaller, progress.tail, opt))
            artifact.unlink()
        failed = [p for p in procs if p.returncode != 0]
        if failed and not artifacts:
            result.error = f"{binary.name} exited with status {failed[0].returncode}"
            print("\n".join(progress.tail[-30:]), file=sys.stderr)
            break
        if not artifacts or opt.runs is not None:
            break
        restarts += 1
        if restarts > MAX_RESTARTS or deadline - time.monotonic() < 2:
            break
    result.seconds = time.monotonic() - started
    result.execs = progress.total_execs
    if opt.coverage:
        result.coverage = _c_coverage(target, opt, [opt.corpus, seeds])
    return result


def _minimize_c(binary: Path, artifact: Path, opt: _Options) -> bytes:
    out = artifact.with_suffix(".min")
    cmd = [
        str(binary),
        "-minimize_crash=1",
        f"-max_total_time={max(int(opt.minimize_s), 1)}",
        f"-exact_artifact_path={out}",
        str(artifact),
    ]
    with contextlib.suppress(subprocess.TimeoutExpired):
        subprocess.run(cmd, capture_output=True, timeout=opt.minimize_s + 60)
    return out.read_bytes() if out.exists() else artifact.read_bytes()


def _c_coverage(target: CTarget, opt: _Options, paths: list[Path]) -> dict[str, dict[str, Any]]:
    """Line coverage of the C source after replaying ``paths`` (llvm-cov)."""
    cov_binary = opt.root / target.binary.replace("_fuzz", "_cov")
    tools = [shutil.which("llvm-profdata"), shutil.which("llvm-cov")]
    if not cov_binary.exists() or None in tools:
        print(f"  {target.name}: no coverage build or llvm tools; skipping coverage")
        return {}
    with tempfile.TemporaryDirectory(prefix="iovirt-fuzz-cov-") as tmp:
        raw, merged = Path(tmp) / "run.profraw", Path(tmp) / "run.profdata"
        env = {**os.environ, "LLVM_PROFILE_FILE": str(raw)}
        subprocess.run(
            [str(cov_binary), "-runs=0", *map(str, paths)],
            env=env,
            capture_output=True,
            check=False,
        )
        subprocess.run(
            ["llvm-profdata", "merge", "-sparse", str(raw), "-o", str(merged)],
            check=True,
            capture_output=True,
        )
        source = opt.root / target.source
        proc = subprocess.run(
            [
                "llvm-cov",
                "export",
                "-summary-only",
                str(cov_binary),
                f"-instr-profile={merged}",
                str(source),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
    lines = json.loads(proc.stdout)["data"][0]["files"][0]["summary"]["lines"]
    return {
        target.source: {
            "file": target.source,
            "statements": lines["count"],
            "covered": lines["covered"],
            "percent": round(lines["percent"], 1),
            "inputs": len(input_files(list(map(str, paths)))),
        }
    }


# -- replay -----------------------------------------------------------------------------------


def replay(paths: list[str], device: str | None, root: Path) -> int:
    """Run stored inputs once each; 1 if any still crashes."""
    import logging

    from iovirt.fuzz.harness import REPLAY_DEADLINE_S, Runner, crash_signature
    from iovirt.fuzz.targets import make_target

    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        print(f"iovirt fuzz: --replay: {missing[0]} does not exist", file=sys.stderr)
        return 2
    files = input_files(paths)
    if not files:
        print(f"iovirt fuzz: no inputs under {' '.join(paths)}: nothing to replay")
        return 0
    by_target: dict[str, list[Path]] = {}
    for f in files:
        name = device or f.parent.name
        if name not in PYTHON_TARGETS and name not in C_TARGETS:
            print(
                f"iovirt fuzz: {f}: its folder names no target; give the DEVICE "
                "(iovirt fuzz DEVICE --replay FILE)",
                file=sys.stderr,
            )
            return 2
        by_target.setdefault(name, []).append(f)
    crashed = 0
    logging.disable(logging.CRITICAL)
    for name, inputs in by_target.items():
        if name in C_TARGETS:
            binary = build_c(C_TARGETS[name], root)
            for f in inputs:
                proc = subprocess.run([str(binary), str(f)], capture_output=True, text=True)
                ok = proc.returncode == 0
                crashed += not ok
                print(f"{'ok   ' if ok else 'CRASH'} {name} {f}")
                if not ok:
                    print(proc.stderr[-3000:])
            continue
        target = make_target(name)
        try:
            runner = Runner(target, deadline_s=REPLAY_DEADLINE_S)
            for f in inputs:
                try:
                    runner.run(f.read_bytes())
                except Exception as e:
                    crashed += 1
                    print(f"CRASH {name} {f}: {crash_signature(e)}: {e}")
                else:
                    print(f"ok    {name} {f}")
        finally:
            target.close()
    logging.disable(logging.NOTSET)
    return 1 if crashed else 0


def standalone(argv: list[str] | None = None) -> int:
    """``python -m iovirt.fuzz`` (the same as ``iovirt fuzz``)."""
    parser = argparse.ArgumentParser(prog="iovirt")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["fuzz", *(sys.argv[1:] if argv is None else argv)])
    status: int = args.func(args)
    return status
