"""What sft_train.py, kd_train.py and dpo_train.py share: the training flags, the tokenised dataset, the TRL config,
the run-directory logs (metrics.jsonl, TensorBoard under logs/) and the final save (adapter, tokenizer, run.json)."""
from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from pathlib import Path

from cli import MODEL_SPEC, add_load_args, print_config
from common import encode_example, fsdp_enabled, is_main_process, world_size
from fileio import UserError, check_output_dir, note
from models import DEFAULT_STUDENT, local_model_path, portable_base
from precision import loaded_precision
from run_record import adapter_digests, commit_run_dir, final_save_dir, write_run_json


# transformers' names (OptimizerNames, SchedulerType); tests check the lists against the library's own.
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adafactor",
              "sgd", "adagrad", "rmsprop", "lion_8bit", "paged_lion_8bit", "ademamix", "schedule_free_adamw")
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay")
# --report_to: what transformers' own integrations log to; tensorboard writes <save_dir>/logs, offline.
REPORTERS = ("none", "tensorboard", "trackio", "mlflow", "wandb")
# mlflow-skinny is the client; its local store (./mlflow.db, used when MLFLOW_TRACKING_URI is unset) needs
# sqlalchemy and alembic (measured: mlflow-skinny 3.17 alone fails at the first log with KeyError 'sqlite').
PIP_NAMES = {"tensorboard": "tensorboard", "trackio": "trackio", "mlflow": "mlflow-skinny sqlalchemy alembic",
             "wandb": "wandb"}


