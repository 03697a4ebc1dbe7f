"""A teacher's next-token targets on the answer tokens of a KD file, stored once (teacher_cache.py) and trained from
without the teacher (kd_train.py --teacher_cache): the teacher never shares the GPU with the student.

Two kinds of target (teacher_cache.py --sampling), both at the KD temperature T:
- topk: the teacher's k most likely ids with their log-probabilities, and one tail bucket holding the rest of its
  mass. The loss is forward KL(teacher || student) over the k ids and the bucket: a lower bound of the full
  vocabulary's KL (merging outcomes can only lower a KL), exact when k covers the vocabulary. Its gradient leaves out
  the shape of the teacher's distribution beyond the top k, which at T = 2 can be most of it (meta.json's
  teacher_mass_outside says how much).
- sample: random-sampling KD (Anshumann et al. 2025, "Sparse Logit Sampling", arXiv:2503.16870): N ids drawn with
  replacement from the teacher's tempered distribution, stored as the distinct ids with their frequencies (as
  log-probabilities) and no tail (mass 0). The same loss is then the student's cross-entropy against that sparse
  target (minus its entropy, a constant), whose gradient in expectation is the full forward KL's: unbiased at any
  temperature, noisier at small N. The draws come from the teacher itself (the paper's proposal at sampling
  temperature 1), so every importance weight p/q is 1.

Format (a folder): meta.json (teacher, data sha256, tokenizer fingerprint, sampling, top_k or draws and seed,
temperature, max_len, a sha256 of every row's token ids, the teacher's mass outside the stored ids) and
shard-NNNNN.npz files of --shard_rows rows each, holding for every answer position of its rows (row-major, the order
kd_losses.completion_hidden selects them in):
  packed uint32 [P, k]: token id << 14 | round(-log p * 512)  (ids < 2^18 = 262,144; log p in 1/512 nat steps, >= -32;
                        the code 2^14 - 1 is an empty slot: probability 0)
  tail   float16 [P]:   log of the teacher's mass outside the stored ids as the loss sees it (sample: none, -30)
  offsets int64 [rows + 1] into P
  sample only: rest float16 [P], log of the teacher's true mass outside the distinct drawn ids (a diagnostic), and
  k = the shard's largest count of distinct ids (<= N).
That is 4k + 2 bytes per answer token: 258 at k = 64 (DistillKit's compressed logits take about 114-300); a sampled
cache at most 4N + 4: 260 at the default N = 64.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from fileio import UserError, atomic_open, write_json

ID_BITS, Q_BITS, Q_SCALE = 18, 14, 512.0   # 18 + 14 = 32 bits; 2^14 / 512 = 32 nats of range
MIN_LOGP = -(2 ** Q_BITS - 1) / Q_SCALE
SAMPLING = ("topk", "sample")               # teacher_cache.py --sampling
TAIL_FLOOR = -30.0                          # log mass below e^-30 counts as none (no -inf in the loss)
EMPTY = 2 ** Q_BITS - 1                     # the log-probability code of an empty slot (and of p < e^-32): p = 0
NOTE_ABOVE = 0.1  # a top-k cache missing more than this share of the teacher's mass on average gets a note: on
# CreditMix at T = 2 the top 64 of the SmolLM2 base missed 0.84-0.88 of it, and a student trained from an SFT
# teacher's top-64 cache scored 2-3 points below live KD (docs/training.md)


def tokenizer_fingerprint(tok) -> str:
    """sha256 of the tokenizer's token -> id map: teacher and student must score the same ids."""
    return hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()


def rows_fingerprint(dataset) -> str:
    """sha256 of every encoded row's input ids and labels, in order: the cache is only valid for these tokens."""
    h = hashlib.sha256()
    for ex in dataset:
        h.update(np.asarray(ex["input_ids"], dtype=np.int64).tobytes())
        h.update(np.asarray(ex["labels"], dtype=np.int64).tobytes())
    return h.hexdigest()


