"""IDP helpers shared by infer_idp.py, eval_idp.py and idp_prepare.py: the one user message (schema + document +
instruction) that training rows and inference both use, document reading and fitting into the context, evaluation
records, and field-level metrics (exact match raw and normalised, micro/macro F1)."""
from __future__ import annotations

import json
import unicodedata
from collections import Counter
from pathlib import Path

from common import chat_prompt
from fileio import UserError, note, read_records

INSTRUCTION = ("Extract the information from the document below as one JSON object that conforms to the JSON Schema. "
               "Reply with the JSON object only. Use null where the schema allows it and the document does not say.")


def add_decoding_args(ap, batch_help: str = "documents generated together") -> None:
    """The decoding flags infer_idp.py and eval_idp.py share (# run group)."""
    ap.add_argument("--max_new_tokens", type=int, default=512,
                    help="token budget of each reply; constrained JSON is always closed within it")
    ap.add_argument("--max_input_tokens", type=int, default=0,
                    help="prompt tokens allowed; a longer document is truncated at its end with a NOTE "
                         "(0 = model context minus --max_new_tokens)")
    ap.add_argument("--max_string_chars", type=int, default=256,
                    help="a string value is closed once it has this many characters, where the schema allows "
                         "(a soft bound kept by the decoder, not added to the schema; 0 = unbounded)")
    ap.add_argument("--max_items", type=int, default=32,
                    help="maxItems given to arrays without one, in the grammar only (0 = unbounded)")
    ap.add_argument("--batch_size", type=int, default=8, help=batch_help)
    ap.add_argument("--unconstrained", action="store_true",
                    help="plain greedy decoding without the grammar (output still validated), for comparison")


def check_decoding_args(ap, args) -> None:
    """The decoding flags' bounds (argparse's own error: usage and exit 2)."""
    for k in ("max_new_tokens", "batch_size"):
        if getattr(args, k) < 1:
            ap.error(f"--{k} must be >= 1")


def schema_text(schema: dict) -> str:
    """The schema as the prompt shows it: compact, keys in the file's order (that order is the output's order)."""
    return json.dumps(schema, ensure_ascii=False, separators=(",", ":"))


def idp_user_message(schema: dict, document: str) -> str:
    """The user turn for one extraction: instruction, schema, document. idp_prepare.py writes it as the `input` of
    SFT/KD rows (and the `prompt` of DPO rows), infer_idp.py and eval_idp.py wrap it with common.chat_prompt, so a
    model is trained on exactly the prompt it is served."""
    return f"{INSTRUCTION}\n\nJSON Schema:\n{schema_text(schema)}\n\nDocument:\n{document}"


def read_document_file(path) -> str:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"document file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read document file {p} as UTF-8 text: {e}") from None
    return check_document(text, str(p))


def check_document(text, where: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"{where}: the document is empty")
    return text


def fit_document(tok, schema: dict, document: str, max_input_tokens: int, where: str = "document",
                 quiet: bool = False) -> tuple[str, bool]:
    """(document, truncated): the document cut at the end (with a NOTE unless quiet) so that the whole prompt fits
    max_input_tokens. Receipts and invoices put the fields that matter near the top; a user who needs the end
    should split the document."""
    def n_prompt(doc: str) -> int:
        return len(tok(chat_prompt(tok, idp_user_message(schema, doc)), add_special_tokens=False)["input_ids"])

    total = n_prompt(document)
    if total <= max_input_tokens:
        return document, False
    room = max_input_tokens - n_prompt("")
    if room <= 0:
        raise UserError(f"the prompt without any document already has {n_prompt('')} tokens, more than the "
                        f"{max_input_tokens} input tokens allowed: shorten the schema or raise --max_input_tokens")
    ids = tok(document, add_special_tokens=False)["input_ids"]
    keep = min(room, len(ids))
    while keep > 0:
        cut = tok.decode(ids[:keep])
        if n_prompt(cut) <= max_input_tokens:
            break
        keep -= max(1, (n_prompt(cut) - max_input_tokens))
    if not quiet:
        note(f"{where}: the prompt has {total} tokens, more than the {max_input_tokens} input tokens allowed; the "
             f"document is truncated to its first {keep} of {len(ids)} tokens", once=False)
    return tok.decode(ids[:keep]), True


