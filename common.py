"""Shared helpers for the distill_slm scripts: loading (QLoRA on CUDA, plain LoRA on CPU) and the chat-template
prompt builder.

Scripts stay thin; everything here is a small function that tests call directly. Beside it: models.py (model specs:
aliases, hub ids, folders, GGUF files, run dirs), precision.py (bf16 where it fits, 4-bit where it must), fileio.py
(errors, data files, outputs written whole), run_record.py (run directories, run.json, evaluations), scoring.py
(label ranking).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from fileio import UserError, note
from models import EMBEDDED_ALIAS, ModelSpec, align_special_tokens, check_hub_model, resolve_model
from precision import DEFAULT_MAX_MEMORY_GB, compute_dtype, decide_precision, pick_device, precision_line, use_4bit

# The README's LoRA recipe (QLoRA paper settings): r=16, alpha=32, dropout 0.05 on every projection.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Used when a tokenizer has no chat template (base models): ChatML, the format of Qwen2.5 and SmolLM2.
CHATML_TEMPLATE = (
    "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}"
)


# ----------------------------------------------------------------------------------------------------------------
# loading

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
        tok.chatml_fallback = True  # not the model's own: xtok_kd.has_own_template (a run dir saves it as its own)
    return tok


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
