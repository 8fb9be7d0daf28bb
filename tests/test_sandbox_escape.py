"""Adversarial programs against the kernel sandbox, through each isolation mechanism (bubblewrap and caploc's own
namespaces), with caploc running as root AND as an unprivileged user. Every check looks at the effect outside
the sandbox (files, a listener, a victim process, surviving processes), not at the program's exit status."""

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from caploc import sandbox

TEST_USER = "caploc-sandbox-test"
MECHANISMS = ["bwrap", "namespaces"]


def _unprivileged_user() -> tuple[int, int] | None:
    """An ordinary user for the caller: created when we are root (useradd), else None."""
    try:
        entry = pwd.getpwnam(TEST_USER)
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        pass
    if os.geteuid() != 0 or not shutil.which("useradd"):
        return None
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", TEST_USER],
                   check=False, capture_output=True)
    try:
        entry = pwd.getpwnam(TEST_USER)
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return None


def _identities():
    out = []
    if os.geteuid() == 0:
        out.append(pytest.param("root", id="as-root"))
        user = _unprivileged_user()
        out.append(pytest.param("user", id="as-user", marks=pytest.mark.skipif(
            user is None, reason="running as root and no ordinary user could be created (no useradd)")))
    else:
        out.append(pytest.param("root", id="as-root", marks=pytest.mark.skip(
            reason="not root: the as-root half needs root (CI runs it)")))
        out.append(pytest.param("user", id="as-user"))
    return out


def _available(mechanism: str) -> bool:
    return sandbox.probe(mechanism) is not None


def run_attack(identity: str, mechanism: str, code: str, timeout: float = 5.0, memory_mb: int = 512):
    """Run `code` in the sandbox with caploc itself running as `identity`; returns (status, output). The
    program announces itself first, so a sandbox that never ran it cannot pass for one that contained it."""
    code = "print('ATTACK-STARTED', flush=True)\n" + code
    if not _available(mechanism):
        pytest.skip(f"{mechanism} isolation cannot be set up on this machine")
    if identity == "root" or os.geteuid() != 0:
        result = sandbox._run(mechanism, code, timeout, memory_mb, 32)
        assert "ATTACK-STARTED" in result.output, result.output
        return result.status, result.output
    uid, gid = _unprivileged_user()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the caploc process of an ordinary user
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            result = sandbox._run(mechanism, code, timeout, memory_mb, 32)
            payload = json.dumps([result.status, result.output]).encode()
        except BaseException as exc:  # noqa: BLE001 - report anything to the parent
            payload = json.dumps(["error", repr(exc)]).encode()
        os.write(write, payload)
        os._exit(0)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 65536):
        chunks.append(chunk)
    os.close(read)
    os.waitpid(pid, 0)
    status, output = json.loads(b"".join(chunks))
    assert status != "error", output
    assert "ATTACK-STARTED" in output, output
    return status, output


@pytest.fixture
def outside(tmp_path):
    """A world-writable directory with a world-writable file, outside the sandbox."""
    target = tmp_path / "outside"
    target.mkdir()
    target.chmod(0o777)
    tmp_path.chmod(0o755)
    victim = target / "precious.txt"
    victim.write_text("keep me")
    victim.chmod(0o666)
    return target


