"""Cross-tokenizer logit KD (kd_train.py --cross_tokenizer): a teacher whose tokenizer differs from the student's.

Alignment. Both tokenizers split the same answer string; each model's next-token distribution at an answer position
is conditioned on the answer text up to the END of the previous token (0 for the first answer token, the whole
answer for the end-of-turn token). Two positions, one per model, see the same text exactly where those character
offsets are equal: those pairs are compared, the rest are counted (the "aligned share") and skipped. Offsets come
from each fast tokenizer's offset mapping over the answer alone, the same ids encode_example trains on. Each side
keeps its own prompt: the student's chat template, the teacher's if its tokenizer files carry one (a run dir of
sft_train.py carries the ChatML it was trained on), else the plain user text (a base model such as Gemma 3 270M
has none).

Losses, defined across vocabularies (both on the aligned pairs only):
- uld: Universal Logit Distillation (Boizard et al. 2024, arXiv:2402.12030): the L1 (closed-form Wasserstein)
  distance between the two distributions sorted by probability, the shorter padded with zeros. It matches the
  shape of the distribution only: which token gets the mass is invisible to it.
- gold: the matched/unmatched split of TRL's GOLD trainer (trl/experimental/gold, _compute_hybrid_uld_loss): tokens
  the two vocabularies share are compared one to one, the others by ULD's sorted distance. Two deviations, both
  here because the real pair needs them: tokens are matched by their decoded text (GOLD matches raw vocabulary
  strings, so SmolLM2's 'Ġthe' and Gemma's '▁the' never meet), one to one, plus the two end-of-answer tokens; and the
  matched part is the forward KL(teacher||student) over the matched tokens with everything else as one bucket (a
  true KL: >= 0, 0 exactly when the matched probabilities and the remaining mass agree; GOLD's JSD over unnormalised
  matched probabilities is not a divergence of distributions). With identical tokenizers every token matches and
  gold IS the forward KL of kd_losses.divergence (tests/test_xtok_kd.py).
gold is the one to use, chosen by measurement (xtok_compare.py; docs/cross_tokenizer_kd.md, "Which loss"): on the
tiny pair, 40 steps of pure KD (alpha 1), gold moved the held-out divergence 6.45 -> 6.26 and the top-1 agreement
with the teacher 0 -> 0.14 (42 aligned positions); uld left both where they were (6.45 -> 6.46, 0 -> 0), and its own
sorted distance barely moved (1.9973 -> 1.9972): it can only match how peaked the distribution is, never which token.
On the real pair (Gemma 3 270M -> SmolLM2-135M, 15 steps on MBPP rows) gold lowered that divergence 4.79 -> 3.35,
uld 4.79 -> 4.39 (top-1 agreement +1 point with either).

label_eval scores any model, teacher or student, on its own tokens and prompt by the probability of each
candidate answer string: the metric of xtok_compare.py --gap (teacher, SFT student, KD student side by side).
"""
from __future__ import annotations

from collections import Counter

from common import encode_example
from fileio import UserError, note
from models import end_of_turn_token

XTOK_LOSSES = ("gold", "uld")


# ----------------------------------------------------------------------------------------------------------------
# alignment (pure)

