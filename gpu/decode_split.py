"""Where constrained decoding's extra step time goes: greedy decoding of the same prompts for the same number of
steps, plain and with the grammar (at its processor's thread count, one per 16 rows, and with xgrammar's default
pool of half the machine's threads), interleaved with the order alternating. For the grammar it splits the
processor's time into the bitmask fill, the mask kernel's launch, the wait for the GPU and the rest (the per-row
Python: accepting tokens, the budget guard, the one-hot).

    python3 gpu/decode_split.py --model_dir /tmp/bench_models/smollm2-135m --batch_size 8
"""
import os
import time
from collections import defaultdict

import xgrammar as xgr

import cli
import common
import fileio
import run_record
import idp
import json_grammar as jg

TIMES = defaultdict(float)


def timed(name, fn):
    def wrapper(*a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            TIMES[name] += time.perf_counter() - t
    return wrapper


def parse_args(argv=None):
    ap = cli.parser(__doc__)
    ap.add_argument("--model_dir", default="smollm2-135m", help="model to decode with (any --model_dir form)")
    ap.add_argument("--data", default="data/idp_test.jsonl", help="documents ({document|text} JSONL)")
    ap.add_argument("--schema", default="data/sroie_schema.json", help="JSON Schema of the constrained run")
    ap.add_argument("--n_docs", type=int, default=8, help="documents")
    ap.add_argument("--batch_size", type=int, default=8, help="rows decoded together")
    ap.add_argument("--max_new_tokens", type=int, default=128, help="token budget of the constrained run")
    ap.add_argument("--repeats", type=int, default=4, help="interleaved rounds")
    return ap.parse_args(argv)


def main(args):
    model, tok, _ = common.load_model(args.model_dir)
    schema = jg.load_schema(args.schema)
    cache = jg.GrammarCache(tok, vocab_size=model.config.vocab_size)
    grammar = cache.compile(schema, 32)
    limit = idp.input_token_limit(model, tok, 0, args.max_new_tokens)
    docs = [r.get("document", r.get("text")) for r in fileio.read_records(args.data)][:args.n_docs]
    prompts = [idp.document_prompt(tok, schema, d, limit, quiet=True)[0] for d in docs]
    bs = args.batch_size
    batches = [prompts[i:i + bs] for i in range(0, len(prompts), bs)]
    xgr.apply_token_bitmask_inplace = timed("mask launch", xgr.apply_token_bitmask_inplace)
    xgr.BatchGrammarMatcher.batch_fill_next_token_bitmask = timed(
        "fill", xgr.BatchGrammarMatcher.batch_fill_next_token_bitmask)
    pool = xgr.BatchGrammarMatcher
    pool_size = max(1, (os.cpu_count() or 2) // 2)  # xgrammar's default

    def constrained(batch, threads=None):
        xgr.BatchGrammarMatcher = (lambda n: pool(threads)) if threads else pool
        try:
            res, st = jg.generate(model, tok, batch, max_new_tokens=args.max_new_tokens, batch_size=bs,
                                  grammar=grammar, cache=cache)
        finally:
            xgr.BatchGrammarMatcher = pool
        return max(r["new_tokens"] for r in res), st

    def plain(batch, steps):
        _, st = jg.generate(model, tok, batch, max_new_tokens=steps, min_new_tokens=steps, batch_size=bs)
        return steps, st

    steps = [constrained(b)[0] for b in batches]  # also the warm-up
    for b, n in zip(batches, steps):
        plain(b, n)
        constrained(b, pool_size)
    runs = {"plain": lambda b, n: plain(b, n), "grammar": lambda b, n: constrained(b),
            f"grammar, {pool_size} thr": lambda b, n: constrained(b, pool_size)}
    total = {k: defaultdict(float) for k in runs}
    for rep in range(args.repeats):
        for b, n in zip(batches, steps):
            for k, run in (reversed(runs.items()) if rep % 2 else runs.items()):
                TIMES.clear()
                n_steps, st = run(b, n)
                t = total[k]
                t["steps"] += n_steps
                t["step"] += st["generate_seconds"]
                t["processor"] += st["processor_seconds"]
                t["wait"] += st["processor_wait_seconds"]
                for name, s in TIMES.items():
                    t[name] += s
    base = total["plain"]["step"] / total["plain"]["steps"]
    print(f"{args.model_dir} on {run_record.device_name()}, batch {bs}, {sum(steps)} steps per round, "
          f"{args.repeats} rounds; ms per step")
    print(f"{'':<18} {'step':>7} {'vs plain':>8} {'processor':>9} {'wait':>6} {'fill':>6} {'mask':>6} {'rest':>6}")
    for k, t in total.items():
        ms = {x: 1000 * t[x] / t["steps"] for x in ("step", "processor", "wait", "fill", "mask launch")}
        rest = ms["processor"] - ms["wait"] - ms["fill"] - ms["mask launch"]
        print(f"{k:<18} {ms['step']:7.2f} {100 * (ms['step'] / 1000 - base) / base:+7.1f}% {ms['processor']:9.2f} "
              f"{ms['wait']:6.2f} {ms['fill']:6.2f} {ms['mask launch']:6.2f} {rest:6.2f}")


if __name__ == "__main__":
    main(parse_args())
