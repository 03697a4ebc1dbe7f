"""Every use of a library's private internals, in one place (the pins in requirements.txt protect them today).

Each entry says what public API it stands in for and why none does the job. tests/test_compat.py fails, naming the
library and its version, when one of the private names below disappears: an upgrade starts here.

Import this module inside functions (it imports TRL and transformers, which take seconds).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import trl.trainer.utils as _trl_utils
from trl import DPOTrainer
from trl.kernels.chunked_logprob import _use_triton
from trl.models.utils import _ForwardRedirection

# name -> (library, where it lives): what the test checks
PRIVATE = {
    "trl.models.utils._ForwardRedirection": "trl",
    "trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE": "trl",
    "trl.trainer.utils._use_triton": "trl",
    "trl.kernels.chunked_logprob._use_triton": "trl",
    "trl.DPOTrainer._prepare_dataset": "trl",
    "transformers.TrainingArguments._n_gpu": "transformers",
    "transformers.Trainer._train_batch_size": "transformers",
    "transformers.Trainer._prepare_inputs": "transformers",
    "transformers.Trainer.current_gradient_accumulation_steps": "transformers",
    "trl.SFTTrainer._metrics": "trl",
    "trl.SFTTrainer._total_train_tokens": "trl",
    "transformers.Trainer.model_accepts_loss_kwargs": "transformers",
    "peft.tuners.lora.LoraModel._enable_peft_forward_hooks": "peft",
    "peft.tuners.lora.layer.Linear._mixed_batch_forward": "peft",
    "peft.tuners.lora.bnb.Linear4bit._mixed_batch_forward": "peft",
    "peft.tuners.lora.layer.LoraLayer.lora_variant": "peft",
    "peft.tuners.lora.layer.VARIANT_KWARG_KEYS": "peft",
}


def forward_through_wrapper(wrapper, module, fn, *args, **kwargs):
    """Call fn(*args) with `module`'s forward routed through its DDP/FSDP `wrapper`, so the wrapper's hooks (gradient
    sync, FSDP unsharding) fire. Stands in for: nothing public; TRL's own DistillationTrainer uses the same class."""
    return _ForwardRedirection()(wrapper, module, fn, *args, **kwargs)


def chunked_logprob_chunk_size() -> int:
    """The vocabulary chunk TRL's fused LM-head kernel uses in its trainers (ChunkedLogProbFunction takes it as an
    argument; TRL exports no public default)."""
    return _trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE


def score_answer_tokens_only() -> None:
    """TRL's fused LM head scores only the answer positions on CUDA but every position elsewhere (static tile shapes
    for XLA/Neuron compilers). On a CPU that is ~100x wasted work for a one-token CreditMix answer, so take the
    answer-only path there too; the kernel still picks its torch fallback off-GPU. Stands in for: no config option
    exists. Process-wide and idempotent."""
    _trl_utils._use_triton = lambda device: device.type == "cpu" or _use_triton(device)


@contextlib.contextmanager
def scoring_every_position():
    """Within the block, TRL's fused LM head scores every position and masks the ignored ones afterwards (its
    static-shape path for compilers): no boolean indexing by the labels, which a CUDA graph cannot capture
    (speedups.GraphedStep), at the cost of scoring prompt positions too. A capture records the path taken while it
    runs, so the block only needs to cover the captured step. Stands in for: no config option exists."""
    saved = _trl_utils._use_triton
    _trl_utils._use_triton = lambda device: False
    try:
        yield
    finally:
        _trl_utils._use_triton = saved


def one_gpu_per_process(config) -> None:
    """With several GPUs visible, Trainer would wrap the model in nn.DataParallel, which TRL refuses; one process
    trains on one GPU, where device_map put the model. Stands in for: no public setter of TrainingArguments.n_gpu."""
    config._n_gpu = 1


def set_micro_batch(trainer, batch: int) -> None:
    """Change the micro-batch of a built Trainer before train() (fit_micro_batch's choice). Trainer copies
    per_device_train_batch_size into this attribute at construction; auto_find_batch_size sets it the same way."""
    trainer._train_batch_size = batch * max(1, trainer.args.n_gpu)


