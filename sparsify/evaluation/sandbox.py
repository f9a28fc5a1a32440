"""Run untrusted, model-generated Python code in a separate, confined process.

Used by the HumanEval-style pass@1 evaluation: a completion is arbitrary code,
so it must never run inside the pipeline's own process, and it must not be able
to reach the network, the caller's files or secrets, or exhaust the machine.

How it works
------------
``run_untrusted`` writes the code to a directory private to the caller and runs
it under bubblewrap (``bwrap``), which builds the isolation from unprivileged
user namespaces -- no root and no setuid helper needed:

* ``net``: a new network namespace (only its own loopback): no connection to
  anything outside, localhost services of the host included.
* ``fs``: a new mount namespace whose root is an empty tmpfs, remounted
  read-only. Only ``/usr``, the ``/lib*`` and ``/bin`` entries,
  ``/etc/ld.so.cache``, ``/etc/localtime`` and the interpreter's own prefix
  are bound in, read-only.
  The program's working and temp folder (also its ``$HOME``) is a private,
  size-capped tmpfs at ``/tmp``; ``/dev`` is bwrap's minimal, read-only one and
  ``/proc`` shows only the sandbox. The caller's home, working folders and
  outputs do not exist in there.
* ``pid`` (+ ``ipc``, ``uts``): a new pid namespace; bwrap's init there dies
  with its parent (``--die-with-parent``), and when it dies the kernel kills
  every process of the namespace, including ones that called ``setsid``.
  ``--new-session`` keeps the code off the caller's terminal.
* ``env``: ``--clearenv`` plus PATH/HOME/TMPDIR/LANG: no tokens, proxies or
  ``PYTHON*`` variables reach the code.
* ``uid`` (only when the caller is root): bwrap runs as a dedicated uid drawn
  from ``SANDBOX_UID_RANGE``, so nothing runs as root -- the kernel exempts
  real uid 0 from ``RLIMIT_NPROC`` -- and a final sweep can kill everything of
  that uid. A non-root caller's code runs as the caller's uid inside its own
  user namespace, where ``RLIMIT_NPROC`` counts only the sandbox's processes.
* ``mem``/``nproc``/``cpu``/``fsize``: hard rlimits (address space, processes
  and threads, CPU seconds, file size; no core dumps, 64 open files) set by the
  trusted runner inside the sandbox just before the code starts.
* ``time``: a wall-clock timeout after which the init of the pid namespace is
  SIGKILLed -- which ends every process in it -- and then bwrap's process group.

The code runs as ``__main__`` under a small trusted runner (this module, run as
``python -I -S -B``: standard library only) that reports, on a channel it
closes before the code starts, whether the sandbox got ready, and on another
how the code ended. The code can forge the latter, so it only ever labels a
failure (``SandboxResult.cause``); whether the code passed is its exit status.

Where no kernel isolation is available -- no ``bwrap``, or bwrap cannot create
namespaces (e.g. a container whose seccomp policy forbids user namespaces) --
``run_untrusted`` raises ``SandboxUnavailable`` instead of running the code,
unless the caller opts in with ``SandboxPolicy(allow_unisolated=True)``
(``evaluate.sandbox.allow_unisolated`` in ``params.yaml``). Then the code runs
as the caller with the rlimits, a stripped environment, a fresh working folder
and a Python-level guard that refuses writes outside that folder and socket
creation. The guard is trivially bypassable (``import posix``, ``ctypes``): it
stops accidents, not attacks. Every result names the protections that were in
force (``SandboxResult.isolation``, e.g. ``bwrap(net,fs,pid,...)`` or
``unisolated(guard,env,...)``), and the eval stage records it with its scores.

In every mode the code may read world-readable files under the bound system
folders and use CPU and memory up to the limits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import logging
import math
import os
import random
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

Status = Literal["passed", "failed", "timeout", "killed"]
#: Why a run ended (see ``SandboxResult``).
Cause = Literal[
    "ok",
    "assertion",
    "exception",
    "exit",
    "timeout",
    "cpu_time",
    "memory",
    "processes",
    "file_size",
    "permission",
    "network",
    "not_found",
    "killed",
    "signal",
]

#: Dedicated uids/gids for sandboxed runs started by root (one drawn at random
#: per run), far above any real account, so per-uid limits and the final "kill
#: everything of this uid" sweep touch only sandboxed processes.
SANDBOX_UID_RANGE = range(2_000_000_000, 2_000_000_000 + 2**20)

#: The config key that opts in to running generated code without kernel isolation.
ALLOW_UNISOLATED_KEY = "evaluate.sandbox.allow_unisolated"

_DETAIL_CHARS = 2000
_SETUP_FAILED_EXIT = 70  # the runner's exit code when it could not apply the limits
_PR_SET_NO_NEW_PRIVS = 38
# Inside the sandbox (bwrap mode): where the runner and the program are placed.
_RUNNER_PATH, _PROGRAM_PATH, _TMP = "/sandbox/runner.py", "/sandbox/program.py", "/tmp"
_NETWORK_ERRNOS = frozenset(
    {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.ECONNREFUSED, errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT}
)
_PERMISSION_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


class SandboxUnavailable(RuntimeError):
    """Kernel isolation cannot be set up here, and running without it was not allowed."""


@dataclasses.dataclass(frozen=True)
class SandboxPolicy:
    """Limits for one run and whether running without kernel isolation is acceptable.

    ``timeout_s``: wall clock; the CPU limit is derived from it. ``memory_mb``:
    address space per process. ``max_file_mb``: largest file the code may
    write (its captured stdout/stderr included). ``tmp_mb``: size of its
    private temp folder. ``max_procs``: processes and threads at once.
    ``allow_unisolated``: run with only rlimits and a Python-level guard when
    bwrap is unavailable, instead of raising ``SandboxUnavailable``.
    ``bwrap``: the bwrap executable (None: ``bwrap`` on ``PATH``).
    """

    timeout_s: float = 5.0
    memory_mb: int = 512
    max_file_mb: int = 1
    tmp_mb: int = 16
    max_procs: int = 16
    allow_unisolated: bool = False
    bwrap: str | None = None

    def __post_init__(self) -> None:
        for name in ("timeout_s", "memory_mb", "max_file_mb", "tmp_mb", "max_procs"):
            if not getattr(self, name) > 0:
                raise ValueError(f"sandbox {name} must be positive, got {getattr(self, name)!r}")


@dataclasses.dataclass(frozen=True)
class Isolation:
    """How code runs here: ``kind`` and the protections in force (see the module docstring)."""

    kind: Literal["bwrap", "unisolated"]
    protections: tuple[str, ...]
    interpreter: str
    bwrap: str | None = None

    def __str__(self) -> str:
        return f"{self.kind}({','.join(self.protections)})"


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run.

    ``status``: ``passed`` (exit 0), ``failed`` (non-zero exit: an exception,
    a failed assert, or a limit that surfaced as an exception), ``timeout``
    (wall clock exceeded, everything killed) or ``killed`` (ended by a signal).
    ``cause`` says why: ``ok``; ``assertion``/``exception``/``exit`` (the code's
    own failure); ``timeout``; ``cpu_time`` (SIGXCPU); ``memory`` (address-space
    limit: MemoryError); ``processes`` (process limit: fork or thread refused);
    ``file_size`` (EFBIG); ``permission`` (EACCES/EPERM/EROFS: a read-only or
    forbidden path, or the guard); ``network`` (no route, refused);
    ``not_found`` (a path that does not exist in the sandbox); ``killed``
    (SIGKILL, e.g. the OOM killer); ``signal`` (another signal). ``detail`` is
    the tail of stderr, ``output`` the tail of stdout; ``isolation`` the
    protections in force, e.g. ``bwrap(net,fs,pid,...)``.
    """

    passed: bool
    status: Status
    cause: Cause
    detail: str
    seconds: float
    output: str = ""
    isolation: str = ""

    @property
    def protections(self) -> tuple[str, ...]:
        inner = self.isolation.partition("(")[2].rstrip(")")
        return tuple(inner.split(",")) if inner else ()


