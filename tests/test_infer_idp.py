"""infer_idp.py: the README command prints one valid JSON object and nothing else on stdout; batches; the same
prompt as the training rows; bad input is one clear error line with exit code 2."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import common
import fileio
import idp
import infer_idp
import json_grammar as jg

ROOT = Path(__file__).resolve().parents[1]
README_DOC = "Invoice #INV1 date 2025-10-01 from Bar LLC total USD 50."
SCHEMA = {
    "type": "object",
    "properties": {"invoice_number": {"type": "string"}, "date": {"type": "string", "format": "date"},
                   "vendor": {"type": "string"}, "total": {"type": "number"},
                   "currency": {"enum": ["USD", "EUR"]},
                   "line_items": {"type": "array", "items": {"type": "object", "properties": {
                       "description": {"type": "string"}, "amount": {"type": ["number", "null"]}},
                       "required": ["description", "amount"]}}},
    "required": ["invoice_number", "date", "vendor", "total", "currency", "line_items"],
}


@pytest.fixture
def schema_file(tmp_path):
    p = tmp_path / "schema.json"
    p.write_text(json.dumps(SCHEMA))
    return p


def run(tiny_model_dir, schema_file, *extra):
    return infer_idp.main(infer_idp.parse_args(["--model_dir", str(tiny_model_dir), "--schema", str(schema_file),
                                                "--max_new_tokens", "64", *extra]))


def test_readme_command_prints_only_valid_json(tiny_model_dir, schema_file, capsys):
    obj = run(tiny_model_dir, schema_file, "--document", README_DOC)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and json.loads(out) == obj
    assert not list(jg.make_validator(SCHEMA).iter_errors(obj))


def test_repo_schema_and_document_file(tiny_model_dir, tmp_path, capsys):
    doc = tmp_path / "invoice.txt"
    doc.write_text(README_DOC + "\nItems: 2 x Widget 25.00\n")
    schema = ROOT / "data" / "idp_schema.json"
    obj = run(tiny_model_dir, schema, "--document_file", str(doc))
    assert not list(jg.make_validator(json.loads(schema.read_text())).iter_errors(obj))
    assert json.loads(capsys.readouterr().out) == obj


def test_batch_input_output(tiny_model_dir, schema_file, tmp_path, capsys):
    src = tmp_path / "docs.jsonl"
    fileio.write_jsonl(src, [{"id": "a", "document": README_DOC}, {"text": "Receipt total 3.20 EUR"},
                             {"id": 7, "document": "x " * 50}])
    out = tmp_path / "preds.jsonl"
    run(tiny_model_dir, schema_file, "--input", str(src), "--output", str(out), "--batch_size", "2")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", 2, 7]
    assert all(r["valid"] and r["error"] is None for r in rows)
    assert all(not list(jg.make_validator(SCHEMA).iter_errors(r["output"])) for r in rows)
    assert capsys.readouterr().out == ""  # batch mode keeps stdout clean


def test_prompt_is_the_training_prompt(tiny_model_dir, schema_file, monkeypatch):
    seen = []
    real = jg.generate

    def spy(model, tok, prompts, **kw):
        seen.extend(prompts)
        return real(model, tok, prompts, **kw)
    monkeypatch.setattr(jg, "generate", spy)
    run(tiny_model_dir, schema_file, "--document", README_DOC)
    _, tok, _ = common.load_model(str(tiny_model_dir))
    assert seen == [common.chat_prompt(tok, idp.idp_user_message(SCHEMA, README_DOC))]


def test_long_document_is_truncated_with_a_note(tiny_model_dir, schema_file, capsys):
    obj = run(tiny_model_dir, schema_file, "--document", README_DOC + " filler" * 400, "--max_input_tokens", "300")
    err = capsys.readouterr().err
    assert "NOTE: --document: the prompt has" in err and "truncated to its first" in err
    assert not list(jg.make_validator(SCHEMA).iter_errors(obj))


@pytest.mark.parametrize("args, message", [
    (["--document", "   \n"], "--document: the document is empty"),
    (["--document_file", "/nonexistent/doc.txt"], "document file not found"),
])
def test_bad_documents(tiny_model_dir, schema_file, args, message):
    with pytest.raises(fileio.UserError, match=message):
        run(tiny_model_dir, schema_file, *args)


def test_unreadable_and_empty_document_files(tiny_model_dir, schema_file, tmp_path):
    binary = tmp_path / "scan.pdf"
    binary.write_bytes(b"%PDF-1.4\xff\xfe\x00\x81")
    with pytest.raises(fileio.UserError, match="cannot read document file .*scan.pdf as UTF-8"):
        run(tiny_model_dir, schema_file, "--document_file", str(binary))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(fileio.UserError, match="empty.txt: the document is empty"):
        run(tiny_model_dir, schema_file, "--document_file", str(empty))


def test_input_record_without_document(tiny_model_dir, schema_file, tmp_path):
    src = tmp_path / "docs.jsonl"
    fileio.write_jsonl(src, [{"document": "ok"}, {"id": 2, "body": "no document field"}])
    with pytest.raises(fileio.UserError, match="docs.jsonl: record 2: missing field 'document'"):
        run(tiny_model_dir, schema_file, "--input", str(src), "--output", str(tmp_path / "o.jsonl"))
    assert not (tmp_path / "o.jsonl").exists()


def test_budget_too_small_for_any_valid_json(tiny_model_dir, schema_file):
    with pytest.raises(fileio.UserError, match="--max_new_tokens 5 is too small"):
        infer_idp.main(infer_idp.parse_args(["--model_dir", str(tiny_model_dir), "--schema", str(schema_file),
                                             "--document", README_DOC, "--max_new_tokens", "5"]))


@pytest.mark.parametrize("schema, message", [
    ('{"type": "object", "properties": {"a": {"type": "strin"}}}',
     "invalid JSON Schema: keyword 'type' at /properties/a"),
    ('{"type": "object", "properties": {"a": {"type": "string"}}, "if": {}}',
     "keyword 'if' at the root is not supported"),
    ('{"type": "object",', "schema.json:1: invalid JSON"),
    ('{"type":"object","properties":{"child":{"$ref":"#"}},"required":["child"]}',
     "schema.json: no finite JSON satisfies the subschema at the root"),
    (json.dumps({"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(10_000)}}),
     "schema.json: the object at the root declares 10000 properties, more than the limit of 256 (max_properties)"),
    ('{"type": "object", "properties": {"a": ' * 100 + "{}" + "}}" * 100,
     "schema.json: the schema is nested (JSON objects/arrays) 201 levels deep, more than the limit of 32 (max_depth)"),
    ('{"type": "object", "$defs": {"n": {"type": "string"}}, "properties": {"a": {"$id": "https://x.org/a", '
     '"type": "object", "properties": {"n": {"$ref": "#/$defs/n"}}}}}',
     "schema.json: keyword '$id' at /properties/a is not supported below the root"),
])
def test_bad_schema_exits_2_with_one_line(tmp_path, schema, message):
    p = tmp_path / "schema.json"
    p.write_text(schema)
    r = subprocess.run([sys.executable, str(ROOT / "infer_idp.py"), "--model_dir", "smollm2-135m", "--schema", str(p),
                        "--document", README_DOC], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and message in r.stderr
    assert "Traceback" not in r.stderr


def test_output_flags_go_together():
    with pytest.raises(SystemExit):
        infer_idp.parse_args(["--model_dir", "m", "--schema", "s", "--input", "x.jsonl"])
    with pytest.raises(SystemExit):
        infer_idp.parse_args(["--model_dir", "m", "--schema", "s", "--document", "d", "--document_file", "f"])


def test_input_record_with_empty_document(tiny_model_dir, schema_file, tmp_path):
    src = tmp_path / "docs.jsonl"
    fileio.write_jsonl(src, [{"document": "ok"}, {"document": ""}])
    with pytest.raises(fileio.UserError, match="docs.jsonl: record 2: the document is empty"):
        run(tiny_model_dir, schema_file, "--input", str(src), "--output", str(tmp_path / "o.jsonl"))


@pytest.mark.real_model
def test_readme_command_on_smollm2(capsys):
    """The README's document through the embedded SmolLM2-135M: valid JSON on stdout, whatever it extracts."""
    schema = ROOT / "data" / "idp_schema.json"
    obj = infer_idp.main(infer_idp.parse_args(["--model_dir", "smollm2-135m", "--schema", str(schema),
                                               "--document", README_DOC, "--max_new_tokens", "96"]))
    assert json.loads(capsys.readouterr().out) == obj
    assert not list(jg.make_validator(json.loads(schema.read_text())).iter_errors(obj))
