"""codegen_prepare.py: the README's three formats, chosen answers that pass and rejected answers that fail in the
sandbox, the prompt eval_codegen.py asks, MBPP's train split only, the synthetic sample, and bad input."""
import ast
import json
import random

import pytest

import codegen
import codegen_prepare
import sandbox
from fileio import UserError
from conftest import shared_data

MBPP_ROWS = [
    {"task_id": 1, "prompt": "Write a function to add two numbers.", "code": "def add(a, b):\r\n\treturn a + b",
     "test_setup_code": "", "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"], "split": "train"},
    {"task_id": 2, "prompt": "Write a function to check if a number is even.",
     "code": "def is_even(n):\r\n  return n % 2 == 0", "test_setup_code": "",
     "test_list": ["assert is_even(4)", "assert not is_even(3)"], "split": "train"},
    {"task_id": 3, "prompt": "A test-split task that must never be trained on.", "code": "def t():\n    return 1",
     "test_setup_code": "", "test_list": ["assert t() == 1"], "split": "test"},
    {"task_id": 4, "prompt": "Broken reference.", "code": "def b():\n    return 2", "test_setup_code": "",
     "test_list": ["assert b() == 3"], "split": "train"},
]


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def program_for(prompt: str, code_block: str, problems: dict) -> str:
    p = problems[prompt]
    return codegen.build_program(p, codegen.solution_from_answer(p, code_block))


def check_files(out, problems_by_prompt):
    sft, kd, dpo = (read(out / f"codegen_{m}.jsonl") for m in ("sft", "kd", "dpo"))
    assert all(set(r) >= {"input", "output"} and r["output"].startswith("```python\n") for r in sft)
    assert all(set(r) >= {"input", "teacher_output"} for r in kd)
    assert all(set(r) >= {"prompt", "chosen", "rejected"} and r["chosen"] != r["rejected"] for r in dpo)
    # every chosen passes and every rejected fails, run again here
    progs = [program_for(r["prompt"], r["chosen"], problems_by_prompt) for r in dpo]
    progs += [program_for(r["prompt"], r["rejected"], problems_by_prompt) for r in dpo]
    progs += [program_for(r["input"], r["output"], problems_by_prompt) for r in sft]
    res = sandbox.run_programs(progs, sandbox.Limits(timeout_s=5))
    n = len(dpo)
    assert all(r.passed for r in res[:n]) and not any(r.passed for r in res[n:2 * n])
    assert all(r.passed for r in res[2 * n:])
    return sft, kd, dpo


def test_mbpp_rows_become_verified_sft_kd_dpo(tmp_path):
    src = tmp_path / "mbpp.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in MBPP_ROWS))
    rep = codegen_prepare.main(codegen_prepare.parse_args(["--src", str(src), "--outdir", str(tmp_path / "out"),
                                                           "--timeout", "3"]))
    problems = {codegen.code_request(p.task): p for p in map(codegen.mbpp_problem, MBPP_ROWS)}
    sft, kd, dpo = check_files(tmp_path / "out", problems)
    # the test-split task is never used; the task whose reference fails its own tests is dropped
    assert [r["source"] for r in sft] == ["mbpp/1", "mbpp/2"] and rep["dropped_reference_failed"] == ["4"]
    # the prompt is the one eval_codegen.py asks for the same task
    assert sft[0]["input"] == codegen.code_request(codegen.mbpp_problem(MBPP_ROWS[0]).task)
    # CRLF and tabs normalised
    assert sft[0]["output"] == "```python\ndef add(a, b):\n    return a + b\n```"
    assert [r["teacher"] for r in kd] == ["reference", "reference"]
    assert len(dpo) == 2 and all(r["rejected_from"].startswith("mutant") for r in dpo)
    assert json.loads((tmp_path / "out" / "codegen_prepare.json").read_text())["rows"]["codegen_dpo.jsonl"] == 2


def test_format_both_adds_each_task_as_humaneval_asks_it(tmp_path):
    """--format both: every task also as a signature and docstring to complete (HumanEval's form), the same
    answers, each verified under its own prompt, the test split still out."""
    src = tmp_path / "mbpp.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in MBPP_ROWS))
    rep = codegen_prepare.main(codegen_prepare.parse_args(["--src", str(src), "--outdir", str(tmp_path / "out"),
                                                           "--timeout", "3", "--format", "both"]))
    views = codegen.train_views([codegen.mbpp_problem(r) for r in MBPP_ROWS], "both")
    sft, kd, dpo = check_files(tmp_path / "out", {codegen.code_request(v.task): v for v in views})
    assert [r["source"] for r in sft] == ["mbpp/1", "mbpp/1/he", "mbpp/2", "mbpp/2/he"] and rep["format"] == "both"
    he = sft[1]["input"]
    assert he.startswith("Complete the following Python function.") and ">>> add(1, 2)\n    3\n" in he
    assert ">>> is_even(4)\n    True\n" in sft[3]["input"]
    assert sft[1]["output"] == sft[0]["output"] and len(kd) == 4 and len(dpo) == 4


