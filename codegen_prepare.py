"""Build the CodeGen training files from MBPP's train split, every answer checked in the sandbox.

    python codegen_prepare.py --src ../shared/data/codegen/mbpp.jsonl --outdir data
    python codegen_prepare.py --src ../shared/data/codegen/mbpp.jsonl --outdir data --teacher smollm2-135m --limit 20
    python codegen_prepare.py --synthetic --outdir data
    python codegen_prepare.py --src ../shared/data/codegen/mbpp.jsonl --outdir runs/data_code_both --format both

Writes, in the README's formats (the prompt is the one eval_codegen.py asks: MBPP's task, its tests, and the ask
for one ```python block, so a model is trained on exactly the prompt it is evaluated on; --format humaneval or
both: each task also, or instead, as HumanEval asks, a signature and docstring to complete, codegen.mbpp_as_humaneval,
with the same answers):
  codegen_sft.jsonl  {"input", "output"}          output = the reference solution, in a ```python block
  codegen_kd.jsonl   {"input", "teacher_output"}  a --teacher answer that passed the tests, else the reference
  codegen_dpo.jsonl  {"prompt", "chosen", "rejected"}  chosen passes the tests, rejected verifiably FAILS them
  codegen_prepare.json                             what was done (counts, drops, sources, hashes)
Rejected answers are the teacher's failing samples when --teacher is given, else mutants of the reference (one
operator, comparison, constant or boolean changed, via the ast module) that the sandbox saw fail; chosen and
rejected mutants are both printed by ast.unparse so they differ only in the bug, not in formatting.
Only MBPP's train split (tasks 511-974; --split prompt adds tasks 1-10) is used: never the test split.
--synthetic writes a small generated sample instead (made-up tasks from templates, marked "source": "synthetic"),
and the tasks themselves as MBPP rows in codegen_tasks.jsonl, with n_synthetic / 3 more tasks marked "split": "test"
(never in the training files): a tiny --train_data / --eval_data for codegen_star.py and eval_codegen.py.
"""
import ast
import random
import re
from collections import Counter
from pathlib import Path

import codegen
import sandbox
import cli
from fileio import UserError, check_output_file, note, read_records, sha256_file, user_errors, write_outputs

SYNTHETIC_SOURCE = "synthetic (codegen_prepare.py --synthetic): made-up tasks, not MBPP"


def parse_args(argv=None):
    p = cli.parser(__doc__)
    # model
    p.add_argument("--teacher", default=None,
                   help="optional model whose sampled answers become KD targets (when they pass) and DPO rejected "
                        f"answers (when they fail): {cli.MODEL_SPEC}")
    cli.add_load_args(p)
    p.add_argument("--teacher_samples", type=int, default=4, help="answers sampled per task from --teacher")
    p.add_argument("--temperature", type=float, default=0.8, help="teacher sampling temperature")
    p.add_argument("--max_new_tokens", type=int, default=512, help="teacher answer token limit")
    p.add_argument("--batch_size", type=int, default=8, help="tasks per teacher generate() call")
    # data
    p.add_argument("--src", default=None, help="mbpp.jsonl (MBPP's fields: task_id, prompt, code, test_list, "
                                               "test_setup_code, split)")
    p.add_argument("--split", default="train", choices=list(codegen.MBPP_TRAIN_SPLITS),
                   help="MBPP rows to use (the test split is for evaluation only)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N tasks")
    p.add_argument("--synthetic", action="store_true", help="write a small generated sample instead of MBPP")
    p.add_argument("--n_synthetic", type=int, default=24, help="tasks in the --synthetic sample")
    p.add_argument("--seed", type=int, default=42, help="seed of the mutants and of the synthetic tasks")
    codegen.add_train_format_arg(p, "--format")
    # run
    p.add_argument("--mutants", type=int, default=8, help="mutants tried per task to find a failing rejected answer")
    p.add_argument("--timeout", type=float, default=5.0, help="wall-clock seconds per program in the sandbox")
    p.add_argument("--workers", type=int, default=None, help="programs run in parallel (default: one per core)")
    # output
    p.add_argument("--outdir", default="data", help="folder for codegen_{sft,kd,dpo}.jsonl")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------
# answers

def normalize(code: str) -> str:
    """MBPP's code has CRLF line ends, tabs and trailing spaces: LF, 4-space indents, no trailing blanks."""
    lines = []
    for line in code.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        body = line.lstrip(" \t")
        lines.append(line[:len(line) - len(body)].expandtabs(4) + body.rstrip())
    return "\n".join(lines).strip("\n")


_SWAPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
          ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.Add: ast.Sub,
          ast.Sub: ast.Add, ast.Mult: ast.Add, ast.FloorDiv: ast.Mult, ast.Mod: ast.FloorDiv, ast.And: ast.Or,
          ast.Or: ast.And}


