"""Shared fixtures: tiny random models built locally from the embedded SmolLM2 tokenizer (no download), the way
HF's own tests use tiny-random checkpoints. Seconds per test."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"


def pytest_configure(config):
    config.addinivalue_line("markers", "real_model: runs the embedded SmolLM2-135M (slower; few)")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU")


def build_tiny_model(out: Path, seed: int = 0, **overrides) -> Path:
    """A 2-layer Llama with SmolLM2's tokenizer and vocabulary, random weights, saved as safetensors."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    import common
    tok = AutoTokenizer.from_pretrained(common.embedded_model_dir())
    cfg = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
               tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(autouse=True)
def _runs_in_tmp(tmp_path, monkeypatch):
    """Base-model evaluations file themselves under runs/: keep them out of the repo during tests."""
    monkeypatch.setenv("DISTILL_SLM_RUNS", str(tmp_path / "runs"))


def shared_data(rel: str) -> Path:
    p = SHARED_DATA / rel
    if not p.exists():
        pytest.skip(f"real data not found: {p} (see ../shared/data/PROVENANCE.md)")
    return p
