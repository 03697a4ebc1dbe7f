import csv
import json
from collections import Counter

import pytest

import creditmix as cm
import creditmix_prepare
from fileio import UserError
from conftest import exits_2, shared_data, write_creditmix_sample


class DataRead(Exception):
    """Raised in place of loading the student: the script got past reading its data."""


def read(p):
    return [json.loads(line) for line in open(p)]


def run(argv):
    return creditmix_prepare.main(creditmix_prepare.parse_args(argv))


def test_split_balanced_disjoint_and_capped(tmp_path):
    write_creditmix_sample(tmp_path, {"Good": 20, "Standard": 30, "Bad": 16})
    val = read(tmp_path / "creditmix_val.jsonl")
    assert Counter(r["output"] for r in val) == {"Good": 4, "Standard": 4, "Bad": 4}
    val_prompts = {r["input"] for r in val}
    for name, key, label in [("sft", "input", "output"), ("kd", "input", "teacher_output"), ("dpo", "prompt", "chosen")]:
        rows = read(tmp_path / f"creditmix_{name}.jsonl")
        # per-class cap = the smallest class after holding out validation (Bad: 16 - 4)
        assert Counter(r[label] for r in rows) == {"Good": 12, "Standard": 12, "Bad": 12}
        assert not val_prompts & {r[key] for r in rows}
    for r in read(tmp_path / "creditmix_dpo.jsonl"):
        assert r["rejected"] in cm.LABELS and r["rejected"] != r["chosen"]


def test_split_is_deterministic_and_nested(tmp_path):
    rows = [{"features": f"x{i}", "label": cm.LABELS[i % 3], "split": None} for i in range(90)]
    v5, t5 = cm.split_balanced(rows, seed=1, val_per_class=5)
    v5b, t5b = cm.split_balanced(list(reversed(rows)), seed=1, val_per_class=5)
    assert v5 == v5b and sorted(map(str, t5)) == sorted(map(str, t5b))  # file order does not matter
    v10, _ = cm.split_balanced(rows, seed=1, val_per_class=10)
    assert {r["features"] for r in v5} <= {r["features"] for r in v10}  # eval's smaller split stays held out
    assert cm.split_balanced(rows, seed=2, val_per_class=5)[0] != v5


def kaggle_row(**kw):
    row = {c: "1" for c in cm.RICH_FEATURES + ["Type_of_Loan"]}
    row.update(ID="0x1", Customer_ID="CUS_1", Month="August", Name="Jane Secret", SSN="123-45-6789",
               Credit_Score="Poor", Age="33_", Occupation="_______", Annual_Income="19114.12_",
               Payment_Behaviour="!@9#%8", Amount_invested_monthly="__10000__")
    row.update(kw)
    return row


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_kaggle_csv_cleaned_private_columns_never_in_prompts(tmp_path, capsys):
    rows = [kaggle_row(Credit_Mix=cm.LABELS[i % 3], Outstanding_Debt=str(100 + i)) for i in range(30)]
    rows += [kaggle_row(Credit_Mix="_") for _ in range(4)]
    write_csv(tmp_path / "k.csv", rows)
    summary = run(["--src", str(tmp_path / "k.csv"), "--outdir", str(tmp_path / "out"), "--features", "rich",
                   "--val_per_class", "2"])
    assert summary["skipped_unknown_label"] == 4
    assert "skipped 4 rows" in capsys.readouterr().out
    text = (tmp_path / "out" / "creditmix_sft.jsonl").read_text()
    assert "Jane Secret" not in text and "123-45-6789" not in text and "Poor" not in text
    first = read(tmp_path / "out" / "creditmix_sft.jsonl")[0]["input"]
    assert "Age: 33," in first and "Occupation: unknown" in first and "Annual Income: 19114.12" in first
    assert "Payment Behaviour: unknown" in first and "Amount invested monthly: unknown" in first


def test_real_kaggle_subset_keeps_holdout_for_validation(tmp_path):
    src = shared_data("creditmix/creditmix_labeled.jsonl")
    summary = run(["--src", str(src), "--outdir", str(tmp_path)])
    assert summary["val_per_class"] == 438 and summary["train_counts"] == dict.fromkeys(cm.LABELS, 1922)
    holdout = {cm.prompt_for(cm.features_text(r, cm.README_FEATURES)) for r in map(json.loads, open(src))
               if r["source_split"] == "holdout"}
    assert {r["input"] for r in read(tmp_path / "creditmix_val.jsonl")} <= holdout


def test_train_rows_all_keeps_every_training_row_and_the_same_validation(tmp_path):
    """--train_rows all: the training files hold every training row (the classes' own shares), no validation
    prompt among them, and the validation file is byte for byte the balanced run's."""
    (tmp_path / "bal").mkdir()
    src = write_creditmix_sample(tmp_path / "bal", {"Good": 20, "Standard": 30, "Bad": 16})
    summary = run(["--src", str(src), "--outdir", str(tmp_path / "all"), "--val_per_class", "4", "--train_rows", "all"])
    assert summary["train_counts"] == {"Good": 16, "Standard": 26, "Bad": 12}  # each class less its 4 held out
    sft = read(tmp_path / "all" / "creditmix_sft.jsonl")
    assert Counter(r["output"] for r in sft) == summary["train_counts"]
    val = (tmp_path / "all" / "creditmix_val.jsonl").read_text()
    assert val == (tmp_path / "bal" / "creditmix_val.jsonl").read_text()
    assert not {json.loads(line)["input"] for line in val.splitlines()} & {r["input"] for r in sft}


