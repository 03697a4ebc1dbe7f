"""kd_train.py: two-step runs on tiny random models in each mode (sequence-level, logit KD, on-policy), what lands in
the run dir, --idp_mode's whole and canonical targets, and the refusals (vocab mismatch, flags without a teacher)."""
import json

import pytest

import kd_train
import kd_trainer
from fileio import UserError
from conftest import build_tiny_model


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("teacher") / "tiny-teacher", seed=1)


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [{"input": f"Customer {i}: income {1000 * i}. Return only the label.",
         "teacher_output": ["Good", "Standard", "Bad"][i % 3]} for i in range(6)]


def run(tmp_path, *extra, data=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = data or write_rows(tmp_path / "creditmix_kd.jsonl", ROWS)
    save = tmp_path / "run"
    args = kd_train.parse_args(["--data", str(data), "--save_dir", str(save), "--max_steps", "2",
                                "--gradient_accumulation_steps", "1", "--logging_steps", "1", *extra])
    return kd_train.main(args), save


def read_run(save):
    return json.loads((save / "run.json").read_text()), \
        [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]


def test_readme_commands_parse():
    a = kd_train.parse_args("--student Qwen/Qwen2.5-3B-Instruct --data data/creditmix_kd.jsonl --idp_mode "
                            "--save_dir runs/creditmix_kd --epochs 5 --max_steps 7115".split())
    assert a.idp_mode and a.max_steps == 7115 and a.epochs == 5 and a.teacher is None
    a = kd_train.parse_args("--student Qwen/Qwen2.5-Coder-3B --data data/codegen_kd.jsonl --save_dir runs/kd_code "
                            "--epochs 5".split())
    assert not a.idp_mode


def test_sequence_level_smoke(tiny_model_dir, tmp_path):
    metrics, save = run(tmp_path, "--student", str(tiny_model_dir), "--idp_mode")
    assert (save / "adapter_model.safetensors").is_file() and (save / "adapter_config.json").is_file()
    rec, logs = read_run(save)
    assert rec["method"] == "kd" and rec["script"] == "kd_train.py" and rec["task"] == "creditmix"
    assert rec["kd"] == {"mode": "sequence", "teacher": None}
    assert rec["metrics"]["train_steps"] == 2 and rec["metrics"]["data_rows"] == {"ok": 6}
    assert "kd_loss" not in logs[0] and logs[0]["loss"] > 0  # SFTTrainer's own loss


def test_logit_kd_smoke_records_teacher_and_kl(tiny_model_dir, teacher_dir, tmp_path):
    held = write_rows(tmp_path / "creditmix_val.jsonl", [{"input": "held out", "output": "Bad"}])
    metrics, save = run(tmp_path, "--student", str(tiny_model_dir), "--teacher", str(teacher_dir), "--idp_mode",
                        "--kd_loss", "jsd", "--jsd_beta", "0.3", "--temperature", "2", "--alpha", "0.25",
                        "--eval_kl", str(held))
    assert (save / "adapter_model.safetensors").is_file()
    rec, logs = read_run(save)
    kd = rec["kd"]
    assert kd["mode"] == "logit" and kd["teacher"] == str(teacher_dir) and kd["kd_loss"] == "jsd"
    assert (kd["jsd_beta"], kd["temperature"], kd["alpha"], kd["lmbda"]) == (0.3, 2.0, 0.25, 0.0)
    m = rec["metrics"]
    assert m["final_kd_loss"] > 0 and m["final_ce_loss"] > 0
    assert m["kl_before"] > 0 and m["kl_after"] > 0 and m["kl_rows"] == 1
    # the logged loss is the one-line mix: (1 - alpha) * ce + alpha * T^2 * kd
    step = logs[0]
    assert step["loss"] == pytest.approx(0.75 * step["ce_loss"] + 0.25 * 4 * step["kd_loss"], rel=1e-4)


def test_alpha_zero_is_plain_ce(tiny_model_dir, tmp_path):
    """With --alpha 0 the teacher is scored but not trained on: the loss equals SFT's on the same rows."""
    _, save_kd = run(tmp_path / "kd", "--student", str(tiny_model_dir), "--teacher", str(tiny_model_dir),
                     "--alpha", "0")
    _, save_seq = run(tmp_path / "seq", "--student", str(tiny_model_dir))
    kd_logs, seq_logs = read_run(save_kd)[1], read_run(save_seq)[1]
    assert kd_logs[0]["kd_loss"] == pytest.approx(0, abs=1e-6)  # the teacher is the student's own base
    assert [r["loss"] for r in kd_logs[:2]] == pytest.approx([r["loss"] for r in seq_logs[:2]], rel=1e-4)


def test_on_policy_smoke(tiny_model_dir, teacher_dir, tmp_path):
    metrics, save = run(tmp_path, "--student", str(tiny_model_dir), "--teacher", str(teacher_dir),
                        "--lmbda", "1", "--max_new_tokens", "4", "--kd_loss", "reverse_kl")
    rec, logs = read_run(save)
    assert rec["kd"]["mode"] == "on_policy" and rec["kd"]["max_new_tokens"] == 4
    steps = [r for r in logs if "on_policy" in r]
    assert len(steps) == 2 and all(r["on_policy"] == 1.0 for r in steps)
    assert all("ce_loss" not in r and r["loss"] == pytest.approx(r["kd_loss"], rel=1e-4) for r in steps)


def test_vocab_mismatch_refused(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer
    other = build_tiny_model(tmp_path / "other-vocab", vocab_size=49152 + 2)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<extra_a>", "<extra_b>"])
    tok.save_pretrained(other)
    with pytest.raises(UserError, match="tokenizers differ.*sequence-level KD"):
        run(tmp_path, "--student", str(tiny_model_dir), "--teacher", str(other))
    assert not (tmp_path / "run" / "run.json").exists()


def test_idp_mode_whole_and_canonical_targets(tiny_model_dir, tmp_path):
    long_json = json.dumps({"vendor": "Bar LLC", "items": ["x " * 80]}, indent=2)
    rows = [{"input": "Invoice #1 total USD 50.", "teacher_output": '{"total": 50,\n  "currency": "USD"}'},
            {"input": "Invoice #2", "teacher_output": long_json},
            {"input": "Credit mix?", "teacher_output": "Good"}]
    data = write_rows(tmp_path / "idp_kd.jsonl", rows)
    _, save = run(tmp_path, "--student", str(tiny_model_dir), "--idp_mode", "--max_len", "64", data=data)
    rec = read_run(save)[0]
    assert rec["metrics"]["data_rows"] == {"ok": 2, "too_long": 1}  # never cut: skipped and counted


def test_idp_mode_bad_json_names_line(tiny_model_dir, tmp_path):
    data = write_rows(tmp_path / "idp_kd.jsonl", [{"input": "a", "teacher_output": '{"total": 50}'},
                                                  {"input": "b", "teacher_output": '{"total": }'}])
    with pytest.raises(UserError, match=r"idp_kd\.jsonl: line 2: field 'teacher_output'.*does not parse"):
        run(tmp_path, "--student", str(tiny_model_dir), "--idp_mode", data=data)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags,msg", [(["--lmbda", "0.5"], "--lmbda needs --teacher"),
                                       (["--eval_kl", "x.jsonl"], "--eval_kl needs --teacher"),
                                       (["--teacher", "t", "--alpha", "1.5"], "--alpha"),
                                       (["--teacher", "t", "--kd_loss", "jsd", "--jsd_beta", "0"], "--jsd_beta")])
