"""eval_idp.py and idp.field_metrics: validity rates and field scores against hand-computed cases, the accepted
record formats, and the metrics file users read."""
import json

import pytest

import fileio
import eval_idp
import idp
import json_grammar as jg
from conftest import shared_data

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
    assert m["doc_exact_match"] == {"raw": 0.0, "normalized": 0.5, "canonical": 0.5}  # no date or amount field
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
# canonical mode: dates and amounts as values

@pytest.mark.parametrize("text, iso", [  # every date format in SROIE's gold, plus ISO and full month names
    ("25/12/2018", "2018-12-25"), ("5/3/2018", "2018-03-05"), ("17/1/2018", "2018-01-17"), ("4/02/2017", "2017-02-04"),
    ("18/03/18", "2018-03-18"), ("12-01-19", "2019-01-12"), ("23-01-2019", "2019-01-23"), ("11.02.18", "2018-02-11"),
    ("05 MAR 2018", "2018-03-05"), ("28 MAR 18", "2018-03-28"), ("24-MAR-2018", "2018-03-24"),
    ("02/JAN/2017", "2017-01-02"), ("OCT 3, 2016", "2016-10-03"), ("2018-03-23", "2018-03-23"),
    ("2018/02/22", "2018-02-22"), ("20180304", "2018-03-04"), ("25032018", "2018-03-25"),
    ("(06/12/2016)", "2016-12-06"), ("5 September 2018", "2018-09-05"), (" 25 dec  2018 ", "2018-12-25")])
def test_parse_date_reads_sroie_formats_day_first(text, iso):
    assert idp.parse_date(text) == iso


@pytest.mark.parametrize("text", [
    "12/28/2017",  # month first (a few SROIE receipts): no 28th month, so not read at all rather than guessed
    "31/02/2018", "25/12/2018 10:30", "2018", "MAR 2018", "25/12", "25122018x", "date: 25/12/2018", "", "n/a"])
def test_parse_date_leaves_what_it_cannot_read_one_way(text):
    assert idp.parse_date(text) is None


@pytest.mark.parametrize("value, amount", [  # every total format in SROIE's gold, plus numbers and a suffix
    ("9.00", "9.00"), ("60.30", "60.30"), ("327.00", "327.00"), ("7838.80", "7838.80"), ("43.7", "43.70"),
    ("$8.20", "8.20"), ("RM 29.70", "29.70"), ("RM4.00", "4.00"), ("rm367.10", "367.10"), ("-1.73", "-1.73"),
    ("1,007.50", "1007.50"), ("1,234,567.00", "1234567.00"), ("9.00 MYR", "9.00"), ("RM -5.00", "-5.00"),
    (9, "9.00"), (8.2, "8.20"), ("9.005", "9.005")])
def test_parse_amount(value, amount):
    assert idp.parse_amount(value) == amount


@pytest.mark.parametrize("value", [
    "1,234",  # thousands or a decimal comma: ambiguous
    "12,50", "1.234,50", "1,23.50", "RM 9.00 MYR", "- -9.00", "nine", "", True, None, float("nan")])
def test_parse_amount_leaves_ambiguous_separators_as_text(value):
    assert idp.parse_amount(value) is None


def test_field_kinds_follow_the_field_name():
    assert [idp.field_kind(f) for f in ("date", "invoice_date", "total", "subtotal", "line_items[].amount",
                                        "items[].unit_price", "tax", "company", "address")] == \
        ["date", "date", "amount", "amount", "amount", "amount", "amount", None, None]


def test_canonical_mode_matches_reformatted_dates_and_totals_only():
    golds = [{"company": "ABC SDN BHD", "date": "25/12/2018", "total": "RM 1,007.50", "note": "25/12/2018"},
             {"company": "X", "date": "12/28/2017", "total": "9.00"}]
    preds = [{"company": "abc sdn bhd", "date": "2018-12-25", "total": "1007.5", "note": "2018-12-25"},
             {"company": "X", "date": "2017-12-28", "total": 9}]
    m = idp.field_metrics(preds, golds)
    fem = m["field_exact_match"]
    assert fem["raw"] == {"company": 0.5, "date": 0.0, "note": 0.5, "total": 0.0}  # no note in doc 2: both empty
    assert fem["normalized"] == {"company": 1.0, "date": 0.0, "note": 0.5, "total": 0.0}
    # the first date and both totals now match; the unparsed gold "12/28/2017" does not match a reformatted
    # prediction, and "note" is no date field, so it stays text
    assert fem["canonical"] == {"company": 1.0, "date": 0.5, "note": 0.5, "total": 1.0}
    assert m["micro_f1"]["canonical"] == pytest.approx(5 / 7)
    assert m["canonical_parsed"] == {"date": {"gold": 1, "gold_values": 2, "pred": 2, "pred_values": 2},
                                     "total": {"gold": 2, "gold_values": 2, "pred": 2, "pred_values": 2}}
    # a copied unparsed gold still matches as text
    same = idp.field_metrics([{"date": "12/28/2017"}], [{"date": "12/28/2017"}])
    assert same["field_exact_match"]["canonical"] == {"date": 1.0}


def test_canonical_mode_keeps_different_values_apart():
    m = idp.field_metrics([{"date": "12/01/2018", "total": "9.01"}], [{"date": "01/12/2018", "total": "9.00"}])
    assert m["field_exact_match"]["canonical"] == {"date": 0.0, "total": 0.0}


def test_every_sroie_gold_total_and_day_first_date_parses():
    """On the real gold: canonical mode reads each total and each date that has a day-first reading."""
    rows = [json.loads(line) for line in shared_data("idp/sroie.jsonl").open(encoding="utf-8")]
    totals = [r["gold"]["total"] for r in rows if r["gold"].get("total")]
    assert totals and all(idp.parse_amount(t) for t in totals)
    dates = [r["gold"]["date"] for r in rows if r["gold"].get("date")]
    unread = [d for d in dates if idp.parse_date(d) is None]
    assert len(unread) < len(dates) / 100
    for d in unread:  # only month-first dates, which have no day-first reading
        first, second = (int(x) for x in d.split("/")[:2])
        assert second > 12 and first <= 12


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
    printed = capsys.readouterr().out
    assert "schema-valid 100.0%" in printed
    assert "EM canon" in printed and m["micro_f1"].keys() == {"raw", "normalized", "canonical"}
    c = m["canonical_parsed"]["total"]
    assert c["gold_values"] == 3 and f"canonical total: {c['gold']} of 3 gold" in printed


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