def run_untrusted(code: str, policy: SandboxPolicy | None = None) -> SandboxResult:
    """Run ``code`` as ``__main__`` in a confined child process; never in-process.

    Raises ``SandboxUnavailable`` when kernel isolation cannot be set up and
    ``policy.allow_unisolated`` is false: generated code never runs unconfined
    silently.
    """
    policy = policy or SandboxPolicy()
    isolation = check_isolation(policy)
    result = _run(code, policy, isolation)
    log.debug("sandbox: %s (%s) in %.2fs under %s", result.status, result.cause, result.seconds, isolation)
    return result


def check_isolation(policy: SandboxPolicy | None = None) -> Isolation:
    """The isolation ``run_untrusted`` will use under ``policy``; raise if it would refuse.

    Verified once per process (and bwrap/uid/interpreter) by running a trivial
    program through the real sandbox, so a stage can fail before it spends
    time generating code it could not run.
    """
    policy = policy or SandboxPolicy()
    isolation, why_not = _probe(policy.bwrap or shutil.which("bwrap"), os.geteuid() == 0)
    if isolation is not None:
        return isolation
    if not policy.allow_unisolated:
        raise SandboxUnavailable(
            f"refusing to run generated code without kernel isolation: {why_not}. Install bubblewrap "
            "(Debian/Ubuntu: apt-get install bubblewrap), or accept running it with only rlimits and a "
            f"Python-level guard by setting {ALLOW_UNISOLATED_KEY}: true "
            "(SandboxPolicy(allow_unisolated=True))"
        )
    _warn_unisolated(why_not)
    return _unisolated()


