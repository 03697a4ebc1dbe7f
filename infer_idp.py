"""Extract one JSON object per document with a base or fine-tuned model, grammar-constrained by a JSON Schema, so
every output parses and validates (token budget included). Prints strict JSON on stdout, notes on stderr.

    python infer_idp.py --model_dir runs/kd_idp --schema data/idp_schema.json --document "Invoice #INV1 date 2025-10-01 from Bar LLC total USD 50."
    python infer_idp.py --model_dir smollm2-135m --schema data/idp_schema.json --document "Invoice #INV1 date 2025-10-01 from Bar LLC total USD 50."
    python infer_idp.py --model_dir smollm2-135m --schema data/idp_schema.json --input data/idp_test.jsonl --output preds.jsonl
"""
import sys
import time

import cli
import fileio
import idp
import json_grammar as jg


def parse_args(argv=None):
    ap = cli.parser(__doc__.split("\n\n")[0])
    # model
    cli.add_model_args(ap, required=True)
    # data
    ap.add_argument("--schema", required=True, help="JSON Schema file the output must conform to")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--document", help="the document text")
    src.add_argument("--document_file", help="a UTF-8 text file holding the document")
    src.add_argument("--input", help="JSONL (or JSON list) of records with 'document' (or 'text') and optional 'id'")
    # run
    idp.add_decoding_args(ap, batch_help="documents generated together (--input)")
    # output
    ap.add_argument("--output", help="JSONL written for --input: {id, output, valid, error, budget_closed}")
    args = cli.parse(ap, argv)
    if args.input and not args.output:
        ap.error("--input needs --output")
    if args.output and not args.input:
        ap.error("--output goes with --input (a single document is printed on stdout)")
    idp.check_decoding_args(ap, args)
    return args


def read_documents(args) -> list[dict]:
    if args.document is not None:
        return [{"id": None, "document": idp.check_document(args.document, "--document")}]
    if args.document_file:
        return [{"id": None, "document": idp.read_document_file(args.document_file)}]
    out = []
    for n, r in enumerate(fileio.read_records(args.input), 1):
        where = f"{args.input}: record {n}"
        if "document" not in r and "text" not in r:
            raise fileio.UserError(f"{where}: missing field 'document' (or 'text')")
        out.append({"id": r.get("id", n), "document": idp.check_document(r.get("document", r.get("text")), where)})
    return out


def main(args):
    # load
    started = time.time()
    cli.print_config("infer_idp", args)
    schema = jg.load_schema(args.schema)
    docs = read_documents(args)
    model, tok, ms, cache, grammar, limit = idp.load_extractor(args, schema)
    if grammar:
        print(f"grammar compiled in {grammar.compile_seconds:.2f} s", file=sys.stderr)

    # run
    prompts = []
    for d in docs:
        where = "--document" if d["id"] is None else f"{args.input or args.document_file}: record {d['id']}"
        prompts.append(idp.document_prompt(tok, schema, d["document"], limit, where)[0])
    progress = None
    if args.input:
        from tqdm import tqdm
        progress = tqdm(total=len(prompts), desc="infer_idp", unit="doc", file=sys.stderr)
    results, stats = jg.generate(model, tok, prompts, max_new_tokens=args.max_new_tokens,
                                 batch_size=args.batch_size, grammar=grammar, cache=cache,
                                 max_string_chars=args.max_string_chars, progress=progress)
    if progress:
        progress.close()
    validator = jg.make_validator(schema)
    checked = [jg.check_output(r["text"], validator) for r in results]

    # save
    if not args.input:
        c, r = checked[0], results[0]
        if not c["schema_valid"]:
            print(f"error: the model's output is not valid for {args.schema}: {c['error']}"
                  + ("" if r["ended"] else f" (cut off at --max_new_tokens {args.max_new_tokens})")
                  + f"\noutput was: {r['text'][:500]}", file=sys.stderr)
            sys.exit(1)
        if r["budget_closed"]:
            fileio.note(f"the reply was closed early to fit --max_new_tokens {args.max_new_tokens}")
        print(jg.canonical_json(c["json"], schema))
        return c["json"]
    rows = [{"id": d["id"], "output": c["json"] if c["schema_valid"] else None, "valid": c["schema_valid"],
             "error": c["error"], "budget_closed": r["budget_closed"], "raw": None if c["schema_valid"] else r["text"]}
            for d, c, r in zip(docs, checked, results)]
    fileio.write_jsonl(args.output, rows)
    bad = sum(not c["schema_valid"] for c in checked)
    print(f"wrote {len(rows)} extractions to {args.output} ({bad} invalid, "
          f"{sum(r['budget_closed'] for r in results)} closed early for the token budget) "
          f"in {time.time() - started:.1f} s", file=sys.stderr)
    if bad:
        print(f"error: {bad} of {len(rows)} outputs are not valid for {args.schema} (see 'error' in {args.output})",
              file=sys.stderr)
        sys.exit(1)
    return rows


if __name__ == "__main__":
    with fileio.user_errors():
        main(parse_args())
