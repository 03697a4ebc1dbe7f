"""infer_codegen.py: code extraction from messy answers, batched generation equal to one-by-one, plan-then-code as
two generations, the flags users rely on, and --test through the sandbox."""
import pytest

import codegen
import infer_codegen
from common import load_model
from fileio import UserError

SORT = "def sort_list(xs):\n    return sorted(xs)"


@pytest.mark.parametrize("answer,expected", [
    # prose around one fenced block
    (f"Sure! Here is the function:\n\n```python\n{SORT}\n```\n\nThis uses sorted().", SORT),
    # a usage example first, then the function: the block that defines something wins
    (f"Usage:\n```python\nprint(sort_list([3, 1]))\n```\nCode:\n```python\n{SORT}\n```", SORT),
    # cut off by the token limit: no closing fence
    (f"```python\n{SORT}\n", SORT),
    # ```Python, ```py and ~~~ fences
    (f"```Python\n{SORT}\n```", SORT),
    (f"```py\n{SORT}\n```", SORT),
    (f"~~~\n{SORT}\n~~~", SORT),
    # a shell block and a python block
    (f"Install nothing:\n```bash\npip install nothing\n```\n```python\n{SORT}\n```", SORT),
    # an indented fence (inside a list item)
    (f"1. Write it:\n   ```python\n{SORT}\n   ```\n2. Done.", SORT),
    # no fences: prose before and after the code
    (f"Here you go.\n{SORT}\n\nThis function sorts the list in ascending order.", SORT),
    # imports and decorators start code too
    ("The answer:\nimport math\n\ndef f(x):\n    return math.sqrt(x)\nHope it helps!",
     "import math\n\ndef f(x):\n    return math.sqrt(x)"),
    # a fenced block with prose glued to its end is cut where it stops parsing
    (f"```python\n{SORT}\nThis is the end of the code\n```", SORT),
    # nothing that looks like code
    ("I cannot help with that.", ""),
    ("", ""),
])
def test_extract_code_from_messy_answers(answer, expected):
    assert codegen.extract_code(answer) == expected


def test_extract_code_prefers_the_entry_point():
    answer = ("```python\ndef helper(x):\n    return x\n```\n"
              "```python\ndef target(xs):\n    return helper(sorted(xs))\n```")
    assert codegen.extract_code(answer, "target").startswith("def target")
    assert codegen.extract_code(answer).startswith("def helper")


def test_batched_generation_equals_one_by_one(tiny_model_dir):
    model, tok, _ = load_model(str(tiny_model_dir))
    tasks = ["Write a function that sorts a list.", "Add two numbers.", "Reverse a string, please, in Python code."]
    batched = codegen.generate(model, tok, tasks, max_new_tokens=6, batch_size=3)
    single = [codegen.generate(model, tok, [t], max_new_tokens=6, batch_size=1)[0] for t in tasks]
    assert batched == single
    assert tok.padding_side == "left"


def test_plan_then_code_is_two_generations(tiny_model_dir, capsys):
    answers = infer_codegen.main(infer_codegen.parse_args([
        "--model_dir", str(tiny_model_dir), "--prompt", "Write a function that sorts a list.", "--plan_then_code",
        "--plan_tokens", "4", "--max_new_tokens", "6"]))
    assert len(answers) == 1 and answers[0]["plan"] is not None and "code" in answers[0]
    assert "# plan:" in capsys.readouterr().err


def test_plan_prompt_carries_the_plan():
    msg = codegen.code_from_plan_request("Sort a list.", "1. call sorted")
    assert "Sort a list." in msg and "1. call sorted" in msg and msg.endswith(codegen.CODE_BLOCK_ASK)


def test_sampling_gives_num_samples_answers(tiny_model_dir, capsys):
    answers = infer_codegen.main(infer_codegen.parse_args([
        "--model_dir", str(tiny_model_dir), "--prompt", "Sort a list.", "--temperature", "0.9",
        "--num_samples", "3", "--max_new_tokens", "5"]))
    assert len(answers) == 3
    assert capsys.readouterr().out.count("# ---- sample") == 3


def test_bad_flags_are_user_errors():
    with pytest.raises(UserError, match="--temperature"):
        infer_codegen.main(infer_codegen.parse_args(["--model_dir", "smollm2-135m", "--prompt", "x",
                                                     "--num_samples", "2"]))
    with pytest.raises(UserError, match="empty"):
        infer_codegen.main(infer_codegen.parse_args(["--model_dir", "smollm2-135m", "--prompt", "  "]))


def test_test_flag_runs_the_extracted_code_in_the_sandbox(tiny_model_dir, monkeypatch, tmp_path, capsys):
    canned = "Here:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    monkeypatch.setattr(codegen, "generate", lambda model, tok, msgs, **kw: [[canned] for _ in msgs])
    answers = infer_codegen.main(infer_codegen.parse_args([
        "--model_dir", str(tiny_model_dir), "--prompt", "Add.", "--test", "assert add(2, 3) == 5",
        "--out", str(tmp_path / "a.json")]))
    assert answers[0]["code"] == "def add(a, b):\n    return a + b"
    assert answers[0]["test"] == {"status": "passed", "reason": ""}
    captured = capsys.readouterr()
    assert captured.out.strip() == answers[0]["code"] and "# test: passed" in captured.err
    answers = infer_codegen.main(infer_codegen.parse_args([
        "--model_dir", str(tiny_model_dir), "--prompt", "Add.", "--test", "assert add(2, 3) == 6"]))
    assert answers[0]["test"]["status"] == "failed"


@pytest.mark.real_model
def test_smollm2_writes_some_python(capsys):
    answers = infer_codegen.main(infer_codegen.parse_args([
        "--model_dir", "smollm2-135m", "--prompt", "Write a Python function that sorts a list.",
        "--max_new_tokens", "64"]))
    assert "def " in answers[0]["raw"] or "sorted" in answers[0]["raw"]
