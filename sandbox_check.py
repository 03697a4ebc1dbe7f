"""Check the sandbox (sandbox.py) on this machine: how each hostile snippet ends, and throughput in candidates/s.

    python sandbox_check.py --self_check           # each hostile snippet, guard on and off, and how it ended
    python sandbox_check.py --bench                # candidates/s for 1, N and 2N workers
    git show main:sandbox.py > /tmp/old_sandbox.py
    python sandbox_check.py --bench --self_check --baseline /tmp/old_sandbox.py   # side by side with another version

With --baseline the same table is measured for that other copy of sandbox.py too, in the same run, round after
round interleaved (this machine is shared: load moves between rounds, so the rows are only comparable when they are
taken together); the table shows the median and the range over --rounds.
"""
from __future__ import annotations

import importlib.util
import os
import statistics
import sys
import time

import cli
import sandbox

BENCH_PROGRAM = "def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\nassert add(-1, 1) == 0\n"


def load_baseline(path: str):
    """Another copy of sandbox.py (a library module), loaded under its own name so both can run side by side."""
    spec = importlib.util.spec_from_file_location("sandbox_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod      # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def variants(baseline: str | None, without_namespaces: bool) -> dict:
    """name -> (module, isolation) to measure; prints what each name stands for."""
    iso = sandbox.detect_isolation()
    out = {"this": (sandbox, iso)}
    print(f"this:     {os.path.abspath(sandbox.__file__)}: {iso.description}")
    if without_namespaces and iso.unshare:
        # as root without a uid drop: a dropped uid cannot start an interpreter that lives under /root
        out["this, no namespaces"] = (sandbox, sandbox.Isolation((), False, iso.seccomp, "plain subprocess"))
    if baseline:
        mod = load_baseline(baseline)
        out["baseline"] = (mod, mod.detect_isolation())
        print(f"baseline: {os.path.abspath(baseline)}: {out['baseline'][1].description}")
    return out


def bench(n: int, workers: list[int], rounds: int, runs: dict, program: str = BENCH_PROGRAM) -> list[dict]:
    """Throughput of `n` copies of a passing program for each (variant, workers), `rounds` times, interleaved."""
    times: dict[tuple[str, int], list[float]] = {}
    passed: dict[tuple[str, int], int] = {}
    for _ in range(rounds):
        for w in workers:
            for name, (mod, iso) in runs.items():
                t0 = time.perf_counter()
                res = mod.run_programs([program] * n, workers=w, isolation=iso)
                times.setdefault((name, w), []).append(n / (time.perf_counter() - t0))
                passed[(name, w)] = min(passed.get((name, w), n), sum(r.passed for r in res))
    return [{"sandbox": name, "workers": w, "candidates": n, "rounds": rounds,
             "candidates_per_s": round(statistics.median(v), 1), "min": round(min(v), 1), "max": round(max(v), 1),
             "passed": passed[(name, w)]} for (name, w), v in times.items()]


def self_check(timeout: float, workers: int | None, runs: dict) -> list[dict]:
    rows = []
    names = list(sandbox.HOSTILE)
    limits = sandbox.Limits(timeout_s=timeout)
    for label, (mod, iso) in runs.items():
        for guard in (True, False):
            res = mod.run_programs([sandbox.HOSTILE[k] for k in names], mod.Limits(timeout_s=timeout)
                                   if mod is not sandbox else limits, workers=workers, guard=guard, isolation=iso)
            for name, r in zip(names, res):
                rows.append({"sandbox": label, "snippet": name, "guard": guard, "status": r.status,
                             "reason": r.reason[:80], "seconds": round(r.duration_s, 2)})
    return rows


def parse_args(argv=None):
    p = cli.parser(__doc__)
    # run
    p.add_argument("--self_check", action="store_true", help="run the hostile snippets and print how each ends")
    p.add_argument("--timeout", type=float, default=3.0, help="wall-clock seconds per candidate in --self_check")
    p.add_argument("--bench", action="store_true", help="measure throughput: candidates/s for 1, N and 2N workers")
    p.add_argument("--bench_n", type=int, default=64, help="candidates per benchmark measurement")
    p.add_argument("--rounds", type=int, default=3, help="benchmark rounds (median and range are shown)")
    p.add_argument("--workers", type=int, default=None, help="parallel candidates (None: one per core)")
    p.add_argument("--baseline", default=None,
                   help="path of another sandbox.py to measure side by side (e.g. `git show main:sandbox.py`; "
                        "None: this one only)")
    p.add_argument("--without_namespaces", action="store_true",
                   help="--bench also measures this sandbox as a plain subprocess (what the namespaces cost)")
    # output
    p.add_argument("--out", default=None, help="write the rows here as JSON (None: print only)")
    return p.parse_args(argv)


def main(args):
    # load
    iso = sandbox.detect_isolation()
    runs = variants(args.baseline, args.without_namespaces and args.bench)
    print("not contained by the kernel here: " + (", ".join(iso.missing) or "nothing on the list in sandbox.py"))
    out = {"isolation": iso.description, "missing": list(iso.missing), "cores": sandbox.default_workers()}
    # run
    if args.self_check:
        check_runs = {k: v for k, v in runs.items() if k != "this, no namespaces"}
        out["self_check"] = rows = self_check(args.timeout, args.workers, check_runs)
        for r in rows:
            print(f"{r['sandbox']:8s} {r['snippet'][:48]:48s} guard={'on ' if r['guard'] else 'off'} "
                  f"{r['status']:8s} {r['seconds']:5.2f}s  {r['reason'][:70]}")
    if args.bench:
        maxw = args.workers or sandbox.default_workers()
        out["bench"] = rows = bench(args.bench_n, sorted({1, maxw, 2 * maxw}), args.rounds, runs)
        print(f"{'sandbox':20} {'workers':>7} {'cand/s (median)':>15} {'range':>13}")
        for r in rows:
            print(f"{r['sandbox']:20} {r['workers']:>7} {r['candidates_per_s']:>15} "
                  f"{str(r['min']) + '-' + str(r['max']):>13}" + ("" if r["passed"] == r["candidates"] else
                                                                   f"  ({r['passed']}/{r['candidates']} passed)"))
    # save
    if args.out:
        from fileio import write_json
        write_json(args.out, out)


if __name__ == "__main__":
    main(parse_args())
