"""Running model-written code (HumanEval, MBPP) in a kernel-enforced sandbox, never in our process.

The boundary is the kernel, for root and for ordinary users alike:
- namespaces: the child runs in new user, mount, PID, network, IPC and UTS namespaces. The whole filesystem is
  read-only but its own temporary working directory, /proc is a fresh one showing only its own processes, the
  only network interface is a down loopback, and the first process of its PID namespace dies with the run, so
  nothing outlives it (not even a process that called setsid). Made by bubblewrap when it is installed, else by
  caploc itself (unshare between fork and exec, then `sandbox_launcher.py` for the mounts);
- as root, the child first drops to an unprivileged uid (nobody), so the namespaces are unprivileged ones;
- a seccomp filter refusing the calls test code never needs (sockets but AF_UNIX, ptrace and reading other
  processes' memory, mount and namespace calls, BPF, keyrings, kernel modules...), every capability dropped and
  no_new_privs set;
- resource limits: address space, CPU seconds, file size, process count, no core dumps; a wall-clock timeout
  that kills the whole process group; an environment with nothing of ours in it; Python in isolated mode;
- a guard prelude inside the child's Python (process creation, signals, sockets, deletes and writes outside
  the working directory disabled), as the code-execution harnesses of human-eval and lm-evaluation-harness
  do: a convenience that gives clear errors, not the boundary.

If neither bubblewrap nor unprivileged user namespaces can be set up, model code is refused with one line
saying why and how to enable one; there is no silent fallback to the guard alone. `caploc doctor` shows which
layers are active. Code runs only when enabled explicitly: `--allow-code-execution` or
CAPLOC_ALLOW_CODE_EXECUTION=1.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from caploc.errors import CaplocError, ParameterError

ENABLE_ENV = "CAPLOC_ALLOW_CODE_EXECUTION"
ISOLATION_ENV = "CAPLOC_SANDBOX"  # force "bwrap" or "namespaces" (tests of each path)
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
NOBODY = 65534
PR_SET_DUMPABLE = 4
SETUP_FAILED = 125  # the launcher's exit status when a layer could not be set up

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


def _sandbox_ids() -> tuple[int, int] | None:
    """As root: the unprivileged uid/gid the child drops to before anything else (None: we are not root)."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return NOBODY, NOBODY


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
    """Our interpreter, or, when the sandbox's user cannot execute ours (`nobody` and a Python under /root, say),
    the system's: the sandbox needs only the standard library."""
    usable = _world_usable if unprivileged else (lambda path: os.access(os.path.realpath(path), os.X_OK))
    for candidate in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        if usable(candidate):
            return candidate
    raise CaplocError("cannot run model-written code: the sandbox drops to the unprivileged user nobody, who can "
                      f"execute neither {sys.executable} nor a system python3 (install python3, or run caploc as an "
                      "ordinary user)")


def _drop_only(ids: tuple[int, int] | None) -> None:
    """Before bubblewrap: its own session, and as root the unprivileged ids (bubblewrap then makes
    unprivileged namespaces)."""
    os.setsid()
    if ids:
        os.setgroups([])
        os.setgid(ids[1])
        os.setuid(ids[0])


def _enter_namespaces(ids: tuple[int, int] | None) -> None:
    """In the child, between fork and exec: drop to the unprivileged ids (as root), then new user, mount,
    network, IPC, UTS and PID namespaces, with uid 0 inside mapped to our own uid outside."""
    _drop_only(ids)
    uid, gid = os.getuid(), os.getgid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)  # changing uid cleared it: /proc/self/*_map would stay root's
    flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWPID
    if libc.unshare(flags) != 0:
        os._exit(SETUP_FAILED)
    for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"0 {uid} 1"),
                       ("/proc/self/gid_map", f"0 {gid} 1")):
        with open(path, "w") as f:
            f.write(text)


def _bwrap_command(workdir: Path) -> list[str]:
    return ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--ro-bind", "/", "/",
            "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "--bind", str(workdir), str(workdir),
            "--chdir", str(workdir), "--cap-drop", "ALL", "--"]


def _launch(mechanism: str, workdir: Path, program: Path, ids, timeout: float, memory_mb: int,
            max_processes: int, sink) -> tuple[str, int | None]:
    interpreter = _interpreter(ids is not None)
    launcher = workdir / "launcher.py"
    launcher.write_text(resources.files("caploc").joinpath("sandbox_launcher.py").read_text(encoding="utf-8"))
    limits = [str(memory_mb * 1024 * 1024), str(int(timeout) + 1), str(max_processes), str(16 * 1024 * 1024)]
    mode = "bwrap" if mechanism == "bwrap" else "ns"
    command = [interpreter, "-I", "-B", str(launcher), mode, str(workdir), str(program), *limits]
    if mechanism == "bwrap":
        command = _bwrap_command(workdir) + command
        preexec = functools.partial(_drop_only, ids)
    else:
        preexec = functools.partial(_enter_namespaces, ids)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir), "LANG": "C.UTF-8",
           "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
    if ids:
        for path in (workdir, program, launcher):
            os.chown(path, *ids)
    proc = subprocess.Popen(command, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=sink,
                            stderr=subprocess.STDOUT, preexec_fn=preexec, close_fds=True)
    try:
        returncode = proc.wait(timeout=timeout)
        return ("passed" if returncode == 0 else "failed"), returncode
    except subprocess.TimeoutExpired:
        return "timeout", None
    finally:
        _kill_group(proc.pid)
        if proc.poll() is None:
            proc.wait()