def document_prompt(tok, schema: dict, document: str, max_input_tokens: int, where: str = "document",
                    quiet: bool = False) -> tuple[str, bool]:
    """(chat prompt, truncated): the extraction prompt for `document`, cut by fit_document to fit."""
    text, cut = fit_document(tok, schema, document, max_input_tokens, where, quiet)
    return chat_prompt(tok, idp_user_message(schema, text)), cut


# ----------------------------------------------------------------------------------------------------------------
# evaluation records

def _gold(r: dict, where: str):
    for k in ("gold", "output", "teacher_output", "chosen"):
        if k in r:
            g = r[k]
            if isinstance(g, str):
                try:
                    g = json.loads(g)
                except json.JSONDecodeError as e:
                    raise UserError(f"{where}: field '{k}' is not a JSON string ({e.msg})") from None
            if not isinstance(g, dict):
                raise UserError(f"{where}: field '{k}' must be a JSON object (or a string holding one)")
            return g
    raise UserError(f"{where}: no gold answer: expected 'gold' (object), 'output' or 'teacher_output' (JSON string)")


def read_eval_records(path, split: str | None = None, limit: int | None = None) -> list[dict]:
    """Evaluation rows as [{"id", "document" or "message", "gold"}]. Accepted records: {"document"|"text", "gold"}
    (idp_prepare.py's test files, and ../shared/data/idp/sroie.jsonl itself with --split test), or SFT/KD/DPO rows
    whose `input`/`prompt` is already the user message and whose `output`/`teacher_output`/`chosen` is the gold."""
    rows = read_records(path)
    if split:
        if not any("split" in r for r in rows):
            raise UserError(f"{path}: --split {split} given but the records have no 'split' field")
        rows = [r for r in rows if r.get("split") == split]
        if not rows:
            raise UserError(f"{path}: no records with split '{split}'")
    if limit:
        rows = rows[:limit]
    out = []
    for n, r in enumerate(rows, 1):
        where = f"{path}: record {n}" + (f" (id {r['id']})" if "id" in r else "")
        rec = {"id": r.get("id", n), "gold": _gold(r, where)}
        if "document" in r or "text" in r:
            rec["document"] = check_document(r.get("document", r.get("text")), where)
        elif isinstance(r.get("input", r.get("prompt")), str) and r.get("input", r.get("prompt")).strip():
            rec["message"] = r.get("input", r.get("prompt"))
        else:
            raise UserError(f"{where}: expected a 'document' (or 'text') field, or an 'input' user message")
        out.append(rec)
    return out


# ----------------------------------------------------------------------------------------------------------------
# field metrics

def leaves(obj, prefix: str = "") -> dict[str, list]:
    """Leaf values by field path: nested keys joined with '.', list positions collapsed to '[]' (line items are
    compared as multisets, whatever their order). Empty values (null, "") are no extraction and are left out."""
    out: dict[str, list] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            for f, vals in leaves(v, f"{prefix}.{k}" if prefix else str(k)).items():
                out.setdefault(f, []).extend(vals)
    elif isinstance(obj, list):
        for v in obj:
            for f, vals in leaves(v, f"{prefix}[]").items():
                out.setdefault(f, []).extend(vals)
    elif obj is not None and obj != "":
        out[prefix or "$"] = [obj]
    return out


def value_key(v, normalized: bool) -> str:
    """Raw: the JSON value as written ("50" and 50 differ). Normalised: strings NFKC, case-folded, whitespace
    collapsed; numbers as floats (50 == 50.0)."""
    if not normalized:
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, bool) or v is None:
        return json.dumps(v)
    if isinstance(v, (int, float)):
        return repr(float(v))
    return " ".join(unicodedata.normalize("NFKC", str(v)).split()).casefold()


