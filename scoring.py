"""Calibrated label ranking: score each candidate label by its length-normalised conditional log-likelihood at the
assistant position, subtract a prior, softmax. Used by infer_creditmix.py, eval_creditmix.py and the server.

Why hand-written: transformers has no multiple-choice scorer for causal LMs. This one runs each prompt's forward
pass once and shares its KV cache across the candidate labels (labels of one token need no second pass at all),
batches many prompts with left padding, and computes log-probabilities only at the positions it scores, with the
output layer in fp32 (bf16 logits would round near-tied labels into exact ties).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

import numpy as np

CALIBRATIONS = ("multi_null", "batch", "none")
FITTED = "fitted"  # eval_creditmix.py's fourth choice: a prior and a temperature fitted on the validation split
CALIBRATION_FILE = "creditmix_calibration.json"  # eval_creditmix.py's choice, beside the run it evaluated
SCORES_FILE = "creditmix_scores.json"  # and the raw label scores it was chosen from, to study other calibrations
_VOCAB_CHUNK = 16384  # output-layer rows upcast to fp32 at a time


def label_token_ids(tok, labels: list[str]) -> list[list[int]]:
    ids = [tok(label, add_special_tokens=False)["input_ids"] for label in labels]
    if any(not x for x in ids):
        raise ValueError(f"a label tokenises to nothing: {labels}")
    return ids


def _prompt_ids(tok, prompts: list[str]) -> list[list[int]]:
    return [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]


@contextmanager
def _head_inputs(model):
    """Collect what the output layer sees during the forward passes inside the block (its input hidden states), in
    this thread only (the server runs other work on the same model from other threads)."""
    head, seen, me = model.get_output_embeddings(), [], threading.get_ident()
    hook = head.register_forward_hook(lambda module, args, out: seen.append(args[0])
                                      if threading.get_ident() == me else None)
    try:
        yield head, seen
    finally:
        hook.remove()


def _token_logprobs(head, hidden, targets):
    """log p(targets[r, t] | hidden[r]) for hidden [R, d] and targets [R, T], with the output layer in fp32.

    Why not the model's own logits: in bf16 they are rounded to 1/32-1/16 nat at typical magnitudes, so near-tied
    labels become exact ties that a padded batch and a one-by-one pass break differently. The vocabulary is
    processed in chunks, so the fp32 copy of the output layer never exists whole (1.2 GB for Qwen2.5-3B)."""
    import torch
    w, b = head.weight, getattr(head, "bias", None)
    h = hidden.float()
    if not w.dtype.is_floating_point:  # a quantised output layer: its own logits are all there is
        return torch.log_softmax(head(hidden).float(), -1).gather(-1, targets)
    lse = None
    for v0 in range(0, w.shape[0], _VOCAB_CHUNK):
        z = h @ w[v0:v0 + _VOCAB_CHUNK].float().T
        if b is not None:
            z += b[v0:v0 + _VOCAB_CHUNK].float()
        c = torch.logsumexp(z, -1)
        lse = c if lse is None else torch.logaddexp(lse, c)
    z = torch.einsum("rd,rtd->rt", h, w[targets].float())
    if b is not None:
        z += b[targets].float()
    return z - lse[:, None]


def raw_label_scores(model, tok, prompts: list[str], labels: list[str], batch_size: int = 16,
                     progress: bool = False, adapter_names: list[str] | None = None) -> np.ndarray:
    """[len(prompts), len(labels)] mean log-probability per label token of each label after each prompt (a full
    chat prompt ending at the assistant position). adapter_names: a PEFT model's adapter per prompt ("__base__" =
    none), one mixed-adapter forward pass per batch."""
    import torch
    from tqdm.auto import tqdm

    lab = label_token_ids(tok, labels)
    K, M = len(lab), max(len(x) for x in lab)
    device = next(model.parameters()).device
    first = torch.tensor([x[0] for x in lab], device=device)
    # Continuations: label tokens after the first, fed after the prompt's cache (right-padded among labels), and
    # the token each continuation position predicts (0 where a label has ended; masked out).
    cont = torch.full((K, max(M - 1, 1)), tok.pad_token_id, dtype=torch.long)
    cont_mask = torch.zeros((K, max(M - 1, 1)), dtype=torch.long)
    cont_tgt = torch.zeros((K, max(M - 1, 1)), dtype=torch.long)
    for k, x in enumerate(lab):
        if len(x) > 1:
            cont[k, :len(x) - 1] = torch.tensor(x[:-1])
            cont_mask[k, :len(x) - 1] = 1
            cont_tgt[k, :len(x) - 1] = torch.tensor(x[1:])
    lengths = torch.tensor([len(x) for x in lab], dtype=torch.float32)
    ids = _prompt_ids(tok, prompts)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: less padding
    out = np.zeros((len(prompts), K), dtype=np.float64)
    bar = tqdm(total=len(prompts), desc="scoring", disable=not progress, unit="ex")
    with torch.inference_mode(), _head_inputs(model) as (head, seen):
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            B, n = len(idx), max(len(ids[i]) for i in idx)
            input_ids = torch.full((B, n), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((B, n), dtype=torch.long)
            for b, i in enumerate(idx):  # left padding: every prompt ends at column n-1
                input_ids[b, n - len(ids[i]):] = torch.tensor(ids[i])
                mask[b, n - len(ids[i]):] = 1
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            seen.clear()
            names = {} if adapter_names is None else {"adapter_names": [adapter_names[i] for i in idx]}
            res = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                        use_cache=M > 1, logits_to_keep=1, **names)
            total = _token_logprobs(head, seen[0][:, -1], first.expand(B, K)).cpu()  # [B, K]
            if M > 1:
                cache = res.past_key_values
                cache.batch_repeat_interleave(K)  # [B*K]: each prompt's cache once per label
                c_ids = cont.repeat(B, 1)
                full_mask = torch.cat([mask.repeat_interleave(K, 0), cont_mask.repeat(B, 1)], 1)
                c_pos = mask.sum(1).repeat_interleave(K).unsqueeze(1) + torch.arange(c_ids.shape[1])
                if names:  # each prompt's rows repeated once per label, as its cache was
                    names = {"adapter_names": [a for a in names["adapter_names"] for _ in range(K)]}
                model(input_ids=c_ids.to(device), attention_mask=full_mask.to(device),
                      position_ids=c_pos.to(device), past_key_values=cache, use_cache=True, **names)
                hid = seen[1].reshape(-1, seen[1].shape[-1])  # [B*K*(M-1), d]
                lp = _token_logprobs(head, hid, cont_tgt.repeat(B, 1).reshape(-1, 1).to(device)).cpu()
                lp = lp.reshape(B, K, -1) * cont_mask  # [B, K, M-1], zero past each label's end
                total += lp.sum(-1)
            out[idx] = (total / lengths).double().numpy()
            bar.update(B)
    bar.close()
    return out


def naive_label_scores(model, tok, prompts: list[str], labels: list[str]) -> np.ndarray:
    """Reference: one full forward pass per label per example (what a hand-rolled scorer does), the output layer in
    fp32 as above. Tests check the fast scorer against it; bench.py measures the speed-up."""
    import torch
    lab = label_token_ids(tok, labels)
    device = next(model.parameters()).device
    out = np.zeros((len(prompts), len(labels)))
    with torch.inference_mode(), _head_inputs(model) as (head, seen):
        for i, p in enumerate(_prompt_ids(tok, prompts)):
            for k, x in enumerate(lab):
                seen.clear()
                model(input_ids=torch.tensor([p + x], device=device))
                at = torch.arange(len(p) - 1, len(p) - 1 + len(x), device=device)
                lp = _token_logprobs(head, seen[0][0, at], torch.tensor(x, device=device).unsqueeze(1))
                out[i, k] = lp.sum().item() / len(x)
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


def response(model_name: str, labels: list[str], raw: np.ndarray, prior: np.ndarray, digits: int = 4,
             temperature: float = 1.0) -> dict:
    """The README's response JSON for one example; probabilities are softmax(calibrated scores / temperature)."""
    cal = raw - prior
    probs = softmax(cal / temperature)
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


