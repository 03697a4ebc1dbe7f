"""The server's four CreditMix endpoints of one base (base, sft, kd, dpo) loaded at once the way serve_creditmix.py
loads them (serving.ModelSlots: one 4-bit base, three LoRA adapters attached by name), under a GPU memory cap:
peak memory after the loads and while scoring mixed-adapter batches, and label-scoring throughput of one mixed batch
against one batch per adapter, each with the server's stacked LoRA forward (compat.stacked_lora_batches, the
default) and with PEFT's own loop over the adapters (STACKED_LORA=0), with the torch ops one forward pass over the
batch dispatches (views left out: a proxy for the GPU kernels launched, countable on a CPU). Random weights (speed
and memory do not depend on their values).

    python gpu/serve_memory.py --shape qwen2.5-3b --cap_gb 8        # a CUDA machine (bash gpu/serve_bench.sh)
    python gpu/serve_memory.py --shape tiny --batch 8 --repeats 1        # CPU smoke run
    OMP_NUM_THREADS=2 python gpu/serve_memory.py --shape smollm2-135m --batch 16 --repeats 3   # the CPU comparison
"""
import json
import os
import sys
import time
from pathlib import Path

from torch.utils._python_dispatch import TorchDispatchMode  # count_ops (where PyTorch documents dispatch modes)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cli  # noqa: E402

from shapes import CONFIGS, random_model_dir  # noqa: E402


def parse_args(argv=None):
    p = cli.parser(__doc__)
    # model
    p.add_argument("--shape", default="qwen2.5-3b", choices=list(CONFIGS), help="architecture of the base")
    p.add_argument("--tokenizer", default="smollm2-135m",
                   help="tokenizer files (a folder) or a model spec whose tokenizer to use")
    p.add_argument("--work", default="/tmp/serve_memory", help="folder for the random base and its adapters")
    # run
    p.add_argument("--cap_gb", type=float, default=8, help="GPU memory cap of this process, GiB (0 = none)")
    p.add_argument("--batch", type=int, default=32, help="prompts per scored batch (spread over the 4 endpoints)")
    p.add_argument("--repeats", type=int, default=5, help="timed batches per mode (after one untimed)")
    # output
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    return p.parse_args(argv)


def build(args) -> dict[str, str]:
    """A random base (bf16, saved once) and three random LoRA runs on it (r=16, all projections)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    import common
    base = random_model_dir(args.shape, args.work, args.tokenizer)
    specs = {"base": str(base)}
    for seed, name in enumerate(["sft", "kd", "dpo"]):
        d = Path(args.work) / f"{args.shape}_{name}"
        if not (d / "adapter_config.json").is_file():
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
            cfg = common.lora_config(model)
            cfg.init_lora_weights = False
            get_peft_model(model, cfg).save_pretrained(d)
            (d / "run.json").write_text(json.dumps({"base_model": str(base)}))
            del model
        specs[name] = str(d)
    return specs


def gib(x: int) -> float:
    return round(x / 2**30, 3)


class OpCount(TorchDispatchMode):
    """Counts the torch operators dispatched inside it, views (which launch no kernel) left out."""
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.n += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn) -> int:
    """The torch operators fn() dispatches: on a GPU at small batches each is about one kernel launch, which is what
    bounds a forward pass there."""
    with OpCount() as count:
        fn()
    return count.n


def forward_once(model, tok, prompts: list[str], adapter_names: list[str]) -> None:
    """One forward pass over the prompts (left-padded, each row with its adapter), as label scoring's first pass."""
    import torch
    from common import chat_prompt
    device = next(model.parameters()).device
    enc = tok([chat_prompt(tok, p) for p in prompts], return_tensors="pt", padding=True, padding_side="left")
    with torch.inference_mode():
        model(input_ids=enc.input_ids.to(device), attention_mask=enc.attention_mask.to(device), logits_to_keep=1,
              adapter_names=adapter_names)


def main(args):
    import torch

    import compat
    import creditmix as cm
    import serving
    # load
    cuda = torch.cuda.is_available()
    if cuda and args.cap_gb:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gb * 2**30 / total))
    specs = build(args)
    slots = serving.ModelSlots("auto", False, 30, serving.Metrics())
    endpoints = {}
    rows = []
    registered = {name: slots.slot(spec) for name, spec in specs.items()}  # all first, as serve_creditmix does
    for name, s in registered.items():
        slots.load(s)
        endpoints[name] = s
        mem = gib(torch.cuda.max_memory_allocated()) if cuda else None
        rows.append({"stage": f"loaded {name}", "peak_gib": mem})
        print(f"loaded {name}: peak {mem} GiB", flush=True)
    tok = endpoints["base"].tok
    names = list(endpoints)
    prompts = [cm.prompt_for(f"Age: {20 + i}, Occupation: Scientist, Annual Income: {19000 + 37 * i}, "
                             "Outstanding Debt: 809.98, Credit Utilization Ratio: 35.03") for i in range(args.batch)]
    rows_adapter = [endpoints[names[i % 4]].row_name for i in range(args.batch)]

    # run
    model = endpoints["base"].model
    parts = [[i for i in range(args.batch) if i % 4 == k] for k in range(4)]

    def mixed():
        cm.label_scores(model, tok, prompts, batch_size=args.batch, adapter_names=rows_adapter)

    def per_adapter():
        for idx in parts:
            cm.label_scores(model, tok, [prompts[i] for i in idx], batch_size=args.batch,
                            adapter_names=[rows_adapter[i] for i in idx])

    def ops(label):
        groups = [list(range(args.batch))] if label.startswith("mixed") else parts
        return count_ops(lambda: [forward_once(model, tok, [prompts[i] for i in idx], [rows_adapter[i] for i in idx])
                                  for idx in groups])

    results = {}
    for label, fn, stacked in (("mixed", mixed, True), ("per_adapter", per_adapter, True),
                               ("mixed_peft", mixed, False), ("per_adapter_peft", per_adapter, False)):
        compat.stacked_lora_batches(model, on=stacked)
        fn()  # warm-up (and the stacks built)
        n_ops = ops(label)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            fn()
        if cuda:
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / max(1, args.repeats)
        results[label] = dt
        mem = gib(torch.cuda.max_memory_allocated()) if cuda else None
        how = "stacked LoRA" if stacked else "PEFT's loop"
        what = "one mixed batch" if label.startswith("mixed") else "one batch per adapter"
        rows.append({"stage": f"scoring {what} x{args.batch}, {how}", "mode": label, "peak_gib": mem,
                     "seconds_per_batch": round(dt, 4), "prompts_per_s": round(args.batch / dt, 1),
                     "ops_per_forward": n_ops})
        print(f"{label}: {dt:.4f} s per batch, {n_ops} ops per forward", flush=True)
    compat.stacked_lora_batches(model, on=True)
    # save
    print(f"\n{args.shape}, {'4-bit on ' + torch.cuda.get_device_name() if cuda else 'CPU'}, cap {args.cap_gb} GiB")
    print("| stage | peak GPU GiB | s per batch | prompts/s | ops per forward |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['peak_gib']} | {r.get('seconds_per_batch', '')} | {r.get('prompts_per_s', '')} "
              f"| {r.get('ops_per_forward', '')} |")
    print(f"mixed-adapter batch vs one batch per adapter: {results['per_adapter'] / results['mixed']:.2f}x "
          f"(stacked LoRA), {results['per_adapter_peft'] / results['mixed_peft']:.2f}x (PEFT's loop); "
          f"stacked vs PEFT's loop on the mixed batch: {results['mixed_peft'] / results['mixed']:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(parse_args())
