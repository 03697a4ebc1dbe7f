import json

import pytest

import common
from common import UserError


def test_resolve_model_kinds(tmp_path, tiny_model_dir):
    assert common.resolve_model(str(tiny_model_dir)).base == str(tiny_model_dir)
    hub = common.resolve_model("Qwen/Qwen2.5-3B-Instruct")
    assert (hub.base, hub.adapter) == ("Qwen/Qwen2.5-3B-Instruct", None)
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    with pytest.raises(UserError, match="without a saved adapter"):
        common.resolve_model(str(run))
    with pytest.raises(UserError, match="unknown model"):
        common.resolve_model("no-such-model")
    with pytest.raises(UserError, match="neither a model folder"):
        common.resolve_model(str(tmp_path))


def test_run_dir_resolves_base_from_run_json(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/elsewhere/gone"}))
    (run / "run.json").write_text(json.dumps({"base_model": str(tiny_model_dir)}))
    ms = common.resolve_model(str(run))
    assert ms.base == str(tiny_model_dir) and ms.adapter == str(run)


def test_read_records_names_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"input": "a", "output": "b"}\n\n{"input": "a" "output": "b"}\n')
    with pytest.raises(UserError, match=r"d.jsonl:3: invalid JSON"):
        common.read_records(p)
    p.write_text('{"input": "a", "output": "b"}\n{"input": "a"}\n')
    with pytest.raises(UserError, match=r"line 2: missing field 'output'"):
        common.read_records(p, required=("input", "output"))
    p.write_text('{"input": "", "output": "b"}\n')
    with pytest.raises(UserError, match=r"line 1: field 'input' must be a non-empty string"):
        common.read_records(p, nonempty=("input",))
    with pytest.raises(UserError, match="not found"):
        common.read_records(tmp_path / "missing.jsonl")
    p.write_text("\n")
    with pytest.raises(UserError, match="no records"):
        common.read_records(p)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    p = tmp_path / "out.jsonl"
    common.write_jsonl(p, [{"a": 1}])

    def rows():
        yield {"a": 2}
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        common.write_jsonl(p, rows())
    assert p.read_text() == '{"a": 1}\n'
    assert [f.name for f in tmp_path.iterdir()] == ["out.jsonl"]  # no temp file left


def test_tokens_aligned_and_completion_only_labels(tiny_model_dir):
    model, tok, _ = common.load_model(str(tiny_model_dir))
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    assert model.config.pad_token_id == tok.pad_token_id
    ex, status = common.encode_example(tok, "Classify me", "Good", max_len=None)
    assert status == "ok"
    prompt_len = len(tok(common.chat_prompt(tok, "Classify me"), add_special_tokens=False)["input_ids"])
    trained = [t for t in ex["labels"] if t != -100]
    # the answer and its end-of-turn token are learned, even though pad == eos
    assert trained == tok("Good", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex["labels"][:prompt_len] == [-100] * prompt_len
    assert common.encode_example(tok, "Classify me", "Good " * 50, max_len=prompt_len + 5, keep_whole=True) == \
        (None, "too_long")
    cut, status = common.encode_example(tok, "Classify me", "Good " * 50, max_len=prompt_len + 5)
    assert status == "truncated" and len(cut["input_ids"]) == prompt_len + 5


def test_cpu_fallback_says_so_once(capsys):
    assert common.use_4bit("auto", "cpu") is False
    assert common.use_4bit("auto", "cpu") is False
    assert capsys.readouterr().err.count("4-bit") <= 1
    assert common.use_4bit("none", "cuda") is False
    assert common.use_4bit("auto", "cuda") is True


def test_user_errors_exit_code(capsys):
    with pytest.raises(SystemExit) as e:
        with common.user_errors():
            raise UserError("bad thing in x.jsonl line 3")
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "error: bad thing in x.jsonl line 3"