def mutants(code: str, n: int, rng: random.Random) -> list[tuple[str, str]]:
    """Up to n single-edit mutants of `code`, as (description, ast.unparse source): a comparison or arithmetic
    operator swapped, and/or swapped, an integer constant moved by one or a boolean flipped, min/max swapped; as a
    last resort a return value replaced by None."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return []
    sites = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sites += [("compare", node, i) for i, op in enumerate(node.ops) if type(op) in _SWAPS]
        elif isinstance(node, (ast.BinOp, ast.BoolOp, ast.AugAssign)) and type(node.op) in _SWAPS:
            sites.append(("operator", node, None))
        elif isinstance(node, ast.Constant) and type(node.value) in (int, bool):
            sites.append(("constant", node, None))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("min", "max"):
            sites.append(("min/max", node, None))
    rng.shuffle(sites)
    # last resort, for code with none of the above: a return value replaced by None
    sites += [("return", node, None) for node in ast.walk(tree) if isinstance(node, ast.Return) and node.value]
    out, seen = [], {ast.unparse(tree)}
    for kind, node, i in sites:
        if len(out) >= n:
            break
        if kind == "compare":
            old = node.ops[i]
            node.ops[i] = _SWAPS[type(old)]()
            desc = f"{type(old).__name__} -> {type(node.ops[i]).__name__}"
        elif kind == "operator":
            old = node.op
            node.op = _SWAPS[type(old)]()
            desc = f"{type(old).__name__} -> {type(node.op).__name__}"
        elif kind == "constant":
            old = node.value
            node.value = (not old) if type(old) is bool else old + (1 if rng.random() < 0.5 or old == 0 else -1)
            desc = f"{old} -> {node.value}"
        elif kind == "return":
            old = node.value
            node.value = ast.Constant(None)
            desc = "return value -> None"
        else:
            old = node.func.id
            node.func.id = "max" if old == "min" else "min"
            desc = f"{old} -> {node.func.id}"
        src = ast.unparse(tree)
        if src not in seen:
            seen.add(src)
            out.append((f"{kind}: {desc}", src))
        # undo, so each mutant carries exactly one edit
        if kind == "compare":
            node.ops[i] = old
        elif kind == "operator":
            node.op = old
        elif kind in ("constant", "return"):
            node.value = old
        else:
            node.func.id = old
    return out


# ----------------------------------------------------------------------------------------------------------------
# synthetic tasks: (description, reference source, input kind) templates -> MBPP-shaped rows

SYNTHETIC = [
    ("Write a function {name}(xs) that returns the sum of the elements of xs divisible by {k}.",
     "def {name}(xs):\n    return sum(x for x in xs if x % {k} == 0)", "ints"),
    ("Write a function {name}(xs) that returns a new list with every element of xs multiplied by {k}.",
     "def {name}(xs):\n    return [x * {k} for x in xs]", "ints"),
    ("Write a function {name}(xs) that returns how many elements of xs are greater than {k}.",
     "def {name}(xs):\n    count = 0\n    for x in xs:\n        if x > {k}:\n            count += 1\n    return count",
     "ints"),
    ("Write a function {name}(s) that returns the number of vowels (a, e, i, o, u, either case) in the string s.",
     "def {name}(s):\n    return sum(1 for c in s.lower() if c in 'aeiou')", "words"),
    ("Write a function {name}(s) that returns True if the string s reads the same backwards, ignoring case.",
     "def {name}(s):\n    t = s.lower()\n    return t == t[::-1]", "palindromes"),
    ("Write a function {name}(xs) that returns the largest element of xs minus the smallest one.",
     "def {name}(xs):\n    return max(xs) - min(xs)", "ints"),
    ("Write a function {name}(s) that returns the words of s that are longer than {k} characters, in order.",
     "def {name}(s):\n    return [w for w in s.split() if len(w) > {k}]", "sentences"),
    ("Write a function {name}(xs) that clamps every element of xs to the range [{lo}, {hi}].",
     "def {name}(xs):\n    return [min(max(x, {lo}), {hi}) for x in xs]", "ints"),
]
NAMES = ["solve", "compute", "process", "transform", "calc", "answer", "helper", "func"]
WORDS = ["Apple", "banana", "level", "Radar", "python", "code", "noon", "kayak", "table", "Eve", "stats", "model"]


def synthetic_rows(n: int, seed: int) -> list[dict]:
    """MBPP-shaped rows {"task_id","prompt","code","test_list","split"} from the templates above, with asserts
    computed by running the template's own reference (our code, not a model's) on random inputs."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        desc, src, kind = SYNTHETIC[i % len(SYNTHETIC)]
        lo = rng.randint(-5, 0)
        params = {"name": f"{rng.choice(NAMES)}_{i}", "k": rng.randint(2, 5), "lo": lo, "hi": lo + rng.randint(3, 8)}
        code = src.format(**params)
        namespace: dict = {}
        exec(code, namespace)  # noqa: S102 -- our own template, to compute the expected values of the asserts
        fn = namespace[params["name"]]
        tests = []
        for _ in range(3):
            if kind == "ints":
                arg = [rng.randint(-9, 20) for _ in range(rng.randint(1, 7))]
            elif kind == "sentences":
                arg = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
            else:
                arg = rng.choice(WORDS)
            tests.append(f"assert {params['name']}({arg!r}) == {fn(arg)!r}")
        rows.append({"task_id": f"synthetic/{i}", "prompt": desc.format(**params), "code": code,
                     "test_list": tests, "test_setup_code": "", "split": "train"})
    return rows


