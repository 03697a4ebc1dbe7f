"""Measure memory and speed of the real training / scoring code paths on a model built from a config (no download).

    python bench.py --shape tiny --cases sft_baseline,sft,score --seq 128             # CPU smoke test
    python bench.py --seq 2048 --cases matmul,sft_baseline,sft,sft_auto,score          # Qwen2.5-3B shape, GPU
    python bench.py --seq 16384 --cases sft --cap_gb 8                                 # does it fit an 8 GB card?

Each case runs in its own process (clean peak-memory counters, its own memory cap) and prints one JSON line; the
parent prints one table: peak allocated/reserved GiB, tokens/s (examples/s for scoring), MFU against the measured
bf16 matmul ceiling (training FLOPs = 6 x parameters x tokens). `sft_baseline` is the plain recipe most users write
(PEFT prepare_model_for_kbit_training, the model's own full-vocabulary loss) measured side by side, and `unsloth` is
Unsloth on the same folder, shape, LoRA (r16 a32, all seven projections), sequence and micro-batch x accumulation
(`x unsloth` column). Unsloth pins older TRL/datasets, so it lives in its own folder, never in the project's venv:
    pip install --no-deps --target /tmp/unsloth_site unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 \\
        datasets==4.8.0 tyro docstring_parser typeguard shtab cut_cross_entropy torchao msgspec hf_transfer
    python bench.py --cases sft,unsloth --unsloth_site /tmp/unsloth_site --seq 2048 --batch 1 --accum 8
Cases: matmul, sft_baseline, sft, sft_auto (micro-batch picked by --max_memory_gb), sft_graph (sft with
--cuda_graphs; needs --lora_dropout 0), sft_graph_auto (at sft_auto's micro-batch), unsloth, unsloth_auto (its
largest micro-batch under --max_memory_gb, by the same rule), kd, dpo, score (label ranking: one forward per label per
example vs ours), codegen_batches (code generation's batches around one very long prompt, fixed vs ours). --kernels
picks our speed-ups (speedups.py) to measure each on its own. Constrained decoding has its own benchmark:
bench_idp.py.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import cli
import shapes
from shapes import CONFIGS

def parse_args(argv=None):
    p = cli.parser(__doc__)
    # model
    p.add_argument("--shape", default="qwen2.5-3b", help=f"architecture: {', '.join(CONFIGS)} or a config.json")
    p.add_argument("--model_cache", default=os.path.join(tempfile.gettempdir(), "distill_slm_bench"),
                   help="where the random-weight model is saved once and reused")
    p.add_argument("--tokenizer", default="smollm2-135m", help="tokenizer saved beside the random model")
    # run
    p.add_argument("--cases", default="matmul,sft_baseline,sft,sft_auto,score", help="comma-separated cases")
    p.add_argument("--seq", type=int, default=2048,
                   help="tokens per training sequence (codegen_batches: new tokens per answer)")
    p.add_argument("--batch", type=int, default=1, help="micro-batch")
    p.add_argument("--accum", type=int, default=4, help="gradient accumulation (tokens/step = seq x batch x accum)")
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps (after 1 warm-up step)")
    p.add_argument("--cap_gb", type=float, default=None, help="cap the process's GPU memory (e.g. 8)")
    p.add_argument("--max_memory_gb", type=float, default=8, help="budget for sft_auto's micro-batch choice")
    p.add_argument("--activation_offloading", action="store_true", help="trainer cases: activations on the CPU")
    p.add_argument("--kernels", default=None,
                   help="our cases' speed-ups (speedups.py): auto (the trainers' default), none, or a list such as "
                        "liger,compile,tiled_mlp")
    p.add_argument("--lora_dropout", type=float, default=0.05, help="our cases' LoRA dropout (README: 0.05)")
    p.add_argument("--unsloth_site", default=os.environ.get("UNSLOTH_SITE"),
                   help="folder Unsloth was pip-installed into with --target (unsloth cases; default $UNSLOTH_SITE)")
    p.add_argument("--score_examples", type=int, default=64,
                   help="examples for the score case (prompts for codegen_batches)")
    p.add_argument("--top_k", type=int, default=64, help="kd_cached: teacher log-probabilities cached per token")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="trainer cases: profile the last optimizer step (torch.profiler) into DIR/prof_<case>.txt: "
                        "GPU busy time against wall time, kernels by kind, the top ops")
    # output
    p.add_argument("--memory_history", default=None, metavar="DIR",
                   help="record each case's GPU allocations (torch.cuda.memory._record_memory_history): "
                        "DIR/mem_<case>.txt lists what was alive at the peak (and at an out-of-memory error), "
                        "grouped by where it was allocated; DIR/mem_<case>.pickle opens in pytorch.org/memory_viz. Slows "
                        "the case: its tokens/s do not count")
    p.add_argument("--out", default=None, help="also write the rows here (.json: a list; .jsonl: appended)")
    p.add_argument("--table", nargs="+", default=None, help="only print the table of rows saved by earlier --out")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one case in this process
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------
# helpers

def model_dir(args) -> Path:
    return shapes.random_model_dir(args.shape, args.model_cache, args.tokenizer)


def n_params(model) -> int:
    return sum(p.numel() * (2 if p.__class__.__name__ == "Params4bit" else 1) for p in model.parameters())


def synthetic_rows(seq: int, n: int, vocab: int, seed: int = 0) -> list[dict]:
    """Token sequences with the loss on every token but the first: the baseline's own loss sees the same."""
    import torch
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, vocab, (n, seq), generator=g).tolist()
    return [{"input_ids": x, "labels": [-100] + x[1:]} for x in ids]