@functools.cache
def _warn_unisolated(why_not: str) -> None:  # cached: once per process and reason
    log.warning("running generated code WITHOUT kernel isolation (%s set): %s", ALLOW_UNISOLATED_KEY, why_not)


def _unisolated() -> Isolation:
    # RLIMIT_NPROC never applies to real uid 0, so root gets no process limit here.
    nproc = () if os.geteuid() == 0 else ("nproc",)
    return Isolation(
        "unisolated", ("guard", "env", "mem", *nproc, "cpu", "fsize", "time"), os.path.realpath(sys.executable)
    )


@functools.cache
def _probe(bwrap: str | None, as_root: bool) -> tuple[Isolation | None, str]:
    """(the bwrap isolation, "") if a trivial program runs under it, else (None, why not)."""
    if sys.platform != "linux":
        return None, f"bubblewrap needs Linux, this is {sys.platform}"
    if bwrap is None:
        return None, "bwrap (bubblewrap) is not installed"
    interpreter = _sandbox_interpreter(as_root)
    if interpreter is None:
        return None, (
            f"the interpreter {os.path.realpath(sys.executable)} is not readable by an "
            "unprivileged sandbox uid and there is no /usr/bin/python3"
        )
    protections = (
        "net",
        "fs",
        "pid",
        "ipc",
        "uts",
        "env",
        *(("uid",) if as_root else ()),
        "mem",
        "nproc",
        "cpu",
        "fsize",
        "time",
    )
    isolation = Isolation("bwrap", protections, interpreter, bwrap)
    try:
        result = _run("pass\n", SandboxPolicy(timeout_s=10.0), isolation)
    except (SandboxUnavailable, OSError) as exc:  # OSError: e.g. bwrap not executable by the uid
        return None, str(exc)
    if not result.passed:
        return None, f"a trivial program did not pass under bwrap ({result.status}: {result.detail})"
    return isolation, ""