@pytest.mark.parametrize("content,message", [
    ('[{"question": "a", "answer": "Good"}, {"question": "b"}]', "record 2: missing or empty field 'answer'"),
    ('[{"question": "a", "answer": "Excellent"}]', "answer 'Excellent' is not one of"),
    ('[{"question": "a", "answer": "Good"}, {"question": "b", "answer": "Bad"}]', "class Standard has no examples"),
    ('[{"question": "a", "answer": "Good"},', "invalid JSON"),
])
def test_bad_input_one_line_and_no_partial_output(tmp_path, content, message):
    (tmp_path / "src.json").write_text(content)
    with pytest.raises(UserError, match=message):
        run(["--src", str(tmp_path / "src.json"), "--outdir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_val_per_class_larger_than_a_class(tmp_path):
    src = write_creditmix_sample(tmp_path)
    with pytest.raises(UserError, match="--val_per_class 99 is larger than class 'Bad'"):
        run(["--src", str(src), "--outdir", str(tmp_path / "o"), "--val_per_class", "99"])


def test_missing_file_exits_2(tmp_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "creditmix_prepare.py", "--src", str(tmp_path / "nope.json"), "--outdir",
                        str(tmp_path)], capture_output=True, text=True, cwd=creditmix_prepare.__file__.rsplit("/", 1)[0])
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: data file not found: {tmp_path / 'nope.json'}"




def seed_rows(n_per_class=6):
    return [{"question": f"Age: {20 + i}, Occupation: Teacher", "answer": c}
            for c in cm.LABELS for i in range(n_per_class)]


def test_one_blocked_output_writes_nothing(tmp_path, capsys):
    src = tmp_path / "seed.json"
    src.write_text(json.dumps(seed_rows()))
    out = tmp_path / "out"
    (out / "creditmix_val.jsonl").mkdir(parents=True)  # a folder where a file goes
    line = exits_2(lambda: run(["--src", str(src), "--outdir", str(out), "--val_per_class", "1"]), capsys)
    assert f"{out / 'creditmix_val.jsonl'} is a folder" in line
    assert sorted(p.name for p in out.iterdir()) == ["creditmix_val.jsonl"]  # no SFT/KD/DPO file, no temp file


def test_unicode_line_separators_survive_prepare_and_training_reads(tmp_path, monkeypatch):
    """U+2028/U+2029/U+0085 inside a customer's text: the prepared files read back in sft_train.py."""
    import sft_train
    rows = seed_rows()
    rows[0]["question"] = "Occupation: Writer\u2028Editor\u2029x\x85y, Age: 40"
    src = tmp_path / "seed.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    run(["--src", str(src), "--outdir", str(tmp_path), "--val_per_class", "1"])
    texts = [r["input"] for name in ("sft", "val") for r in read(tmp_path / f"creditmix_{name}.jsonl")]
    assert any("Writer\u2028Editor\u2029x\x85y" in t for t in texts)

    def stop(*a, **kw):  # sft_train read and checked its data: stop before the model loads
        raise DataRead()

    monkeypatch.setattr(sft_train, "load_student", stop)
    for name in ("sft", "val"):
        with pytest.raises(DataRead):
            sft_train.main(sft_train.parse_args(["--student", "smollm2-135m", "--data",
                                                 str(tmp_path / f"creditmix_{name}.jsonl"),
                                                 "--save_dir", str(tmp_path / "run")]))


def test_errors_give_the_file_line_blank_lines_counted(tmp_path, capsys):
    src = tmp_path / "seed.jsonl"
    lines = [json.dumps(r) for r in seed_rows()]
    lines[2] = json.dumps({"question": "Age: 1", "answer": "Excellent"})
    src.write_text(lines[0] + "\n\n" + lines[1] + "\n\n" + "\n".join(lines[2:]) + "\n")  # the bad row: line 5
    line = exits_2(lambda: run(["--src", str(src), "--outdir", str(tmp_path / "out")]), capsys)
    assert "seed.jsonl: line 5: answer 'Excellent' is not one of Good, Standard, Bad" in line


def test_non_utf8_csv_is_one_line(tmp_path, capsys):
    src = tmp_path / "credit.csv"
    header = ",".join(cm.README_FEATURES + ["Credit_Mix"])
    src.write_bytes((header + "\n30,Teacher,1,2,3,x,Good\n").encode() + b"40,Caf\xe9,1,2,3,x,Bad\n")
    line = exits_2(lambda: run(["--src", str(src), "--outdir", str(tmp_path / "out")]), capsys)
    assert "credit.csv:3: not UTF-8 text (byte 0xe9 at column 7)" in line
    assert not (tmp_path / "out").exists()


def test_csv_errors_give_the_file_line(tmp_path, capsys):
    src = tmp_path / "credit.csv"
    header = ",".join(cm.README_FEATURES + ["Credit_Mix"])
    src.write_text(header + '\n30,"Teacher\nand writer",1,2,3,x,Good\n40,Teacher,1,2,3,x,Fair\n')
    line = exits_2(lambda: run(["--src", str(src), "--outdir", str(tmp_path / "out")]), capsys)
    assert "credit.csv:4: Credit_Mix 'Fair'" in line  # the quoted field spans lines 2-3