def cap(args):
    import torch
    if args.cap_gb and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gb * 2**30 / total))


def mem() -> dict:
    import torch
    if not torch.cuda.is_available():
        import resource
        return {"peak_alloc_gib": None, "peak_reserved_gib": None,
                "cpu_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    return {"peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2)}


def sync():
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


# first match wins: Inductor names a kernel after the ops it fuses (triton_red_fused_..._gemm_4bit_...), and flash
# attention's templates name cutlass
KERNEL_KINDS = (("compiled (triton)", ("triton",)), ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
                ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "wgmma", "cublas", "splitk")),
                ("4-bit dequantise", ("dequant",)), ("copy / memset", ("memcpy", "memset")),
                ("reductions / softmax", ("reduce", "softmax", "logsumexp", "norm")))


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "elementwise / other")


def profile_report(prof, wall: float, title: str) -> tuple[dict, str]:
    """The profiled step: GPU busy seconds (kernel time summed) against wall time, kernel time by kind, the top ops
    by device and by CPU time. Returns (row fields, text)."""
    from torch.autograd import DeviceType
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    kinds: dict[str, list] = {}
    for e in kernels:
        k = kinds.setdefault(kernel_kind(e.name), [0.0, 0])
        k[0] += e.time_range.elapsed_us() / 1e6
        k[1] += 1
    busy = sum(v[0] for v in kinds.values())
    lines = [f"{title}: wall {wall:.3f} s, GPU busy {busy:.3f} s ({busy / wall:.0%}), {len(kernels)} kernels", "",
             f"{'kernel kind':<24}{'seconds':>9}{'share':>7}{'kernels':>9}"]
    for kind, (sec, n) in sorted(kinds.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"{kind:<24}{sec:>9.3f}{sec / max(busy, 1e-9):>7.0%}{n:>9}")
    ka = prof.key_averages()
    for key in ("self_device_time_total", "self_cpu_time_total"):
        try:
            lines += ["", ka.table(sort_by=key, row_limit=25, max_name_column_width=70)]
        except Exception as e:  # a sort key this torch does not know
            lines += ["", f"({key}: {e})"]
    return ({"prof_wall_s": round(wall, 3), "gpu_busy_s": round(busy, 3), "gpu_busy": round(busy / wall, 3),
             "kernels_per_step": len(kernels), "by_kind": {k: round(v[0], 4) for k, v in kinds.items()}},
            "\n".join(lines))


def save_profile(args, prof, wall: float) -> dict:
    fields, text = profile_report(prof, wall, f"{args.one}, seq {args.seq}, one optimizer step")
    Path(args.profile).mkdir(parents=True, exist_ok=True)
    (Path(args.profile) / f"prof_{args.one}.txt").write_text(text + "\n")
    print(text, file=sys.stderr)
    return fields


TORCH_FRAMES = ("/torch/", "<frozen", "/contextlib.py", "/functools.py", "/threading.py")


def alloc_site(frames: list[dict]) -> str:
    """Where a block was allocated: the innermost Python frame outside torch itself (a model, PEFT, TRL, ours)."""
    f = next((f for f in frames if not any(t in f.get("filename", "") for t in TORCH_FRAMES)), None)
    if f is None:
        return "(torch internals)" if frames else "(no stack: allocated before recording)"
    parts = f["filename"].split("/")
    return f"{'/'.join(parts[-2:])}:{f.get('line', '?')} {f.get('name', '')}"


def live_at_peak(snapshot: dict, device: int = 0) -> tuple[int, list[dict]]:
    """Replay a memory snapshot's allocator trace (torch.cuda.memory._snapshot() after _record_memory_history):
    (peak bytes allocated within the trace, the blocks alive at that peak: {size, frames}). Blocks allocated before
    the trace's window (a ring buffer) count as alive from its start: those freed in the window, from their free
    event, and those still alive at the snapshot, from its segments."""
    trace = snapshot.get("device_traces", [[]])[device]
    allocated_in_window, pre = set(), {}
    for ev in trace:
        a = ev["action"]
        if a == "alloc":
            allocated_in_window.add(ev["addr"])
        elif a in ("free_requested", "free_completed") and ev["addr"] not in allocated_in_window:
            pre.setdefault(ev["addr"], {"size": ev["size"], "frames": ev.get("frames", [])})
    for seg in snapshot.get("segments", []):
        if seg.get("device", device) != device:
            continue
        addr = seg["address"]
        for b in seg["blocks"]:
            if b["state"] == "active_allocated" and addr not in allocated_in_window:
                pre.setdefault(addr, {"size": b["size"], "frames": b.get("frames", [])})
            addr += b["size"]
    live = dict(pre)
    total = peak = sum(b["size"] for b in live.values())
    peak_at = -1
    for i, ev in enumerate(trace):
        if ev["action"] == "alloc":
            live[ev["addr"]] = {"size": ev["size"], "frames": ev.get("frames", [])}
            total += ev["size"]
            if total > peak:
                peak, peak_at = total, i
        elif ev["action"] in ("free_requested", "free_completed") and ev["addr"] in live:
            total -= live.pop(ev["addr"])["size"]
    live = dict(pre)
    for ev in trace[:peak_at + 1]:
        if ev["action"] == "alloc":
            live[ev["addr"]] = {"size": ev["size"], "frames": ev.get("frames", [])}
        elif ev["action"] in ("free_requested", "free_completed"):
            live.pop(ev["addr"], None)
    return peak, list(live.values())


