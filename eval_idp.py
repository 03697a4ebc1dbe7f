"""Evaluate IDP extraction: JSON-valid and schema-valid rates, per-field exact match (raw, after whitespace/case
normalisation, and canonical: dates and amounts compared as values where they parse), micro/macro field F1;
grammar-constrained by default, --unconstrained to see what the grammar buys.

    python eval_idp.py --model_dir runs/sft_idp --data data/idp_test.jsonl --schema data/idp_schema.json --out metrics.json
    python eval_idp.py --model_dir smollm2-135m --data ../shared/data/idp/sroie.jsonl --split test --schema data/sroie_schema.json --limit 40
    python eval_idp.py --model_dir smollm2-135m --data data/sroie_idp_test.jsonl --schema data/sroie_schema.json --limit 40 --unconstrained

Every evaluation is also filed under <run>/evals/ (runs/base-<name>/evals/ for a plain model).
"""
import sys
import time

import cli
import common
import fileio
import run_record
import idp
import json_grammar as jg


def parse_args(argv=None):
    ap = cli.parser(__doc__.split("\n\n")[0])
    # model
    cli.add_model_args(ap, required=True)
    # data
    ap.add_argument("--data", required=True,
                    help="JSONL of {document|text, gold} (idp_prepare.py's *_test.jsonl, sroie.jsonl) or SFT/KD rows "
                         "{input, output|teacher_output}")
    ap.add_argument("--schema", required=True, help="JSON Schema the outputs must conform to")
    ap.add_argument("--split", help="keep only records whose 'split' is this (e.g. test for sroie.jsonl)")
    ap.add_argument("--limit", type=int, default=0, help="evaluate the first N records only (0 = all)")
    # run
    idp.add_decoding_args(ap)
    # output
    ap.add_argument("--out", help="also write the metrics to this JSON file")
    ap.add_argument("--predictions", help="write per-document outputs to this JSONL (id, output, valid, error, gold)")
    args = cli.parse(ap, argv)
    idp.check_decoding_args(ap, args)
    if args.limit < 0:
        ap.error("--limit must be >= 0")
    return args


def print_table(m: dict) -> None:
    print(f"\n{m['n']} documents, {'constrained' if m['constrained'] else 'unconstrained'} decoding")
    print(f"JSON-valid {m['json_valid_rate']:.1%}   schema-valid {m['schema_valid_rate']:.1%}   "
          f"cut off by the budget {m['cut_off_rate']:.1%}   closed early for the budget {m['budget_closed_rate']:.1%}")
    fem, ff1 = m["field_exact_match"], m["field_f1"]
    width = max([len(f) for f in fem["raw"]] + [15])
    print(f"{'field':<{width}}  {'EM raw':>7}  {'EM norm':>7}  {'EM canon':>8}  {'F1 norm':>7}  {'F1 canon':>8}")
    for f in fem["raw"]:
        print(f"{f:<{width}}  {fem['raw'][f]:7.3f}  {fem['normalized'][f]:7.3f}  {fem['canonical'][f]:8.3f}  "
              f"{ff1['normalized'][f]:7.3f}  {ff1['canonical'][f]:8.3f}")
    for k in ("exact_match", "doc_exact_match", "micro_f1", "macro_f1"):
        print(f"{k:<{width}}  {m[k]['raw']:7.3f}  {m[k]['normalized']:7.3f}  {m[k]['canonical']:8.3f}")
    for f, c in m["canonical_parsed"].items():
        print(f"canonical {f}: {c['gold']} of {c['gold_values']} gold and {c['pred']} of {c['pred_values']} "
              f"predicted values read as {'a date' if idp.field_kind(f) == 'date' else 'an amount'}; the rest "
              f"compared as normalised text")


def main(args):
    # load
    started = time.time()
    cli.print_config("eval_idp", args)
    schema = jg.load_schema(args.schema)
    records = idp.read_eval_records(args.data, split=args.split, limit=args.limit or None)
    model, tok, ms, cache, grammar, limit = idp.load_extractor(args, schema)

    # run
    prompts, truncated = [], 0
    for r in records:
        if "document" in r:
            prompt, cut = idp.document_prompt(tok, schema, r["document"], limit, quiet=True)
            truncated += cut
            prompts.append(prompt)
        else:
            prompts.append(common.chat_prompt(tok, r["message"]))
            n_tok = len(tok(prompts[-1], add_special_tokens=False)["input_ids"])
            if n_tok > limit:
                fileio.note(f"record {r['id']}: its prompt has {n_tok} tokens, more than {limit}; a ready-made "
                            f"'input' message cannot be truncated: evaluating it whole", once=False)
    if truncated:
        fileio.note(f"{truncated} documents were truncated at the end to fit {limit} prompt tokens")
    from tqdm import tqdm
    with tqdm(total=len(prompts), desc="eval_idp", unit="doc", file=sys.stderr) as bar:
        results, stats = jg.generate(model, tok, prompts, max_new_tokens=args.max_new_tokens,
                                     batch_size=args.batch_size, grammar=grammar, cache=cache,
                                     max_string_chars=args.max_string_chars, progress=bar)
    validator = jg.make_validator(schema)
    checked = [jg.check_output(r["text"], validator) for r in results]
    n = len(records)
    metrics = {
        "n": n, "constrained": not args.unconstrained, "precision": ms.precision[0],
        "json_valid_rate": sum(c["json_valid"] for c in checked) / n,
        "schema_valid_rate": sum(c["schema_valid"] for c in checked) / n,
        "cut_off_rate": sum(not r["ended"] for r in results) / n,
        "budget_closed_rate": sum(r["budget_closed"] for r in results) / n,
        "truncated_documents": truncated,
        **idp.field_metrics([c["json"] for c in checked], [r["gold"] for r in records]),
        "mean_new_tokens": stats["new_tokens"] / n,
        "generate_seconds": round(stats["generate_seconds"], 2),
        "grammar_seconds": round(stats["processor_seconds"], 2),
        "grammar_compile_seconds": round(grammar.compile_seconds, 3) if grammar else None,
        "device": run_record.device_name(),
    }

    # save
    print_table(metrics)
    if args.out:
        fileio.write_json(args.out, metrics)
    if args.predictions:
        fileio.write_jsonl(args.predictions, [
            {"id": r["id"], "output": c["json"], "valid": c["schema_valid"], "error": c["error"],
             "raw": res["text"], "gold": r["gold"]} for r, c, res in zip(records, checked, results)])
    path = run_record.save_eval(args.model_dir, "idp", args.data, args, metrics, script="eval_idp.py")
    print(f"\nsaved {path}" + (f" and {args.out}" if args.out else "") + f" ({time.time() - started:.0f} s)")
    return metrics


if __name__ == "__main__":
    with fileio.user_errors():
        main(parse_args())
