"""eval_kl.py: held-out KL(teacher||student) is 0 for a model against itself, > 0 against another, and is filed as
an evaluation of the student."""
import json

import eval_kl
from conftest import build_tiny_model


def test_eval_kl(tiny_model_dir, tmp_path, monkeypatch):
    data = tmp_path / "creditmix_val.jsonl"
    data.write_text("".join(json.dumps({"input": f"Customer {i}", "output": "Good"}) + "\n" for i in range(3)))
    other = build_tiny_model(tmp_path / "teacher", seed=1)

    def kl(teacher, *extra):
        return eval_kl.main(eval_kl.parse_args(["--teacher", str(teacher), "--student", str(tiny_model_dir),
                                                "--data", str(data), *extra]))

    assert kl(tiny_model_dir)["kl"] < 1e-5
    m = kl(other, "--out", str(tmp_path / "kl.json"))
    assert m["kl"] > 1e-4 and m["rows"] == 3 and m["tokens"] == 6
    assert json.loads((tmp_path / "kl.json").read_text())["kl"] == m["kl"]
    filed = list((tmp_path / "runs").glob("base-*/evals/kl__creditmix_val__*.json"))
    assert len(filed) == 2 and json.loads(filed[0].read_text())["task"] == "kl"