def live_now(snapshot: dict) -> list[dict]:
    """The blocks alive when the snapshot was taken (an out-of-memory error: what filled the GPU), with their
    memory pool: CUDA graphs' private pools are not (0, 0)."""
    return [{"size": b["size"], "frames": b.get("frames", []), "pool": tuple(seg.get("segment_pool_id", (0, 0)))}
            for seg in snapshot.get("segments", []) for b in seg["blocks"] if b["state"] == "active_allocated"]


def memory_table(blocks: list[dict], title: str, rows: int = 20) -> str:
    """GiB and block counts by allocation site (and pool, where known), largest first."""
    by: dict[tuple, list] = {}
    for b in blocks:
        pool = b.get("pool")
        key = (alloc_site(b["frames"]), "" if pool is None else ("default" if tuple(pool) == (0, 0) else "graph"))
        by.setdefault(key, [0, 0])
        by[key][0] += b["size"]
        by[key][1] += 1
    total = sum(v[0] for v in by.values())
    lines = [f"{title}: {total / 2**30:.3f} GiB in {len(blocks)} blocks", f"{'GiB':>8}{'blocks':>8}  pool     site"]
    for (site, pool), (size, n) in sorted(by.items(), key=lambda kv: -kv[1][0])[:rows]:
        lines.append(f"{size / 2**30:>8.3f}{n:>8}  {pool or '-':<8} {site}")
    return "\n".join(lines)


def record_memory(args) -> None:
    """--memory_history: record allocations from here on, and on an out-of-memory error write what was alive."""
    import torch
    if not (args.memory_history and torch.cuda.is_available()):
        return
    Path(args.memory_history).mkdir(parents=True, exist_ok=True)
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")

    def on_oom(device, alloc, device_alloc, device_free):
        text = memory_table(live_now(torch.cuda.memory._snapshot()),
                            f"{args.one}: alive at the out-of-memory error (asked for {alloc / 2**20:.0f} MiB)")
        (Path(args.memory_history) / f"mem_{args.one}_oom.txt").write_text(text + "\n")
        print(text, file=sys.stderr, flush=True)

    torch._C._cuda_attach_out_of_memory_observer(on_oom)


def save_memory(args) -> dict:
    """--memory_history: what was alive at the case's peak, by allocation site (mem_<case>.txt, and the pickle)."""
    import pickle
    import torch
    if not (args.memory_history and torch.cuda.is_available()):
        return {}
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    d = Path(args.memory_history)
    with open(d / f"mem_{args.one}.pickle", "wb") as f:
        pickle.dump(snap, f)
    peak, blocks = live_at_peak(snap, torch.cuda.current_device())
    text = memory_table(blocks, f"{args.one}, seq {args.seq}: alive at the peak ({peak / 2**30:.3f} GiB)")
    (d / f"mem_{args.one}.txt").write_text(text + "\n")
    print(text, file=sys.stderr, flush=True)
    return {"memory_history": str(d / f"mem_{args.one}.txt")}


def trainer_args(args, save_dir, batch, accum, untimed: int = 1, cuda_graphs: bool = False):
    """The trainers' TrainingArguments for a case: `untimed` warm-up steps, then --steps timed ones (and the profiled
    one). cuda_graphs: as --cuda_graphs sets them (rows padded to --graph_bucket, no RNG state saved by gradient
    checkpointing), the step itself installed by _train_timed."""
    from training import trl_kwargs
    ns = argparse.Namespace(epochs=1, max_steps=args.steps + untimed + bool(args.profile),
                            per_device_train_batch_size=batch,
                            gradient_accumulation_steps=accum, lr=1e-4, seed=0, gradient_checkpointing="auto",
                            activation_offloading=args.activation_offloading,
                            logging_steps=1000, save_steps=10**6, max_memory_gb=None, resume=False)
    kw = trl_kwargs(argparse.Namespace(**vars(ns), cuda_graphs=cuda_graphs), save_dir)
    kw.update(save_strategy="no", report_to="none", disable_tqdm=True)
    return ns, kw


# ----------------------------------------------------------------------------------------------------------------
# cases: each returns a dict row

def case_matmul(args):
    import torch
    if not torch.cuda.is_available():
        n, dtype, dev = 1024, torch.float32, "cpu"
    else:
        n, dtype, dev = 8192, torch.bfloat16, "cuda"
    a, b = torch.randn(n, n, dtype=dtype, device=dev), torch.randn(n, n, dtype=dtype, device=dev)
    for _ in range(3):
        a @ b
    sync()
    t, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ b
    sync()
    tflops = 2 * n**3 * reps / (time.perf_counter() - t) / 1e12
    return {"tflops_ceiling": round(tflops, 2)}