def add_training_args(p: argparse.ArgumentParser, *, max_len: int = 1024, lr: float = 2e-4, epochs: float = 1.0,
                      batch: int = 1, accum: int = 8) -> None:
    """The README's trainer flags and the usual TrainingArguments, shared by the three trainers (each script passes
    its own defaults)."""
    g = p.add_argument_group("model")
    g.add_argument("--student", default=DEFAULT_STUDENT,
                   help=f"base model: {MODEL_SPEC}; a run dir continues its adapter")
    add_load_args(g, training=True)
    g.add_argument("--lora_r", type=int, default=16, help="LoRA rank")
    g.add_argument("--lora_alpha", type=int, default=32, help="LoRA alpha (the update is scaled by alpha / r)")
    g.add_argument("--lora_dropout", type=float, default=0.05, help="dropout on the LoRA input")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=float, default=epochs, help="passes over the data (ignored with --max_steps)")
    g.add_argument("--max_steps", type=int, default=-1, help="optimizer steps; overrides --epochs when > 0")
    g.add_argument("--per_device_train_batch_size", type=int, default=batch, help="micro-batch per device")
    g.add_argument("--gradient_accumulation_steps", type=int, default=accum,
                   help="micro-batches per optimizer step (effective batch = micro-batch x this x devices)")
    g.add_argument("--lr", type=float, default=lr, help="peak learning rate")
    g.add_argument("--lr_scheduler_type", default="linear", choices=SCHEDULERS, metavar="NAME",
                   help=f"learning-rate schedule after the warmup: {', '.join(SCHEDULERS)}")
    g.add_argument("--warmup_ratio", type=float, default=0.03, help="share of the steps spent warming up the rate")
    g.add_argument("--weight_decay", type=float, default=0.0,
                   help="decoupled weight decay of the optimizer (on the LoRA weights, the only ones trained)")
    g.add_argument("--optim", default="adamw_torch_fused", choices=OPTIMIZERS, metavar="NAME",
                   help=f"optimizer, transformers' names: {', '.join(OPTIMIZERS)}. paged_adamw_8bit keeps AdamW's state "
                        "in 8 bits and pages it to CPU memory under GPU memory pressure (bitsandbytes; unpaged on a CPU)")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="clip the gradient norm to this (0 = no clipping)")
    g.add_argument("--max_len", type=int, default=max_len, help="max tokens per example (prompt + answer)")
    g.add_argument("--seed", type=int, default=42, help="random seed (data order, LoRA init, --val_frac split)")
    g.add_argument("--gradient_checkpointing", default="auto", choices=["auto", "on", "off"],
                   help="auto: on with CUDA (memory), off on CPU (speed)")
    g.add_argument("--logging_steps", type=int, default=10, help="log loss every N optimizer steps")
    g.add_argument("--activation_offloading", action="store_true",
                   help="keep the checkpointed activations in CPU memory (longest sequences on an 8 GB card)")
    g.add_argument("--max_minutes", type=float, default=0,
                   help="stop after this many minutes of training and save the adapter as at the end; 0 = no limit")
    g.add_argument("--cuda_graphs", action="store_true",
                   help="CUDA, sft_train.py only: capture each micro-step (forward + backward) as a CUDA graph and "
                        "replay it, micro-batches padded to a multiple of --graph_bucket tokens; needs "
                        "--lora_dropout 0; mean_token_accuracy and entropy are not logged. On a CPU: trains eagerly")
    g.add_argument("--graph_bucket", type=int, default=64,
                   help="--cuda_graphs: pad each micro-batch to a multiple of this many tokens (one graph per "
                        "micro-batch size and length); 0 = pad to --max_len (one graph per micro-batch size)")
    g.add_argument("--padding_free", action="store_true",
                   help="sft_train.py only: each micro-batch's rows concatenated into one sequence with no padding "
                        "(TRL's padding_free; rows still attend only to themselves: position_ids restart per row and "
                        "transformers builds a block-diagonal causal mask, or flash-attention's varlen kernel when "
                        "the model loads with it); off by default until measured faster on a GPU (docs/training.md)")
    g.add_argument("--max_memory_gb", type=float, default=8,
                   help="CUDA: cap GPU memory to this and pick the largest micro-batch (dividing the effective batch) "
                        "that fits, raising gradient accumulation to keep the effective batch; 0 = off")
    g = p.add_argument_group("evaluation during training")
    g.add_argument("--eval_data", default=None,
                   help="held-out file in --data's format: its loss every --eval_steps (default: none)")
    g.add_argument("--val_frac", type=float, default=0,
                   help="hold out this share of --data (seeded by --seed) as the evaluation set instead; 0 = none")
    g.add_argument("--eval_steps", type=int, default=None,
                   help="evaluate every N optimizer steps (default: --save_steps)")
    g.add_argument("--load_best_model_at_end", action="store_true",
                   help="save the checkpoint with the lowest evaluation loss as the run's adapter, not the last")
    g.add_argument("--early_stopping_patience", type=int, default=0,
                   help="stop once the evaluation loss has not improved for N evaluations (turns on "
                        "--load_best_model_at_end); 0 = off")
    g = p.add_argument_group("output")
    g.add_argument("--save_dir", required=True, help="run directory: adapter, tokenizer, run.json, logs")
    g.add_argument("--save_steps", type=int, default=200, help="checkpoint every N steps (for --resume)")
    g.add_argument("--save_total_limit", type=int, default=2,
                   help="checkpoints kept (the oldest are deleted; the best is kept with --load_best_model_at_end)")
    g.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --save_dir")
    g.add_argument("--report_to", nargs="+", default=["tensorboard"], choices=REPORTERS, metavar="TRACKER",
                   help=f"where the training logs go besides metrics.jsonl: {', '.join(REPORTERS)} (several allowed; "
                        "tensorboard: <save_dir>/logs, offline)")


def check_training_args(args) -> None:
    """Combinations refused up front with one line, before any model is loaded."""
    from transformers.integrations import integration_utils as iu
    if args.eval_data and args.val_frac:
        raise UserError("give --eval_data or --val_frac, not both")
    if not 0 <= args.val_frac < 1:
        raise UserError(f"--val_frac must be in [0, 1), got {args.val_frac}")
    evaluating = bool(args.eval_data or args.val_frac)
    for flag, on in (("--load_best_model_at_end", args.load_best_model_at_end),
                     ("--early_stopping_patience", args.early_stopping_patience > 0),
                     ("--eval_steps", args.eval_steps is not None)):
        if on and not evaluating:
            raise UserError(f"{flag} needs an evaluation set: --eval_data FILE or --val_frac SHARE")
    if args.early_stopping_patience and not args.load_best_model_at_end:
        note("--early_stopping_patience turns on --load_best_model_at_end (the run keeps its best checkpoint)")
        args.load_best_model_at_end = True
    if args.load_best_model_at_end and args.save_steps % (args.eval_steps or args.save_steps):
        raise UserError(f"--load_best_model_at_end needs --save_steps ({args.save_steps}) to be a multiple of "
                        f"--eval_steps ({args.eval_steps}): only saved steps can be the best")
    if "none" in args.report_to and len(args.report_to) > 1:
        raise UserError(f"--report_to none goes alone (got {' '.join(args.report_to)})")
    available = {"tensorboard": iu.is_tensorboard_available, "trackio": iu.is_trackio_available,
                 "mlflow": iu.is_mlflow_available, "wandb": iu.is_wandb_available}
    for r in args.report_to:
        if r != "none" and not available[r]():
            raise UserError(f"--report_to {r}: the {r} package is not installed (pip install {PIP_NAMES[r]}, or "
                            "--report_to tensorboard / none)")
    import importlib.util
    import os
    if "mlflow" in args.report_to and not os.environ.get("MLFLOW_TRACKING_URI") and not (
            importlib.util.find_spec("sqlalchemy") and importlib.util.find_spec("alembic")):
        raise UserError("--report_to mlflow: without MLFLOW_TRACKING_URI (a server) MLflow logs into ./mlflow.db, "
                        "which needs sqlalchemy and alembic: pip install sqlalchemy alembic")


