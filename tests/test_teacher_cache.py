"""teacher_cache.py + kd_train.py --teacher_cache: the cached top-k teacher on tiny random models. The cached loss
equals the live teacher's forward KL when k covers the vocabulary and bounds it from below otherwise; training from
the cache runs with the teacher never loaded; the cache refuses another tokenizer or other data; it resumes. The
sampled cache (--sampling sample): its loss gradient averages to the live forward KL's at temperature 2, where a
small top k's stays off; meta.json's teacher mass outside the stored ids is the teacher's; kd_train checks the kind
of cache it is given and trains from a sampled one."""
import json

import numpy as np
import pytest
import torch

import fileio
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


def test_kd_train_from_the_cache_without_the_teacher(tiny_model_dir, teacher_dir, data, tmp_path, monkeypatch,
                                                     capsys):
    import common
    monkeypatch.setattr(fileio, "_notes_said", set())
    out = make_cache(teacher_dir, data, tmp_path / "cache")["out"]
    loaded = []
    real = common.load_model
    monkeypatch.setattr(kd_train, "load_model", lambda spec, **kw: loaded.append(spec) or real(spec, **kw))
    save = tmp_path / "run"
    kd_train.main(kd_train.parse_args(["--student", str(tiny_model_dir), "--teacher_cache", out, "--data", str(data),
                                       "--save_dir", str(save), "--max_steps", "2", "--logging_steps", "1",
                                       "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2"]))
    assert loaded == []  # the teacher is never loaded
    # a random teacher is nearly flat over 49k tokens: the top 64 hold almost none of it, and both scripts say so
    assert capsys.readouterr().err.count("the top 64 hold only") == 2
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


# ----------------------------------------------------------------------------------------------------------------
# the sampled cache

def _grad(z0, ids, logp, tail, temperature):
    """The cached loss's gradient w.r.t. the student's logits z0 [P, V] (an identity head: hidden = logits), from
    targets that went through the stored format (pack/unpack, float16 tail)."""
    ids, logp = kd_cache.unpack(kd_cache.pack(ids, logp))
    z = z0.clone().requires_grad_(True)
    eye = torch.eye(z0.shape[1])
    kl = kd_cache._chunk_terms(z, eye, None, torch.as_tensor(ids), torch.as_tensor(logp),
                               torch.as_tensor(np.asarray(tail, np.float16).astype(np.float32)),
                               torch.zeros(z0.shape[0], dtype=torch.long), temperature, 1.0, None)[0]
    return torch.autograd.grad(kl, z)[0]


def test_sampled_targets_average_to_the_live_forward_kl_gradient_where_a_small_top_k_does_not():
    torch.manual_seed(0)
    vocab, d, positions, t = 256, 32, 8, 2.0
    head = torch.nn.Linear(d, vocab, bias=False)
    with torch.no_grad():
        head.weight.normal_(0, 0.6)  # a peaked teacher at T = 1; at T = 2 the top 8 miss 17-69% of its mass
    h, z0 = torch.randn(positions, d), torch.randn(positions, vocab) * 2
    with torch.no_grad():
        lp = torch.log_softmax(head(h) / t, -1)
    z = z0.clone().requires_grad_(True)
    live = torch.autograd.grad((lp.exp() * (lp - torch.log_softmax(z / t, -1))).sum(), z)[0]
    err = lambda g: float((g - live).norm() / live.norm())  # noqa: E731
    with torch.no_grad():
        top = kd_cache.teacher_topk(h, head, k=8, temperature=t)
    assert err(_grad(z0, *top, t)) > 0.2  # biased: no number of epochs fixes it
    seeds, total = 200, 0
    for s in range(seeds):
        with torch.no_grad():
            ids, logp, tail, rest = kd_cache.teacher_sample(h, head, n=64, generator=torch.Generator().manual_seed(s),
                                                            temperature=t)
        assert np.isneginf(logp).any() and (tail == kd_cache.TAIL_FLOOR).all()  # empty slots, no tail: no NaN
        total = total + _grad(z0, ids, logp, tail, t)
    assert err(_grad(z0, ids, logp, tail, t)) > 0.2  # one draw of 64 is noisy ...
    assert err(total / seeds) < 0.1  # ... and unbiased: the average over seeds closes in on the live gradient


def _answer_probs(teacher_dir, temperature):
    """The teacher's full tempered distribution at every answer position of ROWS, in the cache's order."""
    from common import load_model
    from kd_losses import completion_hidden
    from training import encode_rows
    from transformers import DataCollatorForSeq2Seq
    teacher, tok, _ = load_model(str(teacher_dir))
    dataset, _ = encode_rows(tok, ROWS, "input", "teacher_output", max_len=1024)
    tok.padding_side = "right"
    batch = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)(
        [{k: ex[k] for k in ("input_ids", "labels")} for ex in dataset])
    with torch.no_grad():
        h, _, _ = completion_hidden(teacher, batch["input_ids"], batch["attention_mask"], batch["labels"])
        return torch.softmax(teacher.lm_head(h).float() / temperature, -1).numpy(), teacher.config.vocab_size


