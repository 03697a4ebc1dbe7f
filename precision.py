"""The precision a model loads in: bf16 where it fits, 4-bit NF4 where it must (inference); 4-bit QLoRA for
training; plain weights on CPU. One rule (choose_precision, pure) for the scripts and the server, and the device and
compute dtype it starts from.

common.load_model prints precision_line and loads in what decide_precision returns.
"""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

from fileio import UserError, note, read_json_object
from models import ModelSpec, check_hub_model, is_hub_id, local_model_path

GIB = 2 ** 30
DEFAULT_MAX_MEMORY_GB = 8.0  # the 8 GB card the project targets (GiB, as training.py's --max_memory_gb)
PRECISION_LABELS = {"4bit": "4-bit NF4", "bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}


def pick_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def compute_dtype(device: str):
    """bf16 on GPUs that support it; fp32 on CPU (measured faster on 2-core avx512 CPUs: see README performance)."""
    import torch
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32 if os.environ.get("DISTILL_SLM_CPU_DTYPE", "fp32") == "fp32" else torch.bfloat16


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