def answer_tokens(tok, text: str) -> tuple[list[int], list[int]]:
    """(ids, end character offset of each id) of the answer text alone, no special tokens."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [int(e) for _, e in enc["offset_mapping"]]


def contexts(ends: list[int]) -> list[int]:
    """For each answer position (every answer token, then the end-of-turn token): how many characters of the answer
    the model has seen when it predicts it."""
    return [0] + list(ends)


def align_positions(ends_s: list[int], ends_t: list[int]) -> tuple[list[int], list[int]]:
    """Pairs (student position, teacher position), as indices into each side's answer positions (contexts()), that
    are conditioned on the same answer text. Where one side has several positions with the same context (the byte
    pieces of one character end at the same offset), the last one is taken: it has consumed the whole character."""
    last_t = {c: j for j, c in enumerate(contexts(ends_t))}
    cs = contexts(ends_s)
    pairs = [(i, last_t[c]) for i, c in enumerate(cs) if c in last_t and (i + 1 == len(cs) or cs[i + 1] != c)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


# ----------------------------------------------------------------------------------------------------------------
# encoding

def has_own_template(tok) -> bool:
    """Whether the teacher's tokenizer files carry a chat template: its own, or, in a run dir, the one it was
    trained on (sft_train.py saves the ChatML that common.load_tokenizer gives a model without one, so a teacher
    after its own SFT is prompted as it was trained). ChatML given at load time is not its own: plain prompt."""
    return bool(tok.chat_template) and not getattr(tok, "chatml_fallback", False)


def teacher_prompt(ttok, user: str, own_template: bool) -> str:
    """The teacher's own prompt: its chat template, else the plain user text and a newline before the answer."""
    if own_template:
        return ttok.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                        add_generation_prompt=True)
    return user + "\n"


def teacher_end_id(ttok, own_template: bool) -> int:
    return ttok.convert_tokens_to_ids(end_of_turn_token(ttok)) if own_template else ttok.eos_token_id


def teacher_example(ttok, prompt: str, answer: str, own_template: bool) -> dict:
    """The teacher's side of one row, as encode_example lays out the student's: its own prompt (teacher_prompt;
    <bos> first when it is the plain text), then the answer and its end token, the loss on those."""
    return _teacher_side(ttok, prompt, answer, own_template)[0]


def _teacher_side(ttok, prompt: str, answer: str, own_template: bool) -> tuple[dict, list[int]]:
    """(teacher_example, the character offset each answer token ends at)."""
    tp = ttok(teacher_prompt(ttok, prompt, own_template), add_special_tokens=not own_template)["input_ids"]
    ids, ends = answer_tokens(ttok, answer)
    comp = ids + [teacher_end_id(ttok, own_template)]
    return {"input_ids": tp + comp, "labels": [-100] * len(tp) + comp}, ends


def encode_pair(stok, ttok, prompt: str, answer: str, max_len: int, keep_whole: bool = False,
                own_template: bool = False):
    """(example, status, answer positions): the student's example exactly as encode_example makes it, plus the
    teacher's ids/labels on its own prompt ("t_input_ids", "t_labels") and the aligned pairs ("align_s",
    "align_t": indices among each side's answer positions, the ones max_len kept)."""
    ex, status = encode_example(stok, prompt, answer, max_len, keep_whole)
    if ex is None:
        return None, status, 0
    s_ids, ends_s = answer_tokens(stok, answer)
    t, ends_t = _teacher_side(ttok, prompt, answer, own_template)
    t_input, t_labels = t["input_ids"], t["labels"]
    if max_len and len(t_input) > max_len:
        t_input, t_labels = t_input[:max_len], t_labels[:max_len]
    n_s = sum(x != -100 for x in ex["labels"])
    n_t = sum(x != -100 for x in t_labels)
    ia, ib = align_positions(ends_s, ends_t)
    keep = [(a, b) for a, b in zip(ia, ib) if a < n_s and b < n_t]
    return ({**ex, "t_input_ids": t_input, "t_labels": t_labels, "align_s": [a for a, _ in keep],
             "align_t": [b for _, b in keep]}, status, min(n_s, len(s_ids) + 1))