def one_training_step(trainer, rows: list[dict]) -> None:
    """One training_step outside trainer.train() (a memory probe) that leaves no trace in the logs: the loop normally
    sets the accumulation count that training_step divides by and prepares the inputs (device placement); TRL's
    trainers keep the step's metrics and token count, which are cleared afterwards. Stands in for: no public
    single-step API."""
    trainer.current_gradient_accumulation_steps = 1
    try:
        trainer.training_step(trainer.model, trainer._prepare_inputs(trainer.data_collator(rows)))
    finally:  # the metrics' names too: a step that logs fewer (--cuda_graphs) must not leave empty lists to average
        getattr(trainer, "_metrics", {}).get("train", {}).clear()
        if hasattr(trainer, "_total_train_tokens"):
            trainer._total_train_tokens = 0


def prepare_inputs(trainer, inputs: dict) -> dict:
    """Trainer's own input preparation (device placement) for a training_step written outside Trainer."""
    return trainer._prepare_inputs(inputs)


def sft_loss_divisor(trainer, labels, num_items_in_batch):
    """What SFTTrainer's training_step divides a micro-batch's summed answer-token NLL by, as a 0-d float32 tensor on
    the labels' device: TRL's compute_loss divides by num_items_in_batch (the accumulated batch's answer tokens, which
    Trainer counts), else by this micro-batch's own count, clamped to 1; Trainer.training_step then divides by the
    accumulation count when the loss did not get num_items_in_batch. One process (no average_tokens_across_devices
    factor). Stands in for: the division is inline in both libraries' training_step/compute_loss."""
    count = num_items_in_batch if num_items_in_batch is not None else (labels[..., 1:] != -100).sum()
    divisor = torch.as_tensor(count, device=labels.device).clamp(min=1).to(torch.float32)
    if (not trainer.model_accepts_loss_kwargs or num_items_in_batch is None) and trainer.compute_loss_func is None:
        divisor = divisor * trainer.current_gradient_accumulation_steps
    return divisor.reshape(())


def count_sft_tokens(trainer, tokens: int) -> None:
    """SFTTrainer's `num_tokens` metric (its compute_loss keeps the running count of non-padding input tokens), for a
    training_step that does not run its compute_loss: add `tokens` of one micro-batch. One process."""
    trainer._total_train_tokens += tokens
    trainer._metrics["train"]["num_tokens"] = [trainer._total_train_tokens]