def _survivors(token: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if token in open(f"/proc/{entry}/cmdline", "rb").read().decode(errors="replace"):
                    found.append(int(entry))
            except OSError:
                pass
    return found


LIBC = "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
ALL = [(identity, mechanism) for identity in _identities() for mechanism in MECHANISMS]


def _cases():
    return [pytest.param(i.values[0], m, id=f"{i.id}-{m}", marks=i.marks) for i, m in ALL]


def test_the_attacks_succeed_without_the_sandbox(outside):
    # the checks below can fail: the same ctypes write, run unsandboxed, does change the file
    victim = outside / "precious.txt"
    code = LIBC + (f"fd = libc.open({str(victim).encode()!r}, os.O_WRONLY | os.O_TRUNC)\n"
                   "libc.write(fd, b'pwned', 5)\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert victim.read_text() == "pwned"


@pytest.mark.parametrize("identity, mechanism", _cases())
def test_files_outside_cannot_be_changed(identity, mechanism, outside):
    victim = outside / "precious.txt"
    code = LIBC + (
        f"print('unlink', libc.unlink({str(victim).encode()!r}))\n"
        f"fd = libc.open({str(victim).encode()!r}, os.O_WRONLY | os.O_TRUNC)\n"
        "print('open', fd, ctypes.get_errno())\n"
        "if fd >= 0: libc.write(fd, b'pwned', 5)\n"
        f"fd = libc.open({str(outside / 'new.txt').encode()!r}, os.O_WRONLY | os.O_CREAT, 0o666)\n"
        "if fd >= 0: libc.write(fd, b'pwned', 5)\n"
        f"libc.rename({str(victim).encode()!r}, {str(outside / 'moved').encode()!r})\n"
        "libc.unlink(b'/etc/hostname')\n"
    )
    status, output = run_attack(identity, mechanism, code)
    assert victim.read_text() == "keep me", output
    assert sorted(p.name for p in outside.iterdir()) == ["precious.txt"], output


@pytest.mark.parametrize("identity, mechanism", _cases())
def test_no_network_even_to_a_local_listener(identity, mechanism):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    received = []

    def accept():
        deadline = time.time() + 8
        while time.time() < deadline:
            try:
                conn, _ = server.accept()
                received.append(conn.recv(100))
            except OSError:
                pass

    thread = threading.Thread(target=accept)
    thread.start()
    code = LIBC + (
        "import struct\n"
        "fd = libc.socket(2, 1, 0)\n"
        "print('socket', fd, ctypes.get_errno())\n"
        f"addr = struct.pack('=H', 2) + struct.pack('!H', {port}) + bytes([127, 0, 0, 1]) + bytes(8)\n"
        "print('connect', libc.connect(fd, addr, len(addr)))\n"
        "print('send', libc.send(fd, b'secret', 6, 0))\n"
        "udp = libc.socket(2, 2, 0)\n"
        "print('udp', udp, libc.sendto(udp, b'secret', 6, 0, addr, len(addr)))\n"
        "raw = libc.socket(17, 3, 0)\n"  # AF_PACKET
        "print('packet', raw)\n"
    )
    status, output = run_attack(identity, mechanism, code)
    thread.join()
    server.close()
    assert received == [], output
    assert "socket -1" in output and "packet -1" in output, output


@pytest.mark.parametrize("identity, mechanism", _cases())
def test_other_processes_cannot_be_read_or_killed(identity, mechanism):
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "--token=hunter3"],
                              env={"CAPLOC_TEST_SECRET": "hunter2", "PATH": "/usr/bin:/bin"})
    try:
        code = LIBC + (
            f"for pid in ({victim.pid}, {os.getpid()}, 1):\n"
            "    for name in ('environ', 'cmdline'):\n"
            "        try:\n"
            "            print(name, open(f'/proc/{pid}/{name}', 'rb').read())\n"
            "        except OSError as exc:\n"
            "            print(name, 'refused', exc.errno)\n"
            f"print('kill', libc.kill({victim.pid}, 9), libc.kill({os.getpid()}, 9), libc.kill(-1, 9))\n"
            f"print('ptrace', libc.ptrace(16, {victim.pid}, 0, 0))\n"
        )
        status, output = run_attack(identity, mechanism, code)
        time.sleep(0.2)
        assert victim.poll() is None, output  # alive
        assert "hunter2" not in output and "hunter3" not in output, output
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.parametrize("identity, mechanism", _cases())
def test_shells_and_exec_cannot_act_outside(identity, mechanism, outside):
    marker = outside / "marker"
    code = LIBC + (
        f"print('system', libc.system(b'echo pwned > {marker}'))\n"
        "pid = libc.fork()\n"
        "if pid == 0:\n"
        "    argv = (ctypes.c_char_p * 4)(b'/bin/sh', b'-c', "
        f"b'echo pwned > {marker}; echo pwned > /tmp/caploc-escaped', None)\n"
        "    libc.execve(b'/bin/sh', argv, None)\n"
        "    os._exit(3)\n"
        "os.waitpid(pid, 0)\n"
    )
    status, output = run_attack(identity, mechanism, code)
    assert not marker.exists(), output
    assert not Path("/tmp/caploc-escaped").exists(), output