def test_the_teacher_mass_outside_the_stored_ids_is_recorded_and_noted(teacher_dir, data, tmp_path, monkeypatch,
                                                                      capsys):
    monkeypatch.setattr(fileio, "_notes_said", set())
    t = "0.1"  # the random teacher is nearly flat: sharpened, its positions differ in how much the top 4 hold
    probs, vocab = _answer_probs(teacher_dir, float(t))
    full = make_cache(teacher_dir, data, tmp_path / "full", "--top_k", str(vocab), "--temperature", t)
    assert full["teacher_mass_outside"]["mean"] == 0 and full["teacher_mass_outside"]["max"] == 0
    assert "hold only" not in capsys.readouterr().err
    four = make_cache(teacher_dir, data, tmp_path / "four", "--top_k", "4", "--temperature", t)
    outside = 1 - np.sort(probs, -1)[:, -4:].sum(-1)  # by hand: the teacher's mass beyond its 4 most likely ids
    assert outside.std() > 0.05 and outside.mean() > 0.1
    got = json.loads((tmp_path / "four" / "meta.json").read_text())["teacher_mass_outside"]
    assert got == four["teacher_mass_outside"] and got["positions"] == len(probs) == four["answer_tokens"]
    assert got["mean"] == pytest.approx(outside.mean(), abs=2e-3)
    assert got["p90"] == pytest.approx(np.percentile(outside, 90), abs=2e-3)
    err = capsys.readouterr().err
    assert f"the top 4 hold only {100 * (1 - got['mean']):.3g}% of the teacher's mass" in err
    assert "--sampling sample" in err
    sampled = make_cache(teacher_dir, data, tmp_path / "sampled", "--sampling", "sample", "--temperature", t)
    ids, logp, _ = kd_cache.TeacherCache(sampled["out"]).batch(range(len(ROWS)), "cpu")
    drawn = (logp > kd_cache.MIN_LOGP).numpy()
    assert np.allclose(np.exp(logp.numpy()).sum(-1, where=drawn), 1, atol=4e-3)  # frequencies of 64 draws
    by_hand = 1 - (np.take_along_axis(probs, ids.numpy(), -1) * drawn).sum(-1)
    got = sampled["teacher_mass_outside"]
    assert got["mean"] == pytest.approx(by_hand.mean(), abs=2e-3)
    assert got["distinct_ids_mean"] == pytest.approx(drawn.sum(-1).mean(), abs=0.01)
    assert "hold only" not in capsys.readouterr().err  # unbiased: nothing to note


def test_sampled_cache_size_seed_and_resume(teacher_dir, data, tmp_path):
    out = tmp_path / "cache"
    s = make_cache(teacher_dir, data, out, "--sampling", "sample")
    assert s["draws"] == 64 and s["seed"] == 0
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["sampling"], meta["draws"], meta["seed"], meta["top_k"]) == ("sample", 64, 0, None)
    before = {p.name: dict(np.load(p)) for p in out.glob("shard-*.npz")}
    assert all(z["packed"].shape[1] <= 64 for z in before.values())
    stored = sum(z[k].nbytes for z in before.values() for k in ("packed", "tail", "rest"))
    assert stored <= s["answer_tokens"] * (4 * 64 + 4) <= s["answer_tokens"] * 300  # + each npz's headers
    (out / "shard-00001.npz").unlink()
    (out / "meta.json").write_text(json.dumps({**meta, "complete": False}))
    assert make_cache(teacher_dir, data, out, "--sampling", "sample")["resumed_at_shard"] == 1
    again = dict(np.load(out / "shard-00001.npz"))  # the same draws as the uninterrupted run's
    assert all((again[k] == before["shard-00001.npz"][k]).all() for k in ("packed", "tail", "rest", "offsets"))
    other = make_cache(teacher_dir, data, tmp_path / "seed1", "--sampling", "sample", "--seed", "1")
    assert not (dict(np.load(tmp_path / "seed1" / "shard-00000.npz"))["packed"] ==
                before["shard-00000.npz"]["packed"]).all() and other["seed"] == 1
    with pytest.raises(UserError, match="other settings"):
        make_cache(teacher_dir, data, out, "--sampling", "sample", "--seed", "1")


def test_kd_train_from_a_sampled_cache_and_the_cache_kind_check(tiny_model_dir, teacher_dir, data, tmp_path,
                                                               capsys):
    out = make_cache(teacher_dir, data, tmp_path / "cache", "--sampling", "sample", "--temperature", "2")["out"]
    base = ["--student", str(tiny_model_dir), "--teacher_cache", out, "--data", str(data), "--temperature", "2",
            "--max_steps", "2", "--logging_steps", "1", "--per_device_train_batch_size", "2",
            "--gradient_accumulation_steps", "2"]
    with pytest.raises(SystemExit) as e, fileio.user_errors():
        kd_train.main(kd_train.parse_args([*base, "--save_dir", str(tmp_path / "refused"), "--cache_sampling",
                                           "topk"]))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("error: --teacher_cache") and "not --cache_sampling topk" in err[-1]
    assert not (tmp_path / "refused" / "run.json").exists()
    save = tmp_path / "run"
    kd_train.main(kd_train.parse_args([*base, "--save_dir", str(save), "--cache_sampling", "sample"]))
    rec = json.loads((save / "run.json").read_text())
    assert (rec["kd"]["mode"], rec["kd"]["sampling"], rec["kd"]["draws"], rec["kd"]["seed"]) == \
        ("cached", "sample", 64, 0)
    logs = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    kd = [x["kd_loss"] for x in logs if "kd_loss" in x]
    assert kd and all(np.isfinite(kd)) and kd[0] > 0