def pack(ids, logp) -> np.ndarray:
    ids, logp = np.asarray(ids, dtype=np.int64), np.asarray(logp, dtype=np.float64)
    if ids.size and ids.max() >= 2 ** ID_BITS:
        raise UserError(f"token id {int(ids.max())} does not fit the cache's {ID_BITS} bits (a vocabulary of at most "
                        f"{2 ** ID_BITS:,} tokens)")
    q = np.clip(np.rint(-logp * Q_SCALE), 0, 2 ** Q_BITS - 1).astype(np.int64)
    return ((ids << Q_BITS) | q).astype(np.uint32)


def unpack(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = packed.astype(np.int64)
    return p >> Q_BITS, -(p & (2 ** Q_BITS - 1)).astype(np.float32) / Q_SCALE


def teacher_topk(h, head, *, k: int, temperature: float = 1.0, scale: float = 1.0, softcap=None, chunk: int = 1024):
    """Top-k log-probabilities (at `temperature`) and the log tail mass of the teacher at hidden states h [P, d],
    the output layer in fp32 a chunk of positions at a time: (ids [P, k], logp [P, k], tail [P]) as numpy."""
    import torch
    ids, logp, tail = [], [], []
    for i in range(0, h.shape[0], chunk):
        z = _logits(h[i:i + chunk], head.weight, getattr(head, "bias", None), scale, softcap) / temperature
        lp = torch.log_softmax(z, -1)
        v, x = lp.topk(min(k, lp.shape[-1]), -1)
        rest = torch.log1p(-v.exp().sum(-1).clamp(max=1 - 1e-7)).clamp(min=TAIL_FLOOR)
        ids.append(x.cpu().numpy())
        logp.append(v.float().cpu().numpy())
        tail.append(rest.float().cpu().numpy())
    if not ids:
        return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32), np.zeros(0, np.float32)
    return np.concatenate(ids), np.concatenate(logp), np.concatenate(tail)


def teacher_sample(h, head, *, n: int, generator, temperature: float = 1.0, scale: float = 1.0, softcap=None,
                   chunk: int = 1024):
    """Random-sampling KD targets (the module docstring's `sample`) of the teacher at hidden states h [P, d]: n draws
    with replacement from its tempered distribution per position, kept as the distinct ids with their frequencies,
    (ids [P, n], logp [P, n] with -inf in the unused slots, tail [P] = TAIL_FLOOR: no mass outside, rest [P]: log of
    the teacher's own mass outside the drawn ids). The distinct ids come first, most frequent first."""
    import torch
    ids, logp, tail, rest = [], [], [], []
    for i in range(0, h.shape[0], chunk):
        z = _logits(h[i:i + chunk], head.weight, getattr(head, "bias", None), scale, softcap) / temperature
        p = torch.softmax(z, -1)
        del z  # a few [chunk, vocab] fp32 tiles at a time
        draws = torch.multinomial(p, n, replacement=True, generator=generator)
        counts = torch.zeros_like(p).scatter_add_(1, draws, torch.ones_like(draws, dtype=p.dtype))
        c, x = counts.topk(min(n, p.shape[-1]), -1)
        drawn = c > 0
        covered = (p.gather(1, x) * drawn).sum(-1)
        del p, counts
        ids.append(x.cpu().numpy())
        logp.append(torch.where(drawn, (c / n).log(), float("-inf")).cpu().numpy())
        tail.append(torch.full_like(covered, TAIL_FLOOR).cpu().numpy())
        rest.append(torch.log1p(-covered.clamp(max=1 - 1e-7)).clamp(min=TAIL_FLOOR).float().cpu().numpy())
    if not ids:
        return (np.zeros((0, n), np.int64), np.zeros((0, n), np.float32), np.zeros(0, np.float32),
                np.zeros(0, np.float32))
    return tuple(np.concatenate(a) for a in (ids, logp, tail, rest))


