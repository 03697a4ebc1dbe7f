"""The tokenizer of a SentencePiece-BPE GGUF (tokenizer.ggml.model "llama" with scores, as Gemma 3's), rebuilt
correctly for transformers.

Why hand-written: transformers 5.17 converts a Gemma GGUF's vocabulary into a Unigram model
(integrations/ggml.py, GGUFGemmaConverter) and adds no <bos>. Gemma's SentencePiece model is BPE: merges apply in
the order of the merged piece's score. Unigram with those scores segments differently ("The capital of France is"
becomes 10 pieces, '▁c' 'ap' 'it' 'al' ..., instead of 5), and Gemma without <bos> degenerates ("is is is ...").
Rebuilt here as BPE with the merges SentencePiece implies (a merge (l, r) exists where l, r and l+r are pieces;
ranked by the score of l+r, as transformers' SentencePieceExtractor does for a .model file), byte fallback, no
prefix space, control tokens special, and <bos> prepended (tokenizer.ggml.add_bos_token). With it the
GGUF's Gemma 3 270M tokenises as Gemma does ([2, 818, 5279, 529, 7001, 563]) and continues sensibly.
"""
from __future__ import annotations

from pathlib import Path

NORMAL, CONTROL, USER_DEFINED, BYTE = 1, 3, 4, 6   # tokenizer.ggml.token_type values (llama.cpp's llama_token_type)


def _field(reader, name, default=None):
    f = reader.fields.get(name)
    if f is None:
        return default
    return [f.parts[i] for i in f.data]


def read_spm_vocab(gguf_path: str | Path) -> dict:
    """tokens, scores, types and the special ids of a GGUF's tokenizer."""
    from gguf import GGUFReader
    r = GGUFReader(str(gguf_path))
    model = _field(r, "tokenizer.ggml.model")
    model = bytes(model[0]).decode() if model else None

    def scalar(name, default=None):
        v = _field(r, name)
        return v[0].tolist()[0] if v else default
    arch = _field(r, "general.architecture")
    return {"model": model, "arch": bytes(arch[0]).decode() if arch else None,
            "tokens": [bytes(p).decode("utf-8") for p in _field(r, "tokenizer.ggml.tokens", [])],
            "scores": [float(p[0]) for p in _field(r, "tokenizer.ggml.scores", [])],
            "types": [int(p[0]) for p in _field(r, "tokenizer.ggml.token_type", [])],
            "bos": scalar("tokenizer.ggml.bos_token_id"), "eos": scalar("tokenizer.ggml.eos_token_id"),
            "unk": scalar("tokenizer.ggml.unknown_token_id"), "pad": scalar("tokenizer.ggml.padding_token_id"),
            "add_bos": bool(scalar("tokenizer.ggml.add_bos_token", True))}


def spm_bpe_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """SentencePiece BPE's merges: (l, r) for every normal piece l+r whose halves are pieces, best score first."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for t, i in vocab.items():
        if types[i] != NORMAL or len(t) < 2:
            continue
        for k in range(1, len(t)):
            left, right = t[:k], t[k:]
            if left in vocab and right in vocab:
                merges.append((-scores[i], vocab[left], vocab[right], left, right))
    merges.sort()
    return [(m[3], m[4]) for m in merges]


def spm_bpe_tokenizer(vocab: dict):
    """A transformers fast tokenizer from read_spm_vocab's dict."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    tokens, types = vocab["tokens"], vocab["types"]
    tk = Tokenizer(BPE({t: i for i, t in enumerate(tokens)}, spm_bpe_merges(tokens, vocab["scores"], types),
                       unk_token=tokens[vocab["unk"]] if vocab["unk"] is not None else None, fuse_unk=True,
                       byte_fallback=True))
    tk.normalizer = normalizers.Replace(" ", "▁")
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types)
                           if ty == CONTROL])
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types)
                   if ty == USER_DEFINED])
    name = lambda i: tokens[i] if i is not None else None  # noqa: E731
    bos = name(vocab["bos"])
    if vocab["add_bos"] and bos is not None:
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                          special_tokens=[(bos, vocab["bos"])])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=name(vocab["eos"]),
                                   unk_token=name(vocab["unk"]), pad_token=name(vocab["pad"]))


def gguf_tokenizer(gguf_path: str | Path):
    """The rebuilt tokenizer for a Gemma GGUF (SentencePiece BPE: tokenizer.ggml.model "llama" with scores, which
    transformers reads as Unigram); None for any other GGUF, whose tokenizer transformers' reader handles."""
    vocab = read_spm_vocab(gguf_path)
    if vocab["model"] != "llama" or not (vocab["arch"] or "").startswith("gemma") or not vocab["scores"]:
        return None
    return spm_bpe_tokenizer(vocab)
