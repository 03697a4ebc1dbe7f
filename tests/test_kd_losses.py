"""kd_losses.py: the divergences against a hand computation, the chunked path against full logits (values and
gradients), identical vs different tiny models, the vocabulary check, and --idp_mode's canonical targets."""
import json
import math

import pytest
import torch

import common
import fileio
import kd_losses
from fileio import UserError
from conftest import build_tiny_model, nonzero_lora_b


def hand(ps_logits, pt_logits, kind, beta=0.5, T=1.0):
    """Per-token divergence with Python floats, straight from the definitions."""
    out = []
    for zs, zt in zip(ps_logits, pt_logits):
        ps = [math.exp(z / T) for z in zs]
        pt = [math.exp(z / T) for z in zt]
        ps = [p / sum(ps) for p in ps]
        pt = [p / sum(pt) for p in pt]
        kl = lambda a, b: sum(x * math.log(x / y) for x, y in zip(a, b))  # noqa: E731
        if kind == "forward_kl":
            out.append(kl(pt, ps))
        elif kind == "reverse_kl":
            out.append(kl(ps, pt))
        else:
            m = [(1 - beta) * s + beta * t for s, t in zip(ps, pt)]
            out.append(beta * kl(pt, m) + (1 - beta) * kl(ps, m))
    return out


S = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
T_ = [[0.5, 2.5, 0.0], [1.0, 1.0, 1.0]]


@pytest.mark.parametrize("kind,beta,temp", [("forward_kl", 0.5, 1.0), ("reverse_kl", 0.5, 1.0), ("jsd", 0.5, 1.0),
                                            ("jsd", 0.2, 2.0), ("forward_kl", 0.5, 2.0)])
def test_divergence_matches_hand_computation(kind, beta, temp):
    got = kd_losses.divergence(torch.tensor(S), torch.tensor(T_), kind, beta, temp)
    assert got.tolist() == pytest.approx(hand(S, T_, kind, beta, temp), rel=1e-5)
    assert (got > 0).all()
    same = kd_losses.divergence(torch.tensor(S), torch.tensor(S), kind, beta, temp)
    assert same.abs().max() < 1e-6


def test_jsd_beta_must_be_inside():
    with pytest.raises(UserError, match="jsd_beta"):
        kd_losses.kd_beta("jsd", 1.0)


@pytest.mark.parametrize("kind", kd_losses.KD_LOSSES)
def test_chunked_equals_unchunked_values_and_gradients(kind, monkeypatch):
    import trl.kernels.chunked_divergence as cd
    monkeypatch.setattr(cd, "TOKEN_CHUNK_SIZE", 3)  # 7 tokens -> 3 token chunks, 13 vocab -> 3 vocab tiles
    monkeypatch.setattr(cd, "VOCAB_CHUNK_SIZE", 5)
    g = torch.Generator().manual_seed(0)
    hs, ws = torch.randn(7, 4, generator=g), torch.randn(13, 4, generator=g)
    ht, wt = torch.randn(7, 6, generator=g), torch.randn(13, 6, generator=g)  # the teacher may be wider
    hs1, ws1 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    div, _ = kd_losses.chunked_divergence(hs1, ws1, ht, wt, kd_loss=kind, jsd_beta=0.3, temperature=2.0)
    (div * torch.arange(1.0, 8.0)).sum().backward()  # a non-uniform upstream gradient
    hs2, ws2 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    ref = kd_losses.divergence(hs2 @ ws2.T, ht @ wt.T, kind, 0.3, 2.0)
    (ref * torch.arange(1.0, 8.0)).sum().backward()
    assert torch.allclose(div, ref, atol=1e-5)
    assert torch.allclose(hs1.grad, hs2.grad, atol=1e-5)
    assert torch.allclose(ws1.grad, ws2.grad, atol=1e-5)


@pytest.fixture(scope="module")
def models(tiny_model_dir, tmp_path_factory):
    other = build_tiny_model(tmp_path_factory.mktemp("tiny1") / "tiny-llama-1", seed=1)
    a, tok, _ = common.load_model(str(tiny_model_dir))
    b, _, _ = common.load_model(str(tiny_model_dir))
    c, _, _ = common.load_model(str(other))
    return a, b, c, tok


def batch(tok):
    rows = [("Classify: x", "Good"), ("Another, longer prompt here", "Standard answer")]
    enc = [common.encode_example(tok, p, c, 64)[0] for p, c in rows]
    width = max(len(e["input_ids"]) for e in enc)
    ids = torch.tensor([e["input_ids"] + [tok.pad_token_id] * (width - len(e["input_ids"])) for e in enc])
    labels = torch.tensor([e["labels"] + [-100] * (width - len(e["labels"])) for e in enc])
    att = torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in enc])
    return {"input_ids": ids, "attention_mask": att, "labels": labels}


@pytest.mark.parametrize("kind", kd_losses.KD_LOSSES)
def test_kd_terms_zero_for_identical_models_positive_otherwise(models, kind):
    a, b, c, tok = models
    bt = batch(tok)
    n_completion = int((bt["labels"][:, 1:] != -100).sum())
    called = []
    hooks = [m.get_output_embeddings().register_forward_hook(lambda *_: called.append(1)) for m in (a, b, c)]
    try:
        same = kd_losses.kd_terms(a, b, bt, kd_loss=kind)
        diff = kd_losses.kd_terms(a, c, bt, kd_loss=kind)
    finally:
        [h.remove() for h in hooks]
    assert not called  # no lm_head forward: the [tokens, vocab] logits are never built, only tiles
    assert same["tokens"] == diff["tokens"] == n_completion  # completion tokens only, EOS included
    assert abs(same["kd"].item()) < 1e-5
    assert diff["kd"].item() > 1e-4
    # the CE matches the model's own loss on the same batch (full logits)
    with torch.no_grad():
        ref = a(**bt).loss
    assert same["ce"].item() == pytest.approx(float(ref), rel=1e-4)