def _run(mechanism: str, code: str, timeout: float, memory_mb: int, max_processes: int,
         guard: bool = True) -> SandboxResult:
    workdir = Path(tempfile.mkdtemp(prefix="caploc-sandbox-"))
    try:
        ids = _sandbox_ids()
        program = workdir / "program.py"
        program.write_text((_GUARD + "\n" if guard else "") + code, encoding="utf-8")
        out_path = workdir / "output.txt"
        with open(out_path, "wb") as sink:
            status, returncode = _launch(mechanism, workdir, program, ids, timeout, memory_mb, max_processes, sink)
        raw = out_path.read_bytes()
        # the beginning (what ran first) and the end (how it ended) of long output
        raw = raw if len(raw) <= 3000 else raw[:1000] + b"\n[...]\n" + raw[-2000:]
        output = raw.decode("utf-8", "replace")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return SandboxResult(status, returncode, output)


_PROBE = r"""
import json, os, socket
report = {"uid": os.getuid(), "pid": os.getpid(),
          "processes": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
          "interfaces": sorted(l.split(":")[0].strip() for l in open("/proc/net/dev").read().splitlines()[2:])}
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
report["seccomp"] = status.get("Seccomp", "").strip() == "2"
report["no_new_privs"] = status.get("NoNewPrivs", "").strip() == "1"
report["capabilities"] = status.get("CapEff", "").strip()
try:
    socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    report["inet_socket"] = "allowed"
except OSError as exc:
    report["inet_socket"] = exc.strerror
for where in ("/", "/tmp", os.path.expanduser("~")):
    try:
        with open(os.path.join(where, ".caploc-probe"), "w"):
            pass
        os.unlink(os.path.join(where, ".caploc-probe"))
        report["writable:" + where] = True
    except OSError:
        report["writable:" + where] = False
print("PROBE" + json.dumps(report))
"""


PROBE_FAILURES: dict[str, str] = {}  # mechanism -> why its probe failed


@functools.lru_cache(maxsize=None)
def probe(mechanism: str) -> dict | None:
    """What a program sees from inside the sandbox built by `mechanism` (None: it cannot be built here)."""
    if mechanism == "bwrap" and not shutil.which("bwrap"):
        PROBE_FAILURES[mechanism] = "not installed"
        return None
    try:
        result = _run(mechanism, _PROBE, timeout=20.0, memory_mb=1024, max_processes=32, guard=False)
    except (OSError, CaplocError, subprocess.SubprocessError) as exc:
        PROBE_FAILURES[mechanism] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return None
    line = next((l for l in result.output.splitlines() if l.startswith("PROBE")), None)
    if result.passed and line:
        return json.loads(line[5:])
    PROBE_FAILURES[mechanism] = (result.output.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
    return None


def isolation() -> str:
    """The mechanism model code runs under: bubblewrap when it works here, else caploc's own namespaces;
    CAPLOC_SANDBOX=bwrap|namespaces forces one. Raises when neither can be set up."""
    forced = os.environ.get(ISOLATION_ENV, "").strip()
    for mechanism in ([forced] if forced else ["bwrap", "namespaces"]):
        if mechanism not in ("bwrap", "namespaces"):
            raise ParameterError(f"{ISOLATION_ENV}={forced!r}: choose bwrap or namespaces", "sandbox")
        if probe(mechanism) is not None:
            return mechanism
    raise CaplocError("cannot isolate model-written code on this machine (bubblewrap: "
                      f"{PROBE_FAILURES.get('bwrap', 'failed')}; own namespaces: "
                      f"{PROBE_FAILURES.get('namespaces', 'failed')}): install bubblewrap (apt install bubblewrap) "
                      "or enable unprivileged user namespaces (sysctl user.max_user_namespaces=10000 "
                      "kernel.unprivileged_userns_clone=1), and libseccomp2; `caploc doctor` shows each layer")


def layers() -> dict:
    """Which containment layers are active on this machine, from a probe run inside each mechanism."""
    report = {"running_as": "root" if os.geteuid() == 0 else f"uid {os.geteuid()}",
              "drops_to": (f"uid {_sandbox_ids()[0]} (nobody)" if _sandbox_ids() else "runs as this user")}
    for mechanism in ("bwrap", "namespaces"):
        seen = probe(mechanism)
        if seen is None:
            report[mechanism] = {"available": False}
            continue
        report[mechanism] = {
            "available": True,
            "pid_namespace": seen["pid"] <= 2 and len(seen["processes"]) <= 3,
            "network_namespace": seen["interfaces"] == ["lo"],
            "filesystem_read_only": not seen["writable:/"],  # /tmp, where writable, is the sandbox's own tmpfs
            "seccomp": seen["seccomp"] and seen["inet_socket"] != "allowed",
            "no_new_privs": seen["no_new_privs"],
            "capabilities_dropped": set(seen["capabilities"]) <= {"0"},
            "probe": seen,
        }
    try:
        report["in_use"] = isolation()
    except CaplocError as exc:
        report["in_use"] = None
        report["refusal"] = str(exc)
    return report


def run_python(code: str, timeout: float = 10.0, memory_mb: int = 1024, max_processes: int = 32) -> SandboxResult:
    """Run `code` as a Python program in the sandbox; passed iff it exits 0 within `timeout` seconds."""
    result = _run(isolation(), code, timeout, memory_mb, max_processes)
    if result.returncode == SETUP_FAILED and "sandbox setup failed" in result.output:
        raise CaplocError(f"the sandbox could not be set up: {result.output.strip().splitlines()[-1]}")
    return result


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
