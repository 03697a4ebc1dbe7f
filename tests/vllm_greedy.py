"""Greedy completions from vLLM, for tests/test_export.py (run with the separate vLLM venv's python, not imported).

    /work/vllm_venv/bin/python tests/vllm_greedy.py --model BASE --lora RUN_DIR --prompts prompts.json --out out.json

Prints nothing useful; writes {"lora": [[ids...], ...] or null, "plain": [[ids...], ...]} to --out: the prompts with
the LoRA adapter attached (when --lora is given) and without it.
"""
import argparse
import json


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="base model folder (or a merged export)")
    p.add_argument("--lora", default=None, help="LoRA run directory to attach (vLLM --enable-lora); none: plain")
    p.add_argument("--prompts", required=True, help="JSON list of prompt strings (chat template already applied)")
    p.add_argument("--max_tokens", type=int, default=24, help="new tokens per prompt")
    p.add_argument("--out", required=True, help="JSON output file")
    return p.parse_args(argv)


def main(args):
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest
    prompts = json.load(open(args.prompts))
    # fp32 on the CPU: the comparison is with transformers in fp32; eager (no graph capture) and a small KV cache
    llm = LLM(model=args.model, dtype="float32", max_model_len=1024, enforce_eager=True, max_num_seqs=8,
              enable_lora=bool(args.lora), max_lora_rank=64)
    sp = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    ids = lambda outs: [list(o.outputs[0].token_ids) for o in outs]  # noqa: E731
    result = {"plain": ids(llm.generate(prompts, sp)),
              "lora": ids(llm.generate(prompts, sp, lora_request=LoRARequest("run", 1, args.lora))) if args.lora
              else None}
    json.dump(result, open(args.out, "w"))


if __name__ == "__main__":
    main(parse_args())