GRAPH_TRAINERS = ("sft_train",)  # --cuda_graphs: the trainers whose micro-step speedups.sft_micro_step reproduces


def only_in(trainers: tuple, title: str, flag: str, does: str) -> None:
    """Refuse `flag` in a trainer outside `trainers`, with one line."""
    if title not in trainers:
        raise UserError(f"{flag}: only {', '.join(t + '.py' for t in trainers)} {does} so far; run {title}.py "
                        "without it")


def check_cuda_graphs(title: str, args) -> None:
    """--cuda_graphs: what its captured micro-step cannot do, refused up front with one line."""
    if not getattr(args, "cuda_graphs", False):
        return
    only_in(GRAPH_TRAINERS, title, "--cuda_graphs", "runs its micro-step as a CUDA graph")
    if args.lora_dropout > 0:
        # A captured step replays the same kernels: dropout would need the CUDA generator's state registered with
        # the graph and gradient checkpointing's saved RNG state inside the capture; neither is verified on a GPU.
        raise UserError(f"--cuda_graphs needs --lora_dropout 0 (got {args.lora_dropout:g}): dropout inside a "
                        "captured step is not supported")
    if world_size() > 1:
        raise UserError("--cuda_graphs: one process only (DDP's and FSDP's gradient hooks are not captured)")
    if args.graph_bucket < 0:
        raise UserError(f"--graph_bucket must be >= 0, got {args.graph_bucket}")


PADDING_FREE_TRAINERS = ("sft_train",)  # --padding_free: the trainers whose collator and loss take a flattened batch


def check_padding_free(title: str, args) -> None:
    """--padding_free: refused for the trainers that cannot take it, with one line. KD: KDTrainer's teacher forward,
    cached teacher rows and cross-tokenizer pairs are laid out per padded row. DPO: TRL 1.16's DPOTrainer turns
    padding_free off itself ("temporarily unavailable after a refactor") and trains padded."""
    if getattr(args, "padding_free", False):
        only_in(PADDING_FREE_TRAINERS, title, "--padding_free", "trains on padding-free batches")


def cuda_graphs_on(args) -> bool:
    import torch
    return bool(getattr(args, "cuda_graphs", False)) and torch.cuda.is_available()


def held_out(args, rows: list, read) -> tuple[list, list | None]:
    """(training rows, evaluation rows or None): --eval_data read with `read` (as --data is read), or a --val_frac
    share of `rows` drawn with --seed (at least one row, and at least one left to train on)."""
    if args.eval_data:
        return rows, read(args.eval_data)
    if not args.val_frac:
        return rows, None
    import random
    n = min(len(rows) - 1, max(1, round(len(rows) * args.val_frac)))
    if n < 1:
        raise UserError(f"--val_frac {args.val_frac}: {args.data} has {len(rows)} row(s), none left to train on")
    held = set(random.Random(args.seed).sample(range(len(rows)), n))
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def eval_source(args) -> str:
    return args.eval_data or f"{args.data} (--val_frac {args.val_frac:g})"


def encode_counted(rows: list[dict], encode) -> tuple[list[dict], Counter]:
    """The examples of encode(row) -> (example or None, status) over `rows`, and how many rows got each status."""
    enc, counts = [], Counter()
    for r in rows:
        ex, status = encode(r)
        counts[status] += 1
        if ex is not None:
            enc.append(ex)
    return enc, counts