def encode_pairs(stok, ttok, rows: list[dict], prompt_key: str, target_key: str, max_len: int,
                 keep_whole: bool = False, source: str = "data", own_template: bool = False):
    """encode_rows for two tokenizers: a datasets.Dataset with the teacher's side and the alignment, and a report
    (counts, answer positions, aligned positions, aligned share)."""
    from datasets import Dataset
    enc, counts, positions, aligned = [], Counter(), 0, 0
    for r in rows:
        ex, status, n = encode_pair(stok, ttok, r[prompt_key], r[target_key], max_len, keep_whole, own_template)
        counts[status] += 1
        if ex is not None:
            enc.append(ex)
            positions += n
            aligned += len(ex["align_s"])
    if counts["too_long"]:
        note(f"{counts['too_long']} of {len(rows)} rows of {source} do not fit --max_len {max_len} whole: skipped")
    if not enc:
        raise UserError(f"{source}: no row fits --max_len {max_len}")
    share = round(aligned / max(positions, 1), 4)
    note(f"--cross_tokenizer: {aligned} of {positions} student answer positions of {source} align with the "
         f"teacher's ({share:.1%}); the divergence is taken on those")
    return Dataset.from_list(enc), {**dict(counts), "answer_positions": positions, "aligned_positions": aligned,
                                    "aligned_share": share}