def case_sft_baseline(args):
    """The plain recipe: 4-bit load, PEFT prepare_model_for_kbit_training (fp32 upcast), the model's own loss."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    import common
    path = model_dir(args)
    cuda = torch.cuda.is_available()
    kw = {"quantization_config": common.bnb_config(), "device_map": {"": 0}} if cuda else {"dtype": torch.float32}
    model = AutoModelForCausalLM.from_pretrained(path, **kw)
    if cuda:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=args.lora_dropout, task_type="CAUSAL_LM",
                                             target_modules=common.LORA_TARGETS))
    if cuda:
        model.config.use_cache = False
    model.train()  # as Trainer does: gradient checkpointing and dropout only act in training mode
    return _plain_loop(model, args, args.batch, args.accum)


def _plain_loop(model, args, batch, accum) -> dict:
    """A plain AdamW loop over synthetic rows (labels = inputs, the model's own loss), as a user writes it; with
    --profile one more step, profiled and not timed."""
    import torch
    cuda = torch.cuda.is_available()
    params = n_params(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rows = synthetic_rows(args.seq, batch * accum, model.config.vocab_size)
    device = next(model.parameters()).device

    def step():
        for m in range(accum):
            x = ids[m * batch:(m + 1) * batch]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = model(input_ids=x, labels=x).loss / accum
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()

    ids = torch.tensor([r["input_ids"] for r in rows], device=device)
    times = []
    for _ in range(args.steps + 1):
        step()
        times.append(time.perf_counter())
    s = (times[-1] - times[0]) / args.steps
    prof = {}
    if args.profile:
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=acts) as p:
            t = time.perf_counter()
            step()
            wall = time.perf_counter() - t
        prof = save_profile(args, p, wall)
    return {"tokens_per_s": round(args.seq * batch * accum / s, 1), "params": params, "batch": batch,
            "accum": accum, **mem(), **prof}


UNSLOTH_INSTALL = ("pip install --no-deps --target /tmp/unsloth_site unsloth==2026.10.9 unsloth_zoo==2026.10.9 "
                   "trl==1.15.0 datasets==4.8.0 tyro docstring_parser typeguard shtab cut_cross_entropy torchao "
                   "msgspec hf_transfer, then --unsloth_site /tmp/unsloth_site")


def _unsloth_model(args):
    """Unsloth's own recipe: FastLanguageModel 4-bit, LoRA r16 a32 on the seven projections, dropout 0 (its fast
    path), its offloaded gradient checkpointing. Imported first, as Unsloth asks (it patches transformers)."""
    try:
        import unsloth  # noqa: F401  (first: it patches transformers, peft and trl when imported)
    except ImportError as e:
        raise RuntimeError(f"Unsloth is not installed ({e}); {UNSLOTH_INSTALL}") from None
    import torch
    from unsloth import FastLanguageModel

    import common
    model, _ = FastLanguageModel.from_pretrained(model_name=str(model_dir(args)), max_seq_length=args.seq,
                                                 dtype=torch.bfloat16, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0, bias="none",
                                             target_modules=list(common.LORA_TARGETS),
                                             use_gradient_checkpointing="unsloth", random_state=0)
    FastLanguageModel.for_training(model)
    return model


def _unsloth_micro_batch(model, args, effective: int) -> int:
    """The largest micro-batch (1, 2, 4, ... dividing `effective`) whose real step fits 90% of --max_memory_gb:
    the rule fit_micro_batch applies to ours."""
    import torch
    budget = args.max_memory_gb * 2**30
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget / torch.cuda.get_device_properties(0).total_memory))
    x = torch.tensor([r["input_ids"] for r in synthetic_rows(args.seq, effective, model.config.vocab_size)],
                     device=next(model.parameters()).device)
    best, b = 0, 1
    while b <= effective and effective % b == 0:
        try:
            torch.cuda.reset_peak_memory_stats()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                model(input_ids=x[:b], labels=x[:b]).loss.backward()
            fits = torch.cuda.max_memory_allocated() <= 0.9 * budget
        except torch.OutOfMemoryError:
            fits = False
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        if not fits:
            break
        best, b = b, b * 2
    return max(best, 1)


def case_unsloth(args):
    """Unsloth (see _unsloth_model) in a plain AdamW loop at --batch x --accum."""
    return {**_plain_loop(_unsloth_model(args), args, args.batch, args.accum), **_unsloth_version()}


def case_unsloth_auto(args):
    """Unsloth at its largest micro-batch under --max_memory_gb (same effective batch), as sft_auto picks ours."""
    model = _unsloth_model(args)
    effective = args.batch * args.accum
    b = _unsloth_micro_batch(model, args, effective)
    return {**_plain_loop(model, args, b, effective // b), **_unsloth_version()}


def _unsloth_version() -> dict:
    from importlib.metadata import version
    return {"unsloth": version("unsloth")}


def _our_sft(args, batch, accum, auto, graphs: bool | None = None):
    """Our SFT through sft_train.py's trainer (SFTTrainer, prepare_trainer's speed-ups). graphs: its micro-steps as
    --cuda_graphs runs them, captured (True) or the same step eagerly (False); None: the trainer's own step."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    import common
    import speedups
    from training import trl_config
    path = model_dir(args)
    model, tok, _ = common.load_student(str(path), lora_dropout=args.lora_dropout)
    params = n_params(model)
    # with graphs, the steps whose micro-steps are the eager warm-ups and the capture stay untimed (auto: as many as
    # the smallest accumulation it may pick, 1, needs)
    untimed = -(-(speedups.GRAPH_WARMUP + 1) // (1 if auto else accum)) if graphs else 1
    ns, kw = trainer_args(args, tempfile.mkdtemp(), batch, accum, untimed=untimed, cuda_graphs=graphs is not None)
    batch, accum = kw["per_device_train_batch_size"], kw["gradient_accumulation_steps"]  # per process
    ds = Dataset.from_list(synthetic_rows(args.seq, batch * accum * common.world_size() * (ns.max_steps + 1),
                                          model.config.vocab_size))
    trainer = SFTTrainer(model=model, args=trl_config(SFTConfig, kw), train_dataset=ds, processing_class=tok)
    if auto:
        ns.max_memory_gb = args.max_memory_gb
    s, kernels, prof = _train_timed(trainer, ns, args, untimed=untimed, graphs=graphs)
    batch, accum = trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps
    world = common.world_size()  # under accelerate launch: tokens of every process per optimizer step
    row = {"tokens_per_s": round(args.seq * batch * accum * world / s, 1), "params": params, "batch": batch,
           "accum": accum, "gpus": world, "kernels": list(kernels), "lora_dropout": args.lora_dropout, **mem(),
           **prof}
    if graphs:
        row.update(_graph_check(trainer, ds, batch))
    return row


def _graph_check(trainer, ds, batch: int) -> dict:
    """The captures' memory, and one micro-batch's loss and LoRA gradients replayed against the same micro-step run
    eagerly (same batch, same divisor)."""
    import torch

    from compat import prepare_inputs
    step = trainer.training_step  # speedups.GraphedTrainingStep
    if step.graphed is None:  # a capture ran out of memory: the step went eager (give_up_graphs)
        return {"graph_captured": False, **step.record()}
    model = trainer.model.train()
    lora = [p for p in model.parameters() if p.requires_grad]
    inputs = prepare_inputs(trainer, trainer.data_collator([ds[i] for i in range(batch)]))
    tensors = step.tensors(inputs, (inputs["labels"][:, 1:] != -100).sum())
    model.zero_grad()  # keeps the tensors (speedups.keep_grads)
    captured = {"graph_captured": bool(step.graphed.captures), "graph_captures": step.graphed.captures}
    try:
        eager = step.micro(**tensors)
    except torch.OutOfMemoryError:  # the eager step beside the graphs' pool (32k under 8 GiB): the timed row stands
        model.zero_grad()
        torch.cuda.empty_cache()
        return {**captured, "graph_check": "not run: the eager micro-step ran out of memory beside the graphs' pool"}
    g_eager = [p.grad.clone() for p in lora]
    model.zero_grad()
    graphed = step.graphed(**tensors).clone()
    dg = max(float((p.grad - g).abs().max() / g.abs().max().clamp(min=1e-12)) for p, g in zip(lora, g_eager))
    model.zero_grad()
    return {"loss_eager": float(eager), "loss_graph": float(graphed), "grad_max_rel_diff": round(dg, 6), **captured}


def case_sft_graph(args):
    """`sft` with --cuda_graphs: the trainer path whose micro-steps are CUDA graphs (speedups.use_cuda_graphs), with
    one micro-batch's loss and LoRA gradients compared, graph against eager. BENCH_GRAPH=0 runs the same micro-step
    eagerly (so the graphs' gain is told apart from the step's own changes: every position scored, a ready 4-D mask,
    no TRL accuracy/entropy metrics); on a CPU it always runs eagerly."""
    import torch
    graphs = os.environ.get("BENCH_GRAPH", "1") == "1" and torch.cuda.is_available()
    return _our_sft(args, args.batch, args.accum, auto=False, graphs=graphs)


def case_sft_graph_auto(args):
    """sft_graph at the micro-batch --max_memory_gb picks, as sft_train.py --cuda_graphs --max_memory_gb does."""
    import torch
    return _our_sft(args, args.batch, args.accum, auto=True, graphs=torch.cuda.is_available())


def case_sft(args):
    return _our_sft(args, args.batch, args.accum, auto=False)


def case_sft_auto(args):
    return _our_sft(args, args.batch, args.accum, auto=True)


def _train_timed(trainer, ns, args, untimed: int = 1, graphs: bool | None = None) -> tuple[float, tuple, dict]:
    """prepare_trainer (as the trainers run: speed-ups, fp32 LoRA; graphs: the --cuda_graphs micro-step, captured or
    eager), then seconds per optimizer step after `untimed` warm-up steps, and with --profile the last step profiled
    (not timed) and its report's fields."""
    import torch

    import speedups
    from training import prepare_trainer
    from callbacks import ProfileStep, StepTimes
    timer = StepTimes(sync)
    trainer.add_callback(timer)
    prof = ProfileStep(trainer.args.max_steps - 1, sync) if args.profile else None
    if prof:
        trainer.add_callback(prof)
    kernels = prepare_trainer(trainer, ns)
    if graphs is not None and speedups.use_cuda_graphs(trainer, capture=graphs, offload=args.activation_offloading):
        kernels += ("cuda_graphs",) if graphs else ("graph_step_eager",)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    fields = save_profile(args, prof.prof, prof.wall) if prof and prof.wall else {}
    return timer.seconds_per_step(skip_last=bool(prof), untimed=untimed), kernels, fields


KD_FLAGS = dict(kd_loss="forward_kl", jsd_beta=0.5, temperature=1.0, alpha=0.5, lmbda=0.0, max_new_tokens=1)


def _kd_timed(trainer, ns, args, params: int, **extra) -> dict:
    """The kd cases' row: seconds per optimizer step of `trainer` (_train_timed) as tokens/s, with the memory."""
    s, kernels, prof = _train_timed(trainer, ns, args)
    return {"tokens_per_s": round(args.seq * args.batch * args.accum / s, 1), "params": params,
            "batch": args.batch, "accum": args.accum, "kernels": list(kernels), "lora_dropout": args.lora_dropout,
            **extra, **mem(), **prof}


def case_kd(args, full_logits=False):
    """Logit KD (forward KL, alpha 0.5) with the model as both the 4-bit student (fresh LoRA) and a second, frozen
    4-bit teacher, on synthetic rows (loss on every token: the largest KD workload for --seq), through kd_train.py's
    trainer. `params` counts the student plus a third of the teacher (training is 6 FLOPs per parameter and token,
    the teacher's forward 2), so MFU stays honest."""
    from datasets import Dataset
    from trl import SFTConfig

    import common
    from kd_losses import check_vocab
    from kd_trainer import build_trainer
    from training import trl_config
    path = model_dir(args)
    model, tok, _ = common.load_student(str(path), lora_dropout=args.lora_dropout)
    teacher, ttok, _ = common.load_model(str(path), quantize="4bit" if _cuda() else "auto")
    vocab = check_vocab(tok, ttok, model, teacher)
    ns, kw = trainer_args(args, tempfile.mkdtemp(), args.batch, args.accum)
    rows = synthetic_rows(args.seq, args.batch * args.accum * (args.steps + 1), model.config.vocab_size)
    trainer = build_trainer(argparse.Namespace(**vars(ns), **KD_FLAGS), model, tok, Dataset.from_list(rows),
                            teacher=teacher, vocab=vocab, callbacks=[], config=trl_config(SFTConfig, kw),
                            full_logits=full_logits)
    return _kd_timed(trainer, ns, args, n_params(trainer.model) + n_params(teacher) // 3)


def case_kd_cached(args):
    """case_kd's KD from the teacher's cached top-k (kd_cache.py, --top_k) instead of the live teacher: the cache is
    written first by the 4-bit teacher (kd_cache.write_shards, as teacher_cache.py does), the teacher is freed, and
    the timed steps and peak memory are the student's alone (forward KL over the top k and a tail bucket)."""
    import gc

    import torch
    from datasets import Dataset
    from trl import SFTConfig

    import common
    import kd_cache
    from kd_trainer import build_trainer
    from training import trl_config
    path = model_dir(args)
    teacher, tok, _ = common.load_model(str(path), quantize="4bit" if _cuda() else "auto")
    rows = synthetic_rows(args.seq, args.batch * args.accum * (args.steps + 1), teacher.config.vocab_size)
    dataset = Dataset.from_list(rows)
    out = Path(tempfile.mkdtemp()) / "cache"
    out.mkdir()
    kd_cache.write_shards(teacher, tok, dataset, out, top_k=args.top_k, temperature=KD_FLAGS["temperature"],
                          shard_rows=len(rows), batch_size=1)
    kd_cache.finish(out, {"teacher": str(path), "rows": len(rows), "shard_rows": len(rows), "top_k": args.top_k})
    cache_bytes = sum(p.stat().st_size for p in out.glob("shard-*.npz"))
    del teacher
    gc.collect()
    if _cuda():
        torch.cuda.empty_cache()
    model, tok, _ = common.load_student(str(path), lora_dropout=args.lora_dropout)
    ns, kw = trainer_args(args, tempfile.mkdtemp(), args.batch, args.accum)
    trainer = build_trainer(argparse.Namespace(**vars(ns), **KD_FLAGS), model, tok,
                            dataset.add_column("kd_row", list(range(len(rows)))), cache=kd_cache.TeacherCache(out),
                            callbacks=[], config=trl_config(SFTConfig, {**kw, "remove_unused_columns": False}))
    return _kd_timed(trainer, ns, args, n_params(trainer.model), top_k=args.top_k,
                     cache_bytes_per_token=round(cache_bytes / (len(rows) * (args.seq - 1)), 1))


def case_dpo(args):
    """DPO on random pairs whose chosen and rejected are --seq tokens each (half prompt, half answer), fresh LoRA,
    reference = adapter disabled, through dpo_train.py's trainer. tokens_per_s counts the policy's tokens (chosen and
    rejected), the sft case's unit; pairs_per_s is the preference throughput."""
    import torch
    from datasets import Dataset
    from trl import DPOConfig

    import common
    from dpo_trainer import build_trainer
    from training import trl_config
    model, tok, _ = common.load_student(str(model_dir(args)), gradient_checkpointing=torch.cuda.is_available(),
                                        attach_lora=False)
    peft_config = common.lora_config(model, dropout=args.lora_dropout)
    ns, kw = trainer_args(args, tempfile.mkdtemp(), args.batch, args.accum)
    n, half = args.batch * args.accum * (args.steps + 1), args.seq // 2
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, model.config.vocab_size, (n, 3, args.seq - half), generator=g).tolist()
    dataset = Dataset.from_list([{"prompt_ids": x[0][:half], "chosen_ids": x[1], "rejected_ids": x[2]} for x in ids])
    trainer = build_trainer(ns, model, tok, dataset, peft_config, callbacks=[],
                            config=trl_config(DPOConfig, kw, beta=0.1))
    params = n_params(trainer.model)
    s, kernels, prof = _train_timed(trainer, ns, args)
    return {"tokens_per_s": round(2 * args.seq * args.batch * args.accum / s, 1),
            "pairs_per_s": round(args.batch * args.accum / s, 3), "params": params, "batch": args.batch,
            "accum": args.accum, "kernels": list(kernels), "lora_dropout": args.lora_dropout, **mem(), **prof}


def case_score(args):
    """Label ranking on CreditMix-like prompts: one forward per label per example vs our KV-shared batches."""
    import numpy as np

    import common
    import creditmix as cm
    import scoring
    model, tok, _ = common.load_model(str(model_dir(args)), quantize="4bit" if _cuda() else "auto")
    rng = np.random.default_rng(0)
    prompts = [common.chat_prompt(tok, cm.prompt_for(f"Age: {rng.integers(18, 80)}, Outstanding Debt: "
                                                       f"{rng.uniform(0, 5000):.2f}, Occupation: Teacher"))
               for _ in range(args.score_examples)]
    n_naive = max(4, args.score_examples // 4)
    scoring.naive_label_scores(model, tok, prompts[:2], cm.LABELS)  # warm-up
    sync()
    t = time.perf_counter()
    naive = scoring.naive_label_scores(model, tok, prompts[:n_naive], cm.LABELS)
    sync()
    naive_rate = n_naive / (time.perf_counter() - t)
    scoring.raw_label_scores(model, tok, prompts[:4], cm.LABELS)
    sync()
    t = time.perf_counter()
    fast = scoring.raw_label_scores(model, tok, prompts, cm.LABELS, batch_size=32)
    sync()
    rate = len(prompts) / (time.perf_counter() - t)
    # bf16 / 4-bit on a GPU: padded batches and one-by-one forwards differ in rounding, which could flip a near-tie,
    # so say how many agree, by how much the scores differ and how close the closest call was
    agree = (naive.argmax(1) == fast[:n_naive].argmax(1))
    top2 = np.sort(naive, 1)[:, -2:]
    return {"examples_per_s": round(rate, 1), "naive_examples_per_s": round(naive_rate, 2),
            "speedup": round(rate / naive_rate, 1), "same_predictions": bool(agree.all()),
            "agree": f"{int(agree.sum())}/{n_naive}", "max_abs_diff": float(np.abs(naive - fast[:n_naive]).max()),
            "min_top2_margin": float((top2[:, 1] - top2[:, 0]).min()), **mem()}


def case_codegen_batches(args):
    """codegen.generate's batches on MBPP-test-like prompt lengths: --score_examples prompts of ~60-180 tokens and one
    about 25x longer (MBPP's test split: median 139, one of 3,754), greedy for --seq new tokens, all asked in one
    call: fixed batches (every row padded to the longest) against length_batches (the long prompt alone)."""
    import numpy as np

    import codegen
    import common
    model, tok, _ = common.load_model(str(model_dir(args)), quantize="none")
    rng = np.random.default_rng(0)
    long = min(3600, model.config.max_position_embeddings - args.seq - 200)
    words = [int(w) for w in rng.integers(40, 160, args.score_examples - 1)] + [long]
    msgs = [f"Write a Python function for: {' '.join(['data'] * w)}" for w in words]
    codegen.generate(model, tok, msgs[:2], max_new_tokens=2, batch_size=2)  # warm-up
    rates = {}
    for split in (False, True):
        sync()
        t = time.perf_counter()
        codegen.generate(model, tok, msgs, max_new_tokens=args.seq, batch_size=len(msgs), split_long=split)
        sync()
        rates[split] = len(msgs) / (time.perf_counter() - t)
    return {"examples_per_s": round(rates[True], 2), "fixed_examples_per_s": round(rates[False], 2),
            "speedup": round(rates[True] / rates[False], 2), **mem()}


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}


# ----------------------------------------------------------------------------------------------------------------

def run_one(args) -> dict:
    if args.kernels is not None:
        os.environ["DISTILL_SLM_KERNELS"] = args.kernels
    cap(args)
    row = {"case": args.one, "seq": args.seq, "cap_gb": args.cap_gb}
    if getattr(args, "activation_offloading", False):
        row["activation_offloading"] = True
    record_memory(args)
    try:
        row.update(CASES[args.one](args))
        row["status"] = "ok"
        row.update(save_memory(args))
    except Exception as e:  # a case that OOMs or breaks is a row in the table, not a crash of the bench
        traceback.print_exc()  # to the case's stderr (the parent shows it)
        row.update(status="failed", error=f"{type(e).__name__}: {str(e).splitlines()[0][:640]}" if str(e) else
                   type(e).__name__)
    return row


def table(rows: list[dict]) -> str:
    ceiling = next((r.get("tflops_ceiling") for r in rows if r.get("tflops_ceiling")), None)
    base = {r["seq"]: r.get("tokens_per_s") for r in rows if r["case"] == "sft_baseline" and r["status"] == "ok"}
    uns = {_unsloth_key(r): r.get("tokens_per_s") for r in rows if r["case"].startswith("unsloth")
           and r["status"] == "ok"}
    head = f"{'case':<24}{'seq':>7}{'cap':>5}{'b x acc':>9}{'alloc GiB':>10}{'resv GiB':>9}{'tok/s | ex/s':>13}" \
           f"{'x base':>8}{'x unsloth':>10}{'MFU':>7}  status"
    lines = [head, "-" * len(head)]
    for r in rows:
        rate = r.get("tokens_per_s") or r.get("examples_per_s") or r.get("tflops_ceiling")
        mfu = "-"
        if ceiling and r.get("tokens_per_s") and r.get("params"):
            mfu = f"{6 * r['params'] * r['tokens_per_s'] / (ceiling * 1e12):.1%}"
        ratio = "-"
        if r.get("tokens_per_s") and base.get(r["seq"]) and r["case"] != "sft_baseline":
            ratio = f"{r['tokens_per_s'] / base[r['seq']]:.2f}"
        elif r.get("speedup"):
            ratio = f"{r['speedup']:.1f}"
        vs_uns = "-"
        if r.get("tokens_per_s") and uns.get(_unsloth_key(r)) and not r["case"].startswith("unsloth"):
            vs_uns = f"{r['tokens_per_s'] / uns[_unsloth_key(r)]:.2f}"
        bxa = f"{r.get('batch', '')}x{r.get('accum', '')}" if r.get("batch") else "-"
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('error', '')}"
        if r.get("same_predictions") is not None:
            status += (f" (same predictions: {r.get('agree', r['same_predictions'])}"
                       + (f", max |diff| {r['max_abs_diff']:.2g}" if "max_abs_diff" in r else "")
                       + (f", closest margin {r['min_top2_margin']:.2g}" if "min_top2_margin" in r else "")
                       + f", naive {r['naive_examples_per_s']} ex/s)")
        if "fixed_examples_per_s" in r:
            status += f" (fixed batches: {r['fixed_examples_per_s']} ex/s)"
        fmt = lambda v: "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
        lines.append(f"{row_name(r):<24}{r['seq']:>7}{fmt(r.get('cap_gb')):>5}{bxa:>9}"
                     f"{fmt(r.get('peak_alloc_gib')):>10}{fmt(r.get('peak_reserved_gib')):>9}"
                     f"{fmt(rate):>13}{ratio:>8}{vs_uns:>10}{mfu:>7}  {status}")
    return "\n".join(lines)


