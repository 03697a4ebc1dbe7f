"""A teacher's top-k next-token log-probabilities on the answer tokens of a KD file, stored once (teacher_cache.py)
and trained from without the teacher (kd_train.py --teacher_cache): the teacher never shares the GPU with the
student.

Format (a folder): meta.json (teacher, data sha256, tokenizer fingerprint, top_k, temperature, max_len, a sha256 of
every row's token ids) and shard-NNNNN.npz files of --shard_rows rows each, holding for every answer position of its
rows (row-major, the order kd_losses.completion_hidden selects them in):
  packed uint32 [P, k]: token id << 14 | round(-log p * 512)  (ids < 2^18 = 262,144; log p in 1/512 nat steps, >= -32)
  tail   float16 [P]:   log of the teacher's mass outside its top k
  offsets int64 [rows + 1] into P.
That is 4k + 2 bytes per answer token: 258 at k = 64 (DistillKit's compressed logits take about 114-300).

The loss (cached_kd_terms) is forward KL(teacher || student) over the top k and one tail bucket: a lower bound of the
full-vocabulary KL (merging outcomes can only lower a KL), exact when k covers the vocabulary.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from fileio import UserError, atomic_open, write_json

ID_BITS, Q_BITS, Q_SCALE = 18, 14, 512.0   # 18 + 14 = 32 bits; 2^14 / 512 = 32 nats of range
MIN_LOGP = -(2 ** Q_BITS - 1) / Q_SCALE
TAIL_FLOOR = -30.0                          # log mass below e^-30 counts as none (no -inf in the loss)


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

def write_shard(out: Path, index: int, rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> Path:
    """One shard from per-row (ids, logp, tail), written whole or not at all."""
    counts = [len(t) for _, _, t in rows]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    k = rows[0][0].shape[1] if rows and rows[0][0].ndim == 2 else 0
    packed = np.concatenate([pack(i, lp) for i, lp, _ in rows]) if sum(counts) else np.zeros((0, k), np.uint32)
    tail = np.concatenate([t for _, _, t in rows]).astype(np.float16) if sum(counts) else np.zeros(0, np.float16)
    path = out / f"shard-{index:05d}.npz"
    with atomic_open(path, "wb") as f:
        np.savez(f, packed=packed, tail=tail, offsets=offsets)
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

    def check(self, *, data_sha256: str, tokenizer: str, rows_sha256: str, temperature: float) -> None:
        """Refuse a student or data the cache was not made for, with one line saying which."""
        m, where = self.meta, f"--teacher_cache {self.folder}"
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
        ids, logp, tail = (np.concatenate([p[j] for p in parts]) for j in range(3))
        return (torch.as_tensor(ids, device=device), torch.as_tensor(logp, device=device),
                torch.as_tensor(tail, device=device))


def write_shards(teacher, tok, dataset, out: Path, *, first: int = 0, top_k: int = 64, temperature: float = 1.0,
                 shard_rows: int = 256, batch_size: int = 8) -> None:
    """The teacher's top-k targets of every answer position of `dataset` (encoded rows: input_ids, labels), written
    as shards of `shard_rows` rows from shard `first` on (a resume starts past the finished ones)."""
    import torch
    from tqdm import tqdm
    from transformers import DataCollatorForSeq2Seq

    from kd_losses import completion_hidden, lm_parts
    tok.padding_side = "right"  # as the trainer's collator pads: the same positions, the same hidden states
    collate = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    _, head, scale, softcap = lm_parts(teacher)
    device = head.weight.device
    n_shards = -(-len(dataset) // shard_rows)
    bar = tqdm(total=len(dataset), initial=min(first * shard_rows, len(dataset)), desc="teacher top-k", unit="row")
    for s in range(first, n_shards):
        lo, hi = s * shard_rows, min((s + 1) * shard_rows, len(dataset))
        shard = []
        for b in range(lo, hi, batch_size):
            batch = collate([{k: dataset[i][k] for k in ("input_ids", "labels")}
                             for i in range(b, min(b + batch_size, hi))])
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.inference_mode():
                h, _, which = completion_hidden(teacher, batch["input_ids"], batch["attention_mask"], batch["labels"])
                ids, logp, tail = teacher_topk(h, head, k=top_k, temperature=temperature, scale=scale,
                                               softcap=softcap)
            which = which.cpu().numpy()
            for r in range(batch["input_ids"].shape[0]):
                sel = which == r
                shard.append((ids[sel], logp[sel], tail[sel]))
            bar.update(batch["input_ids"].shape[0])
        write_shard(out, s, shard)
    bar.close()


def finish(out: Path, meta: dict) -> None:
    write_json(out / "meta.json", {**meta, "complete": True})


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
    logq_tail = torch.log1p(-logq.exp().sum(1).clamp(max=1 - 1e-6))
    kl = (logp_t.exp() * (logp_t - logq)).sum(1) + tail_t.exp() * (tail_t - logq_tail)
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