def _sandbox_interpreter(as_root: bool) -> str | None:
    """The Python to run the code with: this one, unless a dedicated uid could not run it.

    As root the code runs as an unprivileged uid (see module docstring), and
    bwrap binds the interpreter's folders with that uid's permissions: a Python
    under a 0700 home (pyenv under /root) is out of reach; the system Python
    then runs the code (it only needs the standard library).
    """
    own = os.path.realpath(sys.executable)
    if not as_root:
        return own
    candidates = [(own, sys.base_prefix), ("/usr/bin/python3", "/usr")]
    for interpreter, prefix in candidates:
        if os.path.isfile(interpreter) and _others_can_reach(interpreter) and _others_can_reach(prefix):
            if interpreter != own:
                log.info(
                    "sandbox: %s is out of reach of an unprivileged uid; generated code runs with %s",
                    own,
                    os.path.realpath(interpreter),
                )
            return os.path.realpath(interpreter)
    return None


def _others_can_reach(path: str) -> bool:
    """Every folder above ``path`` is searchable by "others", and ``path`` readable by them."""
    path = os.path.realpath(path)
    parts = Path(path).parents
    if any(not os.stat(p).st_mode & stat.S_IXOTH for p in parts):
        return False
    return bool(os.stat(path).st_mode & stat.S_IROTH)


def _prefixes(interpreter: str) -> list[str]:
    """Folders the interpreter needs besides /usr and /lib*: its install prefix(es)."""
    if interpreter == os.path.realpath(sys.executable):
        found = {sys.base_prefix, sys.base_exec_prefix}
    else:  # the system Python: a path under /usr, prefix /usr
        found = {str(Path(interpreter).parent.parent)}
    return sorted(p for p in found if not (p == "/usr" or p.startswith("/usr/")))


# --------------------------------------------------------------------------- one run


def _run(code: str, policy: SandboxPolicy, isolation: Isolation) -> SandboxResult:
    uid = random.choice(SANDBOX_UID_RANGE) if "uid" in isolation.protections else None
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="sparsify-sbx-") as tmp:
        # ``private`` (0700, the caller's) holds the code, the runner's report
        # and the captured output; a sandboxed process only ever gets the open
        # descriptors it needs, never the folder.
        private = Path(tmp)
        (private / "program.py").write_text(code, encoding="utf-8")
        work = private / "work"  # the working folder of an unisolated run
        work.mkdir()
        with (
            open(private / "stdout", "wb") as out,
            open(private / "stderr", "wb") as err,
            open(private / "status", "wb") as status,
            open(private / "outcome", "wb") as outcome,
            open(private / "program.py", "rb") as program,
            open(private / "info", "wb") as info,
            open(os.path.abspath(__file__), "rb") as runner,
        ):
            config = {
                "status_fd": status.fileno(),
                "outcome_fd": outcome.fileno(),
                "cpu_s": math.ceil(policy.timeout_s) + 1,
                "memory_bytes": policy.memory_mb * 2**20,
                "file_bytes": policy.max_file_mb * 2**20,
                "max_procs": policy.max_procs,
            }
            if isolation.kind == "bwrap":
                # bwrap's init in the sandbox's user namespace counts against RLIMIT_NPROC too.
                config |= {"program": _PROGRAM_PATH, "guard": None, "max_procs": policy.max_procs + 1}
                argv = _bwrap_argv(isolation, policy, program.fileno(), runner.fileno(), info.fileno(), config)
                fds = (status.fileno(), outcome.fileno(), program.fileno(), runner.fileno(), info.fileno())
                cwd, env = "/", {}
            else:
                config |= {"program": str(private / "program.py"), "guard": str(work)}
                argv = [isolation.interpreter, "-I", "-S", "-B", os.path.abspath(__file__), "--run", json.dumps(config)]
                fds, cwd, env = (status.fileno(), outcome.fileno()), str(work), _minimal_env(str(work))
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                pass_fds=fds,
                cwd=cwd,
                env=env,
                start_new_session=True,
                # As root, bwrap itself runs as the dedicated uid: the code never runs as root.
                **({"user": uid, "group": uid, "extra_groups": []} if uid is not None else {}),
            )
            try:
                timed_out = not _wait_for_exit(proc.pid, policy.timeout_s)
            finally:
                _kill_everything(proc, uid, private / "info")
        seconds = time.monotonic() - start
        setup = {r.get("event"): r for r in _read_records(private / "status")}
        stderr = _tail(private / "stderr")
        if "error" in setup:  # the runner could not apply the limits and never ran the code
            raise SandboxUnavailable(
                f"the sandbox runner could not apply its limits ({isolation}): {setup['error'].get('detail')}"
            )
        if not timed_out and "ready" not in setup:
            # The code never ran: bwrap (or the interpreter) failed before the runner was ready.
            raise SandboxUnavailable(
                f"the sandbox could not start ({isolation}): exit status {proc.returncode}: {stderr or '(no message)'}"
            )
        return _classify(
            _read_records(private / "outcome"),
            timed_out=timed_out,
            returncode=proc.returncode,
            stdout=_tail(private / "stdout"),
            stderr=stderr,
            seconds=seconds,
            policy=policy,
            isolation=isolation,
        )


