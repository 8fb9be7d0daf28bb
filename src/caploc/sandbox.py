"""Running model-written code (HumanEval, MBPP) in a sandboxed child process, never in ours.

Layers of containment, each on its own enough for the usual accidents of generated code:
- a child process in its own session: a wall-clock timeout kills its whole process group (SIGKILL),
  and so does normal exit, so nothing it started outlives it;
- resource limits: address space (memory cap), CPU seconds, file size, process count, no core dumps;
- a fresh temporary working directory (deleted afterwards), an environment with nothing of ours in it
  (no secrets, no PYTHON* variables), Python in isolated mode (-I);
- when we run as root: a new network namespace (no interfaces but a down loopback) and the child drops
  to the unprivileged `nobody` user, so files outside its directory are read-only to it and the process
  limit applies;
- a guard prelude inside the child's Python that disables process creation, signals, sockets, file
  deletion/renaming and writes outside the working directory (as code-execution harnesses do).

It runs only when enabled explicitly: `--allow-code-execution` or CAPLOC_ALLOW_CODE_EXECUTION=1.
"""

from __future__ import annotations

import ctypes
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from caploc.errors import ParameterError

ENABLE_ENV = "CAPLOC_ALLOW_CODE_EXECUTION"
CLONE_NEWNET = 0x40000000

_GUARD = r'''
import builtins as _b, os as _os, sys as _sys
def _guard():
    import _socket, io, posix, shutil, socket, subprocess
    root = _os.path.realpath(_os.getcwd())
    def blocked(name):
        def refuse(*args, **kwargs):
            raise PermissionError(f"sandbox: {name} is disabled")
        return refuse
    for name in ("fork", "forkpty", "system", "popen", "kill", "killpg", "putenv", "unsetenv", "remove", "unlink",
                 "rmdir", "removedirs", "rename", "renames", "replace", "truncate", "chmod", "chown", "lchown",
                 "chroot", "setuid", "setgid", "link", "symlink", "execv", "execve", "execl", "execle", "execlp",
                 "execlpe", "execvp", "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve",
                 "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp"):
        for module in (_os, posix):  # posix: where os's functions come from
            if hasattr(module, name):
                setattr(module, name, blocked("os." + name))
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, blocked("shutil." + name))
    subprocess.Popen = blocked("subprocess.Popen")
    for name in ("socket", "create_connection", "create_server", "socketpair", "fromfd"):
        setattr(socket, name, blocked("socket." + name))
    _socket.socket = blocked("_socket.socket")
    real_open, real_os_open = _b.open, _os.open
    def inside(path):
        return _os.path.realpath(path).startswith(root + _os.sep)
    def guarded_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, _os.PathLike)) and any(c in mode for c in "wax+") and not inside(file):
            raise PermissionError(f"sandbox: writing outside the working directory: {file}")
        return real_open(file, mode, *args, **kwargs)
    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & (_os.O_WRONLY | _os.O_RDWR | _os.O_CREAT | _os.O_TRUNC | _os.O_APPEND) and not inside(path):
            raise PermissionError(f"sandbox: writing outside the working directory: {path}")
        return real_os_open(path, flags, *args, **kwargs)
    _b.open = io.open = guarded_open
    _os.open = guarded_os_open
_guard()
del _guard
'''


@dataclass(frozen=True)
class SandboxResult:
    status: str  # "passed", "failed" (non-zero exit), "timeout"
    returncode: int | None
    output: str  # the tail of stdout + stderr

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def code_execution_allowed(allow: bool | None = None) -> bool:
    if allow is not None:
        return allow
    return os.environ.get(ENABLE_ENV, "").strip().lower() in ("1", "true", "yes")


def require_code_execution(task_name: str, allow: bool | None = None) -> None:
    if not code_execution_allowed(allow):
        raise ParameterError(f"task {task_name} runs model-written code: enable it with {{allow_code_execution}} "
                             f"or {ENABLE_ENV}=1 (it runs sandboxed, in a child process)", "allow_code_execution")


def _unprivileged_ids() -> tuple[int, int] | None:
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        return 65534, 65534
    return entry.pw_uid, entry.pw_gid


def _world_usable(path: str) -> bool:
    """Whether an unprivileged user can run this file (every directory above it searchable)."""
    import stat

    real = Path(path).resolve()
    try:
        if not real.stat().st_mode & stat.S_IXOTH:
            return False
        return all(parent.stat().st_mode & stat.S_IXOTH for parent in real.parents)
    except OSError:
        return False


def _interpreter(unprivileged: bool) -> str:
    """Our own interpreter, or, when the child drops to `nobody` and cannot reach ours (a Python under
    /root, say), the system's."""
    if not unprivileged or _world_usable(sys.executable):
        return sys.executable
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if _world_usable(candidate):
            return candidate
    return ""


def _limit(kind: int, value: int) -> None:
    try:
        resource.setrlimit(kind, (value, value))
    except (ValueError, OSError):  # a limit above the hard limit we may not raise: keep the lower one
        pass


def run_python(code: str, timeout: float = 10.0, memory_mb: int = 1024, max_processes: int = 32) -> SandboxResult:
    """Run `code` as a Python program in the sandbox; passed iff it exits 0 within `timeout` seconds."""
    workdir = Path(tempfile.mkdtemp(prefix="caploc-sandbox-"))
    ids = _unprivileged_ids()
    interpreter = _interpreter(ids is not None)
    if not interpreter:  # no interpreter `nobody` may run: keep the other layers, stay this user
        ids, interpreter = None, sys.executable
    program = workdir / "program.py"
    program.write_text(_GUARD + "\n" + code, encoding="utf-8")
    out_path = workdir / "output.txt"
    if ids:
        os.chown(workdir, *ids)
        os.chown(program, *ids)
    memory = memory_mb * 1024 * 1024
    cpu_seconds = int(timeout) + 1

    def confine() -> None:  # runs in the child between fork and exec
        os.setsid()
        if ids:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.unshare(CLONE_NEWNET)  # best effort: a failure leaves the guard prelude's socket block
        _limit(resource.RLIMIT_AS, memory)
        _limit(resource.RLIMIT_CPU, cpu_seconds)
        _limit(resource.RLIMIT_FSIZE, 16 * 1024 * 1024)
        _limit(resource.RLIMIT_CORE, 0)
        _limit(resource.RLIMIT_NPROC, max_processes)
        if ids:
            os.setgroups([])
            os.setgid(ids[1])
            os.setuid(ids[0])

    env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir), "LANG": "C.UTF-8",
           "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
    status, returncode = "failed", None
    try:
        with open(out_path, "wb") as sink:
            if ids:
                os.chown(out_path, *ids)
            proc = subprocess.Popen([interpreter, "-I", "-B", str(program)], cwd=workdir, env=env,
                                    stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
                                    preexec_fn=confine, close_fds=True)
            try:
                returncode = proc.wait(timeout=timeout)
                status = "passed" if returncode == 0 else "failed"
            except subprocess.TimeoutExpired:
                status = "timeout"
            finally:
                _kill_group(proc.pid)
                if proc.poll() is None:
                    proc.wait()
        output = out_path.read_bytes()[-2000:].decode("utf-8", "replace")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return SandboxResult(status, returncode, output)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
