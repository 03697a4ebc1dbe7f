"""eval_idp.py and idp.field_metrics: validity rates and field scores against hand-computed cases, the accepted
record formats, and the metrics file users read."""
import json

import pytest

import fileio
import eval_idp
import idp
import json_grammar as jg

SCHEMA = {"type": "object",
          "properties": {"company": {"type": "string"}, "total": {"type": "string"},
                         "address": {"type": ["string", "null"]}},
          "required": ["company", "total", "address"]}


# ----------------------------------------------------------------------------------------------------------------
# field metrics, by hand

def test_exact_match_raw_and_normalized():
    golds = [{"a": "Foo Bar", "b": "1"}, {"a": "x", "b": "2"}]
    preds = [{"a": "foo  bar", "b": "1"}, None]  # the second reply did not parse
    m = idp.field_metrics(preds, golds)
    assert m["field_exact_match"]["raw"] == {"a": 0.0, "b": 0.5}
    assert m["field_exact_match"]["normalized"] == {"a": 0.5, "b": 0.5}
    assert m["exact_match"]["raw"] == 0.25 and m["exact_match"]["normalized"] == 0.5
    assert m["doc_exact_match"] == {"raw": 0.0, "normalized": 0.5}
    # raw: 1 true positive of 2 predicted and 4 gold values; normalised: 2 of 2 and 4
    assert m["micro_precision"]["raw"] == 0.5 and m["micro_recall"]["raw"] == 0.25
    assert m["micro_f1"]["raw"] == pytest.approx(1 / 3)
    assert m["micro_f1"]["normalized"] == pytest.approx(2 / 3)
    # per field, normalised: a and b each P=1, R=1/2 -> F1 2/3
    assert m["field_f1"]["normalized"] == pytest.approx({"a": 2 / 3, "b": 2 / 3})
    assert m["macro_f1"]["normalized"] == pytest.approx(2 / 3)
    assert m["macro_f1"]["raw"] == pytest.approx((0 + 2 / 3) / 2)


def test_line_items_are_multisets_and_numbers_normalise():
    gold = {"items": [{"d": "Tea", "amount": 1}, {"d": "Cake", "amount": 2.5}], "total": 3.5}
    pred = {"items": [{"d": "cake", "amount": 2.5}, {"d": "Tea", "amount": 1.0}], "total": 3.5}
    m = idp.field_metrics([pred], [gold])
    assert m["field_exact_match"]["normalized"] == {"items[].amount": 1.0, "items[].d": 1.0, "total": 1.0}
    assert m["field_exact_match"]["raw"] == {"items[].amount": 0.0, "items[].d": 0.0, "total": 1.0}
    # raw: amounts 1 vs 1.0 and Cake vs cake differ: tp = 2.5 + Tea + total = 3 of 5
    assert m["micro_f1"]["raw"] == pytest.approx(3 / 5)
    assert m["micro_f1"]["normalized"] == 1.0


def test_empty_values_are_no_extraction():
    m = idp.field_metrics([{"a": "", "b": "x", "extra": "y"}], [{"a": None, "b": "x"}])
    assert m["field_exact_match"]["raw"] == {"b": 1.0}  # 'a' has no gold value anywhere: not scored
    assert m["micro_precision"]["raw"] == 0.5  # the extra field counts against precision
    assert m["micro_recall"]["raw"] == 1.0
    assert m["macro_f1"]["raw"] == 1.0  # macro averages fields with a gold value
    assert m["doc_exact_match"]["raw"] == 0.0


def test_missing_field_vs_wrong_value():
    golds = [{"a": "1", "b": "2"}] * 2
    m = idp.field_metrics([{"a": "1"}, {"a": "1", "b": "3"}], golds)
    assert m["field_exact_match"]["raw"] == {"a": 1.0, "b": 0.0}
    assert m["micro_precision"]["raw"] == pytest.approx(2 / 3) and m["micro_recall"]["raw"] == 0.5


# ----------------------------------------------------------------------------------------------------------------
# records

def test_record_formats(tmp_path):
    p = tmp_path / "mixed.jsonl"
    fileio.write_jsonl(p, [
        {"id": "r1", "split": "test", "text": "ACME\nTOTAL 5.00", "gold": {"company": "ACME", "total": "5.00"}},
        {"id": "r2", "split": "train", "document": "x", "gold": {"company": "B"}},
        {"id": "r3", "split": "test", "input": "<the whole user message>", "output": '{"company":"C"}'},
    ])
    recs = idp.read_eval_records(p, split="test")
    assert [r["id"] for r in recs] == ["r1", "r3"]
    assert recs[0]["document"].startswith("ACME") and recs[1]["message"] == "<the whole user message>"
    assert recs[1]["gold"] == {"company": "C"}
    assert len(idp.read_eval_records(p, limit=1)) == 1