def _bwrap_argv(
    isolation: Isolation, policy: SandboxPolicy, program_fd: int, runner_fd: int, info_fd: int, config: dict[str, Any]
) -> list[str]:
    """The bwrap command line: namespaces, read-only system folders, a private /tmp."""
    assert isolation.bwrap is not None
    argv = [
        isolation.bwrap,
        "--unshare-all",
        "--unshare-user",  # --unshare-all only *tries* the user namespace
        # No nested user namespaces: less kernel surface for the code (bwrap >= 0.8).
        *(["--disable-userns"] if _bwrap_has_option(isolation.bwrap, "--disable-userns") else []),
        "--die-with-parent",
        "--new-session",
        "--cap-drop",
        "ALL",
        "--info-fd",
        str(info_fd),  # bwrap writes the pid of the namespace's init there
        "--clearenv",
        "--setenv",
        "PATH",
        "/usr/bin:/bin",
        "--setenv",
        "HOME",
        _TMP,
        "--setenv",
        "TMPDIR",
        _TMP,
        "--setenv",
        "LANG",
        "C.UTF-8",
        "--hostname",
        "sandbox",
        "--ro-bind",
        "/usr",
        "/usr",
    ]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = f"/{name}"
        if os.path.islink(path):  # merged-/usr systems: /lib -> usr/lib
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            argv += ["--ro-bind", path, path]
    # The dynamic loader's cache (libraries outside its built-in paths) and the time zone.
    for path in ("/etc/ld.so.cache", "/etc/localtime"):
        argv += ["--ro-bind-try", path, path]
    for prefix in _prefixes(isolation.interpreter):
        argv += ["--ro-bind", prefix, prefix]
    argv += [
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--size",
        str(policy.tmp_mb * 2**20),
        "--tmpfs",
        _TMP,
        # Copied in from descriptors we opened: the sandbox uid may not be able to read the originals.
        "--ro-bind-data",
        str(runner_fd),
        _RUNNER_PATH,
        "--ro-bind-data",
        str(program_fd),
        _PROGRAM_PATH,
        # The root and /dev are tmpfs without a size limit: only /tmp stays writable.
        "--remount-ro",
        "/dev",
        "--remount-ro",
        "/",
        "--chdir",
        _TMP,
        isolation.interpreter,
        "-I",
        "-S",
        "-B",
        _RUNNER_PATH,
        "--run",
        json.dumps(config),
    ]
    return argv


@functools.cache
def _bwrap_has_option(bwrap: str, option: str) -> bool:
    try:
        usage = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return option in usage.stdout + usage.stderr


def _minimal_env(work: str) -> dict[str, str]:
    """Nothing inherited: no tokens, proxies or PYTHON* variables reach the code."""
    return {"PATH": "/usr/bin:/bin", "HOME": work, "LANG": "C.UTF-8", "TMPDIR": work}


