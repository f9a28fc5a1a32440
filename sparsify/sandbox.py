"""Run untrusted, model-generated Python code in a separate, confined process.

Used by the HumanEval-style pass@1 evaluation: a completion is arbitrary code,
so it must never run inside the pipeline's own process.

How it works
------------
``run_untrusted`` writes the code to a directory private to the caller and
starts ``python -I -S -B <this file> <config>`` in a new session (its own
process group) with a stripped environment and a fresh temporary working
directory. That child is trusted code -- this module's ``_child_main`` -- and
builds the confinement itself before anything untrusted runs. The setup is done
there rather than in a ``preexec_fn`` because ``preexec_fn`` is unsafe in a
multi-threaded parent (torch, tokenizers and tqdm all start threads), and
because a new pid namespace needs a fork after ``unshare`` anyway.

Process tree: caller -> *launcher* (session leader; enters the namespaces) ->
*init* (pid 1 of the new pid namespace; reaps, reports) -> *main* (applies
limits, drops privileges, runs the code). Stdout/stderr go to files in the
caller's private directory, so a chatty program cannot exhaust the caller's
memory, and ``RLIMIT_FSIZE`` caps them.

Guarantees, honestly
--------------------
Enforced by the kernel when the caller runs as root on Linux (``protections``
in the result lists the ones actually in force for that run):

* ``uid``: the code runs as a dedicated unprivileged uid/gid (one per run,
  from ``SANDBOX_UID_RANGE``), without supplementary groups, with
  ``no_new_privs``. This is what makes ``RLIMIT_NPROC`` effective (the kernel
  never applies it to uid 0) and gives ordinary permission checks: nothing
  private to the caller (e.g. pytest's ``tmp_path``) is readable or writable.
* ``mount``: a private mount namespace in which the whole tree is read-only and
  nosuid, except the per-run work directory. The interpreter's standard library
  is bind-mounted read-only where the unprivileged uid can read it (it may live
  under a 0700 ``/root``). World-writable places (``/tmp``, ``/dev/shm``) are
  read-only too. Nothing propagates back to the host's mount table.
* ``net``: a new network namespace with only a loopback interface that is
  down: no connection anywhere, localhost services included.
* ``pid`` (+ ``procfs``): a new pid namespace; when its init exits -- after the
  code's main process ends, or when the caller kills the group on timeout --
  the kernel kills every process left in it, including ones that called
  ``setsid``. ``/proc`` shows only the namespace. ``ipc``: private SysV IPC.
* always: hard rlimits on CPU seconds, address space, file size, open files and
  processes, no core dumps; a wall-clock timeout that SIGKILLs the process
  group; and a final sweep that kills every process of the run's uid.

Enforced only by an in-process guard (installed always; the *only* file and
network protection when not root or when namespaces are unavailable, e.g. in a
container without CAP_SYS_ADMIN): writes via ``open``/``io.open``/``os.*`` to
paths outside the work directory and socket creation raise
``PermissionError``. The guard is trivially bypassable (``import posix``,
``ctypes``): it stops accidents, not attacks.

As root without a mount namespace, imports work only if the standard library
is readable by other users (true for system Pythons under ``/usr``).

Without root: ``RLIMIT_NPROC`` counts all of the user's processes, so it is set
to the current count plus ``max_procs`` (racy, best effort); processes that
leave the process group survive until their CPU limit; and code running as the
caller's user could reach the caller's files and forge a result. Hostile code
needs the root path (or a VM). In every mode the code may still read
world-readable files and use CPU and memory up to the limits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

Status = Literal["passed", "failed", "timeout", "error", "killed"]

#: Dedicated uids/gids for sandboxed runs (one drawn at random per run), far
#: above any real account, so per-uid process limits and the final "kill
#: everything of this uid" sweep touch only sandboxed processes.
SANDBOX_UID_RANGE = range(2_000_000_000, 2_000_000_000 + 2**20)

_DETAIL_CHARS = 2000
_SETUP_FAILED_EXIT = 70  # launcher's exit code when it could not build the sandbox

# Linux constants (from <sched.h>, <sys/mount.h>, <linux/mount.h>, <sys/prctl.h>).
_CLONE_NEWNS = 0x00020000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
_MS_BIND, _MS_REC, _MS_PRIVATE = 0x1000, 0x4000, 1 << 18
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID = 0x1, 0x2
_AT_FDCWD, _AT_RECURSIVE = -100, 0x8000
_SYS_MOUNT_SETATTR = 442  # one number on all architectures but alpha (unified table, Linux 5.12+)
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS = 1, 38


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run.

    ``status``: ``passed`` (exit 0), ``failed`` (non-zero exit, e.g. an
    exception or failed assert -- including hitting a memory/process/file
    limit, which surfaces as an exception), ``timeout`` (wall clock exceeded,
    group killed), ``killed`` (terminated by a signal, e.g. CPU limit), or
    ``error`` (the sandbox itself could not be set up). ``detail`` is the tail
    of stderr or a reason, ``output`` the tail of stdout. ``protections`` lists
    the kernel mechanisms that were in force (see the module docstring).
    """

    passed: bool
    status: Status
    detail: str
    seconds: float
    output: str = ""
    protections: tuple[str, ...] = ()