def _unsloth_key(r: dict) -> tuple:
    """Which Unsloth row a row compares with: same sequence, cap and micro-batch rule (fixed, or best that fits)."""
    return r["seq"], r.get("cap_gb"), r["case"].endswith("_auto")


def row_name(r: dict) -> str:
    """case, +offl (activation offloading), [speed-ups] and d=dropout where not the README's 0.05."""
    name = r["case"] + ("+offl" if r.get("activation_offloading") else "")
    if "kernels" in r:
        name += f"[{','.join(r['kernels']) or 'none'}]"
    if r.get("lora_dropout") not in (None, 0.05):
        name += f" d={r['lora_dropout']:g}"
    return name


def load_rows(paths) -> list[dict]:
    rows = []
    for p in paths:
        text = Path(p).read_text()
        rows += json.loads(text) if p.endswith(".json") else [json.loads(x) for x in text.splitlines() if x.strip()]
    return rows


def child_command(args, case: str) -> tuple[list[str], dict]:
    """The command and environment that run one case in its own process: every flag given (0 and 0.0 included;
    None and False mean "not given"), and for the unsloth cases --unsloth_site ahead of the project's packages."""
    flags = {k: v for k, v in vars(args).items()
             if v is not None and v is not False and k not in ("one", "out", "table", "cases")}
    argv = [sys.executable, __file__, "--one", case] + [f"--{k}" if v is True else f"--{k}={v}"
                                                        for k, v in flags.items()]
    env = dict(os.environ)
    if case.startswith("unsloth") and args.unsloth_site:  # its own TRL/datasets, ahead of the project's
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.unsloth_site, env.get("PYTHONPATH")]))
    return argv, env


