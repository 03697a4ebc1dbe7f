import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import infer_creditmix
from fileio import UserError

FEATURES = ("Age: 23.0, Occupation: Scientist, Annual Income: 19114.12, Outstanding Debt: 809.98, "
            "Credit Utilization Ratio: 35.03, Payment Behaviour: Low_spent_Small_value_payments")
KEYS = ["model_name", "prediction", "scores", "raw_scores", "prior", "probabilities", "top2_margin"]


def check_response(r, labels=("Good", "Standard", "Bad")):
    assert list(r) == KEYS
    for k in ("scores", "raw_scores", "prior", "probabilities"):
        assert list(r[k]) == list(labels)
    cal = np.array([r["scores"][c] for c in labels])
    np.testing.assert_allclose(cal, [r["raw_scores"][c] - r["prior"][c] for c in labels], atol=2e-4)
    assert sum(r["probabilities"].values()) == pytest.approx(1, abs=1e-3)
    assert r["prediction"] == labels[int(np.argmax(cal))]
    top = sorted(cal, reverse=True)
    assert r["top2_margin"] == pytest.approx(top[0] - top[1], abs=2e-4)


def test_readme_response_from_a_run_dir(tiny_sft_run, capsys):
    out = infer_creditmix.main(infer_creditmix.parse_args(["--model_dir", str(tiny_sft_run), "--features", FEATURES]))
    printed = json.loads(capsys.readouterr().out)
    assert printed == out[0] and printed["model_name"] == str(tiny_sft_run)
    check_response(printed)


def test_calibrations(tiny_model_dir):
    args = ["--model_dir", str(tiny_model_dir), "--features", FEATURES, "--features", "Age: 50.0"]
    none = infer_creditmix.main(infer_creditmix.parse_args(args + ["--calibration", "none"]))
    assert all(v == 0 for v in none[0]["prior"].values())
    batch = infer_creditmix.main(infer_creditmix.parse_args(args + ["--calibration", "batch"]))
    for c in ("Good", "Standard", "Bad"):  # batch prior = mean raw score over the inputs
        assert batch[0]["prior"][c] == pytest.approx((none[0]["raw_scores"][c] + none[1]["raw_scores"][c]) / 2,
                                                     abs=2e-4)
    with pytest.raises(UserError, match="batch needs several"):
        infer_creditmix.main(infer_creditmix.parse_args(["--model_dir", str(tiny_model_dir), "--features", FEATURES,
                                                         "--calibration", "batch"]))
    with pytest.raises(UserError, match="empty"):
        infer_creditmix.main(infer_creditmix.parse_args(["--model_dir", str(tiny_model_dir), "--features", " "]))


@pytest.mark.real_model
def test_readme_command_on_embedded_model():
    r = subprocess.run([sys.executable, "infer_creditmix.py", "--model_dir", "smollm2-135m", "--features", FEATURES],
                       capture_output=True, text=True, cwd=Path(infer_creditmix.__file__).parent, timeout=600)
    assert r.returncode == 0, r.stderr
    check_response(json.loads(r.stdout))
