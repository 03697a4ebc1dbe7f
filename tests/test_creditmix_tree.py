"""creditmix_tree.py: the gradient-boosted tree on the features the prompts show, scored on the split prepare held
out, and as a KD teacher: each training row's out-of-fold class probabilities written as a teacher cache that
kd_train.py --teacher_cache accepts and trains from."""
import json
import math
import random

import numpy as np
import pytest

import creditmix as cm
import creditmix_prepare
import creditmix_tree
import kd_cache
from conftest import shared_data
from fileio import UserError


def test_feature_matrix_reads_numbers_missing_values_and_categories():
    cols = ["Age", "Occupation", "Credit_History_Age", "Outstanding_Debt"]
    texts = [cm.features_text({"Age": "33_", "Occupation": "Teacher", "Credit_History_Age": "16 Years and 3 Months",
                               "Outstanding_Debt": "1200.5"}, cols),
             cm.features_text({"Age": "200", "Occupation": "_______", "Credit_History_Age": "NA",
                               "Outstanding_Debt": "80"}, cols)]
    X, categorical, categories = cm.feature_matrix(texts, cols)
    assert categorical.tolist() == [False, True, False, False] and categories == {"Occupation": ["Teacher"]}
    assert X[0].tolist() == [33.0, 0.0, 195.0, 1200.5]
    assert all(math.isnan(v) for v in X[1][:3]) and X[1][3] == 80.0  # implausible age, unknown job and history
    unseen = cm.features_text({"Age": "40", "Occupation": "Pilot", "Credit_History_Age": "1 Years and 0 Months",
                               "Outstanding_Debt": "5"}, cols)
    Xu, _, _ = cm.feature_matrix([unseen], cols, categories)
    assert math.isnan(Xu[0][1]) and Xu[0][2] == 12.0
    with pytest.raises(UserError, match="row 1: the features text does not list"):
        cm.feature_matrix(["Age: 3"], cols)


def _source(path, n=240, seed=0):
    """Labelled rows whose label follows Outstanding_Debt (with 10% noise), in creditmix_labeled.jsonl's format."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        debt = rng.uniform(0, 3000)
        label = "Good" if debt < 1000 else "Standard" if debt < 2000 else "Bad"
        if rng.random() < 0.1:
            label = rng.choice(cm.LABELS)
        rows.append({**{c: str(rng.randint(18, 60)) for c in cm.RICH_FEATURES}, "Occupation": rng.choice(["A", "B"]),
                     "Payment_Behaviour": "Low_spent_Small_value_payments", "Outstanding_Debt": f"{debt:.2f}",
                     "Credit_History_Age": f"{rng.randint(1, 30)} Years and {rng.randint(0, 11)} Months",
                     "label": label, "source_split": "holdout" if i % 4 == 0 else "train"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_scores_the_held_out_split_and_writes_a_cache_kd_train_accepts(tmp_path, tiny_model_dir):
    src = _source(tmp_path / "labeled.jsonl")
    creditmix_prepare.main(creditmix_prepare.parse_args(["--src", str(src), "--outdir", str(tmp_path / "data")]))
    kd = tmp_path / "data" / "creditmix_kd.jsonl"
    out = tmp_path / "cache"
    s = creditmix_tree.main(creditmix_tree.parse_args([
        "--src", str(src), "--data", str(kd), "--student", str(tiny_model_dir), "--idp_mode", "--folds", "3",
        "--out", str(out), "--shard_rows", "16"]))
    assert s["holdout_accuracy"] > 0.7 and s["out_of_fold_accuracy"] > 0.7  # it learned the debt rule
    rows = [json.loads(line) for line in kd.read_text().splitlines()]
    assert s["cached_rows"] == len(rows)
    # what kd_train.py checks before it trains from a cache, on its own encoding of the same file
    import kd_train
    from common import load_student
    from training import encode_rows
    _, tok, _ = load_student(str(tiny_model_dir))
    dataset, _ = encode_rows(tok, rows, "input", "teacher_output", 1024, keep_whole=True)
    cache = kd_cache.TeacherCache(out)
    from fileio import sha256_file
    cache.check(data_sha256=sha256_file(kd), tokenizer=kd_cache.tokenizer_fingerprint(tok),
                rows_sha256=kd_cache.rows_fingerprint(dataset), temperature=1.0)
    label_ids = [tok(c, add_special_tokens=False).input_ids[0] for c in cm.LABELS]
    for i in (0, len(rows) - 1):  # across shards
        ids, logp, tail = cache.row(i)
        assert ids[0].tolist() == label_ids and np.exp(logp[0]).sum() == pytest.approx(1, abs=0.01)
        assert (np.exp(logp[1:, 0]) == pytest.approx(1)) and (tail == kd_cache.TAIL_FLOOR).all()
    # and trains from it
    run = kd_train.main(kd_train.parse_args([
        "--student", str(tiny_model_dir), "--teacher_cache", str(out), "--data", str(kd), "--idp_mode",
        "--save_dir", str(tmp_path / "kd"), "--max_steps", "1", "--per_device_train_batch_size", "4",
        "--gradient_accumulation_steps", "1", "--report_to", "none"]))
    assert run["train_steps"] == 1 and math.isfinite(run["train_loss"])


def test_refuses_a_kd_row_that_is_not_a_training_row(tmp_path, tiny_model_dir):
    src = _source(tmp_path / "labeled.jsonl")
    creditmix_prepare.main(creditmix_prepare.parse_args(["--src", str(src), "--outdir", str(tmp_path / "data")]))
    val = json.loads((tmp_path / "data" / "creditmix_val.jsonl").read_text().splitlines()[0])
    kd = tmp_path / "kd.jsonl"
    kd.write_text(json.dumps({"input": val["input"], "teacher_output": val["output"]}) + "\n")
    with pytest.raises(UserError, match=r"kd.jsonl: line 1: field 'input' is not among the training rows"):
        creditmix_tree.main(creditmix_tree.parse_args(["--src", str(src), "--data", str(kd), "--student",
                                                       str(tiny_model_dir), "--out", str(tmp_path / "c")]))
    assert not (tmp_path / "c").exists()


def test_real_data_tree_scores(tmp_path):
    """The reference the docs quote, on the real twenty-feature split."""
    src = shared_data("creditmix/creditmix_labeled.jsonl")
    kd = tmp_path / "kd.jsonl"
    kd.write_text("")
    s = creditmix_tree.main(creditmix_tree.parse_args(["--src", str(src), "--features", "rich", "--data", str(kd)]))
    assert s["holdout_rows"] == 1314 and 0.9 < s["holdout_accuracy"] < 0.96