def synthetic_tasks(n: int, seed: int) -> list[dict]:
    """synthetic_rows(n) as the train split, then n // 3 more rows (the same generator, so the first n do not change)
    as the test split."""
    rows = synthetic_rows(n + n // 3, seed)
    for r in rows[n:]:
        r["split"] = "test"
    return rows


# ----------------------------------------------------------------------------------------------------------------

def load_tasks(args) -> tuple[list[codegen.Problem], dict]:
    if args.synthetic:
        rows = synthetic_tasks(args.n_synthetic, args.seed)
        src = {"src": SYNTHETIC_SOURCE, "seed": args.seed}
    else:
        if not args.src:
            raise UserError("give --src mbpp.jsonl, or --synthetic for a generated sample")
        rows = read_records(args.src, required=("task_id", "prompt", "code", "test_list"))
        src = {"src": str(args.src), "src_sha256": sha256_file(args.src), "split": args.split}
    splits = codegen.MBPP_TRAIN_SPLITS[args.split]
    problems = []
    for r in rows:
        if r.get("split", "train") not in splits:
            continue
        p = codegen.mbpp_problem(r)
        p.meta["original"], p.reference = p.reference, normalize(r["code"])
        problems.append(p)
    if not problems:
        raise UserError(f"{args.src}: no rows in split '{args.split}'")
    # a training task that asks what a test-split task asks would leak the evaluation into training
    test = [codegen.mbpp_problem(r) for r in rows if r.get("split") == "test"]
    problems, src["excluded_test_duplicates"] = codegen.exclude_eval_tasks(problems, test)
    if src["excluded_test_duplicates"]:
        note(f"{len(src['excluded_test_duplicates'])} training tasks ask what a test-split task asks and are left "
             f"out: {', '.join(src['excluded_test_duplicates'])}")
    return problems[:args.limit] if args.limit else problems, src


OUTPUTS = ["codegen_sft.jsonl", "codegen_kd.jsonl", "codegen_dpo.jsonl", "codegen_prepare.json"]  # all or none
TASKS_FILE = "codegen_tasks.jsonl"  # --synthetic: the tasks as MBPP rows


def main(args):
    cli.print_config("codegen_prepare", args)
    out = Path(args.outdir)
    for name in OUTPUTS + ([TASKS_FILE] if args.synthetic else []):  # before the teacher loads and the sandbox runs
        check_output_file(out / name)
    rng = random.Random(args.seed)
    limits = sandbox.Limits(timeout_s=args.timeout)
    # load
    problems, report = load_tasks(args)
    teacher = None
    if args.teacher:
        from transformers import set_seed

        from common import load_model
        set_seed(args.seed)
        model, tok, _ = load_model(args.teacher, quantize=args.quantize, trust_remote_code=args.trust_remote_code,
                                   max_memory_gb=args.max_memory_gb)
        answers = codegen.answer(model, tok, [p.task for p in problems], max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, top_p=0.95, num_samples=args.teacher_samples,
                                 batch_size=args.batch_size, desc="teacher")
        teacher = [[a["raw"] for a in ans] for ans in answers]
    # run: 1) the reference (normalised; else as given) and its unparsed form must pass
    progs, where = [], []
    for i, p in enumerate(problems):
        for form, code in (("normalized", p.reference), ("original", p.meta["original"]),
                           ("unparsed", _unparse(p.reference))):
            if code:
                progs.append(codegen.build_program(p, code))
                where.append((i, form, code))
    ok: dict[int, dict[str, str]] = {}
    for (i, form, code), r in zip(where, sandbox.run_programs(progs, limits, workers=args.workers,
                                                              desc="references")):
        if r.passed:
            ok.setdefault(i, {})[form] = code
    # 2) candidates for rejected (and teacher answers): mutants of the reference, teacher samples
    progs, where = [], []
    for i, p in enumerate(problems):
        if i not in ok:
            continue
        base = ok[i].get("unparsed")
        for desc, code in (mutants(base, args.mutants, rng) if base else []):
            progs.append(codegen.build_program(p, code))
            where.append((i, "mutant: " + desc, code, code))
        for raw in (teacher[i] if teacher else []):
            code = codegen.solution_from_answer(p, raw)
            progs.append(codegen.build_program(p, code))
            where.append((i, "teacher", raw, code))
    found: dict[int, dict[str, list]] = {}
    status = Counter()
    for (i, kind, answer, code), r in zip(where, sandbox.run_programs(progs, limits, workers=args.workers,
                                                                      desc="candidates")):
        key = ("teacher_pass" if r.passed else "teacher_fail") if kind == "teacher" else \
            ("mutant_fail" if not r.passed else "mutant_pass")
        status[f"{key}:{r.status}"] += 1
        found.setdefault(i, {}).setdefault(key, []).append((kind, answer, code, r))
    # 3) the three files: a row per task and prompt form (--format; the answers are whole functions either way)
    prompts: dict[str, list[tuple[str, str]]] = {}
    for v in codegen.train_views(problems, args.format):
        prompts.setdefault(codegen.base_task_id(v.task_id), []).append((v.task_id, codegen.code_request(v.task)))
    sft, kd, dpo, dropped = [], [], [], []
    for i, p in enumerate(problems):
        if i not in ok:
            dropped.append(p.task_id)
            continue
        for tid, prompt in prompts[p.task_id]:
            task_rows(args, tid, prompt, ok[i], found.get(i, {}), sft, kd, dpo)
    # save
    files = {"codegen_sft.jsonl": sft, "codegen_kd.jsonl": kd, "codegen_dpo.jsonl": dpo}
    report.update(tasks=len(problems), format=args.format, dropped_reference_failed=dropped,
                  rows={k: len(v) for k, v in files.items()},
                  dpo_without_failing_candidate=len(sft) - len(dpo), teacher=args.teacher,
                  candidate_results=dict(status), rejected_from=dict(Counter(
                      "teacher" if r["rejected_from"] == "teacher" else r["rejected_from"].split(":")[1].strip()
                      for r in dpo)), isolation=sandbox.detect_isolation().description)
    tasks = {out / TASKS_FILE: [{**r, "source": SYNTHETIC_SOURCE}
                                for r in synthetic_tasks(args.n_synthetic, args.seed)]}
    write_outputs({**{out / name: rows for name, rows in files.items()}, out / "codegen_prepare.json": report,
                   **(tasks if args.synthetic else {})})
    print(f"{len(problems)} tasks ({len(dropped)} dropped: reference failed) -> "
          + ", ".join(f"{out / k} ({len(v)})" for k, v in files.items()))
    return report


def task_rows(args, tid: str, prompt: str, ok: dict, found: dict, sft: list, kd: list, dpo: list) -> None:
    """One task's SFT, KD and DPO rows for one prompt form: ok the reference forms that passed, found the
    candidates by outcome."""
    gold = ok.get("normalized") or ok.get("original") or ok["unparsed"]
    source = SYNTHETIC_SOURCE if args.synthetic else f"mbpp/{tid}"
    sft.append({"input": prompt, "output": codegen.fenced(gold), "source": source})
    t_pass = found.get("teacher_pass", [])
    kd.append({"input": prompt, "teacher_output": t_pass[0][1].strip() if t_pass else codegen.fenced(gold),
               "source": source, "teacher": args.teacher if t_pass else "reference"})
    rejected = _pick_rejected(found.get("teacher_fail", [])) or _pick_rejected(found.get("mutant_fail", []))
    if rejected:
        kind, answer, _, r = rejected
        if kind == "teacher":
            chosen, chosen_from = (t_pass[0][1].strip(), args.teacher) if t_pass else \
                (codegen.fenced(gold), "reference")
            answer = answer.strip()
        else:   # a mutant: the chosen side is printed the same way, so the pair differs only in the bug
            chosen, chosen_from = codegen.fenced(ok["unparsed"]), "reference (ast.unparse)"
            answer = codegen.fenced(answer)
        dpo.append({"prompt": prompt, "chosen": chosen, "rejected": answer, "source": source,
                    "chosen_from": chosen_from, "rejected_from": kind,
                    "rejected_result": f"{r.status}: {r.reason}"[:200]})


def _unparse(code: str) -> str | None:
    try:
        return ast.unparse(ast.parse(code))
    except SyntaxError:
        return None


def _pick_rejected(cands: list) -> tuple | None:
    """Prefer a plausible wrong answer: a real edit over "return None", then an assertion failure over a crash
    or a hang."""
    rank = {"failed": 0, "error": 1, "timeout": 2}
    cands = [c for c in cands if not c[3].passed and re.sub(r"\s", "", c[1])]
    return min(cands, key=lambda c: (c[0].startswith("mutant: return"), rank.get(c[3].status, 3))) if cands else None


if __name__ == "__main__":
    with user_errors():
        main(parse_args())