def _f1(tp: int, n_pred: int, n_gold: int) -> tuple[float, float, float]:
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_gold if n_gold else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def field_metrics(preds: list, golds: list[dict]) -> dict:
    """Field-level scores of predicted objects (None or a non-object counts as no fields) against gold objects.
    Per field and document the values form a multiset: exact match = the multisets are equal (both empty counts),
    true positives = their intersection. Micro F1 pools all fields' counts; macro F1 averages the per-field F1 over
    fields that have a gold value somewhere. (Multiset matching per field, so counts are kept by hand rather than
    with scikit-learn's label-array F1.) Every score is given raw and normalised (see value_key)."""
    if len(preds) != len(golds):
        raise ValueError("preds and golds differ in length")
    out = {"n": len(golds)}
    for mode in ("raw", "normalized"):
        norm = mode == "normalized"
        per = []
        for p, g in zip(preds, golds):
            pl = leaves(p) if isinstance(p, dict) else {}
            gl = leaves(g)
            per.append(({f: Counter(value_key(v, norm) for v in vs) for f, vs in pl.items()},
                        {f: Counter(value_key(v, norm) for v in vs) for f, vs in gl.items()}))
        gold_fields = sorted({f for _, gl in per for f in gl})
        all_fields = sorted(set(gold_fields) | {f for pl, _ in per for f in pl})
        counts = {f: [0, 0, 0] for f in all_fields}  # tp, n_pred, n_gold
        em = {f: 0 for f in gold_fields}
        doc_em = 0
        for pl, gl in per:
            for f in all_fields:
                pc, gc = pl.get(f, Counter()), gl.get(f, Counter())
                c = counts[f]
                c[0] += sum((pc & gc).values())
                c[1] += sum(pc.values())
                c[2] += sum(gc.values())
                if f in em and pc == gc:
                    em[f] += 1
            doc_em += all(pl.get(f, Counter()) == gl.get(f, Counter()) for f in all_fields)
        n = max(len(golds), 1)
        field_f1 = {f: _f1(*counts[f])[2] for f in gold_fields}
        tp, n_pred, n_gold = (sum(c[i] for c in counts.values()) for i in range(3))
        p, r, f1 = _f1(tp, n_pred, n_gold)
        out.setdefault("field_exact_match", {})[mode] = {f: em[f] / n for f in gold_fields}
        out.setdefault("field_f1", {})[mode] = field_f1
        out.setdefault("exact_match", {})[mode] = sum(em.values()) / (n * len(gold_fields)) if gold_fields else 0.0
        out.setdefault("doc_exact_match", {})[mode] = doc_em / n
        out.setdefault("micro_precision", {})[mode] = p
        out.setdefault("micro_recall", {})[mode] = r
        out.setdefault("micro_f1", {})[mode] = f1
        out.setdefault("macro_f1", {})[mode] = sum(field_f1.values()) / len(field_f1) if field_f1 else 0.0
    return out


def load_extractor(args, schema: dict):
    """infer_idp.py's and eval_idp.py's model: (model, tok, model spec, grammar cache, compiled grammar, prompt
    token limit); no grammar with --unconstrained. A schema over json_grammar's limits (compile time and memory
    included) is a SchemaRefused naming args.schema: one line, exit 2."""
    import common
    import json_grammar as jg
    if not args.unconstrained:
        jg.start_worker()  # the compile worker imports xgrammar while the model loads
    model, tok, ms = common.load_model(args.model_dir, quantize=args.quantize,
                                       trust_remote_code=args.trust_remote_code,
                                       max_memory_gb=args.max_memory_gb)
    cache = grammar = None
    if not args.unconstrained:
        cache = jg.GrammarCache(tok, vocab_size=model.config.vocab_size)
        grammar = cache.compile(schema, args.max_items, where=str(args.schema))
    return model, tok, ms, cache, grammar, input_token_limit(model, tok, args.max_input_tokens, args.max_new_tokens)


def input_token_limit(model, tok, requested: int, max_new_tokens: int) -> int:
    """--max_input_tokens, or (0) the model's context minus max_new_tokens."""
    context = getattr(model.config, "max_position_embeddings", None) or getattr(tok, "model_max_length", None)
    if not context or context > 10**7:  # tokenizers without a limit report a huge sentinel
        context = 8192
        note(f"the model states no context length: assuming {context} tokens")
    if max_new_tokens >= context:
        raise UserError(f"--max_new_tokens {max_new_tokens} does not fit the model's context of {context} tokens")
    limit = context - max_new_tokens
    if requested:
        if requested > limit:
            note(f"--max_input_tokens {requested} lowered to {limit} (context {context} - max_new_tokens "
                 f"{max_new_tokens})")
        return min(requested, limit)
    return limit