# ----------------------------------------------------------------------------------------------------------------
# the calibration a model is served with: picked on a validation split, probabilities temperature-scaled

def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """ECE of the top-1 probability (Guo et al. 2017): |accuracy - confidence| per equal-width confidence bin,
    weighted by the bin's share of the examples."""
    conf, hit = probs.max(1), (probs.argmax(1) == y).astype(float)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    return float(sum(abs(hit[which == b].mean() - conf[which == b].mean()) * (which == b).mean()
                     for b in range(bins) if (which == b).any()))


def ece_floor(probs: np.ndarray, bins: int = 15, draws: int = 200, seed: int = 0) -> float:
    """The ECE a perfectly calibrated model with these probabilities would still show on this many rows: the mean
    ECE against labels drawn from `probs` themselves. The binned estimate is never 0 on a finite split (about 0.027
    on 1,314 rows at 66% accuracy), so an ECE is read against it."""
    rng = np.random.default_rng(seed)
    cum = np.cumsum(probs, 1)
    draws_y = (rng.random((draws, len(probs), 1)) > cum[None, :, :-1]).sum(2)
    return float(np.mean([expected_calibration_error(probs, y, bins) for y in draws_y]))


def fit_temperature(scores: np.ndarray, y: np.ndarray) -> float:
    """The temperature T minimising the negative log-likelihood of softmax(scores / T) on (scores, y): temperature
    scaling (Guo et al. 2017), one parameter, so the ranking (and accuracy) cannot change."""
    from scipy.optimize import minimize_scalar
    return float(np.exp(minimize_scalar(lambda log_t: _nll(scores / np.exp(log_t), y), bounds=(-5.0, 5.0),
                                        method="bounded").x))


