"""CodeGen distillation with the sandbox as the verifier (rejection sampling, STaR-style), over several rounds.

    python codegen_star.py --student smollm2-135m --train_data data/codegen_tasks.jsonl --eval_data data/codegen_tasks.jsonl --rounds 1 --num_samples 2 --max_new_tokens 64 --eval_max_new_tokens 64 --sampled_eval_at none --train_args "--max_steps 2" --dpo_args "--max_steps 2" --save_dir runs/codegen_star_demo
    python codegen_star.py --student smollm2-135m --train_data ../shared/data/codegen/mbpp.jsonl --eval_data ../shared/data/codegen/humaneval.jsonl ../shared/data/codegen/mbpp.jsonl --rounds 2 --num_samples 8 --save_dir runs/codegen_star
    python codegen_star.py --student smollm2-135m --teacher Qwen/Qwen2.5-Coder-7B-Instruct --train_data ../shared/data/codegen/mbpp.jsonl --rounds 1 --dry_run --save_dir runs/codegen_rs

Each round: sample --num_samples answers per MBPP-train task from the sampler (--teacher, or without it the current
student itself: STaR), run each with the task's tests in the sandbox (sandbox.py; generated code never runs outside
it), keep the passing ones as SFT / KD targets and pair failing ones with passing ones of the same task as DPO
rejected answers (--train_format both: each task also as HumanEval asks it, codegen.mbpp_as_humaneval). The
round's training files (all rounds so far, deduplicated) are in the project's formats:
  round_R/codegen_sft.jsonl {"input", "output"}   round_R/codegen_kd.jsonl {"input", "teacher_output"}
  round_R/codegen_dpo.jsonl {"prompt", "chosen", "rejected"}   round_R/candidates.jsonl (every sample, its result)
then the round's student is trained from the base --student (a fresh LoRA each round, on the growing data, as STaR
restarts from the base model; a run dir as --student, e.g. an SFT on MBPP's reference solutions, is continued from
its adapter each round) by the project's own trainers, run as commands: sft_train.py (or kd_train.py), then
dpo_train.py on top of it (--ref_model_dir), and evaluated on --eval_data: pass@1 greedy, and pass@1 / pass@10 from
--eval_samples samples at --eval_temperature (Chen et al.'s unbiased estimator) where --sampled_eval_at says.
Round 0 is the base student, before any training. run.json has every round's numbers and the commands it ran;
--dry_run writes round 1's files and prints its commands without training; --resume continues a stopped run after
its last finished round.

Never a test-split task in training: only MBPP's train (or prompt) split is sampled, and any task whose id or text
is also in an --eval_data file or in the train file's own test split is left out; the training files are checked
against those ids before they are written.
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import cli
import codegen
from common import load_model
from fileio import UserError, atomic_open, check_output_dir, note, sha256_file, user_errors, write_json, write_jsonl
from models import resolve_model
from run_record import data_record, save_eval, write_run_json

ROOT = Path(__file__).resolve().parent
TRAIN_CHOICES = ("sft", "sft+dpo", "kd", "kd+dpo", "dpo", "none")
STATE_FILE = "state.json"  # in each finished round_R/: what the next round starts from (--resume)
RESUME_SAME = {"student_arg": "--student", "teacher": "--teacher", "train_data_sha256": "--train_data (its content)",
               "train_format": "--train_format"}  # what a resumed run shares with the run it continues, by flag


def parse_args(argv=None):
    p = cli.parser(__doc__)
    g = p.add_argument_group("model")
    g.add_argument("--student", default="smollm2-135m",
                   help=f"the base student every round trains: {cli.MODEL_SPEC}; a run dir's adapter is continued")
    g.add_argument("--teacher", default=None,
                   help="the sampler of every round (default: the current student itself, STaR)")
    cli.add_load_args(g)
    g = p.add_argument_group("data")
    g.add_argument("--train_data", required=True, help="MBPP-shaped JSONL (task_id, prompt, code, test_list, split)")
    g.add_argument("--train_split", default="train", choices=list(codegen.MBPP_TRAIN_SPLITS),
                   help="MBPP rows sampled for training (the test split never is)")
    codegen.add_train_format_arg(g, "--train_format")
    g.add_argument("--limit", type=int, default=0, help="use only the first N training tasks; 0 = all")
    g.add_argument("--eval_data", nargs="*", default=[],
                   help="HumanEval / MBPP files to evaluate on after every round (MBPP: its test split); their tasks "
                        "are kept out of training")
    g.add_argument("--eval_limit", type=int, default=0, help="evaluate only the first N problems of each; 0 = all")
    g = p.add_argument_group("sampling")
    g.add_argument("--rounds", type=int, default=2, help="sample-verify-train rounds")
    g.add_argument("--num_samples", type=int, default=8, help="answers sampled per training task per round")
    g.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (> 0)")
    g.add_argument("--top_p", type=float, default=0.95, help="nucleus sampling mass")
    g.add_argument("--max_new_tokens", type=int, default=512, help="token limit of each sampled answer")
    g.add_argument("--batch_sequences", type=int, default=64,
                   help="sequences per generate() call at most (prompts per call = this / samples per prompt); a prompt "
                        "that would be padded to over twice its length starts the next call")
    g.add_argument("--max_kept_per_task", type=int, default=4,
                   help="distinct passing answers kept per task (over all rounds): easy tasks do not dominate")
    g.add_argument("--max_pairs_per_task", type=int, default=2, help="DPO pairs per task per round")
    g.add_argument("--timeout", type=float, default=5.0, help="sandbox seconds per training candidate")
    g.add_argument("--workers", type=int, default=None, help="sandbox programs in parallel (default: one per core)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (round R samples with seed + R)")
    g = p.add_argument_group("training")
    g.add_argument("--train", default="sft+dpo", choices=TRAIN_CHOICES,
                   help="what trains each round: SFT (or sequence-level KD) on the passing answers, then DPO on the "
                        "pairs from that adapter; dpo: DPO alone from the base")
    g.add_argument("--train_args", default="--epochs 2 --max_len 1024",
                   help="more flags for sft_train.py / kd_train.py (one string)")
    g.add_argument("--dpo_args", default="--epochs 1 --beta 0.1 --max_len 1024",
                   help="more flags for dpo_train.py (one string)")
    g.add_argument("--dry_run", action="store_true",
                   help="write round 1's files and print its training commands, then stop")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval_max_new_tokens", type=int, default=512, help="token limit of each evaluated answer")
    g.add_argument("--eval_samples", type=int, default=20, help="samples per problem for pass@k")
    g.add_argument("--eval_temperature", type=float, default=0.8, help="temperature of the pass@k samples")
    g.add_argument("--k", default="1,10", help="pass@k values from the samples (k <= --eval_samples)")
    g.add_argument("--eval_at", default="all",
                   help="rounds evaluated at all (greedy pass@1; the two flags below apply within them): all, last, "
                        "none, or a list such as 0,2")
    g.add_argument("--sampled_eval_at", default="all",
                   help="rounds that also get the sampled pass@k evaluation: all, last, none, or a list such as 0,2")
    g.add_argument("--plan_then_code_at", default="none",
                   help="rounds that also get a greedy plan-then-code evaluation: all, last, none, or a list")
    g.add_argument("--eval_timeout", type=float, default=None,
                   help="sandbox seconds per evaluated candidate (default: eval_codegen.py's, 10; 60 for the + sets)")
    g = p.add_argument_group("output")
    g.add_argument("--save_dir", required=True, help="folder for the rounds' data, runs, evaluations and run.json")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --save_dir after its last finished round (same --student, --teacher, "
                        "--train_data and --train_format; --rounds may be raised); an unfinished round is run again")
    return cli.parse(p, argv)


# ----------------------------------------------------------------------------------------------------------------
# tasks: training never sees an evaluation task

def load_train_tasks(path: str, split: str) -> list[codegen.Problem]:
    """MBPP rows of `split` (train, prompt or both) as Problems; only MBPP-shaped files can be trained on."""
    every = codegen.load_problems(path, "all")
    if every[0].kind != "mbpp":
        raise UserError(f"--train_data {path}: not MBPP-shaped (task_id, prompt, code, test_list, split); "
                        "HumanEval and the + sets are for evaluation only")
    splits = codegen.MBPP_TRAIN_SPLITS[split]
    problems = [p for p in every if (p.meta.get("split") or "train") in splits]
    if not problems:
        raise UserError(f"--train_data {path}: no rows in split '{split}'")
    return problems


def check_no_eval_tasks(rows: list[dict], held_out_ids: set[str], where: str) -> None:
    """The last check before a training file is written: no row comes from an evaluation or test-split task."""
    leaked = sorted({r["task_id"] for r in rows if codegen.base_task_id(r["task_id"]) in held_out_ids})
    if leaked:
        raise RuntimeError(f"{where}: rows from held-out tasks {leaked[:5]} would be trained on")


def held_out_tasks(args) -> tuple[dict[str, tuple[str, list]], list[codegen.Problem]]:
    """({name: (file, problems)} evaluated each round, every task training must not see: all of those files' tasks
    (--eval_limit aside), plus the train file's own MBPP test split)."""
    evals, held = {}, []
    for f in args.eval_data:
        name = Path(f).stem
        while name in evals:
            name += "_"
        probs = codegen.load_problems(f)  # MBPP: its test split
        held += probs
        evals[name] = (f, probs[:args.eval_limit] if args.eval_limit else probs)
    try:
        held += codegen.load_problems(args.train_data, "test")
    except UserError:
        pass  # a train file without a test split
    return evals, held


# ----------------------------------------------------------------------------------------------------------------
# verify: passing answers -> SFT / KD targets, failing ones -> DPO rejected

def sort_candidates(problems: list[codegen.Problem], generated: list[tuple[str, str, dict]], results: list, *,
                    max_pairs: int, sampler: str, round_: int) -> tuple[dict, list[dict], list[dict], dict]:
    """({task_id: distinct passing codes}, DPO pairs, every candidate's row, counts). A pair is a passing and a
    failing answer of the same task, both as one ```python block (a failing answer without any code: its text)."""
    by_id = {p.task_id: p for p in problems}
    passed: dict[str, list[str]] = {}
    failed: dict[str, list[tuple[str, object]]] = {}
    rows = []
    for (tid, code, rec), r in zip(generated, results):
        code = codegen.target_code(by_id[tid], code, rec["raw"]).strip()
        rows.append({"task_id": tid, "round": round_, "sampler": sampler, "raw": rec["raw"], "solution": code,
                     "passed": r.passed, "result": r.status if r.passed else f"{r.status}: {r.reason}"[:300]})
        if r.passed:
            if code not in passed.setdefault(tid, []):
                passed[tid].append(code)
        else:
            answer = codegen.fenced(code) if code else rec["raw"].strip()
            if answer and answer not in [a for a, _ in failed.setdefault(tid, [])]:
                failed[tid].append((answer, r))
    pairs = []
    for tid, fails in failed.items():
        goods = passed.get(tid, [])
        for j, (bad, r) in enumerate(fails[:max_pairs] if goods else []):
            chosen = codegen.fenced(goods[j % len(goods)])
            if chosen != bad:
                pairs.append({"prompt": codegen.code_request(by_id[tid].task), "chosen": chosen, "rejected": bad,
                              "task_id": tid, "source": f"mbpp/{tid}", "round": round_, "sampler": sampler,
                              "rejected_result": f"{r.status}: {r.reason}"[:200]})
    n = len(results)
    counts = {"tasks": len(problems), "samples": n, "passed": sum(r.passed for r in results),
              "pass_rate": round(sum(r.passed for r in results) / n, 4) if n else None,
              "tasks_solved": len([t for t in passed if passed[t]]), "distinct_passing": sum(map(len, passed.values())),
              "failed": n - sum(r.passed for r in results), "pairs": len(pairs),
              "status": dict(Counter(r.status for r in results))}
    return passed, pairs, rows, counts


def training_rows(problems: list[codegen.Problem], kept: dict[str, list[str]], sampler_of: dict, max_kept: int):
    """(SFT rows, KD rows) from the passing codes of all rounds so far, at most max_kept per task."""
    by_id = {p.task_id: p for p in problems}
    sft, kd = [], []
    for tid, codes in kept.items():
        for code in codes[:max_kept]:
            prompt, answer = codegen.code_request(by_id[tid].task), codegen.fenced(code)
            meta = {"task_id": tid, "source": f"mbpp/{tid}", "sampler": sampler_of[(tid, code)]}
            sft.append({"input": prompt, "output": answer, **meta})
            kd.append({"input": prompt, "teacher_output": answer, **meta})
    return sft, kd


# ----------------------------------------------------------------------------------------------------------------
# train: the project's own trainers, as commands

def train_commands(args, rdir: Path, has_sft: bool, has_dpo: bool) -> tuple[list[list[str]], Path | None]:
    """(commands, the run dir of the round's student) for --train; a step without data is left out."""
    py, cmds, student = sys.executable, [], None
    first = args.train.split("+")[0]
    if first in ("sft", "kd") and has_sft:
        script, data = ("sft_train.py", "codegen_sft.jsonl") if first == "sft" else ("kd_train.py", "codegen_kd.jsonl")
        student = rdir / first
        cmds.append([py, str(ROOT / script), "--student", args.student, "--data", str(rdir / data),
                     "--save_dir", str(student), *shlex.split(args.train_args)])
    if args.train.endswith("dpo") and has_dpo:
        # on top of the round's SFT run, dpo_train.py takes that run's base as --student (an SFT from a run dir
        # --student continued its adapter); without one it starts from --student itself
        ref, base = (["--ref_model_dir", str(student)], resolve_model(args.student).base_spec) if student \
            else ([], args.student)
        student = rdir / "dpo"
        cmds.append([py, str(ROOT / "dpo_train.py"), "--student", base, *ref, "--data",
                     str(rdir / "codegen_dpo.jsonl"), "--save_dir", str(student), *shlex.split(args.dpo_args)])
    return cmds, student


def run_command(cmd: list[str], log: Path) -> float:
    """Run one trainer command, its output to `log`; a failure is one line naming the log. Returns seconds."""
    print("$ " + shlex.join(cmd), file=sys.stderr, flush=True)
    t0 = time.time()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:]
        raise UserError(f"{Path(cmd[1]).name} failed (exit {rc}; log {log}): {tail[0][:200] if tail else ''}")
    return time.time() - t0