def run_untrusted(
    code: str,
    *,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    max_file_mb: int = 1,
    max_procs: int = 16,
    kernel_isolation: bool = True,
) -> SandboxResult:
    """Run ``code`` as ``__main__`` in a confined child process; never in-process.

    Args:
        code: Python source, run with the standard library only (``-S``).
        timeout_s: wall-clock limit; the whole process group is SIGKILLed after it.
        memory_mb: address-space limit per process (``RLIMIT_AS``).
        max_file_mb: largest file the code may write (``RLIMIT_FSIZE``).
        max_procs: processes/threads the code may have at once.
        kernel_isolation: use namespaces and a dedicated uid when running as
            root (see module docstring). False leaves rlimits and the
            in-process guard only (for testing the guard).
    """
    if sys.platform != "linux":
        raise RuntimeError("run_untrusted needs Linux (rlimits, namespaces)")
    if timeout_s <= 0 or memory_mb <= 0 or max_file_mb <= 0 or max_procs <= 0:
        raise ValueError("timeout_s, memory_mb, max_file_mb and max_procs must be positive")
    uid = random.choice(SANDBOX_UID_RANGE) if (kernel_isolation and os.geteuid() == 0) else None
    start = time.monotonic()
    with contextlib.ExitStack() as stack:
        # ``private`` (0700, ours) holds the code and the captured output; the
        # launcher reads the code before it drops privileges, so the sandboxed
        # uid can neither read nor tamper with any of it.
        private = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sparsify-sbx-io-")))
        jail = stack.enter_context(_jail_dir(uid))
        (private / "code.py").write_text(code, encoding="utf-8")
        config = {
            "code_path": str(private / "code.py"),
            "work": str(jail / "work"),
            "lib": str(jail / "lib"),
            "uid": uid,
            "kernel_isolation": kernel_isolation,
            "cpu_s": math.ceil(timeout_s) + 1,
            "memory_bytes": memory_mb * 2**20,
            "file_bytes": max_file_mb * 2**20,
            "max_procs": max_procs,
        }
        with open(private / "stdout", "wb") as out, open(private / "stderr", "wb") as err, \
                open(private / "status", "wb") as status:
            config["status_fd"] = status.fileno()
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", os.path.abspath(__file__), json.dumps(config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                pass_fds=(status.fileno(),),
                cwd=config["work"],
                env=_minimal_env(config["work"]),
                start_new_session=True,
            )
            try:
                timed_out = not _wait_for_exit(proc.pid, timeout_s)
            finally:
                _kill_everything(proc, uid)
        seconds = time.monotonic() - start
        result = _classify(
            _read_records(private / "status"),
            timed_out=timed_out,
            launcher_rc=proc.returncode,
            stdout=_tail(private / "stdout"),
            stderr=_tail(private / "stderr"),
            seconds=seconds,
            timeout_s=timeout_s,
        )
    log.debug("sandbox: %s in %.2fs (%s)", result.status, seconds, ",".join(result.protections))
    return result


