import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import common
import fileio
import models
import precision
from fileio import UserError, write_json
from conftest import ROOT, exits_2


def test_resolve_model_kinds(tmp_path, tiny_model_dir):
    assert models.resolve_model(str(tiny_model_dir)).base == str(tiny_model_dir)
    hub = models.resolve_model("Qwen/Qwen2.5-3B-Instruct")
    assert (hub.base, hub.adapter) == ("Qwen/Qwen2.5-3B-Instruct", None)
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    with pytest.raises(UserError, match="without a saved adapter"):
        models.resolve_model(str(run))
    with pytest.raises(UserError, match="unknown model"):
        models.resolve_model("no-such-model")
    with pytest.raises(UserError, match="neither a model folder"):
        models.resolve_model(str(tmp_path))


def test_run_dir_resolves_base_from_run_json(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/elsewhere/gone"}))
    (run / "run.json").write_text(json.dumps({"base_model": str(tiny_model_dir)}))
    ms = models.resolve_model(str(run))
    assert ms.base == str(tiny_model_dir) and ms.adapter == str(run)


def test_read_records_names_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"input": "a", "output": "b"}\n\n{"input": "a" "output": "b"}\n')
    with pytest.raises(UserError, match=r"d.jsonl:3: invalid JSON"):
        fileio.read_records(p)
    p.write_text('{"input": "a", "output": "b"}\n{"input": "a"}\n')
    with pytest.raises(UserError, match=r"line 2: missing field 'output'"):
        fileio.read_records(p, required=("input", "output"))
    p.write_text('{"input": "", "output": "b"}\n')
    with pytest.raises(UserError, match=r"line 1: field 'input' must be a non-empty string"):
        fileio.read_records(p, nonempty=("input",))
    with pytest.raises(UserError, match="not found"):
        fileio.read_records(tmp_path / "missing.jsonl")
    p.write_text("\n")
    with pytest.raises(UserError, match="no records"):
        fileio.read_records(p)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    p = tmp_path / "out.jsonl"
    fileio.write_jsonl(p, [{"a": 1}])

    def rows():
        yield {"a": 2}
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        fileio.write_jsonl(p, rows())
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


def test_cpu_fallback_says_so_once_when_training(capsys, monkeypatch):
    monkeypatch.setattr(fileio, "_notes_said", set())  # notes are once per process: start from none said
    assert precision.use_4bit("auto", "cpu", training=True) is False
    assert precision.use_4bit("auto", "cpu", training=True) is False
    assert capsys.readouterr().err.count("4-bit QLoRA needs a CUDA GPU") == 1
    assert precision.use_4bit("none", "cuda") is False
    assert precision.use_4bit("auto", "cuda") is True


def test_inference_on_cpu_says_nothing_about_qlora(tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setattr(fileio, "_notes_said", set())
    model, _, _ = common.load_model(str(tiny_model_dir), device="cpu")  # inference: nothing trains
    assert "4-bit" not in capsys.readouterr().err
    assert next(model.parameters()).dtype == precision.compute_dtype("cpu")
    common.load_model(str(tiny_model_dir), device="cpu", for_training=True)
    assert capsys.readouterr().err.count("4-bit QLoRA needs a CUDA GPU") == 1




SEPARATORS = "a\u2028b\u2029c\x85d"  # line separators for str.splitlines(), ordinary characters for JSON


def test_jsonl_round_trips_unicode_line_separators(tmp_path):
    rows = [{"input": SEPARATORS, "output": "Good"}, {"input": "plain", "output": "Bad"}]
    p = tmp_path / "d.jsonl"
    fileio.write_jsonl(p, rows)
    assert fileio.read_records(p) == rows
    assert len(p.read_text(encoding="utf-8").splitlines()) == 2  # escaped: even splitlines() readers see 2 lines
    # a file with the characters raw (json.dumps(ensure_ascii=False), as other tools write) reads back too
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert fileio.read_records(p) == rows
    assert fileio.record_places(p) == ["line 1", "line 2"]


def test_errors_name_the_file_line_with_blank_lines_counted(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"input": "a", "output": "b"}\n\n{"input": "a\u2028x", "output": "b"}\n\n{"input": "c"}\n',
                 encoding="utf-8")
    with pytest.raises(UserError, match=r"d.jsonl: line 5: missing field 'output'"):
        fileio.read_records(p, required=("input", "output"))
    assert fileio.record_places(p) == ["line 1", "line 3", "line 5"]


def test_non_utf8_jsonl_is_one_line(tmp_path, capsys):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"input": "a", "output": "b"}\n{"input": "caf\xe9", "output": "b"}\n')
    line = exits_2(lambda: fileio.read_records(p), capsys)
    assert "d.jsonl:2: not UTF-8 text (byte 0xe9 at column 15)" in line