# ----------------------------------------------------------------------------------------------------------------
# evaluate

def rounds_in(spec: str, rounds: int, flag: str) -> set[int]:
    """--eval_at / --sampled_eval_at / --plan_then_code_at: all, last, none, or a comma list of rounds (0 = the
    base)."""
    spec = spec.strip().lower()
    if spec in ("all", "last", "none"):
        return {"all": set(range(rounds + 1)), "last": {rounds}, "none": set()}[spec]
    try:
        out = {int(x) for x in spec.split(",") if x.strip()}
    except ValueError:
        raise UserError(f"{flag} {spec!r}: give all, last, none or rounds such as 0,2") from None
    if not out or not all(0 <= r <= rounds for r in out):
        raise UserError(f"{flag} {spec!r}: rounds run from 0 (the base) to --rounds {rounds}")
    return out


def evaluate(model, tok, evals: dict, args, ks: list[int], *, sampled: bool, plan: bool, out_dir: Path) -> dict:
    """pass@1 greedy on each evaluation set (and pass@k from --eval_samples samples, and greedy plan-then-code,
    where asked), through eval_codegen.py's machinery (codegen.generate_solutions / run_solutions / score)."""
    modes = [("greedy", dict(temperature=0.0, num_samples=1), [1])]
    if plan:
        modes.append(("plan_then_code", dict(temperature=0.0, num_samples=1, plan_then_code=True), [1]))
    if sampled:
        modes.append((f"T{args.eval_temperature:g}x{args.eval_samples}",
                      dict(temperature=args.eval_temperature, num_samples=args.eval_samples, top_p=args.top_p), ks))
    out = {}
    for name, (_, problems) in evals.items():
        plus = "plus" in name.lower() or problems[0].kind == "mbppplus"
        limits = codegen.eval_limits(plus, args.eval_timeout)
        out[name] = {}
        for mode, gen, mode_ks in modes:
            per_call = max(1, args.batch_sequences // gen["num_samples"])
            generated = codegen.generate_solutions(model, tok, problems, max_new_tokens=args.eval_max_new_tokens,
                                                   batch_size=per_call, desc=f"{name} {mode}", **gen)
            results = codegen.run_solutions(problems, generated, limits, workers=args.workers,
                                            desc=f"{name} {mode} tests")
            metrics, _ = codegen.score(problems, generated, results, mode_ks)
            out[name][mode] = metrics
            write_jsonl(out_dir / f"eval_{name}_{mode}.jsonl",
                        [{"task_id": tid, "solution": sol, "passed": r.passed,
                          "result": r.status if r.passed else f"{r.status}: {r.reason}"[:300]}
                         for (tid, sol, _), r in zip(generated, results)])
    return out


class Models:
    """One model in memory at a time: the sampler and the evaluated student are often the same run."""

    def __init__(self, args):
        self.args, self.spec, self.model, self.tok, self.precision = args, None, None, None, None

    def get(self, spec: str):
        if spec != self.spec:
            self.free()
            self.model, self.tok, ms = load_model(spec, quantize=self.args.quantize,
                                                  trust_remote_code=self.args.trust_remote_code,
                                                  max_memory_gb=self.args.max_memory_gb)
            self.spec, self.precision = spec, ms.precision[0]
        return self.model, self.tok

    def free(self):
        """Before a trainer runs on the same GPU."""
        import gc

        import torch
        self.spec = self.model = self.tok = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def table(rounds: list[dict], evals: list[str]) -> str:
    """The per-round results as a text table (what the script prints at the end)."""
    head = f"{'round':>5} {'student':<28} {'samples':>7} {'pass rate':>9} {'solved':>7} {'kept':>5} {'pairs':>5}"
    for e in evals:
        head += f" | {e[:12] + ' p@1':>16} {'p@1 T':>6} {'p@10':>6}"
    lines = [head]
    for r in rounds:
        s = r.get("sampling") or {}
        line = (f"{r['round']:>5} {str(r['student'])[-28:]:<28} {s.get('samples', '-'):>7} "
                f"{s.get('pass_rate', '-') if s else '-':>9} {s.get('tasks_solved', '-'):>7} "
                f"{r.get('sft_rows', '-'):>5} {r.get('dpo_rows', '-'):>5}")
        for e in evals:
            m = (r.get("eval") or {}).get(e, {})
            sampled = next((v for k, v in m.items() if k.startswith("T")), {})
            line += (f" | {m.get('greedy', {}).get('pass@1', '-'):>16} {sampled.get('pass@1', '-'):>6} "
                     f"{sampled.get('pass@10', '-'):>6}")
        lines.append(line)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------

def check_args(args) -> list[int]:
    for flag, v, lo in (("--rounds", args.rounds, 1), ("--num_samples", args.num_samples, 1),
                        ("--eval_samples", args.eval_samples, 1), ("--batch_sequences", args.batch_sequences, 1),
                        ("--max_kept_per_task", args.max_kept_per_task, 1),
                        ("--max_new_tokens", args.max_new_tokens, 1)):
        if v < lo:
            raise UserError(f"{flag} must be at least {lo}, got {v}")
    if args.temperature <= 0 or args.eval_temperature <= 0:
        raise UserError("--temperature and --eval_temperature must be > 0 (several samples per task)")
    try:
        ks = sorted({int(k) for k in args.k.split(",") if k.strip()})
    except ValueError:
        raise UserError(f"--k must be comma-separated integers, got {args.k!r}") from None
    if not ks or ks[0] < 1 or ks[-1] > args.eval_samples:
        raise UserError(f"--k {args.k}: each k must be in 1..--eval_samples ({args.eval_samples})")
    if args.train.startswith("kd") and "--teacher" not in args.train_args and args.teacher is None:
        note("--train kd without a teacher in --train_args: sequence-level KD on the passing answers (as SFT)")
    return ks


def main(args):
    started = time.time()
    cli.print_config("codegen_star", args)
    ks = check_args(args)
    eval_at = rounds_in(args.eval_at, args.rounds, "--eval_at")
    sampled_at = rounds_in(args.sampled_eval_at, args.rounds, "--sampled_eval_at") & eval_at
    plan_at = rounds_in(args.plan_then_code_at, args.rounds, "--plan_then_code_at") & eval_at
    save = check_output_dir(args.save_dir)
    # load
    evals, held = held_out_tasks(args)
    train, excluded = codegen.exclude_eval_tasks(load_train_tasks(args.train_data, args.train_split), held)
    train = codegen.train_views(train[:args.limit] if args.limit else train, args.train_format)
    if not train:
        raise UserError(f"--train_data {args.train_data}: no training tasks left")
    if excluded:
        note(f"{len(excluded)} training tasks are also evaluation / test-split tasks and are left out: "
             f"{', '.join(excluded[:5])}{' ...' if len(excluded) > 5 else ''}")
    held_ids = {p.task_id for p in held}
    print(f"{len(train)} training tasks from {args.train_data}; evaluation: "
          + (", ".join(f"{n} ({len(p)})" for n, (_, p) in evals.items()) or "none"), file=sys.stderr)
    import sandbox
    from transformers import set_seed
    limits = sandbox.Limits(timeout_s=args.timeout)
    models = Models(args)
    kept: dict[str, list[str]] = {}
    sampler_of: dict[tuple, str] = {}
    all_pairs: list[dict] = []
    student, rounds, first = args.student, [], 0
    same = {"student_arg": args.student, "teacher": args.teacher, "train_data_sha256": sha256_file(args.train_data),
            "train_format": args.train_format}  # RESUME_SAME's values, recorded in every round's state
    if args.resume:
        last, state = load_state(save, args.rounds, same)
        student, rounds, all_pairs, kept = state["student"], state["rounds"], state["pairs"], state["kept"]
        sampler_of = {(tid, code): who for tid, code, who in state["sampler_of"]}
        first = last + 1
        note(f"--resume: rounds 0-{last} are done in {save}; round {first} starts from {student}")
    # run
    for r in range(first, args.rounds + 1):
        rdir = save / f"round_{r}"
        rdir.mkdir(parents=True, exist_ok=True)
        rec: dict = {"round": r, "student": student}
        if r > 0:
            sampler = args.teacher or student
            t0 = time.time()
            set_seed(args.seed + r)
            model, tok = models.get(sampler)
            per_call = max(1, args.batch_sequences // args.num_samples)
            generated = codegen.generate_solutions(model, tok, train, max_new_tokens=args.max_new_tokens,
                                                   temperature=args.temperature, top_p=args.top_p,
                                                   num_samples=args.num_samples, batch_size=per_call,
                                                   desc=f"round {r}: sample")
            gen_s = time.time() - t0
            results = codegen.run_solutions(train, generated, limits, workers=args.workers,
                                            desc=f"round {r}: sandbox")
            passed, pairs, cand_rows, counts = sort_candidates(train, generated, results, sampler=sampler,
                                                               max_pairs=args.max_pairs_per_task, round_=r)
            new_kept = 0
            for tid, codes in passed.items():
                for code in codes:
                    if code not in kept.setdefault(tid, []) and len(kept[tid]) < args.max_kept_per_task:
                        kept[tid].append(code)
                        sampler_of[(tid, code)] = sampler
                        new_kept += 1
            all_pairs += pairs
            sft, kd = training_rows(train, kept, sampler_of, args.max_kept_per_task)
            for rows, name in ((sft, "codegen_sft.jsonl"), (kd, "codegen_kd.jsonl"), (all_pairs, "codegen_dpo.jsonl")):
                check_no_eval_tasks(rows, held_ids, str(rdir / name))
            write_jsonl(rdir / "candidates.jsonl", cand_rows)
            write_jsonl(rdir / "codegen_sft.jsonl", sft)
            write_jsonl(rdir / "codegen_kd.jsonl", kd)
            write_jsonl(rdir / "codegen_dpo.jsonl", all_pairs)
            rec.update(sampler=sampler, sampling={**counts, "generate_s": round(gen_s, 1),
                                                  "sandbox_s": round(time.time() - t0 - gen_s, 1)},
                       kept_new=new_kept, rejected_new=len(pairs), sft_rows=len(sft), dpo_rows=len(all_pairs))
            print(f"round {r}: {counts['passed']} of {counts['samples']} samples pass "
                  f"({counts['pass_rate']:.1%}), {counts['tasks_solved']} of {len(train)} tasks solved; kept "
                  f"{new_kept} new ({len(sft)} SFT rows), {len(pairs)} new DPO pairs ({len(all_pairs)})",
                  file=sys.stderr, flush=True)
            cmds, new_student = train_commands(args, rdir, bool(sft), bool(all_pairs))
            rec["commands"] = [shlex.join(c) for c in cmds]
            if args.dry_run:
                print("\n".join(rec["commands"]) or "(nothing to train: no passing answer)")
                rounds.append(rec)
                save_record(args, save, rounds, student, train, excluded, evals, started)
                break
            if args.train != "none" and cmds:
                models.free()
                rec["train_s"] = round(sum(run_command(c, rdir / f"{Path(c[1]).stem}.log") for c in cmds), 1)
                student = str(new_student)
            else:
                note(f"round {r}: nothing to train (--train {args.train}, {len(sft)} SFT rows, {len(all_pairs)} "
                     "pairs): the student stays as it was")
            rec["student"] = student
        if evals and r in eval_at:
            t0 = time.time()
            model, tok = models.get(student)
            rec["precision"] = models.precision
            rec["eval"] = evaluate(model, tok, evals, args, ks, sampled=r in sampled_at, plan=r in plan_at,
                                   out_dir=rdir)
            rec["eval_s"] = round(time.time() - t0, 1)
            for name, m in rec["eval"].items():  # filed as eval_codegen.py files its evaluations, one per mode
                for mode, mm in m.items():
                    save_eval(student, "codegen", evals[name][0], args, {**mm, "round": r, "mode": mode},
                              script="codegen_star.py")
            print(f"round {r}: " + "; ".join(f"{n} " + ", ".join(f"{mode} pass@{k.split('@')[1]} {v}"
                                                                  for mode, mm in m.items()
                                                                  for k, v in mm.items() if k.startswith("pass@"))
                                           for n, m in rec["eval"].items()), file=sys.stderr, flush=True)
        rounds.append(rec)
        save_record(args, save, rounds, student, train, excluded, evals, started)  # after every round
        write_json(rdir / STATE_FILE, {**same, "student": student, "kept": kept, "pairs": all_pairs, "rounds": rounds,
                                       "sampler_of": [[tid, code, who] for (tid, code), who in sampler_of.items()]})
    # save
    metrics = save_record(args, save, rounds, student, train, excluded, evals, started)
    print(table(rounds, list(evals)))
    return metrics


def load_state(save: Path, rounds: int, same: dict) -> tuple[int, dict]:
    """--resume: the last finished round in `save` and the state it left (STATE_FILE), refused where it was made
    with other RESUME_SAME values than `same` or no round up to `rounds` is left; the folders of rounds after it
    (unfinished) are removed, as that round runs again."""
    def number(folder: Path) -> int:  # round_R -> R; -1 for other names
        m = re.fullmatch(r"round_(\d+)", folder.name)
        return int(m.group(1)) if m else -1
    done = sorted((number(p.parent), p) for p in save.glob(f"round_*/{STATE_FILE}") if number(p.parent) >= 0)
    if not done:
        raise UserError(f"--resume: {save} holds no finished round ({STATE_FILE}); run without --resume")
    last, path = done[-1]
    state = json.loads(path.read_text(encoding="utf-8"))
    state.setdefault("train_format", "mbpp")  # a round finished before --train_format existed
    for key, flag in RESUME_SAME.items():
        if state[key] != same[key]:
            raise UserError(f"--resume: {path} was made with another {flag}: give the run's own --student, --teacher, "
                            "--train_data and --train_format, or another --save_dir")
    if last >= rounds:
        raise UserError(f"--resume: all {last} rounds in {save} are done; raise --rounds to run more")
    for p in save.glob("round_*"):
        if number(p) > last and p.is_dir():
            shutil.rmtree(p)
    return last, state


def save_record(args, save: Path, rounds: list[dict], student: str, train, excluded, evals, started) -> dict:
    """run.json (args, versions, data hashes, every round's numbers and commands) and results.txt (the table), so
    a run stopped between rounds keeps what it measured."""
    metrics = {"rounds": len([x for x in rounds if x["round"] > 0]), "final_student": student,
               "train_tasks": len(train), "excluded_eval_tasks": excluded,
               "per_round": [{k: v for k, v in x.items() if k != "commands"} for x in rounds]}
    write_run_json(save, script="codegen_star.py", method="star", args=args, base_model=args.student,
                   data=args.train_data, metrics=metrics, started=started, task="codegen",
                   extra={"eval_data": [data_record(f) for f in args.eval_data],
                          "commands": {x["round"]: x.get("commands", []) for x in rounds}})
    with atomic_open(save / "results.txt") as f:
        f.write(table(rounds, list(evals)) + "\n")
    return metrics


if __name__ == "__main__":
    with user_errors():
        main(parse_args())
