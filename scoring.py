"""Calibrated label ranking: score each candidate label by its length-normalised conditional log-likelihood at the
assistant position, subtract a prior, softmax. Used by infer_creditmix.py, eval_creditmix.py and the server.

Why hand-written: transformers has no multiple-choice scorer for causal LMs. This one runs each prompt's forward
pass once and shares its KV cache across the candidate labels (labels of one token need no second pass at all),
batches many prompts with left padding, and computes logits only at the positions it scores.
"""
from __future__ import annotations

import numpy as np

CALIBRATIONS = ("multi_null", "batch", "none")


def label_token_ids(tok, labels: list[str]) -> list[list[int]]:
    ids = [tok(label, add_special_tokens=False)["input_ids"] for label in labels]
    if any(not x for x in ids):
        raise ValueError(f"a label tokenises to nothing: {labels}")
    return ids


def _prompt_ids(tok, prompts: list[str]) -> list[list[int]]:
    return [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]


def raw_label_scores(model, tok, prompts: list[str], labels: list[str], batch_size: int = 16,
                     progress: bool = False) -> np.ndarray:
    """[len(prompts), len(labels)] mean log-probability per label token of each label after each prompt (a full
    chat prompt ending at the assistant position)."""
    import torch
    from tqdm.auto import tqdm

    lab = label_token_ids(tok, labels)
    K, M = len(lab), max(len(x) for x in lab)
    first = torch.tensor([x[0] for x in lab])
    # Continuations: label tokens after the first, fed after the prompt's cache (right-padded among labels).
    cont = torch.full((K, max(M - 1, 1)), tok.pad_token_id, dtype=torch.long)
    cont_mask = torch.zeros((K, max(M - 1, 1)), dtype=torch.long)
    for k, x in enumerate(lab):
        if len(x) > 1:
            cont[k, :len(x) - 1] = torch.tensor(x[:-1])
            cont_mask[k, :len(x) - 1] = 1
    lengths = torch.tensor([len(x) for x in lab], dtype=torch.float32)
    device = next(model.parameters()).device
    ids = _prompt_ids(tok, prompts)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: less padding
    out = np.zeros((len(prompts), K), dtype=np.float64)
    bar = tqdm(total=len(prompts), desc="scoring", disable=not progress, unit="ex")
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            B, n = len(idx), max(len(ids[i]) for i in idx)
            input_ids = torch.full((B, n), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((B, n), dtype=torch.long)
            for b, i in enumerate(idx):  # left padding: every prompt ends at column n-1
                input_ids[b, n - len(ids[i]):] = torch.tensor(ids[i])
                mask[b, n - len(ids[i]):] = 1
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            res = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                        use_cache=M > 1, logits_to_keep=1)
            lp0 = torch.log_softmax(res.logits[:, -1].float(), -1).cpu()  # [B, V]
            total = lp0[:, first]  # [B, K]
            if M > 1:
                cache = res.past_key_values
                cache.batch_repeat_interleave(K)  # [B*K]: each prompt's cache once per label
                c_ids = cont.repeat(B, 1)
                c_mask = cont_mask.repeat(B, 1)
                full_mask = torch.cat([mask.repeat_interleave(K, 0), c_mask], 1)
                c_pos = mask.sum(1).repeat_interleave(K).unsqueeze(1) + torch.arange(c_ids.shape[1])
                res2 = model(input_ids=c_ids.to(device), attention_mask=full_mask.to(device),
                             position_ids=c_pos.to(device), past_key_values=cache, use_cache=True)
                lp = torch.log_softmax(res2.logits.float(), -1).cpu()  # [B*K, M-1, V]
                for k, x in enumerate(lab):
                    if len(x) > 1:
                        tgt = torch.tensor(x[1:])
                        rows = lp[k::K, :len(x) - 1]  # [B, len-1, V]
                        total[:, k] += rows.gather(-1, tgt.expand(B, -1).unsqueeze(-1)).squeeze(-1).sum(-1)
            out[idx] = (total / lengths).double().numpy()
            bar.update(B)
    bar.close()
    return out


def naive_label_scores(model, tok, prompts: list[str], labels: list[str]) -> np.ndarray:
    """Reference: one full forward pass per label per example (what a hand-rolled scorer does). Tests check the
    fast scorer against it; bench.py measures the speed-up."""
    import torch
    lab = label_token_ids(tok, labels)
    device = next(model.parameters()).device
    out = np.zeros((len(prompts), len(labels)))
    with torch.inference_mode():
        for i, p in enumerate(_prompt_ids(tok, prompts)):
            for k, x in enumerate(lab):
                ids = torch.tensor([p + x], device=device)
                lp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
                out[i, k] = sum(lp[len(p) - 1 + j, t].item() for j, t in enumerate(x)) / len(x)
    return out


def prior_for(mode: str, raw: np.ndarray, null_raw: np.ndarray | None = None) -> np.ndarray:
    """multi_null: mean raw score over content-free prompts (Zhao et al. 2021, the README's); batch: mean raw
    score over the inputs being scored (Zhou et al. 2023); none: zeros."""
    if mode == "multi_null":
        if null_raw is None:
            raise ValueError("multi_null calibration needs the null prompts' raw scores")
        return null_raw.mean(0)
    if mode == "batch":
        return raw.mean(0)
    if mode == "none":
        return np.zeros(raw.shape[-1])
    raise ValueError(f"unknown calibration '{mode}': choose from {', '.join(CALIBRATIONS)}")


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def response(model_name: str, labels: list[str], raw: np.ndarray, prior: np.ndarray, digits: int = 4) -> dict:
    """The README's response JSON for one example."""
    cal = raw - prior
    probs = softmax(cal)
    top = np.sort(cal)[::-1]
    r = lambda v: round(float(v), digits)  # noqa: E731
    return {
        "model_name": model_name,
        "prediction": labels[int(np.argmax(cal))],
        "scores": {c: r(v) for c, v in zip(labels, cal)},
        "raw_scores": {c: r(v) for c, v in zip(labels, raw)},
        "prior": {c: r(v) for c, v in zip(labels, prior)},
        "probabilities": {c: r(v) for c, v in zip(labels, probs)},
        "top2_margin": r(top[0] - top[1]) if len(top) > 1 else 0.0,
    }
