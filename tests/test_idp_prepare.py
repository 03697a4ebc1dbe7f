"""idp_prepare.py: the SFT/KD/DPO rows train exactly the prompt inference sends, targets are the canonical JSON
the grammar generates, DPO rejections are really worse, and real data keeps its test split out of training."""
import json

import pytest

import fileio
import idp
import idp_prepare
import json_grammar as jg
from conftest import shared_data


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_synthetic_files(tmp_path, capsys):
    written = idp_prepare.main(idp_prepare.parse_args(["--synthetic", "--outdir", str(tmp_path), "--n", "12",
                                                       "--n_test", "4"]))
    assert written == {"idp_schema.json": 1, "idp_sft.jsonl": 12, "idp_kd.jsonl": 12, "idp_dpo.jsonl": 12,
                       "idp_test.jsonl": 4}
    assert "invented" in capsys.readouterr().err  # says the data is synthetic
    schema = jg.load_schema(tmp_path / "idp_schema.json")
    v = jg.make_validator(schema)
    sft, kd, dpo = (_read(tmp_path / f"idp_{k}.jsonl") for k in ("sft", "kd", "dpo"))
    for s, k, d in zip(sft, kd, dpo):
        assert set(s) == {"id", "input", "output"} and set(k) == {"id", "input", "teacher_output"}
        gold = json.loads(s["output"])
        assert not list(v.iter_errors(gold))
        assert s["output"] == jg.canonical_json(gold, schema) == k["teacher_output"] == d["chosen"]
        assert s["input"] == k["input"] == d["prompt"]
        assert s["input"].startswith(idp.idp_user_message(schema, ""))  # the inference prompt, schema as loaded
        assert d["rejected"] != d["chosen"]
        bad = jg.check_output(d["rejected"], v)
        if d["rejected_kind"] == "wrong_value":
            assert bad["schema_valid"] and bad["json"] != gold
        else:
            assert not bad["schema_valid"]
    for r in _read(tmp_path / "idp_test.jsonl"):
        assert not list(v.iter_errors(r["gold"])) and r["document"].strip()
    assert {r["id"] for r in _read(tmp_path / "idp_test.jsonl")}.isdisjoint(r["id"] for r in sft)


def test_synthetic_is_reproducible(tmp_path):
    for d in ("a", "b"):
        idp_prepare.main(idp_prepare.parse_args(["--synthetic", "--outdir", str(tmp_path / d), "--n", "5"]))
    assert (tmp_path / "a" / "idp_dpo.jsonl").read_text() == (tmp_path / "b" / "idp_dpo.jsonl").read_text()


def test_repo_samples_match_the_repo_schema():
    """data/idp_*.jsonl (the README's files) were written by this script with data/idp_schema.json."""
    root = idp_prepare.__file__.rsplit("/", 1)[0]
    schema = jg.load_schema(f"{root}/data/idp_schema.json")
    assert schema == idp_prepare.INVOICE_SCHEMA
    for r in fileio.read_records(f"{root}/data/idp_sft.jsonl"):
        assert r["input"].startswith(idp.idp_user_message(schema, ""))
        assert r["output"] == jg.canonical_json(json.loads(r["output"]), schema)


def test_generic_source_with_schema(tmp_path):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name"]}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    src = tmp_path / "people.jsonl"
    fileio.write_jsonl(src, [{"id": 1, "split": "train", "text": "Ann, 31", "gold": {"age": 31, "name": "Ann"}},
                             {"id": 2, "split": "test", "text": "Bob", "gold": {"name": "Bob"}},
                             {"id": 3, "text": "Cy, 5", "gold": {"name": "Cy", "age": 5}}])
    written = idp_prepare.main(idp_prepare.parse_args(["--src", str(src), "--schema", str(tmp_path / "s.json"),
                                                       "--outdir", str(tmp_path / "out")]))
    assert written["people_idp_sft.jsonl"] == 2 and written["people_idp_test.jsonl"] == 1
    sft = _read(tmp_path / "out" / "people_idp_sft.jsonl")
    assert sft[0]["output"] == '{"name":"Ann","age":31}'  # schema order, compact
    assert sft[0]["input"] == idp.idp_user_message(schema, "Ann, 31")
    assert json.loads((tmp_path / "out" / "people_schema.json").read_text()) == schema