def encode_rows(tok, rows: list[dict], prompt_key: str, target_key: str, max_len: int, keep_whole: bool = False,
                source: str = "data"):
    """Tokenise (prompt, target) rows into a datasets.Dataset of input_ids/labels; count what max_len cut."""
    from datasets import Dataset

    enc, counts = encode_counted(rows, lambda r: encode_example(tok, r[prompt_key], r[target_key], max_len, keep_whole))
    if counts["truncated"]:
        note(f"{counts['truncated']} of {len(rows)} rows of {source} were longer than --max_len {max_len}: "
             "their answers are cut")
    if counts["too_long"]:
        note(f"{counts['too_long']} of {len(rows)} rows of {source} do not fit --max_len {max_len} whole: skipped")
    if not enc:
        raise UserError(f"{source}: no row fits --max_len {max_len}")
    return Dataset.from_list(enc), dict(counts)


def distributed_batch(args) -> dict:
    """Under `accelerate launch` with N processes, split the gradient accumulation over them so the effective
    batch (micro-batch x accumulation x processes), and so the learning-rate schedule, stay as configured."""
    n = world_size()
    accum = args.gradient_accumulation_steps
    if n > 1:
        if accum % n:
            note(f"--gradient_accumulation_steps {accum} is not a multiple of {n} processes: the effective batch "
                 f"becomes {args.per_device_train_batch_size * max(1, accum // n) * n}")
        accum = max(1, accum // n)
    return {"per_device_train_batch_size": args.per_device_train_batch_size, "gradient_accumulation_steps": accum}


def gradient_checkpointing_on(choice: str) -> bool:
    """--gradient_checkpointing: auto = on for CUDA (memory is what a GPU lacks), off on a CPU (time is)."""
    import torch
    return choice == "on" or (choice == "auto" and torch.cuda.is_available())


def trl_kwargs(args, save_dir: str) -> dict:
    """TrainingArguments shared by the TRL configs. The data is tokenised already (max_length=None). A partial
    namespace (bench.py's) takes the training flags' defaults for what it leaves out."""
    import torch
    p = argparse.ArgumentParser()
    add_training_args(p)
    args = argparse.Namespace(**{**vars(p.parse_args(["--save_dir", save_dir])), **vars(args)})
    cuda = torch.cuda.is_available()
    gc = gradient_checkpointing_on(args.gradient_checkpointing)
    evaluating = bool(args.eval_data or args.val_frac)
    graphs = cuda_graphs_on(args)
    # --cuda_graphs: the lengths must repeat for the captured graphs to replay (rows padded to a bucket; the padded
    # positions are masked and carry no loss), and gradient checkpointing need not save the RNG state (no dropout),
    # which reads the CUDA generator inside the capture
    graph_kw = {"pad_to_multiple_of": args.graph_bucket or args.max_len} if graphs else {}
    padding_free = bool(getattr(args, "padding_free", False))
    return dict(**distributed_batch(args),
        output_dir=save_dir, num_train_epochs=args.epochs, max_steps=args.max_steps,
        learning_rate=args.lr, lr_scheduler_type=args.lr_scheduler_type, warmup_steps=args.warmup_ratio,  # < 1: a share
        weight_decay=args.weight_decay, optim=args.optim, max_grad_norm=args.max_grad_norm,
        seed=args.seed, data_seed=args.seed,
        logging_steps=args.logging_steps, save_strategy="steps", save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        eval_strategy="steps" if evaluating else "no", eval_steps=args.eval_steps or args.save_steps,
        per_device_eval_batch_size=args.per_device_train_batch_size,
        prediction_loss_only=True,  # the loss is all we evaluate: never gather [rows, tokens, vocab] logits
        load_best_model_at_end=args.load_best_model_at_end, metric_for_best_model="eval_loss",
        greater_is_better=False,
        # TensorBoard is added by log_callbacks (it takes its directory only from an environment variable here)
        report_to=[r for r in args.report_to if r not in ("none", "tensorboard")] or "none",
        run_name=Path(save_dir).name, project="distill_slm",  # project: trackio's
        bf16=cuda and torch.cuda.is_bf16_supported(), fp16=False,
        gradient_checkpointing=gc,
        gradient_checkpointing_kwargs={"use_reentrant": False, **({"preserve_rng_state": False} if graphs else {})},
        # padding-free batches have no attention mask and no padding: "non_padding" would count input_ids != pad,
        # and pad is <|im_end|> for SmolLM2, which every row holds three times (each turn's end)
        include_num_input_tokens_seen="all" if padding_free else "non_padding", padding_free=padding_free,
        dataloader_num_workers=0, dataloader_pin_memory=cuda,
        max_length=None, use_cpu=not cuda,  # use_cpu: lets several CPU processes (torchrun, gloo) run as one job
        ddp_find_unused_parameters=False,  # every LoRA weight is used; True costs a graph traversal per backward
        # TRL offloads to CPU from CUDA; with --cuda_graphs the captured micro-step offloads (speedups.HiddenStateOffload)
        activation_offloading=cuda and getattr(args, "activation_offloading", False) and not graphs,
        **graph_kw,
    )


def trl_config(cls, kwargs: dict, **extra):
    """A TRL config (SFTConfig, DPOConfig). One process trains on one GPU, where device_map put the model: with
    several GPUs visible, Trainer would wrap it in nn.DataParallel, which TRL refuses (use accelerate launch)."""
    config = cls(**kwargs, **extra)
    if world_size() == 1 and config.n_gpu > 1:
        from compat import one_gpu_per_process
        one_gpu_per_process(config)
    return config


def log_callbacks(args) -> list:
    """metrics.jsonl (one line per log, appended across resumes); with --report_to tensorboard, transformers'
    TensorBoardCallback writing under <save_dir>/logs (given its writer: transformers 5 takes the directory only
    from the process-wide TENSORBOARD_LOGGING_DIR, else <save_dir>/runs/<date>_<host>); with
    --early_stopping_patience, transformers' EarlyStoppingCallback on the evaluation loss. The other --report_to
    trackers are transformers' own, through TrainingArguments.report_to (trl_kwargs)."""
    from transformers import EarlyStoppingCallback

    from callbacks import MetricsJsonl
    cbs = [MetricsJsonl(args.save_dir)]
    if getattr(args, "early_stopping_patience", 0):
        cbs.append(EarlyStoppingCallback(early_stopping_patience=args.early_stopping_patience))
    if is_main_process() and "tensorboard" in getattr(args, "report_to", ["tensorboard"]):
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback
        cbs.append(TensorBoardCallback(SummaryWriter(log_dir=str(Path(args.save_dir) / "logs"))))
    return cbs


def eval_metrics(state, args) -> dict:
    """run.json's evaluation figures: the last and the best evaluation loss, the step of the best, and whether early
    stopping ended the run. Empty without an evaluation set."""
    evals = [h for h in state.log_history if "eval_loss" in h]
    if not evals:
        return {}
    best = min(evals, key=lambda h: h["eval_loss"])
    patience = getattr(args, "early_stopping_patience", 0)
    return {"eval_loss": round(evals[-1]["eval_loss"], 6), "best_eval_loss": round(best["eval_loss"], 6),
            "best_eval_step": best["step"], "evaluations": len(evals),
            "stopped_early": bool(patience and 0 < state.global_step < state.max_steps
                                  and len(evals) > patience and evals[-1]["step"] == state.global_step)}


def _row_len(row: dict) -> int:
    return sum(len(v) for v in row.values() if isinstance(v, list))


def probe_step(trainer, rows: list[dict]) -> None:
    """One real training step (forward + backward, as configured: gradient checkpointing, autocast) on `rows`,
    before trainer.train(); gradients and the trainer's logged metrics are reset afterwards, so nothing of it trains
    or shows in the logs. fit_micro_batch measures its memory."""
    model = trainer.model
    model.train()
    if trainer.args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs)
    from compat import one_training_step
    try:
        one_training_step(trainer, rows)
    finally:
        model.zero_grad(set_to_none=True)


