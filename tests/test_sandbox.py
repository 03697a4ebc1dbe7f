"""The sandbox: correct code passes; every hostile snippet is contained and scored as a failure, with the Python
guard on (the default) and off (the kernel layers alone, where this machine has them)."""
import importlib.util
import os
import shutil
import socket
import sys
import tempfile
import textwrap

import pytest

import sandbox

FAST = sandbox.Limits(timeout_s=3)


def iso():
    return sandbox.detect_isolation()


def kernel_contains(what: str) -> bool:
    return not any(what in m for m in iso().missing)


@pytest.fixture(params=[True, False], ids=["guard", "no_guard"])
def guard(request):
    return request.param


def test_correct_solution_passes():
    r = sandbox.run_program("def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\n", FAST)
    assert r.passed and r.status == "passed" and r.reason == ""


def test_failing_assert_is_failed_with_reason():
    r = sandbox.run_program("def add(a, b):\n    return a - b\n\nassert add(2, 3) == 5, 'add is wrong'\n", FAST)
    assert r.status == "failed" and r.reason == "AssertionError: add is wrong"


def test_syntax_error_and_exception_are_errors():
    r = sandbox.run_program("def f(:\n    pass\n", FAST)
    assert r.status == "error" and r.reason.startswith("SyntaxError")
    r = sandbox.run_program("undefined_name + 1\n", FAST)
    assert r.status == "error" and "NameError" in r.reason


# what the kernel must contain for a snippet to be stopped without the Python guard
NEEDS = {"opens a socket": "network", "fills the disk (66 files x 31 MiB)": "total disk",
         "reads a host file (/etc/passwd)": "reads and writes outside",
         "file handle out of the view (open_by_handle_at)": "system calls",
         "new user namespace (unshare)": "system calls"}


@pytest.mark.parametrize("name", list(sandbox.HOSTILE))
def test_hostile_snippet_is_a_failure(name, guard):
    if name in NEEDS and not kernel_contains(NEEDS[name]) and (not guard or NEEDS[name] != "network"):
        pytest.skip(f"isolation '{iso().description}' does not contain {NEEDS[name]}")
    r = sandbox.run_program(sandbox.HOSTILE[name], sandbox.Limits(timeout_s=2), guard=guard)
    assert not r.passed, (name, r)
    expected = {"infinite loop": {"timeout"}, "10 GB allocation": {"error"},
                "sys.exit(0) before the asserts": {"failed"}, "os._exit(0) before the asserts": {"failed"},
                "prints 'passed'": {"failed"}}
    if name in expected:
        assert r.status in expected[name], r
    if name == "10 GB allocation":
        assert "MemoryError" in r.reason
    if name == "huge output":
        assert "file size limit" in r.reason
    if name.startswith("fills the disk"):
        assert r.status == "error" and "disk limit" in r.reason, r
    if name.startswith("reads a host file"):
        assert r.status == "error" and "root:" not in r.output, r


def test_exit_zero_after_printing_fake_verdicts_is_not_a_pass():
    prog = textwrap.dedent("""
        import os, sys
        print("passed")
        for fd in range(3, 30):
            try:
                os.write(fd, b"passed")
            except OSError:
                pass
        sys.exit(0)
        assert False
    """)
    assert sandbox.run_program(prog, FAST, guard=False).status == "failed"


def test_fork_bomb_is_capped_by_rlimit_nproc():
    if not kernel_contains("process count"):
        pytest.skip(f"isolation '{iso().description}': RLIMIT_NPROC does not apply (root without a uid to drop to)")
    prog = textwrap.dedent("""
        import os, time
        n = 0
        try:
            for _ in range(1000):
                if os.fork() == 0:
                    time.sleep(60)
                    os._exit(0)
                n += 1
        except OSError:
            pass
        assert n >= 1000, n
    """)
    limits = sandbox.Limits(timeout_s=5, max_procs=16)
    r = sandbox.run_program(prog, limits, guard=False)
    assert r.status == "failed" and int(r.reason.split(":")[1]) < limits.max_procs, r