class PairCollator:
    """The trainer's collator for the student's side, plus the teacher's side padded ("t_input_ids",
    "t_attention_mask", "t_labels") and the aligned pairs as flat indices into each model's completion positions in
    row-major order (the order kd_losses.completion_hidden selects them in): "xs_index", "xt_index"."""

    EXTRA = ("t_input_ids", "t_labels", "align_s", "align_t")

    def __init__(self, collate, teacher_pad_id: int):
        self.collate, self.pad = collate, teacher_pad_id

    def __call__(self, examples):
        import torch
        out = self.collate([{k: v for k, v in e.items() if k not in self.EXTRA} for e in examples])
        width = max(len(e["t_input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), self.pad)
        labels = torch.full((len(examples), width), -100)
        att = torch.zeros((len(examples), width), dtype=torch.long)
        xs, xt, off_s, off_t = [], [], 0, 0
        for i, e in enumerate(examples):
            k = len(e["t_input_ids"])
            ids[i, :k], labels[i, :k], att[i, :k] = torch.tensor(e["t_input_ids"]), torch.tensor(e["t_labels"]), 1
            xs += [off_s + a for a in e["align_s"]]
            xt += [off_t + b for b in e["align_t"]]
            off_s += sum(x != -100 for x in e["labels"][1:])
            off_t += sum(x != -100 for x in e["t_labels"][1:])
        out.update(t_input_ids=ids, t_attention_mask=att, t_labels=labels, xs_index=torch.tensor(xs, dtype=torch.long),
                   xt_index=torch.tensor(xt, dtype=torch.long))
        return out


# ----------------------------------------------------------------------------------------------------------------
# vocabulary matching

def token_texts(tok) -> dict[int, str]:
    """The text each ordinary token decodes to on its own (specials and partial UTF-8 byte pieces left out)."""
    dec = tok.backend_tokenizer.decoder
    special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    out = {}
    for piece, i in tok.get_vocab().items():
        if i in special:
            continue
        text = dec.decode([piece]) if dec is not None else piece
        if text and "\ufffd" not in text:
            out[i] = text
    return out


def vocab_match(stok, ttok, teacher_end: int | None = None):
    """(student ids, teacher ids) of the tokens both vocabularies hold, one to one: same decoded text (the first
    student id of each text, each used once), plus the student's EOS with the teacher's end-of-answer token. Two
    LongTensors, teacher side sorted."""
    import torch
    by_text = {}
    for i, t in sorted(token_texts(stok).items()):
        by_text.setdefault(t, i)
    used, pairs = set(), []
    for j, t in sorted(token_texts(ttok).items()):
        i = by_text.get(t)
        if i is not None and i not in used:
            used.add(i)
            pairs.append((i, j))
    end = ttok.eos_token_id if teacher_end is None else teacher_end
    if stok.eos_token_id is not None and end is not None and stok.eos_token_id not in used:
        pairs = [p for p in pairs if p[1] != end] + [(stok.eos_token_id, end)]
    pairs.sort(key=lambda p: p[1])
    return (torch.tensor([p[0] for p in pairs], dtype=torch.long),
            torch.tensor([p[1] for p in pairs], dtype=torch.long))


# ----------------------------------------------------------------------------------------------------------------
# the losses (per aligned position; log-probabilities [N, V_s] and [N, V_t])

def uld(p_s, p_t):
    """ULD: sum over ranks of |p_s sorted - p_t sorted|, the shorter padded with zeros. [N]"""
    import torch.nn.functional as F
    a = p_s.sort(-1, descending=True).values
    b = p_t.sort(-1, descending=True).values
    n = max(a.shape[-1], b.shape[-1])
    return (F.pad(a, (0, n - a.shape[-1])) - F.pad(b, (0, n - b.shape[-1]))).abs().sum(-1)


def gold(logp_s, logp_t, s_ids, t_ids):
    """GOLD's split: KL(teacher||student) over the matched tokens plus one bucket for the rest of each side's mass,
    plus ULD over the unmatched tokens' probabilities. [N]"""
    import torch
    ms, mt = logp_s[:, s_ids], logp_t[:, t_ids]
    un_s = torch.ones(logp_s.shape[-1], dtype=torch.bool, device=logp_s.device)
    un_t = torch.ones(logp_t.shape[-1], dtype=torch.bool, device=logp_t.device)
    un_s[s_ids], un_t[t_ids] = False, False
    kl = (mt.exp() * (mt - ms)).sum(-1)
    if un_t.any():  # the teacher's unmatched mass against the student's (clamped: kd_cache's tail bucket)
        rest_t = torch.logsumexp(logp_t[:, un_t], -1)
        rest_s = torch.log1p(-ms.exp().sum(-1).clamp(max=1 - 1e-6))
        kl = kl + rest_t.exp() * (rest_t - rest_s)
    if un_s.any() and un_t.any():
        kl = kl + uld(logp_s[:, un_s].exp(), logp_t[:, un_t].exp())
    return kl


def _logits(h, head, scale, softcap):
    import torch
    z = h.float() @ head.weight.float().T
    if getattr(head, "bias", None) is not None:
        z = z + head.bias.float()
    z = z * scale
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return z


def _chunk_loss(h_s, h_t, head_s, head_t, s_ids, t_ids, loss, temperature, sp, tp):
    import torch
    logp_s = torch.log_softmax(_logits(h_s, head_s, *sp) / temperature, -1)
    with torch.no_grad():
        logp_t = torch.log_softmax(_logits(h_t, head_t, *tp) / temperature, -1)
    per = gold(logp_s, logp_t, s_ids, t_ids) if loss == "gold" else uld(logp_s.exp(), logp_t.exp())
    # held-out metrics: the matched KL and top-1 agreement (student's argmax is the teacher's argmax, matched)
    with torch.no_grad():
        to_s = torch.full((logp_t.shape[-1],), -1, dtype=torch.long, device=logp_t.device)
        to_s[t_ids] = s_ids
        agree = (to_s[logp_t.argmax(-1)] == logp_s.argmax(-1)).sum()
    return per.sum(), agree


class CrossVocab:
    """What the cross-tokenizer loss needs beside the models: the loss name and the matched token ids."""

    def __init__(self, stok, ttok, loss: str = "gold", own_template: bool = False):
        if loss not in XTOK_LOSSES:
            raise UserError(f"unknown --cross_tokenizer '{loss}': one of {', '.join(XTOK_LOSSES)}")
        self.loss, self.own_template = loss, own_template
        self.s_ids, self.t_ids = vocab_match(stok, ttok, teacher_end_id(ttok, own_template))
        self.teacher_pad = ttok.pad_token_id if ttok.pad_token_id is not None else ttok.eos_token_id
        self.matched = int(self.s_ids.numel())


def xtok_terms(student, teacher, batch: dict, xv: CrossVocab, *, temperature: float = 1.0, with_ce: bool = True,
               chunk: int = 256) -> dict:
    """kd_terms' dict for two tokenizers: one backbone pass per model on its own sequence, the CE on every student
    completion token (TRL's chunked kernel), the divergence (xv.loss) on the aligned pairs, a chunk at a time with
    the output layers recomputed in the backward, so no [tokens, vocab] tensor of either model is kept."""
    import torch
    from torch.utils.checkpoint import checkpoint

    from kd_losses import completion_hidden, completion_logprobs, lm_parts
    h_s, targets, _ = completion_hidden(student, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                        batch.get("position_ids"))
    _, head_s, scale_s, cap_s = lm_parts(student)
    _, head_t, scale_t, cap_t = lm_parts(teacher)
    dev_t = head_t.weight.device
    with torch.no_grad():
        h_t, _, _ = completion_hidden(teacher, batch["t_input_ids"].to(dev_t), batch["t_attention_mask"].to(dev_t),
                                      batch["t_labels"].to(dev_t))
    xs, xt = batch["xs_index"].to(h_s.device), batch["xt_index"].to(dev_t)
    a_s, a_t = h_s[xs], h_t[xt].to(h_s.device)
    s_ids, t_ids = xv.s_ids.to(h_s.device), xv.t_ids.to(h_s.device)
    total, agree = h_s.new_zeros((), dtype=torch.float32), 0
    for i in range(0, a_s.shape[0], chunk):
        s = slice(i, i + chunk)
        d, a = checkpoint(_chunk_loss, a_s[s], a_t[s], head_s, head_t, s_ids, t_ids, xv.loss, float(temperature),
                          (scale_s, cap_s), (scale_t, cap_t), use_reentrant=False)
        total, agree = total + d, agree + int(a)
    n_al = max(int(a_s.shape[0]), 1)
    n = max(int(targets.numel()), 1)
    out = {"kd": total / n_al, "ce": None, "tokens": int(targets.numel()), "entropy": None, "accuracy": None,
           "aligned": int(a_s.shape[0]), "agree": agree}
    if with_ce:
        logp, _, top1 = completion_logprobs(h_s, head_s, targets, scale=scale_s, softcap=cap_s)
        out["ce"] = -logp.sum() / n
        out["accuracy"] = float(top1.float().sum()) / n
    return out


def heldout(teacher, student, stok, ttok, xv: CrossVocab, rows: list[dict], *, prompt_key: str = "input",
            target_key: str = "output", max_len: int = 1024, batch_size: int = 8, progress: bool = True) -> dict:
    """On held-out rows, teacher-forced, at the aligned positions: the gold divergence (matched KL + bucket + ULD
    over the unmatched: kd_train records it as kl_before/kl_after), the ULD distance and the top-1 agreement
    (the student's most likely token is the teacher's, matched), with the aligned share."""
    import torch
    from tqdm.auto import tqdm

    ds, report = encode_pairs(stok, ttok, rows, prompt_key, target_key, max_len, True, "held-out data",
                              xv.own_template)
    collate = PairCollator(_pad_student(stok), xv.teacher_pad)
    modes = (student.training, teacher.training)
    student.eval(), teacher.eval()
    sums = {"gold": 0.0, "uld": 0.0, "agree": 0, "aligned": 0}
    try:
        with torch.no_grad():
            for i in tqdm(range(0, len(ds), batch_size), desc="held-out (cross-tokenizer)", disable=not progress):
                batch = collate(ds.select(range(i, min(i + batch_size, len(ds)))).to_list())
                batch = {k: v.to(student.device) for k, v in batch.items()}
                for loss in ("gold", "uld"):
                    xv_loss, xv.loss = xv.loss, loss
                    try:
                        t = xtok_terms(student, teacher, batch, xv, with_ce=False)
                    finally:
                        xv.loss = xv_loss
                    sums[loss] += float(t["kd"]) * t["aligned"]
                sums["agree"] += t["agree"]
                sums["aligned"] += t["aligned"]
    finally:
        student.train(modes[0]), teacher.train(modes[1])
    n = max(sums["aligned"], 1)
    return {"kl": round(sums["gold"] / n, 6), "kl_first_token": None, "uld": round(sums["uld"] / n, 6),
            "top1_agreement": round(sums["agree"] / n, 4), "aligned_share": report["aligned_share"],
            "rows": len(ds), "aligned": sums["aligned"]}


def _pad_student(stok):
    """A plain right-padding collator for the student's side (held-out only; training uses the trainer's)."""
    from kd_losses import pad_right
    return lambda examples: pad_right(examples, stok.pad_token_id)


# ----------------------------------------------------------------------------------------------------------------
# a metric both sides share: the log-probability of an answer string, each model on its own tokens and prompt

def answer_logprobs(model, examples: list[dict], pad_id: int, batch_size: int = 32) -> list[float]:
    """The total log-probability (nats) of each encoded example's labelled tokens (the answer and its end token)
    given its prompt, teacher-forced. Examples as encode_example / teacher_example make them."""
    import torch

    from kd_losses import completion_hidden, completion_logprobs, lm_parts, pad_right
    _, head, scale, cap = lm_parts(model)
    out = []
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(examples), batch_size):
                b = {k: v.to(head.weight.device) for k, v in pad_right(examples[i:i + batch_size], pad_id).items()}
                h, targets, rows = completion_hidden(model, b["input_ids"], b["attention_mask"], b["labels"])
                logp, _, _ = completion_logprobs(h, head, targets, scale=scale, softcap=cap)
                per = torch.zeros(b["input_ids"].shape[0], dtype=torch.float64, device=logp.device)
                out += per.index_add_(0, rows, logp.double()).tolist()
    finally:
        model.train(was)
    return out


def candidate_logprobs(model, encode, pad_id: int, prompts: list[str], candidates: list[str],
                       batch_size: int = 32):
    """[len(prompts), len(candidates)] total log-probability of each candidate answer (with its end token) after
    each prompt; encode(prompt, answer) -> example, the model's own encoding (encode_example for a student,
    teacher_example for a cross-tokenizer teacher). Unlike scoring.raw_label_scores (a mean per label token, no end
    token: the CreditMix serving score) the total is a probability of the string, comparable across tokenizers."""
    import numpy as np
    lp = answer_logprobs(model, [encode(p, c) for p in prompts for c in candidates], pad_id, batch_size)
    return np.asarray(lp, dtype=np.float64).reshape(len(prompts), len(candidates))


def label_metrics(logp, gold: list[int], candidates: list[str]) -> dict:
    """From candidate_logprobs and the gold candidate of each row: accuracy (the most likely candidate is the gold
    one, ties to the first) and the gold answer's cross-entropy in nats per character of the answer (its end token
    included in the probability), both independent of the tokenizer."""
    import numpy as np
    logp, gold = np.asarray(logp), np.asarray(gold)
    gold_lp = logp[np.arange(len(gold)), gold]
    chars = sum(len(candidates[g]) for g in gold)
    return {"accuracy": round(float((logp.argmax(1) == gold).mean()), 4),
            "nats_per_char": round(float(-gold_lp.sum() / chars), 4), "rows": int(len(gold))}


def label_eval(spec: str, prompts: list[str], gold: list[int], candidates: list[str], *, teacher: bool = False,
               batch_size: int = 32) -> dict:
    """label_metrics of the model `spec` (a run dir: its adapter on its base) on held-out prompts, each model on
    its own tokenizer and prompt: a student as encode_example trains it, a teacher (teacher=True) as kd_train.py's
    --cross_tokenizer prompts it (teacher_example)."""
    from common import load_model
    model, tok, _ = load_model(spec)
    own = has_own_template(tok)
    if teacher:
        def encode(p, a):
            return teacher_example(tok, p, a, own)
    else:
        def encode(p, a):
            return encode_example(tok, p, a, None)[0]
    logp = candidate_logprobs(model, encode, tok.pad_token_id, prompts, candidates, batch_size)
    return {**label_metrics(logp, gold, candidates),
            "prompt": ("its chat template" if own else "plain user text + newline") if teacher else "chat template"}