def test_write_outputs_all_or_none(tmp_path):
    (tmp_path / "b.jsonl").mkdir()  # one output path blocked by a folder
    with pytest.raises(UserError, match=r"b.jsonl is a folder"):
        fileio.write_outputs({tmp_path / "a.jsonl": [{"x": 1}], tmp_path / "b.jsonl": [{"x": 2}],
                              tmp_path / "c.json": {"y": 1}})
    assert sorted(f.name for f in tmp_path.iterdir()) == ["b.jsonl"]  # nothing else written, no temp files
    counts = fileio.write_outputs({tmp_path / "a.jsonl": [{"x": 1}, {"x": 2}], tmp_path / "c.json": {"y": 1}})
    assert counts == {str(tmp_path / "a.jsonl"): 2, str(tmp_path / "c.json"): 1}
    assert json.loads((tmp_path / "c.json").read_text()) == {"y": 1}


def test_output_checks(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        fileio.check_output_dir(tmp_path / "f")
    with pytest.raises(UserError, match="is a file, not a folder"):
        fileio.check_output_file(tmp_path / "f" / "out.jsonl")
    assert fileio.check_output_dir(tmp_path / "new" / "run") == tmp_path / "new" / "run"
    assert not (tmp_path / "new").exists()  # checking creates nothing


def read_only_dir(tmp_path):
    """A folder this process cannot write in: a 0555 folder (not for root), else a read-only mount."""
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    if not os.access(d, os.W_OK):
        return d
    for cand in ("/proc/sys", "/sys/kernel"):
        if os.path.isdir(cand) and not os.access(cand, os.W_OK):
            return Path(cand)
    pytest.skip("no read-only folder available to this user")


def test_read_only_output_is_refused(tmp_path):
    ro = read_only_dir(tmp_path)
    with pytest.raises(UserError, match="cannot write in"):
        fileio.check_output_dir(ro / "run")
    with pytest.raises(UserError, match="cannot write in"):
        fileio.check_output_file(ro / "out.jsonl")


def test_path_shaped_model_that_does_not_exist_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for spec in ["runs/nope", "./nope", "../nope", str(tmp_path / "nope"), "a/b/c"]:
        with pytest.raises(UserError, match=f"model '{re.escape(spec)}' does not exist"):
            models.resolve_model(spec)
    (tmp_path / "models").mkdir()  # a folder that exists here: models/x is a path, not a hub id
    with pytest.raises(UserError, match="does not exist"):
        models.resolve_model("models/x")
    assert models.resolve_model("Qwen/Qwen2.5-3B-Instruct").base == "Qwen/Qwen2.5-3B-Instruct"


def _run_load(spec, env):
    code = f"import common, fileio\nwith fileio.user_errors():\n    common.load_model({spec!r})"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


@pytest.mark.parametrize("env, message", [
    ({"HF_HUB_OFFLINE": "1"}, "is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"),
    ({"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}, "the Hugging Face hub cannot be reached"),
])
def test_hub_id_offline_fails_at_once_with_one_line(tmp_path, env, message):
    """Offline (HF_HUB_OFFLINE, or no network: a closed port stands in for it) a hub id that is not cached is one
    line and exit 2, never transformers' five retries."""
    r = _run_load("nobody-here/no-such-model", {**env, "HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 2, r.stderr[-2000:]
    err = r.stderr.strip().splitlines()
    assert err[-1].startswith("error: model 'nobody-here/no-such-model'") and message in err[-1]
    assert "Retry" not in r.stderr and "Traceback" not in r.stderr


def test_random_bytes_named_gguf_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DISTILL_SLM_CACHE", str(tmp_path / "cache"))
    p = tmp_path / "model.gguf"
    p.write_bytes(os.urandom(4096))
    assert "model.gguf: not a GGUF file" in exits_2(lambda: models.resolve_model(str(p)), capsys)
    p.write_bytes(b"GGUF" + os.urandom(4096))  # the magic, then garbage: the reader's own error, as one line
    assert "model.gguf: cannot read this GGUF file" in exits_2(lambda: models.resolve_model(str(p)), capsys)


@pytest.mark.parametrize("content, message", [
    ("{not json", r"adapter_config.json:1: invalid JSON"),
    ('["a list"]', r"adapter_config.json: expected a JSON object, found a list"),
    ('{"r": 16}', r"adapter_config.json: field 'base_model_name_or_path' names no base model"),
])
def test_garbage_adapter_config_without_run_json_is_one_line(tmp_path, capsys, content, message):
    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter_config.json").write_text(content)
    assert re.search(message, exits_2(lambda: models.resolve_model(str(run)), capsys))


def test_garbage_run_json_is_one_line(tmp_path, capsys, tiny_model_dir):
    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_model_dir)}))
    (run / "run.json").write_bytes(b"\x00\xff garbage")
    assert "run.json:1: not UTF-8 text" in exits_2(lambda: models.resolve_model(str(run)), capsys)


def test_user_errors_exit_code(capsys):
    with pytest.raises(SystemExit) as e:
        with fileio.user_errors():
            raise UserError("bad thing in x.jsonl line 3")
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "error: bad thing in x.jsonl line 3"


# ----------------------------------------------------------------------------------------------------------------
# precision: bf16 where it fits, 4-bit where it must

GIB = 2 ** 30


def test_base_loads_bf16_where_it_fits_and_4bit_where_it_must():
    choose = precision.choose_precision
    # Qwen2.5-3B in bf16 (~5.8 GiB + margin) fits the 8 GB card; a 7B (~14 GiB) does not
    prec, why = choose("auto", "cuda", weights=int(5.8 * GIB), max_memory_gb=8, free=70 * GIB)
    assert prec == "bf16" and "fits --max_memory_gb 8" in why
    prec, why = choose("auto", "cuda", weights=14 * GIB, max_memory_gb=8, free=70 * GIB)
    assert prec == "4bit" and "--max_memory_gb 8" in why
    # the smaller of the budget and the GPU's free memory decides
    assert choose("auto", "cuda", weights=3 * GIB, max_memory_gb=80, free=2 * GIB)[0] == "4bit"
    assert "free" in choose("auto", "cuda", weights=3 * GIB, max_memory_gb=80, free=2 * GIB)[1]
    assert choose("auto", "cuda", weights=3 * GIB, max_memory_gb=0, free=10 * GIB)[0] == "bf16"
    # the margin counts: weights alone under the budget, weights + margin over it
    assert choose("auto", "cuda", weights=int(7.5 * GIB), max_memory_gb=8, free=None)[0] == "4bit"
    assert choose("auto", "cuda", weights=None, max_memory_gb=8)[0] == "4bit"  # size unknown
    # explicit flags win; the CPU stays unquantised; training keeps QLoRA
    assert choose("4bit", "cuda", weights=GIB // 4)[0] == "4bit"
    assert choose("none", "cuda", weights=14 * GIB, max_memory_gb=8)[0] == "bf16"
    assert choose("auto", "cpu", weights=GIB, dtype="fp32")[0] == "fp32"
    assert choose("4bit", "cpu", dtype="fp32")[0] == "fp32"
    assert choose("auto", "cuda", weights=GIB // 4, training=True)[0] == "4bit"
    with pytest.raises(UserError):
        choose("8bit", "cuda")


def test_adapter_loads_on_the_precision_it_was_trained_on(tmp_path):
    choose, read = precision.choose_precision, precision.adapter_precision
    run = tmp_path / "run"
    run.mkdir()
    assert read(run) is None  # a bare adapter folder: unknown, 4-bit as its QLoRA training most likely was
    assert choose("auto", "cuda", adapter=True, trained_on=None)[0] == "4bit"
    write_json(run / "run.json", {"base_precision": "4bit", "args": {"quantize": "auto"}, "device": "H200"})
    prec, why = choose("auto", "cuda", adapter=True, trained_on=read(run))
    assert prec == "4bit" and "trained on the 4-bit base" in why
    assert choose("none", "cuda", adapter=True, trained_on=read(run))[0] == "bf16"  # the flag wins
    write_json(run / "run.json", {"base_precision": "bf16"})
    assert choose("auto", "cuda", adapter=True, trained_on=read(run), weights=40 * GIB)[0] == "bf16"
    assert choose("4bit", "cuda", adapter=True, trained_on=read(run))[0] == "4bit"
    # older runs (no base_precision): their --quantize and device say it
    write_json(run / "run.json", {"args": {"quantize": "auto"}, "device": "NVIDIA H100 80GB HBM3"})
    assert read(run) == "4bit"
    write_json(run / "run.json", {"args": {"quantize": "none"}, "device": "NVIDIA H100 80GB HBM3"})
    assert read(run) == "bf16"
    write_json(run / "run.json", {"args": {"quantize": "auto"}, "device": "cpu (2 cores)"})
    assert read(run) == "fp32"


def test_weight_bytes_from_safetensors_and_config(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM
    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    assert precision.weight_bytes(str(tiny_model_dir)) == 2 * n
    # a folder with config.json only: estimated from the sizes (exact for this Llama shape)
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    assert precision.weight_bytes(str(tmp_path)) == 2 * n


def test_training_records_the_base_precision_and_inference_follows_it(tiny_sft_run, tiny_model_dir, capsys):
    rec = json.loads((tiny_sft_run / "run.json").read_text())
    assert rec["base_precision"] == "fp32"  # on this CPU: plain LoRA on fp32 weights
    ms = models.resolve_model(str(tiny_sft_run))
    prec, why = precision.decide_precision(ms, "auto", "cuda", dtype="torch.bfloat16")
    assert prec == "bf16" and "unquantised (fp32)" in why
    _, _, ms = common.load_model(str(tiny_model_dir), device="cpu")
    assert ms.precision[0] == "fp32"
    assert capsys.readouterr().err.count("precision: fp32 for ") == 1
