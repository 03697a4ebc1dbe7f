"""Benchmark schema-constrained decoding: grammar compile time per schema (cold, then from the cache) and the
per-step decoding overhead of the grammar (and its budget guard) against plain greedy decoding of the same prompts
for the same number of steps. A first round over every batch, both ways, is not counted (first decodes pay one-time
costs); then --repeats rounds run interleaved with the order alternating. The overhead is given from the totals and
as the median of the per-batch pairs (robust to a machine whose speed drifts); --control measures the noise floor.
Prints a table; --out writes the numbers as JSON, each run's included.

    python bench_idp.py --model_dir smollm2-135m --n_docs 4 --batch_sizes 1 4
    python bench_idp.py --model_dir Qwen/Qwen2.5-3B-Instruct --schemas data/idp_schema.json data/sroie_schema.json --batch_sizes 1 8 --out bench_idp.json

Documents: --data, else the SROIE test split in ../shared/data/idp/ when present, else data/idp_test.jsonl.
"""
import statistics
import sys
import time
from pathlib import Path

import cli
import common
import fileio
import run_record
import idp
import json_grammar as jg

ROOT = Path(__file__).resolve().parent
SROIE = ROOT.parent / "shared" / "data" / "idp" / "sroie.jsonl"


def parse_args(argv=None):
    ap = cli.parser(__doc__.split("\n\n")[0])
    # model
    cli.add_model_args(ap, default="smollm2-135m")
    # data
    ap.add_argument("--schemas", nargs="+", default=None,
                    help="schemas to compile (default: data/idp_schema.json, plus data/sroie_schema.json if present)")
    ap.add_argument("--data", help="documents ({document|text} JSONL); default: SROIE test split, else "
                                   "data/idp_test.jsonl")
    ap.add_argument("--n_docs", type=int, default=8, help="documents per measurement")
    # run
    ap.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8], help="batch sizes to measure")
    ap.add_argument("--max_new_tokens", type=int, default=256, help="token budget of the constrained replies")
    ap.add_argument("--repeats", type=int, default=2, help="measurements of each batch, both ways, interleaved")
    ap.add_argument("--control", action="store_true",
                    help="also decode plainly a second time in each round: the median difference between the two "
                         "plain runs is the machine's noise floor for the overhead")
    ap.add_argument("--max_string_chars", type=int, default=256, help="as in infer_idp.py")
    ap.add_argument("--max_items", type=int, default=32, help="as in infer_idp.py")
    # output
    ap.add_argument("--out", help="write the measurements to this JSON file")
    return ap.parse_args(argv)


def default_data(args):
    if args.data:
        return args.data, None
    if SROIE.is_file():
        return str(SROIE), "test"
    return str(ROOT / "data" / "idp_test.jsonl"), None


