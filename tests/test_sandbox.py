"""Adversarial programs are contained, scored as failures, and the caller carries on."""

import os
import time

import pytest

from caploc.errors import CaplocError
from caploc.sandbox import ENABLE_ENV, require_code_execution, run_python


def test_correct_and_wrong_programs():
    assert run_python("def f(x):\n    return x + 1\nassert f(1) == 2\n").passed
    result = run_python("def f(x):\n    return x\nassert f(1) == 2\n")
    assert result.status == "failed" and "AssertionError" in result.output


def test_infinite_loop_times_out():
    start = time.perf_counter()
    result = run_python("while True:\n    pass\n", timeout=1.0)
    assert result.status == "timeout" and not result.passed
    assert time.perf_counter() - start < 5


def test_fork_storm_is_contained():
    code = ("import os\n"
            "while True:\n"
            "    try:\n        os.fork()\n    except Exception:\n        import _posixsubprocess\n        break\n"
            "import multiprocessing\n"
            "ps = [multiprocessing.Process(target=time.sleep, args=(60,)) for _ in range(200)]\n"
            "[p.start() for p in ps]\n")
    start = time.perf_counter()
    result = run_python(code, timeout=3.0)
    assert not result.passed
    assert time.perf_counter() - start < 10


def _sandbox_processes() -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = open(f"/proc/{entry}/cmdline", "rb").read().decode(errors="replace")
            except OSError:
                continue
            if "caploc-sandbox-" in cmdline:
                found.append(entry)
    return found


def test_fork_storm_below_the_guard_is_capped_and_killed():
    # libc's fork() directly bypasses the Python-level guard: the process limit and the process-group
    # kill still hold, and no child outlives the sandbox
    code = ("import ctypes, time\n"
            "libc = ctypes.CDLL(None)\n"
            "for _ in range(300):\n"
            "    pid = libc.fork()\n"
            "    if pid == 0:\n"
            "        time.sleep(60)\n"
            "    if pid < 0:\n"
            "        break\n"
            "raise SystemExit(1)\n")
    start = time.perf_counter()
    result = run_python(code, timeout=5.0)
    assert not result.passed
    assert time.perf_counter() - start < 15
    time.sleep(0.2)
    assert _sandbox_processes() == []


def test_huge_allocation_fails_without_hurting_us():
    result = run_python("x = bytearray(10 * 1024 ** 3)\n", memory_mb=512)
    assert result.status == "failed" and "MemoryError" in result.output


def test_deleting_or_overwriting_files_outside_is_refused(tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    for code in (f"import os\nos.remove({str(victim)!r})\n",
                 f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n",
                 f"open({str(victim)!r}, 'w').write('gone')\n",
                 f"import pathlib\npathlib.Path({str(victim)!r}).unlink()\n",
                 f"import pathlib\npathlib.Path({str(victim)!r}).write_text('gone')\n"):
        assert not run_python(code).passed, code
    assert victim.read_text() == "keep me"
    # writing inside its own working directory is allowed
    assert run_python("open('scratch.txt', 'w').write('ok')\nassert open('scratch.txt').read() == 'ok'\n").passed


def test_network_is_unreachable():
    code = ("import socket\n"
            "s = socket.create_connection(('127.0.0.1', 22), timeout=1)\n")
    assert not run_python(code).passed
    code = "import _socket\ns = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)\n"
    assert not run_python(code).passed


@pytest.mark.skipif(os.geteuid() != 0, reason="the network namespace needs root; the guard covers the rest")
def test_network_namespace_holds_below_the_guard():
    # a raw libc socket bypasses the Python guard; the child's own network namespace has no route
    code = ("import ctypes, struct\n"
            "libc = ctypes.CDLL(None)\n"
            "fd = libc.socket(2, 1, 0)\n"
            "addr = struct.pack('=H', 2) + struct.pack('!H', 53) + bytes([1, 1, 1, 1]) + bytes(8)\n"
            "raise SystemExit(0 if fd >= 0 and libc.connect(fd, addr, len(addr)) == 0 else 1)\n")
    assert not run_python(code).passed
    # and the child sees no network interface but loopback
    listing = "print(sorted(l.split(':')[0].strip() for l in open('/proc/net/dev').read().splitlines()[2:]))\n"
    result = run_python(listing)
    assert result.passed and result.output.strip() == "['lo']", result.output


def test_environment_secrets_are_not_visible(monkeypatch):
    monkeypatch.setenv("CAPLOC_TEST_SECRET", "hunter2")
    result = run_python("import os\nprint(sorted(os.environ))\nassert 'CAPLOC_TEST_SECRET' not in os.environ\n")
    assert result.passed and "hunter2" not in result.output


def test_run_continues_after_a_bad_program():
    results = [run_python(c, timeout=1.0) for c in ("while True: pass", "raise SystemExit(3)", "assert 1 + 1 == 2")]
    assert [r.status for r in results] == ["timeout", "failed", "passed"]


def test_code_execution_needs_explicit_opt_in(monkeypatch):
    monkeypatch.delenv(ENABLE_ENV, raising=False)
    with pytest.raises(CaplocError, match="enable it with allow_code_execution"):
        require_code_execution("humaneval")
    require_code_execution("humaneval", allow=True)
    monkeypatch.setenv(ENABLE_ENV, "1")
    require_code_execution("humaneval")