def main(args):
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as the trainers run
    if args.table:
        print(table(load_rows(args.table)))
        return None
    if args.one:
        import common
        row = run_one(args)
        if common.is_main_process():
            print("BENCH " + json.dumps(row), flush=True)
        return None
    unknown = [c for c in args.cases.split(",") if c not in CASES]
    if unknown:
        raise SystemExit(f"error: unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES)}")
    model_dir(args)  # build once, before the timed processes
    rows = []
    for case in args.cases.split(","):
        argv, env = child_command(args, case)
        r = subprocess.run(argv, capture_output=True, text=True, env=env)
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith("BENCH ")), None)
        row = json.loads(line[6:]) if line else {"case": case, "seq": args.seq, "cap_gb": args.cap_gb,
                                                 "status": "crashed", "error": (r.stderr.strip().splitlines()
                                                                                or ["?"])[-1][:160]}
        rows.append(row)
        if row.get("status") != "ok":  # what the case's process said last, for the why
            print("\n".join(r.stderr.strip().splitlines()[-30:]), file=sys.stderr)
        print(json.dumps(row), file=sys.stderr, flush=True)
    from fileio import write_json
    from run_record import device_name
    print(f"\nbench on {device_name()}, config {args.shape}, {time.strftime('%Y-%m-%d')}; tokens per "
          f"optimizer step = seq x micro-batch x accumulation")
    print(table(rows))
    if args.out and args.out.endswith(".jsonl"):
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    elif args.out:
        write_json(args.out, rows)
    return rows


if __name__ == "__main__":
    main(parse_args())