def main(args):
    # load
    cli.print_config("bench_idp", args)
    schema_paths = args.schemas or [str(p) for p in (ROOT / "data" / "idp_schema.json",
                                                     ROOT / "data" / "sroie_schema.json") if p.is_file()]
    schemas = {Path(p).name: jg.load_schema(p) for p in schema_paths}
    data, split = default_data(args)
    rows = fileio.read_records(data)
    if split:
        rows = [r for r in rows if r.get("split") == split]
    docs = [r.get("document", r.get("text")) for r in rows][:args.n_docs]
    if not docs:
        raise fileio.UserError(f"{data}: no documents")
    model, tok, ms = common.load_model(args.model_dir, quantize=args.quantize,
                                       trust_remote_code=args.trust_remote_code,
                                       max_memory_gb=args.max_memory_gb)
    limit = idp.input_token_limit(model, tok, 0, args.max_new_tokens)

    # run: compile times (a fresh compiler per schema: nothing cached), then the same schema again (cached)
    compile_rows = []
    for name, schema in schemas.items():
        t0 = time.perf_counter()
        cache = jg.GrammarCache(tok, vocab_size=model.config.vocab_size)
        t1 = time.perf_counter()
        cache.compile(schema, args.max_items)
        t2 = time.perf_counter()
        cache.compile(schema, args.max_items)
        t3 = time.perf_counter()
        compile_rows.append({"schema": name, "tokenizer_info_s": t1 - t0, "compile_s": t2 - t1, "cached_s": t3 - t2})

    # run: decoding, per schema and batch size, constrained first; unconstrained then runs as many steps
    decode_rows = []
    for name, schema in schemas.items():
        cache = jg.GrammarCache(tok, vocab_size=model.config.vocab_size)
        grammar = cache.compile(schema, args.max_items)
        prompts = [idp.document_prompt(tok, schema, d, limit, quiet=True)[0] for d in docs]
        for bs in args.batch_sizes:
            batches = [prompts[i:i + bs] for i in range(0, len(prompts), bs)]

            def constrained(batch):  # seconds, steps, seconds of the processor's own work
                res, st = jg.generate(model, tok, batch, max_new_tokens=args.max_new_tokens, batch_size=bs,
                                      grammar=grammar, cache=cache, max_string_chars=args.max_string_chars)
                return {"s": st["generate_seconds"], "steps": max(r["new_tokens"] for r in res),
                        "own": st["processor_seconds"] - st["processor_wait_seconds"]}

            def plain(batch, steps):  # greedy decoding of the same prompts for as many steps
                _, st = jg.generate(model, tok, batch, max_new_tokens=steps, min_new_tokens=steps, batch_size=bs)
                return {"s": st["generate_seconds"], "steps": steps}

            # A warm-up round, not counted: every batch, both ways, at full length. On CUDA the first decode of a
            # batch whose prompt length is new took seconds longer (measured on an H100: +50% to +155% per step
            # for 3 of 6 SROIE receipts, whichever way ran first), and the first long run pays for the mask
            # kernel's Triton compile and for the allocator's growth to a long KV cache.
            steps_of = [constrained(batch)["steps"] for batch in batches]
            for batch, steps in zip(batches, steps_of):
                plain(batch, steps)
            # then --repeats rounds, interleaved with the order alternating (slow drifts of the machine cancel);
            # --control adds a second plain run to each, whose difference from the first is the noise floor
            ways = ["grammar", "plain", "plain again"][:3 if args.control else 2]
            runs = []  # per round and batch: way -> measurement
            for rep in range(args.repeats):
                for batch, steps in zip(batches, steps_of):
                    runs.append({way: constrained(batch) if way == "grammar" else plain(batch, steps)
                                 for way in (ways if rep % 2 == 0 else ways[::-1])})

            def ms(way, key="s"):  # milliseconds per step over all runs
                return 1000 * sum(r[way][key] for r in runs) / sum(r[way]["steps"] for r in runs)

            def median_pct(way):  # median over the runs of (way's time per step / plain's) - 1, in percent
                per_step = [(r[way]["s"] / r[way]["steps"]) / (r["plain"]["s"] / r["plain"]["steps"]) for r in runs]
                return 100 * (statistics.median(per_step) - 1)

            c_ms, u_ms = ms("grammar"), ms("plain")
            decode_rows.append({"schema": name, "batch_size": bs, "steps": sum(r["grammar"]["steps"] for r in runs),
                                "unconstrained_ms_per_step": u_ms, "constrained_ms_per_step": c_ms,
                                "overhead_pct": 100 * (c_ms - u_ms) / u_ms,
                                "overhead_median_pct": median_pct("grammar"),
                                "noise_median_pct": median_pct("plain again") if args.control else None,
                                "grammar_ms_per_step": ms("grammar", "own"), "runs": runs})
            print(f"  {name} batch {bs}: {c_ms:.1f} vs {u_ms:.1f} ms/step", file=sys.stderr, flush=True)

    # save
    device = run_record.device_name()
    print(f"\ngrammar compile ({args.model_dir}, vocabulary {model.config.vocab_size}, {device})")
    print(f"{'schema':<22} {'tokenizer info s':>16} {'compile s':>10} {'cached s':>10}")
    for r in compile_rows:
        print(f"{r['schema']:<22} {r['tokenizer_info_s']:16.3f} {r['compile_s']:10.3f} {r['cached_s']:10.6f}")
    print(f"\ndecoding, {len(docs)} documents from {Path(data).name}: milliseconds per decoding step "
          f"(a step = one token for every row of the batch)")
    pct = lambda v: "-" if v is None else f"{v:+.1f}%"  # noqa: E731
    print(f"{'':<35}{'ms per step':>18}{'overhead':>18}{'':>9}{'own work':>10}")
    print(f"{'schema':<22} {'batch':>5} {'steps':>6} {'plain':>8} {'grammar':>8} {'total':>8} {'median':>8} "
          f"{'noise':>8} {'ms/step':>9}")
    for r in decode_rows:
        print(f"{r['schema']:<22} {r['batch_size']:5d} {r['steps']:6d} {r['unconstrained_ms_per_step']:8.2f} "
              f"{r['constrained_ms_per_step']:8.2f} {pct(r['overhead_pct']):>8} {pct(r['overhead_median_pct']):>8} "
              f"{pct(r['noise_median_pct']):>8} {r['grammar_ms_per_step']:9.2f}")
    print("total: from the summed times; median: of the per-batch pairs; noise: the same for two plain runs "
          "(--control); own work: the grammar processor's time less its wait for the GPU")
    out = {"model_dir": args.model_dir, "device": device, "data": data, "n_docs": len(docs),
           "compile": compile_rows, "decode": decode_rows, "args": vars(args)}
    if args.out:
        fileio.write_json(args.out, out)
    return out


if __name__ == "__main__":
    with fileio.user_errors():
        main(parse_args())
