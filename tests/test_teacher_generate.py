"""teacher_generate.py: fills teacher_output by batched generation, keeps the rows' other fields, and resumes an
interrupted run without losing or duplicating rows."""
import json

import pytest

import teacher_generate as tg
from fileio import UserError


def write_rows(path, n):
    path.write_text("".join(json.dumps({"input": f"Customer {i}: income {100 * i}. Return only the label.",
                                        "output": "Good", "id": i}) + "\n" for i in range(n)))
    return path


def gen(tmp_path, teacher, data, *extra):
    return tg.main(tg.parse_args(["--teacher", str(teacher), "--data", str(data), "--out", str(tmp_path / "kd.jsonl"),
                                  "--max_new_tokens", "3", "--batch_size", "2", *extra]))


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_fills_teacher_output(tiny_model_dir, tmp_path):
    data = write_rows(tmp_path / "in.jsonl", 5)
    summary = gen(tmp_path, tiny_model_dir, data)
    rows = read(tmp_path / "kd.jsonl")
    assert summary["generated"] == 5 and len(rows) == 5
    assert [r["id"] for r in rows] == list(range(5))  # input order, other fields kept
    assert all(isinstance(r["teacher_output"], str) and r["teacher"] == str(tiny_model_dir) for r in rows)
    assert all(r["input"].startswith(f"Customer {i}:") for i, r in enumerate(rows))


def test_batched_equals_one_by_one(tiny_model_dir, tmp_path):
    """Left padding: a prompt's greedy answer does not depend on its batch neighbours."""
    data = write_rows(tmp_path / "in.jsonl", 4)
    gen(tmp_path / "a", tiny_model_dir, data, "--batch_size", "4")
    gen(tmp_path / "b", tiny_model_dir, data, "--batch_size", "1")
    assert [r["teacher_output"] for r in read(tmp_path / "a" / "kd.jsonl")] == \
        [r["teacher_output"] for r in read(tmp_path / "b" / "kd.jsonl")]


def test_resume_after_interruption_keeps_rows_and_never_duplicates(tiny_model_dir, tmp_path, monkeypatch):
    data = write_rows(tmp_path / "in.jsonl", 7)
    out = tmp_path / "kd.jsonl"
    real, calls = tg.generate, []

    def flaky(*a, **kw):  # the third batch dies, as a killed job would
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(tg, "generate", flaky)
    with pytest.raises(KeyboardInterrupt):
        gen(tmp_path, tiny_model_dir, data)
    kept = out.read_text()
    assert len(read(out)) == 4  # two batches of 2 written and flushed
    with open(out, "a") as f:
        f.write('{"input": "half a li')  # a line cut mid-write
    monkeypatch.setattr(tg, "generate", real)
    summary = gen(tmp_path, tiny_model_dir, data)
    rows = read(out)
    assert summary == {"out": str(out), "rows": 7, "generated": 3, "kept": 4, "cut": summary["cut"],
                       "empty": summary["empty"]}
    assert [r["id"] for r in rows] == list(range(7))
    assert out.read_text().startswith(kept)  # the first rows are the ones written before, untouched
    assert gen(tmp_path, tiny_model_dir, data)["generated"] == 0  # complete: nothing to do, nothing added
    assert len(read(out)) == 7


def test_resume_refuses_another_data_or_teacher(tiny_model_dir, tmp_path):
    gen(tmp_path, tiny_model_dir, write_rows(tmp_path / "in.jsonl", 2))
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"input": "something else"}) + "\n" + json.dumps({"input": "more"}) + "\n")
    with pytest.raises(UserError, match="differs from row 1"):
        gen(tmp_path, tiny_model_dir, other)
    with pytest.raises(UserError, match="written by teacher"):
        gen(tmp_path, "smollm2-135m", tmp_path / "in.jsonl")
    assert gen(tmp_path, tiny_model_dir, other, "--overwrite")["generated"] == 2


def test_plan_then_code_trace(tiny_model_dir, tmp_path):
    codegen = pytest.importorskip("codegen")
    data = tmp_path / "codegen.jsonl"
    data.write_text(json.dumps({"prompt": codegen.code_request("Write a function that sorts a list.")}) + "\n")
    gen(tmp_path, tiny_model_dir, data, "--plan_then_code", "--plan_tokens", "3")
    (row,) = read(tmp_path / "kd.jsonl")
    assert row["teacher_output"].startswith("Plan:\n") and row["input"] == row["prompt"]


def test_resumes_its_own_output_with_unicode_line_separators(tiny_model_dir, tmp_path):
    """A prompt (or answer) holding U+2028/U+2029/U+0085 is one line of --out: a rerun continues after it."""
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"input": f"Customer {i}:\u2028income\u2029{i}\x85x"}, ensure_ascii=False)
                            + "\n" for i in range(4)), encoding="utf-8")
    assert gen(tmp_path, tiny_model_dir, data, "--limit", "2")["generated"] == 2
    out = tmp_path / "kd.jsonl"
    summary = gen(tmp_path, tiny_model_dir, data)
    assert (summary["kept"], summary["generated"]) == (2, 2)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").split("\n") if line]
    assert [r["input"] for r in rows] == [f"Customer {i}:\u2028income\u2029{i}\x85x" for i in range(4)]
    # a file written with the characters raw (json.dumps(ensure_ascii=False)) resumes too
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[:3]), encoding="utf-8")
    assert gen(tmp_path, tiny_model_dir, data)["kept"] == 3


def test_out_that_is_a_folder_fails_before_the_model_loads(tmp_path, monkeypatch):
    data = write_rows(tmp_path / "in.jsonl", 2)
    (tmp_path / "kd.jsonl").mkdir()

    def no_load(*a, **kw):
        raise AssertionError("the model loaded before --out was checked")

    monkeypatch.setattr(tg, "load_model", no_load)
    with pytest.raises(UserError, match=r"--out .*kd.jsonl is a folder"):
        gen(tmp_path, "smollm2-135m", data)


def test_data_errors_give_the_file_line(tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"input": "a"}) + "\n\n" + json.dumps({"input": " "}) + "\n")
    with pytest.raises(UserError, match=r"in.jsonl: line 3: field 'input' must be a non-empty string"):
        gen(tmp_path, "smollm2-135m", data)
