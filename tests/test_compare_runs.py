"""compare_runs.py on small fabricated run directories (run.json, metrics.jsonl, evals/*.json): the table's rows and
values, the report's files, and the bad inputs of the issue (not a run, corrupt logs and evals, mixed tasks)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import compare_runs
from fileio import UserError

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["Good", "Standard", "Bad"]


def creditmix_metrics(acc: float, f1: float, n: int = 30, cm=None) -> dict:
    cm = cm or [[8, 1, 1], [2, 7, 1], [1, 1, 8]]
    cals = {cal: {"accuracy": acc + d, "macro_f1": f1 + d, "confusion_matrix": cm,
                  "classification_report": {"macro avg": {"f1-score": f1 + d}}}
            for cal, d in (("multi_null", 0.0), ("batch", -0.01), ("none", -0.05))}
    return {"n": n, "val_per_class": n // 3, "labels": LABELS, "calibrations": cals}


def make_run(root: Path, name: str, method: str = "sft", task: str | None = "creditmix", evals=(), loss=None,
             **info) -> Path:
    """A run dir: run.json, metrics.jsonl from `loss` (a list of floats, one per 10 steps), and `evals`
    (dicts with metrics, dataset stem, stamp)."""
    d = root / name
    (d / "evals").mkdir(parents=True)
    rec = {"script": f"{method}_train.py", "method": method, "task": task, "base_model": "smollm2-135m",
           "args": {}, "data": {"path": f"data/{task}_{method}.jsonl", "sha256": "ab" * 32},
           "wall_time_s": 125.0, "peak_mem_gib": 3.25, "metrics": {"train_loss": 0.5, "train_steps": 40}}
    rec.update(info)
    (d / "run.json").write_text(json.dumps(rec))
    if loss:
        logs = [{"step": 10 * (i + 1), "epoch": 0.1 * i, "loss": v, "learning_rate": 1e-4} for i, v in enumerate(loss)]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in logs))
    for e in evals:
        write_eval(d, e.get("task", task), e["metrics"], e.get("dataset", f"{task}_dataset"),
                   e.get("stamp", "20261126-100000"), e.get("sha256", "cd" * 32))
    return d


def write_eval(run: Path, task: str, metrics: dict, dataset: str, stamp: str, sha: str = "cd" * 32) -> Path:
    date = f"{stamp[:4]}-{stamp[4:6]}-{stamp[6:8]}T{stamp[9:11]}:{stamp[11:13]}:{stamp[13:15]}"
    f = run / "evals" / f"{task}__{dataset}__{stamp}.json"
    f.write_text(json.dumps({"task": task, "script": f"eval_{task}.py", "date": date, "model_dir": str(run),
                             "dataset": {"path": f"data/{dataset}.json", "sha256": sha}, "args": {},
                             "metrics": metrics}))
    return f


def compare(*argv):
    return compare_runs.main(compare_runs.parse_args([str(a) for a in argv]))


def assert_png(path: Path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 200 and im.height > 150


def rows_by_run(result, task="creditmix"):
    return {r["run"]: r for r in result["tables"][task]["rows"]}


@pytest.fixture
def creditmix_runs(tmp_path):
    runs = tmp_path / "runs"
    base = make_run(runs, "base-smollm2-135m", method="base", task=None, evals=[
        {"task": "creditmix", "metrics": creditmix_metrics(0.34, 0.33), "dataset": "creditmix_dataset"}],
        data=None, wall_time_s=None, peak_mem_gib=None, metrics={})
    sft = make_run(runs, "creditmix_sft", loss=[2.0, 1.2, 0.8, 0.6],
                   evals=[{"metrics": creditmix_metrics(0.81, 0.80)}])
    kd = make_run(runs, "creditmix_kd", method="kd", loss=[2.5, 1.5, 1.0],
                  evals=[{"metrics": creditmix_metrics(0.50, 0.50), "stamp": "20261126-090000"},
                         {"metrics": creditmix_metrics(0.77, 0.76), "stamp": "20261126-110000"}],
                  wall_time_s=7300.0, peak_mem_gib=None)
    dpo = make_run(runs, "creditmix_dpo", method="dpo", loss=[0.69, 0.5, 0.4])
    return runs, base, sft, kd, dpo


def test_table_has_a_row_per_run_with_its_values(creditmix_runs, tmp_path, capsys):
    runs, base, sft, kd, dpo = creditmix_runs
    out = tmp_path / "report"
    res = compare(dpo, kd, sft, base, "--task", "creditmix", "--out", out)
    table = res["tables"]["creditmix"]
    assert [r["run"] for r in table["rows"]] == ["base-smollm2-135m", "creditmix_sft", "creditmix_kd",
                                                "creditmix_dpo"]  # base -> SFT -> KD -> DPO
    rows = rows_by_run(res)
    s = rows["creditmix_sft"]
    assert (s["method"], s["base_model"], s["data"], s["steps"], s["wall_time_s"], s["peak_mem_gib"]) == \
        ("sft", "smollm2-135m", "creditmix_sft.jsonl", 40, 125.0, 3.25)
    assert s["dataset"] == "creditmix_dataset" and s["n"] == 30
    assert s["metrics"]["acc multi_null"] == pytest.approx(0.81)
    assert s["metrics"]["F1 batch"] == pytest.approx(0.79)
    assert s["metrics"]["acc none"] == pytest.approx(0.76)
    assert s["missing"] == []
    # the latest of kd's two evaluations of one dataset
    assert rows["creditmix_kd"]["metrics"]["acc multi_null"] == pytest.approx(0.77)
    assert rows["creditmix_kd"]["eval_file"].endswith("20261126-110000.json")
    # a base run (task None in run.json) joins through its evaluation; a run without evaluation is listed
    assert rows["base-smollm2-135m"]["metrics"]["F1 multi_null"] == pytest.approx(0.33)
    assert rows["creditmix_dpo"]["eval_file"] is None
    assert rows["creditmix_dpo"]["missing"] == ["no creditmix evaluation on creditmix_dataset"]
    assert table["best"][0]["run"] == "creditmix_sft"

    printed = capsys.readouterr().out
    line = next(x for x in printed.splitlines() if x.startswith("creditmix_sft"))
    assert line.split()[:5] == ["creditmix_sft", "sft", "smollm2-135m", "creditmix_sft.jsonl", "40"]
    assert "2m 05s" in line and "3.25 GiB" in line and "0.810" in line and "0.800" in line
    kd_line = next(x for x in printed.splitlines() if x.startswith("creditmix_kd"))
    assert "2h 01m" in kd_line and "0.770" in kd_line and "0.500" not in kd_line
    dpo_line = next(x for x in printed.splitlines() if x.startswith("creditmix_dpo"))
    assert "no creditmix evaluation on creditmix_dataset" in dpo_line
    assert "best on creditmix_dataset by F1 multi_null: creditmix_sft 0.800" in printed

    index = (out / "index.md").read_text()
    assert "| creditmix_sft | sft | smollm2-135m | creditmix_sft.jsonl | 40 | 2m 05s | 3.25 GiB | creditmix_dataset" \
        " | 30 | 0.810 | 0.800 | 0.800 | 0.790 | 0.760 | 0.750 |" in index
    for name in ("creditmix_loss.png", "creditmix_metrics.png", "creditmix_confusion.png"):
        assert f"]({name})" in index
        assert_png(out / name)
    assert json.loads((out / "summary.json").read_text())["tables"]["creditmix"]["rows"][1]["run"] == "creditmix_sft"
    assert not list(out.glob(".*"))  # no temp files left


def test_folder_of_runs_and_a_dir_that_is_not_a_run(creditmix_runs, tmp_path, capsys):
    runs, *_ = creditmix_runs
    (runs / "notes").mkdir()
    empty = tmp_path / "empty"
    empty.mkdir()
    res = compare(runs, empty, tmp_path / "no_such_run", "--out", tmp_path / "report")
    assert len(res["tables"]["creditmix"]["rows"]) == 4
    err = capsys.readouterr().err
    assert f"warning: {runs / 'notes'}: not a run (no run.json): skipped" in err
    assert f"warning: {empty}: not a run (no run.json) and no run directories inside" in err
    assert "no_such_run: no such directory" in err
    assert "no run.json" in (tmp_path / "report" / "index.md").read_text()


def test_nothing_to_compare_is_an_error_and_writes_nothing(tmp_path):
    (tmp_path / "a").mkdir()
    out = tmp_path / "report"
    with pytest.raises(UserError, match="nothing to compare"):
        compare(tmp_path / "a", "--out", out)
    assert not out.exists()
    # the command line: one line, exit code 2
    p = subprocess.run([sys.executable, str(ROOT / "compare_runs.py"), str(tmp_path / "a"), "--out", str(out)],
                       capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("error: nothing to compare: no readable run")
    assert "Traceback" not in p.stderr


def test_truncated_metrics_jsonl_keeps_the_readable_curve(creditmix_runs, tmp_path, capsys):
    runs, base, sft, kd, dpo = creditmix_runs
    with open(sft / "metrics.jsonl", "a") as f:
        f.write('{"step": 50, "epoch": 0.5, "lo')  # a run killed mid-write
    res = compare(sft, kd, "--out", tmp_path / "report")
    err = capsys.readouterr().err
    assert f"{sft / 'metrics.jsonl'}:5: invalid JSON (last line, truncated): 1 line(s) skipped, 4 read" in err
    sft_run = compare_runs.read_run(sft, [])
    assert sft_run.curve == [(10.0, 2.0), (20.0, 1.2), (30.0, 0.8), (40.0, 0.6)]
    assert rows_by_run(res)["creditmix_sft"]["missing"] == []
    assert_png(tmp_path / "report" / "creditmix_loss.png")


def test_corrupt_run_json_and_eval_are_reported_and_the_rest_compared(creditmix_runs, tmp_path, capsys):
    runs, base, sft, kd, dpo = creditmix_runs
    (dpo / "run.json").write_text('{"method": "dpo",\n "task": ')
    (sft / "evals" / "creditmix__creditmix_dataset__20261126-100000.json").write_text("{\"task\": \"creditmix\"")
    res = compare(runs, "--out", tmp_path / "report")
    err = capsys.readouterr().err
    assert f"{dpo / 'run.json'}:2: invalid JSON" in err and "run skipped" in err
    assert f"{sft / 'evals'}/creditmix__creditmix_dataset__20261126-100000.json:1: invalid JSON" in err
    rows = rows_by_run(res)
    assert "creditmix_dpo" not in rows
    assert rows["creditmix_sft"]["eval_file"] is None
    assert rows["creditmix_sft"]["missing"] == ["no creditmix evaluation on creditmix_dataset"]
    assert "## Problems" in (tmp_path / "report" / "index.md").read_text()


def test_missing_metric_keys_show_a_dash(tmp_path, capsys):
    runs = tmp_path / "runs"
    make_run(runs, "partial", evals=[{"metrics": {"calibrations": {"multi_null": {"accuracy": 0.6}}}}],
             metrics={}, peak_mem_gib=None)
    res = compare(runs, "--out", tmp_path / "report")
    row = res["tables"]["creditmix"]["rows"][0]
    assert row["metrics"]["acc multi_null"] == pytest.approx(0.6)
    assert row["metrics"]["F1 multi_null"] is None and row["n"] is None and row["steps"] is None
    shown = compare_runs.display_row(row, res["tables"]["creditmix"]["columns"])
    assert shown[4:7] == ["–", "2m 05s", "–"] and shown[8] == "–"
    assert shown[9:15] == ["0.600", "–", "–", "–", "–", "–"]
    assert "no training log" in shown[-1]
    assert ("creditmix", "confusion") not in res["figures"]  # no confusion matrix to draw
    assert_png(tmp_path / "report" / "creditmix_metrics.png")


def test_latest_evaluation_per_dataset_names_the_dataset(tmp_path):
    runs = tmp_path / "runs"
    a = make_run(runs, "creditmix_sft", loss=[1.0], evals=[
        {"metrics": creditmix_metrics(0.70, 0.70), "dataset": "holdout"},
        {"metrics": creditmix_metrics(0.60, 0.60), "dataset": "creditmix_dataset"}])
    write_eval(a, "creditmix", creditmix_metrics(0.71, 0.71), "holdout", "20261126-100000-1")  # same second, later
    b = make_run(runs, "creditmix_kd", method="kd", loss=[1.0], evals=[{"metrics": creditmix_metrics(0.65, 0.64),
                                                            "dataset": "holdout"}])
    res = compare(a, b, "--out", tmp_path / "report")
    rows = [(r["run"], r["dataset"], r["metrics"]["acc multi_null"]) for r in res["tables"]["creditmix"]["rows"]]
    assert rows == [("creditmix_sft", "creditmix_dataset", pytest.approx(0.60)),
                    ("creditmix_kd", "creditmix_dataset", None),
                    ("creditmix_sft", "holdout", pytest.approx(0.71)),
                    ("creditmix_kd", "holdout", pytest.approx(0.65))]
    kd_missing = [r["missing"] for r in res["tables"]["creditmix"]["rows"] if r["eval_file"] is None]
    assert kd_missing == [["no creditmix evaluation on creditmix_dataset"]]
    assert [(b["dataset"], b["run"]) for b in res["tables"]["creditmix"]["best"]] == \
        [("creditmix_dataset", "creditmix_sft"), ("holdout", "creditmix_sft")]


def test_different_dataset_contents_are_flagged(tmp_path, capsys):
    runs = tmp_path / "runs"
    make_run(runs, "a", evals=[{"metrics": creditmix_metrics(0.7, 0.7), "sha256": "11" * 32}])
    make_run(runs, "b", evals=[{"metrics": creditmix_metrics(0.7, 0.7), "sha256": "22" * 32}])
    compare(runs, "--out", tmp_path / "report")
    assert "evaluated on different contents of creditmix_dataset" in capsys.readouterr().err


def test_mixed_tasks_give_one_table_each_or_keep_the_asked_one(tmp_path, capsys):
    runs = tmp_path / "runs"
    make_run(runs, "creditmix_sft", loss=[1.0, 0.5], evals=[{"metrics": creditmix_metrics(0.8, 0.8)}])
    make_run(runs, "sft_idp", task="idp", loss=[1.5, 0.9], evals=[{"metrics": {
        "n": 20, "json_valid_rate": 1.0, "schema_valid_rate": 0.95, "field_f1_micro": 0.7, "field_f1_macro": 0.65,
        "field_exact_match": {"total": 0.8}}}])
    make_run(runs, "sft_code", task="codegen", evals=[{"metrics": {"n": 10, "pass@k": {"1": 0.3, "10": 0.6}}}])
    make_run(runs, "kd_code", method="kd", task="codegen", evals=[{"metrics": {"n": 10, "pass@1": 0.4}}])
    res = compare(runs, "--out", tmp_path / "report")
    assert sorted(res["tables"]) == ["codegen", "creditmix", "idp"]
    assert "NOTE: these runs cover 3 tasks (codegen: 2 runs, creditmix: 1 run, idp: 1 run)" in capsys.readouterr().err
    idp = res["tables"]["idp"]
    assert idp["columns"] == ["JSON valid", "schema valid", "field F1 micro", "field F1 macro"]
    assert idp["rows"][0]["metrics"] == {"JSON valid": 1.0, "schema valid": 0.95, "field F1 micro": 0.7,
                                         "field F1 macro": 0.65}
    code = rows_by_run(res, "codegen")
    assert res["tables"]["codegen"]["columns"] == ["pass@1", "pass@10"]
    assert code["sft_code"]["metrics"] == {"pass@1": 0.3, "pass@10": 0.6}
    assert code["kd_code"]["metrics"] == {"pass@1": 0.4, "pass@10": None}
    assert res["tables"]["codegen"]["best"][0]["run"] == "kd_code"
    index = (tmp_path / "report" / "index.md").read_text()
    assert "## creditmix" in index and "## idp" in index and "## codegen" in index
    for (task, kind), path in res["figures"].items():
        assert path.name == f"{task}_{kind}.png"
        assert_png(path)
    assert {k for k in res["figures"]} >= {("idp", "loss"), ("idp", "metrics"), ("codegen", "metrics"),
                                           ("creditmix", "confusion")}

    res = compare(runs, "--task", "creditmix", "--out", tmp_path / "report2")
    assert list(res["tables"]) == ["creditmix"]
    assert f"{runs / 'sft_idp'}: a idp run, not creditmix: skipped" in capsys.readouterr().err
    with pytest.raises(UserError, match="nothing to compare: no creditmix run"):
        compare(runs / "sft_idp", "--task", "creditmix", "--out", tmp_path / "report3")


def test_loss_falls_back_to_trainer_state_then_tensorboard(tmp_path):
    runs = tmp_path / "runs"
    a = make_run(runs, "from_state", evals=[{"metrics": creditmix_metrics(0.7, 0.7)}])
    for step, losses in ((10, [3.0]), (20, [3.0, 2.0])):  # the newest checkpoint holds the longest history
        ck = a / f"checkpoint-{step}"
        ck.mkdir()
        hist = [{"step": 10 * (i + 1), "loss": v} for i, v in enumerate(losses)] + [{"step": step, "train_loss": 9}]
        (ck / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": hist}))
    b = make_run(runs, "from_tensorboard", evals=[{"metrics": creditmix_metrics(0.7, 0.7)}])
    from torch.utils.tensorboard import SummaryWriter  # what transformers' TensorBoardCallback writes with
    w = SummaryWriter(str(b / "logs"))
    for step, v in ((5, 1.5), (10, 1.0)):
        w.add_scalar("train/loss", v, step)
    w.close()
    assert compare_runs.read_curve(a, []) == ([(10.0, 3.0), (20.0, 2.0)], "checkpoint-20/trainer_state.json")
    assert compare_runs.read_curve(b, []) == ([(5.0, 1.5), (10.0, 1.0)], "logs/ (TensorBoard)")
    res = compare(runs, "--out", tmp_path / "report")
    assert all(r["missing"] == [] for r in res["tables"]["creditmix"]["rows"])
    assert_png(tmp_path / "report" / "creditmix_loss.png")


def test_out_must_be_a_folder(creditmix_runs, tmp_path):
    runs, *_ = creditmix_runs
    (tmp_path / "report").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        compare(runs, "--out", tmp_path / "report")


def test_docs_example_command_makes_its_picture(tmp_path):
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import make_compare_example
    finally:
        sys.path.remove(str(ROOT / "docs"))
    out = tmp_path / "example.png"
    res = make_compare_example.main(make_compare_example.parse_args(["--out", str(out)]))
    assert [r["run"] for r in res["tables"]["creditmix"]["rows"]] == list(make_compare_example.FAKE)
    assert_png(out)


def test_reads_what_common_writes(tmp_path, monkeypatch):
    """The run record and evaluation files as the trainers and evals write them (run_record.write_run_json/save_eval)."""
    import time

    import run_record
    runs = tmp_path / "runs"
    monkeypatch.setenv("DISTILL_SLM_RUNS", str(runs))
    data = tmp_path / "creditmix_sft.jsonl"
    data.write_text('{"prompt": "p", "completion": "Good"}\n')
    dataset = tmp_path / "creditmix_dataset.json"
    dataset.write_text("[]")
    sft = runs / "creditmix_sft"
    sft.mkdir(parents=True)
    (sft / "adapter_config.json").write_text("{}")  # what makes save_eval file the evaluation in the run dir
    (sft / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    run_record.write_run_json(sft, script="sft_train.py", method="sft", args={"epochs": 1}, base_model="smollm2-135m",
                          data=data, metrics={"train_loss": 1.75, "train_steps": 2}, started=time.time() - 3)
    run_record.save_eval(str(sft), "creditmix", dataset, {}, creditmix_metrics(0.8, 0.79), script="eval_creditmix.py")
    run_record.save_eval("smollm2-135m", "creditmix", dataset, {}, creditmix_metrics(0.33, 0.3), script="eval_creditmix.py")
    res = compare(runs, "--out", tmp_path / "report")
    rows = rows_by_run(res)
    assert sorted(rows) == ["base-smollm2-135m", "creditmix_sft"]
    assert rows["creditmix_sft"]["steps"] == 2 and rows["creditmix_sft"]["data"] == "creditmix_sft.jsonl"
    assert rows["creditmix_sft"]["metrics"]["F1 multi_null"] == pytest.approx(0.79)
    assert rows["base-smollm2-135m"]["method"] == "base" and rows["base-smollm2-135m"]["missing"] == []
    assert {r["dataset"] for r in rows.values()} == {"creditmix_dataset"}