def _nll(z: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of labels y under softmax(z)."""
    z = z - z.max(1, keepdims=True)
    return float(-(z[np.arange(len(y)), y] - np.log(np.exp(z).sum(1))).mean())


def fit_prior_temperature(raw: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """A prior (one bias per label, the first held at 0) and a temperature T minimising the negative log-likelihood
    of softmax((raw - prior) / T) on (raw, y): vector scaling without its per-label scale. Unlike the temperature
    alone it moves the decision boundaries (a label the model under-predicts gets its share back), so its accuracy
    counts only on rows it was not fitted to (choose_calibration scores it cross-fitted)."""
    from scipy.optimize import minimize
    n = raw.shape[1]

    def nll(theta):
        return _nll((raw - np.concatenate([[0.0], theta[:-1]])) / np.exp(theta[-1]), y)
    x = minimize(nll, np.zeros(n), method="L-BFGS-B", bounds=[(None, None)] * (n - 1) + [(-5.0, 5.0)]).x
    return np.concatenate([[0.0], x[:-1]]), float(np.exp(x[-1]))


def cross_fitted(raw: np.ndarray, y: np.ndarray, fit, folds: int = 2) -> np.ndarray:
    """Each row's probabilities under a calibration fitted on the other folds' rows only (rows split by index):
    fit(raw, y) -> (prior, temperature). What the calibration gives on data it has not seen, where scores on the
    rows it was fitted to can look better than they are."""
    fold = np.arange(len(y)) % folds
    probs = np.empty_like(raw, dtype=float)
    for k in range(folds):
        prior, t = fit(raw[fold != k], y[fold != k])
        probs[fold == k] = softmax((raw[fold == k] - prior) / t)
    return probs


def _temperature_only(raw, y):
    return np.zeros(raw.shape[1]), fit_temperature(raw, y)


def choose_calibration(raw: np.ndarray, null_raw: np.ndarray, y: np.ndarray) -> dict:
    """The calibration with the best accuracy on this (balanced) validation split, ties to the README's order
    (multi_null first, `fitted` last), with its prior as a fixed vector (a batch prior is the validation mean, so
    one request alone is scored the same way) and the temperature fitted on it; `fitted` (fit_prior_temperature)
    competes with its cross-fitted accuracy. ECE before and after the temperature, after it cross-fitted, and the
    floor a perfectly calibrated model would show on as many rows (ece_floor)."""
    acc = {m: float((np.argmax(raw - prior_for(m, raw, null_raw), 1) == y).mean()) for m in CALIBRATIONS}
    fitted = cross_fitted(raw, y, fit_prior_temperature)
    acc[FITTED] = float((fitted.argmax(1) == y).mean())
    order = (*CALIBRATIONS, FITTED)
    mode = max(order, key=lambda m: (acc[m], -order.index(m)))
    if mode == FITTED:
        prior, t = fit_prior_temperature(raw, y)
        heldout = fitted
    else:
        prior = prior_for(mode, raw, null_raw)
        t = fit_temperature(raw - prior, y)
        heldout = cross_fitted(raw - prior, y, _temperature_only)
    served = softmax((raw - prior) / t)
    return {"calibration": mode, "prior": [round(float(v), 6) for v in prior], "temperature": round(t, 4),
            "accuracy": {m: round(v, 4) for m, v in acc.items()}, "n": int(len(y)),
            "ece_before": round(expected_calibration_error(softmax(raw - prior), y), 4),
            "ece_after": round(expected_calibration_error(served, y), 4),
            "ece_after_heldout": round(expected_calibration_error(heldout, y), 4),
            "ece_floor": round(ece_floor(served), 4)}


def read_calibration(run_dir) -> dict | None:
    """The calibration eval_creditmix.py recorded beside a run (None when it was never evaluated)."""
    import json
    from pathlib import Path
    p = Path(run_dir) / CALIBRATION_FILE
    if not p.is_file():
        return None
    try:
        rec = json.loads(p.read_text(encoding="utf-8"))
        if rec["calibration"] not in (*CALIBRATIONS, FITTED) or float(rec["temperature"]) <= 0:
            raise ValueError(rec["calibration"])
        rec["prior"] = np.asarray(rec["prior"], dtype=float)
        return rec
    except (ValueError, KeyError, TypeError) as e:
        from fileio import UserError
        raise UserError(f"{p}: not a calibration written by eval_creditmix.py ({e}); delete it or rerun "
                        "eval_creditmix.py") from None


def served_prior(choice: str, recorded: dict | None, raw: np.ndarray, null_raw=None):
    """(prior, temperature, calibration used) for --calibration `choice`: auto takes what eval_creditmix.py recorded
    (`recorded`) and else multi_null, the README's; `null_raw` is a function giving the null prompts' raw scores,
    called only when multi_null needs them."""
    if choice == "auto" and recorded is not None:
        return recorded["prior"], float(recorded["temperature"]), recorded["calibration"]
    mode = "multi_null" if choice == "auto" else choice
    return prior_for(mode, raw, null_raw() if mode == "multi_null" else None), 1.0, mode
