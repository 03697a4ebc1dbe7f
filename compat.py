"""Every use of a library's private internals, in one place (the pins in requirements.txt protect them today).

Each entry says what public API it stands in for and why none does the job. tests/test_compat.py fails, naming the
library and its version, when one of the private names below disappears: an upgrade starts here.

Import this module inside functions (it imports TRL and transformers, which take seconds).
"""
from __future__ import annotations

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
    "peft.tuners.lora.LoraModel._enable_peft_forward_hooks": "peft",
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


def score_every_position() -> None:
    """TRL's fused LM head over every position, the ignored ones masked afterwards (its static-shape path for
    compilers): no boolean indexing by the labels, which a CUDA graph cannot capture (speedups.GraphedStep), at the
    cost of scoring prompt positions too. Stands in for: no config option exists. Process-wide."""
    _trl_utils._use_triton = lambda device: False


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
    finally:
        for values in getattr(trainer, "_metrics", {}).get("train", {}).values():
            values.clear()
        if hasattr(trainer, "_total_train_tokens"):
            trainer._total_train_tokens = 0


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