class PretokenizedDPOTrainer(DPOTrainer):
    """A DPOTrainer over a dataset that dpo_train.encode_pairs has tokenised already. TRL would re-tokenise with the
    chat template, which also trains the newline after the end-of-turn token and silently drops prompts that fill
    max_length; encode_pairs has done (and counted) all of that. Stands in for: DPOConfig has no
    `skip_prepare_dataset` (SFTConfig's dataset_kwargs has one)."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        missing = {"prompt_ids", "chosen_ids", "rejected_ids"} - set(dataset.column_names)
        if missing:
            raise ValueError(f"build_trainer needs a dataset from encode_pairs (missing {sorted(missing)})")
        return dataset



def adapter_names_per_thread(model, on_call, row_hook) -> None:
    """PEFT's mixed-adapter batches (`adapter_names`) made safe for several threads running one model (the server's
    lanes): PEFT's LoraModel._enable_peft_forward_hooks registers a pre-forward hook on every LoRA layer for the
    length of a call, and meanwhile those hooks apply to every thread's forward passes. On this model, replace it by
    `on_call` (a context manager given the call's kwargs, which keeps the names per thread), and give each LoRA layer
    one permanent pre-forward hook `row_hook(module, args, kwargs)` that passes the calling thread's names as the
    layer's `adapter_names` forward argument. Idempotent; call again after attaching an adapter (new LoRA layers).
    Stands in for: PEFT has no per-thread way to choose adapters per call."""
    from peft.tuners.lora import LoraLayer
    model.base_model._enable_peft_forward_hooks = on_call
    for m in model.modules():
        if isinstance(m, LoraLayer) and not getattr(m, "_rows_hook", False):
            m.register_forward_pre_hook(row_hook, with_kwargs=True)
            m._rows_hook = True


# ----------------------------------------------------------------------------------------------------------------
# stacked mixed-adapter LoRA (the server's mixed-adapter batches)

_ROW_SLOTS: dict = {}  # (stack order, adapter name per row, device) -> _Rows
_ROW_SLOTS_KEPT = 1024  # distinct batches remembered before the cache is emptied (a server sees endless mixes)


def _lora_linear_classes() -> tuple:
    """PEFT's LoRA layers over a linear base (plain, bitsandbytes 4-bit and 8-bit): the ones whose LoRA is
    lora_B(lora_A(x)) * scaling and whose _mixed_batch_forward the stacked path replaces."""
    from peft.tuners.lora.layer import Linear
    classes = [Linear]
    try:
        from peft.tuners.lora.bnb import Linear4bit, Linear8bitLt
        classes += [Linear4bit, Linear8bitLt]
    except ImportError:  # bitsandbytes not installed: PEFT defines no bnb layers
        pass
    return tuple(classes)


def _stackable(layer, name: str) -> bool:
    """Whether adapter `name` of this layer is plain LoRA that the stacked forward computes exactly: no variant
    (DoRA, aLoRA, ...), no LoRA bias, linear A and B."""
    import torch.nn as nn
    a, b = layer.lora_A[name], layer.lora_B[name]
    return (name not in layer.lora_variant and type(a) is nn.Linear and type(b) is nn.Linear
            and a.bias is None and b.bias is None)


def _written(t) -> tuple:
    """Where a tensor's data is and how often it was written in place (torch's version counter, which every
    in-place op bumps; weights made under inference_mode have none, and cannot be written outside it)."""
    return t.data_ptr(), -1 if t.is_inference() else t._version


@dataclass(frozen=True)
class _Stacks:
    order: tuple            # the stacked adapters; slot k + 1 is order[k]
    A: Any                  # [n + 1, in, r] or None (no stackable adapter)
    B: Any                  # [n + 1, r, out], each adapter's scaling folded in
    skip: frozenset         # adapters of the layer that cannot be stacked (batches using them go to PEFT)
    dropout: frozenset      # adapters with a dropout module of p > 0 (a batch using one in training mode: PEFT)


@dataclass(frozen=True)
class _Rows:
    slots: Any              # slot per row, a tensor on the stacks' device
    one: int | None         # the slot of every row when they share one, else None
    used: frozenset         # the adapter names in the batch


def _lora_stacks(layer) -> _Stacks:
    """The layer's stackable adapters' A and B stacked, ranks padded with zeros, slot 0 all zeros (rows of the base
    or of an adapter this layer does not have). Built on first use; rebuilt when the layer's adapters change
    (added, removed, their scaling set: the keys and values of layer.scaling) or their weights are written in
    place or moved (each weight's data pointer and version counter). Cheap to check: it runs in every layer of
    every forward pass."""
    cached = layer.__dict__.get("_lora_stacks_cache")  # one attribute: readers in other threads see old or new
    sig = tuple(layer.scaling.items())
    if cached is not None and cached[0] == sig and all(_written(p) == w for p, w in cached[1]):
        return cached[2]
    names = list(layer.lora_A.keys())
    params = [m.weight for n in names for m in (layer.lora_A[n], layer.lora_B[n])]
    order = tuple(n for n in names if _stackable(layer, n))
    dropout = frozenset(n for n in names if getattr(layer.lora_dropout[n], "p", 0) > 0)
    A = B = None
    if order:
        w = layer.lora_A[order[0]].weight
        r = max(layer.lora_A[n].weight.shape[0] for n in order)
        n_in, n_out = w.shape[1], layer.lora_B[order[0]].weight.shape[0]
        with torch.no_grad():
            A = torch.zeros(len(order) + 1, n_in, r, dtype=w.dtype, device=w.device)
            B = torch.zeros(len(order) + 1, r, n_out, dtype=w.dtype, device=w.device)
            for k, n in enumerate(order, 1):
                a, b = layer.lora_A[n].weight, layer.lora_B[n].weight  # [r_n, in], [out, r_n]
                A[k, :, :a.shape[0]] = a.T
                B[k, :b.shape[1], :] = (b.float() * layer.scaling[n]).T.to(w.dtype)
    stacks = _Stacks(order, A, B, frozenset(names) - frozenset(order), dropout)
    layer._lora_stacks_cache = (sig, tuple((p, _written(p)) for p in params), stacks)
    return stacks


def _row_slots(order: tuple, adapter_names, device) -> _Rows:
    key = (order, tuple(adapter_names), device)
    got = _ROW_SLOTS.get(key)
    if got is None:
        slot = {n: k for k, n in enumerate(order, 1)}
        rows = [slot.get(n, 0) for n in adapter_names]
        got = _Rows(torch.tensor(rows, device=device), rows[0] if len(set(rows)) == 1 else None,
                    frozenset(adapter_names))
        if len(_ROW_SLOTS) >= _ROW_SLOTS_KEPT:
            _ROW_SLOTS.clear()
        _ROW_SLOTS[key] = got
    return got


def _stacked_mixed_batch_forward(self, x, *args, adapter_names, **kwargs):
    """A LoRA layer's forward for a batch with one adapter per row (PEFT's `adapter_names`), computed as
    base(x) + bmm(bmm(x, A[slot]), B[slot]) over the layer's stacked adapters: the same handful of kernels whatever
    the number of adapters in the batch. PEFT's own _mixed_batch_forward loops over the batch's adapters (per
    adapter: index the sub-batch, A, B, scale, index-add), which at the server's batch sizes on a GPU is bound by
    kernel launches. Equal to PEFT's result within float rounding, and used only where it is: inference (no
    grad), the batch's adapters plain LoRA (no DoRA or other variant, no LoRA bias) with their dropout inactive, no
    variant arguments; otherwise PEFT's own method runs. The same function serves the bitsandbytes layers (not
    tested on CPU, where bitsandbytes 4-bit does not run)."""
    from peft.tuners.lora.layer import VARIANT_KWARG_KEYS

    def peft_forward():
        return type(self)._mixed_batch_forward(self, x, *args, adapter_names=adapter_names, **kwargs)

    if torch.is_grad_enabled() or any(kwargs.get(k) is not None for k in VARIANT_KWARG_KEYS):
        return peft_forward()
    st = _lora_stacks(self)
    rows = _row_slots(st.order, adapter_names, st.A.device if st.A is not None else None)
    if rows.used & st.skip or any(self.lora_dropout[n].training for n in rows.used & st.dropout):
        return peft_forward()
    for k in VARIANT_KWARG_KEYS:
        kwargs.pop(k, None)
    result = self.base_layer(x, *args, **kwargs)
    if rows.one == 0:  # every row on the base (or on adapters this layer does not have, or none stacked)
        return result
    h = x.to(st.A.dtype)
    if rows.one is not None:  # a batch of one adapter: no gather
        delta = (h @ st.A[rows.one]) @ st.B[rows.one]
    else:
        h3 = h.reshape(h.shape[0], -1, h.shape[-1])  # [batch, tokens, in]
        delta = torch.bmm(torch.bmm(h3, st.A[rows.slots]), st.B[rows.slots]).reshape(*h.shape[:-1], -1)
    return result + delta.to(result.dtype)


def stacked_lora_batches(model, on: bool = True) -> int:
    """Route the mixed-adapter batches (`adapter_names`) of every plain / bitsandbytes LoRA linear layer of `model`
    through _stacked_mixed_batch_forward (on) or back to PEFT's own method (off); returns the layers switched.
    Idempotent; call again after attaching an adapter (new LoRA layers: their stacks build on first use, and the
    existing layers rebuild theirs since their adapters changed). Stands in for: PEFT has no batched multi-LoRA
    kernel (punica / vLLM's BGMV); its _mixed_batch_forward is the per-layer method this replaces, per instance
    (an instance attribute, so other models in the process keep PEFT's)."""
    import types
    n, classes = 0, _lora_linear_classes()
    for m in model.modules():
        if isinstance(m, classes):
            if on:
                m._mixed_batch_forward = types.MethodType(_stacked_mixed_batch_forward, m)
            else:
                m.__dict__.pop("_mixed_batch_forward", None)
                m.__dict__.pop("_lora_stacks_cache", None)
            n += 1
    return n