def fit_micro_batch(trainer, args) -> None:
    """--max_memory_gb on CUDA: cap the process to that much GPU memory (an 8 GB card on any GPU), then try
    micro-batches 1, 2, 4, ... (each dividing the effective batch) on the longest rows with a real training step, and
    keep the largest that fits with 10% headroom for the optimizer state. Why hand-written: Trainer's
    auto_find_batch_size only shrinks after an OOM and changes the effective batch."""
    import torch
    if not torch.cuda.is_available() or not getattr(args, "max_memory_gb", 0):
        return
    device = trainer.accelerator.device
    index = device.index if device.index is not None else torch.cuda.current_device()
    budget = args.max_memory_gb * 2**30
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget / torch.cuda.get_device_properties(index).total_memory),
                                               index)
    targs = trainer.args
    effective = targs.per_device_train_batch_size * targs.gradient_accumulation_steps  # per process
    ds = trainer.train_dataset
    longest = sorted(range(len(ds)), key=lambda i: -_row_len(ds[i]))[:effective]
    best, b = 0, 1
    while b <= min(effective, len(longest)) and effective % b == 0:
        try:
            torch.cuda.reset_peak_memory_stats()
            probe_step(trainer, [ds[i] for i in longest[:b]])
            fits = torch.cuda.max_memory_allocated() <= 0.9 * budget
        except torch.OutOfMemoryError:
            fits = False
        torch.cuda.empty_cache()
        if not fits:
            break
        best, b = b, b * 2
    if world_size() > 1:  # every rank must use the same micro-batch: the smallest that fits everywhere
        best = int(trainer.accelerator.gather(torch.tensor([best], device=device)).min())
    if best == 0:
        note(f"even a micro-batch of 1 on the longest rows does not fit --max_memory_gb {args.max_memory_gb}: "
             "lower --max_len, or raise --max_memory_gb if the card has more")
        return
    if best != targs.per_device_train_batch_size:
        note(f"--max_memory_gb {args.max_memory_gb}: micro-batch {best} x accumulation {effective // best} "
             f"instead of {targs.per_device_train_batch_size} x {targs.gradient_accumulation_steps} (same "
             "effective batch)")
    targs.per_device_train_batch_size = best
    targs.gradient_accumulation_steps = effective // best
    from compat import set_micro_batch
    set_micro_batch(trainer, best)