def _wait_for_exit(pid: int, timeout_s: float) -> bool:
    """Wait until ``pid`` exits, *without reaping it*; False on timeout.

    Keeping the child unreaped until its group has been killed means its pid --
    which is also the process group id -- cannot be recycled for an unrelated
    group that ``killpg`` would then hit.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # Linux < 5.3: poll instead
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
            time.sleep(0.01)
        return False
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)  # readable once the process has exited
        return bool(poller.poll(timeout_s * 1000))
    finally:
        os.close(pidfd)


def _kill_everything(proc: subprocess.Popen, uid: int | None, info: Path) -> None:
    """Kill the sandbox's pid namespace, then the run's process group, then (as root) its uid.

    Killing the namespace's init makes the kernel kill every process in the
    namespace (the code itself runs in a session of its own there); bwrap then
    reaps that init and exits. Killing bwrap first would also end the namespace
    (its init dies with it) but would leave that init for the system's init to
    reap, which not every container's init does. Unisolated, processes that
    left the group survive until their CPU limit. The uid sweep is belt and
    braces: a process of uid X calling ``kill(-1, SIGKILL)`` kills every process of X.
    """
    # Not reaped before killpg (WNOWAIT): see _wait_for_exit.
    running = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
    if running and _kill_namespace_init(proc.pid, info):
        _wait_for_exit(proc.pid, 5.0)  # bwrap reaps its init and exits at once
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if uid is not None:
        # Run as root and drop to the uid in the helper (no preexec_fn in a threaded parent).
        subprocess.run(
            [sys.executable, "-I", "-S", "-B", os.path.abspath(__file__), "--kill-uid", str(uid)],
            env={},
            cwd="/",
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


def _kill_namespace_init(bwrap_pid: int, info: Path) -> bool:
    """SIGKILL the init of bwrap's pid namespace, if it is still bwrap's child; True if signalled.

    The pid comes from bwrap's ``--info-fd``. A pidfd pins the process, and
    the parent check (made while the pidfd shows it alive) makes sure it is
    that init and not an unrelated process that got a recycled pid.
    """
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        pid = int(json.loads(info.read_text() or "{}")["child-pid"])
        pidfd = os.pidfd_open(pid)
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            parent = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
            alive = "Pid:\t-1" not in Path(f"/proc/self/fdinfo/{pidfd}").read_text()
            if parent == bwrap_pid and alive:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                return True
        finally:
            os.close(pidfd)
    return False


def _read_records(path: Path) -> list[dict[str, Any]]:
    """JSON lines the runner wrote to a status/outcome file (ignore torn or foreign lines)."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            with contextlib.suppress(json.JSONDecodeError):
                record = json.loads(line)
                if isinstance(record, dict):
                    records.append(record)
    return records


def _tail(path: Path, chars: int = _DETAIL_CHARS) -> str:
    with open(path, "rb") as fh:
        fh.seek(max(0, os.fstat(fh.fileno()).st_size - 4 * chars))
        return fh.read().decode("utf-8", errors="replace")[-chars:].strip()


def _classify(
    records: list[dict[str, Any]],
    *,
    timed_out: bool,
    returncode: int,
    stdout: str,
    stderr: str,
    seconds: float,
    policy: SandboxPolicy,
    isolation: Isolation,
) -> SandboxResult:
    """Map the exit status and the runner's report of how the code ended to a ``SandboxResult``.

    ``records`` come from a channel the code can write to: they only ever label
    a failure, never turn one into a pass or into an error of the sandbox.
    """

    def result(status: Status, cause: Cause, detail: str) -> SandboxResult:
        return SandboxResult(status == "passed", status, cause, detail, seconds, stdout, str(isolation))

    if timed_out:
        return result("timeout", "timeout", f"exceeded {policy.timeout_s:g}s wall clock; all processes killed")
    if returncode == 0:
        return result("passed", "ok", stderr)
    # bwrap exits 128 + N when the code dies of signal N; Popen reports -N for a direct child.
    signum = -returncode if returncode < 0 else (returncode - 128 if isolation.kind == "bwrap" else 0)
    report = next((r for r in reversed(records) if r.get("event") in ("exception", "exit")), None)
    if report is None and 0 < signum < 65:
        name = _signal_name(signum)
        cause: Cause = {signal.SIGXCPU: "cpu_time", signal.SIGXFSZ: "file_size", signal.SIGKILL: "killed"}.get(
            signum, "signal"
        )
        return result("killed", cause, f"terminated by {name}. {stderr}".strip())
    if report is not None and report.get("event") == "exception":
        cause = report.get("cause") if report.get("cause") in _EXCEPTION_CAUSES else "exception"
        return result("failed", cause, stderr or str(report.get("type")))
    return result("failed", "exit", stderr or f"exit status {returncode}")


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