@pytest.mark.parametrize("rows, extra, message", [
    ([{"text": "x", "gold": {"name": 5}}], True, r"line 1 \(id 1\): field 'gold' does not match the schema"),
    ([{"text": "x", "gold": {"name": "a"}, "split": "test"}], True, "no records with split 'train'"),
    ([{"text": "x", "gold": {"name": "a"}}], False, "give the --schema"),
    ([{"text": " ", "gold": {"name": "a"}}], True, "line 1: the document is empty"),
])
def test_bad_sources(tmp_path, rows, extra, message):
    (tmp_path / "s.json").write_text(json.dumps({"type": "object", "properties": {"name": {"type": "string"}}}))
    src = tmp_path / "src.jsonl"
    fileio.write_jsonl(src, rows)
    argv = ["--src", str(src), "--outdir", str(tmp_path / "out")]
    argv += ["--schema", str(tmp_path / "s.json")] if extra else []
    with pytest.raises(fileio.UserError, match=message):
        idp_prepare.main(idp_prepare.parse_args(argv))
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_sroie_train_split_only(tmp_path):
    src = shared_data("idp/sroie.jsonl")
    written = idp_prepare.main(idp_prepare.parse_args(["--src", str(src), "--outdir", str(tmp_path)]))
    assert written["sroie_idp_sft.jsonl"] == 626 and written["sroie_idp_test.jsonl"] == 347
    real = {r["id"]: r for r in fileio.read_records(src)}
    sft = _read(tmp_path / "sroie_idp_sft.jsonl")
    test = _read(tmp_path / "sroie_idp_test.jsonl")
    assert all(real[r["id"]]["split"] == "train" for r in sft)
    assert all(real[r["id"]]["split"] == "test" for r in test)
    schema = jg.load_schema(tmp_path / "sroie_schema.json")
    row = sft[0]
    assert row["input"] == idp.idp_user_message(schema, real[row["id"]]["text"])
    assert json.loads(row["output"]) == real[row["id"]]["gold"]  # values unchanged
    no_address = [r for r in sft + test if r["id"] == "X51005663280"]
    gold = json.loads(no_address[0]["output"]) if "output" in no_address[0] else no_address[0]["gold"]
    assert gold["address"] is None


def test_funsd_pairs(tmp_path):
    src = shared_data("idp/funsd.jsonl")
    written = idp_prepare.main(idp_prepare.parse_args(["--src", str(src), "--outdir", str(tmp_path)]))
    assert written["funsd_idp_sft.jsonl"] == 149 and written["funsd_idp_test.jsonl"] == 50
    first = json.loads(_read(tmp_path / "funsd_idp_sft.jsonl")[0]["output"])
    assert set(first) == {"fields"} and all(set(p) == {"question", "answer"} for p in first["fields"])


def test_one_blocked_output_writes_nothing(tmp_path):
    out = tmp_path / "out"
    (out / "idp_dpo.jsonl").mkdir(parents=True)
    with pytest.raises(fileio.UserError, match=r"idp_dpo.jsonl is a folder"):
        idp_prepare.main(idp_prepare.parse_args(["--synthetic", "--n", "4", "--n_test", "2", "--outdir", str(out)]))
    assert sorted(p.name for p in out.iterdir()) == ["idp_dpo.jsonl"]


def test_outdir_that_is_a_file_is_refused_before_reading(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(fileio.UserError, match="--outdir .*out is a file, not a folder"):
        idp_prepare.main(idp_prepare.parse_args(["--src", str(tmp_path / "missing.jsonl"), "--outdir",
                                                 str(tmp_path / "out")]))
