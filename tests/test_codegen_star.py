"""codegen_star.py: the sandbox sorts sampled answers into SFT targets and DPO pairs in the trainers' formats,
evaluation and test-split tasks never reach training, run.json and the table, and bad input."""
import json

import pytest

import codegen
import codegen_star
import dpo_train
import sft_train
from fileio import UserError

# MBPP-shaped tasks of our own: three train, one test
TASKS = [
    {"task_id": 601, "prompt": "Write a function add(a, b) that returns their sum.", "code": "def add(a, b):\n    return a + b",
     "test_list": ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"], "split": "train"},
    {"task_id": 602, "prompt": "Write a function double(x) that returns 2 * x.", "code": "def double(x):\n    return 2 * x",
     "test_list": ["assert double(4) == 8"], "split": "train"},
    {"task_id": 603, "prompt": "Write a function neg(x) that returns -x.", "code": "def neg(x):\n    return -x",
     "test_list": ["assert neg(3) == -3"], "split": "train"},
    {"task_id": 11, "prompt": "Write a function sq(x) that returns x squared.", "code": "def sq(x):\n    return x * x",
     "test_list": ["assert sq(3) == 9"], "split": "test"},
]
HE = [{"task_id": "T/0", "prompt": "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n", "entry_point": "add",
       "canonical_solution": "    return a + b\n",
       "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"}]
GOOD = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```"
WRONG = "```python\ndef add(a, b):\n    return a - b\n```"
PROSE = "I cannot do that."


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sampled(problems, answers: dict):
    """generate_solutions' output for hand-written answers {task_id: [raw answer, ...]}."""
    return [(p.task_id, codegen.solution_from_answer(p, a), {"raw": a, "plan": None})
            for p in problems for a in answers.get(p.task_id, [])]


def test_passing_answers_become_sft_rows_and_failing_ones_dpo_rejected(tmp_path):
    probs = codegen_star.load_train_tasks(write_jsonl(tmp_path / "t.jsonl", TASKS), "train")
    assert [p.task_id for p in probs] == ["601", "602", "603"]  # the test split is never a training task
    gen = sampled(probs, {"601": [GOOD, GOOD, WRONG, PROSE], "602": ["```python\ndef double(x):\n    return x\n```"]})
    results = codegen.run_solutions(probs, gen, codegen.eval_limits(False, 5), desc=None)  # in the sandbox
    passed, pairs, rows, counts = codegen_star.sort_candidates(probs, gen, results, max_pairs=2, sampler="m",
                                                               round_=1)
    assert [r.passed for r in results] == [True, True, False, False, False]
    assert passed == {"601": ["def add(a, b):\n    return a + b"]}  # duplicates count once
    assert counts["samples"] == 5 and counts["passed"] == 2 and counts["pass_rate"] == 0.4
    assert counts["tasks_solved"] == 1 and counts["pairs"] == 2
    # pairs only where a task has both: the wrong code and the code-less answer against the passing code
    assert [p["rejected"] for p in pairs] == [codegen.fenced("def add(a, b):\n    return a - b"), PROSE]
    assert all(p["chosen"] == codegen.fenced(passed["601"][0]) and p["task_id"] == "601" for p in pairs)
    assert pairs[0]["rejected_result"].startswith("failed")
    assert len(rows) == 5 and rows[0]["passed"] and not rows[2]["passed"]
    sft, kd = codegen_star.training_rows(probs, passed, {("601", passed["601"][0]): "m"}, max_kept=4)
    assert sft[0]["input"] == codegen.code_request(probs[0].task)  # the prompt eval_codegen.py asks
    # the trainers read the files as written
    assert sft_train.read_rows(write_jsonl(tmp_path / "sft.jsonl", sft))[0]["output"] == sft[0]["output"]
    assert len(dpo_train.read_pairs(write_jsonl(tmp_path / "dpo.jsonl", pairs))) == 2
    assert kd[0]["teacher_output"] == sft[0]["output"]


def test_train_format_both_samples_each_task_as_humaneval_asks_it_too(tmp_path):
    """--train_format both: the HumanEval view of a task is sampled and verified beside it; a passing whole function
    is its target as written, under the HumanEval prompt eval_codegen.py asks HumanEval's problems with."""
    probs = codegen.train_views(codegen_star.load_train_tasks(write_jsonl(tmp_path / "t.jsonl", TASKS), "train"),
                                "both")
    assert [p.task_id for p in probs] == ["601", "602", "603", "601/he", "602/he", "603/he"]
    body = "```python\n    return a + b\n```"
    gen = sampled(probs, {"601/he": [GOOD, body, WRONG]})
    results = codegen.run_solutions(probs, gen, codegen.eval_limits(False, 5), desc=None)
    passed, pairs, _, _ = codegen_star.sort_candidates(probs, gen, results, max_pairs=2, sampler="m", round_=1)
    he = probs[3]
    assert passed == {"601/he": ["def add(a, b):\n    return a + b", he.prompt + "    return a + b"]}
    assert pairs[0]["prompt"] == codegen.code_request(codegen.humaneval_task(he.prompt))
    sft, _ = codegen_star.training_rows(probs, passed, {("601/he", c): "m" for c in passed["601/he"]}, max_kept=4)
    assert [r["source"] for r in sft] == ["mbpp/601/he"] * 2 and sft[0]["input"].startswith("Complete the following")


def test_evaluation_and_test_split_tasks_never_reach_training(tmp_path):
    leaky = TASKS + [dict(TASKS[0], task_id=700, split="train", prompt=TASKS[3]["prompt"]),  # a test task's text
                     {**HE[0], "split": "train"}]
    train_file = write_jsonl(tmp_path / "train.jsonl", leaky[:5])
    he = write_jsonl(tmp_path / "he.jsonl", HE)
    args = codegen_star.parse_args(["--train_data", str(train_file), "--eval_data", str(he), "--save_dir", "x"])
    evals, held = codegen_star.held_out_tasks(args)
    assert {p.task_id for p in held} == {"T/0", "11"}  # HumanEval, and the train file's own MBPP test split
    train, excluded = codegen.exclude_eval_tasks(codegen_star.load_train_tasks(str(train_file), "train"), held)
    assert excluded == ["700"] and "11" not in {p.task_id for p in train}
    # a train row carrying an evaluation task's id is dropped too
    same_id = codegen_star.load_train_tasks(write_jsonl(tmp_path / "t2.jsonl", [dict(TASKS[0], task_id=11)]), "train")
    assert codegen.exclude_eval_tasks(same_id, held) == ([], ["11"])
    # and the last check before a file is written refuses a held-out row outright
    with pytest.raises(RuntimeError, match="held-out tasks"):
        codegen_star.check_no_eval_tasks([{"task_id": "11"}], {p.task_id for p in held}, "codegen_sft.jsonl")
    with pytest.raises(RuntimeError, match="held-out tasks"):  # as HumanEval's view of it, too
        codegen_star.check_no_eval_tasks([{"task_id": "11/he"}], {p.task_id for p in held}, "codegen_sft.jsonl")
    with pytest.raises(UserError, match="not MBPP-shaped"):
        codegen_star.load_train_tasks(str(he), "train")


def test_smoke_dry_run_on_a_tiny_model(tiny_model_dir, tmp_path, capsys):
    train_file = write_jsonl(tmp_path / "tasks.jsonl", TASKS)
    he = write_jsonl(tmp_path / "humaneval.jsonl", HE)
    out = tmp_path / "star"
    m = codegen_star.main(codegen_star.parse_args([
        "--student", str(tiny_model_dir), "--train_data", str(train_file), "--eval_data", str(he), str(train_file),
        "--rounds", "2", "--num_samples", "2", "--max_new_tokens", "8", "--eval_max_new_tokens", "8",
        "--eval_samples", "3", "--k", "1,2", "--sampled_eval_at", "0", "--timeout", "5", "--dry_run",
        "--save_dir", str(out)]))
    rec = json.loads((out / "run.json").read_text())
    assert rec["script"] == "codegen_star.py" and rec["args"]["num_samples"] == 2 and rec["versions"]["torch"]
    assert rec["data"]["sha256"] and [d["path"] for d in rec["eval_data"]] == [str(he), str(train_file)]
    r0, r1 = rec["metrics"]["per_round"]
    assert set(r0["eval"]) == {"humaneval", "tasks"} and r0["eval"]["tasks"]["greedy"]["n_problems"] == 1  # test split
    assert set(r0["eval"]["humaneval"]) == {"greedy", "T0.8x3"} and "pass@2" in r0["eval"]["humaneval"]["T0.8x3"]
    assert r1["sampling"]["samples"] == 6 and r1["sampling"]["tasks"] == 3
    lines = (out / "round_1" / "candidates.jsonl").read_text().splitlines()
    assert len(lines) == 6 and {json.loads(x)["task_id"] for x in lines} == {"601", "602", "603"}
    assert (out / "round_1" / "codegen_sft.jsonl").exists() and (out / "round_0" / "eval_humaneval_greedy.jsonl").exists()
    printed = capsys.readouterr()
    assert "round" in (out / "results.txt").read_text() and "humaneval" in printed.out
    assert m["rounds"] == 1  # a dry run stops after round 1's files


@pytest.mark.parametrize("flags,says", [
    (["--k", "1,30"], "--eval_samples"), (["--sampled_eval_at", "5"], "rounds run from 0"),
    (["--temperature", "0"], "> 0"), (["--rounds", "0"], "--rounds must be at least 1"),
])
def test_bad_flags_are_one_line(tmp_path, flags, says):
    train_file = write_jsonl(tmp_path / "tasks.jsonl", TASKS)
    with pytest.raises(UserError, match=says):
        codegen_star.main(codegen_star.parse_args(["--train_data", str(train_file), "--save_dir", str(tmp_path / "o"),
                                                   *flags]))


@pytest.mark.slow
def test_one_round_trains_with_the_projects_trainers(tiny_model_dir, tmp_path, monkeypatch):
    """The trainers run as commands on what the sandbox kept (answers written by hand: a random model never passes)."""
    train_file = write_jsonl(tmp_path / "tasks.jsonl", TASKS)

    def answers(model, tok, problems, **gen):
        return sampled(problems, {p.task_id: [GOOD if p.task_id == "601" else PROSE, WRONG]
                                  for p in problems}) if gen["num_samples"] > 1 else sampled(problems, {})
    monkeypatch.setattr(codegen_star.codegen, "generate_solutions", answers)
    out = tmp_path / "star"
    m = codegen_star.main(codegen_star.parse_args([
        "--student", str(tiny_model_dir), "--train_data", str(train_file), "--rounds", "1", "--num_samples", "2",
        "--train_args", "--max_steps 1 --max_len 256 --report_to none",
        "--dpo_args", "--max_steps 1 --max_len 256 --report_to none", "--save_dir", str(out)]))
    r1 = m["per_round"][1]
    assert r1["sft_rows"] == 1 and r1["dpo_rows"] == 1 and r1["student"] == str(out / "round_1" / "dpo")
    assert json.loads((out / "round_1" / "dpo" / "run.json").read_text())["script"] == "dpo_train.py"
    assert json.loads((out / "round_1" / "sft" / "run.json").read_text())["args"]["max_steps"] == 1


def test_eval_at_evaluates_only_the_rounds_asked(tiny_model_dir, tmp_path, monkeypatch):
    """--eval_at last: the base and round 1 are not evaluated (no eval in their records, '-' in the table), round 2
    is; --sampled_eval_at all applies only within the evaluated rounds."""
    train_file = write_jsonl(tmp_path / "tasks.jsonl", TASKS)
    he = write_jsonl(tmp_path / "he.jsonl", HE)
    monkeypatch.setattr(codegen_star.codegen, "generate_solutions", lambda model, tok, problems, **gen: sampled(
        problems, {p.task_id: [PROSE] * gen["num_samples"] for p in problems}))
    seen = []

    def evaluate(model, tok, evals, args, ks, *, sampled, plan, out_dir):
        seen.append((out_dir.name, sampled))
        return {"he": {"greedy": {"pass@1": 0.5}}}
    monkeypatch.setattr(codegen_star, "evaluate", evaluate)
    out = tmp_path / "star"
    m = codegen_star.main(codegen_star.parse_args([
        "--student", str(tiny_model_dir), "--train_data", str(train_file), "--eval_data", str(he), "--rounds", "2",
        "--num_samples", "2", "--train", "none", "--eval_at", "last", "--sampled_eval_at", "all",
        "--save_dir", str(out)]))
    assert seen == [("round_2", True)]
    assert ["eval" in r for r in m["per_round"]] == [False, False, True]
    rows = (out / "results.txt").read_text().splitlines()[1:]
    assert "0.5" not in rows[0] and "0.5" not in rows[1] and "0.5" in rows[2]


def test_resume_continues_after_the_last_finished_round(tiny_model_dir, tmp_path, monkeypatch):
    """A run of one round, then --resume --rounds 2: rounds 0 and 1 are neither sampled nor evaluated again, round 2
    keeps the answers kept so far, and run.json and the table hold all three rounds. A resume with other training
    data, or with no round left, is one line."""
    train_file = write_jsonl(tmp_path / "tasks.jsonl", TASKS)
    he = write_jsonl(tmp_path / "he.jsonl", HE)
    calls = []

    def answers(model, tok, problems, **gen):
        calls.append(gen["desc"])
        return sampled(problems, {p.task_id: [GOOD if p.task_id == "601" else PROSE] * gen["num_samples"]
                                  for p in problems})
    monkeypatch.setattr(codegen_star.codegen, "generate_solutions", answers)
    monkeypatch.setattr(codegen_star, "evaluate", lambda *a, out_dir, **kw: {"he": {"greedy": {"pass@1": 0.1}}})
    out = tmp_path / "star"
    argv = ["--student", str(tiny_model_dir), "--train_data", str(train_file), "--eval_data", str(he),
            "--num_samples", "2", "--train", "none", "--save_dir", str(out)]
    codegen_star.main(codegen_star.parse_args([*argv, "--rounds", "1"]))
    assert calls == ["round 1: sample"]
    (out / "round_2" / "sft").mkdir(parents=True)  # an unfinished round of an earlier attempt: removed, run again
    (out / "round_2" / "sft" / "adapter_model.safetensors").write_text("partial")
    m = codegen_star.main(codegen_star.parse_args([*argv, "--rounds", "2", "--resume"]))
    assert calls == ["round 1: sample", "round 2: sample"]
    assert [r["round"] for r in m["per_round"]] == [0, 1, 2]
    assert not (out / "round_2" / "sft").exists() and (out / "round_2" / "candidates.jsonl").is_file()
    # task 601's answer, kept in round 1, is not counted new in round 2
    assert m["per_round"][1]["kept_new"] == 1 and m["per_round"][2]["kept_new"] == 0
    assert m["per_round"][2]["sft_rows"] == 1
    assert len((out / "results.txt").read_text().splitlines()) == 4
    assert json.loads((out / "run.json").read_text())["metrics"]["per_round"][0]["eval"]["he"]["greedy"]["pass@1"] == 0.1

    with pytest.raises(UserError, match="all 2 rounds .* are done"):
        codegen_star.main(codegen_star.parse_args([*argv, "--rounds", "2", "--resume"]))
    other = write_jsonl(tmp_path / "other.jsonl", TASKS[:2] + TASKS[3:])
    with pytest.raises(UserError, match=r"another --train_data \(its content\)"):
        codegen_star.main(codegen_star.parse_args([*argv[:2], "--train_data", str(other), *argv[4:], "--rounds", "3",
                                                   "--resume"]))


def test_a_run_dir_student_is_continued_and_dpo_gets_its_base(tiny_sft_run, tiny_model_dir, tmp_path):
    """--student an SFT run (an adapter): the round's SFT continues it, and dpo_train.py, which refuses an adapter
    --student beside --ref_model_dir, is given that run's base (found on an H200: round 1's DPO exited 2)."""
    args = codegen_star.parse_args(["--student", str(tiny_sft_run), "--train_data", "t.jsonl", "--save_dir", "o"])
    (sft, dpo), student = codegen_star.train_commands(args, tmp_path, has_sft=True, has_dpo=True)
    flag = lambda cmd, name: cmd[cmd.index(name) + 1]
    assert flag(sft, "--student") == str(tiny_sft_run)
    assert flag(dpo, "--student") == str(tiny_model_dir) and flag(dpo, "--ref_model_dir") == str(tmp_path / "sft")
    assert student == tmp_path / "dpo"