# --------------------------------------------------------------------------- runner side
# Everything below runs in the sandbox, in ``python -I -S -B sandbox.py --run``:
# standard library only, and nothing here may rely on the pipeline's environment.

_EXCEPTION_CAUSES = frozenset(
    {"assertion", "exception", "memory", "processes", "file_size", "permission", "network", "not_found"}
)


def exception_cause(exc: BaseException) -> str:
    """The ``Cause`` a run that ended with ``exc`` is reported with."""
    import socket

    if isinstance(exc, AssertionError):
        return "assertion"
    if isinstance(exc, MemoryError):
        return "memory"
    if isinstance(exc, RuntimeError) and "can't start new thread" in str(exc):
        return "processes"
    if isinstance(exc, socket.gaierror):
        return "network"
    if isinstance(exc, OSError):
        code = exc.errno
        if code == errno.EAGAIN:  # fork/clone refused by RLIMIT_NPROC
            return "processes"
        if code == errno.EFBIG:
            return "file_size"
        if code in _NETWORK_ERRNOS:
            return "network"
        if code in _PERMISSION_ERRNOS:
            return "permission"
        if code == errno.ENOENT:
            return "not_found"
    return "exception"


def _runner_main(config: dict[str, Any]) -> None:
    """Apply the limits (and, unisolated, the guard), run the code, report how it ended.

    Two channels: ``status`` says whether the runner got ready, and is closed
    before the code starts, so the code cannot fake a failure of the sandbox
    (which stops an evaluation); ``outcome`` says how the code ended, and the
    code may write to it (it only labels a failure).
    """
    status = os.fdopen(config["status_fd"], "w", buffering=1)
    outcome = os.fdopen(config["outcome_fd"], "w", buffering=1)
    try:
        with open(config["program"], encoding="utf-8") as fh:
            code = fh.read()
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        keep = sorted((status.fileno(), outcome.fileno()))
        os.closerange(3, keep[0])  # anything else inherited
        os.closerange(keep[0] + 1, keep[1])
        os.closerange(keep[1] + 1, 1 << 16)
        _set_limits(config)
        if config["guard"] is not None:
            _install_guard(config["guard"])
        _no_new_privs()
        _record(status, event="ready")
    except BaseException as exc:  # noqa: BLE001 -- the sandbox's fault, not the code's: never run the code
        _record(status, event="error", detail=f"{type(exc).__name__}: {exc}")
        os._exit(_SETUP_FAILED_EXIT)
    status.close()
    exit_code = 0
    try:
        # Running the untrusted code is this process's whole purpose; it is confined by now.
        exec(compile(code, "<untrusted>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})  # noqa: S102
    except SystemExit as exc:
        exit_code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exit_code:
            _record(outcome, event="exit", code=exit_code)
    except BaseException as exc:  # noqa: BLE001 -- whatever the code raised is its outcome, reported
        import traceback

        # Start at the code's own frame: the runner's frame is noise in the report.
        traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next if exc.__traceback__ else None)
        with contextlib.suppress(Exception):
            _record(outcome, event="exception", type=type(exc).__name__, cause=exception_cause(exc))
        exit_code = 1
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(exit_code)


def _record(status, **fields: Any) -> None:
    status.write(json.dumps(fields) + "\n")
    status.flush()


def _set_limits(config: dict[str, Any]) -> None:
    """Hard rlimits for the code (inherited by everything it starts)."""
    import resource

    def limit(which: int, value: int) -> None:
        resource.setrlimit(which, (value, value))

    limit(resource.RLIMIT_CORE, 0)
    limit(resource.RLIMIT_CPU, config["cpu_s"])
    limit(resource.RLIMIT_AS, config["memory_bytes"])
    limit(resource.RLIMIT_FSIZE, config["file_bytes"])
    limit(resource.RLIMIT_NOFILE, 64)
    # RLIMIT_NPROC counts the processes of the real uid in the current user
    # namespace: under bwrap exactly the sandbox's; unisolated, all of the
    # caller's, so allow max_procs on top of those (racy, best effort).
    existing = 0 if config["guard"] is None else _count_processes(os.getuid())
    limit(resource.RLIMIT_NPROC, existing + config["max_procs"])


def _count_processes(uid: int) -> int:
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry}/task"))
    return count


