"""sandbox_check.py: the self-check table and the benchmark (against a baseline copy) run and say what they ran."""
import json

import sandbox
import sandbox_check


def test_self_check_and_bench_with_a_baseline(tmp_path, capsys):
    out = tmp_path / "check.json"
    sandbox_check.main(sandbox_check.parse_args(["--self_check", "--timeout", "1", "--bench", "--bench_n", "2",
                                                 "--rounds", "1", "--workers", "1", "--baseline", sandbox.__file__,
                                                 "--out", str(out)]))
    rec = json.loads(out.read_text())
    assert {r["snippet"] for r in rec["self_check"]} == set(sandbox.HOSTILE)
    assert not any(r["status"] == "passed" for r in rec["self_check"] if r["sandbox"] == "this")
    assert {(r["sandbox"], r["workers"]) for r in rec["bench"]} == {("this", 1), ("this", 2), ("baseline", 1),
                                                                      ("baseline", 2)}
    assert all(r["passed"] == 2 and r["candidates_per_s"] > 0 for r in rec["bench"])
    printed = capsys.readouterr().out
    assert "baseline: " in printed and "cand/s" in printed