def _logits(h, w, b, scale: float = 1.0, softcap=None):
    """fp32 logits of hidden states h through the head's weight w and bias b, from a matmul in the head's dtype (bf16
    on a GPU, as the live KD path's tiles): no fp32 copy of a [vocab, hidden] head. Shared by the cache's writer and
    the cached loss, so both see the same logits."""
    import torch
    import torch.nn.functional as F
    z = F.linear(h.to(w.dtype), w, b).float()
    if scale != 1.0:
        z = z * scale
    return softcap * torch.tanh(z / softcap) if softcap else z


# ----------------------------------------------------------------------------------------------------------------
# the folder

def write_shard(out: Path, index: int, rows: list[tuple]) -> Path:
    """One shard from per-row (ids, logp, tail) or, sampled, (ids, logp, tail, rest), written whole or not at all. A
    sampled shard is as wide as its largest count of distinct ids (the slots past it are empty everywhere)."""
    counts = [len(r[2]) for r in rows]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    k = rows[0][0].shape[1] if rows and rows[0][0].ndim == 2 else 0
    packed = np.concatenate([pack(r[0], r[1]) for r in rows]) if sum(counts) else np.zeros((0, k), np.uint32)
    arrays = {"tail": np.concatenate([r[2] for r in rows]).astype(np.float16) if sum(counts)
              else np.zeros(0, np.float16)}
    if rows and len(rows[0]) == 4:
        arrays["rest"] = np.concatenate([r[3] for r in rows]).astype(np.float16) if sum(counts) \
            else np.zeros(0, np.float16)
        used = (packed & EMPTY) != EMPTY
        packed = packed[:, :max(int(used.sum(1).max()) if len(packed) else 0, 1)]
    path = out / f"shard-{index:05d}.npz"
    with atomic_open(path, "wb") as f:
        np.savez(f, packed=packed, offsets=offsets, **arrays)
    return path


def shard_path(cache: Path, index: int) -> Path:
    return Path(cache) / f"shard-{index:05d}.npz"


class TeacherCache:
    """Read side: the teacher's targets of row i (ids, logp, tail), shards loaded on demand."""

    def __init__(self, folder):
        self.folder = Path(folder)
        meta = self.folder / "meta.json"
        if not meta.is_file():
            raise UserError(f"--teacher_cache {folder}: no meta.json (make the cache with teacher_cache.py)")
        try:
            self.meta = json.loads(meta.read_text(encoding="utf-8"))
            self.rows, self.per_shard = int(self.meta["rows"]), int(self.meta["shard_rows"])
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{meta}: not a teacher cache's meta.json ({e})") from None
        if not self.meta.get("complete"):
            raise UserError(f"--teacher_cache {folder} is incomplete: rerun teacher_cache.py with the same flags to "
                            "finish it")
        self._shards: dict[int, dict] = {}

    def check(self, *, data_sha256: str, tokenizer: str, rows_sha256: str, temperature: float,
              sampling: str | None = None) -> None:
        """Refuse a student or data the cache was not made for, or another kind of target than `sampling` (None:
        either), with one line saying which."""
        m, where = self.meta, f"--teacher_cache {self.folder}"
        held = m.get("sampling", "topk")
        if held not in SAMPLING:
            raise UserError(f"{where} holds targets of an unknown kind (sampling {held!r}; this kd_train.py reads "
                            f"{', '.join(SAMPLING)}): rebuild it with this teacher_cache.py")
        if sampling is not None and held != sampling:
            raise UserError(f"{where} holds {describe(m)}, not --cache_sampling {sampling}: pass that cache's kind "
                            "or rebuild it with teacher_cache.py --sampling " + sampling)
        if m["tokenizer"] != tokenizer:
            raise UserError(f"{where} was made with another tokenizer ({m['teacher']}'s) than the student's: cached "
                            "KD needs the same token ids")
        if m["data_sha256"] != data_sha256:
            raise UserError(f"{where} was made for another version of the data ({m['data']}): rerun "
                            "teacher_cache.py on this --data")
        if m["rows_sha256"] != rows_sha256:
            raise UserError(f"{where} holds other token ids for this data (a different --max_len, --idp_mode or "
                            f"--schema than the cache's: {m['encoding']})")
        if float(m["temperature"]) != float(temperature):
            raise UserError(f"{where} holds the teacher at temperature {m['temperature']}: pass --temperature "
                            f"{m['temperature']}, or rebuild the cache")

    def row(self, i: int):
        s = i // self.per_shard
        if s not in self._shards:
            with np.load(shard_path(self.folder, s)) as z:
                self._shards[s] = {k: z[k] for k in ("packed", "tail", "offsets")}
        d = self._shards[s]
        a, b = d["offsets"][i % self.per_shard], d["offsets"][i % self.per_shard + 1]
        ids, logp = unpack(d["packed"][a:b])
        return ids, logp, d["tail"][a:b].astype(np.float32)

    def batch(self, rows, device):
        """The targets of these rows' answer positions, concatenated in row order, as tensors on `device`."""
        import torch
        parts = [self.row(int(i)) for i in rows]
        width = max((p[0].shape[1] for p in parts), default=0)  # sampled shards differ in width: pad with empties
        ids = np.concatenate([np.pad(p[0], ((0, 0), (0, width - p[0].shape[1]))) for p in parts])
        logp = np.concatenate([np.pad(p[1], ((0, 0), (0, width - p[1].shape[1])), constant_values=MIN_LOGP)
                               for p in parts])
        tail = np.concatenate([p[2] for p in parts])
        return (torch.as_tensor(ids, device=device), torch.as_tensor(logp, device=device),
                torch.as_tensor(tail, device=device))