# --------------------------------------------------------------------------- parent side


@contextlib.contextmanager
def _jail_dir(uid: int | None) -> Iterator[Path]:
    """A fresh ``<tmp>/sparsify-sbx-*/{work,lib}``; ``work`` owned by the sandbox uid.

    The jail root is world-traversable (0755) so the unprivileged uid can reach
    ``lib`` (stdlib mount points); ``work`` is 0700 and owned by that uid.
    """
    root = Path(tempfile.mkdtemp(prefix="sparsify-sbx-"))
    try:
        root.chmod(0o755)
        (root / "work").mkdir(0o700)
        (root / "lib").mkdir(0o755)
        if uid is not None:
            os.chown(root / "work", uid, uid)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _minimal_env(work: str) -> dict[str, str]:
    """Nothing inherited: no tokens, proxies or PYTHON* variables reach the code."""
    return {"PATH": "/usr/bin:/bin", "HOME": work, "LANG": "C.UTF-8", "TMPDIR": work}


def _wait_for_exit(pid: int, timeout_s: float) -> bool:
    """Wait until ``pid`` exits, *without reaping it*; False on timeout.

    Keeping the launcher unreaped until its group has been killed means its
    pid -- which is also the process group id -- cannot be recycled for an
    unrelated group that ``killpg`` would then hit.
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


def _kill_everything(proc: subprocess.Popen, uid: int | None) -> None:
    """SIGKILL the run's process group, reap the launcher, then sweep the run's uid.

    Killing the group takes the launcher and the namespace init with it, which
    makes the kernel kill everything else in the pid namespace. The uid sweep
    catches processes that escaped the group (``setsid``) when no pid namespace
    was available: a process of uid X calling ``kill(-1, SIGKILL)`` kills every
    process of uid X.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if uid is not None:
        # Run as root and drop to the uid in the helper: the interpreter may not
        # be executable by that uid (e.g. under a 0700 /root).
        subprocess.run(
            [sys.executable, "-I", "-S", "-B", os.path.abspath(__file__), "--kill-uid", str(uid)],
            env={},
            cwd="/",
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


def _read_records(path: Path) -> list[dict[str, Any]]:
    """JSON lines the launcher/init wrote to the status file (ignore a torn last line)."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            with contextlib.suppress(json.JSONDecodeError):
                records.append(json.loads(line))
    return records


def _tail(path: Path, chars: int = _DETAIL_CHARS) -> str:
    with open(path, "rb") as fh:
        fh.seek(max(0, os.fstat(fh.fileno()).st_size - 4 * chars))
        return fh.read().decode("utf-8", errors="replace")[-chars:].strip()


def _classify(
    records: list[dict[str, Any]],
    *,
    timed_out: bool,
    launcher_rc: int | None,
    stdout: str,
    stderr: str,
    seconds: float,
    timeout_s: float,
) -> SandboxResult:
    """Map the status records (and the launcher's fate) to a ``SandboxResult``."""
    events = {record.get("event"): record for record in records}
    done, setup_error = events.get("done"), events.get("error")
    protections = tuple((done or events.get("setup") or {}).get("protections", ()))

    def result(status: Status, detail: str) -> SandboxResult:
        return SandboxResult(status == "passed", status, detail, seconds, stdout, protections)

    if setup_error is not None:
        return result("error", f"sandbox setup failed: {setup_error.get('detail')}")
    if done is None:
        if timed_out:
            return result("timeout", f"exceeded {timeout_s:g}s wall clock; process group killed")
        return result("error", f"sandbox launcher exited with {launcher_rc} without a result: {stderr}")
    if done.get("signal") is not None:
        name = _signal_name(done["signal"])
        return result("killed", f"terminated by {name} (CPU/file limit or crash). {stderr}".strip())
    if done.get("exit") == 0:
        return result("passed", stderr)
    return result("failed", stderr or f"exit status {done.get('exit')}")


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


# --------------------------------------------------------------------------- child side
# Everything below runs in the launcher process started by run_untrusted, under
# ``python -I -S``: standard library only, and nothing here may rely on the
# pipeline's environment.


def _child_main(config: dict[str, Any]) -> None:
    """Launcher: read the code, build namespaces, fork init, wait, exit."""
    status = os.fdopen(config["status_fd"], "w", buffering=1)
    try:
        with open(config["code_path"], encoding="utf-8") as fh:
            code = fh.read()
        protections: list[str] = []
        lib_paths = [p for p in sys.path if os.path.isdir(p)]
        if config["kernel_isolation"] and os.geteuid() == 0:
            protections += _unshare_namespaces()
            if "mount" in protections:
                lib_paths = _confine_filesystem(config["work"], config["lib"], lib_paths)
            if config["uid"] is not None:
                protections.append("uid")
        # After the bind mount: the inherited cwd still points at the read-only
        # mount underneath it.
        os.chdir(config["work"])
        _record(status, event="setup", protections=protections)
    except Exception as exc:  # report and stop: never run code in a half-built sandbox
        _record(status, event="error", detail=f"{type(exc).__name__}: {exc}")
        os._exit(_SETUP_FAILED_EXIT)
    init_pid = os.fork()
    if init_pid == 0:
        _init_process(config, code, lib_paths, protections, status)  # never returns
    os.waitpid(init_pid, 0)
    os._exit(0)


def _init_process(
    config: dict[str, Any], code: str, lib_paths: list[str], protections: list[str], status
) -> None:
    """Namespace init: start the main process, reap orphans, report main's fate, exit.

    When this process (pid 1 of the namespace) exits, the kernel kills every
    process left in the namespace. PR_SET_PDEATHSIG makes it die with the
    launcher, so killing the launcher's group tears everything down.
    """
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    # Only inside our own mount namespace: on the host this would shadow /proc.
    if {"pid", "mount"} <= set(protections) and _mount_fresh_proc():
        protections.append("procfs")
    main_pid = os.fork()
    if main_pid == 0:
        _main_process(config, code, lib_paths, status)  # never returns
    while True:  # orphans are re-parented to us: reap everything until main is gone
        pid, wait_status = os.waitpid(-1, 0)
        if pid == main_pid:
            break
    outcome = (
        {"signal": os.WTERMSIG(wait_status)}
        if os.WIFSIGNALED(wait_status)
        else {"exit": os.WEXITSTATUS(wait_status)}
    )
    _record(status, event="done", protections=protections, **outcome)
    os._exit(0)


def _main_process(config: dict[str, Any], code: str, lib_paths: list[str], status) -> None:
    """Apply limits, drop privileges, install the guard, then run the code."""
    try:
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        keep = status.fileno()
        os.closerange(3, keep)  # anything else inherited
        os.closerange(keep + 1, 1 << 16)
        _set_limits(config)
        _install_guard(config["work"])
        if config["uid"] is not None:
            uid = config["uid"]
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        _prctl(_PR_SET_NO_NEW_PRIVS, 1)
        sys.path[:] = lib_paths
        sys.path_importer_cache.clear()
    except BaseException as exc:  # the sandbox's fault, not the code's: report as an error
        _record(status, event="error", detail=f"{type(exc).__name__}: {exc}")
        os._exit(_SETUP_FAILED_EXIT)
    status.close()  # the code must not be able to forge a result
    try:
        compiled = compile(code, "<untrusted>", "exec")
    except SyntaxError as exc:
        import traceback

        sys.stderr.write("".join(traceback.format_exception_only(type(exc), exc)))
        sys.stderr.flush()
        os._exit(1)
    exit_code = 0
    try:
        exec(compiled, {"__name__": "__main__", "__builtins__": __builtins__})
    except SystemExit as exc:
        exit_code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException as exc:
        import traceback

        # Start at the code's own frame: this function's frame is noise in the report.
        traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next if exc.__traceback__ else None)
        exit_code = 1
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(exit_code)


def _record(status, **fields: Any) -> None:
    status.write(json.dumps(fields) + "\n")
    status.flush()


def _set_limits(config: dict[str, Any]) -> None:
    """Hard rlimits for the main process (inherited by everything it starts)."""
    import resource

    def limit(which: int, value: int) -> None:
        resource.setrlimit(which, (value, value))

    limit(resource.RLIMIT_CORE, 0)
    limit(resource.RLIMIT_CPU, config["cpu_s"])
    limit(resource.RLIMIT_AS, config["memory_bytes"])
    limit(resource.RLIMIT_FSIZE, config["file_bytes"])
    limit(resource.RLIMIT_NOFILE, 64)
    # RLIMIT_NPROC counts every process of the *real uid*. With a dedicated uid
    # that is exactly this run; otherwise allow max_procs on top of what exists.
    existing = 0 if config["uid"] is not None else _count_processes(os.getuid())
    limit(resource.RLIMIT_NPROC, existing + config["max_procs"])


def _count_processes(uid: int) -> int:
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry}/task"))
    return count