def keep_lora_fp32(model) -> None:
    """TRL casts trainable LoRA weights of a 4-bit model to bf16; keep them (and so AdamW's state) in fp32, where
    small updates are not rounded away. Under autocast the LoRA matmuls still run in bf16 (FIELD_NOTES)."""
    import torch
    if fsdp_enabled():  # FSDP flattens each wrapped unit into one tensor: its dtypes must agree (bf16, as TRL casts)
        return
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def resume_checkpoint(args) -> bool | None:
    if not args.resume:
        return None
    if not any(Path(args.save_dir).glob("checkpoint-*")):
        raise UserError(f"--resume: no checkpoint in {args.save_dir} to continue from")
    return True


def apply_speedups(trainer) -> tuple:
    """speedups.choose + apply on the trainer's model; says what runs."""
    import torch

    import speedups
    applied = speedups.apply(trainer.model, speedups.choose(torch.cuda.is_available()))
    if applied:
        print(f"speed-ups: {', '.join(applied)}")
    return applied


def note_padding_free(trainer) -> None:
    """--padding_free on sdpa or eager attention: say what it costs. transformers finds the rows from position_ids and
    masks attention across them (exact), but over the whole concatenated sequence: a micro-batch of B rows does about B
    times the padded batch's attention work. Only flash-attention's varlen kernel skips it (docs/training.md)."""
    implementation = getattr(trainer.model.config, "_attn_implementation", "sdpa")
    if getattr(trainer.args, "padding_free", False) and not str(implementation).startswith("flash_attention"):
        note(f"--padding_free with {implementation} attention: each micro-batch attends as one sequence under a "
             f"block-diagonal mask (exact, ~{trainer.args.per_device_train_batch_size}x the attention work of padded "
             "rows); it saves the padded tokens' MLP and projections only")


def prepare_trainer(trainer, args) -> tuple:
    """Everything a trainer needs before train(), in the trainers and bench.py alike: the answer-only LM head, fp32
    LoRA weights, the speed-ups (speedups.py), then --max_memory_gb's micro-batch (measured with the speed-ups on).
    Returns the speed-ups applied."""
    from compat import score_answer_tokens_only
    score_answer_tokens_only()
    keep_lora_fp32(trainer.model)
    note_padding_free(trainer)
    applied = apply_speedups(trainer)
    fit_micro_batch(trainer, args)
    if getattr(args, "cuda_graphs", False):  # after the memory probe, which runs the trainer's own (eager) step
        import speedups
        if speedups.use_cuda_graphs(trainer, offload=getattr(args, "activation_offloading", False)):
            applied += ("cuda_graphs",)
    return applied