def test_synthetic_sample_is_marked_and_verified(tmp_path):
    codegen_prepare.main(codegen_prepare.parse_args(["--synthetic", "--n_synthetic", "8", "--outdir",
                                                     str(tmp_path)]))
    rows = codegen_prepare.synthetic_rows(8, 42)
    problems = {codegen.code_request(p.task): p for p in map(codegen.mbpp_problem, rows)}
    sft, kd, dpo = check_files(tmp_path, problems)
    assert len(sft) == len(kd) == 8 and len(dpo) >= 6
    assert all("synthetic" in r["source"] for r in sft + kd + dpo)


def test_mutants_are_single_edits_that_parse():
    code = "def f(xs, k):\n    total = 0\n    for x in xs:\n        if x > k and x % 2 == 0:\n            total += x\n" \
           "    return max(total, 0)"
    muts = codegen_prepare.mutants(code, 20, random.Random(0))
    assert len(muts) >= 8 and len({m for _, m in muts}) == len(muts)
    base = ast.dump(ast.parse(code))
    for desc, src in muts:
        assert ast.dump(ast.parse(src)) != base, desc
    assert muts == codegen_prepare.mutants(code, 20, random.Random(0))     # seeded: reproducible


def test_a_train_task_asking_what_a_test_task_asks_is_left_out(tmp_path):
    """Real MBPP has three (train 602, 704, 872 = test 217, 248, 216): training on one would leak MBPP-test."""
    dup = {**MBPP_ROWS[0], "task_id": 5, "prompt": "A  test-split task that must never be trained on."}
    src = tmp_path / "mbpp.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in MBPP_ROWS[:3] + [dup]))
    rep = codegen_prepare.main(codegen_prepare.parse_args(["--src", str(src), "--outdir", str(tmp_path / "out"),
                                                           "--timeout", "3"]))
    assert rep["excluded_test_duplicates"] == ["5"]
    assert [r["source"] for r in read(tmp_path / "out" / "codegen_sft.jsonl")] == ["mbpp/1", "mbpp/2"]


def test_real_mbpp_uses_the_train_split_only(tmp_path):
    src = shared_data("codegen/mbpp.jsonl")
    codegen_prepare.main(codegen_prepare.parse_args(["--src", str(src), "--outdir", str(tmp_path), "--limit", "4",
                                                     "--mutants", "4"]))
    sft = read(tmp_path / "codegen_sft.jsonl")
    assert len(sft) == 4 and all(int(r["source"].split("/")[1]) >= 511 for r in sft)


def test_teacher_answers_are_checked(tiny_model_dir, tmp_path):
    src = tmp_path / "mbpp.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in MBPP_ROWS[:2]))
    rep = codegen_prepare.main(codegen_prepare.parse_args([
        "--src", str(src), "--outdir", str(tmp_path / "out"), "--teacher", str(tiny_model_dir),
        "--teacher_samples", "2", "--max_new_tokens", "6", "--mutants", "0", "--timeout", "3"]))
    # a random tiny model never passes: KD falls back to the reference, DPO's rejected are its failing answers
    kd, dpo = read(tmp_path / "out" / "codegen_kd.jsonl"), read(tmp_path / "out" / "codegen_dpo.jsonl")
    assert [r["teacher"] for r in kd] == ["reference", "reference"]
    assert all(r["rejected_from"] == "teacher" for r in dpo)
    assert sum(v for k, v in rep["candidate_results"].items() if k.startswith("teacher_fail")) == 4


def test_bad_input_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="--src"):
        codegen_prepare.main(codegen_prepare.parse_args(["--outdir", str(tmp_path)]))
    src = tmp_path / "m.jsonl"
    src.write_text(json.dumps({"task_id": 1, "prompt": "x", "code": "y"}) + "\n")
    with pytest.raises(UserError, match="line 1: missing field 'test_list'"):
        codegen_prepare.main(codegen_prepare.parse_args(["--src", str(src), "--outdir", str(tmp_path)]))
    src.write_text(json.dumps(MBPP_ROWS[2]) + "\n")
    with pytest.raises(UserError, match="no rows in split 'train'"):
        codegen_prepare.main(codegen_prepare.parse_args(["--src", str(src), "--outdir", str(tmp_path)]))
    assert not (tmp_path / "codegen_sft.jsonl").exists()


def test_blocked_output_fails_before_the_sandbox_runs(tmp_path, monkeypatch):
    out = tmp_path / "out"
    (out / "codegen_kd.jsonl").mkdir(parents=True)

    def no_run(*a, **kw):
        raise AssertionError("the sandbox ran before the output paths were checked")

    monkeypatch.setattr(codegen_prepare.sandbox, "run_programs", no_run)
    with pytest.raises(UserError, match=r"codegen_kd.jsonl is a folder"):
        codegen_prepare.main(codegen_prepare.parse_args(["--synthetic", "--n_synthetic", "4", "--outdir", str(out)]))
    assert sorted(p.name for p in out.iterdir()) == ["codegen_kd.jsonl"]
