"""The sandbox: correct code passes; every hostile snippet is contained and scored as a failure, with the Python
guard on (the default) and off (the kernel layers alone, where this machine has them)."""
import os
import socket
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


@pytest.mark.parametrize("name", list(sandbox.HOSTILE))
def test_hostile_snippet_is_a_failure(name, guard):
    if name == "opens a socket" and not guard and not kernel_contains("network"):
        pytest.skip(f"isolation '{iso().description}': only the Python guard blocks sockets")
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