def write_shards(teacher, tok, dataset, out: Path, *, first: int = 0, top_k: int = 64, temperature: float = 1.0,
                 shard_rows: int = 256, batch_size: int = 8, sampling: str = "topk", draws: int = 64,
                 seed: int = 0) -> None:
    """The teacher's targets (top-k, or `draws` draws seeded by `seed` with sampling="sample") of every answer
    position of `dataset` (encoded rows: input_ids, labels), written as shards of `shard_rows` rows from shard
    `first` on (a resume starts past the finished ones). Each batch's draws are seeded by (seed, its first row), so a
    resumed cache holds the draws an uninterrupted one would."""
    import torch
    from tqdm import tqdm
    from transformers import DataCollatorForSeq2Seq

    from kd_losses import completion_hidden, lm_parts
    tok.padding_side = "right"  # as the trainer's collator pads: the same positions, the same hidden states
    collate = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    _, head, scale, softcap = lm_parts(teacher)
    device = head.weight.device
    n_shards = -(-len(dataset) // shard_rows)
    bar = tqdm(total=len(dataset), initial=min(first * shard_rows, len(dataset)), unit="row",
               desc="teacher " + ("samples" if sampling == "sample" else "top-k"))
    for s in range(first, n_shards):
        lo, hi = s * shard_rows, min((s + 1) * shard_rows, len(dataset))
        shard = []
        for b in range(lo, hi, batch_size):
            batch = collate([{k: dataset[i][k] for k in ("input_ids", "labels")}
                             for i in range(b, min(b + batch_size, hi))])
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.inference_mode():
                h, _, which = completion_hidden(teacher, batch["input_ids"], batch["attention_mask"], batch["labels"])
                if sampling == "sample":
                    g = torch.Generator(device=head.weight.device)
                    g.manual_seed(int(np.random.SeedSequence([seed, b]).generate_state(1)[0]))
                    got = teacher_sample(h, head, n=draws, generator=g, temperature=temperature, scale=scale,
                                         softcap=softcap)
                else:
                    got = teacher_topk(h, head, k=top_k, temperature=temperature, scale=scale, softcap=softcap)
            which = which.cpu().numpy()
            for r in range(batch["input_ids"].shape[0]):
                sel = which == r
                shard.append(tuple(a[sel] for a in got))
            bar.update(batch["input_ids"].shape[0])
        write_shard(out, s, shard)
    bar.close()


def cache_meta(teacher: str, data: str, tok, dataset, *, temperature: float, shard_rows: int, encoding: dict,
               sampling: str = "topk", top_k: int | None = None, draws: int | None = None,
               seed: int | None = None) -> dict:
    """meta.json of a cache for `dataset` (kd_train.py's encoding of `data`, as `encoding` says) made with `tok`."""
    from fileio import sha256_file
    return {"teacher": teacher, "data": data, "data_sha256": sha256_file(data), "tokenizer": tokenizer_fingerprint(tok),
            "rows_sha256": rows_fingerprint(dataset), "rows": len(dataset), "sampling": sampling, "top_k": top_k,
            "draws": draws, "seed": seed, "temperature": temperature, "shard_rows": shard_rows,
            "encoding": encoding,
            "format": "kd_cache v1: packed uint32 id<<14 | round(-logp*512) (16383: empty), float16 log tail mass"}


def label_targets(dataset, probs, label_ids: list[int]) -> list[tuple]:
    """Cache rows (ids [P, k], logp [P, k], tail [P]) for a classifier as the teacher, k = the number of labels: at
    each row's first answer token (the label's, a single token per label) the classifier's probabilities over the
    labels' ids, `probs` [rows, labels]; at the answer's later tokens (end of turn) all mass on the token there."""
    k = len(label_ids)
    rows = []
    for ex, p in zip(dataset, probs):
        labels = np.asarray(ex["labels"][1:])
        targets = labels[labels != -100]
        ids = np.repeat(targets[:, None], k, 1)
        logp = np.full((len(targets), k), MIN_LOGP)
        logp[:, 0] = 0.0
        if len(targets):
            ids[0] = label_ids
            logp[0] = np.log(np.clip(p, np.exp(MIN_LOGP), 1.0))
        rows.append((ids, logp, np.full(len(targets), TAIL_FLOOR)))
    return rows


def mass_outside(out: Path, shards: int, sampling: str = "topk") -> dict:
    """The teacher's probability outside the stored ids per answer position, over the `shards` shards at `out`: its
    mean, 90th percentile and largest (top-k: the tail bucket; sample: outside the distinct drawn ids), and for a
    sampled cache the mean number of distinct ids."""
    rest, distinct = [], []
    for s in range(shards):
        with np.load(shard_path(out, s)) as z:
            rest.append(np.exp(z["rest" if sampling == "sample" else "tail"].astype(np.float64)))
            distinct.append(((z["packed"] & EMPTY) != EMPTY).sum(1))
    rest = np.concatenate(rest) if rest else np.zeros(0)
    rest = np.where(rest <= np.exp(TAIL_FLOOR) * 1.01, 0.0, rest)  # the floor's e^-30 is none
    if not rest.size:
        return {"positions": 0}
    got = {"positions": int(rest.size), "mean": round(float(rest.mean()), 4),
           "p90": round(float(np.percentile(rest, 90)), 4), "max": round(float(rest.max()), 4)}
    if sampling == "sample":
        got["distinct_ids_mean"] = round(float(np.concatenate(distinct).mean()), 2)
    return got


def describe(meta: dict) -> str:
    """What a cache holds, in words: 'the top-64 log-probabilities of T at temperature 2' or '64 draws from ...'."""
    t = f"{meta.get('teacher')} at temperature {float(meta.get('temperature', 1.0)):g}"
    if meta.get("sampling", "topk") == "sample":
        return f"{meta.get('draws')} draws (seed {meta.get('seed')}) from {t}"
    return f"the top-{meta.get('top_k')} log-probabilities of {t}"


def coverage_note(meta: dict) -> str | None:
    """The note for a top-k cache that leaves much of the teacher's mass out of its loss (None when it does not)."""
    m = meta.get("teacher_mass_outside") or {}
    if meta.get("sampling", "topk") != "topk" or m.get("mean") is None or m["mean"] <= NOTE_ABOVE:
        return None
    t, k = float(meta["temperature"]), meta["top_k"]
    return (f"at --temperature {t:g} the top {k} hold only {100 * (1 - m['mean']):.3g}% of the teacher's mass on "
            f"this data (mean per answer position; 90th percentile outside: {100 * m['p90']:.3g}%): the cached loss "
            "leaves the rest out (measured on CreditMix at temperature 2: 2-3 points below live KD); use "
            "--temperature 1, a larger --top_k, or --sampling sample")


def finish(out: Path, meta: dict) -> dict:
    """Mark the cache complete, with the teacher's mass outside the stored ids (mass_outside) in its meta.json."""
    shards = -(-int(meta["rows"]) // int(meta["shard_rows"]))
    meta = {**meta, "teacher_mass_outside": mass_outside(out, shards, meta.get("sampling", "topk")), "complete": True}
    write_json(out / "meta.json", meta)
    return meta


# ----------------------------------------------------------------------------------------------------------------
# the loss

def _chunk_terms(h, w, b, ids, logp_t, tail_t, targets, temperature, scale, softcap):
    import torch
    z = _logits(h, w, b, scale, softcap)
    lse = torch.logsumexp(z, -1)
    if temperature == 1.0:
        logq = z.gather(1, ids) - lse[:, None]
    else:
        zt = z / temperature
        logq = zt.gather(1, ids) - torch.logsumexp(zt, -1, keepdim=True)
    held = logp_t > MIN_LOGP  # empty slots (and p < e^-32) weigh 0 and are not part of the listed ids
    logq_tail = torch.log1p(-(logq.exp() * held).sum(1).clamp(max=1 - 1e-6))
    p_t = torch.where(held, logp_t.exp(), 0.0)
    p_tail = torch.where(tail_t > TAIL_FLOOR, tail_t.exp(), 0.0)  # a sampled cache's: 0, so its loss is the CE
    kl = (p_t * (logp_t - logq)).sum(1) + p_tail * (tail_t - logq_tail)
    ce = lse - z.gather(1, targets[:, None]).squeeze(1)
    return kl.sum(), ce.sum(), (z.argmax(-1) == targets).sum()


def chunk_positions(vocab: int, tile_bytes: int = 64 << 20) -> int:
    """Positions per loss chunk: one fp32 [chunk, vocab] tile of about `tile_bytes` (110 positions of a 151,936
    vocabulary), so the chunk's few live tiles stay well under the 0.2 GiB the cached loss may add to SFT's peak."""
    return max(16, tile_bytes // (4 * vocab))


def cached_kd_terms(student, batch: dict, cache: TeacherCache, rows, *, temperature: float = 1.0,
                    chunk: int | None = None) -> dict:
    """kd_terms' dict ({"ce", "kd", "tokens", "entropy", "accuracy"}) from the cached teacher: one student backbone
    pass, then the output layer a chunk of positions at a time, recomputed in the backward (checkpoint), so no
    [tokens, vocab] tensor is kept."""
    import torch
    from torch.utils.checkpoint import checkpoint

    from kd_losses import completion_hidden, lm_parts
    h, targets, _ = completion_hidden(student, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                      batch.get("position_ids"))
    _, head, scale, softcap = lm_parts(student)
    ids, logp_t, tail_t = cache.batch(rows, h.device)
    if ids.shape[0] != h.shape[0]:
        raise UserError(f"the teacher cache has {ids.shape[0]} answer positions for this batch, the student "
                        f"{h.shape[0]}: the cache does not match the data (rebuild it)")
    chunk = chunk or chunk_positions(head.weight.shape[0])
    kl = ce = hits = 0
    for i in range(0, h.shape[0], chunk):
        s = slice(i, i + chunk)
        k, c, a = checkpoint(_chunk_terms, h[s], head.weight, getattr(head, "bias", None), ids[s], logp_t[s],
                             tail_t[s], targets[s], temperature, scale, softcap, use_reentrant=False)
        kl, ce, hits = kl + k, ce + c, hits + a
    n = max(int(h.shape[0]), 1)
    zero = torch.zeros((), device=h.device)
    return {"kd": (kl if torch.is_tensor(kl) else zero) / n, "ce": (ce if torch.is_tensor(ce) else zero) / n,
            "tokens": int(h.shape[0]), "entropy": None, "accuracy": float(hits) / n}
