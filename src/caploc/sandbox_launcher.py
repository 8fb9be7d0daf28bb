"""Runs inside the sandbox, before the model's program: the kernel-enforced layers that need to be set from within.

Standard library only, and no import of caploc: it is copied into the sandbox's working directory and run by
whichever interpreter the sandbox's unprivileged user may execute.

    python -I -B launcher.py MODE WORKDIR PROGRAM MEMORY_BYTES CPU_SECONDS MAX_PROCESSES FILE_BYTES

MODE "bwrap": bubblewrap has already made the namespaces, the read-only filesystem and the fresh /proc.
MODE "ns": we are uid 0 of a new user namespace, in new mount, network, IPC and UTS namespaces (made by the
parent between fork and exec); this launcher makes every mount read-only but WORKDIR, then forks the first
process of the new PID namespace, which mounts a fresh /proc.
Then, in both modes: resource limits, no new privileges, every capability dropped, a seccomp filter refusing
the system calls test code never needs, and exec of the program.
"""

import ctypes
import ctypes.util
import os
import resource
import signal
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP = 1, 38, 24
MOUNT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
               "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}

# refused with EPERM: tracing and reading other processes, mounts and namespaces, kernel and key management,
# BPF, raw clocks and devices. socket() and socketpair() are refused for every family but AF_UNIX.
DENIED_SYSCALLS = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd", "mount", "umount2", "pivot_root",
    "chroot", "move_mount", "open_tree", "fsopen", "fsmount", "fsconfig", "fspick", "mount_setattr", "setns",
    "unshare", "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key", "kexec_load",
    "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot", "swapon", "swapoff", "acct",
    "quotactl", "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "syslog", "iopl", "ioperm",
    "open_by_handle_at", "name_to_handle_at", "fanotify_init", "sethostname", "setdomainname", "vhangup",
    "lookup_dcookie", "nfsservctl", "personality", "uselib", "ustat", "sysfs", "_sysctl", "io_uring_setup",
)
AF_UNIX = 1
SCMP_ACT_ALLOW, SCMP_ACT_ERRNO_EPERM = 0x7FFF0000, 0x00050000 | 1
SCMP_CMP_NE = 1


class ScmpArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _check(result, what):
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def read_only_filesystem(workdir):
    """Every mount of our (private) mount namespace read-only, then WORKDIR bound read-write over itself."""
    libc = _libc()
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
    # its own mount first (a bind of a read-only mount would be read-only too), then every other one read-only
    _check(libc.mount(workdir.encode(), workdir.encode(), None, MS_BIND, None), "bind the working directory")
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    for fields in mounts:
        point = fields[4].encode().decode("unicode_escape").encode()
        if point == workdir.encode():
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for option in fields[5].split(","):  # flags locked by the parent namespace must be kept
            flags |= MOUNT_FLAGS.get(option, 0)
        libc.mount(None, point, None, flags, None)  # a few pseudo-filesystems refuse; their files stay ours
    probe = os.path.join(workdir, ".write-probe")
    open(probe, "w").close()
    os.unlink(probe)


def mount_proc():
    libc = _libc()
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    _check(libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None), "mount /proc")


def limit(kind, value):
    try:
        resource.setrlimit(kind, (value, value))
    except (ValueError, OSError):  # above a hard limit we may not raise: the lower one stays
        pass


def drop_privileges():
    libc = _libc()
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    for cap in range(64):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            break  # past the last capability this kernel knows (or not permitted: nothing to drop)

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    header, data = Header(0x20080522, 0), (Data * 2)()
    _check(libc.capset(ctypes.byref(header), data), "drop capabilities")


def install_seccomp():
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    seccomp = ctypes.CDLL(name, use_errno=True)
    seccomp.seccomp_init.restype = ctypes.c_void_p
    seccomp.seccomp_init.argtypes = [ctypes.c_uint32]
    seccomp.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                               ctypes.POINTER(ScmpArgCmp)]
    seccomp.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    seccomp.seccomp_load.argtypes = [ctypes.c_void_p]
    ctx = seccomp.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        raise OSError("seccomp_init failed")
    for syscall in DENIED_SYSCALLS:
        number = seccomp.seccomp_syscall_resolve_name(syscall.encode())
        if number >= 0:  # unknown on this architecture: nothing to refuse
            _check(seccomp.seccomp_rule_add_array(ctx, SCMP_ACT_ERRNO_EPERM, number, 0, None), f"deny {syscall}")
    not_unix = (ScmpArgCmp * 1)(ScmpArgCmp(0, SCMP_CMP_NE, AF_UNIX, 0))
    for syscall in ("socket", "socketpair"):
        number = seccomp.seccomp_syscall_resolve_name(syscall.encode())
        _check(seccomp.seccomp_rule_add_array(ctx, SCMP_ACT_ERRNO_EPERM, number, 1, not_unix), f"filter {syscall}")
    _check(seccomp.seccomp_load(ctx), "load the seccomp filter")


def confine_and_exec(program, memory, cpu, nproc, fsize):
    limit(resource.RLIMIT_AS, memory)
    limit(resource.RLIMIT_CPU, cpu)
    limit(resource.RLIMIT_FSIZE, fsize)
    limit(resource.RLIMIT_CORE, 0)
    limit(resource.RLIMIT_NPROC, nproc)
    drop_privileges()
    install_seccomp()
    os.execv(sys.executable, [sys.executable, "-I", "-B", program])


def main():
    mode, workdir, program = sys.argv[1], sys.argv[2], sys.argv[3]
    memory, cpu, nproc, fsize = (int(x) for x in sys.argv[4:8])
    try:
        if mode == "ns":
            read_only_filesystem(workdir)
            pid = os.fork()  # the first process of the new PID namespace: when it ends, all of them end
            if pid:
                _, status = os.waitpid(pid, 0)
                os._exit(os.waitstatus_to_exitcode(status) & 0xFF if os.WIFEXITED(status) else 128 + 9)
            _libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            mount_proc()
        confine_and_exec(program, memory, cpu, nproc, fsize)
    except OSError as exc:  # a layer could not be set up: never run the program without it
        print(f"sandbox setup failed: {exc}", file=sys.stderr)
        os._exit(125)


if __name__ == "__main__":
    main()
