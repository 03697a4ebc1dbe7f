"""gguf_tokenizer.py: a SentencePiece-BPE vocabulary stored in a GGUF (as Gemma 3's) rebuilt as a fast tokenizer
segments exactly as SentencePiece itself does, and prepends <bos>. The reference is a real SentencePiece BPE model
trained here, written into a GGUF with the gguf library's writer."""
import random

import pytest

import gguf_tokenizer

spm = pytest.importorskip("sentencepiece")

TEXTS = ["The capital of France is Paris.", "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1)",
         "Invoice #INV-1042, total USD 1,234.50 due 2024-03-01", "  two  spaces\tand a tab", "naïve café — ok"]


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory):
    import gguf
    d = tmp_path_factory.mktemp("spm")
    rng = random.Random(0)
    words = " ".join(TEXTS).split()
    (d / "corpus.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(2000))
                                  + "\n" + "\n".join(TEXTS))
    spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "m"), model_type="bpe",
                                   vocab_size=400, byte_fallback=True, add_dummy_prefix=False,
                                   normalization_rule_name="identity", split_by_whitespace=False,
                                   remove_extra_whitespaces=False, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
                                   character_coverage=1.0, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(d / "m.model"))
    kind = lambda i: (3 if sp.IsControl(i) else 2 if sp.IsUnknown(i) else 6 if sp.IsByte(i)  # noqa: E731
                      else 4 if sp.IsUnused(i) else 1)
    w = gguf.GGUFWriter(str(d / "m.gguf"), "gemma3")
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.IdToPiece(i) for i in range(sp.GetPieceSize())])
    w.add_token_scores([sp.GetScore(i) for i in range(sp.GetPieceSize())])
    w.add_token_types([kind(i) for i in range(sp.GetPieceSize())])
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sp, d / "m.gguf"


def test_segments_as_sentencepiece_bpe_and_adds_bos(spm_gguf):
    sp, path = spm_gguf
    vocab = gguf_tokenizer.read_spm_vocab(path)
    assert vocab["model"] == "llama" and vocab["add_bos"] and len(vocab["tokens"]) == sp.GetPieceSize()
    tok = gguf_tokenizer.spm_bpe_tokenizer(vocab)
    for text in TEXTS + ["unseen wordsss xyzzy 123"]:
        ids = tok(text)["input_ids"]
        assert ids[0] == 2 and ids[1:] == sp.encode(text), text
        assert tok.decode(ids, skip_special_tokens=True) == text


def test_a_unigram_reading_of_the_same_scores_segments_differently(spm_gguf):
    """What transformers' Gemma GGUF converter does (Unigram over the BPE scores) is not SentencePiece BPE: the
    test above would catch a tokenizer built that way."""
    from tokenizers import Tokenizer, normalizers
    from tokenizers.models import Unigram
    sp, path = spm_gguf
    v = gguf_tokenizer.read_spm_vocab(path)
    uni = Tokenizer(Unigram(list(zip(v["tokens"], v["scores"])), unk_id=3, byte_fallback=True))
    uni.normalizer = normalizers.Replace(" ", "▁")
    assert any(uni.encode(t).ids != sp.encode(t) for t in TEXTS)