@pytest.mark.parametrize("identity, mechanism", _cases())
def test_a_setsid_daemon_does_not_outlive_the_run(identity, mechanism, outside):
    token = f"caploc-daemon-{os.getpid()}-{identity}-{mechanism}"
    marker = outside / "daemon-marker"
    code = LIBC + (
        "import time\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    libc.setsid()\n"
        "    if os.fork() == 0:\n"
        f"        argv = (ctypes.c_char_p * 5)(b'/bin/sh', b'-c', b'sleep 2; echo pwned > {marker}; sleep 30', "
        f"b'{token}', None)\n"
        "        libc.execv(b'/bin/sh', argv)\n"
        "        os._exit(1)\n"
        "    os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
        "print('daemon started')\n"
    )
    status, output = run_attack(identity, mechanism, code)
    time.sleep(3)
    assert _survivors(token) == [], output
    assert not marker.exists(), output


@pytest.mark.parametrize("identity, mechanism", _cases())
def test_fork_memory_and_disk_bombs_are_contained(identity, mechanism):
    token = f"caploc-bomb-{os.getpid()}-{identity}-{mechanism}"
    fork_bomb = LIBC + (
        "import time\n"
        "for _ in range(500):\n"
        "    if libc.fork() == 0:\n"
        f"        argv = (ctypes.c_char_p * 4)(b'/bin/sleep', b'60', b'{token}', None)\n"
        "        libc.execv(b'/bin/sleep', argv)\n"
        "        os._exit(1)\n"
    )
    start = time.perf_counter()
    status, output = run_attack(identity, mechanism, fork_bomb, timeout=3)
    assert time.perf_counter() - start < 15
    time.sleep(0.3)
    assert _survivors(token) == [], output
    status, output = run_attack(identity, mechanism, "x = bytearray(8 * 1024 ** 3)\nprint('allocated')\n",
                                memory_mb=256)
    assert status == "failed" and "allocated" not in output, output
    disk = ("with open('big', 'wb') as f:\n"
            "    for _ in range(64):\n"
            "        f.write(b'x' * (1 << 20))\n"
            "print('wrote 64 MB')\n")
    status, output = run_attack(identity, mechanism, disk)
    assert status == "failed" and "wrote 64 MB" not in output, output


@pytest.mark.parametrize("identity, mechanism", _cases())
def test_an_infinite_loop_ignoring_sigterm_is_killed_on_time(identity, mechanism):
    token = f"caploc-loop-{os.getpid()}-{identity}-{mechanism}"
    code = ("import signal, sys\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            f"sys.argv.append('{token}')\n"
            "while True:\n    pass\n")
    start = time.perf_counter()
    status, output = run_attack(identity, mechanism, code, timeout=1.5)
    assert status == "timeout" and time.perf_counter() - start < 6
    assert _survivors(token) == []


def test_without_isolation_model_code_is_refused(monkeypatch):
    monkeypatch.setattr(sandbox, "probe", lambda mechanism: None)
    with pytest.raises(sandbox.CaplocError, match="cannot isolate model-written code.*bubblewrap"):
        sandbox.run_python("print(1)")


def test_doctor_reports_the_active_layers():
    report = sandbox.layers()
    assert report["in_use"] in ("bwrap", "namespaces")
    active = report[report["in_use"]]
    assert active["available"] and active["pid_namespace"] and active["network_namespace"]
    assert active["seccomp"] and active["no_new_privs"] and active["capabilities_dropped"]
    assert active["filesystem_read_only"]
    proc = subprocess.run([sys.executable, "-m", "caploc.cli", "doctor"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "seccomp" in proc.stdout and f"in use: {report['in_use']}" in proc.stdout, \
        proc.stdout + proc.stderr