@pytest.mark.parametrize("rows, message", [
    ([{"document": "x"}], "no gold answer"),
    ([{"document": "x", "output": "{not json"}], "field 'output' is not a JSON string"),
    ([{"document": "", "gold": {}}], "the document is empty"),
    ([{"gold": {"a": 1}}], "expected a 'document'"),
])
def test_bad_records(tmp_path, rows, message):
    p = tmp_path / "bad.jsonl"
    fileio.write_jsonl(p, rows)
    with pytest.raises(fileio.UserError, match=message):
        idp.read_eval_records(p)


def test_split_without_split_field(tmp_path):
    p = tmp_path / "d.jsonl"
    fileio.write_jsonl(p, [{"document": "x", "gold": {}}])
    with pytest.raises(fileio.UserError, match="records have no 'split' field"):
        idp.read_eval_records(p, split="test")


# ----------------------------------------------------------------------------------------------------------------
# the script

@pytest.fixture
def files(tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    data = tmp_path / "receipts_test.jsonl"
    fileio.write_jsonl(data, [
        {"id": i, "split": "test", "text": f"SHOP {i}\nJALAN {i}\nTOTAL {i}.00",
         "gold": {"company": f"SHOP {i}", "total": f"{i}.00", "address": None if i == 2 else f"JALAN {i}"}}
        for i in range(3)] + [{"id": 9, "split": "train", "text": "t", "gold": {"company": "T"}}])
    return schema, data


def test_constrained_eval_writes_metrics_and_eval_record(tiny_model_dir, files, tmp_path, monkeypatch, capsys):
    schema, data = files
    monkeypatch.setenv("DISTILL_SLM_RUNS", str(tmp_path / "runs"))
    out, preds = tmp_path / "metrics.json", tmp_path / "preds.jsonl"
    m = eval_idp.main(eval_idp.parse_args(["--model_dir", str(tiny_model_dir), "--data", str(data),
                                           "--schema", str(schema), "--split", "test", "--max_new_tokens", "48",
                                           "--batch_size", "2", "--out", str(out), "--predictions", str(preds)]))
    assert m["n"] == 3 and m["constrained"]
    assert m["json_valid_rate"] == 1.0 and m["schema_valid_rate"] == 1.0 and m["cut_off_rate"] == 0.0
    assert set(m["field_exact_match"]["raw"]) == {"company", "total", "address"}
    assert json.loads(out.read_text()) == json.loads(json.dumps(m))
    assert len(preds.read_text().splitlines()) == 3
    saved = list((tmp_path / "runs").glob("base-*/evals/idp__receipts_test__*.json"))
    assert len(saved) == 1 and json.loads(saved[0].read_text())["metrics"]["n"] == 3
    assert "schema-valid 100.0%" in capsys.readouterr().out


def test_unconstrained_eval_reports_invalid_output(tiny_model_dir, files):
    schema, data = files
    m = eval_idp.main(eval_idp.parse_args(["--model_dir", str(tiny_model_dir), "--data", str(data),
                                           "--schema", str(schema), "--split", "test", "--limit", "2",
                                           "--max_new_tokens", "12", "--unconstrained"]))
    assert m["n"] == 2 and not m["constrained"]
    assert m["schema_valid_rate"] == 0.0  # a random model does not write JSON by itself
    assert m["field_exact_match"]["normalized"]["company"] == 0.0


def test_missing_schema_is_a_user_error(tiny_model_dir, files, tmp_path):
    _, data = files
    with pytest.raises(fileio.UserError, match="schema file not found"):
        eval_idp.main(eval_idp.parse_args(["--model_dir", str(tiny_model_dir), "--data", str(data),
                                           "--schema", str(tmp_path / "nope.json")]))


def test_refused_schema_names_the_file_and_the_limit(tiny_model_dir, files, tmp_path):
    _, data = files
    p = tmp_path / "wide.json"
    p.write_text(json.dumps({"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(300)}}))
    with pytest.raises(jg.SchemaRefused, match=r"wide.json: the object at the root declares 300 properties, more "
                                               r"than the limit of 256 \(max_properties\)") as e:
        eval_idp.main(eval_idp.parse_args(["--model_dir", str(tiny_model_dir), "--data", str(data),
                                           "--schema", str(p)]))
    assert e.value.status == 413
