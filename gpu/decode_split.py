"""Where constrained decoding's extra step time comes from: greedy decoding of the same prompt for the same number
of steps, plain and with stand-in logits processors that each do one part of BudgetJsonProcessor's GPU traffic
(the two syncs, the bitmask upload and Triton mask, the in-place one-hot), all of it without any grammar work, and
the real grammar. Runs are interleaved with the order alternating; prints ms per step against plain.

    . gpu/setup.sh && python3 gpu/decode_split.py --model_dir /tmp/bench_models/smollm2-135m
"""
import argparse
import time

import torch
import xgrammar as xgr
from transformers import LogitsProcessorList

import common
import idp
import json_grammar as jg


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_dir", default="smollm2-135m", help="model to decode with (any --model_dir form)")
    ap.add_argument("--data", default=".carry/idp/sroie_idp_test.jsonl", help="documents ({document|text} JSONL)")
    ap.add_argument("--schema", default="data/sroie_schema.json", help="JSON Schema of the constrained run")
    ap.add_argument("--n_docs", type=int, default=2, help="documents (batch 1)")
    ap.add_argument("--max_new_tokens", type=int, default=128, help="token budget of the constrained run")
    ap.add_argument("--repeats", type=int, default=4, help="interleaved rounds")
    return ap.parse_args(argv)


def stand_ins(vocab_size: int) -> dict:
    mask = xgr.allocate_token_bitmask(1, vocab_size)
    if torch.cuda.is_available():
        mask = mask.pin_memory()

    def upload_and_mask(scores):
        xgr.apply_token_bitmask_inplace(scores, mask.to(scores.device, non_blocking=True), vocab_size=vocab_size)

    def one_hot(scores, best):
        scores.fill_(float("-inf"))
        scores[torch.arange(len(best), device=scores.device), torch.tensor(best, device=scores.device)] = 0.0

    def full(ids, scores):  # everything BudgetJsonProcessor does on the GPU, in its order
        ids[:, -1].tolist()
        upload_and_mask(scores)
        one_hot(scores, scores.argmax(-1).tolist())
        return scores

    return {
        "plain": None,
        "sync (argmax)": lambda ids, scores: (scores.argmax(-1).tolist(), scores)[1],
        "two syncs": lambda ids, scores: (ids[:, -1].tolist(), scores.argmax(-1).tolist(), scores)[2],
        "mask upload+triton": lambda ids, scores: (upload_and_mask(scores), scores)[1],
        "one-hot": lambda ids, scores: (one_hot(scores, [5] * scores.shape[0]), scores)[1],
        "all gpu ops": full,
    }


def main(args):
    model, tok, _ = common.load_model(args.model_dir)
    schema = jg.load_schema(args.schema)
    cache = jg.GrammarCache(tok, vocab_size=model.config.vocab_size)
    grammar = cache.compile(schema, 32)
    limit = idp.input_token_limit(model, tok, 0, args.max_new_tokens)
    docs = [r.get("document", r.get("text")) for r in common.read_records(args.data)][:args.n_docs]
    prompts = [common.chat_prompt(tok, idp.idp_user_message(schema, idp.fit_document(tok, schema, d, limit,
                                                                                     quiet=True)[0])) for d in docs]

    def constrained(prompt):
        res, st = jg.generate(model, tok, [prompt], max_new_tokens=args.max_new_tokens, batch_size=1,
                              grammar=grammar, cache=cache)
        return res[0]["new_tokens"], st["generate_seconds"]

    def with_processor(prompt, steps, proc):
        enc = tok([prompt], return_tensors="pt", add_special_tokens=False).to(model.device)
        kw = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=tok.pad_token_id)
        if proc:
            kw["logits_processor"] = LogitsProcessorList([proc])
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(**enc, **kw)
        return steps, time.perf_counter() - t

    variants = stand_ins(model.config.vocab_size)
    steps = [constrained(p)[0] for p in prompts]  # also the warm-up of the constrained path
    for p, n in zip(prompts, steps):
        for proc in variants.values():
            with_processor(p, n, proc)
    total = {k: [0.0, 0] for k in [*variants, "grammar"]}
    for rep in range(args.repeats):
        for p, n in zip(prompts, steps):
            runs = [(k, lambda proc=proc: with_processor(p, n, proc)) for k, proc in variants.items()]
            runs.append(("grammar", lambda: constrained(p)))
            for k, run in (reversed(runs) if rep % 2 else runs):
                n_steps, seconds = run()
                total[k][0] += seconds
                total[k][1] += n_steps
    base = total["plain"][0] / total["plain"][1]
    print(f"{args.model_dir} on {common.device_name()}, batch 1, {sum(steps)} steps per round, {args.repeats} rounds")
    for k, (seconds, n) in total.items():
        print(f"{k:<20} {1000 * seconds / n:8.2f} ms/step {100 * (seconds / n - base) / base:+7.1f}%")


if __name__ == "__main__":
    main(parse_args())