def test_kd_terms_match_full_logits(models):
    a, _, c, tok = models
    bt = batch(tok)
    with torch.no_grad():
        ls, lt = a(**bt).logits[:, :-1], c(**bt).logits[:, :-1]
    mask = bt["labels"][:, 1:] != -100
    ref = kd_losses.divergence(ls[mask], lt[mask], "reverse_kl", temperature=1.5).mean()
    got = kd_losses.kd_terms(a, c, bt, kd_loss="reverse_kl", temperature=1.5)["kd"]
    assert float(got) == pytest.approx(float(ref), rel=1e-4)


def test_heldout_kl(models):
    a, b, c, tok = models
    rows = [{"input": "Classify: x", "output": "Good"}, {"input": "y", "output": "Bad"}]
    same = kd_losses.heldout_kl(b, a, tok, rows, progress=False)
    diff = kd_losses.heldout_kl(c, a, tok, rows, progress=False)
    assert same["kl"] < 1e-5 and diff["kl"] > 1e-4
    assert diff["rows"] == 2 and diff["tokens"] == 4  # one label token + end-of-turn per row
    assert a.training is False  # restored


def test_check_vocab(tiny_model_dir, tmp_path, models):
    a, _, c, tok = models
    assert kd_losses.check_vocab(tok, tok, a, c) == len(tok)
    # another tokenizer: refused, pointing at the sequence-level mode
    other = build_tiny_model(tmp_path / "other")
    from transformers import AutoTokenizer
    otok = AutoTokenizer.from_pretrained(other)
    otok.add_tokens(["<extra_a>", "<extra_b>"])
    with pytest.raises(UserError, match="sequence-level KD"):
        kd_losses.check_vocab(tok, otok, a, c)
    # a head smaller than the tokenizer: refused
    small = build_tiny_model(tmp_path / "small", vocab_size=1000)
    s, _, _ = common.load_model(str(small))
    with pytest.raises(UserError, match="sequence-level KD"):
        kd_losses.check_vocab(tok, tok, a, s)
    # a head padded beyond the tokenizer (Qwen2.5-7B vs 3B): the shared rows are compared
    padded = build_tiny_model(tmp_path / "padded", vocab_size=len(tok) + 64)
    p, _, _ = common.load_model(str(padded))
    assert kd_losses.check_vocab(tok, tok, a, p) == len(tok)


def test_canonical_targets(tmp_path):
    assert kd_losses.canonical_target("Good") == "Good"
    assert kd_losses.canonical_target('{"b": 1,\n "a": "é"}') == '{"b":1,"a":"é"}'
    assert kd_losses.canonical_target('```json\n[1, 2]\n```') == "[1,2]"
    schema = {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}}}
    pytest.importorskip("json_grammar")
    assert kd_losses.canonical_target('{"b": 1, "a": "x"}', schema) == '{"a":"x","b":1}'


def test_canonical_rows_names_file_and_line(tmp_path):
    p = tmp_path / "kd.jsonl"
    p.write_text(json.dumps({"input": "a", "teacher_output": "Good"}) + "\n\n"
                 + json.dumps({"input": "b", "teacher_output": '{"x": 1,}'}) + "\n")
    rows = fileio.read_records(p)
    with pytest.raises(UserError, match=r"kd\.jsonl: line 3: field 'teacher_output'"):
        kd_losses.canonical_rows(rows, "teacher_output", p)


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_kd_terms_chunked_equals_full_logits_on_lora_gradients(tiny_model_dir, models, kind):
    """The trained path (backbone + chunked heads) against the models' own forward with full logits: same CE, same
    divergence, same LoRA gradients."""
    _, _, c, tok = models
    student, _, _ = common.load_student(str(tiny_model_dir), gradient_checkpointing=False)
    student.eval()  # LoRA dropout off: both passes must see the same network (gradients still flow)
    torch.manual_seed(0)
    nonzero_lora_b(student, std=0.02)  # a trained-looking adapter, so the gradients reach lora_A too
    bt = batch(tok)
    grads = []
    for full in (False, True):
        student.zero_grad()
        t = kd_losses.kd_terms(student, c, bt, kd_loss=kind, temperature=2.0, full_logits=full)
        (0.5 * t["ce"] + 0.5 * t["kd"]).backward()
        grads.append((t["ce"].item(), t["kd"].item(),
                      {n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad}))
    (ce1, kd1, g1), (ce2, kd2, g2) = grads
    # fp32 rounding: the divergence is a difference of cross-entropy-sized terms (~log V = 10.8 nats for SmolLM2's
    # 49k vocabulary) summed in another order by the chunked path: ~1e-6 absolute, which is 1e-4 of a KD of 0.006
    # (seen: 0.0063589 vs 0.0063598). Hence an absolute floor; a wrong loss is off by orders of magnitude more.
    assert ce1 == pytest.approx(ce2, rel=1e-4, abs=1e-5) and kd1 == pytest.approx(kd2, rel=1e-4, abs=1e-5)
    assert g1.keys() == g2.keys() and len(g1) > 0
    for n in g1:
        assert torch.allclose(g1[n], g2[n], atol=1e-6, rtol=1e-3), n
