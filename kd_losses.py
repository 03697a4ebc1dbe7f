"""What kd_train.py and eval_kl.py share: KD targets in canonical form (--idp_mode), and the token-level losses
(forward KL, reverse KL, generalised JSD) between a teacher's and a student's next-token distributions, on the
completion tokens only.

The trained path never builds a [tokens, vocab] logits tensor: the completion positions are selected first (labels
!= -100), then both models' hidden states go through their LM heads in tiles by TRL's ChunkedDivergenceFunction
(trl/kernels/chunked_divergence.py: online log-sum-exp over [4096 tokens x 32768 vocab] tiles, recomputed in the
backward; Triton on CUDA, torch elsewhere). The CE term uses TRL's ChunkedLogProbFunction on the same hidden states,
so one student forward pass feeds both terms. `divergence()` is the plain full-logits reference the tests compare with.

Conventions (TRL's DistillationTrainer/GKD, Agarwal et al. 2024, arXiv:2306.13649): forward_kl = KL(teacher||student)
(mode covering, Hinton et al. 2015), reverse_kl = KL(student||teacher) (mode seeking, MiniLLM), jsd with
m = (1 - beta) * p_student + beta * p_teacher and JSD = beta * KL(p_t||m) + (1 - beta) * KL(p_s||m). Both
distributions are softened by the same temperature.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

from common import encode_example
from fileio import UserError, note, record_places

KD_LOSSES = ("forward_kl", "reverse_kl", "jsd")
FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


# ----------------------------------------------------------------------------------------------------------------
# targets

def add_kd_data_args(g) -> None:
    """--data, --idp_mode and --schema: how kd_train.py reads and encodes its KD file, and so how teacher_cache.py
    must read the same file for its cached targets to line up."""
    g.add_argument("--data", required=True, help='JSONL of {"input": prompt, "teacher_output": answer}')
    g.add_argument("--idp_mode", action="store_true",
                   help="structured answers (IDP JSON, CreditMix labels): each target trained whole (rows that "
                        "--max_len would cut are skipped and counted), JSON targets must parse and are trained in one "
                        "canonical form, a bare label such as Good is taken as it is")
    g.add_argument("--schema", default=None,
                   help="with --idp_mode: JSON Schema whose property order the canonical JSON follows (the order "
                        "infer_idp.py generates); default: each target keeps its own key order")


def load_schema(path):
    if path is None:
        return None
    try:
        from json_grammar import load_schema as load  # the IDP path's loader: checks the schema too
    except ImportError:
        load = lambda p: json.loads(Path(p).read_text(encoding="utf-8"))  # noqa: E731
    return load(path)


def canonical_target(text: str, schema=None) -> str:
    """A JSON answer (an object or array, optionally in a ```json fence) re-serialised compactly, UTF-8 kept: the one
    form the model is trained on (json_grammar.canonical_json, the schema's key order, when a schema is given; else
    the target's own key order, which is the schema's already in idp_prepare.py / infer_idp.py outputs). Other text
    (a label such as Good) is returned unchanged. Raises json.JSONDecodeError."""
    s = text.strip()
    m = FENCE.match(s)
    if m:
        s = m.group(1)
    if not s.startswith(("{", "[")):
        return text
    obj = json.loads(s)
    if schema is not None:
        from json_grammar import canonical_json  # key order of the schema: what the grammar generates
        return canonical_json(obj, schema)
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def canonical_rows(rows: list[dict], key: str, path, schema=None) -> list[dict]:
    """--idp_mode: every JSON target parses (else an error naming file and line) and takes its canonical form."""
    places, out, changed = record_places(path), [], 0
    for r, where in zip(rows, places):
        try:
            t = canonical_target(r[key], schema)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: {where}: field '{key}' looks like JSON but does not parse ({e.msg} at char "
                            f"{e.pos}); --idp_mode trains JSON answers whole, so fix or drop the row") from None
        changed += t != r[key]
        out.append({**r, key: t})
    if changed:
        note(f"--idp_mode: {changed} of {len(rows)} JSON targets in {path} re-serialised to the canonical compact form")
    return out


def target_key(rows: list[dict], path) -> str:
    """The answer field of a held-out file: teacher_output (KD files) or output (SFT / creditmix_val files)."""
    key = "teacher_output" if "teacher_output" in rows[0] else "output"
    for r, where in zip(rows, record_places(path)):
        if not isinstance(r.get(key), str) or not r[key].strip():
            raise UserError(f"{path}: {where}: field '{key}' must be a non-empty string")
    return key


# ----------------------------------------------------------------------------------------------------------------
# divergences

def kd_beta(kd_loss: str, jsd_beta: float = 0.5) -> float:
    """The beta of TRL's kernel: 0 is forward KL, 1 reverse KL, anything between the generalised JSD."""
    if kd_loss == "forward_kl":
        return 0.0
    if kd_loss == "reverse_kl":
        return 1.0
    if kd_loss == "jsd":
        if not 0.0 < jsd_beta < 1.0:
            raise UserError(f"--jsd_beta must be strictly between 0 and 1 (got {jsd_beta}); "
                            "for its ends use --kd_loss forward_kl or reverse_kl")
        return float(jsd_beta)
    raise UserError(f"unknown --kd_loss '{kd_loss}': one of {', '.join(KD_LOSSES)}")


# ----------------------------------------------------------------------------------------------------------------
# the reference: full logits, plain torch (tests, small inputs)

def divergence(student_logits, teacher_logits, kd_loss: str = "forward_kl", jsd_beta: float = 0.5,
               temperature: float = 1.0):
    """Per-token divergence [N] from full logits [N, V] (differentiable in the student's logits)."""
    import torch
    import torch.nn.functional as F
    beta = kd_beta(kd_loss, jsd_beta)
    log_ps = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_pt = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if beta == 0.0:
        return (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    if beta == 1.0:
        return (log_ps.exp() * (log_ps - log_pt)).sum(-1)
    log_m = torch.logaddexp(log_ps + math.log(1 - beta), log_pt + math.log(beta))
    return (beta * (log_pt.exp() * (log_pt - log_m)).sum(-1)
            + (1 - beta) * (log_ps.exp() * (log_ps - log_m)).sum(-1))


# ----------------------------------------------------------------------------------------------------------------
# model parts

def _logit_scale(config) -> float:
    """The multiplier a model applies to its logits before the softmax (1.0 for Llama, Qwen, SmolLM). Same cases as
    TRL's add_fused_lm_head: logit_scale (Cohere), output_multiplier, lm_head_multiplier (Falcon-H1), logits_scaling
    (Granite/MiniCPM3 divide by it)."""
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        if getattr(config, name, None) is not None:
            return float(getattr(config, name))
    if getattr(config, "logits_scaling", None) is not None:
        return float(config.logits_scaling) if config.model_type == "hyperclovax" else 1.0 / config.logits_scaling
    return 1.0


def lm_parts(model):
    """(backbone, lm_head, logit_scale, final_logit_softcapping) of a causal LM, through a PEFT wrapper. The LoRA
    layers sit inside the backbone, so calling it directly still applies the adapter (as TRL's trainers do)."""
    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = m.base_model if m.base_model is not m else m.model
    config = m.config.get_text_config()
    return backbone, m.get_output_embeddings(), _logit_scale(config), getattr(config, "final_logit_softcapping", None)


def completion_hidden(model, input_ids, attention_mask, labels, position_ids=None):
    """Last hidden states at the positions that predict a completion token ([N, H]), their targets ([N]) and the
    row index of each ([N]). Only the backbone runs: no logits."""
    backbone, head, _, _ = lm_parts(model)
    kw = {"position_ids": position_ids} if position_ids is not None else {}
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kw).last_hidden_state
    targets = labels[:, 1:].to(head.weight.device)
    mask = targets != -100
    rows = mask.nonzero()[:, 0]
    return hidden[:, :-1].to(head.weight.device)[mask], targets[mask], rows


def check_vocab(student_tok, teacher_tok, student, teacher) -> int:
    """Teacher and student must score the same tokens: identical tokenizers (token -> id) and LM heads that cover
    them. Returns the number of LM-head rows the divergence compares (the smaller head, when one is only padded:
    Qwen2.5-7B has 152064 rows, 3B 151936, for the same 151665 tokens)."""
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if sv != tv:
        only = sorted(set(tv.items()) ^ set(sv.items()), key=lambda kv: kv[1])[:3]
        raise UserError(
            f"teacher and student tokenizers differ ({len(tv)} vs {len(sv)} tokens; e.g. {only}): logit KD compares "
            "next-token distributions over one shared vocabulary. Use sequence-level KD instead: fill teacher_output "
            "with teacher_generate.py, then run kd_train.py without --teacher; or align the two on the answer text with "
            "kd_train.py --cross_tokenizer gold (xtok_kd.py)")
    n = len(student_tok)
    rows_s = lm_parts(student)[1].weight.shape[0]
    rows_t = lm_parts(teacher)[1].weight.shape[0]
    if min(rows_s, rows_t) < n:
        raise UserError(
            f"the {'teacher' if rows_t < n else 'student'}'s LM head has {min(rows_s, rows_t)} rows for a "
            f"{n}-token vocabulary: the models do not share a vocabulary. Use sequence-level KD instead "
            "(teacher_generate.py, then kd_train.py without --teacher)")
    if rows_s != rows_t:
        note(f"teacher LM head has {rows_t} rows, student {rows_s}, for the same {n}-token tokenizer (padding rows): "
             f"the divergence compares the first {min(rows_s, rows_t)}")
    return min(rows_s, rows_t)


# ----------------------------------------------------------------------------------------------------------------
# the chunked path

def chunked_divergence(h_student, head_student, h_teacher, head_teacher, *, kd_loss: str = "forward_kl",
                       jsd_beta: float = 0.5, temperature: float = 1.0, vocab: int | None = None,
                       student_scale: float = 1.0, teacher_scale: float = 1.0, student_softcap=None,
                       teacher_softcap=None):
    """Per-token divergence [N] and student entropy [N] from hidden states [N, H] and LM heads (nn.Linear or
    weight tensors [V, H]), in tiles: the gradient reaches h_student (and a trainable student head)."""
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    def wb(head):
        w, b = (head.weight, head.bias) if hasattr(head, "weight") else (head, None)
        if vocab and vocab < w.shape[0]:  # a padded head (see check_vocab): compare the shared rows only
            w, b = w[:vocab], None if b is None else b[:vocab]
        return w, b

    (ws, bs), (wt, bt) = wb(head_student), wb(head_teacher)
    if ws.shape[0] != wt.shape[0]:
        raise UserError(f"LM heads differ in size ({ws.shape[0]} vs {wt.shape[0]}): pass vocab= from check_vocab()")
    h_teacher = h_teacher.to(ws.device)
    return ChunkedDivergenceFunction.apply(h_student, ws, bs, h_teacher.detach(), wt.detach(),
                                           None if bt is None else bt.detach(), kd_beta(kd_loss, jsd_beta),
                                           float(temperature), student_scale, student_softcap, teacher_scale,
                                           teacher_softcap)


def completion_logprobs(h, head, targets, *, scale: float = 1.0, softcap=None):
    """Per-token log-probabilities of the targets, student entropy and top-1 hits, in tiles (TRL's kernel)."""
    from trl.kernels import ChunkedLogProbFunction

    from compat import chunked_logprob_chunk_size
    logp, entropy, _, _, top1 = ChunkedLogProbFunction.apply(h, head.weight, head.bias, targets, 1.0,
                                                             chunked_logprob_chunk_size(), softcap, scale,
                                                             ("log_probs", "entropy", "is_top1"))
    return logp, entropy, top1


def kd_terms(student, teacher, batch: dict, *, kd_loss: str = "forward_kl", jsd_beta: float = 0.5,
             temperature: float = 1.0, vocab: int | None = None, with_ce: bool = True,
             full_logits: bool = False) -> dict:
    """One student forward (backbone only), one teacher forward (no grad), then on the completion tokens:
    {"ce": token-mean cross-entropy (None without with_ce), "kd": token-mean divergence, "tokens", "entropy",
    "accuracy"}. The KD path of kd_train.py. full_logits: the unchunked reference through the models' own
    forward ([tokens, vocab] logits of both), for tests and as the benchmark's baseline."""
    import torch
    if full_logits:
        return _kd_terms_full(student, teacher, batch, kd_loss=kd_loss, jsd_beta=jsd_beta, temperature=temperature,
                              vocab=vocab, with_ce=with_ce)
    pos = batch.get("position_ids")
    h_s, targets, _ = completion_hidden(student, batch["input_ids"], batch["attention_mask"], batch["labels"], pos)
    with torch.no_grad():
        dev = lm_parts(teacher)[1].weight.device
        h_t, _, _ = completion_hidden(teacher, *(t.to(dev) for t in (batch["input_ids"], batch["attention_mask"],
                                                                    batch["labels"])),
                                      None if pos is None else pos.to(dev))
    _, head_s, scale_s, cap_s = lm_parts(student)
    _, head_t, scale_t, cap_t = lm_parts(teacher)
    n = max(int(targets.numel()), 1)
    div, ent = chunked_divergence(h_s, head_s, h_t, head_t, kd_loss=kd_loss, jsd_beta=jsd_beta,
                                  temperature=temperature, vocab=vocab, student_scale=scale_s, teacher_scale=scale_t,
                                  student_softcap=cap_s, teacher_softcap=cap_t)
    out = {"kd": div.sum() / n, "ce": None, "tokens": int(targets.numel()), "entropy": float(ent.sum()) / n,
           "accuracy": None}
    if with_ce:
        logp, _, top1 = completion_logprobs(h_s, head_s, targets, scale=scale_s, softcap=cap_s)
        out["ce"] = -logp.sum() / n
        out["accuracy"] = float(top1.float().sum()) / n
    return out


def _kd_terms_full(student, teacher, batch, *, kd_loss, jsd_beta, temperature, vocab, with_ce) -> dict:
    import torch
    import torch.nn.functional as F
    kw = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if batch.get(k) is not None}
    mask = batch["labels"][:, 1:] != -100
    targets = batch["labels"][:, 1:][mask]
    ls = student(**kw, use_cache=False).logits[:, :-1][mask].float()
    with torch.no_grad():
        lt = teacher(**kw, use_cache=False).logits[:, :-1][mask].float()
    v = vocab or min(ls.shape[-1], lt.shape[-1])
    div = divergence(ls[:, :v], lt[:, :v], kd_loss, jsd_beta, temperature)
    n = max(int(targets.numel()), 1)
    logp = F.log_softmax(ls.detach() / temperature, -1)
    out = {"kd": div.sum() / n, "ce": None, "tokens": int(targets.numel()),
           "entropy": float(-(logp.exp() * logp).sum()) / n, "accuracy": None}
    if with_ce:
        out["ce"] = F.cross_entropy(ls, targets, reduction="sum") / n
        out["accuracy"] = float((ls.argmax(-1) == targets).sum()) / n
    return out


# ----------------------------------------------------------------------------------------------------------------
# held-out KL

def pad_right(examples: list[dict], pad_id: int) -> dict:
    """input_ids / attention_mask / labels tensors of encoded examples, right-padded to the longest (labels with
    -100): how the trainer's collator lays a batch out, for the held-out passes outside a trainer."""
    import torch
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), -100)
    att = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        ids[i, :k], labels[i, :k], att[i, :k] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
    return {"input_ids": ids, "attention_mask": att, "labels": labels}


def heldout_kl(teacher, student, tok, rows: list[dict], *, prompt_key: str = "input", target_key: str = "output",
               max_len: int = 1024, batch_size: int = 8, vocab: int | None = None, kd_loss: str = "forward_kl",
               jsd_beta: float = 0.5, temperature: float = 1.0, progress: bool = True) -> dict:
    """KL(teacher||student) (or the chosen divergence) on the target tokens of held-out rows, teacher-forced:
    the token mean, the mean over each row's first target token (the decision of a classifier such as CreditMix),
    and the counts. Models are put in eval mode and restored."""
    import torch
    from tqdm.auto import tqdm

    enc = []
    for r in rows:
        ex, _ = encode_example(tok, r[prompt_key], r[target_key], max_len)
        if ex is not None:
            enc.append(ex)
    if not enc:
        raise UserError(f"no held-out row fits --max_len {max_len}")
    modes = (student.training, teacher.training)
    student.eval(), teacher.eval()
    _, head_s, scale_s, cap_s = lm_parts(student)
    _, head_t, scale_t, cap_t = lm_parts(teacher)
    total = first = 0.0
    n_tok = 0
    try:
        with torch.no_grad():
            for i in tqdm(range(0, len(enc), batch_size), desc="held-out KL", disable=not progress):
                b = pad_right(enc[i:i + batch_size], tok.pad_token_id)
                ids, att, labels = b["input_ids"], b["attention_mask"], b["labels"]
                dev_s, dev_t = head_s.weight.device, head_t.weight.device
                h_s, _, row = completion_hidden(student, ids.to(dev_s), att.to(dev_s), labels.to(dev_s))
                h_t, _, _ = completion_hidden(teacher, ids.to(dev_t), att.to(dev_t), labels.to(dev_t))
                div, _ = chunked_divergence(h_s, head_s, h_t, head_t, kd_loss=kd_loss, jsd_beta=jsd_beta,
                                            temperature=temperature, vocab=vocab, student_scale=scale_s,
                                            teacher_scale=scale_t, student_softcap=cap_s, teacher_softcap=cap_t)
                div = div.float().cpu()
                total += float(div.sum())
                n_tok += div.numel()
                is_first = torch.ones_like(row, dtype=torch.bool)
                is_first[1:] = row[1:] != row[:-1]
                first += float(div[is_first.cpu()].sum())
    finally:
        student.train(modes[0]), teacher.train(modes[1])
    return {"kl": round(total / max(n_tok, 1), 6), "kl_first_token": round(first / len(enc), 6),
            "divergence": kd_loss, "temperature": temperature, "rows": len(enc), "tokens": n_tok}
