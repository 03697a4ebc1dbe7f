"""teacher_cache.py + kd_train.py --teacher_cache: the cached top-k teacher on tiny random models. The cached loss
equals the live teacher's forward KL when k covers the vocabulary and bounds it from below otherwise; training from
the cache runs with the teacher never loaded; the cache refuses another tokenizer or other data; it resumes."""
import json

import numpy as np
import pytest
import torch

import kd_cache
import kd_train
import teacher_cache
from fileio import UserError
from conftest import build_tiny_model

ROWS = [{"input": f"Customer {i}: income {1000 * i}. Return only the label.",
         "teacher_output": ["Good", "Standard, mostly", "Bad because of the debt"][i % 3]} for i in range(7)]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("teacher") / "tiny-teacher", seed=1)


@pytest.fixture()
def data(tmp_path):
    p = tmp_path / "kd.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return p


def make_cache(teacher, data, out, *extra):
    return teacher_cache.main(teacher_cache.parse_args(["--teacher", str(teacher), "--data", str(data), "--out",
                                                        str(out), "--batch_size", "3", "--shard_rows", "3", *extra]))


def test_pack_roundtrip_keeps_ids_and_half_a_millinat():
    ids = np.array([[0, 5, 262143]])
    logp = np.array([[-0.0001, -3.14159, -40.0]])
    got_ids, got = kd_cache.unpack(kd_cache.pack(ids, logp))
    assert (got_ids == ids).all()
    assert got[0, :2] == pytest.approx(logp[0, :2], abs=1 / 1024) and got[0, 2] == pytest.approx(kd_cache.MIN_LOGP)
    with pytest.raises(UserError, match="does not fit"):
        kd_cache.pack(np.array([[2 ** 18]]), np.array([[-1.0]]))


def test_cache_size_and_resume(teacher_dir, data, tmp_path):
    out = tmp_path / "cache"
    s = make_cache(teacher_dir, data, out)
    assert s["rows"] == 7 and s["shards"] == 3 and s["answer_tokens"] > 0
    packed = sum(np.load(p)["packed"].nbytes + np.load(p)["tail"].nbytes for p in out.glob("shard-*.npz"))
    assert packed == s["answer_tokens"] * (4 * 64 + 2)  # 258 bytes per answer token at k = 64
    assert s["bytes"] <= packed + s["shards"] * 1024  # the rest is each shard's npz headers
    first = (out / "shard-00000.npz").read_bytes()
    (out / "shard-00002.npz").unlink()  # an interrupted run: the last shard never finished
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "complete": False}))
    again = make_cache(teacher_dir, data, out)
    assert again["resumed_at_shard"] == 2 and (out / "shard-00000.npz").read_bytes() == first
    with pytest.raises(UserError, match="other settings"):
        make_cache(teacher_dir, data, out, "--top_k", "8")


def test_cached_loss_is_the_live_forward_kl_with_full_k_and_a_lower_bound_with_small_k(tiny_model_dir, teacher_dir,
                                                                                      data, tmp_path):
    from common import load_model, load_student
    from kd_losses import kd_terms
    from training import encode_rows
    from transformers import DataCollatorForSeq2Seq
    student, tok, _ = load_student(str(tiny_model_dir))
    teacher, _, _ = load_model(str(teacher_dir))
    vocab = student.config.vocab_size
    dataset, _ = encode_rows(tok, ROWS, "input", "teacher_output", max_len=1024)
    tok.padding_side = "right"
    batch = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)(
        [{k: ex[k] for k in ("input_ids", "labels")} for ex in dataset])
    live = kd_terms(student, teacher, batch, kd_loss="forward_kl")
    full = kd_cache.TeacherCache(make_cache(teacher_dir, data, tmp_path / "full", "--top_k", str(vocab))["out"])
    small = kd_cache.TeacherCache(make_cache(teacher_dir, data, tmp_path / "small", "--top_k", "4")["out"])
    rows = list(range(len(ROWS)))
    with torch.no_grad():
        got_full = kd_cache.cached_kd_terms(student, batch, full, rows)
        got_small = kd_cache.cached_kd_terms(student, batch, small, rows)
    assert float(got_full["kd"]) == pytest.approx(float(live["kd"]), rel=2e-3, abs=1e-4)
    assert float(got_full["ce"]) == pytest.approx(float(live["ce"]), rel=1e-4)
    assert float(got_small["kd"]) <= float(live["kd"]) + 1e-4 and float(got_small["kd"]) > 0


def test_kd_train_from_the_cache_without_the_teacher(tiny_model_dir, teacher_dir, data, tmp_path, monkeypatch):
    import common
    out = make_cache(teacher_dir, data, tmp_path / "cache")["out"]
    loaded = []
    real = common.load_model
    monkeypatch.setattr(kd_train, "load_model", lambda spec, **kw: loaded.append(spec) or real(spec, **kw))
    save = tmp_path / "run"
    kd_train.main(kd_train.parse_args(["--student", str(tiny_model_dir), "--teacher_cache", out, "--data", str(data),
                                       "--save_dir", str(save), "--max_steps", "2", "--logging_steps", "1",
                                       "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2"]))
    assert loaded == []  # the teacher is never loaded
    rec = json.loads((save / "run.json").read_text())
    assert rec["kd"]["mode"] == "cached" and rec["kd"]["top_k"] == 64 and rec["kd"]["teacher"] == str(teacher_dir)
    logs = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert logs[0]["kd_loss"] > 0 and logs[0]["ce_loss"] > 0


def test_cache_refuses_another_tokenizer_or_other_data(tiny_model_dir, teacher_dir, data, tmp_path):
    from transformers import AutoTokenizer
    out = make_cache(teacher_dir, data, tmp_path / "cache")["out"]
    args = ["--teacher_cache", out, "--save_dir", str(tmp_path / "run"), "--max_steps", "1"]
    other = build_tiny_model(tmp_path / "other-vocab", vocab_size=49152 + 2)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<extra_a>", "<extra_b>"])
    tok.save_pretrained(other)
    with pytest.raises(UserError, match="another tokenizer"):
        kd_train.main(kd_train.parse_args(["--student", str(other), "--data", str(data), *args]))
    changed = tmp_path / "changed.jsonl"
    changed.write_text(data.read_text().replace("Customer 1:", "Customer one:"))
    with pytest.raises(UserError, match="another version of the data"):
        kd_train.main(kd_train.parse_args(["--student", str(tiny_model_dir), "--data", str(changed), *args]))
    with pytest.raises(UserError, match="needs a live teacher"):
        kd_train.main(kd_train.parse_args(["--student", str(tiny_model_dir), "--data", str(data), "--lmbda", "0.5",
                                           *args]))
    assert not (tmp_path / "run" / "run.json").exists()


def test_an_out_path_that_is_a_file_is_refused_before_the_teacher_loads(data, tmp_path, monkeypatch):
    monkeypatch.setattr(teacher_cache, "load_model", lambda *a, **k: pytest.fail("the teacher was loaded"))
    blocked = tmp_path / "cache"
    blocked.write_text("not a folder")
    with pytest.raises(UserError, match="is a file, not a folder"):
        teacher_cache.main(teacher_cache.parse_args(["--teacher", "t", "--data", str(data), "--out", str(blocked)]))