# --- kernel mechanisms (root only) ---


def _libc():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def _check(result: int, what: str) -> None:
    if result != 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _prctl(option: int, value: int) -> None:
    import ctypes

    _check(_libc().prctl(option, ctypes.c_ulong(value), 0, 0, 0), f"prctl({option})")


def _unshare_namespaces() -> list[str]:
    """Enter new namespaces one by one; return the names of those that worked.

    The mount namespace is verified by comparing namespace ids, because every
    later mount call must only ever touch our private copy of the mount table.
    """
    libc = _libc()
    host_mount_ns = os.readlink("/proc/self/ns/mnt")
    flags = {"mount": _CLONE_NEWNS, "net": _CLONE_NEWNET, "ipc": _CLONE_NEWIPC, "pid": _CLONE_NEWPID}
    entered = [name for name, flag in flags.items() if libc.unshare(flag) == 0]
    if "mount" in entered and os.readlink("/proc/self/ns/mnt") == host_mount_ns:
        entered.remove("mount")
    return entered


def _confine_filesystem(work: str, lib_root: str, lib_paths: list[str]) -> list[str]:
    """In our private mount namespace: everything read-only + nosuid except ``work``.

    Returns the import paths to use in the sandbox: read-only bind mounts of
    ``lib_paths`` under ``lib_root``, readable by the unprivileged uid even when
    the real location is not (e.g. an interpreter under a 0700 ``/root``).
    """
    import ctypes
    import struct

    libc = _libc()

    def mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
        encode = lambda s: None if s is None else s.encode()  # noqa: E731
        result = libc.mount(encode(source), encode(target), encode(fstype), ctypes.c_ulong(flags), None)
        _check(result, f"mount {target}")

    def set_attr(path: str, flags: int, attr_set: int, attr_clr: int) -> None:
        attr = ctypes.create_string_buffer(struct.pack("QQQQ", attr_set, attr_clr, 0, 0))
        result = libc.syscall(
            ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_int(_AT_FDCWD), path.encode(),
            ctypes.c_uint(flags), attr, ctypes.c_size_t(len(attr.raw)),
        )
        _check(result, f"mount_setattr {path}")

    mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing propagates back to the host
    mount(work, work, None, _MS_BIND | _MS_REC)
    sandbox_paths = []
    for index, path in enumerate(lib_paths):
        target = os.path.join(lib_root, str(index))
        os.mkdir(target, 0o755)
        mount(path, target, None, _MS_BIND | _MS_REC)
        sandbox_paths.append(target)
    set_attr("/", _AT_RECURSIVE, _MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID, 0)
    set_attr(work, 0, 0, _MOUNT_ATTR_RDONLY)
    return sandbox_paths


def _mount_fresh_proc() -> bool:
    """A /proc showing only this pid namespace (best effort)."""
    import ctypes

    libc = _libc()
    flags = ctypes.c_ulong(_MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    return libc.mount(b"proc", b"/proc", b"proc", flags, None) == 0


# --- in-process guard (bypassable; see module docstring) ---


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
        raise PermissionError(f"sandbox: {what} outside the work directory is not allowed: {path!r}")

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
        raise PermissionError("sandbox: network access is disabled")

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
    else:
        _child_main(json.loads(sys.argv[1]))
