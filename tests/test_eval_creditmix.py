import json

import pytest

import eval_creditmix
from fileio import UserError


def run(argv):
    return eval_creditmix.main(eval_creditmix.parse_args(argv))


def test_metrics_for_all_calibrations_and_saved_eval(tiny_sft_run, creditmix_dir, tmp_path, capsys):
    m = run(["--model_dir", str(tiny_sft_run), "--data", str(creditmix_dir / "creditmix_val.jsonl"),
             "--out", str(tmp_path / "m.json")])
    assert m["n"] == 12 and m["val_per_class"] == {"Good": 4, "Standard": 4, "Bad": 4}
    for mode in ("multi_null", "batch", "none"):
        c = m["calibrations"][mode]
        assert 0 <= c["accuracy"] <= 1 and sum(map(sum, c["confusion_matrix"])) == 12
        assert c["accuracy"] == pytest.approx(sum(c["confusion_matrix"][i][i] for i in range(3)) / 12, abs=1e-4)
    assert json.loads((tmp_path / "m.json").read_text()) == json.loads(json.dumps(m))
    evals = list((tiny_sft_run / "evals").glob("creditmix__creditmix_val__*.json"))
    assert evals and json.loads(evals[-1].read_text())["metrics"]["n"] == 12
    out = capsys.readouterr().out
    assert "multi_null" in out and "confusion_matrix" in out


def test_raw_source_rebuilds_prepares_split(tiny_model_dir, creditmix_dir):
    val_file = run(["--model_dir", str(tiny_model_dir), "--data", str(creditmix_dir / "creditmix_val.jsonl")])
    raw = run(["--model_dir", str(tiny_model_dir), "--data", str(creditmix_dir / "creditmix_dataset.json"),
               "--val_per_class", "4"])
    assert raw["calibrations"] == val_file["calibrations"]


def test_never_scores_training_rows(tiny_sft_run, creditmix_dir):
    with pytest.raises(UserError, match=r"validation rows are in this run's training file .*--val_per_class 9"):
        run(["--model_dir", str(tiny_sft_run), "--data", str(creditmix_dir / "creditmix_dataset.json"),
             "--val_per_class", "9"])


def test_bad_inputs(tiny_model_dir, creditmix_dir, tmp_path):
    with pytest.raises(UserError, match="larger than class"):
        run(["--model_dir", str(tiny_model_dir), "--data", str(creditmix_dir / "creditmix_dataset.json"),
             "--val_per_class", "500"])
    with pytest.raises(UserError, match="not found"):
        run(["--model_dir", str(tiny_model_dir), "--data", str(tmp_path / "none.jsonl")])
    run_dir = tmp_path / "unfinished"
    (run_dir / "checkpoint-1").mkdir(parents=True)
    with pytest.raises(UserError, match="without a saved adapter"):
        run(["--model_dir", str(run_dir), "--data", str(creditmix_dir / "creditmix_val.jsonl")])


def test_records_the_calibration_that_infer_auto_then_serves(tiny_sft_run, creditmix_dir, capsys):
    import numpy as np

    import infer_creditmix
    from scoring import CALIBRATION_FILE, SCORES_FILE
    m = run(["--model_dir", str(tiny_sft_run), "--data", str(creditmix_dir / "creditmix_val.jsonl")])
    chosen = m["chosen_calibration"]
    best = max(m["calibrations"][c]["accuracy"] for c in ("multi_null", "batch", "none"))
    assert m["calibrations"][chosen["calibration"]]["accuracy"] == pytest.approx(best, abs=1e-4)
    rec = json.loads((tiny_sft_run / CALIBRATION_FILE).read_text())
    assert rec["calibration"] == chosen["calibration"] and rec["temperature"] > 0
    assert 0 <= rec["ece_after"] <= 1 and rec["data"]["path"].endswith("creditmix_val.jsonl")
    assert 0 <= rec["ece_after_heldout"] <= 1 and 0 < rec["ece_floor"] < 1
    # the raw scores it chose from, row by row: the recorded accuracy follows from them
    saved = json.loads((tiny_sft_run / SCORES_FILE).read_text())
    raw, y = np.array(saved["raw"]), np.array([saved["labels"].index(v) for v in saved["y"]])
    assert raw.shape == (m["n"], 3)
    assert float((raw.argmax(1) == y).mean()) == pytest.approx(m["calibrations"]["none"]["accuracy"], abs=1e-3)
    capsys.readouterr()
    out = infer_creditmix.main(infer_creditmix.parse_args(["--model_dir", str(tiny_sft_run), "--features", "Age: 30"]))
    assert "--calibration auto: " + rec["calibration"] in capsys.readouterr().err
    r = out[0]
    assert [r["prior"][c] for c in ("Good", "Standard", "Bad")] == pytest.approx(rec["prior"], abs=1e-4)
    z = np.array([r["scores"][c] for c in ("Good", "Standard", "Bad")]) / rec["temperature"]
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    assert [r["probabilities"][c] for c in ("Good", "Standard", "Bad")] == pytest.approx(list(p), abs=2e-4)