def _no_new_privs() -> None:
    """No setuid/file-capability gains for the code or anything it executes."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, ctypes.c_ulong(1), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(err)}")


# --- in-process guard: the unisolated opt-in only (bypassable; see module docstring) ---


def _install_guard(work: str) -> None:
    """Refuse writes outside ``work`` and socket creation at the Python level."""
    import builtins
    import io
    import socket

    root = os.path.realpath(work)

    def inside(path: Any) -> bool:
        if isinstance(path, int):  # an already-open descriptor
            return True
        resolved = os.path.realpath(os.fsdecode(path))
        return resolved == root or resolved.startswith(root + os.sep)

    def refuse(what: str, path: Any) -> None:
        raise PermissionError(errno.EACCES, f"sandbox: {what} outside the work directory is not allowed: {path!r}")

    real_open = builtins.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax+") and not inside(file):
            refuse("writing", file)
        return real_open(file, mode, *args, **kwargs)

    builtins.open = io.open = guarded_open
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    real_os_open = os.open

    def guarded_os_open(path, flags, *args, **kwargs):
        if (flags & write_flags or kwargs.get("dir_fd") is not None) and not inside(path):
            refuse("writing", path)
        return real_os_open(path, flags, *args, **kwargs)

    os.open = guarded_os_open

    def guard_paths(name: str, n_paths: int) -> None:
        real: Callable[..., Any] = getattr(os, name)

        def guarded(*args, **kwargs):
            if kwargs.get("dir_fd") is not None or kwargs.get("src_dir_fd") is not None:
                refuse(name, args[:n_paths])
            paths = [*args[:n_paths], *(kwargs[k] for k in ("path", "src", "dst") if k in kwargs)]
            for path in paths:
                if not inside(path):
                    refuse(name, path)
            return real(*args, **kwargs)

        setattr(os, name, guarded)

    for name in ("remove", "unlink", "rmdir", "mkdir", "chmod", "chown", "truncate", "utime", "mkfifo", "mknod"):
        guard_paths(name, 1)
    for name in ("rename", "replace", "link", "symlink"):
        guard_paths(name, 2)

    def no_network(*args, **kwargs):
        raise PermissionError(errno.EACCES, "sandbox: network access is disabled")

    for name in ("socket", "socketpair", "create_connection", "create_server", "fromfd"):
        setattr(socket, name, no_network)


def _kill_uid(uid: int) -> None:
    """Become ``uid`` and SIGKILL every process of that uid (the final sweep)."""
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    with contextlib.suppress(ProcessLookupError):  # nothing left: the usual case
        os.kill(-1, signal.SIGKILL)


if __name__ == "__main__":
    if sys.argv[1] == "--kill-uid":
        _kill_uid(int(sys.argv[2]))
    elif sys.argv[1] == "--run":
        _runner_main(json.loads(sys.argv[2]))
    else:
        raise SystemExit(f"usage: {sys.argv[0]} --run CONFIG_JSON | --kill-uid UID")