def test_bad_flags(tmp_path, flags, msg):
    with pytest.raises(UserError, match=msg):
        run(tmp_path, "--student", "unused", *flags)


def test_logit_kd_loss_is_weighted_per_token_over_the_accumulated_batch(tiny_model_dir, teacher_dir, tmp_path):
    """Two micro-batches with answers of very different lengths, each weighted by its share of the accumulated
    batch's completion tokens, add up to the loss of the whole batch at once (as SFT's num_items_in_batch does)."""
    import torch
    from common import load_model, load_student
    from training import encode_rows

    args = kd_train.parse_args(["--data", "unused", "--save_dir", str(tmp_path / "run"), "--teacher", "t",
                                "--alpha", "0.5", "--per_device_train_batch_size", "1",
                                "--gradient_accumulation_steps", "2"])
    model, tok, _ = load_student(str(tiny_model_dir))
    teacher, _, _ = load_model(str(teacher_dir))
    rows = [{"input": "short", "teacher_output": "Good"},
            {"input": "long", "teacher_output": "Standard, because " + "the income is high and " * 6}]
    dataset, _ = encode_rows(tok, rows, "input", "teacher_output", max_len=256)
    enc = list(dataset)
    trainer = kd_trainer.build_trainer(args, model, tok, dataset, teacher=teacher, callbacks=[])
    model.train()
    parts = [trainer.data_collator([e]) for e in enc]
    whole = trainer.data_collator(enc)
    n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in parts)
    assert len({int((b["labels"][:, 1:] != -100).sum()) for b in parts}) == 2  # the lengths differ
    with torch.no_grad():
        split = sum(trainer.compute_loss(model, b, num_items_in_batch=torch.tensor(n)) for b in parts)
        at_once = trainer.compute_loss(model, whole, num_items_in_batch=torch.tensor(n))
        plain_mean = sum(trainer.compute_loss(model, b) for b in parts) / 2  # what per-micro-batch means would give
    assert float(split) == pytest.approx(float(at_once), rel=1e-4)
    assert abs(float(plain_mean) - float(at_once)) > 1e-3  # the test can tell the two weightings apart