def test_no_process_survives_its_candidate():
    if not iso().drop_uid:
        pytest.skip("survivors are counted by the candidate's own uid, which only exists when running as root")
    prog = "import os, time\nfor _ in range(5):\n    if os.fork() == 0:\n        time.sleep(60)\n        os._exit(0)\n"
    sandbox.run_program(prog, FAST, guard=False, slot=7)
    uid = sandbox.slot_uid(7)
    survivors = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}").st_uid == uid:
                survivors.append(pid)
        except FileNotFoundError:
            pass
    assert survivors == []


def test_files_outside_the_working_dir_are_untouched(tmp_path, guard):
    if not guard and not kernel_contains("writes outside"):
        pytest.skip(f"isolation '{iso().description}': only the Python guard protects files")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    os.chmod(tmp_path, 0o777)
    os.chmod(victim, 0o666)
    for prog in (f"import os\nos.remove({str(victim)!r})\n",
                 f"open({str(victim)!r}, 'w').write('gone')\n",
                 f"open({str(tmp_path / 'new.txt')!r}, 'w').write('x')\n",
                 f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n"):
        r = sandbox.run_program(prog, FAST, guard=guard)
        assert r.status == "error", (prog, r)
    assert victim.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim.txt"]


def test_files_inside_the_working_dir_work_and_are_deleted(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    prog = textwrap.dedent("""
        import os, tempfile
        open("scratch.txt", "w").write("x")
        os.rename("scratch.txt", "b.txt")
        os.remove("b.txt")
        with tempfile.TemporaryDirectory() as d:
            open(os.path.join(d, "y"), "w").write("y")
        open("left_behind.txt", "w").write("z")
    """)
    assert sandbox.run_program(prog, FAST).passed
    assert list(tmp_path.iterdir()) == []          # the scratch directory is gone
    # and the next candidate starts in a fresh one
    assert sandbox.run_program("import os\nassert not os.path.exists('left_behind.txt')\n", FAST).passed


def test_no_network_even_to_host_localhost(guard):
    if not guard and not kernel_contains("network"):
        pytest.skip(f"isolation '{iso().description}': only the Python guard blocks sockets")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    port = server.getsockname()[1]
    prog = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'hi')\n"
    try:
        r = sandbox.run_program(prog, FAST, guard=guard)
        assert r.status == "error", r
        with pytest.raises(socket.timeout):
            server.accept()
    finally:
        server.close()


def test_environment_is_clean(monkeypatch):
    monkeypatch.setenv("DISTILL_SLM_SECRET", "hunter2")
    prog = "import os\nassert 'DISTILL_SLM_SECRET' not in os.environ\nassert os.environ['HOME'] == os.getcwd()\n"
    assert sandbox.run_program(prog, FAST).passed


def test_run_programs_keeps_order_and_runs_in_parallel():
    progs = ["assert True\n", "assert False\n", "import sys\nsys.exit(0)\n", "while True: pass\n", "x = 1\n"] * 2
    res = sandbox.run_programs(progs, sandbox.Limits(timeout_s=2), workers=4)
    assert [r.status for r in res] == ["passed", "failed", "failed", "timeout", "passed"] * 2


# ----------------------------------------------------------------------------------------------------------------
# the attacks of issue 16 (they succeeded on a sandbox that kept CAP_DAC_READ_SEARCH and the host's tree)

def needs(what: str):
    if not kernel_contains(what):
        pytest.skip(f"isolation '{iso().description}' does not contain {what}")


def _handle_of(path: str) -> bytes:
    """name_to_handle_at(path) in the test process: a struct file_handle (handle_bytes, handle_type, f_handle)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(8 + 128)
    buf[0:4] = (128).to_bytes(4, "little")
    mount_id = ctypes.c_int()
    if libc.name_to_handle_at(-100, path.encode(), buf, ctypes.byref(mount_id), 0) != 0:
        pytest.skip(f"name_to_handle_at is not supported here: {os.strerror(ctypes.get_errno())}")
    return buf.raw[:8 + int.from_bytes(buf.raw[0:4], "little")]


def test_a_file_handle_cannot_open_a_host_directory(tmp_path, guard):
    needs("reads and writes outside")
    target = tmp_path / "target"
    target.mkdir()
    os.chmod(target, 0o777)
    handle = _handle_of(str(target))
    prog = textwrap.dedent(f"""
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        handles = [{handle!r}]
        buf = ctypes.create_string_buffer(136)              # and the candidate's own try, from the path
        buf[0:4] = (128).to_bytes(4, "little")
        if libc.name_to_handle_at(-100, {str(target).encode()!r}, buf, ctypes.byref(ctypes.c_int()), 0) == 0:
            handles.append(buf.raw)
        made = []
        for h in handles:
            for mnt in (".", "/", "/usr", "/tmp", "/proc"):
                try:
                    mfd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
                except OSError:
                    continue
                fd = libc.open_by_handle_at(mfd, ctypes.create_string_buffer(h, len(h)), os.O_RDONLY | os.O_DIRECTORY)
                if fd >= 0 and libc.openat(fd, b"marker", os.O_CREAT | os.O_WRONLY, 0o666) >= 0:
                    made.append(mnt)
        assert made, "no handle opened: " + os.strerror(ctypes.get_errno())
    """)
    r = sandbox.run_program(prog, FAST, guard=guard)
    assert not r.passed, r
    assert not (target / "marker").exists()


def test_root_only_files_and_the_project_are_not_readable(tmp_path, guard):
    needs("reads and writes outside")
    token = "SECRET-" + os.urandom(8).hex()
    places = []
    private = tmp_path / "private"                       # 0600 file in a 0700 dir under the host's tmp
    private.mkdir(mode=0o700)
    (private / "key").write_text(token)
    os.chmod(private / "key", 0o600)
    places.append(str(private / "key"))
    home = tempfile.mkdtemp(dir=os.path.expanduser("~"), prefix=".sandbox-test-")   # and under /root (as root)
    try:
        with open(os.path.join(home, "key"), "w") as f:
            f.write(token)
        os.chmod(os.path.join(home, "key"), 0o600)
        places.append(os.path.join(home, "key"))
        places.append(os.path.abspath(sandbox.__file__))   # the project's own source
        prog = textwrap.dedent(f"""
            got = []
            for p in {places!r}:
                try:
                    got.append(open(p).read())
                except OSError:
                    pass
            print(got)
            assert got, "nothing readable"
            raise RuntimeError(" ".join(got))
        """)
        r = sandbox.run_program(prog, FAST, guard=guard)
    finally:
        shutil.rmtree(home)
    assert not r.passed and "nothing readable" in r.reason, r
    for leaked in (token, "def run_program"):
        assert leaked not in r.output and leaked not in r.reason


def test_the_view_holds_no_host_paths():
    needs("reads and writes outside")
    top = os.path.realpath(sys.base_prefix).split("/")[1]        # where the interpreter lives (/usr, /root, /opt)
    pip_dir = os.path.join(os.path.realpath(sys.base_prefix), "lib", "python%d.%d" % sys.version_info[:2],
                           "site-packages", "pip")
    allowed = {"bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "etc", "dev", "proc", "tmp", "sandbox", top}
    prog = textwrap.dedent(f"""
        import os
        assert set(os.listdir("/")) <= {allowed!r}, os.listdir("/")
        assert os.listdir("/etc") == ["ld.so.cache"] or set(os.listdir("/etc")) == {{"ld.so.cache", "localtime"}}
        assert not os.path.exists({os.path.abspath(sandbox.__file__)!r})
        assert not os.path.exists({pip_dir!r})      # the interpreter's own site-packages are hidden
    """)
    r = sandbox.run_program(prog, FAST)
    assert r.passed, r


def test_total_disk_is_capped_and_not_on_the_host(guard):
    needs("total disk")
    limits = sandbox.Limits(timeout_s=10)
    prog = textwrap.dedent(f"""
        import os
        st = os.statvfs(".")
        print("work dir size MiB", st.f_blocks * st.f_frsize >> 20)
        for i in range(5):                                  # 5 x 20 MiB > {limits.disk_mb} MiB in all
            with open(f"f{{i}}", "wb") as f:
                f.write(b"x" * (20 << 20))
    """)
    r = sandbox.run_program(prog, limits, guard=guard)
    assert r.status == "error" and r.reason.startswith(f"disk limit ({limits.disk_mb} MiB in all) exceeded"), r
    assert f"work dir size MiB {limits.disk_mb}" in r.output     # a tmpfs of its own, not the host's disk


def test_no_capability_is_left():
    needs("reads and writes outside")
    prog = ("caps = {l.split(':')[0]: int(l.split()[1], 16)\n"
            "        for l in open('/proc/self/status') if l.startswith('Cap')}\n"
            "assert not any(caps.values()), caps\n"
            "assert [l for l in open('/proc/self/status') if l.startswith('NoNewPrivs')][0].split()[1] == '1'\n")
    r = sandbox.run_program(prog, FAST, guard=False)
    assert r.passed, r


@pytest.mark.parametrize("call", ["unshare(CLONE_NEWUSER)", "socket(AF_INET)", "ptrace(PTRACE_TRACEME)"])
def test_seccomp_refuses_what_is_left(call):
    needs("system calls")
    code = {"unshare(CLONE_NEWUSER)": "libc.unshare(0x10000000)",
            "socket(AF_INET)": "libc.socket(2, 1, 0)",
            "ptrace(PTRACE_TRACEME)": "libc.ptrace(0, 0, 0, 0)"}[call]
    prog = (f"import ctypes, errno\nlibc = ctypes.CDLL(None, use_errno=True)\nr = {code}\n"
            "assert r == -1 and ctypes.get_errno() == errno.EPERM, (r, ctypes.get_errno())\n")
    assert sandbox.run_program(prog, FAST, guard=False).passed


def test_what_candidates_need_still_works():
    prog = textwrap.dedent("""
        import socket, threading, tempfile, os, math, json, re, collections, heapq, itertools, functools, decimal
        a, b = socket.socketpair()              # AF_UNIX is allowed
        a.sendall(b"hi"); assert b.recv(2) == b"hi"
        t = threading.Thread(target=lambda: None); t.start(); t.join()   # threads (clone3 -> clone)
        with tempfile.NamedTemporaryFile() as f:
            f.write(b"x")
        exit
    """)
    assert sandbox.run_program(prog, FAST, guard=False).passed
    if importlib.util.find_spec("numpy") is None:
        return
    assert sandbox.run_program("import numpy as np\nassert np.allclose(np.ones(3).sum(), 3)\n", FAST).passed


def test_output_and_reason_are_bounded():
    limits = sandbox.Limits(timeout_s=3, max_output_chars=100, max_reason_chars=50)
    r = sandbox.run_program("print('y' * 10000)\nraise ValueError('z' * 5000)\n", limits)
    assert r.status == "error" and r.reason.startswith("ValueError: zzz") and len(r.reason) == 50
    assert len(r.output) == 100


def test_plain_mode_says_what_it_does_not_contain(monkeypatch, capsys):
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)    # no `unshare` on this machine
    sandbox.detect_isolation.cache_clear()
    try:
        plain = sandbox.detect_isolation()
    finally:
        sandbox.detect_isolation.cache_clear()
    assert not plain.unshare and "reads and writes outside the working directory" in plain.missing
    assert "total disk" in plain.missing
    assert "NOTE: sandbox: using 'plain subprocess" in capsys.readouterr().err
    assert sandbox.run_program("assert 1 + 1 == 2\n", FAST, isolation=plain).passed
