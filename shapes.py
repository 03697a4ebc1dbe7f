"""Model architectures by name (their config.json values) and a folder of one with random weights: what bench.py,
bench_idp.py and the gpu/ scripts measure on (speed and memory do not depend on weight values).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

CONFIGS = {
    # Qwen2.5-3B(-Instruct) architecture (its config.json): 36 layers, GQA 16/2, tied embeddings.
    "qwen2.5-3b": dict(model_type="qwen2", hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                       num_attention_heads=16, num_key_value_heads=2, vocab_size=151936, rope_theta=1e6,
                       max_position_embeddings=32768, tie_word_embeddings=True, rms_norm_eps=1e-6),
    # Qwen2.5-7B architecture, for the FSDP teacher.
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, rope_theta=1e6,
                       max_position_embeddings=32768, tie_word_embeddings=False, rms_norm_eps=1e-6),
    # SmolLM2-135M(-Instruct) architecture (the embedded model's config), e.g. for bench_idp.py without its weights.
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                         rope_theta=1e5, max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2),
    # For CPU smoke tests.
    "tiny": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=49152, max_position_embeddings=32768,
                 tie_word_embeddings=True),
}


def random_model_dir(config: str, cache: str | os.PathLike, tokenizer: str) -> Path:
    """<cache>/<config>: the architecture `config` (a name above or a config.json) with random bf16 weights, built
    once (on the GPU when there is one), with `tokenizer` (tokenizer files, or a model spec) saved beside it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    import common
    import models
    cfg = CONFIGS.get(config) or json.loads(Path(config).read_text())
    out = Path(cache) / (config if config in CONFIGS else Path(config).stem)
    if (out / "config.json").is_file():
        return out
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.bfloat16)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent))
    model.save_pretrained(tmp)
    src = Path(tokenizer)
    tok = AutoTokenizer.from_pretrained(src) if (src / "tokenizer.json").is_file() else \
        common.load_tokenizer(models.resolve_model(tokenizer))  # tokenizer files alone: a GPU machine has no model
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return out