def train_and_save(trainer, tok, args, *, script: str, method: str, base_model: str, data: str, started: float,
                   data_report: dict, extra_metrics: dict | None = None, extra: dict | None = None) -> dict:
    """Run the trainer (resuming when asked), save the adapter and tokenizer (rank 0), write run.json."""
    resume = resume_checkpoint(args)
    speedups = prepare_trainer(trainer, args)
    from callbacks import TimeLimit
    limit = TimeLimit(args.max_minutes) if getattr(args, "max_minutes", 0) > 0 else None
    if limit:
        trainer.add_callback(limit)
    result = trainer.train(resume_from_checkpoint=resume)
    if limit and limit.stopped:
        note(f"--max_minutes {args.max_minutes:g} reached: stopped at step {trainer.state.global_step} "
             f"of {trainer.state.max_steps}; the adapter is saved")
    state = trainer.state
    metrics = {
        "train_loss": round(result.training_loss, 6) if not math.isnan(result.training_loss) else None,
        "train_steps": state.global_step, "train_runtime_s": round(result.metrics.get("train_runtime", 0), 1),
        "tokens_seen": int(state.num_input_tokens_seen or 0),
        "tokens_per_s": round((state.num_input_tokens_seen or 0) / max(result.metrics.get("train_runtime", 1), 1e-9), 1),
        "final_loss": next((h["loss"] for h in reversed(state.log_history) if "loss" in h), None),
        "stopped_by_time_limit": bool(limit and limit.stopped), "data_rows": data_report,
        "speedups": list(speedups), **graph_metrics(trainer), **eval_metrics(state, args), **(extra_metrics or {}),
    }
    if trainer.is_world_process_zero():
        save_final(trainer, tok, args, base_model, lambda d, rec: write_run_json(
            d, script=script, method=method, args=args, base_model=base_model, data=data, metrics=metrics,
            started=started, extra={"world_size": world_size(), **rec, **(extra or {})}))
        print(json.dumps({"save_dir": args.save_dir, **{k: v for k, v in metrics.items() if k != "data_rows"}}))
    return metrics


def graph_metrics(trainer) -> dict:
    """run.json's record of --cuda_graphs (speedups.GraphedTrainingStep.record): the shapes captured, the GPU memory
    around each capture, and why the micro-steps went eager if a capture ran out of memory."""
    record = getattr(getattr(trainer, "training_step", None), "record", None)
    return record() if record else {}


def save_final(trainer, tok, args, base_model: str | None, write_record) -> None:
    """The final save, complete or absent: adapter and tokenizer go into a temporary folder inside --save_dir,
    adapter_config.json names a base another machine can resolve (the hub id, or smollm2-135m; run.json keeps the
    local path), run.json (written by write_record(folder, fields)) records the adapter weights' sha256, and
    run_record.commit_run_dir moves it all into place with run.json last. The loader refuses a run dir whose run.json is
    missing or does not match its weights."""
    from peft import PeftConfig

    tmp = final_save_dir(args.save_dir)
    trainer.save_model(str(tmp))  # PEFT: the adapter only, never the base weights
    tok.save_pretrained(str(tmp))
    cfg = PeftConfig.from_pretrained(str(tmp))
    local_base, portable = cfg.base_model_name_or_path, portable_base(base_model)
    if portable and portable != local_base:
        cfg.base_model_name_or_path = portable
        cfg.save_pretrained(str(tmp))
    write_record(tmp, {"base_model_path": local_model_path(local_base), "adapter_sha256": adapter_digests(tmp),
                       "base_precision": loaded_precision(trainer.model)})  # what inference's auto loads it on
    commit_run_dir(tmp, Path(args.save_dir))


def start(title: str, args) -> float:
    """Print the configuration, refuse bad flag combinations, and seed everything (LoRA init included) from --seed;
    returns the start time."""
    import os

    from transformers import set_seed
    # fewer out-of-memory stops near the --max_memory_gb cap: segments grow instead of fragmenting (before CUDA init)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    print_config(title, args)
    check_output_dir(args.save_dir)  # before any data or model loads
    resume_checkpoint(args)
    check_training_args(args)
    check_cuda_graphs(title, args)
    check_padding_free(title, args)
    set_seed(args.seed)
    return time.time()
